//! The stop script run with the local `/bin/sh` (see
//! [`crate::plan::testing`]), and its parser.

use super::*;
use crate::plan::poll::{ExitReason, ProcStatus};
use crate::plan::testing::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

#[test]
fn stop_kills_descendants_that_left_the_group() {
    let tmp = Tmp::new();
    let (r, dir, l, _reaper) = launch_ok(
        &tmp,
        "kernel",
        &["/bin/sh", "-c", "setsid sleep 1001 & exec sleep 1000"],
    );
    let mut kernel = None;
    assert!(wait_until(Duration::from_secs(3), || {
        kernel = descendants(&[l.pid])
            .into_iter()
            .find(|(p, _)| stat(*p).is_some_and(|s| s.session != l.pgid && s.session == *p));
        kernel.is_some()
    }));
    let (kpid, kstart) = kernel.unwrap();
    let (stopped, out) = stop(&proc_of(&r, &dir, &l), 5, true);
    assert_eq!(stopped, Stopped::Killed { escalated: false }, "{out:?}");
    assert!(!alive(kpid, Some(kstart)), "the setsid child survived");
    assert!(!alive(l.pid, Some(l.start_time)));
    // The process table came from this machine's ps.
    assert!(!out.stderr.contains("reading /proc"), "{out:?}");
}

/// The same stop with `ps` missing its columns (a header, as a ps
/// that ignores `=` prints) or failing: the script reads /proc itself.
#[test]
fn stop_without_a_usable_ps_reads_proc_and_still_finds_everything() {
    let tmp = Tmp::new();
    let bin = tmp.join("fake-ps-bin");
    fs::create_dir_all(&bin).unwrap();
    for (name, fake) in [
        (
            "header",
            "#!/bin/sh\necho '  PID  PPID  PGID'\necho '    1     0     1'\n",
        ),
        ("failing", "#!/bin/sh\necho '1 0 1'\nexit 1\n"),
    ] {
        fs::write(format!("{bin}/ps"), fake).unwrap();
        fs::set_permissions(format!("{bin}/ps"), fs::Permissions::from_mode(0o755)).unwrap();
        let (r, dir, l, _reaper) = launch_ok(
            &tmp,
            &format!("kernel-{name}"),
            &["/bin/sh", "-c", "setsid sleep 1001 & exec sleep 1000"],
        );
        let mut kernel = None;
        assert!(wait_until(Duration::from_secs(3), || {
            kernel = descendants(&[l.pid])
                .into_iter()
                .find(|(p, _)| stat(*p).is_some_and(|s| s.session != l.pgid && s.session == *p));
            kernel.is_some()
        }));
        let (kpid, kstart) = kernel.unwrap();
        let script = stop_script(&proc_of(&r, &dir, &l), 5, true).unwrap();
        let out = sh(&format!("PATH={bin}:$PATH; export PATH\n{script}"));
        assert_eq!(out.status, 0, "{name}: {out:?}");
        assert_eq!(
            parse_stop(&out.stdout).unwrap(),
            Stopped::Killed { escalated: false },
            "{name}: {out:?}"
        );
        assert!(
            !alive(kpid, Some(kstart)),
            "{name}: the setsid child survived"
        );
        assert!(!alive(l.pid, Some(l.start_time)), "{name}");
        assert!(out.stderr.contains("reading /proc"), "{name}: {out:?}");
    }
}

