//! Which server holds which GPU of a host, as `ssh-spawner list` shows it.
//!
//! A launch writes a server's GPU UUIDs to `gpus` in its run directory
//! (0600, one a line). [`run_gpus_script`] prints those files back, as
//! `gpu RUN_ID UUID` lines; [`parse_run_gpus`] reads them (untrusted text:
//! bounded, UUID-shaped lines only, anything else skipped with its
//! reason). Because the host keeps the record, `list` shows the holders
//! without the hub, after a hub restart, and for servers of another hub
//! process. Run directories are 0700: a login reads its own servers' files
//! only, so another login's servers show their GPUs as unknown (`?`);
//! their GPUs still show as busy once a process uses them.
//!
//! [`host_list`] puts a host's servers, their GPUs and its `nvidia-smi`
//! facts together; [`HostList::rows`] and [`HostList::gpu_line`] are what
//! the CLI prints.

use std::collections::BTreeMap;

use super::gpus::{self, GpuFacts, GpuUse, Skipped};
use super::hosts::Listed;
use super::run::is_run_id;
use super::sh::{self, Preamble};
use super::state::state_rel;

/// Run directories whose `gpus` the script prints, at most.
pub const MAX_RUNS: usize = 512;
/// GPUs one run may name; more lines are skipped.
pub const MAX_GPUS_PER_RUN: usize = 16;
/// How much of a skipped line its reason quotes.
const MAX_QUOTED: usize = 80;

/// The script printing the `gpus` files of the login's run directories
/// under `state_dir` (`~/NAME`).
pub fn run_gpus_script(state_dir: &str) -> crate::error::Result<String> {
    let mut p = Preamble::new();
    p.value("state", state_rel(state_dir), "state_dir")?;
    p.number("max_runs", MAX_RUNS);
    Ok(p.script(&[sh::RUN_GPUS]))
}

/// What [`run_gpus_script`] printed: each run's GPU UUIDs, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunGpus {
    /// Run id → the UUIDs its `gpus` file names.
    pub by_run: BTreeMap<String, Vec<String>>,
    /// Lines that were not a run's GPU, and why.
    pub skipped: Vec<Skipped>,
}

/// A UUID as a launch writes it: `GPU-…` or `MIG-…`, of the shape a
/// server's `CUDA_VISIBLE_DEVICES` may hold ([`gpus::valid_uuid`]).
fn uuid_shaped(s: &str) -> bool {
    (s.starts_with("GPU-") || s.starts_with("MIG-")) && s.len() > 4 && gpus::valid_uuid(s)
}

fn quoted(line: &str) -> String {
    crate::error::clipped(line, MAX_QUOTED)
}

/// Parse what [`run_gpus_script`] printed. Blank lines and lines of other
/// scripts' output are ignored only when they are not `gpu ` lines; a
/// `gpu ` line that does not name a valid run id and a UUID-shaped value,
/// a UUID a run names twice, and the lines past [`MAX_GPUS_PER_RUN`] of a
/// run or [`MAX_RUNS`] runs are skipped with their reason.
pub fn parse_run_gpus(stdout: &str) -> RunGpus {
    let mut out = RunGpus::default();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("gpu ") else {
            if !line.trim().is_empty() {
                out.skipped.push(Skipped {
                    line: quoted(line),
                    reason: "not a `gpu RUN UUID` line".into(),
                });
            }
            continue;
        };
        let mut skip = |reason: String| {
            out.skipped.push(Skipped {
                line: quoted(line),
                reason,
            })
        };
        let (run, uuid) = rest.split_once(' ').unwrap_or((rest, ""));
        let uuid = uuid.trim();
        if !is_run_id(run) {
            skip(format!("run id {:?} is not one", quoted(run)));
            continue;
        }
        if !uuid_shaped(uuid) {
            skip(format!("{:?} is not a GPU UUID", quoted(uuid)));
            continue;
        }
        if !out.by_run.contains_key(run) && out.by_run.len() >= MAX_RUNS {
            skip(format!("more than {MAX_RUNS} runs"));
            continue;
        }
        let held = out.by_run.entry(run.to_string()).or_default();
        if held.iter().any(|u| u == uuid) {
            skip(format!("{uuid} named twice"));
        } else if held.len() >= MAX_GPUS_PER_RUN {
            skip(format!("more than {MAX_GPUS_PER_RUN} GPUs for one run"));
        } else {
            held.push(uuid.to_string());
        }
    }
    out
}

