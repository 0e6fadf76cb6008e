//! Exec latency and throughput through the pool versus a fresh SSH
//! connection per exec (how the other SSH spawners work), against a real
//! sshd of the testbed. Run with `scripts/bench-ssh` or
//! `cargo bench --bench pool` (as root, with the testbed up).
//!
//! `BENCH_N` sets the number of execs per row (default 1000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use ssh_spawner::ssh::{Command, Pool};

struct Row {
    name: &'static str,
    samples: Vec<Duration>,
    wall: Duration,
    concurrency: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn run(
    n: usize,
    concurrency: usize,
    make: impl Fn() -> Option<Pool> + Send + Sync + 'static,
    shared: Option<Pool>,
    target: ssh_spawner::ssh::Target,
) -> (Vec<Duration>, Duration) {
    let make = std::sync::Arc::new(make);
    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let make = make.clone();
        let shared = shared.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let fresh = shared.is_none();
            let pool = shared.or_else(|| make()).expect("a pool");
            let t = Instant::now();
            let out = pool
                .exec(&target, &Command::new("true"))
                .await
                .expect("exec");
            let took = t.elapsed();
            assert!(out.success());
            if fresh {
                pool.close_all().await;
            }
            drop(permit);
            took
        }));
    }
    let mut samples = Vec::with_capacity(n);
    for t in tasks {
        samples.push(t.await.expect("task"));
    }
    (samples, started.elapsed())
}

#[tokio::main]
async fn main() {
    let Some(tb) = common::testbed("bench pool") else {
        return;
    };
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let target = tb.target("node1", &tb.alice().name);
    let opts = tb.pool_options();

    let pooled = Pool::new(opts.clone());
    // Warm the pool: one handshake, outside the measurement.
    pooled
        .exec(&target, &Command::new("true"))
        .await
        .expect("warm-up");

    let mut rows = Vec::new();
    for (name, concurrency, fresh) in [
        ("pooled, one at a time", 1, false),
        ("fresh connection, one at a time", 1, true),
        ("pooled, 10 at once", 10, false),
        ("fresh connection, 10 at once", 10, true),
    ] {
        let o = opts.clone();
        let (samples, wall) = if fresh {
            run(
                n,
                concurrency,
                move || Some(Pool::new(o.clone())),
                None,
                target.clone(),
            )
            .await
        } else {
            run(
                n,
                concurrency,
                || None,
                Some(pooled.clone()),
                target.clone(),
            )
            .await
        };
        rows.push(Row {
            name,
            samples,
            wall,
            concurrency,
        });
    }

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "\nssh-spawner pool benchmark: {n} execs of `true` per row against OpenSSH on the testbed"
    );
    println!(
        "commit {commit}, {} CPUs ({cpu})\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| mode | concurrency | p50 ms | p99 ms | mean ms | execs/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut p50s = Vec::new();
    for row in &mut rows {
        row.samples.sort();
        let mean = row.samples.iter().sum::<Duration>() / row.samples.len().max(1) as u32;
        let p50 = percentile(&row.samples, 50.0);
        p50s.push(p50);
        println!(
            "| {} | {} | {} | {} | {} | {:.0} |",
            row.name,
            row.concurrency,
            ms(p50),
            ms(percentile(&row.samples, 99.0)),
            ms(mean),
            row.samples.len() as f64 / row.wall.as_secs_f64()
        );
    }
    let ratio = p50s[1].as_secs_f64() / p50s[0].as_secs_f64();
    println!(
        "\nfresh / pooled p50 latency: {ratio:.1}x (target: at least 5x) {}",
        if ratio >= 5.0 { "MET" } else { "MISSED" }
    );
    println!(
        "handshakes by the pooled rows: {}",
        pooled.stats().handshakes
    );
}
