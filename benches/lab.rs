//! The lab-scale benchmark behind `scripts/bench` (parts a, c, d and e of
//! docs/benchmarks.md), against the real sshd of the three testbed hosts:
//!
//! - `start`: the spawner's own start (prepare + launch, until the pid is
//!   known) with a warm pool, the same code with a fresh connection per SSH
//!   operation, and the floor (one exec of `true` on a pooled connection);
//! - `storm`: 100 starts at once across the hosts from a cold spawner;
//! - `poll`: a poll round of 1000 running stand-in servers (`sleep`, started
//!   through the spawner) across the hosts, pooled versus fresh connections,
//!   wall and CPU time of this process;
//! - `memory`: resident memory with the 1000 servers managed, and per pooled
//!   connection;
//! - `hostcpu`: the spawner's own CPU time on a host per launch of a server
//!   that takes 30 s to listen, the hub watching against the launch
//!   script's loop (see [`host_cpu`]).
//!
//! Every figure is printed as one JSON line on stdout (`scripts/bench` turns
//! them into the table); progress goes to stderr. Every server started here
//! lives under `~/.jupyterhub-ssh-bench-PID` and is stopped at the end;
//! `scripts/bench` also kills whatever is left after a failure or Ctrl-C.
//!
//! Run as root with the testbed up: `cargo bench --bench lab`. Sizes:
//! `BENCH_START_N` (100), `BENCH_STORM` (100), `BENCH_STORM_ROUNDS` (3),
//! `BENCH_SERVERS` (1000), `BENCH_POLL_ROUNDS` (20), `BENCH_FRESH_SAMPLE`
//! (1000), `BENCH_FRESH_ROUNDS` (2), `BENCH_FRESH_CONCURRENCY` (10).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use ssh_spawner::config::Config;
use ssh_spawner::plan::state::ServerState;
use ssh_spawner::spawner::{
    CleanUpLater, PollOutcome, Progress, SpawnRequest, Spawner, StartOptions,
};
use ssh_spawner::ssh::{Command, Pool};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// n, p50, p99, mean, min, max of samples (any unit).
fn stats(samples: &[f64]) -> serde_json::Value {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    json!({
        "n": v.len(),
        "p50": pct(50.0),
        "p99": pct(99.0),
        "mean": v.iter().sum::<f64>() / v.len().max(1) as f64,
        "min": v.first().copied().unwrap_or(0.0),
        "max": v.last().copied().unwrap_or(0.0),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (VmRSS, VmHWM) of this process in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `ready_timeout` 0: the stand-ins (`sleep`) never listen, so every start
/// here ends when the pid is known.
fn config(tb: &common::Testbed, state_dir: &str) -> Config {
    let mut text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nready_timeout = 0\nstate_dir = \"{state_dir}\"\nstop_grace = 2\n",
        tb.known_hosts.display(),
        tb.hub_key.display(),
    );
    for h in &tb.hosts {
        text.push_str(&format!(
            "[[hosts]]\naddress = \"{}\"\nname = \"{}\"\nport = {}\n",
            h.address, h.name, h.port
        ));
    }
    toml::from_str(&text).expect("bench config")
}

fn sleeper() -> Vec<String> {
    vec!["sleep".into(), "3600".into()]
}

fn request(user: &str) -> SpawnRequest {
    SpawnRequest {
        username: user.to_string(),
        ..Default::default()
    }
}

/// Start `n` stand-in servers (users alternating), `concurrency` at a time.
async fn start_sleepers(
    sp: &Spawner,
    users: &[String],
    n: usize,
    concurrency: usize,
) -> Vec<ServerState> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (sp, sem, user) = (sp.clone(), sem.clone(), users[i % users.len()].clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            sp.spawn(
                &request(&user),
                |_| Vec::new(),
                &sleeper(),
                &Progress::new(),
            )
            .await
        }));
    }
    let mut states = Vec::with_capacity(n);
    for t in tasks {
        states.push(t.await.expect("task").expect("start a stand-in server"));
    }
    states
}

