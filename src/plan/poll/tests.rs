//! The poll and ready-check scripts run with the local `/bin/sh` (see
//! [`crate::plan::testing`]), and the poll's parser.

use super::*;
use crate::plan::launch::{launch_listening, parse_launch_failure, LAUNCH_FAILED};
use crate::plan::stop::Stopped;
use crate::plan::testing::*;
use std::fs;
use std::process::Command;
use std::time::Duration;

#[test]
fn the_ready_check_tells_not_yet_listening_and_exited_and_never_takes_another_uids_socket() {
    let tmp = Tmp::new();
    let no_env = Vec::new();
    let port = free_port();
    let code = format!(
        "import socket,time\ntime.sleep(0.4)\ns=socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('127.0.0.1',{port}))\ns.listen()\ntime.sleep(60)\n"
    );
    let cmd = strings(&["python3", "-c", &code]);
    let dir = tmp.join("home/hub-waits");
    let r = run_id();
    let _reaper = Reaper::new(&r);
    let mut s = spec(&r, &dir, &no_env, &cmd);
    s.port = port;
    // The hub waits: the launch returns with the pid, before the listen.
    s.ready_cs = 0;
    let out = launch(&s);
    assert_eq!(out.status, 0, "{out:?}");
    assert!(!launch_listening(&out.stdout), "{out:?}");
    assert!(out.elapsed < Duration::from_millis(400), "{out:?}");
    let l = launched(&out, &dir);
    let p = proc_of(&r, &dir, &l);
    let check = |p: &Proc| sh(&ready_check_script(p, port).unwrap());
    let first = check(&p);
    assert_eq!(first.status, 0, "{first:?}");
    assert!(first.stdout.contains("listening=no"), "{first:?}");
    assert!(
        wait_until(Duration::from_secs(10), || launch_listening(
            &check(&p).stdout
        )),
        "never listening: {:?}",
        check(&p)
    );
    // The same socket seen as another login's (what bob's listener on
    // alice's port looks like): never the server's.
    let other = Proc {
        uid: p.uid + 1,
        ..p.clone()
    };
    let o = check(&other);
    assert_eq!((o.status, o.stdout.trim()), (0, "listening=no"), "{o:?}");
    // A pid that is now another process (its start time differs) is not
    // the server: reported gone, with the log.
    let reused = Proc {
        start_time: p.start_time + 1,
        ..p.clone()
    };
    let g = check(&reused);
    assert_eq!(g.status, LAUNCH_FAILED as i32, "{g:?}");
    let (stopped, _) = stop(&p, 5, true);
    assert_eq!(stopped, Stopped::Killed { escalated: false });
    let gone = check(&p);
    assert_eq!(gone.status, LAUNCH_FAILED as i32, "{gone:?}");
    let (status, _) = parse_launch_failure(&gone.stdout).expect("a failure report");
    assert!(status.is_some(), "{gone:?}");
}

// ----------------------------------------------------------------- poll

