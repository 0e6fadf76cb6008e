//! SSH tunnels against the testbed's real sshd: bytes both ways with
//! half-close, surviving an sshd restart, closed when dropped.

mod common;

use std::time::{Duration, Instant};

use common::{testbed, Undo};
use ssh_spawner::ssh::{Command, LocalForward, RemoteForward};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The two tests on node2 take turns: one restarts its sshd.
static NODE2: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The tests that cut node1 take turns.
static NODE1: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An echo server inside the host's namespace on its loopback: each
/// connection is read to EOF, then answered with the reversed bytes and closed
/// (so the test sees that half-close travels through the tunnel).
struct RemoteEcho {
    child: std::process::Child,
    port: u16,
}

impl RemoteEcho {
    fn start(ns: &str) -> RemoteEcho {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "/usr/bin/python3", "-c"])
            .arg(
                r#"
import socket, sys, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
print(s.getsockname()[1], flush=True)
def serve(c):
    data = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        data += b
    c.sendall(data[::-1])
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#,
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the echo server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("echo server port");
        RemoteEcho {
            child,
            port: line.trim().parse().expect("a port"),
        }
    }
}

impl Drop for RemoteEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn round_trip(port: u16, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    Ok(back)
}

fn reversed(b: &[u8]) -> Vec<u8> {
    b.iter().rev().copied().collect()
}

