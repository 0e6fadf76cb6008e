//! What the testbed hosts really printed (`fixtures/facts`, `fixtures/ps`,
//! `fixtures/proc`, `fixtures/ss`), read by the parsers of `plan::hosts`,
//! `plan::ports` and the decisions built on them (`plan::limits`, host
//! choice). No testbed needed: the output was captured once (see each
//! directory's README.md).

use std::collections::BTreeSet;

use ssh_spawner::plan::hosts::{
    facts_script, list_script, parse_facts, parse_list, rank, Candidate, HostFacts, Listed,
    Requirements, Strategy,
};
use ssh_spawner::plan::limits::{decide, host_summary, EnforcementMode, LimitPlan, Limits};
use ssh_spawner::plan::ports::listening_ports;
use ssh_spawner::plan::run::RUN_MARKER;

fn fixture(path: &str) -> String {
    let p = format!("{}/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn facts(path: &str) -> HostFacts {
    parse_facts(&fixture(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The TCP ports in the `sport`/local column of `ss -Hltne` output.
fn ss_ports(text: &str) -> BTreeSet<u16> {
    text.lines()
        .map(|l| {
            let local = l.split_whitespace().nth(3).unwrap();
            local.rsplit_once(':').unwrap().1.parse().unwrap()
        })
        .collect()
}

const NODE1_BOOT: &str = "d49ccf43-46a3-4eb0-8ae3-8cb2b515151a";

#[test]
fn the_facts_script_is_the_one_that_printed_the_fixtures() {
    // fixtures/facts/README.md: the script ran was facts_script(None) of
    // this tree; its lines are what the parser below is fed.
    let script = facts_script(None);
    // (Captured at cff859e, when the script was Rust text; since then it is
    // src/plan/sh/facts.sh with its values in a preamble: the lines that
    // print what the fixtures hold are the same, but for `servers=`, which
    // counted with `pgrep -fc` then and counts wrappers' argv exactly since
    // issue 24; the line it prints is read the same way.)
    for line in [
        "run_pattern='ssh-spawner-ru[n]:'",
        "run_marker='ssh-spawner-run:'",
        "  for q in $(pgrep -f \"$run_pattern\" 2>/dev/null); do",
        "printf 'servers=%s\\n' \"$((${servers:-0}))\"",
        "if command -v systemd-run >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then",
        "tcp_mark='--- proc-net-tcp'",
        "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null",
    ] {
        assert!(script.contains(line), "facts script lost {line:?}");
    }
    assert_eq!(
        list_script(),
        "ps -eo pgid=,user:32=,etime=,args= | grep -e 'ssh-spawner-ru[n]:' || true\n"
    );
}

#[test]
fn facts_of_a_host_running_a_hundred_servers() {
    let f = facts("facts/node1-100-servers.txt");
    assert_eq!(f.hostname, "node1");
    assert_eq!(f.home, "/home/tb-alice");
    assert_eq!(f.uid, 1001);
    assert_eq!(f.mem_total, 24_683_664 * 1024);
    assert_eq!(f.mem_available, 17_651_012 * 1024);
    assert_eq!(f.cpus, 2);
    assert_eq!(f.load1, 63.60);
    assert_eq!(f.free_cores(), 0.0);
    assert_eq!(f.boot_id, NODE1_BOOT);
    assert_eq!(f.servers, 100);
    assert!(!f.systemd_user);
    assert!(f.prlimit);
    assert_eq!(f.default_signal, Some(true));
    assert_eq!(f.command_found, None);
    // sshd and 51 single-user servers listened (tcp6 was empty).
    assert_eq!(f.listening.len(), 52);
    assert_eq!(f.listening.first(), Some(&22));
    assert_eq!(f.listening.last(), Some(&29160));
    for port in [20189, 20304, 20423, 21497, 28418, 28720] {
        assert!(f.listening.contains(&port), "{port}");
    }
    // A port in TIME_WAIT (06) and the far end of connections are not listening.
    assert!(!f.listening.contains(&28422));
}

#[test]
fn facts_of_the_same_host_forty_seconds_earlier_and_of_a_systemd_host() {
    let f = facts("facts/node1-60-servers.txt");
    assert_eq!(
        (
            f.servers,
            f.mem_available,
            f.load1,
            f.listening.len(),
            f.boot_id.as_str()
        ),
        (60, 19_538_720 * 1024, 56.17, 25, NODE1_BOOT)
    );
    assert!(f.listening.contains(&22) && f.listening.contains(&20332));

    let g = facts("facts/node4-systemd.txt");
    assert_eq!(g.hostname, "node4");
    assert_eq!(g.boot_id, "a8702d92-0012-43fd-9189-5cf17ce408b1");
    assert_eq!((g.uid, g.cpus, g.servers), (1001, 2, 0));
    assert_eq!(g.mem_available, 18_330_792 * 1024);
    assert_eq!(g.load1, 72.56);
    assert!(g.systemd_user && g.prlimit);
    assert_eq!(g.default_signal, Some(true));
    assert_eq!(g.listening.iter().copied().collect::<Vec<_>>(), vec![22]);
}

#[test]
fn proc_net_tcp_of_a_host_and_of_the_hub_machine() {
    let node1 = format!(
        "{}{}",
        fixture("proc/net-tcp-node1.txt"),
        fixture("proc/net-tcp6-node1.txt")
    );
    let ports = listening_ports(&node1);
    // The same table as in the facts (the facts script printed it).
    assert_eq!(ports, facts("facts/node1-100-servers.txt").listening);
    assert_eq!(ports.len(), 52);
    // `ss -Hltne` a few seconds earlier saw 45 of them (the rest were still
    // starting): every one is in the table.
    let ss = ss_ports(&fixture("ss/all-node1-busy.txt"));
    assert_eq!(ss.len(), 45);
    assert!(ss.is_subset(&ports), "{:?}", ss.difference(&ports));
    // Only LISTEN (0A) rows count: 29 established and 45 TIME_WAIT rows do not.
    assert_eq!(node1.lines().filter(|l| l.contains(" 0A ")).count(), 52);

    let hub = format!(
        "{}{}",
        fixture("proc/net-tcp-hub.txt"),
        fixture("proc/net-tcp6-hub.txt")
    );
    let hub_ports = listening_ports(&hub);
    assert_eq!(
        hub_ports.iter().copied().collect::<Vec<_>>(),
        vec![2024, 42579, 46159, 52531, 60399]
    );
    assert_eq!(hub_ports, ss_ports(&fixture("ss/all-hub.txt")));
    // A header alone (an empty tcp6) lists nothing.
    assert!(listening_ports(&fixture("proc/net-tcp6-hub.txt")).is_empty());
}

#[test]
fn servers_listed_by_ps_on_a_busy_host() {
    let text = fixture("ps/list-node1-100-servers.txt");
    let l = parse_list(&text);
    assert_eq!(l.len(), 100);
    assert_eq!(
        l[0],
        Listed {
            pgid: 6665,
            user: "tb-alice".into(),
            elapsed: "00:38".into(),
            run_id: "d2e72f33eb583131".into(),
        }
    );
    assert_eq!(
        l[99],
        Listed {
            pgid: 7157,
            user: "tb-alice".into(),
            elapsed: "00:23".into(),
            run_id: "1edcdf2197e0361c".into(),
        }
    );
    assert_eq!(l.iter().filter(|s| s.user == "tb-alice").count(), 50);
    assert_eq!(l.iter().filter(|s| s.user == "tb.bob-2").count(), 50);
    let ids: BTreeSet<&str> = l.iter().map(|s| s.run_id.as_str()).collect();
    assert_eq!(ids.len(), 100);
    assert!(l.iter().all(|s| s.run_id.len() == 16));
    // Every line carries the marker the parser looks for.
    assert_eq!(text.matches(RUN_MARKER).count(), 100);

    let earlier = parse_list(&fixture("ps/list-node1-58-servers.txt"));
    assert_eq!(earlier.len(), 58);
    assert_eq!(
        (
            earlier[0].pgid,
            earlier[0].user.as_str(),
            earlier[0].elapsed.as_str(),
            earlier[0].run_id.as_str()
        ),
        (3907, "tb.bob-2", "00:44", "c9202891393a6ab2")
    );
    assert_eq!(earlier.iter().filter(|s| s.user == "tb-alice").count(), 9);
}

#[test]
fn limits_follow_what_the_hosts_reported() {
    let node1 = facts("facts/node1-100-servers.txt");
    let node4 = facts("facts/node4-systemd.txt");
    let limits = Limits {
        mem: Some(2 << 30),
        cpu: Some(1.0),
    };
    let (plan, why) = decide(EnforcementMode::Auto, &node4, &limits, "r1", "tb-alice").unwrap();
    assert_eq!(
        plan,
        LimitPlan::Systemd {
            unit: "jupyterhub-ssh-r1".into(),
            mem_max: Some(2 << 30),
            cpu_quota_percent: Some(100),
        }
    );
    assert_eq!(why, "memory 2G and CPU 1 enforced by a systemd scope");
    let (plan, why) = decide(EnforcementMode::Auto, &node1, &limits, "r1", "tb-alice").unwrap();
    assert_eq!(
        plan,
        LimitPlan::Prlimit {
            address_space: Some(2 << 30)
        }
    );
    assert!(why.contains("loginctl enable-linger tb-alice"), "{why}");
    let err = decide(EnforcementMode::Systemd, &node1, &limits, "r1", "tb-alice")
        .unwrap_err()
        .to_string();
    assert!(err.contains("host node1"), "{err}");
    assert_eq!(
        host_summary(EnforcementMode::Auto, &node4, "tb-alice").unwrap(),
        ("systemd".to_string(), None)
    );
    assert_eq!(
        host_summary(EnforcementMode::Auto, &node1, "tb-alice")
            .unwrap()
            .0,
        "prlimit"
    );
}

#[test]
fn host_choice_from_the_reported_facts() {
    let busy = facts("facts/node1-100-servers.txt");
    let calmer = facts("facts/node1-60-servers.txt");
    let idle = facts("facts/node4-systemd.txt");
    let cands = [
        Candidate {
            name: "node1",
            max_servers: Some(100),
            draining: false,
            facts: Ok(&busy),
            held_gpus: Default::default(),
            gpu_busy_memory_mib: 100,
        },
        Candidate {
            name: "node1-earlier",
            max_servers: None,
            draining: false,
            facts: Ok(&calmer),
            held_gpus: Default::default(),
            gpu_busy_memory_mib: 100,
        },
        Candidate {
            name: "node4",
            max_servers: None,
            draining: false,
            facts: Ok(&idle),
            held_gpus: Default::default(),
            gpu_busy_memory_mib: 100,
        },
    ];
    let order = rank(
        &cands,
        &Requirements::default(),
        Strategy::LeastLoaded,
        0,
        &mut rand::rng(),
    )
    .unwrap();
    // node1 is full; fewest servers first.
    assert_eq!(order, vec![2, 1]);
    let need = Requirements {
        mem_guarantee: Some(20 << 30),
        cpu_guarantee: None,
        gpus: 0,
    };
    let err = rank(&cands, &need, Strategy::Random, 0, &mut rand::rng()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no host has 20G free: node1: full (100/100 servers), node1-earlier: 19G free, node4: 17G free"
    );
}
