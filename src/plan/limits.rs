//! How `mem_limit` and `cpu_limit` are enforced on a given host.
//!
//! A systemd user manager gives a real cgroup (`systemd-run --user --scope`
//! with `MemoryMax` and `CPUQuota`); without one, memory is capped as address
//! space with `prlimit` and CPU is not enforced. The limits are always
//! exported as `MEM_LIMIT` / `CPU_LIMIT` by the hub either way.

use super::hosts::{human_bytes, HostFacts};
use super::quote::invalid;
use crate::error::{Error, Result};

/// How resource limits are enforced for one launch (decided by [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitPlan {
    /// No enforcement.
    None,
    /// `systemd-run --user --scope --quiet --unit=UNIT -p MemoryMax=BYTES -p CPUQuota=PCT% -- ...`
    ///
    /// A property that is `None` is left out; with both left out the named
    /// scope is still created, since the caller chose it over [`LimitPlan::None`].
    Systemd {
        /// Name of the transient scope unit.
        unit: String,
        /// `MemoryMax=` in bytes.
        mem_max: Option<u64>,
        /// `CPUQuota=` in percent of one CPU.
        cpu_quota_percent: Option<u32>,
    },
    /// `prlimit --as=BYTES -- ...` (virtual memory cap).
    Prlimit {
        /// `--as=` in bytes.
        address_space: Option<u64>,
    },
}

/// The admin's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnforcementMode {
    /// systemd when the host has a user manager, else prlimit, else nothing.
    #[default]
    Auto,
    /// Require systemd; a host without a user manager refuses the server.
    Systemd,
    /// Address-space limit with prlimit; CPU not enforced.
    Prlimit,
    /// Export the limits, enforce nothing.
    None,
}

/// Limits asked for one server.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Bytes.
    pub mem: Option<u64>,
    /// Cores.
    pub cpu: Option<f64>,
}

/// What an admin does so that `user` gets a systemd user manager on a host
/// (one that runs while the user is not logged in, as servers need).
pub fn linger_advice(user: &str) -> String {
    format!("as root on the host, `loginctl enable-linger {user}` starts one that outlives logins")
}

/// The transient scope a launch with [`LimitPlan::Systemd`] runs in.
pub fn scope_unit(run_id: &str) -> String {
    format!("jupyterhub-ssh-{run_id}")
}

/// How limits would be enforced on a host for `user`, for `ssh-spawner
/// check`: a short word, and what the admin should do when systemd cannot
/// apply (`Err` when `mode` cannot work there at all).
pub fn host_summary(
    mode: EnforcementMode,
    facts: &HostFacts,
    user: &str,
) -> std::result::Result<(String, Option<String>), String> {
    let advice = || {
        format!(
            "no systemd user manager answers for {user}, so memory is capped only as address space \
             and CPU is not enforced; {}",
            linger_advice(user)
        )
    };
    match mode {
        EnforcementMode::None => Ok(("none".into(), None)),
        EnforcementMode::Systemd | EnforcementMode::Auto if facts.systemd_user => {
            Ok(("systemd".into(), None))
        }
        EnforcementMode::Systemd => Err(format!(
            "enforcement = systemd, but no systemd user manager answers for {user}: every spawn with \
             limits fails here; {}",
            linger_advice(user)
        )),
        EnforcementMode::Auto | EnforcementMode::Prlimit if facts.prlimit => {
            Ok(("prlimit".into(), (mode == EnforcementMode::Auto).then(advice)))
        }
        EnforcementMode::Prlimit => Err("enforcement = prlimit, but prlimit is not installed".into()),
        EnforcementMode::Auto => Ok(("none".into(), Some(advice()))),
    }
}