#[tokio::test]
async fn local_forward_carries_bytes_survives_sshd_restart_and_closes_on_drop() {
    let Some(tb) = testbed("local_forward_carries_bytes_survives_sshd_restart_and_closes_on_drop")
    else {
        return;
    };
    let _node2 = NODE2.lock().await;
    let echo = RemoteEcho::start("tb-node2");
    let pool = tb.pool();
    let target = tb.target("node2", &tb.alice().name);
    let fwd = LocalForward::bind(pool.clone(), target, 0, "127.0.0.1".into(), echo.port)
        .await
        .unwrap();
    let port = fwd.port();

    // Small, large (several windows), and many at once.
    assert_eq!(round_trip(port, b"hello").await.unwrap(), b"olleh");
    let big: Vec<u8> = (0..4 << 20).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(round_trip(port, &big).await.unwrap(), reversed(&big));
    let many = (0..40).map(|i| {
        let msg = format!("message {i}").into_bytes();
        async move { (round_trip(port, &msg).await.unwrap(), msg) }
    });
    for (back, msg) in futures_join(many).await {
        assert_eq!(back, reversed(&msg));
    }
    // Forwarding channels do not take session slots: commands still run.
    let stats = pool.stats();
    assert_eq!(stats.channels, 0, "{stats:?}");

    // sshd restarts under the pooled connection: the next connection works.
    tb.fault("sshd-restart", "node2");
    assert_eq!(round_trip(port, b"again").await.unwrap(), b"niaga");

    // A port with nothing behind it: the client sees its connection closed.
    let nothing = LocalForward::bind(
        pool.clone(),
        tb.target("node2", &tb.alice().name),
        0,
        "127.0.0.1".into(),
        1,
    )
    .await
    .unwrap();
    assert_eq!(
        round_trip(nothing.port(), b"x").await.unwrap_or_default(),
        b""
    );

    // The same local port cannot be had twice: a clear error naming it.
    let err = LocalForward::bind(
        pool.clone(),
        tb.target("node2", &tb.alice().name),
        port,
        "127.0.0.1".into(),
        echo.port,
    )
    .await
    .err()
    .expect("port taken");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(err.kind(), "tunnel");

    drop(fwd);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open after drop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn remote_forward_reaches_the_hub_side_and_comes_back_after_sshd_restart() {
    let Some(tb) = testbed("remote_forward_reaches_the_hub_side_and_comes_back_after_sshd_restart")
    else {
        return;
    };
    // The "hub API": an echo on the hub's loopback, which the host cannot reach.
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let to = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&reversed(&data)).await;
                }
            });
        }
    });
    let pool = tb.pool();
    let target = tb.target("node3", &tb.bob().name);
    let fwd = RemoteForward::open(pool.clone(), target.clone(), 0, to)
        .await
        .unwrap();
    let rport = fwd.port();
    assert_ne!(rport, 0);

    // On the host, as the remote user: connect to the forwarded port.
    let probe = Command::new("/usr/bin/python3 -").stdin(format!(
        r#"
import socket
try:
    s = socket.create_connection(("127.0.0.1", {rport}), timeout=5)
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        data += b
    print(data.decode() or "closed")
except OSError as e:
    print("error", e)
"#
    ));
    let ask = |pool: ssh_spawner::ssh::Pool, target: ssh_spawner::ssh::Target| {
        let probe = probe.clone();
        async move {
            let out = pool.exec(&target, &probe).await.unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    assert_eq!(ask(pool.clone(), target.clone()).await, "gnip");

    // sshd restarts: the forward is requested again on a new connection,
    // with the same port.
    tb.fault("sshd-restart", "node3");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = ask(pool.clone(), target.clone()).await;
        if got == "gnip" {
            break;
        }
        assert!(Instant::now() < deadline, "forward not back: {got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(fwd.port(), rport);

    // Dropped: connections to the port are no longer carried.
    drop(fwd);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = ask(pool.clone(), target.clone()).await;
        if got != "gnip" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forward still carries after drop"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn both_tunnels_work_again_after_a_dropped_link() {
    let Some(tb) = testbed("both_tunnels_work_again_after_a_dropped_link") else {
        return;
    };
    let _node1 = NODE1.lock().await;
    let echo = RemoteEcho::start("tb-node1");
    // Short bounds: the blackholed connection is declared dead by keepalives
    // within about 3 s, so the tunnels must move to a new connection.
    let mut opts = tb.pool_options();
    opts.connect.connect_timeout = Duration::from_secs(2);
    opts.connect.keepalive_interval = Duration::from_secs(1);
    opts.connect.keepalive_max = 2;
    opts.channel_timeout = Duration::from_secs(2);
    let pool = ssh_spawner::ssh::Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name);

    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let to = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&reversed(&data)).await;
                }
            });
        }
    });
    let local = LocalForward::bind(
        pool.clone(),
        target.clone(),
        0,
        "127.0.0.1".into(),
        echo.port,
    )
    .await
    .unwrap();
    let remote = RemoteForward::open(pool.clone(), target.clone(), 0, to)
        .await
        .unwrap();
    let rport = remote.port();
    let probe = Command::new("/usr/bin/python3 -")
        .stdin(format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {rport}), timeout=3)\n\
             s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)\nprint(s.recv(100).decode())\n"
        ))
        .timeout(Duration::from_secs(5));
    let remote_ok = || async {
        pool.exec(&target, &probe)
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "gnip")
            .unwrap_or(false)
    };
    assert_eq!(
        round_trip(local.port(), b"before").await.unwrap(),
        b"erofeb"
    );
    assert!(remote_ok().await);
    let handshakes = pool.stats().handshakes;

    let undo = Undo {
        testbed: &tb,
        action: "heal",
        host: "node1".into(),
    };
    tb.fault("cut", "node1");
    // While cut, a connection through the tunnel is closed, not hung.
    let started = Instant::now();
    assert_eq!(
        round_trip(local.port(), b"cut").await.unwrap_or_default(),
        b""
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Let the keepalives give up on the old connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(undo); // heal

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let local_ok = round_trip(local.port(), b"after").await.unwrap_or_default() == b"retfa";
        if local_ok && remote_ok().await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tunnels not back after heal (local {local_ok})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        pool.stats().handshakes > handshakes,
        "the tunnels should be on a new connection"
    );
    assert_eq!(remote.port(), rport);
}

/// GET `path` from `127.0.0.1:port`; the raw response (empty if none).
async fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).to_string()
}

