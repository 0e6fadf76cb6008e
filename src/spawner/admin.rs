//! The admin commands' side: `ssh-spawner check` (every host as a user:
//! reachable, host key, auth, command, figures, down) and `list`.

use super::{futures_join, Spawner};
use crate::error::{Error, Result};
use crate::plan::gpus;
use crate::plan::holders;
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
    /// The host's GPUs: how many, which models, how many no process uses
    /// (more than `gpu_busy_memory_mib`); `None` when it has no
    /// `nvidia-smi` (or was not reached).
    pub gpus: Option<gpus::GpuSummary>,
    /// `nvidia-smi` is there but failed: which query, its status, what it
    /// said. The host's other figures are still shown.
    pub gpu_error: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// When the host does not answer: since when and why, as spawns see it
    /// (`down since 09:01:02 UTC (12 s ago): no answer within 10s`).
    pub down: Option<String>,
    /// The configuration drains the host (`drain = true`): no new servers.
    pub draining: bool,
}

impl HostCheck {
    /// The GPUS column: `3/4 free`, `none` (no `nvidia-smi`), `FAILED`, or
    /// `-` when the host was not read.
    pub fn gpu_column(&self) -> String {
        match (&self.gpus, &self.gpu_error, self.servers) {
            (Some(g), _, _) => format!("{}/{} free", g.free, g.count),
            (None, Some(_), _) => "FAILED".into(),
            (None, None, Some(_)) => "none".into(),
            (None, None, None) => "-".into(),
        }
    }

    /// The line under the table for a host with GPUs or a failing
    /// `nvidia-smi`: `node1: GPUs: 4 × NVIDIA A100-SXM4-40GB, 3 free; GPU 2
    /// busy: pid 31337 uses 20480 MiB`.
    pub fn gpu_line(&self) -> Option<String> {
        match (&self.gpus, &self.gpu_error) {
            (Some(g), _) => {
                let mut line = format!("{}: GPUs: {}, {} free", self.host, g.models_text(), g.free);
                for note in &g.notes {
                    line.push_str("; ");
                    line.push_str(note);
                }
                Some(line)
            }
            (None, Some(e)) => Some(format!("{}: GPUs: {e}", self.host)),
            (None, None) => None,
        }
    }

    /// Everything an admin needs is in order (a failing `nvidia-smi` is
    /// not: the host's GPUs cannot be given).
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.command_found != Some(false) && self.gpu_error.is_none()
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
                    gpus: None,
                    gpu_error: None,
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
                        // check knows no hub's servers: free is "no process
                        // uses it".
                        let held = Default::default();
                        let busy = self.config.gpu_busy_memory_mib;
                        match gpus::summary(&f.gpus, &held, busy) {
                            None => {}
                            Some(Ok(s)) => c.gpus = Some(s),
                            Some(Err(e)) => c.gpu_error = Some(e),
                        }
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

    /// Servers running on each host (all users), looked up as `username`,
    /// with the GPUs each of that login's servers holds (its run
    /// directory's `gpus`) and the host's GPUs with their holders. Three
    /// commands per host at once: the process list, the `gpus` files and
    /// the facts (whose failure only leaves the GPUs unnamed).
    pub async fn list(&self, username: &str) -> Result<Vec<(String, Result<holders::HostList>)>> {
        let targets = self.all_targets(username)?;
        let run_gpus = holders::run_gpus_script(&self.config.state_dir)?;
        let busy = self.config.gpu_busy_memory_mib;
        let results = futures_join(self.config.hosts.iter().zip(&targets).map(|(h, t)| {
            let run_gpus = run_gpus.clone();
            async move {
                let ps = async {
                    let out = self
                        .pool
                        .exec(t, &self.command(hosts::list_script()))
                        .await?
                        .check(t)?;
                    Ok::<_, Error>(hosts::parse_list(&String::from_utf8_lossy(&out.stdout)))
                };
                let files = async {
                    let out = self.run_script(t, run_gpus).await?.check(t)?;
                    Ok::<_, Error>(holders::parse_run_gpus(&String::from_utf8_lossy(
                        &out.stdout,
                    )))
                };
                let (listed, files, facts) = tokio::join!(ps, files, self.host_facts(t, None));
                let facts = facts
                    .map(|f| f.gpus)
                    .map_err(|e| format!("facts not read: {e}"));
                let files = files.unwrap_or_else(|e| holders::RunGpus {
                    skipped: vec![gpus::Skipped {
                        line: String::new(),
                        reason: format!("run directories not read: {e}"),
                    }],
                    ..Default::default()
                });
                Ok(holders::host_list(
                    h.display_name(),
                    &t.user,
                    listed?,
                    files,
                    facts.as_ref().map_err(Clone::clone),
                    busy,
                ))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(facts: &gpus::GpuFacts) -> HostCheck {
        let held = Default::default();
        let (g, e) = match gpus::summary(facts, &held, gpus::DEFAULT_BUSY_MEMORY_MIB) {
            None => (None, None),
            Some(Ok(s)) => (Some(s), None),
            Some(Err(e)) => (None, Some(e)),
        };
        HostCheck {
            host: "node1".into(),
            address: "198.18.0.11:22".into(),
            reachable: true,
            host_key: "ok".into(),
            auth: "ok".into(),
            command_found: Some(true),
            mem_available: Some(1 << 30),
            cpus: Some(2),
            load1: Some(0.1),
            servers: Some(0),
            limits: Some("prlimit".into()),
            limits_advice: None,
            gpus: g,
            gpu_error: e,
            error: None,
            down: None,
            draining: false,
        }
    }

    #[test]
    fn check_shows_gpus_per_host_and_a_failing_nvidia_smi_fails_it() {
        let facts = gpus::from_facts(
            Some("ok"),
            include_str!("../../fixtures/gpus/a100x4-one-busy/query-gpu.csv"),
            include_str!("../../fixtures/gpus/a100x4-one-busy/query-compute-apps.csv"),
            &[],
        );
        let r = row(&facts);
        assert_eq!(r.gpu_column(), "3/4 free");
        assert_eq!(
            r.gpu_line().unwrap(),
            "node1: GPUs: 4 × NVIDIA A100-SXM4-40GB, 3 free; GPU 2 busy: pid 31337 uses 20480 MiB"
        );
        assert!(r.ok());
        let r = row(&gpus::GpuFacts::None);
        assert_eq!((r.gpu_column().as_str(), r.gpu_line()), ("none", None));
        assert!(r.ok());
        let failed = gpus::from_facts(
            Some("failed query-gpu 9"),
            "",
            "",
            &[include_str!("../../fixtures/gpus/fails-driver/output.txt")],
        );
        let r = row(&failed);
        assert_eq!(r.gpu_column(), "FAILED");
        assert_eq!(
            r.gpu_line().unwrap(),
            "node1: GPUs: nvidia-smi --query-gpu exited with status 9: NVIDIA-SMI has failed \
             because it couldn't communicate with the NVIDIA driver. Make sure that the latest \
             NVIDIA driver is installed and running."
        );
        assert!(!r.ok(), "a host whose nvidia-smi fails is not in order");
    }
}