/// One GPU a server holds: its index and model when the host's
/// `nvidia-smi` lists its UUID.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldGpu {
    /// The UUID the run directory names.
    pub uuid: String,
    /// Its index on the host, when `nvidia-smi` lists it.
    pub index: Option<u32>,
    /// Its model, when `nvidia-smi` lists it.
    pub name: Option<String>,
}

impl std::fmt::Display for HeldGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.index, &self.name) {
            (Some(i), Some(n)) => write!(f, "GPU {i} ({n})"),
            _ => write!(f, "{}", self.uuid),
        }
    }
}

/// One server `list` found on a host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Server {
    /// What `ps` said of it.
    #[serde(flatten)]
    pub listed: Listed,
    /// The GPUs its run directory names (empty: none); `None` when the
    /// directory is another login's, which this one cannot read.
    pub gpus: Option<Vec<HeldGpu>>,
}

/// One GPU of a host and who holds or uses it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuHolder {
    /// Index, as `nvidia-smi` numbers it.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Model.
    pub name: String,
    /// `user/run` of each listed server whose run directory names it.
    pub held_by: Vec<String>,
    /// Why a process not among the holders makes it busy (more than
    /// `gpu_busy_memory_mib`), when one does.
    pub busy: Option<String>,
}

/// A host as `list` shows it: its servers, and its GPUs with their holders.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostList {
    /// Display name.
    pub host: String,
    /// Every user's servers.
    pub servers: Vec<Server>,
    /// The host's GPUs, as its `nvidia-smi` lists them (empty without).
    pub gpus: Vec<GpuHolder>,
    /// `nvidia-smi` failed, or the facts could not be read: why.
    pub gpu_error: Option<String>,
    /// Lines of the run directories' `gpus` files that were skipped.
    pub skipped: Vec<Skipped>,
}

/// Put a host's listing together: `listed` (every user's servers), the
/// `gpus` files of `login`'s own runs, and the host's GPU facts (`Err`: why
/// they could not be read). A file of a run not listed (a stopped server's
/// kept directory) is not a holder.
pub fn host_list(
    host: &str,
    login: &str,
    listed: Vec<Listed>,
    run_gpus: RunGpus,
    facts: Result<&GpuFacts, String>,
    busy_memory_mib: u64,
) -> HostList {
    let known = match &facts {
        Ok(f) => f.gpus(),
        Err(_) => &[],
    };
    let servers: Vec<Server> = listed
        .into_iter()
        .map(|l| {
            let gpus = (l.user == login).then(|| {
                run_gpus
                    .by_run
                    .get(&l.run_id)
                    .into_iter()
                    .flatten()
                    .map(|uuid| {
                        let g = known.iter().find(|g| g.uuid == *uuid);
                        HeldGpu {
                            uuid: uuid.clone(),
                            index: g.map(|g| g.index),
                            name: g.map(|g| g.name.clone()),
                        }
                    })
                    .collect()
            });
            Server { listed: l, gpus }
        })
        .collect();
    let mut gpu_error = None;
    let mut holders = Vec::new();
    match facts {
        Err(e) => gpu_error = Some(e),
        Ok(GpuFacts::Failed { reason }) => gpu_error = Some(reason.clone()),
        Ok(GpuFacts::None) => {}
        Ok(GpuFacts::Ok(report)) => {
            // Busy as the hub would see it if it held nothing: a holder's
            // own process on its GPU is not "busy".
            let uses = gpus::gpu_uses(report, &Default::default(), busy_memory_mib);
            for (g, u) in uses {
                let held_by: Vec<String> = servers
                    .iter()
                    .filter(|s| {
                        s.gpus
                            .as_ref()
                            .is_some_and(|h| h.iter().any(|h| h.uuid == g.uuid))
                    })
                    .map(|s| format!("{}/{}", s.listed.user, s.listed.run_id))
                    .collect();
                let busy = match u {
                    GpuUse::Busy(why) if held_by.is_empty() => Some(why),
                    _ => None,
                };
                holders.push(GpuHolder {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    name: g.name.clone(),
                    held_by,
                    busy,
                });
            }
        }
    }
    HostList {
        host: host.to_string(),
        servers,
        gpus: holders,
        gpu_error,
        skipped: run_gpus.skipped,
    }
}

/// The header of [`HostList::rows`].
pub fn header() -> String {
    format!(
        "{:<10} {:>8} {:<16} {:>12} {:<16} GPUS",
        "HOST", "PGID", "USER", "UPTIME", "RUN"
    )
}

