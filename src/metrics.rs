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
