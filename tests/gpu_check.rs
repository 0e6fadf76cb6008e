//! `scripts/gpu-check` against the testbed: node2 gets the stand-in
//! `nvidia-smi` printing two idle RTX 4090s (put back to `none` when the
//! test ends, however it ends), and the script spawns on it through the CLI.
//!
//! The bed has no GPU and no CUDA driver. Without `libcuda.so.1` the script
//! must fail saying so. The other cases use a **stand-in** `libcuda.so.1`,
//! compiled here, that proves the script's plumbing and nothing of CUDA:
//! its `cuDeviceGetCount` counts the entries of the `CUDA_VISIBLE_DEVICES`
//! the spawner gave the server (both of node2's GPUs when it is unset, as the
//! driver shows every GPU then; or returns `STANDIN_CUDA_COUNT`), and its
//! `cuInit` returns `STANDIN_CUINIT` (default 0). With it the script passes
//! on one device and fails, saying why, on two, on zero, and on a failing
//! `cuInit`. Each run stops its server.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{testbed, Testbed};

/// The stand-in driver library (see the module docs): not CUDA.
const STANDIN_LIBCUDA: &str = r#"
/* Stand-in for libcuda.so.1 in tests/gpu_check.rs: plumbing only, not CUDA. */
#include <stdlib.h>
int cuInit(unsigned int flags) {
    const char *e = getenv("STANDIN_CUINIT");
    (void)flags;
    return e ? atoi(e) : 0;
}
int cuDeviceGetCount(int *n) {
    const char *o = getenv("STANDIN_CUDA_COUNT");
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    int c = 0;
    if (o) { *n = atoi(o); return 0; }
    /* Unset: every GPU of the host, as the driver does (node2's two). */
    if (!v) { *n = 2; return 0; }
    if (*v) { c = 1; for (; *v; v++) if (*v == ',') c++; }
    *n = c;
    return 0;
}
int cuGetErrorName(int rc, const char **s) {
    if (rc == 100) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
    return 1;
}
"#;

/// Puts node2's `nvidia-smi` back to none when dropped.
struct Node2Gpus;

impl Drop for Node2Gpus {
    fn drop(&mut self) {
        let _ = Command::new(Testbed::script())
            .args(["gpus", "node2", "none"])
            .status();
    }
}

/// The stand-in built into `dir` (`None` without a C compiler).
fn standin(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("standin-libcuda.c");
    std::fs::write(&src, STANDIN_LIBCUDA).unwrap();
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib.join("libcuda.so.1"))
        .arg(&src)
        .output()
        .ok()?;
    assert!(out.status.success(), "cc: {out:?}");
    Some(lib)
}

/// `scripts/gpu-check` with `config` as tb-alice and `env`: (exit code, stdout).
fn gpu_check(config: &Path, user: &str, env: &[String]) -> (i32, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(repo.join("scripts/gpu-check"));
    cmd.arg("--config")
        .arg(config)
        .args(["--user", user, "--cli", env!("CARGO_BIN_EXE_ssh-spawner")])
        .args(["--timeout", "20"]);
    for e in env {
        cmd.args(["--env", e]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// The run id the script named, and that no process of it is left.
fn assert_stopped(said: &str) {
    let run = said
        .split("gpu-check: server ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or_else(|| panic!("no server named:\n{said}"));
    assert!(
        said.contains("gpu-check: server stopped: node2: "),
        "{said}"
    );
    let ps = Command::new("pgrep")
        .args(["-f", &format!("ssh-spawner-run:{run}")])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "left running: {ps:?}\n{said}");
}

#[test]
fn gpu_check_fails_clearly_without_libcuda_and_checks_the_device_count_through_a_standin() {
    let Some(tb) = testbed(
        "gpu_check_fails_clearly_without_libcuda_and_checks_the_device_count_through_a_standin",
    ) else {
        return;
    };
    let scratch = common::Scratch::new("gpu-check");
    let node2 = tb.host("node2");
    let config = scratch.path("spawner.toml");
    std::fs::write(
        &config,
        format!(
            "known_hosts = \"{}\"\nkey_path = \"{}\"\nconnect_timeout = 5\n\
             command_timeout = 20\nstop_grace = 2\nready_timeout = 0.5\n\
             [[hosts]]\naddress = \"{}\"\nname = \"node2\"\n",
            tb.known_hosts.display(),
            tb.hub_key.display(),
            node2.address
        ),
    )
    .unwrap();
    let status = Command::new(Testbed::script())
        .args(["gpus", "node2", "rtx4090x2-idle"])
        .status()
        .unwrap();
    let _none = Node2Gpus;
    assert!(status.success());
    let user = tb.alice().name.clone();

    // The bed has no CUDA driver: a clear failure, and the server stopped.
    let (code, said) = gpu_check(&config, &user, &[]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("GPU assigned: GPU-"), "{said}");
    assert!(
        said.contains(
            "gpu-check: FAIL: libcuda.so.1 could not be loaded in the server's environment"
        ),
        "{said}"
    );
    assert_stopped(&said);

    let Some(lib) = standin(&scratch.0) else {
        eprintln!("gpu_check: no C compiler, the stand-in libcuda.so.1 cases are not run");
        return;
    };
    let ld = format!("LD_LIBRARY_PATH={}", lib.display());

    // One device visible: PASS, naming the GPU the spawner gave.
    let (code, said) = gpu_check(&config, &user, std::slice::from_ref(&ld));
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("cuDeviceGetCount: 1\n"), "{said}");
    assert!(
        said.contains("gpu-check: PASS: 1 CUDA device visible, as expected"),
        "{said}"
    );
    // A program that drops the variable sees both GPUs: nothing fences them.
    assert!(
        said.contains("gpu-check: note: a program in the server that unsets CUDA_VISIBLE_DEVICES sees 2 CUDA devices: the other GPUs are not fenced off"),
        "{said}"
    );
    let assigned = said
        .split("GPU assigned: ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap();
    assert!(
        said.contains(&format!("CUDA_VISIBLE_DEVICES in the server: '{assigned}'")),
        "{said}"
    );
    assert_stopped(&said);

    // Two, zero, a failing cuInit: FAIL with the reason, server stopped.
    for (extra, reason) in [
        (
            "STANDIN_CUDA_COUNT=2",
            "gpu-check: FAIL: 2 CUDA devices visible, 1 expected",
        ),
        (
            "STANDIN_CUDA_COUNT=0",
            "gpu-check: FAIL: 0 CUDA devices visible, 1 expected",
        ),
        (
            "STANDIN_CUINIT=100",
            "gpu-check: FAIL: cuInit(0) failed with CUresult 100 CUDA_ERROR_NO_DEVICE",
        ),
    ] {
        let (code, said) = gpu_check(&config, &user, &[ld.clone(), extra.to_string()]);
        assert_eq!(code, 1, "{extra}: {said}");
        assert!(said.contains(reason), "{extra}: {said}");
        assert_stopped(&said);
    }
}
