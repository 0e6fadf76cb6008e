//! The remote scripts read some host output in shell, not in Rust:
//! `/proc/PID/stat` and `status` (`read_stat`, `read_uid` and `is_live` of
//! `src/plan/sh/lib.sh`, which every script shares, adopt's included),
//! `ss -Hltne` (`is_listening`: the launch's port check and the ready
//! check), `ps -e -o pid= -o ppid= -o pgid=` (stop's `snapshot_procs`) and
//! `systemctl --user` (stop's systemd scope). These tests run those pieces
//! of the shell files the scripts are assembled from with the local
//! `/bin/sh` on what real hosts printed (`fixtures/proc`, `fixtures/ss`,
//! `fixtures/ps`, `fixtures/systemd`), with `ss`, `ps` and `systemctl`
//! replaced by shell functions that replay a fixture.

use std::io::Write;
use std::process::{Command, Stdio};

fn dir(path: &str) -> String {
    format!("{}/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(path: &str) -> String {
    let p = dir(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Runs `script` with `/bin/sh -s`; its stdout, or a panic with its stderr.
fn sh(script: &str) -> String {
    let mut child = Command::new("/bin/sh")
        .arg("-s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}\n--- script:\n{script}");
    String::from_utf8(out.stdout).unwrap()
}

/// One of the shell files the remote scripts are assembled from.
fn sh_file(name: &str) -> String {
    let p = format!("{}/src/plan/sh/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The shell function `name` as the script defines it (from `name() {` to
/// the first `}` alone on a line).
fn function(script: &str, name: &str) -> String {
    let start = script
        .find(&format!("\n{name}() {{\n"))
        .unwrap_or_else(|| panic!("no function {name} in the script"));
    let body = &script[start + 1..];
    let end = body.find("\n}\n").expect("the function's end") + 3;
    body[..end].to_string()
}

/// `read_stat` and `read_uid` (with `is_live`) on a fixture directory laid
/// out like `/proc/PID`: they read `/proc/$1/stat`, so `../ABS/PATH`
/// reaches it.
fn read_proc(name: &str) -> String {
    // lib.sh defines the helpers and runs nothing else.
    let helpers = sh_file("lib.sh");
    let at = format!("..{}", dir(&format!("proc/{name}")));
    sh(&format!(
        "{helpers}\
         read_stat '{at}' || echo read_stat-failed\n\
         if is_live; then l=live; else l=dead; fi\n\
         printf '%s %s %s %s %s\\n' \"$s_state\" \"$s_ppid\" \"$s_pgrp\" \"$s_start\" \"$l\"\n\
         if [ -e '{dir}/status' ]; then read_uid '{at}' && echo \"uid $s_uid\"; fi\n",
        dir = dir(&format!("proc/{name}")),
    ))
}

#[test]
fn stat_lines_with_a_hostile_comm_are_read_after_the_last_paren() {
    // comm "a) b\nc": a space, a ')' and a newline; stat spans two lines.
    assert!(fixture("proc/hostile-newline/stat").starts_with("7417 (a) b\nc) S 7400 "));
    assert_eq!(
        read_proc("hostile-newline"),
        "S 7400 7417 1259877 live\nuid 1001\n"
    );
    // comm "x) Z 1 1 1 1 1" fakes a zombie's fields: the real ones come after.
    assert!(fixture("proc/hostile-fake-fields/stat").starts_with("7426 (x) Z 1 1 1 1 1) S 7418 "));
    assert_eq!(
        read_proc("hostile-fake-fields"),
        "S 7418 7426 1259917 live\n"
    );
    // The same hostile comm, as a zombie: not live.
    assert_eq!(
        read_proc("zombie-hostile"),
        "Z 8972 8965 1261655 dead\nuid 1001\n"
    );
    // Its parent, a plain `sleep`.
    assert_eq!(read_proc("sleep"), "S 8970 8965 1261654 live\nuid 1001\n");
}

/// `is_listening [UID]` of lib.sh, with `ss` replaying `file` (what
/// `ss -Hltne "sport = :PORT"` printed on node1). Also returns the
/// arguments `ss` was called with.
fn listening(file: &str, port: u16, uid: Option<u32>) -> (bool, String) {
    let f = function(&sh_file("lib.sh"), "is_listening");
    let out = sh(&format!(
        "calls=$(mktemp)\n\
         ss() {{ printf '%s' \"$*\" >>\"$calls\"; cat '{fix}'; }}\n\
         port={port} port_hex={port:04X} ss=ss\n\
         {f}\
         if is_listening {uid}; then r=yes; else r=no; fi\n\
         printf '%s\\n' \"$r\"; cat \"$calls\"; rm -f \"$calls\"\n",
        fix = dir(&format!("ss/{file}")),
        uid = uid.map(|u| u.to_string()).unwrap_or_default(),
    ));
    let (r, args) = out.split_once('\n').unwrap();
    (r == "yes", args.trim_end().to_string())
}

#[test]
fn ss_output_says_who_listens_on_a_port() {
    let (yes, args) = listening("sport-20423-node1.txt", 20423, None);
    assert!(yes);
    assert_eq!(args, "-Hltne sport = :20423");
    // tb-alice's server: hers, not tb.bob-2's.
    assert!(listening("sport-20423-node1.txt", 20423, Some(1001)).0);
    assert!(!listening("sport-20423-node1.txt", 20423, Some(1002)).0);
    // tb.bob-2's server is never taken for tb-alice's.
    assert!(!listening("sport-20304-node1.txt", 20304, Some(1001)).0);
    assert!(listening("sport-20304-node1.txt", 20304, Some(1002)).0);
    assert!(listening("sport-21497-node1.txt", 21497, Some(1001)).0);
    // sshd runs as root: `ss -e` prints no uid for it.
    assert!(listening("sport-22-node1.txt", 22, None).0);
    assert!(!listening("sport-22-node1.txt", 22, Some(1001)).0);
    // Nothing listens: ss printed nothing.
    assert!(!listening("sport-20332-node1-nothing.txt", 20332, None).0);
}

#[test]
fn stop_takes_the_process_table_from_procps() {
    let f = function(&sh_file("stop.sh"), "snapshot_procs");
    let fix = dir("ps/pid-ppid-pgid-node1.txt");
    let out = sh(&format!(
        "nl='\n'\nuse_ps=1 calls=$(mktemp)\n\
         ps() {{ printf '%s' \"$*\" >>\"$calls\"; cat '{fix}'; }}\n\
         {f}snapshot_procs\n\
         printf '%s\\n%s\\n%s' \"$use_ps\" \"$(cat \"$calls\")\" \"$snapshot\"; rm -f \"$calls\"\n"
    ));
    let mut parts = out.splitn(3, '\n');
    // procps' output passed the script's check: no fallback to /proc.
    assert_eq!(parts.next(), Some("1"));
    assert_eq!(parts.next(), Some("-e -o pid= -o ppid= -o pgid="));
    let table = parts.next().unwrap();
    assert_eq!(table, fixture("ps/pid-ppid-pgid-node1.txt").trim_end());
    assert_eq!(table.lines().count(), 142);
    assert_eq!(table.lines().next(), Some("    1     0     0"));
}

/// Stop's look at the run's systemd scope, with `systemctl` replaying what
/// `systemctl --user` printed as tb-alice on `host` for the unit `unit`
/// (`init` stands for a scope that is active, `missing` for one that is
/// not there). Returns `in_scope` (the scope is in use), `cg` (its control
/// group) and the calls made.
fn scope(host: &str, unit: &str) -> (String, String, String) {
    let script = sh_file("stop.sh");
    let start = script.find("\nin_scope=''\n").expect("the scope block") + 1;
    let end = script.find("\n# scope_busy:").expect("scope_busy()");
    let block = &script[start..end];
    let d = dir(&format!("systemd/{host}"));
    let out = sh(&format!(
        "systemctl() {{\n\
           printf '[%s]' \"$*\" >>\"$calls\"\n\
           case $* in\n\
             *' is-active --quiet '*) n=is-active-quiet-{unit} ;;\n\
             *' is-active '*) n=is-active-{unit} ;;\n\
             *' show '*) n=show-cgroup-{unit} ;;\n\
             *) return 99 ;;\n\
           esac\n\
           cat '{d}/'$n.stdout\n\
           cat '{d}/'$n.stderr >&2\n\
           return $(cat '{d}/'$n.exit)\n\
         }}\n\
         calls=$(mktemp) ours=1 unit=jupyterhub-ssh-5f0c1d2e3a4b6978.scope cg=unset\n\
         {block}\n\
         printf '%s\\n%s\\n%s\\n' \"$in_scope\" \"$cg\" \"$(cat \"$calls\")\"; rm -f \"$calls\"\n"
    ));
    let v: Vec<&str> = out.lines().collect();
    (v[0].to_string(), v[1].to_string(), v[2].to_string())
}

#[test]
fn stop_reads_the_scope_from_systemctl() {
    let (sc, cg, calls) = scope("node4", "init");
    assert_eq!(sc, "1");
    assert_eq!(
        cg,
        "/user.slice/user-1001.slice/user@1001.service/init.scope"
    );
    assert_eq!(
        calls,
        "[--user is-active --quiet -- jupyterhub-ssh-5f0c1d2e3a4b6978.scope]\
         [--user show -p ControlGroup --value -- jupyterhub-ssh-5f0c1d2e3a4b6978.scope]"
    );
    // No such scope (exit 3, "inactive"): nothing to signal or wait for.
    let (sc, cg, _) = scope("node4", "missing");
    assert_eq!((sc.as_str(), cg.as_str()), ("", "unset"));
    // A host without a user manager: systemctl fails to reach the bus.
    let (sc, cg, calls) = scope("node1", "init");
    assert_eq!((sc.as_str(), cg.as_str()), ("", "unset"));
    assert_eq!(
        calls,
        "[--user is-active --quiet -- jupyterhub-ssh-5f0c1d2e3a4b6978.scope]"
    );
}

/// The adopt script's reading of the process in the pid file (the shared
/// `read_stat` and `is_live`, then its own choice of fields), on a fixture:
/// its state, pgid and start time, or `nothing`.
fn adopt_reads(name: &str) -> String {
    let script = sh_file("adopt.sh");
    let start = script
        .find("read_stat \"$pid\" || no\n")
        .expect("the stat reading");
    let end = script[start..]
        .find("start=$s_start pgid=$s_pgrp\n")
        .expect("its end")
        + start
        + "start=$s_start pgid=$s_pgrp\n".len();
    let part = &script[start..end];
    sh(&format!(
        "{lib}\
         no() {{ echo nothing; exit 0; }}\n\
         pid='..{fix}'\n\
         {part}\
         echo \"$s_state $pgid $start\"\n",
        lib = sh_file("lib.sh"),
        fix = dir(&format!("proc/{name}")),
    ))
}

#[test]
fn adopt_reads_stat_lines_with_a_hostile_comm_too() {
    assert_eq!(adopt_reads("hostile-newline"), "S 7417 1259877\n");
    assert_eq!(adopt_reads("hostile-fake-fields"), "S 7426 1259917\n");
    assert_eq!(adopt_reads("zombie-hostile"), "nothing\n");
    assert_eq!(adopt_reads("sleep"), "S 8965 1261654\n");
}
