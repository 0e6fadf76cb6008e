//! What the core counts for the hub's Prometheus metrics (docs/metrics.md).
//!
//! The core only counts, in one process-wide table; [`families`] turns a
//! [`Snapshot`] into metric families, which the Python side exports with
//! `prometheus_client` on the hub's own `/hub/metrics`. Counting never fails and never blocks on I/O: a poisoned
//! lock only loses a count.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;

pub mod families;

/// Upper bounds (seconds) of the spawn duration buckets.
pub const SPAWN_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];
/// Upper bounds (seconds) of the poll round buckets.
pub const POLL_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram: counts per bucket (not cumulative; the last is +Inf), sum, count.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Histogram {
    /// Upper bounds of the buckets (without +Inf).
    pub bounds: Vec<f64>,
    /// Observations per bucket, one more than `bounds` (the +Inf bucket).
    pub counts: Vec<u64>,
    /// Sum of the observations (seconds).
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// A saved state was refused: its server is reported running and nothing
/// is done to it (see `spawner::watch`).
pub fn state_refused() {
    with(|t| t.refused += 1);
}

/// Everything counted so far. Hosts are display names where the core knows
/// them (spawns, servers, stops); SSH-level figures are keyed by the host's
/// `address:port` and named by [`Snapshot::host_names`] where a spawner
/// configured that host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Spawn duration by (host, outcome): `ok` or an error kind.
    pub spawn_duration: Vec<(String, String, Histogram)>,
    /// SSH connection attempts by host.
    pub ssh_connect_attempts: Vec<(String, u64)>,
    /// Failed SSH connection attempts by (host, error kind).
    pub ssh_connect_failures: Vec<(String, String, u64)>,
    /// Duration of one poll round (one exec answering every poll waiting for
    /// that host and user) by host.
    pub poll_round_duration: Vec<(String, Histogram)>,
    /// Servers known running by host.
    pub servers_running: Vec<(String, u64)>,
    /// Stops that needed SIGKILL after the grace, by host.
    pub stops_escalated: Vec<(String, u64)>,
    /// `address:port` to display name, from every spawner's configuration.
    pub host_names: BTreeMap<String, String>,
    /// Hosts marked down (not answering), by host: since when (Unix seconds).
    pub hosts_down: Vec<(String, f64)>,
    /// Hosts held down after flapping, by host: until when (Unix seconds).
    pub hosts_held: Vec<(String, f64)>,
    /// Display names of the configured hosts that are draining.
    pub hosts_draining: BTreeSet<String>,
    /// Background probes of down hosts by (host, outcome: `answered` or
    /// `no_answer`).
    pub host_probes: Vec<(String, String, u64)>,
    /// Journal entries of starts in flight handled after a hub restart, by
    /// outcome: `stopped`, `forgotten`, `failed` (each listed from the start).
    pub journal_swept: Vec<(String, u64)>,
    /// Saved states refused (not acted on, reported running), each counted
    /// once per hub spawner.
    pub states_refused: u64,
    /// Hub tunnel ports asked for again by number and refused by sshd (taken
    /// on the host's loopback, presumably by another user), by host.
    pub hub_tunnel_port_taken: Vec<(String, u64)>,
    /// GPUs by host display name, of the hosts whose `nvidia-smi` answered
    /// at the latest facts read ([`gpu_counts`]).
    pub gpus: Vec<(String, GpuCounts)>,
}

/// A host's GPUs as the hub sees them: how many `nvidia-smi` lists, how
/// many of those this hub's servers hold, how many others use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GpuCounts {
    /// GPUs `nvidia-smi` listed at the latest facts read.
    pub total: u64,
    /// Of those, the ones this hub process's servers hold (its claims).
    pub held: u64,
    /// Of those not held, the ones a process uses more than
    /// `gpu_busy_memory_mib` of (busy with others: never given).
    pub busy: u64,
}

