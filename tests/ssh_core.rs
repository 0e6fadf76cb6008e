//! The SSH layer against the real OpenSSH hosts of the testbed: keys, host
//! keys, the pool under concurrency, output caps, stdin, SFTP modes, agent.

mod common;

use std::time::{Duration, Instant};

use common::{mode_of, rand_suffix, testbed, Scratch};
use ssh_spawner::ssh::{Command, HostKeyPolicy, Identity, Pool, Target, Upload};
use ssh_spawner::Error;

#[tokio::test]
async fn every_key_type_and_a_certificate_log_in() {
    let Some(tb) = testbed("every_key_type_and_a_certificate_log_in") else {
        return;
    };
    let pool = tb.pool();
    let alice = tb.alice();
    for kind in ["ed25519", "ecdsa", "rsa", "cert_only"] {
        let key = alice
            .keys
            .get(kind)
            .unwrap_or_else(|| panic!("testbed key {kind}"));
        let target = Target::new(
            &tb.hosts[0].address,
            &alice.name,
            Identity::KeyFile(key.clone()),
        );
        let out = pool
            .exec(&target, &Command::new("id -un; hostname"))
            .await
            .unwrap_or_else(|e| panic!("{kind} key: {e}"));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text,
            format!("{}\n{}\n", alice.name, tb.hosts[0].name),
            "{kind}"
        );
    }
    // The hub key works for every user (the "one hub key" model), the
    // per-user key only for its owner (the "key per user" model).
    let bob = tb.bob();
    let out = pool
        .exec(&tb.target("node2", &bob.name), &Command::new("id -un"))
        .await
        .unwrap();
    assert_eq!(out.stdout, format!("{}\n", bob.name).into_bytes());
    let bob_key = Identity::KeyFile(bob.keys["ed25519"].clone());
    let wrong_user = Target::new(&tb.hosts[1].address, &alice.name, bob_key);
    let err = pool
        .exec(&wrong_user, &Command::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthRefused { .. }), "{err}");
}

#[tokio::test]
async fn a_key_nobody_trusts_is_refused_with_host_and_user_named() {
    let Some(tb) = testbed("a_key_nobody_trusts_is_refused_with_host_and_user_named") else {
        return;
    };
    let pool = tb.pool();
    let alice = &tb.alice().name;
    let target = Target::new(
        &tb.hosts[0].address,
        alice,
        Identity::KeyFile(tb.stranger_key.clone()),
    );
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AuthRefused { .. }), "{msg}");
    assert!(
        msg.contains(&tb.hosts[0].address) && msg.contains(alice),
        "{msg}"
    );

    // A key file that is not a key: a clear error naming the file.
    let scratch = Scratch::new("badkey");
    let bad = scratch.path("not-a-key");
    std::fs::write(&bad, "hello").unwrap();
    let target = Target::new(&tb.hosts[0].address, alice, Identity::KeyFile(bad.clone()));
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    assert!(matches!(err, Error::Key { .. }), "{err}");
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_and_changed_host_keys_are_refused() {
    let Some(tb) = testbed("unknown_and_changed_host_keys_are_refused") else {
        return;
    };
    let scratch = Scratch::new("kh");
    let host = &tb.hosts[0];
    let target = tb.target(&host.name, &tb.alice().name);

    // Unknown: the file lists other hosts only.
    let other_hosts: String = tb.hosts[1..]
        .iter()
        .map(|h| format!("{} {}\n", h.address, h.host_key_pub_line))
        .collect();
    let kh = scratch.path("known_hosts_unknown");
    std::fs::write(&kh, &other_hosts).unwrap();
    let mut opts = tb.pool_options();
    opts.connect.known_hosts = kh.clone();
    let err = Pool::new(opts.clone())
        .exec(&target, &Command::new("true"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::HostKeyUnknown { .. }), "{msg}");
    assert!(
        msg.contains(&format!("{}:22", host.address)) && msg.contains("SHA256:"),
        "{msg}"
    );

    // Changed: our host listed on line 3 with another host's key.
    let kh = scratch.path("known_hosts_changed");
    std::fs::write(
        &kh,
        format!(
            "# lab hosts\n{other_hosts}{} {}\n",
            host.address, tb.hosts[1].host_key_pub_line
        ),
    )
    .unwrap();
    opts.connect.known_hosts = kh.clone();
    let err = Pool::new(opts.clone())
        .exec(&target, &Command::new("true"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::HostKeyChanged { line, .. } => assert_eq!(*line, 2 + tb.hosts.len() - 1, "{msg}"),
        other => panic!("expected HostKeyChanged, got {other}"),
    }
    assert!(
        msg.contains(&kh.display().to_string()) && msg.contains("line"),
        "{msg}"
    );

    // accept-new does not override a changed key.
    opts.connect.host_key_policy = HostKeyPolicy::AcceptNew;
    let err = Pool::new(opts)
        .exec(&target, &Command::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HostKeyChanged { .. }), "{err}");
}