/// Remove the stand-in servers: SIGKILL to each one's process group, checked
/// first against the recorded start time so a reused pid is never hit. The
/// testbed hosts share this machine's PID namespace, which makes this a
/// fast clean-up; `Spawner::stop` (a /proc scan per server, measured by the
/// lifecycle tests, not here) of 1000 servers would take minutes.
fn remove_all(states: Vec<ServerState>) {
    let mut killed = 0;
    for s in &states {
        let (Some(pid), Some(pgid), Some(start)) = (s.pid, s.pgid, s.start_time) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let same = fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            && fields.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(start);
        if same {
            // SAFETY: kill only sends a signal to the checked process group.
            if unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    for s in &states {
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    assert_eq!(
        killed,
        states.len(),
        "every stand-in server was found and removed"
    );
}

fn per_host(states: &[ServerState]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in states {
        *m.entry(s.host.clone()).or_insert(0) += 1;
    }
    m
}

/// e: resident memory per pooled connection, measured first while the heap is
/// young: RSS with `n` idle connections held minus RSS before.
async fn memory_per_connection(tb: &common::Testbed) {
    let mut opts = tb.pool_options();
    opts.max_sessions_per_connection = 1;
    let per_target = 8;
    opts.max_connections_per_target = per_target;
    let pool = Pool::new(opts);
    // One warm connection first, so one-time costs (crypto tables, runtime)
    // are not counted per connection.
    let first = tb.target("node1", &tb.alice().name);
    pool.exec(&first, &Command::new("true"))
        .await
        .expect("warm-up exec");
    pool.close_all().await;
    let before = memory_kib().0;
    let mut tasks = Vec::new();
    for h in &tb.hosts {
        for u in &tb.users {
            let target = tb.target(&h.name, &u.name);
            for _ in 0..per_target {
                let (pool, target) = (pool.clone(), target.clone());
                tasks.push(tokio::spawn(async move {
                    pool.exec(&target, &Command::new("sleep 1"))
                        .await
                        .expect("exec")
                }));
            }
        }
    }
    for t in tasks {
        assert!(t.await.expect("task").success());
    }
    let conns = pool.stats().connections;
    let after = memory_kib().0;
    pool.close_all().await;
    let per = after.saturating_sub(before) as f64 / conns.max(1) as f64;
    eprintln!("memory: {conns} idle pooled connections add {per:.0} KiB each");
    emit(
        json!({"figure": "memory_per_connection", "connections": conns,
        "rss_before_kib": before, "rss_after_kib": after, "kib_per_connection": per}),
    );
}

/// Time `n` starts (prepare + launch) on `sp`, one after another. With
/// `fresh`, every connection is closed before each SSH operation (not timed),
/// so each operation pays its own handshake, as when every command is its own
/// `ssh` session; the spawner's caches are kept, so the two modes differ only
/// in how connections are had.
async fn time_starts(
    sp: &Spawner,
    user: &str,
    n: usize,
    fresh: bool,
    states: &mut Vec<ServerState>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, u64) {
    let req = request(user);
    let (mut total, mut prep, mut launch) = (Vec::new(), Vec::new(), Vec::new());
    let handshakes = sp.pool().stats().handshakes;
    for _ in 0..n {
        let progress = Progress::new();
        if fresh {
            sp.pool().close_all().await;
        }
        let t = Instant::now();
        let prepared = sp.prepare(&req, &progress).await.expect("prepare");
        let took_prepare = t.elapsed();
        if fresh {
            sp.pool().close_all().await;
        }
        let t = Instant::now();
        let state = sp
            .launch(&prepared, &[], &sleeper(), &progress)
            .await
            .expect("launch");
        let took_launch = t.elapsed();
        total.push(ms(took_prepare + took_launch));
        prep.push(ms(took_prepare));
        launch.push(ms(took_launch));
        states.push(state);
    }
    let handshakes = sp.pool().stats().handshakes - handshakes;
    (total, prep, launch, handshakes)
}

/// a: start overhead, warm pool vs fresh connection per operation vs floor.
async fn start_overhead(tb: &common::Testbed, state_dir: &str, users: &[String]) {
    let n = env_usize("BENCH_START_N", 100);
    // Until the pid is known (the stand-in never listens).
    let sp = Spawner::new(config(tb, state_dir)).expect("spawner");
    let user = &users[0];

    // Warm: one full start (connections to every host), not measured.
    let mut states = vec![sp
        .spawn(&request(user), |_| Vec::new(), &sleeper(), &Progress::new())
        .await
        .expect("warm-up start")];

    let target = sp.target(&sp.config().hosts[0], user).expect("target");
    let mut floor = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = sp
            .pool()
            .exec(&target, &Command::new("true"))
            .await
            .expect("exec true");
        floor.push(ms(t.elapsed()));
        assert!(out.success());
    }

    let (warm, warm_prepare, warm_launch, warm_hs) =
        time_starts(&sp, user, n, false, &mut states).await;
    let (fresh, fresh_prepare, fresh_launch, fresh_hs) =
        time_starts(&sp, user, n, true, &mut states).await;
    let f = stats(&floor);
    let w = stats(&warm);
    let fr = stats(&fresh);
    eprintln!(
        "start: floor p50 {:.2} ms, warm p50 {:.2} ms, fresh p50 {:.2} ms",
        f["p50"], w["p50"], fr["p50"]
    );
    emit(json!({"figure": "start", "mode": "floor", "ms": f}));
    emit(json!({"figure": "start", "mode": "warm", "ms": w,
        "prepare_ms": stats(&warm_prepare), "launch_ms": stats(&warm_launch),
        "handshakes": warm_hs}));
    emit(json!({"figure": "start", "mode": "fresh", "ms": fr,
        "prepare_ms": stats(&fresh_prepare), "launch_ms": stats(&fresh_launch),
        "handshakes": fresh_hs}));
    remove_all(states);
    sp.pool().close_all().await;
}

/// d: 100 starts at once across the hosts, from a cold spawner each round.
async fn storm(tb: &common::Testbed, state_dir: &str, users: &[String]) {
    let n = env_usize("BENCH_STORM", 100);
    let rounds = env_usize("BENCH_STORM_ROUNDS", 3);
    let mut walls = Vec::new();
    for round in 0..rounds {
        let sp = Spawner::new(config(tb, state_dir)).expect("spawner");
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (sp, user) = (sp.clone(), users[i % users.len()].clone());
            tasks.push(tokio::spawn(async move {
                sp.spawn(
                    &request(&user),
                    |_| Vec::new(),
                    &sleeper(),
                    &Progress::new(),
                )
                .await
            }));
        }
        let mut states = Vec::new();
        let mut errors = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(s) => states.push(s),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let wall = t.elapsed().as_secs_f64();
        walls.push(wall);
        let mut seen = HashSet::new();
        let clashes = states
            .iter()
            .filter(|s| !seen.insert((s.host.clone(), s.port)))
            .count();
        // Every started server really runs.
        let polls: Vec<_> = states
            .iter()
            .map(|s| {
                let (sp, s) = (sp.clone(), s.clone());
                tokio::spawn(async move { sp.poll(&s).await })
            })
            .collect();
        let mut running = 0;
        for p in polls {
            if matches!(p.await.expect("task"), PollOutcome::Running) {
                running += 1;
            }
        }
        eprintln!(
            "storm {}: {} of {n} started in {wall:.2} s, {clashes} host+port clashes, {running} running, {:?}",
            round + 1,
            states.len(),
            per_host(&states)
        );
        for e in errors.iter().take(3) {
            eprintln!("  failed: {e}");
        }
        emit(
            json!({"figure": "storm_round", "round": round + 1, "starts": n,
            "ok": states.len(), "failed": errors.len(), "clashes": clashes,
            "running": running, "wall_s": wall, "per_host": per_host(&states),
            "handshakes": sp.pool().stats().handshakes}),
        );
        remove_all(states);
        sp.pool().close_all().await;
    }
    emit(json!({"figure": "storm", "starts": n, "wall_s": stats(&walls)}));
}

/// c and e: a poll round of many running servers, pooled vs fresh.
async fn poll_at_scale(tb: &common::Testbed, state_dir: &str, users: &[String]) {
    let n = env_usize("BENCH_SERVERS", 1000);
    let rounds = env_usize("BENCH_POLL_ROUNDS", 20);
    let sample = env_usize("BENCH_FRESH_SAMPLE", 1000).min(n);
    let fresh_rounds = env_usize("BENCH_FRESH_ROUNDS", 2);
    let fresh_conc = env_usize("BENCH_FRESH_CONCURRENCY", 10);
    // No wait for the port: the stand-ins never listen; they are set-up, not measured.
    let cfg = config(tb, state_dir);
    let sp = Spawner::new(cfg.clone()).expect("spawner");

    let t = Instant::now();
    let states = start_sleepers(&sp, users, n, 60).await;
    let start_wall = t.elapsed().as_secs_f64();
    eprintln!(
        "poll: started {n} stand-in servers in {start_wall:.1} s: {:?}",
        per_host(&states)
    );

    let round = |sp: Spawner, states: Vec<ServerState>| async move {
        let polls: Vec<_> = states
            .into_iter()
            .map(|s| {
                let sp = sp.clone();
                tokio::spawn(async move { sp.poll(&s).await })
            })
            .collect();
        let mut running = 0;
        for p in polls {
            if matches!(p.await.expect("task"), PollOutcome::Running) {
                running += 1;
            }
        }
        running
    };

    // One unmeasured round opens the connections.
    assert_eq!(round(sp.clone(), states.clone()).await, n);
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    let mut execs = 0;
    for _ in 0..rounds {
        let (c0, e0) = (cpu_seconds(), sp.poll_execs());
        let t = Instant::now();
        let running = round(sp.clone(), states.clone()).await;
        walls.push(t.elapsed().as_secs_f64());
        cpus.push(cpu_seconds() - c0);
        execs = sp.poll_execs() - e0;
        assert_eq!(running, n, "every stand-in server answers as running");
    }
    let (rss, hwm) = memory_kib();
    let conns = sp.pool().stats().connections;
    let pw = stats(&walls);
    let pc = stats(&cpus);
    eprintln!(
        "poll pooled: {n} servers, wall p50 {:.3} s, cpu p50 {:.3} s, {execs} execs per round",
        pw["p50"], pc["p50"]
    );
    emit(
        json!({"figure": "poll", "mode": "pooled", "servers": n, "hosts": tb.hosts.len(),
        "users": users.len(), "wall_s": pw, "cpu_s": pc, "execs_per_round": execs,
        "connections": conns}),
    );
    emit(
        json!({"figure": "memory", "servers": n, "rss_kib": rss, "hwm_kib": hwm,
        "connections": conns}),
    );

    // Fresh: each poll by a new spawner (a new pool), `fresh_conc` at a time,
    // the way a hub whose every poll is its own SSH session is limited by
    // sshd's MaxStartups.
    let (mut fwalls, mut fcpus, mut flat) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..fresh_rounds {
        let sem = Arc::new(tokio::sync::Semaphore::new(fresh_conc));
        let c0 = cpu_seconds();
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(sample);
        for s in states.iter().take(sample) {
            let (sem, s, cfg) = (sem.clone(), s.clone(), cfg.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore");
                let t = Instant::now();
                let sp = Spawner::new(cfg).expect("spawner");
                let out = sp.poll(&s).await;
                let took = ms(t.elapsed());
                sp.pool().close_all().await;
                (matches!(out, PollOutcome::Running), took)
            }));
        }
        let mut running = 0;
        for t in tasks {
            let (ok, took) = t.await.expect("task");
            running += usize::from(ok);
            flat.push(took);
        }
        let scale = n as f64 / sample as f64;
        fwalls.push(t.elapsed().as_secs_f64() * scale);
        fcpus.push((cpu_seconds() - c0) * scale);
        assert_eq!(running, sample, "every sampled server answers as running");
    }
    let fw = stats(&fwalls);
    let fc = stats(&fcpus);
    eprintln!(
        "poll fresh: {sample} polled (scaled to {n}), wall p50 {:.2} s, cpu p50 {:.2} s",
        fw["p50"], fc["p50"]
    );
    emit(
        json!({"figure": "poll", "mode": "fresh", "servers": n, "sampled": sample,
        "scaled": sample != n, "concurrency": fresh_conc, "wall_s": fw, "cpu_s": fc,
        "per_poll_ms": stats(&flat)}),
    );

    remove_all(states);
    sp.pool().close_all().await;
}

