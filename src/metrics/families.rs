//! The core's counts as Prometheus metric families (docs/metrics.md), in
//! the plain shape `python/ssh_spawner/metrics.py` hands to
//! `prometheus_client` at each scrape (through `_core.metric_families`): (kind, name, help, label names,
//! samples), each sample (label values, histogram buckets, value). A
//! histogram's buckets are cumulative `(upper bound, count)` ending with
//! `+Inf`, and its value is the sum; other kinds have no buckets.

use std::collections::{BTreeMap, BTreeSet};

use super::{Histogram, Snapshot};

/// One sample: label values, cumulative buckets (histograms only), value
/// (a histogram's sum).
pub type Sample = (Vec<String>, Vec<(String, f64)>, f64);
/// One family: kind (`counter`, `gauge`, `histogram`), name, help, label
/// names, samples.
pub type Family = (
    &'static str,
    &'static str,
    &'static str,
    Vec<&'static str>,
    Vec<Sample>,
);

fn buckets(h: &Histogram) -> Vec<(String, f64)> {
    let mut total = 0;
    let mut out: Vec<(String, f64)> = h
        .bounds
        .iter()
        .zip(&h.counts)
        .map(|(bound, count)| {
            total += count;
            // As Python writes a float: 1.0, 0.25.
            (format!("{bound:?}"), total as f64)
        })
        .collect();
    out.push(("+Inf".into(), h.count as f64));
    out
}

fn plain(values: &[&str], value: f64) -> Sample {
    (
        values.iter().map(|v| v.to_string()).collect(),
        Vec::new(),
        value,
    )
}