#[tokio::test]
async fn accept_new_records_a_first_seen_host_once() {
    let Some(tb) = testbed("accept_new_records_a_first_seen_host_once") else {
        return;
    };
    let scratch = Scratch::new("acceptnew");
    let kh = scratch.path("known_hosts");
    let mut opts = tb.pool_options();
    opts.connect.known_hosts = kh.clone();
    opts.connect.host_key_policy = HostKeyPolicy::AcceptNew;
    let target = tb.target(&tb.hosts[2].name, &tb.alice().name);
    Pool::new(opts.clone())
        .exec(&target, &Command::new("true"))
        .await
        .unwrap();
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(
        recorded,
        format!(
            "{} {}\n",
            tb.hosts[2].address,
            tb.hosts[2].host_key_pub_line.trim()
        )
    );
    assert_eq!(mode_of(&kh), 0o600);
    // Now strict accepts it, and accept-new does not add it twice.
    Pool::new(opts.clone())
        .exec(&target, &Command::new("true"))
        .await
        .unwrap();
    opts.connect.host_key_policy = HostKeyPolicy::Strict;
    Pool::new(opts)
        .exec(&target, &Command::new("true"))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), recorded);
}

#[tokio::test]
async fn fifty_concurrent_execs_share_five_connections() {
    let Some(tb) = testbed("fifty_concurrent_execs_share_five_connections") else {
        return;
    };
    let mut opts = tb.pool_options();
    opts.max_connections_per_target = 8;
    let pool = Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name);
    let max_sessions = tb.hosts[0].max_sessions;
    let started = Instant::now();
    let runs = (0..50).map(|i| {
        let pool = pool.clone();
        let target = target.clone();
        tokio::spawn(async move {
            pool.exec(&target, &Command::new(format!("sleep 1; echo {i}")))
                .await
        })
    });
    let results = futures_join_all(runs.collect()).await;
    for (i, r) in results.into_iter().enumerate() {
        let out = r.unwrap().unwrap_or_else(|e| panic!("exec {i}: {e}"));
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
    }
    let stats = pool.stats();
    // 50 channels, MaxSessions per connection: exactly ceil(50 / 10) handshakes,
    // i.e. callers arriving during a handshake shared it.
    assert_eq!(
        stats.handshakes as usize,
        50_usize.div_ceil(max_sessions),
        "{stats:?}"
    );
    assert_eq!(stats.channels, 0, "{stats:?}");
    // All ran at once, not one connection after another.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn concurrent_first_uses_share_one_handshake() {
    let Some(tb) = testbed("concurrent_first_uses_share_one_handshake") else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node2", &tb.alice().name);
    let runs = (0..5).map(|_| {
        let pool = pool.clone();
        let target = target.clone();
        tokio::spawn(async move { pool.exec(&target, &Command::new("true")).await })
    });
    for r in futures_join_all(runs.collect()).await {
        r.unwrap().unwrap();
    }
    assert_eq!(pool.stats().handshakes, 1);
}