/// `hostcpu`: the spawner's own CPU time on a host per launch of a server
/// that takes `BENCH_HOSTCPU_LISTEN_AFTER` (30) s to listen, with the hub
/// watching the port (`hub`, the default) and with the launch script's loop
/// on the host (`host`, as before issue 21), interleaved, `BENCH_HOSTCPU_ROUNDS`
/// (3) of each.
///
/// How: an sshd of its own in node1's namespace runs in a cpuacct cgroup
/// (v1) of its own, so everything it starts is counted there: the
/// per-connection sshd, the launch's `sh`, the wrapper, every check. The
/// server's first act (a builtin `echo` in its `sh -c`) moves it into a
/// second cgroup, so its `sleep` and the Python that then listens are not
/// counted. One start is made first, so that the connection and its kept
/// SFTP session exist (a hub's steady state); each measured start is the
/// cgroup's usage from the end of the host choice to the start's return
/// (the launch and the wait until the server listens). The host choice's
/// facts read (one exec, cached `facts_cache` and shared by the starts of
/// that time) is reported apart, as `facts`.
async fn host_cpu(tb: &common::Testbed, state_dir: &str, user: &str) {
    let listen_after = env_usize("BENCH_HOSTCPU_LISTEN_AFTER", 30);
    let rounds = env_usize("BENCH_HOSTCPU_ROUNDS", 3);
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/cpuacct/ssh-spawner-bench-{}",
        std::process::id()
    ));
    let (spawner_cg, server_cg) = (root.join("spawner"), root.join("server"));
    for d in [&spawner_cg, &server_cg] {
        std::fs::create_dir_all(d).expect("cpuacct cgroup (cgroup v1 at /sys/fs/cgroup/cpuacct)");
    }
    let uid = tb.user(user).uid;
    for f in ["cgroup.procs", "tasks"] {
        std::os::unix::fs::chown(server_cg.join(f), Some(uid), None).expect("chown");
    }
    let sshd = common::OwnSshd::start(tb, &[]);
    std::fs::write(spawner_cg.join("cgroup.procs"), sshd.pid().to_string()).expect("move sshd");
    let usage = || -> f64 {
        std::fs::read_to_string(spawner_cg.join("cpuacct.usage"))
            .expect("cpuacct.usage")
            .trim()
            .parse::<f64>()
            .expect("usage")
            / 1e6
    };
    let scratch = common::Scratch::new("hostcpu");
    let known_hosts = scratch.path("known_hosts");
    std::fs::write(
        &known_hosts,
        std::fs::read_to_string(&sshd.known_hosts).expect("known_hosts"),
    )
    .expect("known_hosts");
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nready_timeout = {}\nstate_dir = \"{state_dir}\"\nstop_grace = 2\n\
         [[hosts]]\naddress = \"{}\"\nname = \"cpu\"\nport = {}\n",
        known_hosts.display(),
        tb.hub_key.display(),
        listen_after + 60,
        sshd.address,
        sshd.port
    );
    let sp = Spawner::new(toml::from_str::<Config>(&text).expect("config")).expect("spawner");
    let server = |after: usize| -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo $$ > {}/cgroup.procs; sleep {after}; exec /usr/bin/python3 -c \"\
                 import os,socket,time; s=socket.socket(); \
                 s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); \
                 s.bind(('0.0.0.0',int(os.environ['PORT']))); s.listen(); time.sleep(3600)\"",
                server_cg.display()
            ),
        ]
    };
    let env = |s: &ServerState| vec![("PORT".to_string(), s.port.to_string())];
    let mut states = Vec::new();
    let warm = sp
        .spawn(&request(user), env, &server(0), &Progress::new())
        .await
        .expect("warm-up start");
    states.push(warm);
    // The floor: what one command on the pooled connection costs the host
    // (sshd's session, the login shell), and one `sh -s` with an `ss`.
    let target = ssh_spawner::ssh::Target::new(
        &sshd.address,
        user,
        ssh_spawner::ssh::Identity::KeyFile(tb.hub_key.clone()),
    )
    .port(sshd.port);
    for (what, cmd, stdin) in [
        ("exec true", "true", ""),
        (
            "exec sh -s with ss",
            "/bin/sh -s",
            "ss -Hltne 'sport = :1' >/dev/null\n",
        ),
    ] {
        let before = usage();
        for _ in 0..10 {
            sp.pool()
                .exec(&target, &Command::new(cmd).stdin(stdin))
                .await
                .expect("floor exec");
        }
        let each = (usage() - before) / 10.0;
        eprintln!("hostcpu floor: {what}: {each:.1} ms of host CPU each");
        emit(json!({"figure": "hostcpu_floor", "what": what, "host_cpu_ms": each}));
    }
    tokio::time::sleep(Duration::from_secs(6)).await; // the facts cache expires
    let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for round in 0..rounds {
        for mode in ["hub", "host"] {
            sp.set_ready_wait_on_host(mode == "host");
            let progress = Progress::new();
            let before = usage();
            let prepared = sp
                .prepare(&request(user), &progress)
                .await
                .expect("prepare");
            let after_prepare = usage();
            let t0 = Instant::now();
            let st = sp
                .start(
                    prepared,
                    &request(user),
                    env,
                    &server(listen_after),
                    &progress,
                    &StartOptions {
                        may_move: false,
                        ..Default::default()
                    },
                    &CleanUpLater,
                )
                .await
                .expect("start");
            let (cpu, wall) = (usage() - after_prepare, t0.elapsed());
            let facts = after_prepare - before;
            eprintln!(
                "hostcpu round {round} {mode}: launch and wait {cpu:.1} ms of host CPU in {:.1} s; \
                 the facts read before it {facts:.1} ms (load {})",
                wall.as_secs_f64(),
                load().trim()
            );
            per.entry(mode).or_default().push(cpu);
            per.entry("facts").or_default().push(facts);
            states.push(st);
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
    }
    for (mode, v) in &per {
        emit(
            json!({"figure": "hostcpu", "mode": mode, "listen_after_s": listen_after,
            "host_cpu_ms": stats(v), "load": load().trim()}),
        );
    }
    remove_all(states);
    sp.pool().close_all().await;
    drop(sshd);
    let _ = std::fs::remove_dir(&server_cg);
    let _ = std::fs::remove_dir(&spawner_cg);
    let _ = std::fs::remove_dir(&root);
}

#[tokio::main]
async fn main() {
    let Some(tb) = common::testbed("bench lab") else {
        return;
    };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
    let state_dir = format!("~/.jupyterhub-ssh-bench-{}", std::process::id());
    let users: Vec<String> = tb.users.iter().map(|u| u.name.clone()).collect();
    let (rss, _) = memory_kib();
    emit(json!({"figure": "memory_start", "rss_kib": rss}));
    if want("memory") {
        memory_per_connection(&tb).await;
    }
    if want("start") {
        start_overhead(&tb, &state_dir, &users).await;
    }
    if want("storm") {
        storm(&tb, &state_dir, &users).await;
    }
    if want("poll") {
        poll_at_scale(&tb, &state_dir, &users).await;
    }
    if want("hostcpu") {
        host_cpu(&tb, &state_dir, &users[0]).await;
    }
    // The run directories' parent on each host.
    for u in &tb.users {
        let base = u.home.join(state_dir.trim_start_matches("~/"));
        let _ = std::fs::remove_dir_all(base);
    }
}
