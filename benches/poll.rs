//! Polls of many servers on one host: batched into one exec (what
//! `Spawner::poll` does when polls arrive together) versus one exec per
//! server over the same pool. Run as root with the testbed up:
//! `cargo bench --bench poll` (`BENCH_SERVERS`, default 200).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ssh_spawner::config::Config;
use ssh_spawner::plan::poll::{self, Proc};
use ssh_spawner::plan::state::ServerState;
use ssh_spawner::spawner::{PollOutcome, Progress, SpawnRequest, Spawner};
use ssh_spawner::ssh::Command;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let Some(tb) = common::testbed("bench poll") else {
        return;
    };
    let n: usize = std::env::var("BENCH_SERVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let host = &tb.hosts[0];
    let text = format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nfacts_cache = 60\n[[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        host.address,
        host.name
    );
    let config: Config = toml::from_str(&text).expect("config");
    let sp = Spawner::new(config).expect("spawner");
    let user = tb.alice().name.clone();

    // Light stand-ins for servers: a shell sleeping.
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (sp, user, sem) = (sp.clone(), user.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let req = SpawnRequest {
                username: user,
                ..Default::default()
            };
            sp.spawn(
                &req,
                |_| Vec::new(),
                &["sleep".to_string(), "3600".to_string()],
                &Progress::new(),
            )
            .await
            .expect("spawn")
        }));
    }
    let mut states: Vec<ServerState> = Vec::new();
    for t in tasks {
        states.push(t.await.expect("task"));
    }
    eprintln!(
        "started {n} stand-in servers in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let target = sp.target(&sp.config().hosts[0], &user).expect("target");
    let procs: Vec<Proc> = states.iter().map(|s| s.proc().expect("launched")).collect();

    let rounds = 5;
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    let mut batched_execs = 0;
    for _ in 0..rounds {
        let before = sp.poll_execs();
        let t = Instant::now();
        let polls: Vec<_> = states
            .iter()
            .map(|s| {
                let (sp, s) = (sp.clone(), s.clone());
                tokio::spawn(async move { sp.poll(&s).await })
            })
            .collect();
        for p in polls {
            assert!(matches!(p.await.expect("task"), PollOutcome::Running));
        }
        batched.push(t.elapsed());
        batched_execs = sp.poll_execs() - before;

        let t = Instant::now();
        let polls: Vec<_> = procs
            .iter()
            .map(|p| {
                let (pool, target, p) = (sp.pool().clone(), target.clone(), p.clone());
                tokio::spawn(async move {
                    let script = poll::poll_script(std::slice::from_ref(&p)).expect("script");
                    let out = pool
                        .exec(&target, &Command::new("/bin/sh -s").stdin(script))
                        .await
                        .expect("exec");
                    let parsed = poll::parse_poll(&String::from_utf8_lossy(&out.stdout), &[p])
                        .expect("parse");
                    assert_eq!(parsed[0].1, poll::ProcStatus::Running);
                })
            })
            .collect();
        for p in polls {
            p.await.expect("task");
        }
        single.push(t.elapsed());
    }

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("\nssh-spawner poll benchmark: {n} running servers on {} as {user}, all polled at once, {rounds} rounds (commit {commit})\n", host.name);
    println!("| mode | execs per round | median ms | worst ms |");
    println!("|---|---:|---:|---:|");
    println!(
        "| batched (Spawner::poll) | {batched_execs} | {} | {} |",
        ms(median(batched.clone())),
        ms(*batched.iter().max().expect("rounds"))
    );
    println!(
        "| one exec per server, same pool | {n} | {} | {} |",
        ms(median(single.clone())),
        ms(*single.iter().max().expect("rounds"))
    );
    println!(
        "\nbatching speed-up (median): {:.1}x",
        median(single).as_secs_f64() / median(batched).as_secs_f64()
    );

    let stops: Vec<_> = states
        .iter()
        .map(|s| {
            let (sp, s) = (sp.clone(), s.clone());
            tokio::spawn(async move {
                sp.stop(&s).await.expect("stop");
                let _ = std::fs::remove_dir_all(&s.dir);
            })
        })
        .collect();
    for s in stops {
        s.await.expect("task");
    }
}