/// The plan for one launch and a sentence for the log and progress.
/// `user` is the login on the host (named in what the admin should do).
pub fn decide(
    mode: EnforcementMode,
    facts: &HostFacts,
    limits: &Limits,
    run_id: &str,
    user: &str,
) -> Result<(LimitPlan, String)> {
    if limits.mem.is_none() && limits.cpu.is_none() {
        return Ok((LimitPlan::None, "no resource limits set".into()));
    }
    let asked = describe(limits);
    let systemd = || {
        (
            LimitPlan::Systemd {
                unit: scope_unit(run_id),
                mem_max: limits.mem,
                cpu_quota_percent: limits.cpu.map(|c| (c * 100.0).round().max(1.0) as u32),
            },
            format!("{asked} enforced by a systemd scope"),
        )
    };
    let prlimit = || {
        let cpu_note = if limits.cpu.is_some() {
            format!(
                "; CPU limit not enforced (no systemd user manager for {user}: {})",
                linger_advice(user)
            )
        } else {
            String::new()
        };
        match limits.mem {
            Some(m) => (
                LimitPlan::Prlimit {
                    address_space: Some(m),
                },
                format!(
                    "memory {} enforced as an address-space limit (prlimit){cpu_note}",
                    human_bytes(m)
                ),
            ),
            None => (
                LimitPlan::None,
                format!(
                    "{asked} not enforced (no systemd user manager for {user}: {})",
                    linger_advice(user)
                ),
            ),
        }
    };
    match mode {
        EnforcementMode::None => Ok((
            LimitPlan::None,
            format!("{asked} not enforced (enforcement = none)"),
        )),
        EnforcementMode::Systemd if facts.systemd_user => Ok(systemd()),
        EnforcementMode::Systemd => Err(Error::Invalid {
            what: format!("host {}", facts.hostname),
            reason: format!(
                "enforcement = systemd, but no systemd user manager answers there for {user} \
                 (`systemctl --user` fails); {}, or set enforcement = \"auto\"",
                linger_advice(user)
            ),
        }),
        EnforcementMode::Auto if facts.systemd_user => Ok(systemd()),
        EnforcementMode::Auto | EnforcementMode::Prlimit if facts.prlimit => Ok(prlimit()),
        EnforcementMode::Prlimit => Err(Error::Invalid {
            what: format!("host {}", facts.hostname),
            reason: "enforcement = prlimit, but prlimit is not installed there".into(),
        }),
        EnforcementMode::Auto => Ok((
            LimitPlan::None,
            format!("{asked} not enforced (neither systemd nor prlimit on the host)"),
        )),
    }
}