/// A process the server left behind in a session of its own, after the
/// server died: only the run's marker in its environment ties it to
/// the run. Found with one `grep -z`, and with a grep that lacks -z.
#[test]
fn stop_finds_what_a_dead_server_left_by_the_marker_in_its_environment() {
    let tmp = Tmp::new();
    let bin = tmp.join("grep-without-z");
    fs::create_dir_all(&bin).unwrap();
    let real = ["/usr/bin/grep", "/bin/grep"]
        .into_iter()
        .find(|g| Path::new(g).exists())
        .unwrap();
    fs::write(
        format!("{bin}/grep"),
        format!("#!/bin/sh\nfor a; do case $a in -*z*) exit 2 ;; esac; done\nexec {real} \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(format!("{bin}/grep"), fs::Permissions::from_mode(0o755)).unwrap();
    for without_z in [false, true] {
        let name = format!("orphan-{without_z}");
        let dir = tmp.join(&format!("home/{name}"));
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let cmd = strings(&["/bin/sh", "-c", "setsid sleep 1005 & sleep 0.3; exit 3"]);
        let marker = vec![("SSH_SPAWNER_RUN".to_string(), r.clone())];
        let mut s = spec(&r, &dir, &marker, &cmd);
        s.port = free_port();
        let out = launch(&s);
        assert_eq!(out.status, 0, "{out:?}");
        let l = launched(&out, &dir);
        let p = proc_of(&r, &dir, &l);
        assert!(wait_until(Duration::from_secs(5), || poll_one(&p)
            != ProcStatus::Running));
        let orphan = all_procs().into_iter().find(|(q, st)| {
            st.session == *q
                && fs::read(format!("/proc/{q}/environ")).is_ok_and(|e| {
                    e.split(|b| *b == 0)
                        .any(|v| v == format!("SSH_SPAWNER_RUN={r}").as_bytes())
                })
        });
        let (opid, ost) = orphan.expect("the left-behind process");
        let script = stop_script(&p, 5, false).unwrap();
        let script = if without_z {
            format!("PATH={bin}:$PATH; export PATH\n{script}")
        } else {
            script
        };
        let out = sh(&script);
        assert_eq!(out.status, 0, "{name}: {out:?}");
        assert_eq!(
            parse_stop(&out.stdout).unwrap(),
            Stopped::Killed { escalated: false },
            "{name}: {out:?}"
        );
        assert!(!alive(opid, Some(ost.start)), "{name}: the orphan survived");
    }
}

#[test]
fn stop_escalates_when_term_is_ignored() {
    let tmp = Tmp::new();
    let (r, dir, l, _reaper) = launch_ok(
        &tmp,
        "stubborn",
        &["/bin/sh", "-c", "trap '' TERM; exec sleep 1003"],
    );
    // The trap is set once the shell has exec'd sleep.
    assert!(wait_until(Duration::from_secs(5), || fs::read(format!(
        "/proc/{}/comm",
        l.pid
    ))
    .is_ok_and(|c| c.starts_with(b"sleep"))));
    fs::create_dir_all(format!("{dir}/certs")).unwrap();
    fs::write(format!("{dir}/certs/server.key"), "key").unwrap();
    let (stopped, out) = stop(&proc_of(&r, &dir, &l), 1, false);
    // TERM ignored: KILL after the 1 s grace (how long the script takes
    // on a loaded machine is not this test's business).
    assert_eq!(stopped, Stopped::Killed { escalated: true }, "{out:?}");
    assert!(!alive(l.pid, Some(l.start_time)));
    assert!(!Path::new(&dir).exists());
}

/// On a loaded host a turn of the stop's waits takes far longer than its
/// `sleep 0.1` (here every `sleep` takes a whole second): the waits still
/// end by the clock, TERM's after the grace and KILL's soon after, so the
/// stop stays within the time the hub gives it (`command_timeout` plus the
/// grace) instead of counting ten turns a second.
#[test]
fn stop_waits_by_the_clock_when_each_turn_is_slow() {
    let tmp = Tmp::new();
    let bin = tmp.join("slow-sleep-bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(
        format!("{bin}/sleep"),
        "#!/bin/sh
exec /bin/sleep 1
",
    )
    .unwrap();
    fs::set_permissions(format!("{bin}/sleep"), fs::Permissions::from_mode(0o755)).unwrap();
    let (r, dir, l, _reaper) = launch_ok(
        &tmp,
        "stubborn-slow",
        &["/bin/sh", "-c", "trap '' TERM; exec sleep 1004"],
    );
    assert!(wait_until(Duration::from_secs(5), || fs::read(format!(
        "/proc/{}/comm",
        l.pid
    ))
    .is_ok_and(|c| c.starts_with(b"sleep"))));
    let script = stop_script(&proc_of(&r, &dir, &l), 2, false).unwrap();
    let t0 = std::time::Instant::now();
    let out = sh(&format!("PATH={bin}:$PATH; export PATH\n{script}"));
    let took = t0.elapsed();
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(
        parse_stop(&out.stdout).unwrap(),
        Stopped::Killed { escalated: true },
        "{out:?}"
    );
    assert!(!alive(l.pid, Some(l.start_time)));
    // 2 s of grace, a turn of KILL (1 s): counting turns took over 20 s.
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
}

#[test]
fn stop_after_exit_is_gone_and_cleans_up() {
    let tmp = Tmp::new();
    let (r, dir, l, _reaper) = launch_ok(&tmp, "short", &["/bin/sh", "-c", "sleep 1; exit 4"]);
    let p = proc_of(&r, &dir, &l);
    assert!(wait_until(Duration::from_secs(5), || poll_one(&p)
        != ProcStatus::Running));
    assert_eq!(
        poll_one(&p),
        ProcStatus::Exited {
            status: Some(4),
            reason: ExitReason::Exited
        }
    );
    fs::create_dir_all(format!("{dir}/certs")).unwrap();
    fs::write(format!("{dir}/certs/server.key"), "key").unwrap();
    fs::write(format!("{dir}/.hidden"), "x").unwrap();
    fs::write(format!("{dir}/..odd"), "x").unwrap();
    let (stopped, _) = stop(&p, 5, true);
    assert_eq!(stopped, Stopped::AlreadyGone);
    assert_eq!(dir_names(&dir), ["exit_status", "server.log"]);
    let (stopped, _) = stop(&p, 5, false);
    assert_eq!(stopped, Stopped::AlreadyGone);
    assert!(!Path::new(&dir).exists());
    // A directory that is already gone is fine too.
    let (stopped, _) = stop(&p, 5, false);
    assert_eq!(stopped, Stopped::AlreadyGone);
}

#[test]
fn stop_never_signals_a_process_it_cannot_verify() {
    let tmp = Tmp::new();
    let victim = spawn_guarded(&["/bin/sleep", "1002"]);
    let pid = victim.0.id();
    let st = stat(pid).unwrap();
    let base = Proc {
        run_id: "victim".into(),
        pid,
        pgid: pid,
        start_time: st.start,
        uid: my_uid(),
        boot_id: boot_id(),
        dir: tmp.join("home/victim"),
    };
    for p in [
        Proc {
            start_time: st.start + 7,
            ..base.clone()
        },
        Proc {
            uid: base.uid + 1,
            ..base.clone()
        },
        Proc {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..base.clone()
        },
    ] {
        fs::create_dir_all(&p.dir).unwrap();
        let (stopped, _) = stop(&p, 0, false);
        assert_eq!(stopped, Stopped::AlreadyGone, "{p:?}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            alive(pid, Some(st.start)),
            "stop signalled an unverified process: {p:?}"
        );
        assert!(!Path::new(&p.dir).exists());
    }
    drop(victim);
}

/// A run started in a systemd scope whose recorded pid is gone while the
/// scope still holds processes (the server died, its kernels live on): the
/// stop signals the scope and waits for it to empty (`systemctl` here a
/// stand-in that empties the scope on TERM). It used to fail under `set -u`
/// (the group flag and the survivors' list were read before any scan set
/// them), so the hub kept retrying a stop that could never succeed.
#[test]
fn stop_of_a_scope_whose_server_is_gone_signals_the_scope() {
    let tmp = Tmp::new();
    let bin = tmp.join("fake-systemctl");
    fs::create_dir_all(&bin).unwrap();
    let (active, calls) = (tmp.join("scope-active"), tmp.join("calls"));
    fs::write(&active, "").unwrap();
    let fake = format!(
        "#!/bin/sh\necho \"$*\" >>'{calls}'\n\
         case $* in\n\
           *is-active*) [ -e '{active}' ] ;;\n\
           *kill*) rm -f '{active}' ;;\n\
           *) exit 0 ;;\n\
         esac\n"
    );
    fs::write(format!("{bin}/systemctl"), fake).unwrap();
    fs::set_permissions(
        format!("{bin}/systemctl"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // The recorded pid is this test's own, with another start time: not
    // the server (it is gone), so nothing but the scope is signalled.
    let me = std::process::id();
    let st = stat(me).unwrap();
    let p = Proc {
        run_id: "scope-left".into(),
        pid: me,
        pgid: me,
        start_time: st.start + 1,
        uid: my_uid(),
        boot_id: boot_id(),
        dir: tmp.join("home/scope-left"),
    };
    fs::create_dir_all(&p.dir).unwrap();
    let script = stop_script(&p, 1, false).unwrap();
    let out = sh(&format!("PATH={bin}:$PATH; export PATH\n{script}"));
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(
        parse_stop(&out.stdout).unwrap(),
        Stopped::Killed { escalated: false },
        "{out:?}"
    );
    let calls = fs::read_to_string(&calls).unwrap();
    assert!(calls.contains("kill --signal=TERM"), "{calls}");
    assert!(!calls.contains("--signal=KILL"), "{calls}");
    assert!(alive(me, Some(st.start)), "the test process was signalled");
    assert!(!Path::new(&p.dir).exists());
}

#[test]
fn the_stop_parser_accepts_good_output_and_refuses_garbage() {
    assert_eq!(
        parse_stop("killed\n").unwrap(),
        Stopped::Killed { escalated: false }
    );
    assert_eq!(
        parse_stop("noise\nkilled escalated\n").unwrap(),
        Stopped::Killed { escalated: true }
    );
    assert_eq!(parse_stop("gone\n").unwrap(), Stopped::AlreadyGone);
    for bad in ["", "kill", "killed\ngone\n", "killed escalatedx"] {
        assert!(parse_stop(bad).is_err(), "{bad:?}");
    }
}
