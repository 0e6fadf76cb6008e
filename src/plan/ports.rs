//! Choosing a port on a host: read its listening sockets from
//! `/proc/net/tcp` and `/proc/net/tcp6` (no Python needed on the host) and
//! pick a random free one in the configured range; then, just before the
//! launch, what sshd's connects to it say.

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

/// What the probes of a port just before the launch say: sshd on the host
/// was asked to connect to it at each of [`probe_addresses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortProbe {
    /// Something accepted a connection at this address: do not start there.
    Taken(String),
    /// Every address refused the connection: nothing listens where the
    /// server's bind or the hub's connection could meet it.
    Free,
    /// Some address gave no answer (sshd does not forward, or the probe
    /// failed): the launch script checks the port itself.
    Unknown,
}

/// Where to probe a port: the loopbacks (a server binds `0.0.0.0` or
/// `127.0.0.1`, and a listener on either, or on `::`, refuses that bind),
/// and the address the hub connects to (a listener bound to that address
/// alone would answer the hub in the server's place), unless the server is
/// reached through a tunnel (it binds the loopback) or that address is a
/// loopback already.
pub fn probe_addresses(hub_address: &str, tunnel: bool) -> Vec<String> {
    let mut v = vec!["127.0.0.1".to_string(), "::1".to_string()];
    let a = hub_address.trim_start_matches('[').trim_end_matches(']');
    let loopback = a
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
        || a.eq_ignore_ascii_case("localhost");
    if !tunnel && !a.is_empty() && !loopback {
        v.push(a.to_string());
    }
    v
}

/// The pause before the next turn of the hub's wait for a launched server
/// to listen (`turn` from 0, `waited` so far): 10 ms doubling each turn, at
/// most 200 ms, and 1 s once the server has taken 5 s. A server that
/// listens within a second is seen within a few tens of milliseconds; one
/// that takes 30 s costs about 55 turns (no program on the host for any).
pub fn ready_probe_delay(turn: u32, waited: std::time::Duration) -> std::time::Duration {
    use std::time::Duration;
    let cap = if waited < Duration::from_secs(5) {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    Duration::from_millis(10u64.saturating_mul(1u64 << turn.min(16))).min(cap)
}

/// One verdict from each address's answer: `Some(true)` something
/// accepted, `Some(false)` the connect was refused, `None` no answer.
/// A single acceptance is enough to call the port taken; it is free only
/// when every address answered and all of them refused.
pub fn probe_verdict(answers: &[(String, Option<bool>)]) -> PortProbe {
    if let Some((a, _)) = answers.iter().find(|(_, x)| *x == Some(true)) {
        return PortProbe::Taken(a.clone());
    }
    if !answers.is_empty() && answers.iter().all(|(_, x)| *x == Some(false)) {
        return PortProbe::Free;
    }
    PortProbe::Unknown
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
    fn the_ready_wait_backs_off_from_10_ms_to_200_ms_then_1_s() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let early: Vec<u64> = (0..7)
            .map(|t| ready_probe_delay(t, ms(100)).as_millis() as u64)
            .collect();
        assert_eq!(early, vec![10, 20, 40, 80, 160, 200, 200]);
        assert_eq!(ready_probe_delay(40, ms(100)), ms(200));
        assert_eq!(
            ready_probe_delay(u32::MAX, Duration::from_secs(6)),
            ms(1000)
        );
        // Turns over a 30 s wait: what a slow server costs the host.
        let (mut waited, mut turns) = (Duration::ZERO, 0u32);
        while waited < Duration::from_secs(30) {
            waited += ready_probe_delay(turns, waited);
            turns += 1;
        }
        assert!((50..=60).contains(&turns), "{turns} turns in 30 s");
    }

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

    #[test]
    fn probes_go_to_the_loopbacks_and_the_hubs_address_unless_tunnelled() {
        assert_eq!(
            probe_addresses("198.18.0.11", false),
            ["127.0.0.1", "::1", "198.18.0.11"]
        );
        assert_eq!(probe_addresses("node1.lab", false)[2], "node1.lab");
        assert_eq!(probe_addresses("[fd00::5]", false)[2], "fd00::5");
        assert_eq!(probe_addresses("198.18.0.11", true), ["127.0.0.1", "::1"]);
        for lo in ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2", ""] {
            assert_eq!(probe_addresses(lo, false).len(), 2, "{lo}");
        }
    }

    #[test]
    fn one_acceptance_is_taken_and_only_all_refusals_are_free() {
        let a = |v: &[(&str, Option<bool>)]| -> Vec<(String, Option<bool>)> {
            v.iter().map(|(s, x)| (s.to_string(), *x)).collect()
        };
        assert_eq!(
            probe_verdict(&a(&[("127.0.0.1", Some(false)), ("::1", Some(true))])),
            PortProbe::Taken("::1".into())
        );
        assert_eq!(
            probe_verdict(&a(&[("127.0.0.1", None), ("h", Some(true))])),
            PortProbe::Taken("h".into())
        );
        assert_eq!(
            probe_verdict(&a(&[("127.0.0.1", Some(false)), ("::1", Some(false))])),
            PortProbe::Free
        );
        assert_eq!(
            probe_verdict(&a(&[("127.0.0.1", Some(false)), ("::1", None)])),
            PortProbe::Unknown
        );
        assert_eq!(probe_verdict(&[]), PortProbe::Unknown);
    }
}