/// The words a launch puts before the server's argv to enforce `limits`
/// (none for [`LimitPlan::None`]); Error::Invalid for a unit name or a
/// limit no host would take.
pub fn argv(limits: &LimitPlan) -> Result<Vec<String>> {
    match limits {
        LimitPlan::None => Ok(Vec::new()),
        LimitPlan::Prlimit { address_space } => match address_space {
            None => Ok(Vec::new()),
            Some(0) => Err(invalid("address space limit", "must be more than 0 bytes")),
            Some(n) => Ok(vec!["prlimit".into(), format!("--as={n}"), "--".into()]),
        },
        LimitPlan::Systemd {
            unit,
            mem_max,
            cpu_quota_percent,
        } => {
            let unit_ok = !unit.is_empty()
                && unit.len() <= 255
                && !unit.starts_with('-')
                && unit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_.@-".contains(&b));
            if !unit_ok {
                return Err(invalid(
                    format!("systemd unit name {unit:?}"),
                    "must be 1 to 255 characters of A-Z, a-z, 0-9, ':', '_', '.', '@', '-' and not start with '-'",
                ));
            }
            let mut w: Vec<String> = ["systemd-run", "--user", "--scope", "--quiet"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            w.push(format!("--unit={unit}"));
            match mem_max {
                Some(0) => return Err(invalid("memory limit", "must be more than 0 bytes")),
                Some(n) => {
                    w.push("-p".into());
                    w.push(format!("MemoryMax={n}"));
                }
                None => {}
            }
            match cpu_quota_percent {
                Some(0) => return Err(invalid("CPU quota", "must be more than 0%")),
                Some(p) => {
                    w.push("-p".into());
                    w.push(format!("CPUQuota={p}%"));
                }
                None => {}
            }
            w.push("--".into());
            Ok(w)
        }
    }
}

fn describe(limits: &Limits) -> String {
    match (limits.mem, limits.cpu) {
        (Some(m), Some(c)) => format!("memory {} and CPU {c}", human_bytes(m)),
        (Some(m), None) => format!("memory {}", human_bytes(m)),
        (None, Some(c)) => format!("CPU {c}"),
        (None, None) => "no limits".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(systemd_user: bool, prlimit: bool) -> HostFacts {
        let mut f =
            super::super::hosts::parse_facts("home=/h\nuid=1\ncpus=2\nhostname=n1").unwrap();
        f.systemd_user = systemd_user;
        f.prlimit = prlimit;
        f
    }

    #[test]
    fn auto_prefers_systemd_then_prlimit() {
        let l = Limits {
            mem: Some(2 << 30),
            cpu: Some(1.5),
        };
        let (plan, why) = decide(EnforcementMode::Auto, &facts(true, true), &l, "r1", "u").unwrap();
        assert_eq!(
            plan,
            LimitPlan::Systemd {
                unit: "jupyterhub-ssh-r1".into(),
                mem_max: Some(2 << 30),
                cpu_quota_percent: Some(150)
            }
        );
        assert_eq!(why, "memory 2G and CPU 1.5 enforced by a systemd scope");
        let (plan, why) =
            decide(EnforcementMode::Auto, &facts(false, true), &l, "r1", "u").unwrap();
        assert_eq!(
            plan,
            LimitPlan::Prlimit {
                address_space: Some(2 << 30)
            }
        );
        assert!(
            why.contains("prlimit") && why.contains("CPU limit not enforced"),
            "{why}"
        );
        let (plan, why) =
            decide(EnforcementMode::Auto, &facts(false, false), &l, "r1", "u").unwrap();
        assert_eq!(plan, LimitPlan::None);
        assert!(why.contains("not enforced"), "{why}");
    }

    #[test]
    fn explicit_modes_refuse_hosts_that_cannot_do_them() {
        let l = Limits {
            mem: Some(1 << 30),
            cpu: None,
        };
        assert!(
            decide(EnforcementMode::Systemd, &facts(false, true), &l, "r", "u")
                .unwrap_err()
                .to_string()
                .contains("systemd")
        );
        assert!(
            decide(EnforcementMode::Prlimit, &facts(true, false), &l, "r", "u")
                .unwrap_err()
                .to_string()
                .contains("prlimit")
        );
        assert_eq!(
            decide(EnforcementMode::None, &facts(true, true), &l, "r", "u")
                .unwrap()
                .0,
            LimitPlan::None
        );
        assert_eq!(
            decide(
                EnforcementMode::Systemd,
                &facts(false, false),
                &Limits::default(),
                "r",
                "u"
            )
            .unwrap()
            .0,
            LimitPlan::None
        );
    }

    #[test]
    fn where_systemd_cannot_apply_the_admin_is_told_to_enable_lingering() {
        let l = Limits {
            mem: Some(1 << 30),
            cpu: Some(0.5),
        };
        let e = decide(
            EnforcementMode::Systemd,
            &facts(false, true),
            &l,
            "r",
            "ann",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("host n1") && e.contains("loginctl enable-linger ann"),
            "{e}"
        );
        let (_, why) = decide(EnforcementMode::Auto, &facts(false, true), &l, "r", "ann").unwrap();
        assert!(why.contains("loginctl enable-linger ann"), "{why}");
        assert_eq!(
            host_summary(EnforcementMode::Auto, &facts(true, true), "ann").unwrap(),
            ("systemd".to_string(), None)
        );
        let (how, advice) =
            host_summary(EnforcementMode::Auto, &facts(false, true), "ann").unwrap();
        assert_eq!(how, "prlimit");
        assert!(advice.unwrap().contains("loginctl enable-linger ann"));
        let err = host_summary(EnforcementMode::Systemd, &facts(false, true), "ann").unwrap_err();
        assert!(err.contains("every spawn with limits fails") && err.contains("enable-linger ann"));
        assert_eq!(
            host_summary(EnforcementMode::Prlimit, &facts(false, true), "ann").unwrap(),
            ("prlimit".to_string(), None)
        );
        assert_eq!(scope_unit("ab12"), "jupyterhub-ssh-ab12");
    }
}
