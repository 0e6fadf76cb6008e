//! What the tests of the remote scripts share: they run the scripts with
//! the local `/bin/sh` (dash on Debian, like the hosts) and inspect
//! `/proc`. They run as root here, so the uid checks compare against 0;
//! nothing in them depends on that.

use super::launch::{launch_command, launch_script, parse_launch, LaunchSpec, Launched};
use super::limits::LimitPlan;
use super::poll::{parse_poll, poll_script, Proc, ProcStatus};
use super::run::{marker, RUN_MARKER};
use super::stop::{parse_stop, stop_script, Stopped};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(crate) fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}{}-{n}-{nanos:x}", std::process::id())
}

/// A scratch directory under /tmp, removed on drop.
pub(crate) struct Tmp(pub(crate) PathBuf);
impl Tmp {
    pub(crate) fn new() -> Tmp {
        let p = PathBuf::from(format!("/tmp/{}", unique("ssh-spawner-script-")));
        fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
    pub(crate) fn join(&self, rest: &str) -> String {
        self.0.join(rest).to_str().unwrap().to_string()
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) status: i32,
    pub(crate) stdout_bytes: Vec<u8>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) elapsed: Duration,
}

/// Runs `script` as `/bin/sh -s` with the script on stdin, like the
/// remote side does; `timeout` keeps a broken script from hanging the suite.
pub(crate) fn sh(script: &str) -> Out {
    sh_argv(&["/bin/sh", "-s"], script)
}

/// Runs `argv` (a `/bin/sh -s` of some form) with `script` on stdin,
/// under `timeout 60`.
pub(crate) fn sh_argv(argv: &[&str], script: &str) -> Out {
    let t0 = Instant::now();
    let mut child = Command::new("timeout")
        .arg("60")
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = script.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&text);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    Out {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stdout_bytes: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: t0.elapsed(),
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub(crate) state: char,
    pub(crate) ppid: u32,
    pub(crate) pgrp: u32,
    pub(crate) session: u32,
    pub(crate) start: u64,
}

pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let s = String::from_utf8_lossy(&raw);
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    if f.len() < 20 {
        return None;
    }
    Some(Stat {
        state: f[0].chars().next()?,
        ppid: f[1].parse().ok()?,
        pgrp: f[2].parse().ok()?,
        session: f[3].parse().ok()?,
        start: f[19].parse().ok()?,
    })
}

/// Alive and not a zombie, and (when given) still the same process.
pub(crate) fn alive(pid: u32, start: Option<u64>) -> bool {
    match stat(pid) {
        Some(s) => s.state != 'Z' && s.state != 'X' && start.is_none_or(|t| t == s.start),
        None => false,
    }
}

pub(crate) fn all_procs() -> Vec<(u32, Stat)> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if let Some(s) = stat(pid) {
                v.push((pid, s));
            }
        }
    }
    v
}

pub(crate) fn descendants(roots: &[u32]) -> Vec<(u32, u64)> {
    let procs = all_procs();
    let mut set: Vec<u32> = roots.to_vec();
    let mut out = Vec::new();
    loop {
        let mut more = false;
        for (pid, s) in &procs {
            if set.contains(&s.ppid) && !set.contains(pid) {
                set.push(*pid);
                out.push((*pid, s.start));
                more = true;
            }
        }
        if !more {
            return out;
        }
    }
}

pub(crate) fn real_uid(pid: u32) -> u32 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

pub(crate) fn my_uid() -> u32 {
    real_uid(std::process::id())
}

pub(crate) fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

pub(crate) fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

pub(crate) fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(Stdio::null())
        .status();
}

/// Kills, even when a test fails, everything a launch started: the
/// wrapper found by its marker, its group, and all their descendants
/// (including those that called setsid).
pub(crate) struct Reaper {
    pub(crate) marker: Vec<u8>,
}
impl Reaper {
    pub(crate) fn new(run_id: &str) -> Reaper {
        let mut marker = marker(run_id).into_bytes();
        marker.push(0);
        Reaper { marker }
    }
}
impl Drop for Reaper {
    fn drop(&mut self) {
        let procs = all_procs();
        let mut roots = Vec::new();
        for (pid, _) in &procs {
            if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) {
                if cmd
                    .windows(self.marker.len())
                    .any(|w| w == self.marker.as_slice())
                {
                    roots.push(*pid);
                }
            }
        }
        let mut all: Vec<u32> = roots.clone();
        for (pid, s) in &procs {
            if roots.contains(&s.pgrp) && !all.contains(pid) {
                all.push(*pid);
            }
        }
        let more: Vec<u32> = descendants(&all).into_iter().map(|(p, _)| p).collect();
        all.extend(more);
        kill_pids(&all);
    }
}

