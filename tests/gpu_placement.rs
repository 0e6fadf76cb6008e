//! GPUs through the spawner against the testbed's real sshds: node1 gets
//! the stand-in `nvidia-smi` printing four A100s (one busy with another
//! user's job), node2 two idle RTX 4090s, node3 none (`scripts/testbed gpus`,
//! put back to `none` when the test ends, however it ends). A server asking
//! for GPUs lands on a host with enough free, sees exactly its own in its
//! environment (read from `/proc/PID/environ`: nodes 1-3 share this
//! machine's pid namespace), and the run directory lists them; concurrent
//! spawns never share one; a stop releases them.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{testbed, Testbed};
use ssh_spawner::config::Config;
use ssh_spawner::plan::state::ServerState;
use ssh_spawner::spawner::{Progress, SpawnRequest, Spawner};

/// The A100 the fixture's other user's job keeps busy: never given.
const BUSY_A100: &str = "GPU-c2a5f8d1-6e7b-4a3c-9d0e-5b8f1a2c4e36";

/// Gives hosts a stand-in `nvidia-smi`; puts every one back to `none` when
/// dropped, so the shared bed is left as it was found.
struct Gpus<'a> {
    tb: &'a Testbed,
    hosts: Vec<&'static str>,
}

impl<'a> Gpus<'a> {
    fn set(tb: &'a Testbed, sets: &[(&'static str, &str)]) -> Gpus<'a> {
        let g = Gpus {
            tb,
            hosts: sets.iter().map(|(h, _)| *h).collect(),
        };
        for (host, set) in sets {
            g.run(host, set);
        }
        g
    }

    fn run(&self, host: &str, set: &str) {
        let status = std::process::Command::new(Testbed::script())
            .args(["gpus", host, set])
            .status()
            .expect("scripts/testbed gpus");
        assert!(status.success(), "scripts/testbed gpus {host} {set}");
        let _ = self.tb;
    }
}

impl Drop for Gpus<'_> {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = std::process::Command::new(Testbed::script())
                .args(["gpus", host, "none"])
                .status();
        }
    }
}

/// Nodes 1-3 (node4, when up, has no stand-in here: it would get none
/// anyway), facts cached for a minute: every spawn of the test chooses from
/// the same, soon stale, facts, and only the claims keep GPUs apart.
fn config(tb: &Testbed) -> Config {
    let c: Config = toml::from_str(&config_text(tb)).unwrap();
    c.validate().unwrap();
    c
}

/// [`config`] as the text of a configuration file, for the CLI.
fn config_text(tb: &Testbed) -> String {
    let hosts: Vec<String> = tb
        .hosts
        .iter()
        .filter(|h| ["node1", "node2", "node3"].contains(&h.name.as_str()))
        .map(|h| {
            format!(
                "[[hosts]]\naddress = \"{}\"\nname = \"{}\"\n",
                h.address, h.name
            )
        })
        .collect();
    format!(
        "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 5\ncommand_timeout = 20\n\
         stop_grace = 3\nfacts_cache = 60\nready_timeout = 0.5\n{}",
        tb.known_hosts.display(),
        tb.hub_key.display(),
        hosts.join("\n")
    )
}