async fn wait_http_200(port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = http_get(port, path).await;
        if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port}{path}: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn spawner_tunnel_follows_the_server_across_a_hub_restart_and_closes_on_stop() {
    use ssh_spawner::config::Config;
    use ssh_spawner::spawner::{PollOutcome, Progress, Spawner};

    let Some(tb) =
        testbed("spawner_tunnel_follows_the_server_across_a_hub_restart_and_closes_on_stop")
    else {
        return;
    };
    let _node2 = NODE2.lock().await;
    let h = tb.host("node2");
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 3\ncommand_timeout = 15\n\
         stop_grace = 3\nstate_dir = \"~/.ssh-spawner-tunnel-test-{}\"\ntunnel = true\n\
         [[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        common::rand_suffix(),
        h.address,
        h.name
    );
    let config: Config = toml::from_str(&text).unwrap();
    let user = tb.bob().name.clone();
    let mocksu = mocksu_for(&tb, &user);
    let (command, env, req) = (mocksu.command.clone(), mocksu.env(), mocksu.request());

    let sp = Spawner::new(config.clone()).unwrap();
    let state = sp
        .spawn(&req, env, &command, &Progress::new())
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    let local = state
        .tunnel_port
        .expect("the state records the tunnel port");
    let path = format!("/user/{user}/hello");
    assert!(wait_http_200(local, &path).await.contains("hello"));
    // Behind the tunnel the server answers on the host's loopback only.
    assert!(
        TcpStream::connect((h.address.as_str(), state.port))
            .await
            .is_err(),
        "the server listens on the network"
    );

    // "Hub restart": this spawner goes away with its tunnels ...
    drop(sp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", local)).await.is_ok() {
        assert!(Instant::now() < deadline, "tunnel outlived its spawner");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and a new one listens on the recorded port again, once it knows
    // the server runs; when another program holds that port meanwhile, the
    // tunnel moves to a free one (the hub then moves its route there, see
    // get_url in the Python spawner) instead of losing the server.
    let sp = Spawner::new(config.clone()).unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", local)).unwrap();
    assert!(matches!(sp.poll(&state).await, PollOutcome::Running));
    sp.ensure_tunnels(&state).await.unwrap();
    // One listener and no hub forward: the accept loop is the only tunnel
    // task (it is counted before `ensure_tunnels` returns).
    assert_eq!(sp.pool().stats().tunnel_tasks, 1);
    let moved = sp
        .local_tunnel_port(&state.run_id)
        .expect("the tunnel listens somewhere");
    assert_ne!(moved, local, "the taken port was reused");
    assert!(wait_http_200(moved, &path).await.contains("hello"));
    drop(squatter);

    // Another restart with the port free again: back on the recorded port.
    drop(sp);
    let sp = Spawner::new(config).unwrap();
    assert!(matches!(sp.poll(&state).await, PollOutcome::Running));
    sp.ensure_tunnels(&state).await.unwrap();
    assert_eq!(sp.local_tunnel_port(&state.run_id), Some(local));
    assert!(wait_http_200(local, &path).await.contains("hello"));

    sp.stop(&state).await.unwrap();
    assert_eq!(sp.local_tunnel_port(&state.run_id), None);
    assert!(TcpStream::connect(("127.0.0.1", local)).await.is_err());
    tunnel_tasks_reach(sp.pool(), 0, "after stop").await;
    let dir = std::path::Path::new(&state.dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir_all(parent);
    }
}

