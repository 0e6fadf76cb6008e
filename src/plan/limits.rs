//! How `mem_limit` and `cpu_limit` are enforced on a given host.
//!
//! A systemd user manager gives a real cgroup (`systemd-run --user --scope`
//! with `MemoryMax` and `CPUQuota`); without one, memory is capped as address
//! space with `prlimit` and CPU is not enforced. The limits are always
//! exported as `MEM_LIMIT` / `CPU_LIMIT` by the hub either way.

use super::hosts::{human_bytes, HostFacts};
use super::script::LimitPlan;
use crate::error::{Error, Result};

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

/// The plan for one launch and a sentence for the log and progress.
pub fn decide(
    mode: EnforcementMode,
    facts: &HostFacts,
    limits: &Limits,
    run_id: &str,
) -> Result<(LimitPlan, String)> {
    if limits.mem.is_none() && limits.cpu.is_none() {
        return Ok((LimitPlan::None, "no resource limits set".into()));
    }
    let asked = describe(limits);
    let systemd = || {
        (
            LimitPlan::Systemd {
                unit: format!("jupyterhub-ssh-{run_id}"),
                mem_max: limits.mem,
                cpu_quota_percent: limits.cpu.map(|c| (c * 100.0).round().max(1.0) as u32),
            },
            format!("{asked} enforced by a systemd scope"),
        )
    };
    let prlimit = || {
        let cpu_note = if limits.cpu.is_some() {
            "; CPU limit not enforced (no systemd user manager)"
        } else {
            ""
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
                format!("{asked} not enforced (no systemd user manager)"),
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
            reason: "enforcement = systemd, but no systemd user manager answers there".into(),
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
        let (plan, why) = decide(EnforcementMode::Auto, &facts(true, true), &l, "r1").unwrap();
        assert_eq!(
            plan,
            LimitPlan::Systemd {
                unit: "jupyterhub-ssh-r1".into(),
                mem_max: Some(2 << 30),
                cpu_quota_percent: Some(150)
            }
        );
        assert_eq!(why, "memory 2G and CPU 1.5 enforced by a systemd scope");
        let (plan, why) = decide(EnforcementMode::Auto, &facts(false, true), &l, "r1").unwrap();
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
        let (plan, why) = decide(EnforcementMode::Auto, &facts(false, false), &l, "r1").unwrap();
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
            decide(EnforcementMode::Systemd, &facts(false, true), &l, "r")
                .unwrap_err()
                .to_string()
                .contains("systemd")
        );
        assert!(
            decide(EnforcementMode::Prlimit, &facts(true, false), &l, "r")
                .unwrap_err()
                .to_string()
                .contains("prlimit")
        );
        assert_eq!(
            decide(EnforcementMode::None, &facts(true, true), &l, "r")
                .unwrap()
                .0,
            LimitPlan::None
        );
        assert_eq!(
            decide(
                EnforcementMode::Systemd,
                &facts(false, false),
                &Limits::default(),
                "r"
            )
            .unwrap()
            .0,
            LimitPlan::None
        );
    }
}