/// `ssh-spawner list --user USER` (the CLI, a process of its own, with no
/// claims of the test's spawner) with [`config_text`]: its output.
fn list_cli(tb: &Testbed, user: &str) -> String {
    let scratch = common::Scratch::new("gpu-list");
    let file = scratch.path("spawner.toml");
    std::fs::write(&file, config_text(tb)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssh-spawner"))
        .args(["--config", file.to_str().unwrap(), "list", "--user", user])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    text
}

/// `GPU 0 (NVIDIA GeForce RTX 4090)` for each of `uuids`, as `list` names
/// them from the host's `nvidia-smi` (the fixture `set`).
fn named(set: &str, uuids: &[String]) -> Vec<String> {
    let csv = std::fs::read_to_string(format!(
        "{}/fixtures/gpus/{set}/query-gpu.csv",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (gpus, _) = ssh_spawner::plan::gpus::parse_gpus(&csv);
    uuids
        .iter()
        .map(|u| {
            let g = gpus
                .iter()
                .find(|g| g.uuid == *u)
                .expect("a GPU of the set");
            format!("GPU {} ({})", g.index, g.name)
        })
        .collect()
}

fn request(user: &str, gpus: u32) -> SpawnRequest {
    let mut req = SpawnRequest {
        username: user.into(),
        ..Default::default()
    };
    req.requirements.gpus = gpus;
    req
}

/// A hub environment that names other GPUs: the spawner's must win.
fn env(_: &ServerState) -> Vec<(String, String)> {
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into()),
        ("NVIDIA_VISIBLE_DEVICES".into(), "all".into()),
        ("JUPYTERHUB_USER".into(), "gpu-test".into()),
    ]
}

fn cmd() -> Vec<String> {
    vec!["sleep".into(), "2500".into()]
}

fn environ(pid: u32) -> BTreeMap<String, String> {
    let data = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    data.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Stops every server it was given when dropped during a panic.
struct StopAll(Vec<common::StopOnPanic>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_spawns_land_where_gpus_are_free_get_exactly_theirs_and_never_share_one() {
    let Some(tb) =
        testbed("gpu_spawns_land_where_gpus_are_free_get_exactly_theirs_and_never_share_one")
    else {
        return;
    };
    let _gpus = Gpus::set(
        &tb,
        &[("node1", "a100x4-one-busy"), ("node2", "rtx4090x2-idle")],
    );
    let sp = Spawner::new(config(&tb)).unwrap();
    let user = tb.alice().name.clone();
    let mut guards = StopAll(Vec::new());

    // Two GPUs: node1 (3 free) or node2 (2 free), never node3.
    let progress = Progress::new();
    let two = sp
        .spawn(&request(&user, 2), env, &cmd(), &progress)
        .await
        .expect("a 2-GPU spawn");
    guards.0.push(common::StopOnPanic::new(&sp, &two));
    assert!(
        ["node1", "node2"].contains(&two.host.as_str()),
        "{}",
        two.host
    );
    assert_eq!(two.gpus.len(), 2, "{two:?}");
    assert!(!two.gpus.iter().any(|g| g == BUSY_A100), "{:?}", two.gpus);
    let env_seen = environ(two.pid.unwrap());
    let want = two.gpus.join(",");
    assert_eq!(env_seen.get("CUDA_VISIBLE_DEVICES"), Some(&want));
    assert_eq!(env_seen.get("NVIDIA_VISIBLE_DEVICES"), Some(&want));
    let file = format!("{}/gpus", two.dir);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("{}\n", two.gpus.join("\n"))
    );
    assert_eq!(common::mode_of(std::path::Path::new(&file)), 0o600);
    let said = common::messages(&progress);
    assert!(
        said.iter()
            .any(|m| m.starts_with(&format!("GPUs assigned on {}: GPU ", two.host))),
        "{said:?}"
    );
    // Its state round-trips with the GPUs.
    let decoded =
        ssh_spawner::plan::state::decode(&ssh_spawner::plan::state::encode(&two).unwrap()).unwrap();
    assert_eq!(decoded.gpus, two.gpus);
    // `ssh-spawner list`, which knows nothing of this spawner's claims,
    // names the holder and its GPUs from the host's run directory: in the
    // server's row, and in the host's line under the table.
    let set = if two.host == "node1" {
        "a100x4-one-busy"
    } else {
        "rtx4090x2-idle"
    };
    let names = named(set, &two.gpus);
    let listed = list_cli(&tb, &user);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&format!("{} ", two.host)) && l.contains(&two.run_id))
        .unwrap_or_else(|| panic!("no row of {} on {}:\n{listed}", two.run_id, two.host));
    assert!(
        row.ends_with(&format!(" {}", names.join(", "))),
        "{row}\n{listed}"
    );
    let line = listed
        .lines()
        .find(|l| l.starts_with(&format!("{}: GPU ", two.host)))
        .unwrap_or_else(|| panic!("no GPU line of {}:\n{listed}", two.host));
    // Each of its GPUs names it among the holders (on the bed, a server of
    // the other test, on its own sshd in node1's namespace with the same
    // stand-in UUIDs, shows up on every host too: one process table, one
    // home).
    let rest = line.split_once(": ").unwrap().1;
    for name in &names {
        let index = name.split(' ').nth(1).unwrap();
        let holders = rest
            .split("; ")
            .find_map(|part| part.strip_prefix(&format!("GPU {index} ")))
            .unwrap_or_else(|| panic!("GPU {index} not in {line}"));
        assert!(
            holders
                .split(", ")
                .any(|h| h == format!("{user}/{}", two.run_id)),
            "{line}"
        );
    }
    // Another login cannot read the run directory: `?`, not "no GPUs".
    let bob = list_cli(&tb, &tb.bob().name);
    let row = bob
        .lines()
        .find(|l| l.starts_with(&format!("{} ", two.host)) && l.contains(&two.run_id))
        .unwrap_or_else(|| panic!("no row of {} as bob:\n{bob}", two.run_id));
    assert!(row.ends_with(" ?"), "{row}");
    // The GPU gauges of /hub/metrics, from this process's table: the
    // host's GPUs, the two held, and on node1 the A100 another user's job
    // keeps busy.
    let gauges = |host: &str| {
        ssh_spawner::metrics::snapshot()
            .gpus
            .into_iter()
            .find(|(h, _)| h == host)
            .map(|(_, c)| (c.total, c.held, c.busy))
    };
    let (total, busy) = if two.host == "node1" { (4, 1) } else { (2, 0) };
    assert_eq!(gauges(&two.host), Some((total, 2, busy)));
    sp.stop(&two).await.unwrap();
    assert_eq!(gauges(&two.host), Some((total, 0, busy)), "after the stop");
    assert!(sp.held_gpus(&two.host).is_empty(), "stop released them");

    // Twenty one-GPU spawns at once, from the same cached facts: the five
    // free GPUs (3 on node1, 2 on node2) each go to one server, the other
    // fifteen are refused saying why.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (sp, user) = (sp.clone(), user.clone());
            tokio::spawn(async move {
                sp.spawn(&request(&user, 1), env, &cmd(), &Progress::new())
                    .await
            })
        })
        .collect();
    let mut servers = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => {
                guards.0.push(common::StopOnPanic::new(&sp, &s));
                servers.push(s);
            }
            Err(e) => refused.push(e.to_string()),
        }
    }
    let given: Vec<&String> = servers.iter().flat_map(|s| &s.gpus).collect();
    let distinct: BTreeSet<&String> = given.iter().copied().collect();
    assert_eq!(given.len(), distinct.len(), "a GPU given twice: {given:?}");
    assert_eq!((servers.len(), refused.len()), (5, 15), "{refused:?}");
    assert!(!distinct.contains(&BUSY_A100.to_string()));
    for s in &servers {
        assert_eq!(
            environ(s.pid.unwrap()).get("CUDA_VISIBLE_DEVICES"),
            Some(&s.gpus[0])
        );
    }
    for e in &refused {
        assert!(e.contains("no host has 1 free GPU"), "{e}");
        assert!(e.contains("node1: 0 of 4 GPUs free"), "{e}");
        assert!(e.contains("node2: 0 of 2 GPUs free"), "{e}");
        assert!(e.contains("node3: no GPUs (no nvidia-smi), 1 asked"), "{e}");
    }

    // A stop releases: the next spawn gets that GPU again.
    let on_node2 = servers
        .iter()
        .position(|s| s.host == "node2")
        .expect("a server on node2");
    let freed = servers.remove(on_node2);
    let stopped = sp.stop(&freed).await.unwrap();
    let held = |h: &str| sp.held_gpus(h);
    assert!(
        !held("node2").contains(&freed.gpus[0]),
        "stop ({stopped}) did not release {:?}: node2 holds {:?}",
        freed.gpus,
        held("node2")
    );
    let again = sp
        .spawn(&request(&user, 1), env, &cmd(), &Progress::new())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the freed GPU: {e}; stop said {stopped}; held on node1 {:?}, node2 {:?}; freed {} on {}",
                held("node1"),
                held("node2"),
                freed.run_id,
                freed.host
            )
        });
    guards.0.push(common::StopOnPanic::new(&sp, &again));
    assert_eq!((again.host.as_str(), &again.gpus), ("node2", &freed.gpus));
    servers.push(again);

    for s in &servers {
        sp.stop(s).await.unwrap();
    }
    for host in ["node1", "node2"] {
        assert!(sp.held_gpus(host).is_empty(), "{host}");
    }
    // Without GPUs asked, a server on a host with GPUs sees none.
    let mut plain = request(&user, 0);
    plain.host = Some("node2".into());
    let none = sp
        .spawn(&plain, env, &cmd(), &Progress::new())
        .await
        .unwrap();
    guards.0.push(common::StopOnPanic::new(&sp, &none));
    let seen = environ(none.pid.unwrap());
    assert_eq!(
        seen.get("CUDA_VISIBLE_DEVICES").map(String::as_str),
        Some("")
    );
    assert_eq!(
        seen.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str),
        Some("void")
    );
    assert!(!std::path::Path::new(&format!("{}/gpus", none.dir)).exists());
    sp.stop(&none).await.unwrap();
}