/// Wait until the pool's tunnel tasks are down to `n` (they end
/// asynchronously once aborted).
async fn tunnel_tasks_reach(pool: &ssh_spawner::ssh::Pool, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().tunnel_tasks != n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} tunnel tasks alive, expected {n}",
            pool.stats().tunnel_tasks
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_remote_forwards_connections_end_with_it() {
    let Some(tb) = testbed("a_remote_forwards_connections_end_with_it") else {
        return;
    };
    // The "hub API" accepts and holds each connection until the other side
    // closes it, and reports each one it accepted.
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let to = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = accepted_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(());
                let mut data = Vec::new();
                let _ = s.read_to_end(&mut data).await;
                let _ = tx.send(());
            });
        }
    });
    // node2's other tests restart its sshd: take turns.
    let _node2 = NODE2.lock().await;
    let pool = tb.pool();
    let target = tb.target("node2", &tb.alice().name);
    let fwd = RemoteForward::open(pool.clone(), target.clone(), 0, to)
        .await
        .unwrap();
    let rport = fwd.port();
    // On the host: a client that connects through the forward and waits for
    // the connection to end (EOF), at most 20 s.
    let probe = Command::new("/usr/bin/python3 -")
        .stdin(format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {rport}), timeout=5)\n\
             s.settimeout(20)\ntry:\n    print('eof' if s.recv(100) == b'' else 'data')\n\
             except OSError as e:\n    print('open', e)\n"
        ))
        .timeout(Duration::from_secs(30));
    let client = {
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move {
            let out = pool.exec(&target, &probe).await.unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    };
    if tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .is_err()
    {
        panic!(
            "the forwarded connection never reached the hub side; the client said {:?}",
            client.await
        );
    }
    assert_eq!(
        pool.stats().tunnel_tasks,
        2,
        "the keeper and one connection"
    );
    let dropped = Instant::now();
    drop(fwd);
    tunnel_tasks_reach(&pool, 0, "after the forward was dropped").await;
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the hub side sees the connection end");
    assert_eq!(
        client.await.unwrap(),
        "eof",
        "the host side stays connected"
    );
    assert!(dropped.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_stop_that_cannot_reach_the_host_still_closes_the_servers_tunnels() {
    use ssh_spawner::config::Config;
    use ssh_spawner::plan::stop::Stopped;
    use ssh_spawner::spawner::{Progress, Spawner};

    let Some(tb) = testbed("a_stop_that_cannot_reach_the_host_still_closes_the_servers_tunnels")
    else {
        return;
    };
    let _node1 = NODE1.lock().await;
    let h = tb.host("node1");
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 2\ncommand_timeout = 15\n\
         stop_grace = 3\ntunnel = true\n[[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        h.address,
        h.name
    );
    let config: Config = toml::from_str(&text).unwrap();
    let user = tb.alice().name.clone();
    let mocksu = mocksu_for(&tb, &user);
    let (command, env, req) = (mocksu.command.clone(), mocksu.env(), mocksu.request());
    let sp = Spawner::new(config).unwrap();
    let state = sp
        .spawn(&req, env, &command, &Progress::new())
        .await
        .unwrap();
    let _stop_on_panic = common::StopOnPanic::new(&sp, &state);
    let local = state.tunnel_port.unwrap();
    let path = format!("/user/{user}/hello");
    assert!(wait_http_200(local, &path).await.contains("hello"));
    // A browser connection held open through the tunnel.
    let mut held = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    held.write_all(b"GET ").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sp.pool().stats().tunnel_tasks < 2 {
        assert!(
            Instant::now() < deadline,
            "the held connection is not carried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let undo = Undo {
        testbed: &tb,
        action: "heal",
        host: "node1".into(),
    };
    tb.fault("cut", "node1");
    let err = sp.stop(&state).await.expect_err("the host is cut");
    assert!(err.is_unreachable(), "{err}");
    assert_eq!(sp.local_tunnel_port(&state.run_id), None);
    tunnel_tasks_reach(sp.pool(), 0, "after a failed stop").await;
    assert!(TcpStream::connect(("127.0.0.1", local)).await.is_err());
    let mut rest = Vec::new();
    // EOF or a reset, but no longer open.
    let _ = tokio::time::timeout(Duration::from_secs(5), held.read_to_end(&mut rest))
        .await
        .expect("the held connection is closed");
    // The stop is finished in the background, once per run.
    sp.clean_up_later(state.clone());
    sp.clean_up_later(state.clone());
    assert_eq!(sp.cleaning_up(), 1);
    drop(undo);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = loop {
        match sp.stop(&state).await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "stop after heal: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(matches!(stopped, Stopped::Killed { .. }), "{stopped:?}");
    assert_eq!(sp.local_tunnel_port(&state.run_id), None);
    tunnel_tasks_reach(sp.pool(), 0, "after the stop that succeeded").await;
    let _ = std::fs::remove_dir_all(&state.dir);
}

#[tokio::test]
async fn a_tunnel_never_waits_for_a_command_slot() {
    let Some(tb) = testbed("a_tunnel_never_waits_for_a_command_slot") else {
        return;
    };
    let _node1 = NODE1.lock().await;
    let echo = RemoteEcho::start("tb-node1");
    // One connection with one session slot, held by a long command: a poll
    // storm in miniature.
    let mut opts = tb.pool_options();
    opts.max_sessions_per_connection = 1;
    opts.max_connections_per_target = 1;
    let pool = ssh_spawner::ssh::Pool::new(opts);
    let target = tb.target("node1", &tb.alice().name);
    let fwd = LocalForward::bind(
        pool.clone(),
        target.clone(),
        0,
        "127.0.0.1".into(),
        echo.port,
    )
    .await
    .unwrap();
    let busy = {
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move {
            pool.exec(
                &target,
                &Command::new("sleep 20").timeout(Duration::from_secs(30)),
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().channels < 1 {
        assert!(Instant::now() < deadline, "the command never took its slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Browser traffic goes through while the only slot is taken.
    let got = round_trip(fwd.port(), b"through").await.unwrap();
    assert_eq!(got, b"hguorht");
    assert!(!busy.is_finished(), "the tunnel waited for the command");
    busy.abort();
}

#[tokio::test]
async fn the_hub_tunnel_is_back_within_the_configured_keepalive_bound() {
    use ssh_spawner::config::Config;

    let Some(tb) = testbed("the_hub_tunnel_is_back_within_the_configured_keepalive_bound") else {
        return;
    };
    let _node1 = NODE1.lock().await;
    let h = tb.host("node1");
    // keepalive_interval 1 s, 2 keepalives: a silent link is given up on
    // after about 3 s instead of the default 15 * 4 = 60 s.
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 2\n\
         keepalive_interval = 1\nkeepalive_count = 2\n\
         [[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        h.address,
        h.name
    );
    let config: Config = toml::from_str(&text).unwrap();
    config.validate().unwrap();
    let bound = Duration::from_secs_f64(
        config.keepalive_interval * (f64::from(config.keepalive_count) + 1.0),
    );
    let pool = ssh_spawner::ssh::Pool::new(config.pool_options());
    let target = tb.target("node1", &tb.alice().name);
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let to = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&reversed(&data)).await;
                }
            });
        }
    });
    let fwd = RemoteForward::open(pool.clone(), target.clone(), 0, to)
        .await
        .unwrap();
    let rport = fwd.port();
    let probe = Command::new("/usr/bin/python3 -")
        .stdin(format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {rport}), timeout=3)\n\
             s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)\nprint(s.recv(100).decode())\n"
        ))
        .timeout(Duration::from_secs(5));
    let works = || async {
        pool.exec(&target, &probe)
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "gnip")
            .unwrap_or(false)
    };
    assert!(works().await);
    let handshakes = pool.stats().handshakes;

    // The link drops every packet for a little longer than the bound: the
    // keepalives give up on the connection the forward lives on.
    let undo = Undo {
        testbed: &tb,
        action: "heal",
        host: "node1".into(),
    };
    tb.fault("cut", "node1");
    let cut = Instant::now();
    tokio::time::sleep(bound + Duration::from_secs(1)).await;
    drop(undo);
    let healed = Instant::now();
    // Back on a new connection within a few seconds of the heal (a
    // reconnect and the forward request), not after TCP gives up.
    let deadline = healed + Duration::from_secs(15);
    while !works().await {
        assert!(Instant::now() < deadline, "the hub tunnel is not back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "hub tunnel back {:?} after the heal ({:?} after the cut; keepalive bound {bound:?})",
        healed.elapsed(),
        cut.elapsed()
    );
    assert!(
        pool.stats().handshakes > handshakes,
        "the keepalives never gave up on the silent connection within {bound:?}"
    );
    assert_eq!(fwd.port(), rport);
}