#[tokio::test]
async fn a_server_with_fewer_sessions_than_configured_is_handled() {
    let Some(tb) = testbed("a_server_with_fewer_sessions_than_configured_is_handled") else {
        return;
    };
    // We claim 25 sessions per connection; sshd allows 10. Refused channels
    // must lower the connection's capacity, not fail the caller.
    let mut opts = tb.pool_options();
    opts.max_sessions_per_connection = 25;
    opts.max_connections_per_target = 6;
    let pool = Pool::new(opts);
    let target = tb.target("node3", &tb.alice().name);
    let runs = (0..30).map(|i| {
        let pool = pool.clone();
        let target = target.clone();
        tokio::spawn(async move {
            pool.exec(&target, &Command::new(format!("sleep 1; echo {i}")))
                .await
        })
    });
    for (i, r) in futures_join_all(runs.collect())
        .await
        .into_iter()
        .enumerate()
    {
        let out = r.unwrap().unwrap_or_else(|e| panic!("exec {i}: {e}"));
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
    }
}

#[tokio::test]
async fn exit_status_stderr_tail_and_byte_exact_stdin() {
    let Some(tb) = testbed("exit_status_stderr_tail_and_byte_exact_stdin") else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node1", &tb.bob().name);
    let out = pool
        .exec(
            &target,
            &Command::new("echo out; for i in 1 2 3 4 5; do echo line$i >&2; done; exit 3"),
        )
        .await
        .unwrap();
    assert_eq!(out.status, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr_tail(2), "line4\nline5");
    let err = out.check(&target).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("status 3") && msg.contains("line5") && msg.contains(&tb.bob().name),
        "{msg}"
    );

    // 3 MB of every byte value through stdin and back, unchanged.
    let input: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let out = pool
        .exec(
            &target,
            &Command::new("cat").stdin(input.clone()).max_output(4 << 20),
        )
        .await
        .unwrap();
    assert!(out.success());
    assert!(
        out.stdout == input,
        "stdin/stdout differ ({} bytes back)",
        out.stdout.len()
    );

    // A command killed by a signal reports it.
    let out = pool
        .exec(&target, &Command::new("kill -TERM $$"))
        .await
        .unwrap();
    assert_eq!(
        (out.status, out.signal.as_deref()),
        (None, Some("TERM")),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_flood_of_output_is_capped_and_stopped() {
    let Some(tb) = testbed("a_flood_of_output_is_capped_and_stopped") else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node2", &tb.bob().name);
    let tag = rand_suffix();
    // An endless writer; the cap must stop it, not the timeout.
    let cmd = Command::new(format!("exec yes flood-{tag}"))
        .max_output(1 << 20)
        .timeout(Duration::from_secs(20));
    let started = Instant::now();
    let err = pool.exec(&target, &cmd).await.unwrap_err();
    assert!(
        matches!(err, Error::OutputTooLarge { limit: 1048576, .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The remote writer is gone and the pool is healthy.
    let mut gone = false;
    for _ in 0..50 {
        let out = pool
            .exec(
                &target,
                &Command::new(format!("pgrep -f 'floo[d]-{tag}' || true")),
            )
            .await
            .unwrap();
        if out.stdout.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "remote `yes` still running after the cap stopped it");
    // The closed channel's slot comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().channels != 0 {
        assert!(
            Instant::now() < deadline,
            "channel left: {:?}",
            pool.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dropped_or_timed_out_exec_leaks_nothing() {
    let Some(tb) = testbed("a_dropped_or_timed_out_exec_leaks_nothing") else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node3", &tb.bob().name);
    // Drop the caller's future mid-run.
    let sleeper = Command::new("exec sleep 37");
    let run = pool.exec(&target, &sleeper);
    let _ = tokio::time::timeout(Duration::from_millis(500), run).await;
    // Time out on the exec's own bound.
    let started = Instant::now();
    let err = pool
        .exec(
            &target,
            &Command::new("exec sleep 41").timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // The 1 s bound, not the 41 s sleep (a wide margin for a loaded machine).
    assert!(started.elapsed() < Duration::from_secs(20));
    // Both remote sleeps are killed and both slots returned.
    let mut clean = false;
    for _ in 0..50 {
        let out = pool
            .exec(&target, &Command::new("pgrep -f 'slee[p] (37|41)' || true"))
            .await
            .unwrap();
        if out.stdout.is_empty() && pool.stats().channels == 0 {
            clean = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(clean, "remote sleeps or channels left: {:?}", pool.stats());
    // 20 more execs than MaxSessions still go through: no slot leaked.
    let runs = (0..20).map(|_| {
        let pool = pool.clone();
        let target = target.clone();
        tokio::spawn(async move { pool.exec(&target, &Command::new("true")).await })
    });
    for r in futures_join_all(runs.collect()).await {
        r.unwrap().unwrap();
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let Some(tb) = testbed("idle_connections_are_closed") else {
        return;
    };
    let mut opts = tb.pool_options();
    opts.idle_timeout = Duration::from_millis(600);
    let pool = Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name);
    let other = tb.target("node2", &tb.bob().name);
    pool.exec(&target, &Command::new("true")).await.unwrap();
    pool.exec(&other, &Command::new("true")).await.unwrap();
    assert_eq!((pool.stats().connections, pool.stats().targets), (2, 2));
    // Closed after the idle timeout (checked with a bound, not a guess),
    // and the targets they served forgotten.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().connections != 0 || pool.stats().targets != 0 {
        assert!(
            Instant::now() < deadline,
            "idle connection kept: {:?}",
            pool.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the next use simply reconnects.
    pool.exec(&target, &Command::new("true")).await.unwrap();
    assert_eq!(pool.stats().handshakes, 3);
    assert_eq!(pool.stats().targets, 1);
}

#[tokio::test]
async fn nothing_listening_is_unreachable_not_a_hang() {
    let Some(tb) = testbed("nothing_listening_is_unreachable_not_a_hang") else {
        return;
    };
    // A long connect bound: "refused" must come at once, not at the bound.
    let mut opts = tb.pool_options();
    opts.connect.connect_timeout = Duration::from_secs(60);
    let pool = Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name).port(2);
    let started = Instant::now();
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.is_unreachable());
    assert!(
        err.to_string()
            .contains(&format!("{}:2", tb.hosts[0].address)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn sftp_writes_exact_modes_and_private_parents() {
    let Some(tb) = testbed("sftp_writes_exact_modes_and_private_parents") else {
        return;
    };
    let pool = tb.pool();
    let alice = tb.alice();
    let target = tb.target("node2", &alice.name);
    let base = format!(".ssh-spawner-test-{}", rand_suffix());
    // The remote umask is 022, so a naive create would give 0644 and 0755.
    let files = vec![
        Upload {
            path: format!("~/{base}/a/b/key.pem"),
            contents: b"secret".to_vec(),
            mode: 0o600,
        },
        Upload {
            path: format!("{base}/a/public.txt"),
            contents: b"hello".to_vec(),
            mode: 0o644,
        },
        Upload {
            path: format!("{base}/a/run.sh"),
            contents: b"#!/bin/sh\n".to_vec(),
            mode: 0o750,
        },
    ];
    pool.upload(&target, &files, Duration::from_secs(10))
        .await
        .unwrap();
    let home = &alice.home;
    let local = |p: &str| home.join(&base).join(p);
    assert_eq!(std::fs::read(local("a/b/key.pem")).unwrap(), b"secret");
    assert_eq!(mode_of(&local("a/b/key.pem")), 0o600);
    assert_eq!(mode_of(&local("a/public.txt")), 0o644);
    assert_eq!(mode_of(&local("a/run.sh")), 0o750);
    for dir in ["", "a", "a/b"] {
        assert_eq!(mode_of(&local(dir)), 0o700, "dir {dir:?}");
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(local("a/b/key.pem")).unwrap().uid(),
        alice.uid
    );

    // A pre-existing world-readable file is narrowed, then overwritten.
    std::fs::set_permissions(
        local("a/public.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let again = vec![Upload {
        path: format!("{base}/a/public.txt"),
        contents: b"token".to_vec(),
        mode: 0o600,
    }];
    pool.upload(&target, &again, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(mode_of(&local("a/public.txt")), 0o600);
    assert_eq!(std::fs::read(local("a/public.txt")).unwrap(), b"token");

    std::fs::remove_dir_all(home.join(&base)).unwrap();
}

#[tokio::test]
async fn an_ssh_agent_authenticates() {
    let Some(tb) = testbed("an_ssh_agent_authenticates") else {
        return;
    };
    let scratch = Scratch::new("agent");
    let sock = scratch.path("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start ssh-agent");
    for _ in 0..50 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pool = tb.pool();
    let alice = tb.alice();
    let target = Target::new(
        &tb.hosts[0].address,
        &alice.name,
        Identity::Agent(sock.clone()),
    );

    // Empty agent: a clear error naming the socket.
    let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
    assert!(
        matches!(err, Error::Agent { .. }) && err.to_string().contains("holds no keys"),
        "{err}"
    );

    // The stranger key first (refused), then alice's RSA key (accepted).
    for key in [&tb.stranger_key, &alice.keys["rsa"]] {
        let st = std::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let out = pool.exec(&target, &Command::new("id -un")).await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        out.unwrap().stdout,
        format!("{}\n", alice.name).into_bytes()
    );
}

async fn futures_join_all<T>(
    handles: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}

#[tokio::test]
async fn first_uploads_into_one_new_directory_at_once_all_succeed() {
    let Some(tb) = testbed("first_uploads_into_one_new_directory_at_once_all_succeed") else {
        return;
    };
    let pool = tb.pool();
    let alice = tb.alice();
    let target = tb.target("node2", &alice.name);
    let base = format!(".ssh-spawner-race-{}", rand_suffix());
    // Each upload finds the directories missing and makes them: all but the
    // first lose the race between the check and the create.
    let uploads = (0..8).map(|i| {
        let (pool, target) = (pool.clone(), target.clone());
        let files = vec![Upload {
            path: format!("{base}/a/b/file{i}"),
            contents: vec![b'x'; 10],
            mode: 0o600,
        }];
        tokio::spawn(async move { pool.upload(&target, &files, Duration::from_secs(15)).await })
    });
    let mut failed = Vec::new();
    for u in uploads.collect::<Vec<_>>() {
        if let Err(e) = u.await.unwrap() {
            failed.push(e.to_string());
        }
    }
    let dir = alice.home.join(&base);
    let made = std::fs::read_dir(dir.join("a/b"))
        .map(|d| d.count())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(made, 8);
}

/// Wait up to `limit` for `f` to hold, asking every 20 ms.
async fn until(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn run_directories_are_made_over_a_kept_sftp_session() {
    let Some(tb) = testbed("run_directories_are_made_over_a_kept_sftp_session") else {
        return;
    };
    let pool = tb.pool();
    let alice = tb.alice();
    let target = tb.target("node3", &alice.name);
    let base = format!(".ssh-spawner-test-{}", rand_suffix());
    let local = |p: &str| alice.home.join(&base).join(p);
    let (a, b) = (format!("{base}/a"), format!("~/{base}/b"));

    // No connection yet: nothing is made, and none is opened for it.
    assert!(!pool.make_dir(&target, &a).await);
    assert_eq!(pool.stats().connections, 0);
    pool.exec(&target, &Command::new(format!("mkdir -m 700 {base}")))
        .await
        .unwrap();
    // Asked for now, the session is opened with the next command's.
    assert!(!pool.make_dir(&target, &a).await);
    assert_eq!(pool.stats().kept_sftp, 0);
    let out = pool.exec(&target, &Command::new("true")).await.unwrap();
    assert!(out.success());
    assert!(
        until(Duration::from_secs(10), async || pool
            .make_dir(&target, &a)
            .await)
        .await,
        "the kept SFTP session never made the directory"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(mode_of(&local("a")), 0o700);
    assert_eq!(std::fs::metadata(local("a")).unwrap().uid(), alice.uid);
    let stats = pool.stats();
    assert_eq!((stats.connections, stats.kept_sftp), (1, 1));
    assert_eq!(
        stats.channels, 0,
        "the kept session is not a channel in use"
    );

    // An existing directory is not made again; the session stays usable.
    assert!(!pool.make_dir(&target, &a).await);
    assert!(pool.make_dir(&target, &b).await);
    assert_eq!(mode_of(&local("b")), 0o700);
    assert_eq!(pool.stats().kept_sftp, 1);

    // The session holds one of sshd's ten: nine commands at once on the
    // one connection, the tenth and on queue or go to another one; all
    // of them run.
    let runs = (0..25).map(|i| {
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move {
            pool.exec(&target, &Command::new(format!("sleep 0.2; echo {i}")))
                .await
        })
    });
    for (i, r) in runs.collect::<Vec<_>>().into_iter().enumerate() {
        let out = r.await.unwrap().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
    }
    assert!(pool.stats().kept_sftp >= 1);

    // Directories made for a start that did not happen are removed.
    assert!(pool.remove_empty_dir(&target, &a).await);
    assert!(pool.remove_empty_dir(&target, &b).await);
    assert!(!local("a").exists() && !local("b").exists());
    std::fs::remove_dir_all(alice.home.join(&base)).unwrap();
    pool.close_all().await;
}

/// A host whose sshd holds fewer sessions than the pool assumes never
/// loses one to the kept SFTP session: with one, SFTP is refused beside a
/// command and never kept; with two it is kept, and given up as soon as
/// sshd refuses a command's session. Every command runs either way.
#[tokio::test]
async fn a_host_with_few_sessions_never_loses_one_to_the_kept_sftp_session() {
    let Some(tb) = testbed("a_host_with_few_sessions_never_loses_one_to_the_kept_sftp_session")
    else {
        return;
    };
    let alice = tb.alice();
    for max in [1, 2] {
        let sshd = common::OwnSshd::start(&tb, &[("MaxSessions", &max.to_string())]);
        let mut opts = tb.pool_options();
        opts.connect.known_hosts = sshd.known_hosts.clone();
        opts.max_connections_per_target = 1;
        let pool = Pool::new(opts);
        let target = tb.target("node1", &alice.name).port(sshd.port);
        let base = format!(".ssh-spawner-test-{}", rand_suffix());
        pool.exec(&target, &Command::new(format!("mkdir -m 700 {base}")))
            .await
            .unwrap();
        assert!(!pool.make_dir(&target, &format!("{base}/a")).await);
        // The session is asked for beside this command's.
        let out = pool
            .exec(&target, &Command::new("sleep 0.3; echo ok"))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"ok\n");
        // (Refused, it is never tried again: a short wait tells.)
        let wait = Duration::from_secs(if max >= 2 { 10 } else { 2 });
        let kept = until(wait, async || {
            pool.make_dir(&target, &format!("{base}/a")).await
        })
        .await;
        assert_eq!(kept, max >= 2, "MaxSessions {max}");
        // More commands at once than sshd holds: all of them run.
        let runs = (0..4).map(|i| {
            let (pool, target) = (pool.clone(), target.clone());
            tokio::spawn(async move {
                pool.exec(&target, &Command::new(format!("sleep 0.1; echo {i}")))
                    .await
            })
        });
        for (i, r) in runs.collect::<Vec<_>>().into_iter().enumerate() {
            let out = r
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("MaxSessions {max}: {e}"));
            assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        }
        assert_eq!(pool.stats().kept_sftp, 0, "MaxSessions {max}");
        assert_eq!(pool.stats().handshakes, 1, "MaxSessions {max}");
        pool.close_all().await;
        std::fs::remove_dir_all(alice.home.join(&base)).unwrap();
    }
}

/// A command that leaves a job in the background holding its stdout and
/// stderr ends on its exit status, with all it printed before it exited,
/// instead of waiting for the channel to close (the job's whole run).
#[tokio::test]
async fn an_exec_ends_on_the_exit_status_when_a_background_job_holds_the_output() {
    let Some(tb) =
        testbed("an_exec_ends_on_the_exit_status_when_a_background_job_holds_the_output")
    else {
        return;
    };
    let pool = tb.pool();
    let target = tb.target("node1", &tb.alice().name);
    // A length no other test sleeps, to find the job by.
    let pause = format!("30.{:03}", rand::random::<u16>() % 1000);
    let script = format!(
        "sleep {pause} & i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; echo bye >&2; exit 5"
    );
    let t0 = Instant::now();
    let out = pool
        .exec(
            &target,
            &Command::new(script).timeout(Duration::from_secs(20)),
        )
        .await;
    let took = t0.elapsed();
    let job = format!("sleep\0{pause}\0");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == job.as_bytes()) {
            let pid = e.file_name().to_string_lossy().into_owned();
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
    }
    let out = out.unwrap();
    assert!(took < Duration::from_secs(10), "the exec took {took:?}");
    assert_eq!(out.status, Some(5));
    assert_eq!(out.stderr_tail(1), "bye");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 3000);
    assert!(text.ends_with("line2999\n"), "{text:?}");
}

/// Many first contacts at once under accept-new with a man in the middle on
/// some of them: one address whose connections go in turn to node1's sshd
/// and to an sshd with another host key. Exactly one key is recorded; the
/// connections that met the other key are refused as a changed key, never
/// recorded next to the first.
#[tokio::test]
async fn concurrent_first_contacts_under_accept_new_record_one_key_and_refuse_the_other() {
    let Some(tb) =
        testbed("concurrent_first_contacts_under_accept_new_record_one_key_and_refuse_the_other")
    else {
        return;
    };
    let scratch = Scratch::new("acceptrace");
    let other_key = scratch.path("other_host_key");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(made.success());
    let other_key_str = other_key.display().to_string();
    let other = common::OwnSshd::start(&tb, &[("HostKey", &other_key_str)]);
    let node1 = tb.host("node1");
    let backends = [
        format!("{}:{}", node1.address, node1.port),
        format!("{}:{}", other.address, other.port),
    ];
    // The address the spawner is given: each connection goes to the next backend.
    let front = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let front_port = front.local_addr().unwrap().port();
    let relay = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut inbound, _)) = front.accept().await {
            let backend = backends[n % 2].clone();
            n += 1;
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    let kh = scratch.path("known_hosts");
    let mut opts = tb.pool_options();
    opts.connect.known_hosts = kh.clone();
    opts.connect.host_key_policy = HostKeyPolicy::AcceptNew;
    let target = Target::new(
        "127.0.0.1",
        &tb.alice().name,
        Identity::KeyFile(tb.hub_key.clone()),
    )
    .port(front_port);
    // A pool each: every one makes its own first handshake.
    let results: Vec<_> = futures_join_all(
        (0..12)
            .map(|_| {
                let (pool, target) = (Pool::new(opts.clone()), target.clone());
                tokio::spawn(async move { pool.exec(&target, &Command::new("true")).await })
            })
            .collect(),
    )
    .await
    .into_iter()
    .map(|r| r.unwrap())
    .collect();
    relay.abort();
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(recorded.lines().count(), 1, "{recorded}");
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let changed = results
        .iter()
        .filter(|r| matches!(r, Err(Error::HostKeyChanged { .. })))
        .count();
    assert_eq!((ok, changed), (6, 6), "{results:?}");
    assert_eq!(mode_of(&kh), 0o600);
}

/// Every connection of a full pool busy: a caller waits for the first
/// session slot that frees on any of them, not on one connection chosen
/// when it arrived (which here holds a long command).
#[tokio::test]
async fn a_full_pool_gives_the_first_slot_that_frees_on_any_connection() {
    let Some(tb) = testbed("a_full_pool_gives_the_first_slot_that_frees_on_any_connection") else {
        return;
    };
    let mut opts = tb.pool_options();
    opts.max_sessions_per_connection = 1;
    opts.max_connections_per_target = 2;
    let pool = Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name);
    let long = {
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move { pool.exec(&target, &Command::new("sleep 8")).await })
    };
    // The long command holds the first connection before the short one opens the second.
    assert!(
        common::until_true(Duration::from_secs(10), || pool.stats().channels == 1).await,
        "{:?}",
        pool.stats()
    );
    let short = {
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move { pool.exec(&target, &Command::new("sleep 0.5")).await })
    };
    assert!(
        common::until_true(Duration::from_secs(10), || pool.stats().channels == 2).await,
        "{:?}",
        pool.stats()
    );
    let t0 = Instant::now();
    pool.exec(&target, &Command::new("true")).await.unwrap();
    let waited = t0.elapsed();
    short.await.unwrap().unwrap();
    long.await.unwrap().unwrap();
    assert_eq!(pool.stats().handshakes, 2);
    assert!(waited < Duration::from_secs(4), "queued for {waited:?}");
}