/// A stand-in `nvidia-smi` printing `set` on the PATH of an sshd of the
/// test's own (the bed's sshds are left alone: this one can be blackholed),
/// and a configuration with it as host `gpu1` alone.
fn own_gpu_host(tb: &Testbed, scratch: &common::Scratch, set: &str) -> (common::OwnSshd, Config) {
    let path = common::standin_nvidia_smi(scratch, &[set]);
    let sshd = common::OwnSshd::start(tb, &[("SetEnv", &path)]);
    let mut c = config(tb);
    c.known_hosts = common::known_hosts_with(tb, &sshd, scratch);
    c.connect_timeout = 2.0;
    c.command_timeout = 4.0;
    c.facts_cache = 0.0;
    let mut host: ssh_spawner::config::HostConfig =
        toml::from_str(&format!("address = \"{}\"\nname = \"gpu1\"", sshd.address)).unwrap();
    host.port = sshd.port;
    c.hosts = vec![host];
    (sshd, c)
}

/// A one-GPU server of alice's on an sshd of the test's own whose stand-in
/// `nvidia-smi` shows two idle GPUs (host `gpu1`), with the spawner that
/// started it and its configuration.
async fn one_gpu_server_on_own_host(
    tb: &Testbed,
    tag: &str,
) -> (
    common::Scratch,
    common::OwnSshd,
    Config,
    Spawner,
    ServerState,
) {
    let scratch = common::Scratch::new(tag);
    let (sshd, cfg) = own_gpu_host(tb, &scratch, "rtx4090x2-idle");
    let sp = Spawner::new(cfg.clone()).unwrap();
    let first = sp
        .spawn(&request(&tb.alice().name, 1), env, &cmd(), &Progress::new())
        .await
        .unwrap();
    (scratch, sshd, cfg, sp, first)
}