/// [`GpuCounts`] of a host from its latest facts (each GPU's UUID and
/// whether a process uses it above the busy amount) and the UUIDs this
/// hub's servers hold there. A held GPU is never counted busy (its
/// server's own process uses it); a held UUID the facts do not list is not
/// counted (a GPU the host no longer shows).
pub fn gpu_counts<'a>(
    gpus: &[(String, bool)],
    held: impl IntoIterator<Item = &'a String> + Clone,
) -> GpuCounts {
    let is_held = |u: &String| held.clone().into_iter().any(|h| h == u);
    let mut c = GpuCounts {
        total: gpus.len() as u64,
        ..GpuCounts::default()
    };
    for (uuid, used) in gpus {
        if is_held(uuid) {
            c.held += 1;
        } else if *used {
            c.busy += 1;
        }
    }
    c
}

#[derive(Default)]
struct Table {
    refused: u64,
    spawn: BTreeMap<(String, String), Histogram>,
    attempts: BTreeMap<String, u64>,
    failures: BTreeMap<(String, String), u64>,
    polls: BTreeMap<String, Histogram>,
    /// run id -> host display name.
    running: BTreeMap<String, String>,
    escalated: BTreeMap<String, u64>,
    names: BTreeMap<String, String>,
    down: BTreeMap<String, f64>,
    held: BTreeMap<String, f64>,
    probes: BTreeMap<(String, String), u64>,
    /// Display names of the hosts that take no new servers.
    draining: BTreeSet<String>,
    swept: BTreeMap<String, u64>,
    tunnel_taken: BTreeMap<String, u64>,
    /// host `address:port` -> (GPU UUID, used by a process above the busy
    /// amount), from the latest facts read of hosts whose `nvidia-smi` answered.
    gpu_facts: BTreeMap<String, Vec<(String, bool)>>,
    /// host display name -> GPU UUID -> run id holding it, over every
    /// spawner of the process.
    gpu_claims: BTreeMap<String, BTreeMap<String, String>>,
}

fn unix(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(Table::default()))
}

fn with(f: impl FnOnce(&mut Table)) {
    if let Ok(mut t) = table().lock() {
        f(&mut t);
    }
}

/// A host's `address:port` is shown as `name` (called for each configured host).
pub fn name_host(label: String, name: &str) {
    with(|t| {
        t.names.insert(label, name.to_string());
    });
}

/// Whether the host `name` (display name) is draining in a spawner's
/// configuration: it takes no new servers.
pub fn host_draining(name: &str, draining: bool) {
    with(|t| {
        if draining {
            t.draining.insert(name.to_string());
        } else {
            t.draining.remove(name);
        }
    });
}

/// A spawn attempt ended: `outcome` is `ok` or the error kind.
pub fn spawn_done(host: &str, outcome: &str, took: Duration) {
    with(|t| {
        t.spawn
            .entry((host.to_string(), outcome.to_string()))
            .or_insert_with(|| Histogram::new(SPAWN_BUCKETS))
            .observe(took.as_secs_f64());
    });
}

/// An SSH connection (TCP, key exchange, authentication) was attempted;
/// `failure` is the error kind when it failed.
pub fn ssh_connect(host_label: &str, failure: Option<&str>) {
    with(|t| {
        *t.attempts.entry(host_label.to_string()).or_default() += 1;
        if let Some(kind) = failure {
            *t.failures
                .entry((host_label.to_string(), kind.to_string()))
                .or_default() += 1;
        }
    });
}

/// One poll round against a host took this long.
pub fn poll_round(host_label: &str, took: Duration) {
    with(|t| {
        t.polls
            .entry(host_label.to_string())
            .or_insert_with(|| Histogram::new(POLL_BUCKETS))
            .observe(took.as_secs_f64());
    });
}

/// The server of this run is running on `host` (a launch, or a poll that
/// found it alive, e.g. after a hub restart).
pub fn server_running(run_id: &str, host: &str) {
    with(|t| {
        if t.running.get(run_id).map(String::as_str) != Some(host) {
            t.running.insert(run_id.to_string(), host.to_string());
        }
    });
}

/// The server of this run is gone (stopped, or found exited).
pub fn server_gone(run_id: &str) {
    with(|t| {
        t.running.remove(run_id);
    });
}

/// A stop on `host` needed SIGKILL.
pub fn stop_escalated(host: &str) {
    with(|t| {
        *t.escalated.entry(host.to_string()).or_default() += 1;
    });
}

/// The host `address:port` was marked down (`Some(since)`) or answers again
/// (`None`).
pub fn host_down(host_label: &str, since: Option<std::time::SystemTime>) {
    with(|t| match since {
        Some(at) => {
            t.down.insert(host_label.to_string(), unix(at));
        }
        None => {
            t.down.remove(host_label);
        }
    });
}

