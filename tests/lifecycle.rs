//! The spawner lifecycle against the testbed: prepare, launch, poll, stop,
//! certificates, limits, hostile input, and the CLI, with a real process
//! answering HTTP on the chosen port (`python -m jupyterhub.tests.mocksu`).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{mode_of, rand_suffix, testbed, Scratch, Testbed, Undo};
use ssh_spawner::config::Config;
use ssh_spawner::plan::gpus::GpuFacts;
use ssh_spawner::plan::hosts::{facts_script, HostFacts, Requirements, Strategy};
use ssh_spawner::plan::limits::Limits;
use ssh_spawner::plan::poll::ExitReason;
use ssh_spawner::plan::state::{self, ServerState};
use ssh_spawner::plan::stop::Stopped;
use ssh_spawner::spawner::{
    CleanUpLater, PollOutcome, Progress, SpawnRequest, Spawner, StartOptions,
};
use ssh_spawner::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts a server that the test expects to start, and a guard that stops it
/// if the test fails before stopping it itself.
async fn started(
    sp: &Spawner,
    req: &SpawnRequest,
    env: impl Fn(&ServerState) -> Vec<(String, String)>,
    cmd: &[String],
) -> (ServerState, common::StopOnPanic) {
    let state = sp.spawn(req, env, cmd, &Progress::new()).await.unwrap();
    let guard = common::StopOnPanic::new(sp, &state);
    (state, guard)
}

/// `sleep SECS`: a server that never listens, marked by its length.
fn sleep_cmd(secs: u32) -> Vec<String> {
    vec!["sleep".to_string(), secs.to_string()]
}

fn config(tb: &Testbed) -> Config {
    let hosts: Vec<String> = tb
        .hosts
        .iter()
        .map(|h| {
            format!(
                "[[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
                h.address, h.name
            )
        })
        .collect();
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 3\ncommand_timeout = 15\nstop_grace = 3\n\
         facts_cache = 0\nready_timeout = 0.5\n{}",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        hosts.join("\n")
    );
    let c: Config = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    c
}

/// [`config`] trusting the host key of `sshd` too (a known_hosts file in
/// `scratch`), and a host entry named `name` for that sshd.
fn with_own_sshd(
    tb: &Testbed,
    sshd: &common::OwnSshd,
    scratch: &Scratch,
    name: &str,
) -> (Config, ssh_spawner::config::HostConfig) {
    let mut c = config(tb);
    c.known_hosts = common::known_hosts_with(tb, sshd, scratch);
    let mut host: ssh_spawner::config::HostConfig = toml::from_str(&format!(
        "address = \"{}\"\nname = \"{name}\"",
        sshd.address
    ))
    .unwrap();
    host.port = sshd.port;
    (c, host)
}

fn mocksu(tb: &Testbed) -> Vec<String> {
    vec![
        tb.python.display().to_string(),
        "-m".into(),
        "jupyterhub.tests.mocksu".into(),
    ]
}

fn env_for(
    user: &str,
    extra: Vec<(String, String)>,
) -> impl Fn(&ServerState) -> Vec<(String, String)> {
    let user = user.to_string();
    move |s: &ServerState| {
        let mut env = vec![
            (
                "JUPYTERHUB_SERVICE_URL".to_string(),
                format!("http://0.0.0.0:{}/user/{user}/", s.port),
            ),
            ("JUPYTERHUB_USER".to_string(), user.clone()),
        ];
        env.extend(extra.clone());
        env
    }
}

fn request(user: &str) -> SpawnRequest {
    SpawnRequest {
        username: user.into(),
        ..Default::default()
    }
}

/// GET a path from the server; the body, once it answers 200 (waits up to 15 s).
async fn http_get(address: &str, port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((address, port)),
        )
        .await
        {
            let req = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
                let text = String::from_utf8_lossy(&buf).to_string();
                if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
                    return text
                        .split("\r\n\r\n")
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{address}:{port}{path} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn remote(sp: &Spawner, tb: &Testbed, host: &str, user: &str, cmd: &str) -> String {
    let target = sp.target(sp.config().host(host).unwrap(), user).unwrap();
    let out = sp
        .pool()
        .exec(&target, &ssh_spawner::ssh::Command::new(cmd))
        .await
        .unwrap();
    let _ = tb;
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn the_whole_lifecycle_with_a_server_answering_http() {
    let Some(tb) = testbed("the_whole_lifecycle_with_a_server_answering_http") else {
        return;
    };
    // The start waits for the server to listen (most stand-ins in this file
    // never do, so the others wait only 0.5 s).
    let mut c = config(&tb);
    c.ready_timeout = 30.0;
    let sp = Spawner::new(c).unwrap();
    let user = tb.bob().name.clone();
    let progress = Progress::new();
    let state = sp
        .spawn(
            &request(&user),
            env_for(&user, vec![]),
            &mocksu(&tb),
            &progress,
        )
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    // Listening when the start returns: the first connection is accepted.
    tokio::net::TcpStream::connect((state.address.as_str(), state.port))
        .await
        .expect("the server listens when the start returns");

    // It answers on the chosen host and port, as that user.
    let body = http_get(&state.address, state.port, &format!("/user/{user}/hello")).await;
    assert_eq!(body, format!("/user/{user}/hello"));
    let pid = state.pid.unwrap();
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(owner, tb.bob().uid);
    assert!(
        state
            .dir
            .starts_with(&format!("{}/.jupyterhub-ssh/", tb.bob().home.display())),
        "{}",
        state.dir
    );

    // Progress told the story.
    let messages = common::messages(&progress);
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("Host {} chosen", state.host))),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains(&format!("pid {pid}"))
            && m.contains(&format!("listening on port {}", state.port))),
        "{messages:?}"
    );

    // Modes: the base and per-server directory 0700, the log 0600.
    assert_eq!(mode_of(std::path::Path::new(&state.dir)), 0o700);
    assert_eq!(
        mode_of(&std::path::Path::new(&state.dir).join("server.log")),
        0o600
    );
    assert_eq!(
        mode_of(std::path::Path::new(&state.dir).parent().unwrap()),
        0o700
    );

    // State survives the hub database (a new spawner, as after a restart).
    let saved = state::encode(&state).unwrap();
    let sp2 = Spawner::new(config(&tb)).unwrap();
    let loaded = state::decode(&saved).unwrap();
    assert!(matches!(sp2.poll(&loaded).await, PollOutcome::Running));

    // Stop: the group is gone, the directory is reduced to the log and the
    // exit status (so a later poll still reports how it ended).
    assert!(matches!(
        sp2.stop(&loaded).await.unwrap(),
        Stopped::Killed { .. }
    ));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let mut left: Vec<_> = std::fs::read_dir(&state.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, vec!["exit_status", "server.log"]);
    match sp2.poll(&loaded).await {
        PollOutcome::Exited { .. } => {}
        other => panic!("expected exited, got {other:?}"),
    }
    // Stopping again is a no-op.
    assert_eq!(sp2.stop(&loaded).await.unwrap(), Stopped::AlreadyGone);
    std::fs::remove_dir_all(&state.dir).unwrap();
}

/// A process whose whole argv (NUL-separated, with the final NUL) is `argv`.
fn process_running(argv: &[u8]) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.as_slice() == argv))
}