impl HostList {
    /// A row per server: host, pgid, user, uptime, run id, and its GPUs
    /// (`GPU 0 (NVIDIA A100-SXM4-40GB)`, the UUID when the host's
    /// `nvidia-smi` does not list it), `-` for none, `?` for another
    /// login's server.
    pub fn rows(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| {
                let gpus = match &s.gpus {
                    None => "?".to_string(),
                    Some(g) if g.is_empty() => "-".to_string(),
                    Some(g) => g
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                let l = &s.listed;
                format!(
                    "{:<10} {:>8} {:<16} {:>12} {:<16} {gpus}",
                    self.host, l.pgid, l.user, l.elapsed, l.run_id
                )
            })
            .collect()
    }

    /// The line under the table for a host with GPUs: `node1: GPU 0
    /// tb-alice/6f1c…; GPU 1 idle; GPU 2 busy: pid 31337 uses 20480 MiB`,
    /// or why its `nvidia-smi` failed; then each skipped line of a `gpus`
    /// file. `None` for a host without GPUs and nothing skipped.
    pub fn gpu_line(&self) -> Option<String> {
        let mut parts: Vec<String> = self
            .gpus
            .iter()
            .map(|g| match (&g.busy, g.held_by.is_empty()) {
                (_, false) => format!("GPU {} {}", g.index, g.held_by.join(", ")),
                (Some(why), true) => format!("GPU {} busy: {why}", g.index),
                (None, true) => format!("GPU {} idle", g.index),
            })
            .collect();
        if let Some(e) = &self.gpu_error {
            parts.push(format!("GPUs: {e}"));
        }
        parts.extend(
            self.skipped
                .iter()
                .map(|s| format!("skipped {:?}: {}", s.line, s.reason)),
        );
        (!parts.is_empty()).then(|| format!("{}: {}", self.host, parts.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::gpus::from_facts;

    const A100: &str = include_str!("../../fixtures/gpus/a100x4-one-busy/query-gpu.csv");
    const A100_APPS: &str =
        include_str!("../../fixtures/gpus/a100x4-one-busy/query-compute-apps.csv");
    const GPU0: &str = "GPU-4f8c2a1e-9b3d-4e6f-a2c1-7d5e8b9f0a12";
    const GPU1: &str = "GPU-91d7e3b5-0c4a-4b8e-b6f2-3e1a9c7d5b04";

    fn listed(user: &str, run: &str) -> Listed {
        Listed {
            pgid: 4242,
            user: user.into(),
            elapsed: "01:02".into(),
            run_id: run.into(),
        }
    }

    #[test]
    fn run_gpus_keeps_uuid_shaped_lines_and_says_why_it_skips_the_rest() {
        let long = "x".repeat(5000);
        let text = format!(
            "gpu r1 {GPU0}\n\
             gpu r1 {GPU1}\n\
             gpu r1 {GPU0}\n\
             \n\
             gpu r2 not-a-gpu\n\
             gpu R2/../x {GPU0}\n\
             gpu r3 GPU-$(rm -rf ~)\n\
             gpu r4\n\
             gpu r5 MIG-a1b2c3d4-0000-1111-2222-333344445555\n\
             gpu r6 {long}\n\
             stray text\n"
        );
        let r = parse_run_gpus(&text);
        assert_eq!(
            r.by_run,
            BTreeMap::from([
                ("r1".to_string(), vec![GPU0.to_string(), GPU1.to_string()]),
                (
                    "r5".to_string(),
                    vec!["MIG-a1b2c3d4-0000-1111-2222-333344445555".to_string()]
                ),
            ])
        );
        let reasons: Vec<&str> = r.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(reasons.len(), 7, "{reasons:?}");
        assert!(reasons[0].ends_with("named twice"), "{reasons:?}");
        assert_eq!(reasons[1], "\"not-a-gpu\" is not a GPU UUID");
        assert_eq!(reasons[2], "run id \"R2/../x\" is not one");
        assert_eq!(reasons[3], "\"GPU-$(rm -rf ~)\" is not a GPU UUID");
        assert_eq!(reasons[4], "\"\" is not a GPU UUID");
        assert_eq!(reasons[6], "not a `gpu RUN UUID` line");
        // What a host printed is quoted short, however long it was.
        assert!(r
            .skipped
            .iter()
            .all(|s| s.line.chars().count() <= MAX_QUOTED + 1));
        assert!(reasons[5].chars().count() < 120, "{}", reasons[5]);
    }

    /// The script run by the local `/bin/sh` over a home of files: each
    /// run's lines come back (a last line without its newline too), a file
    /// is read up to 2 KiB, and what is not a run's file is not printed.
    #[test]
    fn the_script_prints_each_runs_gpus_file_of_the_login() {
        let home = std::env::temp_dir().join(format!("holders-test-{}", std::process::id()));
        let state = home.join(".jh");
        for (run, text) in [
            ("r1", format!("{GPU0}\n{GPU1}\n")),
            ("r2", GPU1.to_string()),
            ("r3", format!("{}\n", "GPU-0".repeat(2000))),
        ] {
            std::fs::create_dir_all(state.join(run)).unwrap();
            std::fs::write(state.join(run).join("gpus"), text).unwrap();
        }
        std::fs::create_dir_all(state.join("r4")).unwrap();
        std::fs::write(state.join("r4/server.log"), "gpu r4 GPU-x\n").unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(run_gpus_script("~/.jh/").unwrap())
            .env("HOME", &home)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&home);
        assert!(out.status.success(), "{out:?}");
        let r = parse_run_gpus(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(r.by_run["r1"], [GPU0, GPU1]);
        assert_eq!(r.by_run["r2"], [GPU1]);
        assert_eq!(r.by_run.len(), 2, "{r:?}");
        // r3's one line, cut at 2 KiB, is no UUID.
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        assert!(r.skipped[0].line.starts_with("gpu r3 GPU-0GPU-0"));
    }

    #[test]
    fn run_gpus_is_bounded_per_run_and_in_runs() {
        let mut text = String::new();
        for i in 0..MAX_GPUS_PER_RUN + 3 {
            text.push_str(&format!("gpu big GPU-{i:08x}\n"));
        }
        for i in 0..MAX_RUNS + 5 {
            text.push_str(&format!("gpu r{i} {GPU0}\n"));
        }
        let r = parse_run_gpus(&text);
        assert_eq!(r.by_run["big"].len(), MAX_GPUS_PER_RUN);
        assert_eq!(r.by_run.len(), MAX_RUNS);
        assert_eq!(r.skipped.len(), 3 + 6, "{:?}", r.skipped.len());
    }

    #[test]
    fn list_names_each_holder_with_index_and_model_and_the_others_by_use() {
        let facts = from_facts(Some("ok"), A100, A100_APPS, &[]);
        let run_gpus = parse_run_gpus(&format!(
            "gpu aaa {GPU0}\ngpu old GPU-00000000-dead\ngpu bbb GPU-ffffffff-not-on-this-host\n"
        ));
        let h = host_list(
            "node1",
            "tb-alice",
            vec![
                listed("tb-alice", "aaa"),
                listed("tb-alice", "bbb"),
                listed("tb-alice", "ccc"),
                listed("tb.bob-2", "ddd"),
            ],
            run_gpus,
            Ok(&facts),
            gpus::DEFAULT_BUSY_MEMORY_MIB,
        );
        let rows = h.rows();
        assert_eq!(
            header(),
            "HOST           PGID USER                   UPTIME RUN              GPUS"
        );
        assert_eq!(
            rows[0],
            "node1          4242 tb-alice                01:02 aaa              GPU 0 (NVIDIA A100-SXM4-40GB)"
        );
        assert!(
            rows[1].ends_with(" GPU-ffffffff-not-on-this-host"),
            "{}",
            rows[1]
        );
        assert!(rows[2].ends_with(" -"), "{}", rows[2]);
        assert!(rows[3].ends_with(" ?"), "another login's: {}", rows[3]);
        assert_eq!(
            h.gpu_line().unwrap(),
            "node1: GPU 0 tb-alice/aaa; GPU 1 idle; GPU 2 busy: pid 31337 uses 20480 MiB; GPU 3 idle"
        );
        // A failing nvidia-smi: the servers' GPUs by UUID, and why.
        let failed = GpuFacts::Failed {
            reason: "nvidia-smi --query-gpu exited with status 9".into(),
        };
        let h = host_list(
            "node2",
            "tb-alice",
            vec![listed("tb-alice", "aaa")],
            parse_run_gpus(&format!("gpu aaa {GPU0}\n")),
            Ok(&failed),
            100,
        );
        assert!(h.rows()[0].ends_with(&format!(" {GPU0}")));
        assert_eq!(
            h.gpu_line().unwrap(),
            "node2: GPUs: nvidia-smi --query-gpu exited with status 9"
        );
        // No nvidia-smi, no files: no line.
        let h = host_list(
            "node3",
            "tb-alice",
            vec![listed("tb-alice", "aaa")],
            RunGpus::default(),
            Ok(&GpuFacts::None),
            100,
        );
        assert_eq!((h.rows()[0].ends_with(" -"), h.gpu_line()), (true, None));
    }
}