/// The host is held down after flapping until `Some(until)`, or no longer.
pub fn host_held(host_label: &str, until: Option<std::time::SystemTime>) {
    with(|t| match until {
        Some(at) => {
            t.held.insert(host_label.to_string(), unix(at));
        }
        None => {
            t.held.remove(host_label);
        }
    });
}

/// A background probe of a down host ended.
pub fn host_probe(host_label: &str, answered: bool) {
    let outcome = if answered { "answered" } else { "no_answer" };
    with(|t| {
        *t.probes
            .entry((host_label.to_string(), outcome.to_string()))
            .or_default() += 1;
    });
}

/// Journal entries a sweep handled: `outcome` is `stopped`, `forgotten` or `failed`.
pub fn journal_swept(outcome: &str, n: u64) {
    with(|t| *t.swept.entry(outcome.to_string()).or_default() += n);
}

/// sshd on the host `address:port` refused a hub tunnel port that was asked
/// for again by number (after a dropped connection or a hub restart).
pub fn hub_tunnel_port_taken(host_label: &str) {
    with(|t| *t.tunnel_taken.entry(host_label.to_string()).or_default() += 1);
}

/// The GPUs of the host `address:port` as a facts read found them: each
/// UUID and whether a process uses it above `gpu_busy_memory_mib`; `None`
/// when it has no `nvidia-smi` or it failed (the host is then not listed).
pub fn gpu_facts(host_label: &str, gpus: Option<Vec<(String, bool)>>) {
    with(|t| match gpus {
        Some(g) => {
            t.gpu_facts.insert(host_label.to_string(), g);
        }
        None => {
            t.gpu_facts.remove(host_label);
        }
    });
}

/// The server `run_id` holds `uuids` on `host` (display name).
pub fn gpus_claimed<'a>(host: &str, run_id: &str, uuids: impl IntoIterator<Item = &'a String>) {
    with(|t| {
        let held = t.gpu_claims.entry(host.to_string()).or_default();
        for u in uuids {
            held.insert(u.clone(), run_id.to_string());
        }
    });
}

/// The server `run_id` holds nothing on `host` any more.
pub fn gpus_released(host: &str, run_id: &str) {
    with(|t| {
        if let Some(held) = t.gpu_claims.get_mut(host) {
            held.retain(|_, r| r != run_id);
        }
    });
}