#[tokio::test]
async fn stop_kills_children_even_in_their_own_session() {
    let Some(tb) = testbed("stop_kills_children_even_in_their_own_session") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    // A "kernel" that calls setsid, and a server that ignores TERM.
    let cmd: Vec<String> = [
        "/bin/sh",
        "-c",
        "setsid sleep 1301 & trap '' TERM; sleep 1300 & wait",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (state, _stop_on_panic) = started(&sp, &request(&user), env_for(&user, vec![]), &cmd).await;
    // The trap is set once `sleep 1300` runs (the bed shares this machine's
    // pid namespace): wait for it rather than for a guess of the clock.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !process_running(b"sleep\x001300\x00") {
        assert!(
            Instant::now() < deadline,
            "the server's `sleep 1300` never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    assert_eq!(
        sp.stop(&state).await.unwrap(),
        Stopped::Killed { escalated: true }
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let left = remote(
        &sp,
        &tb,
        &state.host,
        &user,
        "pgrep -f 'slee[p] 130[01]' || true",
    )
    .await;
    assert_eq!(left, "", "children outlived stop");
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn stop_after_a_crash_kills_what_the_server_left_behind() {
    let Some(tb) = testbed("stop_after_a_crash_kills_what_the_server_left_behind") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.bob().name.clone();
    // A "kernel" in its own session, then the server dies on its own.
    let cmd: Vec<String> = ["/bin/sh", "-c", "setsid sleep 1901 & sleep 1; exit 3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (state, _stop_on_panic) = started(&sp, &request(&user), env_for(&user, vec![]), &cmd).await;
    let mut exited = false;
    for _ in 0..50 {
        if let PollOutcome::Exited {
            status: Some(3), ..
        } = sp.poll(&state).await
        {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "the server did not exit with status 3");
    assert_ne!(
        remote(
            &sp,
            &tb,
            &state.host,
            &user,
            "pgrep -f 'slee[p] 1901' || true"
        )
        .await,
        ""
    );
    // Its parent is gone; the run's marker in its environment still ties it to us.
    assert!(matches!(
        sp.stop(&state).await.unwrap(),
        Stopped::Killed { .. }
    ));
    assert_eq!(
        remote(
            &sp,
            &tb,
            &state.host,
            &user,
            "pgrep -f 'slee[p] 1901' || true"
        )
        .await,
        ""
    );
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn hostile_environment_values_arrive_byte_exact_and_secrets_stay_out_of_argv() {
    let Some(tb) =
        testbed("hostile_environment_values_arrive_byte_exact_and_secrets_stay_out_of_argv")
    else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let token = format!("secret-token-{}", rand_suffix());
    let hostile = "it's \"$(touch /tmp/pwned)\" `id` $HOME \\ \n\tnewline ünïcödé ✓ {\"json\": [1]} ; rm -rf / #".to_string();
    let out_file = format!("{}/hostile-{}", tb.alice().home.display(), rand_suffix());

    // Watch every process's argv on the machine (all hosts share it) during the spawn.
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop_watch = stop_watch.clone();
        let token = token.clone();
        std::thread::spawn(move || {
            let mut scans = 0;
            while !stop_watch.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                        assert!(
                            !String::from_utf8_lossy(&cmdline).contains(&token),
                            "token in argv of pid {:?}: {}",
                            entry.file_name(),
                            String::from_utf8_lossy(&cmdline)
                        );
                    }
                }
                scans += 1;
            }
            scans
        })
    };
    let cmd: Vec<String> = [
        "/bin/sh",
        "-c",
        "printf %s \"$HOSTILE\" > \"$OUT\"; exec sleep 60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let extra = vec![
        ("HOSTILE".to_string(), hostile.clone()),
        ("OUT".to_string(), out_file.clone()),
        ("JUPYTERHUB_API_TOKEN".to_string(), token.clone()),
    ];
    let (state, _stop_on_panic) = started(&sp, &request(&user), env_for(&user, extra), &cmd).await;
    for _ in 0..50 {
        if std::path::Path::new(&out_file).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_watch.store(true, Ordering::Relaxed);
    let scans = watcher.join().expect("no token in any argv");
    assert!(scans > 0);
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), hostile);
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    // The token is in no file of the server's directory.
    for entry in std::fs::read_dir(&state.dir).unwrap().flatten() {
        if entry.path().is_file() {
            assert!(
                !String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap()).contains(&token),
                "{:?}",
                entry.path()
            );
        }
    }
    sp.stop(&state).await.unwrap();
    let _ = std::fs::remove_file(&out_file);
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn invalid_names_are_refused_before_anything_runs() {
    let Some(tb) = testbed("invalid_names_are_refused_before_anything_runs") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    for bad in ["../x", "a b", "$(reboot)"] {
        let err = sp
            .spawn(
                &request(bad),
                env_for("x", vec![]),
                &mocksu(&tb),
                &Progress::new(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("user name"), "{bad}: {err}");
    }
    let user = tb.alice().name.clone();
    let err = sp
        .spawn(
            &request(&user),
            env_for(&user, vec![("BAD-NAME".into(), "x".into())]),
            &mocksu(&tb),
            &Progress::new(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BAD-NAME"), "{err}");
    let err = sp
        .spawn(
            &request(&user),
            env_for(&user, vec![("NUL".into(), "a\0b".into())]),
            &mocksu(&tb),
            &Progress::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

#[tokio::test]
async fn a_taken_port_is_retried_with_another() {
    let Some(tb) = testbed("a_taken_port_is_retried_with_another") else {
        return;
    };
    let mut c = config(&tb);
    c.hosts.truncate(1);
    let sp = Spawner::new(c).unwrap();
    let user = tb.bob().name.clone();
    let progress = Progress::new();
    let prepared = sp.prepare(&request(&user), &progress).await.unwrap();
    let port = prepared.state.port;
    // Someone takes the port between prepare and launch.
    let squat = format!(
        "nohup {} -c 'import socket,time; s=socket.socket(); s.bind((\"0.0.0.0\",{port})); s.listen(); time.sleep(30)' >/dev/null 2>&1 &\n\
         for i in $(seq 50); do grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && break; sleep 0.1; done",
        tb.python.display()
    );
    remote(&sp, &tb, "node1", &user, &squat).await;
    // The one start loop: the launch finds the port taken, the start moves
    // to another port on the same host and the server answers there.
    let state = sp
        .start(
            prepared,
            &request(&user),
            env_for(&user, vec![]),
            &mocksu(&tb),
            &progress,
            &StartOptions {
                may_move: true,
                ..Default::default()
            },
            &CleanUpLater,
        )
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    assert_eq!(state.host, "node1");
    assert_ne!(state.port, port);
    let said = common::messages(&progress);
    assert!(
        said.contains(&format!(
            "Port {port} was taken meanwhile; trying port {}",
            state.port
        )),
        "{said:?}"
    );
    http_get(&state.address, state.port, &format!("/user/{user}/")).await;
    sp.stop(&state).await.unwrap();
    remote(
        &sp,
        &tb,
        "node1",
        &user,
        &format!("pkill -f 's.bind..\"0.0.0.0\",{port}' || true"),
    )
    .await;
    std::fs::remove_dir_all(&state.dir).unwrap();
}

/// The launch does not run `ss` when sshd answered the port probe (on the
/// loopbacks and the host's address), so a listener elsewhere is not seen
/// before the start. It must still never be taken for the server: the
/// readiness wait counts only the user's own listener, and a server whose
/// bind it refuses fails with its log.
#[tokio::test]
async fn another_users_listener_the_probe_does_not_reach_is_never_the_server() {
    let Some(tb) = testbed("another_users_listener_the_probe_does_not_reach_is_never_the_server")
    else {
        return;
    };
    let (alice, bob) = (tb.alice().name.clone(), tb.bob().name.clone());
    let spawner = |ready: f64| {
        let mut c = config(&tb);
        c.hosts.truncate(1);
        c.ready_timeout = ready;
        Spawner::new(c).unwrap()
    };
    let sp = spawner(2.0);
    let progress = Progress::new();
    let prepared = sp.prepare(&request(&alice), &progress).await.unwrap();
    let port = prepared.state.port;
    // Bob listens on the port at 127.0.0.2, a loopback address the probe
    // does not ask about.
    let squat = format!(
        "nohup {} -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.2\",{port})); s.listen(); time.sleep(120)' >/dev/null 2>&1 &\n\
         for i in $(seq 100); do grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && break; sleep 0.1; done",
        tb.python.display()
    );
    remote(&sp, &tb, "node1", &bob, &squat).await;
    let unsquat = format!("pkill -f 's.bind..\"127.0.0.2\",{port}' || true");

    // A server that never listens: the wait runs out and the start says it
    // is not listening yet (bob's socket is not alice's server).
    let state = sp
        .launch(
            &prepared,
            &[],
            &["sleep".to_string(), "300".to_string()],
            &progress,
        )
        .await
        .unwrap();
    let guard = common::StopOnPanic::new(&sp, &state);
    let said = common::messages(&progress);
    assert!(
        said.iter()
            .any(|m| m.contains(&format!("not listening on port {port} yet"))),
        "{said:?}"
    );
    assert!(
        !said
            .iter()
            .any(|m| m.contains(&format!(", listening on port {port}"))),
        "bob's socket was taken for alice's server: {said:?}"
    );
    sp.stop(&state).await.unwrap();
    drop(guard);

    // A server that binds 0.0.0.0 on that port is refused by the kernel:
    // the start fails with the server's own words, nothing is left.
    let sp = spawner(30.0);
    let prepared = sp.prepare(&request(&alice), &progress).await.unwrap();
    let mut prepared = prepared;
    prepared.state.port = port;
    let env = env_for(&alice, vec![])(&prepared.state);
    match sp.launch(&prepared, &env, &mocksu(&tb), &progress).await {
        Err(Error::ServerExited { log_tail, .. }) => {
            assert!(log_tail.contains("Address already in use"), "{log_tail:?}")
        }
        other => {
            remote(&sp, &tb, "node1", &bob, &unsquat).await;
            panic!("expected the server's bind to fail: {other:?}");
        }
    }
    remote(&sp, &tb, "node1", &bob, &unsquat).await;
}

#[tokio::test]
async fn a_server_that_exits_during_start_reports_its_status_and_log() {
    let Some(tb) = testbed("a_server_that_exits_during_start_reports_its_status_and_log") else {
        return;
    };
    let mut c = config(&tb);
    c.ready_timeout = 30.0;
    let sp = Spawner::new(c).unwrap();
    let user = tb.alice().name.clone();
    let t0 = Instant::now();
    let cmd: Vec<String> = [
        "/bin/sh",
        "-c",
        "sleep 0.5; printf '\\033[2J\\342\\200\\256gpj.exe\\n' >&2; echo 'ModuleNotFoundError: No module named jupyterhub' >&2; exit 1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = sp
        .spawn(
            &request(&user),
            env_for(&user, vec![]),
            &cmd,
            &Progress::new(),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ServerExited { .. }), "{msg}");
    assert!(
        msg.contains("status 1") && msg.contains("ModuleNotFoundError"),
        "{msg}"
    );
    // What the log holds to clear a terminal or reorder text is shown inert.
    assert!(msg.contains("?[2J?gpj.exe"), "{msg:?}");
    // The exit ended the wait for the port, not the 30 s bound.
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn forged_state_never_signals_someone_elses_process() {
    let Some(tb) = testbed("forged_state_never_signals_someone_elses_process") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let (state, _stop_on_panic) = started(
        &sp,
        &request(&user),
        env_for(&user, vec![]),
        &sleep_cmd(1400),
    )
    .await;
    // Another run's state whose pid is now this server (another start time):
    // a reused pid, or a forged state.
    let mut forged = state.clone();
    forged.start_time = Some(state.start_time.unwrap() + 1);
    forged.run_id = "f0f0f0f0f0f0f0f0".into();
    forged.dir = format!("{}/f0f0f0f0f0f0f0f0", state.dir.rsplit_once('/').unwrap().0);
    match sp.poll(&forged).await {
        PollOutcome::Exited {
            reason: ExitReason::PidReused,
            ..
        } => {}
        other => panic!("expected PidReused, got {other:?}"),
    }
    assert_eq!(sp.stop(&forged).await.unwrap(), Stopped::AlreadyGone);
    assert!(
        matches!(sp.poll(&state).await, PollOutcome::Running),
        "the real server was signalled"
    );
    // Bob's state pointing at alice's process: bob's login cannot touch it.
    let mut stolen = state.clone();
    stolen.remote_user = tb.bob().name.clone();
    stolen.username = tb.bob().name.clone();
    // Its directory is under alice's home, not bob's: bob's login refuses it.
    let err = sp.stop(&stolen).await.expect_err("another home is refused");
    assert!(err.to_string().contains("refusing"), "{err}");
    // Alice's state naming bob's login: refused before any exec.
    let mut other_login = state.clone();
    other_login.remote_user = tb.bob().name.clone();
    let err = sp
        .stop(&other_login)
        .await
        .expect_err("a state naming another login is refused");
    assert!(err.to_string().contains("refusing to act on it"), "{err}");
    // Alice's state edited to name bob's running process (pid, group, start
    // time, uid): alice's login sees it is not hers and never signals it.
    let bob = tb.bob().name.clone();
    let (bobs, _stop_bobs_on_panic) =
        started(&sp, &request(&bob), env_for(&bob, vec![]), &sleep_cmd(1401)).await;
    let mut pointed = state.clone();
    pointed.pid = bobs.pid;
    pointed.pgid = bobs.pgid;
    pointed.start_time = bobs.start_time;
    pointed.uid = bobs.uid;
    assert!(matches!(
        sp.poll(&pointed).await,
        PollOutcome::Exited {
            reason: ExitReason::PidReused,
            ..
        }
    ));
    let mut pointed_elsewhere = pointed.clone();
    pointed_elsewhere.dir = format!("{}/f1f1f1f1f1f1f1f1", state.dir.rsplit_once('/').unwrap().0);
    pointed_elsewhere.run_id = "f1f1f1f1f1f1f1f1".into();
    assert_eq!(
        sp.stop(&pointed_elsewhere).await.unwrap(),
        Stopped::AlreadyGone
    );
    assert!(
        matches!(sp.poll(&bobs).await, PollOutcome::Running),
        "alice's forged state signalled bob's server"
    );
    sp.stop(&bobs).await.unwrap();
    std::fs::remove_dir_all(&bobs.dir).unwrap();
    assert!(
        matches!(sp.poll(&state).await, PollOutcome::Running),
        "another user's stop hit the server"
    );
    sp.stop(&state).await.unwrap();
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn stop_removes_only_a_server_directory_under_the_logins_home() {
    let Some(tb) = testbed("stop_removes_only_a_server_directory_under_the_logins_home") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let alice = tb.alice().clone();
    let user = alice.name.clone();
    let host = &tb.hosts[0];
    let base = ServerState {
        version: state::STATE_VERSION,
        username: user.clone(),
        server_name: String::new(),
        host: host.name.clone(),
        address: host.address.clone(),
        ssh_port: host.port,
        remote_user: user.clone(),
        port: 20001,
        run_id: "precious".into(),
        dir: alice.home.display().to_string(),
        pid: None,
        pgid: None,
        start_time: None,
        uid: None,
        boot_id: None,
        enforcement: None,
        tunnel_port: None,
        hub_forward_port: None,
        hub_forward_to: None,
        gpus: Vec::new(),
        extra: Default::default(),
    };
    // A directory alice owns that no stop may remove: her home itself, and a
    // look-alike `.jupyterhub-ssh/RUN` outside her home.
    let scratch = Scratch::new("decoy");
    let decoy = scratch.0.display().to_string();
    let lookalike = format!("{decoy}/.jupyterhub-ssh/precious");
    std::fs::create_dir_all(&lookalike).unwrap();
    std::fs::write(format!("{lookalike}/keep"), "x").unwrap();
    let chown = |p: &str| {
        let ok = std::process::Command::new("chown")
            .args(["-R", &format!("{}", alice.uid), p])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    chown(&decoy);
    let marker = alice.home.join(format!("precious-{}", rand_suffix()));
    std::fs::write(&marker, "x").unwrap();
    chown(&marker.display().to_string());
    let launched = |mut s: ServerState| {
        // As if launched: a pid of nothing (stop finds it gone, then cleans up).
        s.pid = Some(4_000_000);
        s.pgid = Some(4_000_000);
        s.start_time = Some(1);
        s.uid = Some(alice.uid);
        s.boot_id = Some("00000000-0000-0000-0000-000000000000".into());
        s
    };
    // dir = HOME, run id = its last part: refused before any exec.
    let mut home = base.clone();
    home.run_id = alice.home.file_name().unwrap().to_string_lossy().into();
    home.dir = alice.home.display().to_string();
    assert!(
        home.validate().is_ok(),
        "the testbed's alice has a home like /home/alice"
    );
    for s in [home.clone(), launched(home.clone())] {
        let err = sp.stop(&s).await.expect_err("a home directory is refused");
        assert!(err.to_string().contains("refusing"), "{err}");
    }
    // Shaped right but not under her home: the host refuses it.
    let mut outside = base.clone();
    outside.dir = lookalike.clone();
    for s in [outside.clone(), launched(outside.clone())] {
        let err = sp
            .stop(&s)
            .await
            .expect_err("a directory outside the home is refused");
        assert!(err.to_string().contains("refusing"), "{err}");
        assert!(
            std::path::Path::new(&format!("{lookalike}/keep")).exists(),
            "stop removed {lookalike}"
        );
    }
    assert!(marker.exists(), "stop removed alice's home");
    std::fs::remove_file(&marker).unwrap();
}

#[tokio::test]
async fn an_old_pid_file_never_makes_stop_signal_another_program() {
    let Some(tb) = testbed("an_old_pid_file_never_makes_stop_signal_another_program") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let host = tb.hosts[0].name.clone();
    // A state saved before launch reported the pid (a cancelled start), whose
    // directory holds a pid file naming another program of the same login:
    // the server exited long ago and its pid was reused.
    let prepared = sp
        .prepare(
            &SpawnRequest {
                host: Some(host.clone()),
                ..request(&user)
            },
            &Progress::new(),
        )
        .await
        .unwrap();
    let state = prepared.state.clone();
    let other = remote(
        &sp,
        &tb,
        &host,
        &user,
        "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    let other: u32 = other.trim().parse().unwrap();
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
    };
    assert!(alive(other));
    remote(
        &sp,
        &tb,
        &host,
        &user,
        &format!(
            "umask 077; mkdir -p {d} && echo {other} >{d}/pid",
            d = state.dir
        ),
    )
    .await;
    assert!(
        sp.adopt(&state).await.unwrap().is_none(),
        "adopted a stranger"
    );
    assert!(matches!(sp.poll(&state).await, PollOutcome::Exited { .. }));
    assert_eq!(sp.stop(&state).await.unwrap(), Stopped::AlreadyGone);
    let survived = alive(other);
    let _ = std::process::Command::new("kill")
        .arg(other.to_string())
        .status();
    assert!(survived, "stop signalled another program of the login");
    assert!(
        !std::path::Path::new(&state.dir).exists(),
        "the directory stays"
    );
    // The real thing is still adopted: a launched server whose pid never
    // reached the state.
    let (launched, _stop_launched_on_panic) = started(
        &sp,
        &request(&user),
        env_for(&user, vec![]),
        &sleep_cmd(1402),
    )
    .await;
    let mut unsaved = launched.clone();
    (unsaved.pid, unsaved.pgid, unsaved.start_time) = (None, None, None);
    (unsaved.uid, unsaved.boot_id) = (None, None);
    let adopted = sp.adopt(&unsaved).await.unwrap().expect("adopted");
    assert_eq!(adopted, launched);
    assert!(matches!(
        sp.stop(&unsaved).await.unwrap(),
        Stopped::Killed { .. }
    ));
    assert!(!alive(launched.pid.unwrap()));
}

#[tokio::test]
async fn a_poll_does_not_wait_for_the_polls_that_arrive_after_it() {
    let Some(tb) = testbed("a_poll_does_not_wait_for_the_polls_that_arrive_after_it") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let (state, _stop_on_panic) = started(
        &sp,
        &SpawnRequest {
            host: Some(tb.hosts[1].name.clone()),
            ..request(&user)
        },
        env_for(&user, vec![]),
        &sleep_cmd(1403),
    )
    .await;
    // This poll starts the batch; a steady stream of polls of the same host
    // keeps arriving after it until it has its answer (or 30 s pass).
    let first = {
        let (sp, state) = (sp.clone(), state.clone());
        tokio::spawn(async move { sp.poll(&state).await })
    };
    let storm_on = Arc::new(AtomicBool::new(true));
    let mut storm = Vec::new();
    for i in 0..8 {
        // Other servers of the same login (one poll batch holds a run once).
        let mut state = state.clone();
        state.run_id = format!("5707e{i:011x}");
        state.dir = format!("{}/{}", state.dir.rsplit_once('/').unwrap().0, state.run_id);
        let (sp, on) = (sp.clone(), storm_on.clone());
        storm.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(30);
            while on.load(Ordering::Relaxed) && Instant::now() < until {
                sp.poll(&state).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !first.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered_during_the_storm = first.is_finished() && storm.iter().any(|t| !t.is_finished());
    storm_on.store(false, Ordering::Relaxed);
    for t in storm {
        t.await.unwrap();
    }
    assert!(
        answered_during_the_storm,
        "the first poll waited for every poll that came after it"
    );
    assert!(matches!(first.await.unwrap(), PollOutcome::Running));
    sp.stop(&state).await.unwrap();
    let _ = std::fs::remove_dir_all(&state.dir);
}

#[tokio::test]
async fn the_same_server_polled_twice_at_once_is_running_for_both() {
    let Some(tb) = testbed("the_same_server_polled_twice_at_once_is_running_for_both") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let (state, _stop_on_panic) = started(
        &sp,
        &SpawnRequest {
            host: Some(tb.hosts[2].name.clone()),
            ..request(&user)
        },
        env_for(&user, vec![]),
        &sleep_cmd(1409),
    )
    .await;
    // Polls started together queue in one batch per host: the same run
    // twice (or more) in it gets one answer for all, not "no answer".
    let polls: Vec<_> = (0..4)
        .map(|_| {
            let (sp, state) = (sp.clone(), state.clone());
            tokio::spawn(async move { sp.poll(&state).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for p in polls {
        outcomes.push(p.await.unwrap());
    }
    let stopped = sp.stop(&state).await;
    let _ = std::fs::remove_dir_all(&state.dir);
    for o in &outcomes {
        assert!(matches!(o, PollOutcome::Running), "{outcomes:?}");
    }
    stopped.unwrap();
}

#[tokio::test]
async fn starts_at_once_never_share_a_port() {
    let Some(tb) = testbed("starts_at_once_never_share_a_port") else {
        return;
    };
    // 40 ports for 40 prepares on one host, all at once, each reading the
    // host's facts itself (no cache): a pick from the facts alone would
    // almost surely hand out some port twice.
    let mut cfg = config(&tb);
    cfg.port_range = ssh_spawner::plan::ports::PortRange {
        start: 21000,
        end: 21039,
    };
    cfg.hosts.truncate(1);
    let sp = Spawner::new(cfg).unwrap();
    let user = tb.alice().name.clone();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (sp, user) = (sp.clone(), user.clone());
            tokio::spawn(async move { sp.prepare(&request(&user), &Progress::new()).await })
        })
        .collect();
    let mut ports = BTreeSet::new();
    for t in tasks {
        let prepared = t.await.unwrap().expect("prepare");
        assert!(
            ports.insert(prepared.state.port),
            "port {} handed out twice",
            prepared.state.port
        );
    }
    assert_eq!(ports.len(), 40);
    // Every port is claimed now: the next start is told so, plainly.
    let err = sp
        .prepare(&request(&user), &Progress::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no free port"), "{err}");
}

#[tokio::test]
async fn many_polls_on_one_host_share_an_exec() {
    let Some(tb) = testbed("many_polls_on_one_host_share_an_exec") else {
        return;
    };
    let mut c = config(&tb);
    c.hosts.retain(|h| h.name.as_deref() == Some("node3"));
    let sp = Spawner::new(c).unwrap();
    let user = tb.bob().name.clone();
    let mut states = Vec::new();
    for _ in 0..20 {
        states.push(
            sp.spawn(
                &request(&user),
                env_for(&user, vec![]),
                &sleep_cmd(1500),
                &Progress::new(),
            )
            .await
            .unwrap(),
        );
    }
    let ports: BTreeSet<u16> = states.iter().map(|s| s.port).collect();
    assert_eq!(ports.len(), 20, "two servers share a port");
    let before = sp.poll_execs();
    let polls = states.iter().map(|s| {
        let sp = sp.clone();
        let s = s.clone();
        tokio::spawn(async move { sp.poll(&s).await })
    });
    for p in polls.collect::<Vec<_>>() {
        assert!(matches!(p.await.unwrap(), PollOutcome::Running));
    }
    let execs = sp.poll_execs() - before;
    assert!(execs <= 3, "20 polls took {execs} execs");
    for s in &states {
        sp.stop(s).await.unwrap();
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}

#[tokio::test]
async fn certificates_are_private_and_removed_on_stop() {
    let Some(tb) = testbed("certificates_are_private_and_removed_on_stop") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let progress = Progress::new();
    let prepared = sp.prepare(&request(&user), &progress).await.unwrap();
    let alt = prepared.alt_names();
    assert!(
        alt.contains(&format!("IP:{}", prepared.state.address)),
        "{alt:?}"
    );
    assert!(
        alt.contains(&format!("DNS:{}", prepared.state.host)),
        "{alt:?}"
    );
    let paths = sp
        .upload_certs(
            &prepared,
            b"KEY".to_vec(),
            b"CERT".to_vec(),
            b"CA".to_vec(),
            &progress,
        )
        .await
        .unwrap();
    for p in [&paths.keyfile, &paths.certfile, &paths.cafile] {
        assert!(p.starts_with(&prepared.state.dir), "{p}");
        assert_eq!(mode_of(std::path::Path::new(p)), 0o600, "{p}");
    }
    assert_eq!(std::fs::read(&paths.keyfile).unwrap(), b"KEY");
    let env = env_for(&user, vec![]);
    let state = sp
        .launch(
            &prepared,
            &env(&prepared.state),
            &sleep_cmd(1600),
            &progress,
        )
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    sp.stop(&state).await.unwrap();
    for p in [&paths.keyfile, &paths.certfile, &paths.cafile] {
        assert!(!std::path::Path::new(p).exists(), "{p} left after stop");
    }
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn memory_limits_are_enforced_and_reported() {
    let Some(tb) = testbed("memory_limits_are_enforced_and_reported") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.bob().name.clone();
    let mut req = request(&user);
    req.limits = Limits {
        mem: Some(768 << 20),
        cpu: Some(1.0),
    };
    let progress = Progress::new();
    let state = sp
        .spawn(&req, env_for(&user, vec![]), &sleep_cmd(1700), &progress)
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    let enforcement = state.enforcement.clone().unwrap();
    // The testbed has no systemd user manager: prlimit, and CPU says so.
    assert!(
        enforcement.contains("prlimit") && enforcement.contains("CPU limit not enforced"),
        "{enforcement}"
    );
    assert!(progress
        .snapshot(0)
        .iter()
        .any(|e| e.message.contains("prlimit")));
    // The pid is known before the wrapper's exec chain (prlimit, env) has
    // reached the server; read the limits once it has (bounded).
    let pid = state.pid.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"sleep")) {
        assert!(Instant::now() < deadline, "the server never exec'd sleep");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap();
    assert!(line.contains(&(768u64 << 20).to_string()), "{line}");
    sp.stop(&state).await.unwrap();
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn no_host_fits_names_every_host() {
    let Some(tb) = testbed("no_host_fits_names_every_host") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let mut req = request(&tb.alice().name);
    req.requirements = Requirements {
        mem_guarantee: Some(1 << 50),
        cpu_guarantee: None,
        gpus: 0,
    };
    let err = sp.prepare(&req, &Progress::new()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("no host has 1024T free:"), "{msg}");
    for h in &tb.hosts {
        assert!(msg.contains(&format!("{}: ", h.name)), "{msg}");
    }
}

#[tokio::test]
async fn facts_of_hosts_without_nvidia_smi_say_no_gpus_and_every_other_figure() {
    let Some(tb) = testbed("facts_of_hosts_without_nvidia_smi_say_no_gpus_and_every_other_figure")
    else {
        return;
    };
    // The bed's hosts have no nvidia-smi unless `scripts/testbed gpus` gave
    // them the stand-in; after `up` none has.
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice();
    let target = tb.target("node1", &user.name);
    // The script says so (a report without the line parses the same way).
    let out = tb
        .pool()
        .exec(
            &target,
            &ssh_spawner::ssh::Command::new("/bin/sh -s").stdin(facts_script(None)),
        )
        .await
        .unwrap()
        .check(&target)
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l == "nvidia_smi=none"), "{text}");
    assert!(!text.contains("\ngpu="), "{text}");
    let f = sp.host_facts(&target, None).await.unwrap();
    assert_eq!(f.gpus, GpuFacts::None);
    assert_eq!(f.hostname, "node1");
    assert_eq!(
        (f.home.as_str(), f.uid),
        (user.home.to_str().unwrap(), user.uid)
    );
    assert!(
        f.cpus > 0 && f.mem_total > 0 && f.mem_available > 0,
        "{f:?}"
    );
    assert!(!f.boot_id.is_empty() && f.default_signal.is_some(), "{f:?}");
    assert!(f.listening.contains(&22), "{f:?}");
    // check: every host reached, no GPU figures, no GPU error.
    let rows = sp.check(&user.name).await.unwrap();
    assert_eq!(rows.len(), tb.hosts.len());
    for r in &rows {
        assert!(r.reachable && r.mem_available.is_some(), "{r:?}");
        assert_eq!((&r.gpus, &r.gpu_error), (&None, &None), "{r:?}");
    }
}

#[tokio::test]
async fn over_real_sshd_facts_and_check_read_gpus_from_the_stand_in_nvidia_smi() {
    let Some(tb) = testbed("over_real_sshd_facts_and_check_read_gpus_from_the_stand_in_nvidia_smi")
    else {
        return;
    };
    // The bed's sshds are left as they are: an sshd of this test's gives its
    // sessions a PATH with the stand-in first, as `scripts/testbed gpus`
    // sets a host up, reading the set from a file this test rewrites.
    let scratch = Scratch::new("gpus");
    let path = common::standin_nvidia_smi(&scratch, &["a100x4-one-busy", "fails-driver"]);
    let sshd = common::OwnSshd::start(&tb, &[("SetEnv", &path)]);
    let (mut c, host) = with_own_sshd(&tb, &sshd, &scratch, "gpu1");
    c.hosts = vec![host];
    c.command = vec![tb
        .venv
        .join("bin/jupyterhub-singleuser")
        .display()
        .to_string()];
    let sp = Spawner::new(c).unwrap();
    let user = tb.alice().name.clone();
    let rows = sp.check(&user).await.unwrap();
    let r = &rows[0];
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.gpu_column(), "3/4 free", "{r:?}");
    assert_eq!(
        r.gpu_line().unwrap(),
        "gpu1: GPUs: 4 × NVIDIA A100-SXM4-40GB, 3 free; GPU 2 busy: pid 31337 uses 20480 MiB"
    );
    // The driver goes away: check says why and fails, every other figure
    // is still read.
    std::fs::write(scratch.path("selected"), "fails-driver\n").unwrap();
    let rows = sp.check(&user).await.unwrap();
    let r = &rows[0];
    assert_eq!(r.gpu_column(), "FAILED", "{r:?}");
    assert!(
        r.gpu_line().unwrap().starts_with(
            "gpu1: GPUs: nvidia-smi --query-gpu exited with status 9: NVIDIA-SMI has failed"
        ),
        "{r:?}"
    );
    assert!(!r.ok(), "{r:?}");
    assert!(r.error.is_none() && r.command_found == Some(true), "{r:?}");
    assert!(r.mem_available.is_some() && r.servers.is_some() && r.load1.is_some());
}

#[tokio::test]
async fn the_cli_runs_the_whole_lifecycle() {
    let Some(tb) = testbed("the_cli_runs_the_whole_lifecycle") else {
        return;
    };
    let scratch = common::Scratch::new("cli");
    let cfg = scratch.path("spawner.toml");
    std::fs::write(&cfg, toml::to_string(&config(&tb)).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_ssh-spawner");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let user = tb.bob().name.clone();
    // The default command is not on the test users' PATH: check says so and fails.
    let (code, out, err) = run(&["check", "--user", &user]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(out.matches("MISSING").count(), tb.hosts.len(), "{out}");
    // With the venv's command configured, every host passes.
    let mut c = config(&tb);
    c.command = vec![tb
        .venv
        .join("bin/jupyterhub-singleuser")
        .display()
        .to_string()];
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let (code, out, err) = run(&["check", "--user", &user]);
    assert_eq!(code, Some(0), "{out}{err}");
    println!("{out}");
    for h in &tb.hosts {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&h.name) && l.contains(" yes ") && l.contains(" ok ")),
            "{out}"
        );
        // No nvidia-smi on the bed's hosts: GPUS says none, and no GPU line.
        assert!(
            out.lines()
                .any(|l| l.starts_with(&h.name) && l.contains(" none ")),
            "{out}"
        );
        assert!(!out.contains(&format!("{}: GPUs:", h.name)), "{out}");
    }
    // No host here has a systemd user manager: check says how limits would
    // be enforced instead, and what the admin does to get systemd.
    for h in &tb.hosts {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&h.name) && l.trim_end().ends_with(" prlimit")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "{}: limits: no systemd user manager answers for {user}",
                h.name
            )),
            "{out}"
        );
    }
    assert!(
        out.contains(&format!("`loginctl enable-linger {user}`")),
        "{out}"
    );
    let mocksu = mocksu(&tb);
    let mut args = vec!["--json", "spawn", "--user", &user, "--"];
    args.extend(mocksu.iter().map(|s| s.as_str()));
    let (code, out, err) = run(&args);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("chosen"), "{err}");
    let state: ServerState = serde_json::from_str(&out).unwrap();
    let state_file = scratch.path("state.json");
    std::fs::write(&state_file, &out).unwrap();
    let at = format!("@{}", state_file.display());
    http_get(&state.address, state.port, &format!("/user/{user}/")).await;
    assert_eq!(run(&["poll", &at]).0, Some(0));
    let (code, out, _) = run(&["list", "--user", &user]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&state.run_id), "{out}");
    let (code, out, err) = run(&["stop", &at]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(run(&["poll", &at]).0, Some(3));
    // A bad state is a clear error, exit 1.
    let (code, _, err) = run(&["poll", "{not json"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("server state"), "{err}");
    std::fs::remove_dir_all(&state.dir).unwrap();
}

#[tokio::test]
async fn failover_when_a_host_is_cut() {
    let Some(tb) = testbed("failover_when_a_host_is_cut") else {
        return;
    };
    // node2 then node3, round robin, facts cached long: the spawner still
    // believes node2 is fine when it is cut, so it is the launch that fails over.
    let mut c = config(&tb);
    c.hosts.retain(|h| h.name.as_deref() != Some("node1"));
    c.host_selection = Strategy::RoundRobin;
    c.facts_cache = 600.0;
    c.command_timeout = 3.0;
    let state_dir = format!(".jupyterhub-ssh-failover-{}", rand_suffix());
    c.state_dir = format!("~/{state_dir}");
    let sp = Spawner::new(c).unwrap();
    let user = tb.alice().name.clone();
    let progress = Progress::new();
    assert_eq!(
        sp.prepare(&request(&user), &progress)
            .await
            .unwrap()
            .state
            .host,
        "node2"
    );
    assert_eq!(
        sp.prepare(&request(&user), &progress)
            .await
            .unwrap()
            .state
            .host,
        "node3"
    );
    let undo = Undo {
        testbed: &tb,
        action: "heal",
        host: "node2".into(),
    };
    tb.fault("cut", "node2");
    let started = Instant::now();
    let state = sp
        .spawn(
            &request(&user),
            env_for(&user, vec![]),
            &mocksu(&tb),
            &progress,
        )
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    assert_eq!(state.host, "node3");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(progress
        .snapshot(0)
        .iter()
        .any(|e| e.message.contains("node2 did not answer")));
    http_get(&state.address, state.port, &format!("/user/{user}/")).await;
    drop(undo);
    // Healed: nothing of the attempt on node2 is left, on any host (they
    // share the file system and the process table): one run directory, and
    // only the live server's processes carry this state dir in their argv.
    let base = tb.alice().home.join(&state_dir);
    let dirs: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs, vec![std::path::PathBuf::from(&state.dir)]);
    let pgid = state.pgid.unwrap().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&state_dir) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let pgrp = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(2))
                .unwrap_or("");
            assert_eq!(
                pgrp,
                pgid,
                "left behind: {}",
                String::from_utf8_lossy(&cmdline)
            );
        }
    }
    sp.stop(&state).await.unwrap();
    std::fs::remove_dir_all(&base).unwrap();
}

#[tokio::test]
async fn form_host_figures_are_read_once_while_fresh() {
    let Some(tb) = testbed("form_host_figures_are_read_once_while_fresh") else {
        return;
    };
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let (fresh, wait) = (Duration::from_secs(60), Duration::from_secs(10));
    // Sixty spawn pages opened at once.
    let pages: Vec<_> = (0..60)
        .map(|_| {
            let (sp, user) = (sp.clone(), user.clone());
            tokio::spawn(async move { sp.host_status(&user, &[], fresh, wait).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for p in pages {
        seen.push(p.await.unwrap());
    }
    let first = seen[0].clone();
    assert_eq!(first.len(), tb.hosts.len());
    assert!(first.iter().all(|(_, s)| s.is_ok()), "{first:?}");
    assert!(
        seen.iter().all(|s| *s == first),
        "pages opened together saw different reads"
    );
    // A new server on the hosts (they share the process table): a page
    // opened while the figures are fresh still shows the shared read, one
    // that asks for fresh figures counts it.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // (The argv of a wrapper: `/bin/sh -c CODE MARKER DIR ARGV...`.)
    let _marker = KillOnDrop(
        std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "sleep 60; :",
                &format!("ssh-spawner-run:form-{}", rand_suffix()),
                "/nonexistent/form",
                "sleep",
            ])
            .spawn()
            .unwrap(),
    );
    type Status = Vec<(String, std::result::Result<HostFacts, String>)>;
    let servers =
        |s: &Status| -> Vec<usize> { s.iter().map(|(_, f)| f.as_ref().unwrap().servers).collect() };
    let cached = sp.host_status(&user, &[], fresh, wait).await.unwrap();
    assert_eq!(
        servers(&cached),
        servers(&first),
        "a fresh read was not shared"
    );
    // A read anew counts every server on the hosts, the new one included.
    // Other tests of this binary start and stop servers meanwhile (the
    // hosts share this machine's process table), so compare with what the
    // facts script counts here just before and just after the read, and
    // retry (bounded) until nothing changed around it.
    let count_here = || -> usize {
        use std::io::Write;
        let mut sh = std::process::Command::new("/bin/sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sh.stdin
            .take()
            .unwrap()
            .write_all(ssh_spawner::plan::hosts::facts_script(None).as_bytes())
            .unwrap();
        let out = sh.wait_with_output().unwrap();
        ssh_spawner::plan::hosts::parse_facts(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .servers
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = count_here();
        let reread = sp
            .host_status(&user, &[], Duration::ZERO, wait)
            .await
            .unwrap();
        if before == count_here() {
            assert!(before >= 1, "the marker process is not counted here");
            assert_eq!(
                servers(&reread),
                vec![before; tb.hosts.len()],
                "a read anew does not count the servers running now"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "servers kept starting and stopping for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Monday, 9 a.m., one host crashed: its packets are dropped (an sshd of its
/// own on node1, blackholed by port). A rush of starts from two users waits
/// for it once, not once per user in turn: every choice is made among the
/// hosts that answer well before the connect timeout, the dead host is
/// asked once per user and then marked down for everyone, and the next
/// starts, the options form and a start pinned to it say so without asking
/// it. An authentication failure marks nothing down. Healed, the background
/// probe brings it back within a few seconds, and it takes servers again.
#[tokio::test]
async fn a_dead_host_costs_a_rush_one_connect_timeout_and_returns_as_soon_as_it_answers() {
    let Some(tb) =
        testbed("a_dead_host_costs_a_rush_one_connect_timeout_and_returns_as_soon_as_it_answers")
    else {
        return;
    };
    let sshd = common::OwnSshd::start(&tb, &[]);
    let scratch = Scratch::new("deadhost");
    let (mut c, dead) = with_own_sshd(&tb, &sshd, &scratch, "dead");
    // The connect timeout is long, so that waiting for the dead host could
    // not hide in the margins of a busy machine.
    c.connect_timeout = 20.0;
    c.facts_cache = 5.0;
    c.hosts.retain(|h| h.name.as_deref() != Some("node1"));
    c.hosts.push(dead);
    let label = format!("{}:{}", sshd.address, sshd.port);
    let sp = Spawner::new(c).unwrap();
    let users = [tb.alice().name.clone(), tb.bob().name.clone()];
    let attempts = || {
        ssh_spawner::metrics::snapshot()
            .ssh_connect_attempts
            .iter()
            .find(|(h, _)| *h == label)
            .map_or(0, |(_, n)| *n)
    };
    let rush = |n: usize| {
        let sp = sp.clone();
        let users = users.clone();
        async move {
            let t0 = Instant::now();
            let all = (0..n).map(|i| {
                let (sp, user) = (sp.clone(), users[i % 2].clone());
                tokio::spawn(async move {
                    let progress = Progress::new();
                    let mut req = request(&user);
                    req.server_name = format!("r{i}");
                    let p = sp.prepare(&req, &progress).await;
                    (p, progress.snapshot(0), t0.elapsed())
                })
            });
            let mut out = Vec::new();
            for j in all.collect::<Vec<_>>() {
                out.push(j.await.unwrap());
            }
            out
        }
    };

    sshd.blackhole();
    let first = rush(12).await;
    for (p, events, took) in &first {
        let p = p.as_ref().unwrap_or_else(|e| panic!("{e}: {events:?}"));
        assert_ne!(p.state.host, "dead", "{events:?}");
        // Chosen among the hosts that answered: not after the 20 s timeout.
        assert!(*took < Duration::from_secs(12), "{took:?}: {events:?}");
    }
    println!(
        "DEAD_HOST first rush: slowest choice {:?}",
        first.iter().map(|r| r.2).max().unwrap()
    );
    // The reads not waited for end with the timeout and mark it down.
    let down = common::until_true(Duration::from_secs(40), || {
        !sp.pool().health().status(&label).takes_servers()
    })
    .await;
    assert!(down, "never marked down");
    // One read per user was under way when the first timed out; the
    // second ends with its own timeout a moment later.
    common::until_true(Duration::from_secs(10), || attempts() >= 2).await;
    let asked = attempts();
    assert_eq!(
        asked, 2,
        "the dead host was asked {asked} times for 12 starts of 2 users"
    );

    // Every later start, any user: not asked again, and told why.
    let second = rush(6).await;
    for (p, events, took) in &second {
        assert!(p.is_ok(), "{p:?}");
        assert!(*took < Duration::from_secs(10), "{took:?}");
        let said: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert!(
            said.iter()
                .any(|m| m.contains("not asking dead is down since") && m.contains("UTC")),
            "{said:?}"
        );
    }
    assert_eq!(attempts(), asked, "a start asked the host marked down");
    // Pinned to it: refused at once, with since when.
    let mut pinned = request(&users[0]);
    pinned.host = Some("dead".into());
    let t0 = Instant::now();
    let err = sp.prepare(&pinned, &Progress::new()).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("dead: down since"), "{err}");
    // The options form says so too, without asking it.
    let rows = sp
        .host_status(&users[1], &[], Duration::ZERO, Duration::from_secs(5))
        .await
        .unwrap();
    let (_, row) = rows.iter().find(|(n, _)| n == "dead").unwrap();
    assert!(
        row.as_ref().unwrap_err().starts_with("down since"),
        "{row:?}"
    );
    assert_eq!(attempts(), asked);
    // A login refused is about the user, not the host: nothing is marked.
    let node2 = tb.host("node2");
    let stranger = ssh_spawner::ssh::Target::new(
        &node2.address,
        &users[0],
        ssh_spawner::ssh::Identity::KeyFile(tb.stranger_key.clone()),
    )
    .port(node2.port);
    let refused = sp
        .pool()
        .exec(&stranger, &ssh_spawner::ssh::Command::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::AuthRefused { .. }), "{refused}");
    assert!(sp
        .pool()
        .health()
        .status(&stranger.host_label())
        .takes_servers());

    // Healed: the background probe finds it within a few seconds (probes
    // are 2 s apart; a blackholed one waits out its 20 s, so allow that).
    sshd.heal();
    let t0 = Instant::now();
    let back = common::until_true(Duration::from_secs(45), || {
        sp.pool().health().status(&label).takes_servers()
    })
    .await;
    assert!(back, "never back: {:?}", sp.pool().health().status(&label));
    println!("DEAD_HOST back {:?} after the heal", t0.elapsed());
    let probes = ssh_spawner::metrics::snapshot().host_probes;
    assert!(
        probes
            .iter()
            .any(|(h, o, n)| *h == label && o == "answered" && *n >= 1),
        "{probes:?}"
    );
    let p = sp
        .prepare(&pinned, &Progress::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.state.host, "dead");
    sp.pool().close_all().await;
}

/// The admin drains a host that runs a server (`drain = true`, taking
/// effect as after a hub restart: a new spawner with the new
/// configuration). New spawns go to the other hosts, asking nothing of the
/// drained one; one pinned to it is refused saying why. The server already
/// there is still polled running, and stops cleanly.
#[tokio::test]
async fn a_draining_host_takes_no_new_server_and_its_running_one_stops_cleanly() {
    let Some(tb) = testbed("a_draining_host_takes_no_new_server_and_its_running_one_stops_cleanly")
    else {
        return;
    };
    let alice = tb.alice().name.clone();
    let before = Spawner::new(config(&tb)).unwrap();
    let mut pinned = request(&alice);
    pinned.host = Some("node1".into());
    let (state, _guard) =
        started(&before, &pinned, env_for(&alice, vec![]), &sleep_cmd(3001)).await;
    assert_eq!(state.host, "node1");

    let mut c = config(&tb);
    c.hosts
        .iter_mut()
        .find(|h| h.display_name() == "node1")
        .unwrap()
        .drain = true;
    let sp = Spawner::new(c).unwrap();
    for _ in 0..4 {
        let progress = Progress::new();
        let (s, _g) = {
            let s = sp
                .spawn(
                    &request(&alice),
                    env_for(&alice, vec![]),
                    &sleep_cmd(3002),
                    &progress,
                )
                .await
                .unwrap();
            let g = common::StopOnPanic::new(&sp, &s);
            (s, g)
        };
        assert_ne!(s.host, "node1", "a new server went to the draining host");
        let said = common::messages(&progress);
        assert!(
            said.iter()
                .any(|m| m.contains("not asking node1 is draining (no new servers")),
            "{said:?}"
        );
        sp.stop(&s).await.unwrap();
    }
    let err = sp
        .prepare(&pinned, &Progress::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node1, the host you chose, cannot take the server now")
            && err.contains("draining (no new servers"),
        "{err}"
    );
    // The server on it is still the spawner's to poll and to stop.
    assert!(matches!(sp.poll(&state).await, PollOutcome::Running));
    assert!(matches!(
        sp.stop(&state).await.unwrap(),
        Stopped::Killed { .. }
    ));
    assert!(matches!(sp.poll(&state).await, PollOutcome::Exited { .. }));
}

/// `ssh-spawner spawn` whose only host stops answering while the server
/// starts (its packets dropped during the prologue): the server does start
/// there. The CLI waits, bounded, for the clean-up of that abandoned start,
/// and as the host still does not answer it prints the state, which `stop`
/// takes once the host answers again: nothing of the run is left running.
#[tokio::test]
async fn a_cli_spawn_cut_off_mid_launch_prints_the_state_that_stops_what_it_started() {
    let Some(tb) =
        testbed("a_cli_spawn_cut_off_mid_launch_prints_the_state_that_stops_what_it_started")
    else {
        return;
    };
    let sshd = common::OwnSshd::start(&tb, &[]);
    let scratch = Scratch::new("cli-cut");
    let (mut c, mut host) = with_own_sshd(&tb, &sshd, &scratch, "cut");
    c.connect_timeout = 2.0;
    c.command_timeout = 4.0;
    c.stop_grace = 1.0;
    // A state directory of its own: its first run directory is this spawn's.
    let state_dir = format!(".jupyterhub-ssh-cli-cut-{}", rand_suffix());
    c.state_dir = format!("~/{state_dir}");
    // Time for the test to cut the host once the launch script runs there
    // (a length no other test sleeps, to find the process by).
    let pause = format!("3.{:03}", rand::random::<u16>() % 1000);
    host.prologue = vec![format!("sleep {pause}")];
    c.hosts = vec![host];
    let cfg = scratch.path("spawner.toml");
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_ssh-spawner");
    let user = tb.alice().name.clone();
    let marker = (40_000 + rand::random::<u16>() % 20_000).to_string();
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .args(["spawn", "--user", &user, "--", "sleep", &marker])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push(line);
        }
        seen
    });
    // The whole launch script has arrived once its prologue runs (the
    // testbed's hosts share this machine's process table).
    let began = || process_running(format!("sleep\0{pause}\0").as_bytes());
    assert!(
        common::until_true(Duration::from_secs(20), began).await,
        "the launch never began"
    );
    let runs = std::path::Path::new("/home").join(&user).join(&state_dir);
    sshd.blackhole();
    let status = child.wait().unwrap();
    let said = lines.join().unwrap();
    assert_eq!(status.code(), Some(1), "{said:#?}");
    let stop_line = said
        .iter()
        .find(|l| l.contains("run: ssh-spawner stop '"))
        .unwrap_or_else(|| panic!("no state printed: {said:#?}"));
    let state_json = stop_line
        .split_once("ssh-spawner stop '")
        .unwrap()
        .1
        .trim_end_matches('\'');
    let state = state::decode(state_json).unwrap();
    // The server did start: the prologue ran on, and then the command.
    let running = || process_running(format!("sleep\0{marker}\0").as_bytes());
    assert!(
        common::until_true(Duration::from_secs(10), running).await,
        "the server never started on the host"
    );
    sshd.heal();
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .args(["stop", state_json])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        common::until_true(Duration::from_secs(10), || !running()).await,
        "the server outlived the stop"
    );
    // Only the log (keep_log) and the exit status are left of the run.
    let left: BTreeSet<String> = std::fs::read_dir(&state.dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|f| f == "server.log" || f == "exit_status"),
        "{left:?}"
    );
    let _ = std::fs::remove_dir_all(&runs);
}

/// A prologue that leaves something running in the background (a lab's
/// `Xvfb :99 &`): the start is as quick as without it, the server comes up,
/// and what the prologue prints lands in the server's log, not in the
/// launch's channel (which a background job holding it would keep open for
/// as long as it runs).
#[tokio::test]
async fn a_prologue_that_backgrounds_a_job_does_not_hold_the_start() {
    let Some(tb) = testbed("a_prologue_that_backgrounds_a_job_does_not_hold_the_start") else {
        return;
    };
    let mut c = config(&tb);
    // A length no other test sleeps, to find the job by.
    let pause = format!("40.{:03}", rand::random::<u16>() % 1000);
    let said = format!("prologue-said-{}", rand_suffix());
    c.prologue = vec![
        format!("sleep {pause} &"),
        format!("echo {said}-out; echo {said}-err >&2"),
    ];
    let sp = Spawner::new(c).unwrap();
    let user = tb.alice().name.clone();
    let t0 = Instant::now();
    let (state, _guard) = started(
        &sp,
        &request(&user),
        env_for(&user, vec![]),
        &sleep_cmd(611),
    )
    .await;
    let took = t0.elapsed();
    let job = format!("sleep\0{pause}\0");
    let job_pids = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read(e.path().join("cmdline"))
                            .is_ok_and(|c| c.as_slice() == job.as_bytes())
                    })
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let background_ran = !job_pids().is_empty();
    let running = sp.poll(&state).await;
    let log = std::fs::read_to_string(std::path::Path::new(&state.dir).join("server.log"))
        .unwrap_or_default();
    sp.stop(&state).await.unwrap();
    for pid in job_pids() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    assert!(took < Duration::from_secs(15), "the start took {took:?}");
    assert!(background_ran, "the prologue's background job never ran");
    assert!(matches!(running, PollOutcome::Running), "{running:?}");
    assert!(
        log.contains(&format!("{said}-out")) && log.contains(&format!("{said}-err")),
        "the prologue's output is not in the server's log: {log:?}"
    );
}

/// The facts cache and its read locks hold the (host, user) pairs in use,
/// not every pair a hub ever served: a start as another user once the first
/// user's figures expired leaves only that user's figures, and no read lock.
#[tokio::test]
async fn the_facts_cache_forgets_expired_figures_and_idle_read_locks() {
    let Some(tb) = testbed("the_facts_cache_forgets_expired_figures_and_idle_read_locks") else {
        return;
    };
    let mut c = config(&tb);
    c.facts_cache = 0.5;
    let sp = Spawner::new(c).unwrap();
    let (alice, bob) = (tb.alice().name.clone(), tb.bob().name.clone());
    let (state, _guard) = started(
        &sp,
        &request(&alice),
        env_for(&alice, vec![]),
        &sleep_cmd(613),
    )
    .await;
    sp.stop(&state).await.unwrap();
    let (after_alice, locks) = sp.facts_entries();
    assert!(after_alice >= 1, "no figures were cached");
    assert_eq!(locks, 0, "read locks kept after the reads");
    // Past the cache's age (the figures expire by design; nothing races).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (state, _guard) =
        started(&sp, &request(&bob), env_for(&bob, vec![]), &sleep_cmd(614)).await;
    sp.stop(&state).await.unwrap();
    let (after_bob, locks) = sp.facts_entries();
    assert_eq!(locks, 0, "read locks kept after the reads");
    assert!(
        after_bob <= tb.hosts.len(),
        "expired figures kept: {after_bob} entries for {} hosts",
        tb.hosts.len()
    );
}