#[test]
fn poll_reports_every_state() {
    let tmp = Tmp::new();
    let boot = boot_id();
    let uid = my_uid();

    // A zombie: the shell execs sleep, which never reaps the earlier child.
    let parent = spawn_guarded(&["/bin/sh", "-c", "sleep 0.1 & exec sleep 30"]);
    let mut zombie = None;
    assert!(wait_until(Duration::from_secs(3), || {
        zombie = all_procs()
            .into_iter()
            .find(|(_, s)| s.ppid == parent.0.id() && s.state == 'Z');
        zombie.is_some()
    }));
    let (zpid, zst) = zombie.unwrap();

    let live = spawn_guarded(&["/bin/sleep", "30"]);
    let lpid = live.0.id();
    let lst = stat(lpid).unwrap();

    let mut reaped = Command::new("/bin/true").spawn().unwrap();
    let dead_pid = reaped.id();
    reaped.wait().unwrap();

    let mk = |run_id: &str, pid: u32, start: u64, uid: u32, boot: &str, dir: &str| Proc {
        run_id: run_id.to_string(),
        pid,
        pgid: pid,
        start_time: start,
        uid,
        boot_id: boot.to_string(),
        dir: tmp.join(dir),
    };
    let with_status = |dir: &str, content: &str| {
        fs::create_dir_all(tmp.join(dir)).unwrap();
        fs::write(tmp.join(&format!("{dir}/exit_status")), content).unwrap();
    };
    with_status("exited", "5\n");
    with_status("rebooted", "0\n");
    with_status("garbage", "x5\n");
    with_status("zombie", "9\n");
    with_status("reused", "12\n");

    let procs = vec![
        mk("running", lpid, lst.start, uid, &boot, "none"),
        mk("zombie", zpid, zst.start, uid, &boot, "zombie"),
        mk("reused", lpid, lst.start + 1, uid, &boot, "reused"),
        mk("other-owner", lpid, lst.start, uid + 1, &boot, "none"),
        mk("dead", dead_pid, 1, uid, &boot, "none"),
        mk("never", 999_999_999, 1, uid, &boot, "none"),
        mk("exited", 999_999_998, 1, uid, &boot, "exited"),
        mk("garbage", 999_999_997, 1, uid, &boot, "garbage"),
        mk(
            "rebooted",
            lpid,
            lst.start,
            uid,
            "00000000-0000-0000-0000-000000000000",
            "rebooted",
        ),
        mk("rebooted-none", lpid, lst.start, uid, "0", "none"),
    ];
    let out = sh(&poll_script(&procs).unwrap());
    assert_eq!(out.status, 0, "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let got = parse_poll(&out.stdout, &procs).unwrap();
    let ex = |status, reason| ProcStatus::Exited { status, reason };
    let want = vec![
        ("running", ProcStatus::Running),
        ("zombie", ex(Some(9), ExitReason::Zombie)),
        ("reused", ex(Some(12), ExitReason::PidReused)),
        ("other-owner", ex(None, ExitReason::PidReused)),
        ("dead", ex(None, ExitReason::Gone)),
        ("never", ex(None, ExitReason::Gone)),
        ("exited", ex(Some(5), ExitReason::Exited)),
        ("garbage", ex(None, ExitReason::Exited)),
        ("rebooted", ex(Some(0), ExitReason::Rebooted)),
        ("rebooted-none", ex(None, ExitReason::Rebooted)),
    ];
    let want: Vec<(String, ProcStatus)> =
        want.into_iter().map(|(a, b)| (a.to_string(), b)).collect();
    assert_eq!(got, want, "{}", out.stdout);

    // A run id the output does not mention is an error, not a guess.
    let mut more = procs.clone();
    more.push(mk("missing", 5, 1, uid, &boot, "none"));
    assert!(parse_poll(&out.stdout, &more).is_err());
    drop(parent);
    drop(live);
}

#[test]
fn poll_of_500_servers_is_fast() {
    let me = std::process::id();
    let st = stat(me).unwrap();
    let uid = my_uid();
    let boot = boot_id();
    // The most expensive path: every server is alive, so each one costs
    // a stat read and a status read.
    let procs: Vec<Proc> = (0..500)
        .map(|i| Proc {
            run_id: format!("run-{i}"),
            pid: me,
            pgid: me,
            start_time: st.start,
            uid,
            boot_id: boot.clone(),
            dir: format!("/tmp/ssh-spawner-none/run-{i}"),
        })
        .collect();
    let script = poll_script(&procs).unwrap();
    // Best of three, so that other tests running in parallel on a small
    // machine do not turn a timing check into a flaky one.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let out = sh(&script);
        assert_eq!(out.status, 0, "{out:?}");
        let got = parse_poll(&out.stdout, &procs).unwrap();
        assert!(got.iter().all(|(_, s)| *s == ProcStatus::Running));
        best = best.min(out.elapsed);
    }
    // A figure, not a check: speed is the benchmarks' (docs/benchmarks.md).
    eprintln!(
        "poll of 500 running servers: {best:?} ({} bytes of script)",
        script.len()
    );

    let gone: Vec<Proc> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| Proc {
            pid: 900_000_000 + i as u32,
            ..p.clone()
        })
        .collect();
    let out = sh(&poll_script(&gone).unwrap());
    let got = parse_poll(&out.stdout, &gone).unwrap();
    assert!(got.iter().all(|(_, s)| matches!(
        s,
        ProcStatus::Exited {
            reason: ExitReason::Gone,
            ..
        }
    )));
    eprintln!("poll of 500 gone servers: {:?}", out.elapsed);
}

#[test]
fn the_poll_parser_accepts_good_output_and_refuses_garbage() {
    let asked = vec![proc_fixture("a", 2), proc_fixture("b", 3)];
    assert_eq!(
        parse_poll("noise\na running\nb exited 3\n", &asked).unwrap(),
        vec![
            ("a".into(), ProcStatus::Running),
            (
                "b".into(),
                ProcStatus::Exited {
                    status: Some(3),
                    reason: ExitReason::Exited
                }
            )
        ]
    );
    for bad in [
        "a running\n",
        "a running\nb\n",
        "a running\nb dancing\n",
        "a running\nb exited x\n",
        "a running\nb gone 1 2\n",
        "a running\na running\nb gone\n",
    ] {
        assert!(parse_poll(bad, &asked).is_err(), "{bad:?}");
    }
    assert_eq!(parse_poll("", &[]).unwrap(), vec![]);
}