/// Await futures concurrently on this task.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(|f| Box::pin(f)).collect();
    let mut out = Vec::new();
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut any = false;
        for slot in pending.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        out.push(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => any = true,
                }
            }
        }
        if any {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out
}

/// JupyterHub's mock single-user server as `user`: its command, its
/// environment (the service URL on the port the spawner picks) and the
/// request.
struct Mocksu {
    command: Vec<String>,
    user: String,
}

impl Mocksu {
    fn env(
        &self,
    ) -> impl Fn(&ssh_spawner::plan::state::ServerState) -> Vec<(String, String)> + Clone {
        let user = self.user.clone();
        move |s| {
            vec![
                (
                    "JUPYTERHUB_SERVICE_URL".to_string(),
                    format!("http://127.0.0.1:{}/user/{user}/", s.port),
                ),
                ("JUPYTERHUB_USER".to_string(), user.clone()),
            ]
        }
    }

    fn request(&self) -> ssh_spawner::spawner::SpawnRequest {
        ssh_spawner::spawner::SpawnRequest {
            username: self.user.clone(),
            ..Default::default()
        }
    }
}

fn mocksu_for(tb: &common::Testbed, user: &str) -> Mocksu {
    Mocksu {
        command: vec![
            tb.python.display().to_string(),
            "-m".into(),
            "jupyterhub.tests.mocksu".into(),
        ],
        user: user.to_string(),
    }
}

