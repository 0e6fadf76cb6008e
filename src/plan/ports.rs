//! Choosing a port on a host: read its listening sockets from
//! `/proc/net/tcp` and `/proc/net/tcp6` (no Python needed on the host) and
//! pick a random free one in the configured range.

use std::collections::BTreeSet;

use rand::Rng;

use crate::error::{Error, Result};

/// An inclusive port range, e.g. 20000–29999, to fit a firewall rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            start: 20000,
            end: 29999,
        }
    }
}

impl PortRange {
    /// Refuse empty and privileged ranges.
    pub fn validate(&self) -> Result<()> {
        if self.start > self.end || self.start < 1024 {
            return Err(Error::Invalid {
                what: format!("port range {}-{}", self.start, self.end),
                reason: "needs 1024 <= start <= end".into(),
            });
        }
        Ok(())
    }
}

/// Ports in LISTEN state (`st` = `0A`) in the text of `/proc/net/tcp` or
/// `/proc/net/tcp6` (both can be concatenated). Unparsable lines are skipped.
pub fn listening_ports(proc_net_tcp: &str) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for line in proc_net_tcp.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != "0A" {
            continue;
        }
        if let Some((_, port)) = local.rsplit_once(':') {
            if let Ok(port) = u16::from_str_radix(port, 16) {
                ports.insert(port);
            }
        }
    }
    ports
}

/// A random port in `range` that is neither listening nor in `avoid`
/// (ports already tried). `None` when the range is exhausted.
pub fn choose_port(
    range: PortRange,
    listening: &BTreeSet<u16>,
    avoid: &BTreeSet<u16>,
    rng: &mut impl Rng,
) -> Option<u16> {
    let free = |p: &u16| !listening.contains(p) && !avoid.contains(p);
    let size = u32::from(range.end) - u32::from(range.start) + 1;
    // Random probes first: cheap when the range is mostly free.
    for _ in 0..64 {
        let p = range.start + rng.random_range(0..size) as u16;
        if free(&p) {
            return Some(p);
        }
    }
    // A crowded range: pick uniformly among what is left.
    let left: Vec<u16> = (range.start..=range.end).filter(free).collect();
    if left.is_empty() {
        None
    } else {
        Some(left[rng.random_range(0..left.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0B0012C6:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 2 1 0000000000000000 100 0 0 10 0
   2: 0B0012C6:0016 010012C6:D3A4 01 00000000:00000000 02:000A7A5D 00000000     0        0 3 4 0000000000000000 20 4 29 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:4E22 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 5 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn reads_listening_ports_from_tcp_and_tcp6() {
        let ports = listening_ports(&format!("{TCP}{TCP6}"));
        // 0x16 = 22, 0x4E21 = 20001, 0x4E22 = 20002; the established one (01) is not listening.
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![22, 20001, 20002]
        );
        assert!(listening_ports("garbage\n\n1: x y 0A").is_empty());
    }

    #[test]
    fn chooses_only_free_ports_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let range = PortRange {
            start: 20000,
            end: 20009,
        };
        let listening: BTreeSet<u16> = (20000..=20008).collect();
        for _ in 0..20 {
            assert_eq!(
                choose_port(range, &listening, &BTreeSet::new(), &mut rng),
                Some(20009)
            );
        }
        let avoid: BTreeSet<u16> = [20009].into();
        assert_eq!(choose_port(range, &listening, &avoid, &mut rng), None);
        let any = choose_port(range, &BTreeSet::new(), &BTreeSet::new(), &mut rng).unwrap();
        assert!((20000..=20009).contains(&any));
    }

    #[test]
    fn ranges_are_validated() {
        assert!(PortRange {
            start: 30000,
            end: 20000
        }
        .validate()
        .is_err());
        assert!(PortRange { start: 80, end: 90 }.validate().is_err());
        assert!(PortRange::default().validate().is_ok());
    }
}
