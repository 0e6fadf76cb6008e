//! Faults a lab actually sees, injected with the testbed's fault handles.
//! Each test owns one host, so they can run side by side.

mod common;

use std::time::{Duration, Instant};

use common::{testbed, Undo};
use ssh_spawner::ssh::{Command, Pool};
use ssh_spawner::Error;

#[tokio::test]
async fn sshd_restarted_under_a_pooled_connection_is_invisible_to_callers() {
    let Some(tb) = testbed("sshd_restarted_under_a_pooled_connection_is_invisible_to_callers")
    else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node1", &tb.alice().name);
    pool.exec(&target, &Command::new("true")).await.unwrap();
    assert_eq!(pool.stats().handshakes, 1);

    // sshd restarts: its sessions die, the pooled connection with them.
    tb.fault("sshd-restart", "node1");
    let out = pool.exec(&target, &Command::new("hostname")).await.unwrap();
    assert_eq!(out.stdout, b"node1\n");
    assert_eq!(pool.stats().handshakes, 2);

    // sshd down: a prompt, clear error, not a hang; back up: works again.
    let _undo = Undo {
        testbed: &tb,
        action: "sshd-start",
        host: "node1".into(),
    };
    tb.fault("sshd-stop", "node1");
    let started = Instant::now();
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains(&tb.hosts[0].address), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    tb.fault("sshd-start", "node1");
    pool.exec(&target, &Command::new("true")).await.unwrap();
}

#[tokio::test]
async fn a_cut_link_gives_a_timeout_within_the_bound() {
    let Some(tb) = testbed("a_cut_link_gives_a_timeout_within_the_bound") else {
        return;
    };
    let mut opts = tb.pool_options();
    opts.connect.connect_timeout = Duration::from_secs(2);
    let pool = Pool::new(opts.clone());
    let target = tb.target("node2", &tb.bob().name);
    pool.exec(&target, &Command::new("true")).await.unwrap();

    let undo = Undo {
        testbed: &tb,
        action: "heal",
        host: "node2".into(),
    };
    tb.fault("cut", "node2");

    // On the pooled (now blackholed) connection: the command's own bound.
    let started = Instant::now();
    let err = pool
        .exec(
            &target,
            &Command::new("true").timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(
        // The 2 s bound, not TCP's minutes (a wide margin for a loaded machine).
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );

    // A fresh connection: the connect bound.
    let fresh = Pool::new(opts);
    let started = Instant::now();
    let err = fresh
        .exec(
            &target,
            &Command::new("true").timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    match &err {
        Error::Timeout { phase, .. } => {
            assert_eq!(*phase, ssh_spawner::error::Phase::Connect, "{err}")
        }
        other => panic!("expected a connect timeout, got {other}"),
    }
    // The 2 s connect bound, not the 30 s command bound.
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(err.to_string().contains(&tb.hosts[1].address), "{err}");

    // Healed: both pools work again without the caller doing anything.
    drop(undo);
    for p in [&pool, &fresh] {
        let out = p
            .exec(
                &target,
                &Command::new("hostname").timeout(Duration::from_secs(20)),
            )
            .await
            .unwrap();
        assert_eq!(out.stdout, b"node2\n");
    }
}

#[tokio::test]
async fn a_host_key_changed_mid_life_is_refused_and_named() {
    let Some(tb) = testbed("a_host_key_changed_mid_life_is_refused_and_named") else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node3", &tb.alice().name);
    pool.exec(&target, &Command::new("true")).await.unwrap();

    let _undo = Undo {
        testbed: &tb,
        action: "hostkey-restore",
        host: "node3".into(),
    };
    tb.fault("hostkey-replace", "node3");
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    let line = std::fs::read_to_string(&tb.known_hosts)
        .unwrap()
        .lines()
        .position(|l| l.starts_with(&format!("{} ", tb.hosts[2].address)))
        .unwrap()
        + 1;
    match &err {
        Error::HostKeyChanged { line: l, .. } => assert_eq!(*l, line, "{err}"),
        other => panic!("expected HostKeyChanged, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{}:22", tb.hosts[2].address)),
        "{msg}"
    );
    assert!(msg.contains(&format!("line {line}")), "{msg}");
}