/// A process the test started directly; killed and reaped on drop.
pub(crate) struct ChildGuard(pub(crate) Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let kids: Vec<u32> = descendants(&[self.0.id()])
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        kill_pids(&kids);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn_guarded(args: &[&str]) -> ChildGuard {
    let child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    ChildGuard(child)
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub(crate) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) fn run_id() -> String {
    unique("t-")
}

pub(crate) fn proc_of(run_id: &str, dir: &str, l: &Launched) -> Proc {
    Proc {
        run_id: run_id.to_string(),
        pid: l.pid,
        pgid: l.pgid,
        start_time: l.start_time,
        uid: l.uid,
        boot_id: l.boot_id.clone(),
        dir: dir.to_string(),
    }
}

pub(crate) fn poll_one(p: &Proc) -> ProcStatus {
    let out = sh(&poll_script(std::slice::from_ref(p)).unwrap());
    assert_eq!(out.status, 0, "{out:?}");
    parse_poll(&out.stdout, std::slice::from_ref(p)).unwrap()[0]
        .1
        .clone()
}

pub(crate) fn stop(p: &Proc, grace: u32, keep_log: bool) -> (Stopped, Out) {
    let out = sh(&stop_script(p, grace, keep_log).unwrap());
    assert_eq!(out.status, 0, "{out:?}");
    (parse_stop(&out.stdout).unwrap(), out)
}

pub(crate) fn mode(path: &str) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub(crate) fn dir_names(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs the launch script as sshd does: [`launch_command`], by a
/// session leader (sshd's session child calls setsid).
pub(crate) fn launch(spec: &LaunchSpec) -> Out {
    let cmd = launch_command(spec).unwrap();
    let mut argv = vec!["setsid"];
    argv.extend(cmd.split(' '));
    sh_argv(&argv, &launch_script(spec).unwrap())
}

/// Runs the launch script from a process that does not lead its group
/// (a login shell that forks its command): the script makes the group
/// with `setsid`.
pub(crate) fn launch_in_callers_group(spec: &LaunchSpec) -> Out {
    sh(&launch_script(spec).unwrap())
}

/// [`launch`] on a host whose `ss` fails (after printing a listener, so
/// its output is seen not to be trusted): the script falls back to
/// reading `/proc/net/tcp*`.
pub(crate) fn launch_with_broken_ss(spec: &LaunchSpec, tmp: &Tmp) -> Out {
    let bin = tmp.join("broken-ss-bin");
    fs::create_dir_all(&bin).unwrap();
    let ss = format!("{bin}/ss");
    fs::write(
        &ss,
        "#!/bin/sh\necho 'LISTEN 0 128 0.0.0.0:1 0.0.0.0:*'\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&ss, fs::Permissions::from_mode(0o755)).unwrap();
    let script = launch_script(spec).unwrap();
    sh(&format!("PATH={bin}:$PATH; export PATH\n{script}"))
}

pub(crate) const NO_LIMITS: LimitPlan = LimitPlan::None;

pub(crate) fn spec<'a>(
    run_id: &'a str,
    dir: &'a str,
    env: &'a [(String, String)],
    command: &'a [String],
) -> LaunchSpec<'a> {
    LaunchSpec {
        run_id,
        dir,
        port: 1,
        env,
        prologue: &[],
        command,
        workdir: None,
        limits: &NO_LIMITS,
        ready_cs: 0,
        default_signal: None,
        check_port: true,
        dir_made: false,
        gpus: &[],
    }
}

pub(crate) fn proc_fixture(run_id: &str, pid: u32) -> Proc {
    Proc {
        run_id: run_id.to_string(),
        pid,
        pgid: pid,
        start_time: 1,
        uid: 0,
        boot_id: "b".to_string(),
        dir: "/tmp/x/y".to_string(),
    }
}

/// What a successful launch printed, once the server has exec'd (the
/// launch returns when the pid is known, which can be a moment before)
/// and the wrapper has written the pid file.
pub(crate) fn launched(out: &Out, dir: &str) -> Launched {
    let l = parse_launch(&out.stdout).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            fs::read(format!("/proc/{}/cmdline", l.pid))
                .is_ok_and(|c| !c.windows(RUN_MARKER.len()).any(|w| w == RUN_MARKER.as_bytes()))
                // past the exec chain's own steps (env, prlimit) too
                && fs::read(format!("/proc/{}/comm", l.pid))
                    .is_ok_and(|c| c != b"env\n" && c != b"prlimit\n")
                && Path::new(&format!("{dir}/pid")).exists()
        }),
        "the server never exec'd: {out:?}"
    );
    l
}

pub(crate) fn launch_ok(tmp: &Tmp, name: &str, cmd: &[&str]) -> (String, String, Launched, Reaper) {
    let dir = tmp.join(&format!("home/{name}"));
    let cmd = strings(cmd);
    let no_env = Vec::new();
    let r = run_id();
    let reaper = Reaper::new(&r);
    let mut s = spec(&r, &dir, &no_env, &cmd);
    s.port = free_port();
    let out = launch(&s);
    assert_eq!(out.status, 0, "{out:?}");
    let l = launched(&out, &dir);
    (r, dir, l, reaper)
}

/// A script as sent is one function, defined first and called on its last
/// line (and nowhere else).
pub(crate) fn assert_one_main(s: &str) {
    assert!(s.starts_with("main() {\n"), "{s}");
    assert!(s.ends_with("}\nmain </dev/null\n"), "{s}");
    assert_eq!(s.matches("main </dev/null").count(), 1, "{s}");
}
