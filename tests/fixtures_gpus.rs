//! What `nvidia-smi` prints (`fixtures/gpus`, see its README.md), read by the
//! parsers and decisions of `plan::gpus`; and the facts script run here,
//! with `sh`, with the testbed's stand-in `nvidia-smi`
//! (`scripts/testbed-nvidia-smi`) first on its PATH, read back by
//! `plan::hosts::parse_facts`. No testbed needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use ssh_spawner::plan::gpus::{
    choose, gpu_uses, parse_compute_apps, parse_gpus, summary, visible_devices, GpuFacts,
    GpuReport, GpuUse, DEFAULT_BUSY_MEMORY_MIB, NVIDIA_SMI_TIMEOUT_SECS,
};
use ssh_spawner::plan::hosts::{facts_script, parse_facts};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(path: &str) -> String {
    let p = root().join("fixtures/gpus").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A set's two outputs, parsed as the facts parser does.
fn report(set: &str) -> GpuReport {
    let (gpus, mut skipped) = parse_gpus(&fixture(&format!("{set}/query-gpu.csv")));
    let (apps, more) = parse_compute_apps(&fixture(&format!("{set}/query-compute-apps.csv")));
    skipped.extend(more);
    assert!(skipped.is_empty(), "{set}: {skipped:?}");
    GpuReport {
        gpus,
        apps,
        skipped,
    }
}

fn indices(facts: &GpuFacts, n: usize) -> Result<Vec<u32>, String> {
    choose(facts, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB, n)
        .map(|g| g.iter().map(|g| g.index).collect())
}

#[test]
fn four_a100s_one_busy_with_another_users_process() {
    let r = report("a100x4-one-busy");
    assert_eq!(r.gpus.len(), 4);
    assert!(r
        .gpus
        .iter()
        .all(|g| g.name == "NVIDIA A100-SXM4-40GB" && g.memory_total_mib == Some(40960)));
    let uses = gpu_uses(&r, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB);
    assert_eq!(
        uses[2].1,
        GpuUse::Busy("pid 31337 uses 20480 MiB".into()),
        "{uses:?}"
    );
    let facts = GpuFacts::Ok(r);
    assert_eq!(indices(&facts, 3), Ok(vec![1, 3, 0]));
    assert_eq!(
        indices(&facts, 4),
        Err("3 of 4 GPUs free (GPU 2 busy: pid 31337 uses 20480 MiB)".into())
    );
    let s = summary(&facts, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB)
        .unwrap()
        .unwrap();
    assert_eq!((s.count, s.free), (4, 3));
    assert_eq!(s.models_text(), "4 × NVIDIA A100-SXM4-40GB");
}

#[test]
fn two_idle_rtx_4090s_are_both_free_by_index() {
    let r = report("rtx4090x2-idle");
    assert!(r.apps.is_empty());
    let facts = GpuFacts::Ok(r);
    assert_eq!(indices(&facts, 2), Ok(vec![0, 1]));
    let held: BTreeSet<String> = [facts.gpus()[0].uuid.clone()].into();
    let one = choose(&facts, &held, DEFAULT_BUSY_MEMORY_MIB, 1).unwrap();
    assert_eq!(one[0].index, 1);
    let [(_, cuda), (_, nvidia)] = visible_devices(&one);
    assert_eq!(cuda, "GPU-e8d1c4a2-7b6f-4d3e-a9c0-2f5b8e1d7a43");
    assert_eq!(nvidia, cuda);
    assert_eq!(
        choose(&facts, &held, DEFAULT_BUSY_MEMORY_MIB, 2).unwrap_err(),
        "1 of 2 GPUs free (GPU 0 held by a server)"
    );
}

#[test]
fn mixed_models_a_small_process_does_not_take_a_gpu() {
    let r = report("mixed");
    let facts = GpuFacts::Ok(r);
    let s = summary(&facts, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB)
        .unwrap()
        .unwrap();
    assert_eq!(
        s.models_text(),
        "1 × NVIDIA H100 80GB HBM3, 1 × NVIDIA A100-PCIE-40GB, 1 × NVIDIA L40S, 1 × Tesla T4"
    );
    // The H100 runs a 60 GB job; the L40S has a 506 MiB process over the
    // default amount, but under 1 GiB.
    assert_eq!(s.free, 2);
    assert_eq!(indices(&facts, 2), Ok(vec![3, 1]));
    let free_1g: Vec<u32> = choose(&facts, &BTreeSet::new(), 1024, 3)
        .unwrap()
        .iter()
        .map(|g| g.index)
        .collect();
    assert_eq!(free_1g, [3, 1, 2]);
}

#[test]
fn na_and_not_supported_fields_and_an_unreported_process_size() {
    let r = report("na-fields");
    assert_eq!(r.gpus[0].utilization, None);
    assert_eq!(r.gpus[1].utilization, None);
    assert_eq!(r.apps[0].used_memory_mib, None);
    let facts = GpuFacts::Ok(r);
    // A process of unknown size takes its GPU: only the GT 730 is free.
    assert_eq!(indices(&facts, 1), Ok(vec![1]));
}

/// Run the facts script here with `sh`, `dir` (if any) first on the PATH,
/// the stand-in reading `set`.
fn facts_here(dir: Option<&Path>, set: &str) -> String {
    let scratch = std::env::temp_dir().join(format!("ssp-gpus-{}-{set}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let selection = scratch.join("selected");
    std::fs::write(&selection, format!("{set}\n")).unwrap();
    let path = match dir {
        Some(d) => format!("{}:/usr/bin:/bin", d.display()),
        None => "/usr/bin:/bin".into(),
    };
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(facts_script(None))
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/root")
        .env("NVIDIA_SMI_STANDIN_SELECTION", &selection)
        .env("NVIDIA_SMI_STANDIN_FIXTURES", root().join("fixtures/gpus"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&scratch).unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A directory holding the stand-in as `nvidia-smi`.
fn standin_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssp-standin-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let link = d.join("nvidia-smi");
    if !link.exists() {
        std::os::unix::fs::symlink(root().join("scripts/testbed-nvidia-smi"), &link).unwrap();
    }
    d
}

#[test]
fn the_facts_script_reads_gpus_from_the_stand_in_and_the_rest_as_before() {
    assert!(
        !Command::new("/bin/sh")
            .args(["-c", "PATH=/usr/bin:/bin command -v nvidia-smi"])
            .status()
            .unwrap()
            .success(),
        "this machine has an nvidia-smi: the no-GPU case cannot be run here"
    );
    let bin = standin_dir();
    for set in ["a100x4-one-busy", "rtx4090x2-idle", "mixed", "na-fields"] {
        let text = facts_here(Some(&bin), set);
        let f = parse_facts(&text).unwrap_or_else(|e| panic!("{set}: {e}\n{text}"));
        assert_eq!(f.gpus, GpuFacts::Ok(report(set)), "{set}\n{text}");
        assert!(f.cpus > 0 && f.home == "/root", "{f:?}");
    }
    // Failing: why, with what it printed; the other figures still there.
    let text = facts_here(Some(&bin), "fails-driver");
    let f = parse_facts(&text).unwrap();
    assert_eq!(
        f.gpus,
        GpuFacts::Failed {
            reason: format!(
                "nvidia-smi --query-gpu exited with status 9: {}",
                fixture("fails-driver/output.txt").trim()
            )
        }
    );
    assert!(
        f.cpus > 0 && f.mem_total > 0 && !f.boot_id.is_empty(),
        "{f:?}"
    );
    let f = parse_facts(&facts_here(Some(&bin), "fails-mismatch")).unwrap();
    assert_eq!(
        f.gpus,
        GpuFacts::Failed {
            reason: "nvidia-smi --query-gpu exited with status 18: Failed to initialize NVML: \
                     Driver/library version mismatch NVML library version: 535.161"
                .into()
        }
    );
    // No nvidia-smi on the PATH: no GPUs, not an error.
    let f = parse_facts(&facts_here(None, "a100x4-one-busy")).unwrap();
    assert_eq!(f.gpus, GpuFacts::None);
    assert!(f.cpus > 0 && f.mem_total > 0, "{f:?}");
    std::fs::remove_dir_all(&bin).unwrap();
}

#[test]
fn facts_of_a_testbed_host_without_nvidia_smi() {
    // fixtures/gpus/README.md: captured over SSH from node1.
    let f = parse_facts(&fixture("facts-node1-no-nvidia-smi.txt")).unwrap();
    assert_eq!(f.gpus, GpuFacts::None);
    assert_eq!(f.hostname, "node1");
    assert_eq!(f.home, "/home/tb-alice");
    assert!(f.listening.contains(&22));
    assert_eq!(
        summary(&f.gpus, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB),
        None
    );
}

#[test]
fn a_hung_nvidia_smi_is_cut_off_and_the_other_figures_still_come() {
    let dir = std::env::temp_dir().join(format!("ssp-hung-smi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let smi = dir.join("nvidia-smi");
    std::fs::write(&smi, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The script as sent, with a 1 s bound instead of NVIDIA_SMI_TIMEOUT_SECS.
    let script = facts_script(None).replace(
        &format!("gpu_timeout='{NVIDIA_SMI_TIMEOUT_SECS}'"),
        "gpu_timeout='1'",
    );
    assert_ne!(script, facts_script(None));
    let started = std::time::Instant::now();
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
        .env("HOME", "/root")
        .output()
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
    let f = parse_facts(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        f.gpus,
        GpuFacts::Failed {
            reason: format!(
                "nvidia-smi --query-gpu did not answer within {NVIDIA_SMI_TIMEOUT_SECS} s"
            )
        }
    );
    assert!(f.cpus > 0 && f.mem_total > 0, "{f:?}");
}

/// The facts of a host (node1's recorded report) with a GPU set's output.
fn host_with(set: Option<&str>) -> ssh_spawner::plan::hosts::HostFacts {
    let mut f = parse_facts(
        "hostname=node1\nhome=/home/tb-alice\nuid=1001\nmem_total_kb=8000000\n\
         mem_available_kb=4000000\ncpus=4\nload1=0.1\nservers=0\n",
    )
    .unwrap();
    f.gpus = match set {
        Some(set) => GpuFacts::Ok(report(set)),
        None => GpuFacts::None,
    };
    f
}

#[test]
fn a_gpu_spawn_goes_only_to_a_host_with_enough_free_gpus() {
    use ssh_spawner::plan::hosts::{rank, Candidate, Requirements, Strategy};
    let (a100, rtx, none) = (
        host_with(Some("a100x4-one-busy")),
        host_with(Some("rtx4090x2-idle")),
        host_with(None),
    );
    let failed = {
        let mut f = host_with(None);
        f.gpus = GpuFacts::Failed {
            reason: "nvidia-smi --query-gpu exited with status 9".into(),
        };
        f
    };
    let cand = |name, f| Candidate {
        name,
        max_servers: None,
        draining: false,
        facts: Ok(f),
        held_gpus: BTreeSet::new(),
        gpu_busy_memory_mib: DEFAULT_BUSY_MEMORY_MIB,
    };
    let mut cands = vec![
        cand("node1", &a100),
        cand("node2", &rtx),
        cand("node3", &none),
        cand("node4", &failed),
    ];
    let need = |gpus| Requirements {
        gpus,
        ..Requirements::default()
    };
    for strategy in [
        Strategy::Random,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        for rr in 0..4 {
            let mut rng = rand::rng();
            // No GPUs asked: every host fits, with or without GPUs.
            assert_eq!(
                rank(&cands, &need(0), strategy, rr, &mut rng)
                    .unwrap()
                    .len(),
                4
            );
            // 2: node1 has 3 free (one busy), node2 has 2.
            let mut two = rank(&cands, &need(2), strategy, rr, &mut rng).unwrap();
            two.sort();
            assert_eq!(two, vec![0, 1], "{strategy:?}");
            // 3: only node1.
            assert_eq!(
                rank(&cands, &need(3), strategy, rr, &mut rng).unwrap(),
                vec![0]
            );
        }
    }
    // Held GPUs are not free, whatever the facts say.
    cands[0].held_gpus = a100.gpus.gpus()[..2]
        .iter()
        .map(|g| g.uuid.clone())
        .collect();
    let err = rank(&cands, &need(3), Strategy::Random, 0, &mut rand::rng())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no host has 3 free GPUs: node1: 1 of 4 GPUs free ("),
        "{err}"
    );
    assert!(err.contains("GPU 0 held by a server; GPU 1 held by a server; GPU 2 busy: pid 31337 uses 20480 MiB), 3 asked"), "{err}");
    assert!(err.contains("node2: 2 of 2 GPUs free, 3 asked"), "{err}");
    assert!(
        err.contains("node3: no GPUs (no nvidia-smi), 3 asked"),
        "{err}"
    );
    assert!(
        err.contains("node4: GPUs unknown (nvidia-smi --query-gpu exited with status 9), 3 asked"),
        "{err}"
    );
    // A larger busy amount counts the 20 GiB job as idle.
    cands[0].gpu_busy_memory_mib = 30_000;
    cands[0].held_gpus.clear();
    assert_eq!(
        rank(&cands, &need(4), Strategy::Random, 0, &mut rand::rng()).unwrap(),
        vec![0]
    );
}

/// The GPU headings of docs/troubleshooting.md are the messages a spawn
/// shows (an admin searches for what the spawn page said), made here from
/// the fixtures by the same decisions.
#[test]
fn troubleshooting_gpu_headings_are_the_messages_spawns_show() {
    use ssh_spawner::plan::hosts::{rank, Candidate, Requirements};
    let doc = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let headings: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    let message = |hosts: &[(&str, &ssh_spawner::plan::hosts::HostFacts, &[u32])], n: u32| {
        let cands: Vec<Candidate> = hosts
            .iter()
            .map(|(name, f, held)| Candidate {
                name,
                max_servers: None,
                draining: false,
                facts: Ok(f),
                held_gpus: f
                    .gpus
                    .gpus()
                    .iter()
                    .filter(|g| held.contains(&g.index))
                    .map(|g| g.uuid.clone())
                    .collect(),
                gpu_busy_memory_mib: DEFAULT_BUSY_MEMORY_MIB,
            })
            .collect();
        let need = Requirements {
            gpus: n,
            ..Requirements::default()
        };
        rank(&cands, &need, Default::default(), 0, &mut rand::rng())
            .unwrap_err()
            .to_string()
    };
    let failing = |status: &str, said: &str| {
        let mut f = host_with(None);
        let lines: Vec<&str> = said.lines().collect();
        f.gpus = ssh_spawner::plan::gpus::from_facts(Some(status), "", "", &lines);
        f
    };
    let (a100, none) = (host_with(Some("a100x4-one-busy")), host_with(None));
    let mismatch = failing("failed query-gpu 18", &fixture("fails-mismatch/output.txt"));
    let hung = failing("failed query-gpu 124", "");
    for want in [
        message(&[("node1", &a100, &[0, 1]), ("node2", &none, &[])], 2),
        message(&[("gpu1", &mismatch, &[])], 1),
        message(&[("gpu1", &hung, &[])], 1),
    ] {
        assert!(
            headings.contains(&want.as_str()),
            "docs/troubleshooting.md has no heading `{want}`; its headings:\n{}",
            headings.join("\n")
        );
    }
}
