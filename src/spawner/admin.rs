//! The admin commands' side: `ssh-spawner check` (every host as a user:
//! reachable, host key, auth, command, figures, down) and `list`.

use super::{futures_join, Spawner};
use crate::error::{Error, Result};
use crate::plan::hosts;
use crate::plan::limits;
use crate::plan::quote;

/// One row of `ssh-spawner check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostCheck {
    /// Display name.
    pub host: String,
    /// `address:port`.
    pub address: String,
    /// TCP and SSH answered.
    pub reachable: bool,
    /// `ok`, `unknown`, `changed`, `revoked` or `-` (not reached).
    pub host_key: String,
    /// `ok`, `refused` or `-`.
    pub auth: String,
    /// The single-user command was found (after the prologue).
    pub command_found: Option<bool>,
    /// Available memory in bytes.
    pub mem_available: Option<u64>,
    /// Cores.
    pub cpus: Option<u32>,
    /// One-minute load.
    pub load1: Option<f64>,
    /// Servers of all users on the host.
    pub servers: Option<usize>,
    /// How `mem_limit` / `cpu_limit` are enforced there: `systemd`,
    /// `prlimit` or `none` (see [`limits::host_summary`]).
    pub limits: Option<String>,
    /// What the admin should do so that systemd enforces the limits there.
    pub limits_advice: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// When the host does not answer: since when and why, as spawns see it
    /// (`down since 09:01:02 UTC (12 s ago): no answer within 10s`).
    pub down: Option<String>,
    /// The configuration drains the host (`drain = true`): no new servers.
    pub draining: bool,
}

impl HostCheck {
    /// Everything an admin needs is in order.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.command_found != Some(false)
    }
}

impl Spawner {
    /// Check every host as `username`: reachable, host key, auth, command
    /// found, free memory, load, servers. Hosts are checked at once.
    pub async fn check(&self, username: &str) -> Result<Vec<HostCheck>> {
        let targets = self.all_targets(username)?;
        let command = self.config.command.first().cloned().unwrap_or_default();
        let command = quote::quote(&command, "command")?;
        let results = futures_join(self.config.hosts.iter().zip(&targets).map(|(h, t)| {
            let command = command.clone();
            async move {
                let mut prologue = self.config.prologue.clone();
                prologue.extend(h.prologue.iter().cloned());
                self.host_facts(t, Some((&prologue, &command))).await
            }
        }))
        .await;
        Ok(self
            .config
            .hosts
            .iter()
            .zip(targets)
            .zip(results)
            .map(|((h, t), r)| {
                let mut c = HostCheck {
                    host: h.display_name().to_string(),
                    address: t.host_label(),
                    reachable: true,
                    host_key: "ok".into(),
                    auth: "ok".into(),
                    command_found: None,
                    mem_available: None,
                    cpus: None,
                    load1: None,
                    servers: None,
                    limits: None,
                    limits_advice: None,
                    error: None,
                    down: None,
                    draining: h.drain,
                };
                c.down = self.host_down(&t);
                match r {
                    Ok(f) => {
                        match limits::host_summary(self.config.enforcement, &f, &t.user) {
                            Ok((how, advice)) => (c.limits, c.limits_advice) = (Some(how), advice),
                            Err(e) => {
                                c.limits = Some("-".into());
                                c.error = Some(format!("host {}: {e}", f.hostname));
                            }
                        }
                        c.command_found = f.command_found;
                        c.mem_available = Some(f.mem_available);
                        c.cpus = Some(f.cpus);
                        c.load1 = Some(f.load1);
                        c.servers = Some(f.servers);
                    }
                    Err(e) => {
                        match &e {
                            Error::Unreachable { .. } | Error::Timeout { .. } => {
                                c.reachable = false;
                                c.host_key = "-".into();
                                c.auth = "-".into();
                            }
                            Error::HostKeyUnknown { .. } => {
                                (c.host_key, c.auth) = ("unknown".into(), "-".into())
                            }
                            Error::HostKeyChanged { .. } => {
                                (c.host_key, c.auth) = ("changed".into(), "-".into())
                            }
                            Error::HostKeyRevoked { .. } => {
                                (c.host_key, c.auth) = ("revoked".into(), "-".into())
                            }
                            Error::AuthRefused { .. } | Error::Key { .. } | Error::Agent { .. } => {
                                c.auth = "refused".into()
                            }
                            _ => {}
                        }
                        c.error = Some(e.to_string());
                    }
                }
                c
            })
            .collect())
    }

    /// Servers running on each host (all users), looked up as `username`.
    pub async fn list(&self, username: &str) -> Result<Vec<(String, Result<Vec<hosts::Listed>>)>> {
        let targets = self.all_targets(username)?;
        let results = futures_join(targets.iter().map(|t| async move {
            let out = self
                .pool
                .exec(t, &self.command(hosts::list_script()))
                .await?
                .check(t)?;
            Ok(hosts::parse_list(&String::from_utf8_lossy(&out.stdout)))
        }))
        .await;
        Ok(self
            .config
            .hosts
            .iter()
            .map(|h| h.display_name().to_string())
            .zip(results)
            .collect())
    }
}