#[tokio::test]
async fn a_held_gpu_is_not_given_away_while_its_host_does_not_answer() {
    let Some(tb) = testbed("a_held_gpu_is_not_given_away_while_its_host_does_not_answer") else {
        return;
    };
    let (_scratch, sshd, _, sp, first) = one_gpu_server_on_own_host(&tb, "gpu-outage").await;
    let user = tb.alice().name.clone();
    let _stop_first = common::StopOnPanic::new(&sp, &first);
    let held = BTreeSet::from([first.gpus[0].clone()]);
    assert_eq!(sp.held_gpus("gpu1"), held);

    // The host stops answering: a poll cannot say, a stop cannot reach it;
    // the server may run on, so its GPU stays held.
    sshd.blackhole();
    let polled = sp.poll(&first).await;
    assert!(
        matches!(polled, ssh_spawner::spawner::PollOutcome::Unknown(_)),
        "{polled:?}"
    );
    assert_eq!(
        sp.held_gpus("gpu1"),
        held,
        "after a poll that could not ask"
    );
    let stopped = sp.stop(&first).await;
    assert!(stopped.is_err(), "{stopped:?}");
    assert_eq!(
        sp.held_gpus("gpu1"),
        held,
        "after a stop that could not reach"
    );
    sshd.heal();

    // Once it answers, a new server gets the other GPU, and a third finds
    // none free: the first still runs there with its GPU.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let second = loop {
        match sp
            .spawn(&request(&user, 1), env, &cmd(), &Progress::new())
            .await
        {
            Ok(s) => break s,
            // Marked down by the outage until the probe finds it back.
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("down") => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let _stop_second = common::StopOnPanic::new(&sp, &second);
    assert_ne!(second.gpus, first.gpus);
    let third = sp
        .spawn(&request(&user, 1), env, &cmd(), &Progress::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(third.contains("gpu1: 0 of 2 GPUs free"), "{third}");
    assert!(matches!(
        sp.poll(&first).await,
        ssh_spawner::spawner::PollOutcome::Running
    ));
    sp.stop(&first).await.unwrap();
    sp.stop(&second).await.unwrap();
    assert!(sp.held_gpus("gpu1").is_empty());
}

#[tokio::test]
async fn a_restarted_hub_holds_the_gpus_of_a_pending_stop_until_the_stop_is_done() {
    let Some(tb) =
        testbed("a_restarted_hub_holds_the_gpus_of_a_pending_stop_until_the_stop_is_done")
    else {
        return;
    };
    let (scratch, sshd, cfg, sp, first) = one_gpu_server_on_own_host(&tb, "gpu-pending").await;
    let _stop_first = common::StopOnPanic::new(&sp, &first);
    let held = BTreeSet::from([first.gpus[0].clone()]);

    // The hub stopped it while its host did not answer (a pending stop in
    // the journal), then restarted: the new process's claims start empty,
    // and nothing it polls names that server any more.
    sshd.blackhole();
    let journal = ssh_spawner::journal::Journal::new(scratch.path("journal").to_str().unwrap());
    let text = ssh_spawner::plan::state::encode(&first).unwrap();
    journal
        .stops()
        .write(&text, ssh_spawner::journal::this_process())
        .unwrap();
    let restarted = Spawner::new(cfg).unwrap();
    assert!(restarted.held_gpus("gpu1").is_empty());
    let retry = std::time::Duration::from_millis(500);
    ssh_spawner::pending::ensure_retrier(&restarted, &journal, retry, true);
    let holds = common::until_true(std::time::Duration::from_secs(30), || {
        restarted.held_gpus("gpu1") == held
    })
    .await;
    assert!(
        holds,
        "the retrier did not hold the pending stop's GPU: {:?}",
        restarted.held_gpus("gpu1")
    );

    // Back: the retrier stops it and only then lets the GPU go.
    sshd.heal();
    let freed = common::until_true(std::time::Duration::from_secs(60), || {
        restarted.held_gpus("gpu1").is_empty()
    })
    .await;
    assert!(
        freed,
        "the pending stop did not free its GPU: {:?}",
        restarted.held_gpus("gpu1")
    );
    assert!(
        journal.stops().read_all().0.is_empty(),
        "the pending stop is done"
    );
    let polled = restarted.poll(&first).await;
    assert!(
        matches!(polled, ssh_spawner::spawner::PollOutcome::Exited { .. }),
        "the server is gone: {polled:?}"
    );
}