/// Everything counted so far.
pub fn snapshot() -> Snapshot {
    let Ok(t) = table().lock() else {
        return Snapshot::default();
    };
    let mut running: BTreeMap<String, u64> = BTreeMap::new();
    for host in t.running.values() {
        *running.entry(host.clone()).or_default() += 1;
    }
    Snapshot {
        states_refused: t.refused,
        spawn_duration: t
            .spawn
            .iter()
            .map(|((h, o), v)| (h.clone(), o.clone(), v.clone()))
            .collect(),
        ssh_connect_attempts: t.attempts.iter().map(|(h, n)| (h.clone(), *n)).collect(),
        ssh_connect_failures: t
            .failures
            .iter()
            .map(|((h, k), n)| (h.clone(), k.clone(), *n))
            .collect(),
        poll_round_duration: t
            .polls
            .iter()
            .map(|(h, v)| (h.clone(), v.clone()))
            .collect(),
        servers_running: running.into_iter().collect(),
        stops_escalated: t.escalated.iter().map(|(h, n)| (h.clone(), *n)).collect(),
        host_names: t.names.clone(),
        hosts_down: t.down.iter().map(|(h, s)| (h.clone(), *s)).collect(),
        hosts_held: t.held.iter().map(|(h, s)| (h.clone(), *s)).collect(),
        hosts_draining: t.draining.clone(),
        host_probes: t
            .probes
            .iter()
            .map(|((h, o), n)| (h.clone(), o.clone(), *n))
            .collect(),
        journal_swept: {
            let mut swept: BTreeMap<String, u64> = ["stopped", "forgotten", "failed"]
                .into_iter()
                .map(|o| (o.to_string(), 0))
                .collect();
            swept.extend(t.swept.iter().map(|(o, n)| (o.clone(), *n)));
            swept.into_iter().collect()
        },
        hub_tunnel_port_taken: t
            .tunnel_taken
            .iter()
            .map(|(h, n)| (h.clone(), *n))
            .collect(),
        gpus: t
            .gpu_facts
            .iter()
            .map(|(label, gpus)| {
                let name = t.names.get(label).cloned().unwrap_or_else(|| label.clone());
                let held = t.gpu_claims.get(&name).map(|h| h.keys());
                let counts = gpu_counts(gpus, held.into_iter().flatten());
                (name, counts)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_each_observation_once() {
        let mut h = Histogram::new(&[1.0, 5.0]);
        for s in [0.5, 1.0, 3.0, 7.0, 100.0] {
            h.observe(s);
        }
        assert_eq!(h.counts, vec![2, 1, 2]);
        assert_eq!(h.count, 5);
        assert!((h.sum - 111.5).abs() < 1e-9);
    }

    #[test]
    fn servers_running_counts_runs_by_host_and_forgets_stopped_ones() {
        server_running("metrics-test-a", "metrics-test-host");
        server_running("metrics-test-a", "metrics-test-host");
        server_running("metrics-test-b", "metrics-test-host");
        let n = |s: &Snapshot| {
            s.servers_running
                .iter()
                .find(|(h, _)| h == "metrics-test-host")
                .map(|(_, n)| *n)
        };
        assert_eq!(n(&snapshot()), Some(2));
        server_gone("metrics-test-a");
        assert_eq!(n(&snapshot()), Some(1));
        server_gone("metrics-test-b");
        assert_eq!(n(&snapshot()), None);
    }

    #[test]
    fn gpu_counts_count_held_then_busy_with_others() {
        let g = |u: &str, used: bool| (u.to_string(), used);
        let gpus = [
            g("GPU-a", false),
            g("GPU-b", true),
            g("GPU-c", true),
            g("GPU-d", false),
        ];
        let held = ["GPU-b".to_string(), "GPU-gone".to_string()];
        // b is held (its server's process uses it: not busy), c is busy with
        // another's process, a and d are free; GPU-gone is not on the host.
        assert_eq!(
            gpu_counts(&gpus, &held),
            GpuCounts {
                total: 4,
                held: 1,
                busy: 1
            }
        );
        assert_eq!(gpu_counts(&[], &held), GpuCounts::default());
    }

    #[test]
    fn gpu_gauges_follow_the_facts_and_the_claims_of_every_spawner() {
        let label = "metrics-gpu-test:22";
        name_host(label.into(), "metrics-gpu-host");
        let of = |s: &Snapshot| {
            s.gpus
                .iter()
                .find(|(h, _)| h == "metrics-gpu-host")
                .map(|(_, c)| *c)
        };
        let uuids: Vec<String> = ["GPU-1", "GPU-2", "GPU-3"].map(String::from).into();
        gpu_facts(
            label,
            Some(vec![
                (uuids[0].clone(), false),
                (uuids[1].clone(), true),
                (uuids[2].clone(), false),
            ]),
        );
        assert_eq!(
            of(&snapshot()).map(|c| (c.total, c.held, c.busy)),
            Some((3, 0, 1))
        );
        gpus_claimed("metrics-gpu-host", "run-a", &uuids[..1]);
        gpus_claimed("metrics-gpu-host", "run-b", &uuids[2..]);
        assert_eq!(
            of(&snapshot()).map(|c| (c.total, c.held, c.busy)),
            Some((3, 2, 1))
        );
        gpus_released("metrics-gpu-host", "run-a");
        assert_eq!(of(&snapshot()).map(|c| c.held), Some(1));
        gpus_released("metrics-gpu-host", "run-b");
        // nvidia-smi gone or failing: the host is not listed.
        gpu_facts(label, None);
        assert_eq!(of(&snapshot()), None);
    }

    #[test]
    fn connect_failures_are_counted_with_their_attempts() {
        ssh_connect("metrics-test:22", None);
        ssh_connect("metrics-test:22", Some("timeout"));
        let s = snapshot();
        assert!(s
            .ssh_connect_attempts
            .contains(&("metrics-test:22".into(), 2)));
        assert!(s
            .ssh_connect_failures
            .contains(&("metrics-test:22".into(), "timeout".into(), 1)));
    }
}