/// Every family, from a snapshot and `pool`: (host, connections, sessions)
/// of every connection pool of the process.
pub fn families(snap: &Snapshot, pool: &[(String, usize, usize)]) -> Vec<Family> {
    let names = &snap.host_names;
    let host = |label: &str| names.get(label).cloned().unwrap_or_else(|| label.into());
    let configured: BTreeSet<String> = names.values().cloned().collect();
    let mut out: Vec<Family> = Vec::new();

    out.push((
        "histogram",
        "ssh_spawner_spawn_duration_seconds",
        "Seconds from the start of a spawn attempt until the server process was started on the host (outcome ok) or the attempt failed (outcome is the error kind)",
        vec!["host", "outcome"],
        snap.spawn_duration
            .iter()
            .map(|(h, outcome, hist)| (vec![h.clone(), outcome.clone()], buckets(hist), hist.sum))
            .collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_ssh_connect_attempts",
        "SSH connections attempted (TCP, key exchange, host key check, authentication)",
        vec!["host"],
        snap.ssh_connect_attempts
            .iter()
            .map(|(label, n)| plain(&[&host(label)], *n as f64))
            .collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_ssh_connect_failures",
        "SSH connection attempts that failed, by error kind",
        vec!["host", "kind"],
        snap.ssh_connect_failures
            .iter()
            .map(|(label, kind, n)| plain(&[&host(label), kind], *n as f64))
            .collect(),
    ));

    // Every configured host is listed, at 0 when it has nothing.
    let mut totals: BTreeMap<String, (usize, usize)> =
        configured.iter().map(|n| (n.clone(), (0, 0))).collect();
    for (h, c, s) in pool {
        let row = totals.entry(host(h)).or_default();
        row.0 += c;
        row.1 += s;
    }
    out.push((
        "gauge",
        "ssh_spawner_ssh_connections",
        "Pooled SSH connections held open",
        vec!["host"],
        totals
            .iter()
            .map(|(h, (c, _))| plain(&[h], *c as f64))
            .collect(),
    ));
    out.push((
        "gauge",
        "ssh_spawner_ssh_sessions_in_use",
        "SSH sessions (commands, uploads) in use on the pooled connections",
        vec!["host"],
        totals
            .iter()
            .map(|(h, (_, s))| plain(&[h], *s as f64))
            .collect(),
    ));

    out.push((
        "histogram",
        "ssh_spawner_poll_round_duration_seconds",
        "Seconds one poll round took: one command answering every poll waiting for that host and user",
        vec!["host"],
        snap.poll_round_duration
            .iter()
            .map(|(label, hist)| (vec![host(label)], buckets(hist), hist.sum))
            .collect(),
    ));

    let mut running: BTreeMap<String, u64> = configured.iter().map(|n| (n.clone(), 0)).collect();
    running.extend(snap.servers_running.iter().cloned());
    out.push((
        "gauge",
        "ssh_spawner_servers_running",
        "Servers this hub process knows running (launched, or found running by a poll)",
        vec!["host"],
        running
            .iter()
            .map(|(h, n)| plain(&[h], *n as f64))
            .collect(),
    ));

    // Hosts that do not answer: every spawn skips them until a background
    // probe gets an answer (docs/reliability.md, "A host that does not answer").
    let down: BTreeMap<String, f64> = snap.hosts_down.iter().map(|(l, t)| (host(l), *t)).collect();
    let held: BTreeMap<String, f64> = snap.hosts_held.iter().map(|(l, t)| (host(l), *t)).collect();
    let all: BTreeSet<&String> = configured
        .iter()
        .chain(down.keys())
        .chain(held.keys())
        .collect();
    out.push((
        "gauge",
        "ssh_spawner_host_up",
        "1 when new servers may go to the host; 0 while it is marked down (a connection to it could not be made) or held down after flapping",
        vec!["host"],
        all.iter()
            .map(|h| {
                let up = !down.contains_key(*h) && !held.contains_key(*h);
                plain(&[h], if up { 1.0 } else { 0.0 })
            })
            .collect(),
    ));
    out.push((
        "gauge",
        "ssh_spawner_host_draining",
        "1 when the configuration drains the host (drain = true): no new servers go there, the ones there are polled and stopped as usual",
        vec!["host"],
        configured
            .iter()
            .map(|h| plain(&[h], if snap.hosts_draining.contains(h) { 1.0 } else { 0.0 }))
            .collect(),
    ));
    out.push((
        "gauge",
        "ssh_spawner_host_down_since_seconds",
        "Unix time at which a host marked down stopped answering (only hosts down now)",
        vec!["host"],
        down.iter().map(|(h, t)| plain(&[h], *t)).collect(),
    ));
    out.push((
        "gauge",
        "ssh_spawner_host_held_until_seconds",
        "Unix time until which a host that flapped answers but takes no new servers",
        vec!["host"],
        held.iter().map(|(h, t)| plain(&[h], *t)).collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_host_probes",
        "Background probes of hosts marked down (a TCP connection and sshd's greeting, one at a time per host), by outcome: answered or no_answer",
        vec!["host", "outcome"],
        snap.host_probes
            .iter()
            .map(|(label, outcome, n)| plain(&[&host(label), outcome], *n as f64))
            .collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_stops_escalated",
        "Stops that sent SIGKILL because the server outlived SIGTERM by stop_grace",
        vec!["host"],
        snap.stops_escalated
            .iter()
            .map(|(h, n)| plain(&[h], *n as f64))
            .collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_journal_swept",
        "Journal entries of starts in flight handled after a hub restart: stopped (orphan stopped), forgotten (its server is in the database), failed (host not answering; kept for the next restart)",
        vec!["outcome"],
        snap.journal_swept
            .iter()
            .map(|(outcome, n)| plain(&[outcome], *n as f64))
            .collect(),
    ));
    out.push((
        "counter",
        "ssh_spawner_states_refused",
        "Saved server states the spawner would not act on (a newer version's, or naming a host, login or directory outside what the configuration and its history allow): each is reported running, nothing is done to it, and the hub log says what to do. Alert on any increase",
        vec![],
        vec![plain(&[], snap.states_refused as f64)],
    ));
    // A host's GPUs (hosts whose nvidia-smi answered at the latest facts
    // read only): how many, held by this hub's servers, busy with others.
    type Pick = fn(&super::GpuCounts) -> u64;
    for (name, help, pick) in [
        (
            "ssh_spawner_host_gpus",
            "GPUs nvidia-smi listed on the host at the latest facts read (hosts whose nvidia-smi answered)",
            (|c| c.total) as Pick,
        ),
        (
            "ssh_spawner_host_gpus_held",
            "GPUs of the host this hub's servers hold (claimed when given, released at stop or when the server is found gone)",
            |c| c.held,
        ),
        (
            "ssh_spawner_host_gpus_busy",
            "GPUs of the host not held by this hub's servers that a process uses more than gpu_busy_memory_mib of, at the latest facts read: busy with others, never given",
            |c| c.busy,
        ),
    ] {
        out.push((
            "gauge",
            name,
            help,
            vec!["host"],
            snap.gpus
                .iter()
                .map(|(h, c)| plain(&[h], pick(c) as f64))
                .collect(),
        ));
    }
    out.push((
        "counter",
        "ssh_spawner_hub_tunnel_port_taken",
        "Hub tunnel ports asked for again (after a dropped connection or a hub restart) that sshd refused: taken on the host's loopback, presumably by another user of the host",
        vec!["host"],
        snap.hub_tunnel_port_taken
            .iter()
            .map(|(label, n)| plain(&[&host(label)], *n as f64))
            .collect(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_hosts_are_listed_at_zero_and_buckets_are_cumulative() {
        let mut snap = Snapshot::default();
        snap.host_names.insert("10.0.0.1:22".into(), "node1".into());
        snap.hosts_down.push(("10.0.0.1:22".into(), 5.0));
        snap.poll_round_duration.push((
            "10.0.0.1:22".into(),
            Histogram {
                bounds: vec![0.5, 1.0],
                counts: vec![1, 2, 3],
                sum: 9.0,
                count: 6,
            },
        ));
        let fams = families(&snap, &[("node1".into(), 2, 1)]);
        let get = |name: &str| fams.iter().find(|f| f.1 == name).unwrap().4.clone();
        assert_eq!(
            get("ssh_spawner_servers_running"),
            [(vec!["node1".to_string()], vec![], 0.0)]
        );
        assert_eq!(get("ssh_spawner_ssh_connections")[0].2, 2.0);
        assert_eq!(get("ssh_spawner_host_up")[0].2, 0.0);
        assert_eq!(get("ssh_spawner_host_draining")[0].2, 0.0);
        snap.host_names.insert("10.0.0.2:22".into(), "node2".into());
        snap.hosts_draining.insert("node2".into());
        let fams = families(&snap, &[]);
        let draining = &fams
            .iter()
            .find(|f| f.1 == "ssh_spawner_host_draining")
            .unwrap()
            .4;
        assert_eq!(
            draining,
            &[
                (vec!["node1".to_string()], vec![], 0.0),
                (vec!["node2".to_string()], vec![], 1.0)
            ]
        );
        let polls = get("ssh_spawner_poll_round_duration_seconds");
        assert_eq!(polls[0].0, ["node1"]);
        assert_eq!(
            polls[0].1,
            [
                ("0.5".into(), 1.0),
                ("1.0".into(), 3.0),
                ("+Inf".into(), 6.0)
            ]
        );
        assert_eq!(polls[0].2, 9.0);
        // GPUs: a gauge each, by host.
        snap.gpus.push((
            "node1".into(),
            super::super::GpuCounts {
                total: 4,
                held: 1,
                busy: 2,
            },
        ));
        let fams = families(&snap, &[]);
        for (name, v) in [
            ("ssh_spawner_host_gpus", 4.0),
            ("ssh_spawner_host_gpus_held", 1.0),
            ("ssh_spawner_host_gpus_busy", 2.0),
        ] {
            let f = fams.iter().find(|f| f.1 == name).unwrap();
            assert_eq!(
                (f.0, &f.4),
                ("gauge", &vec![(vec!["node1".to_string()], vec![], v)])
            );
        }
    }
}