/// Two users' forwards on one host: bob's request for the port alice's
/// forward holds fails (sshd: taken), and alice's forward goes on carrying
/// her connections to her side, never to bob's (the registry of forwards is
/// keyed by the connection's target, and a failed request forgets only its
/// own entry).
#[tokio::test]
async fn another_users_failed_request_for_the_same_port_leaves_a_forward_alone() {
    let Some(tb) = testbed("another_users_failed_request_for_the_same_port_leaves_a_forward_alone")
    else {
        return;
    };
    // Two "hub sides" that answer with a name each.
    let mut sides = Vec::new();
    for name in ["alice-side", "bob-side"] {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        sides.push(format!(
            "127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        ));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    if s.read_to_end(&mut data).await.is_ok() {
                        let _ = s.write_all(name.as_bytes()).await;
                    }
                });
            }
        });
    }
    // node2's other tests restart its sshd: take turns.
    let _node2 = NODE2.lock().await;
    let pool = tb.pool();
    let alice = tb.target("node2", &tb.alice().name);
    let bob = tb.target("node2", &tb.bob().name);
    let fwd = RemoteForward::open(pool.clone(), alice.clone(), 0, sides[0].clone())
        .await
        .unwrap();
    let rport = fwd.port();
    let probe = Command::new("/usr/bin/python3 -").stdin(format!(
        r#"
import socket
try:
    s = socket.create_connection(("127.0.0.1", {rport}), timeout=5)
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        data += b
    print(data.decode() or "closed")
except OSError as e:
    print("error", e)
"#
    ));
    let ask = || async {
        let out = pool.exec(&alice, &probe).await.unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(ask().await, "alice-side");
    // Bob asks for the same port (as after a dropped connection) and is
    // refused, a few times, with alice's connections in between.
    for _ in 0..3 {
        let taken = RemoteForward::open(pool.clone(), bob.clone(), rport, sides[1].clone()).await;
        assert!(taken.is_err(), "sshd gave bob alice's port");
        assert_eq!(ask().await, "alice-side");
    }
    drop(fwd);
}

/// The hub goes down (its forward is cancelled) and another user of the host
/// binds the hub tunnel's port meanwhile: asking for the port again is
/// refused, said as a taken port, and counted in the metrics
/// (`ssh_spawner_hub_tunnel_port_taken`). What protects the token in that
/// gap is `internal_ssl` (docs/security.md).
#[tokio::test]
async fn a_hub_tunnel_port_taken_while_the_hub_was_down_is_reported_as_taken() {
    let Some(tb) = testbed("a_hub_tunnel_port_taken_while_the_hub_was_down_is_reported_as_taken")
    else {
        return;
    };
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let to = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    // Other tests cut node1: take turns.
    let _node1 = NODE1.lock().await;
    let pool = tb.pool();
    let alice = tb.target("node1", &tb.alice().name);
    let bob = tb.target("node1", &tb.bob().name);
    let fwd = RemoteForward::open(pool.clone(), alice.clone(), 0, to.clone())
        .await
        .unwrap();
    let port = fwd.port();
    drop(fwd);
    // Bob binds the port once sshd let go of it (tried for up to 10 s), and
    // holds it for 60 s at most.
    let squat = Command::new(
        "f=$(mktemp) && cat >\"$f\" && { /usr/bin/python3 \"$f\" </dev/null >/dev/null 2>&1 & echo $!; }",
    )
    .stdin(format!(
        "import os, socket, sys, time\nos.unlink(sys.argv[0])\ns = socket.socket()\nend = time.time() + 10\n\
         while True:\n    try:\n        s.bind(('127.0.0.1', {port}))\n        break\n\
         \x20   except OSError:\n        if time.time() > end:\n            raise\n        time.sleep(0.05)\n\
         s.listen(8)\ntime.sleep(60)\n"
    ));
    let out = pool.exec(&bob, &squat).await.unwrap();
    let squatter = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let kill_squatter = Command::new(format!("kill {squatter}"));
    let held = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &tb.host("node1").netns, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    };
    let taken = common::until_true(Duration::from_secs(15), held).await;
    let taken_before = |s: &ssh_spawner::metrics::Snapshot| {
        s.hub_tunnel_port_taken
            .iter()
            .find(|(h, _)| *h == alice.host_label())
            .map_or(0, |(_, n)| *n)
    };
    let before = taken_before(&ssh_spawner::metrics::snapshot());
    let again = RemoteForward::open(pool.clone(), alice.clone(), port, to).await;
    let after = taken_before(&ssh_spawner::metrics::snapshot());
    let _ = pool.exec(&bob, &kill_squatter).await;
    assert!(taken, "bob never bound port {port}");
    let err = again.err().expect("sshd gave alice a port bob holds");
    assert!(ssh_spawner::ssh::forward_port_refused(&err), "{err}");
    assert_eq!(after, before + 1, "the taken port was not counted");
}
