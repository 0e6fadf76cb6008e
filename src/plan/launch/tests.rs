//! The launch script run with the local `/bin/sh` (see
//! [`crate::plan::testing`]), and its parsers.

use super::*;
use crate::error::Error;
use crate::plan::limits::LimitPlan;
use crate::plan::poll::{parse_poll, poll_script, ExitReason, Proc, ProcStatus};
use crate::plan::stop::{parse_stop, stop_script, Stopped};
use crate::plan::testing::*;
use proptest::prelude::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    // Every parser of what the scripts print, the launch's, the poll's and
    // the stop's, on the same text.
    #[test]
    fn parsers_never_panic_on_arbitrary_text(text in any::<String>()) {
        let asked = vec![proc_fixture("a", 2), proc_fixture("b", 3)];
        let _ = parse_launch(&text);
        let _ = parse_launch_failure(&text);
        let _ = parse_poll(&text, &asked);
        let _ = parse_stop(&text);
    }

    #[test]
    fn parsers_never_panic_on_near_miss_text(
        text in "((pid|pgid|start_time|uid|boot_id)=[0-9a-f-]{0,12}|exited( -?[0-9]{0,12})?|log: ?[a-z ]{0,5}|(a|b|c) (running|exited|zombie|reused|rebooted|gone|x)( -?[0-9]{0,12})?( x)?|killed( escalated)?|gone|port-taken|[=\r ]|\n){0,12}"
    ) {
        let asked = vec![proc_fixture("a", 2), proc_fixture("b", 3)];
        let _ = parse_launch(&text);
        let _ = parse_launch_failure(&text);
        let _ = parse_poll(&text, &asked);
        let _ = parse_stop(&text);
    }
}

#[test]
fn launch_spec_debug_hides_env_values() {
    let e = env(&[("JUPYTERHUB_API_TOKEN", "sekrit-value")]);
    let cmd = strings(&["x"]);
    let text = format!("{:?}", spec("r", "/tmp/x/y", &e, &cmd));
    assert!(text.contains("JUPYTERHUB_API_TOKEN"), "{text}");
    assert!(!text.contains("sekrit-value"), "{text}");
}

#[test]
fn invalid_inputs_are_refused() {
    let cmd = strings(&["/bin/true"]);
    let no_env: Vec<(String, String)> = Vec::new();
    let bad_run_ids = ["", "A", "a_b", "a b", "a/b", "a;b", "é"];
    let long = "a".repeat(65);
    for r in bad_run_ids.iter().copied().chain([long.as_str()]) {
        assert!(
            launch_script(&spec(r, "/tmp/x/y", &no_env, &cmd)).is_err(),
            "{r:?}"
        );
    }
    assert!(launch_script(&spec(&"a".repeat(64), "/tmp/x/y", &no_env, &cmd)).is_ok());
    for d in [
        "",
        "tmp/x",
        "/",
        "/tmp",
        "/tmp/",
        "/tmp//x",
        "/tmp/x/",
        "/tmp/./x",
        "/tmp/../x",
        "/tmp/x\ny",
        "/tmp/x\0y",
    ] {
        assert!(
            launch_script(&spec("r", d, &no_env, &cmd)).is_err(),
            "{d:?}"
        );
    }
    assert!(launch_script(&spec("r", "/tmp/x y/'z'", &no_env, &cmd)).is_ok());
    assert!(launch_script(&spec("r", "/tmp/x", &no_env, &[])).is_err());
    assert!(launch_script(&spec("r", "/tmp/x", &no_env, &strings(&[""]))).is_err());
    assert!(launch_script(&spec("r", "/tmp/x", &no_env, &strings(&["A=b", "c"]))).is_err());
    assert!(launch_script(&spec("r", "/tmp/x", &no_env, &strings(&["/bin/x", "a\0"]))).is_err());
    assert!(launch_script(&spec("r", "/tmp/x", &env(&[("A-B", "v")]), &cmd)).is_err());
    assert!(launch_script(&spec("r", "/tmp/x", &env(&[("A", "v\0")]), &cmd)).is_err());
    let mut s = spec("r", "/tmp/x", &no_env, &cmd);
    let prologue = strings(&["echo \0"]);
    s.prologue = &prologue;
    assert!(launch_script(&s).is_err());
    for limits in [
        LimitPlan::Systemd {
            unit: "".into(),
            mem_max: None,
            cpu_quota_percent: None,
        },
        LimitPlan::Systemd {
            unit: "a b".into(),
            mem_max: None,
            cpu_quota_percent: None,
        },
        LimitPlan::Systemd {
            unit: "-x".into(),
            mem_max: None,
            cpu_quota_percent: None,
        },
        LimitPlan::Systemd {
            unit: "u".into(),
            mem_max: Some(0),
            cpu_quota_percent: None,
        },
        LimitPlan::Systemd {
            unit: "u".into(),
            mem_max: None,
            cpu_quota_percent: Some(0),
        },
        LimitPlan::Prlimit {
            address_space: Some(0),
        },
    ] {
        let mut s = spec("r", "/tmp/x", &no_env, &cmd);
        s.limits = &limits;
        assert!(launch_script(&s).is_err(), "{limits:?}");
    }

    let p = proc_fixture("a", 100);
    assert!(poll_script(&[p.clone(), p.clone()]).is_err());
    assert!(poll_script(&[Proc {
        run_id: "A".into(),
        ..p.clone()
    }])
    .is_err());
    assert!(poll_script(&[Proc {
        dir: "/".into(),
        ..p.clone()
    }])
    .is_err());
    assert!(poll_script(&[Proc {
        boot_id: "\0".into(),
        ..p.clone()
    }])
    .is_err());
    assert!(stop_script(
        &Proc {
            pgid: 1,
            ..p.clone()
        },
        1,
        true
    )
    .is_err());
    assert!(stop_script(
        &Proc {
            pgid: 0,
            ..p.clone()
        },
        1,
        true
    )
    .is_err());
    assert!(stop_script(
        &Proc {
            pid: 1,
            ..p.clone()
        },
        1,
        true
    )
    .is_err());
    assert!(stop_script(
        &Proc {
            dir: "/home".into(),
            ..p.clone()
        },
        1,
        true
    )
    .is_err());
    assert!(stop_script(&p, 1, true).is_ok());
}

#[test]
fn every_script_variant_parses_in_sh() {
    let cmd = strings(&["jupyterhub-singleuser", "--ip=127.0.0.1", "it's"]);
    let e = env(&[("A", "1"), ("B", "it's \"q\"\n$x")]);
    let prologue = strings(&["if true; then", "  echo hi", "fi", "module load x || :"]);
    let limits = [
        LimitPlan::None,
        LimitPlan::Prlimit {
            address_space: None,
        },
        LimitPlan::Prlimit {
            address_space: Some(1 << 30),
        },
        LimitPlan::Systemd {
            unit: "jupyter-u-1.scope".into(),
            mem_max: Some(1 << 30),
            cpu_quota_percent: Some(150),
        },
        LimitPlan::Systemd {
            unit: "j".into(),
            mem_max: None,
            cpu_quota_percent: None,
        },
    ];
    let mut scripts = Vec::new();
    for l in &limits {
        for wd in [None, Some("/srv/work dir")] {
            let mut s = spec("r", "/tmp/a b/c", &e, &cmd);
            s.prologue = &prologue;
            s.workdir = wd;
            s.limits = l;
            scripts.push(launch_script(&s).unwrap());
        }
    }
    let p = proc_fixture("a", 100);
    scripts.push(poll_script(&[]).unwrap());
    scripts.push(poll_script(&[p.clone(), proc_fixture("b", 200)]).unwrap());
    scripts.push(stop_script(&p, 0, false).unwrap());
    scripts.push(stop_script(&p, 10, true).unwrap());
    let made_from = scripts.len();
    for (check_port, dir_made) in [(false, false), (false, true), (true, true)] {
        let mut s = spec("r", "/tmp/a b/c", &e, &cmd);
        s.check_port = check_port;
        s.dir_made = dir_made;
        scripts.push(launch_script(&s).unwrap());
    }
    for s in &scripts {
        let out = Command::new("/bin/sh")
            .arg("-n")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{s}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_one_main(s);
        // The shell's strict mode is set before the body runs anything.
        assert!(s.contains("\nset -u\n") || s.contains("\nset -eu\n"), "{s}");
        assert!(s.contains("umask 077\n"));
    }
    // The limit prefixes, word by word, before the command (the list of
    // words the script reads back with `eval "set -- ..."`).
    let argv = |words: &[&str]| {
        let list: Vec<String> = words
            .iter()
            .map(|w| crate::plan::sh::list_word(w, "w").unwrap())
            .collect();
        crate::plan::quote::quote(&list.join(" "), "w").unwrap()
    };
    let systemd = [
        "systemd-run",
        "--user",
        "--scope",
        "--quiet",
        "--unit=jupyter-u-1.scope",
        "-p",
        "MemoryMax=1073741824",
        "-p",
        "CPUQuota=150%",
        "--",
        "jupyterhub-singleuser",
        "--ip=127.0.0.1",
        "it's",
    ];
    assert!(scripts[6].contains(&format!("\nserver_argv={}\n", argv(&systemd))));
    let systemd = [
        "systemd-run",
        "--user",
        "--scope",
        "--quiet",
        "--unit=j",
        "--",
        "jupyterhub-singleuser",
    ];
    let prefix = argv(&systemd);
    assert!(scripts[8].contains(&format!("\nserver_argv={} ", &prefix[..prefix.len() - 1])));
    let prefix = argv(&["prlimit", "--as=1073741824", "--", "jupyterhub-singleuser"]);
    assert!(scripts[4].contains(&format!("\nserver_argv={} ", &prefix[..prefix.len() - 1])));
    assert!(scripts[4].contains(
        "\nserver_argv='prlimit --as=1073741824 -- jupyterhub-singleuser --ip=127.0.0.1 "
    ));
    assert!(!scripts[2].contains("prlimit"));
    assert!(
        scripts[3].contains("\ncd_home='0'\n")
            && scripts[3].contains("\nworkdir='/srv/work dir'\n")
    );
    assert!(scripts[2].contains("\ncd_home='1'\n"));
    assert!(scripts[2].contains(
        "  if [ \"$1\" = 1 ]; then cd -- \"$HOME\"; else cd -- \"$2\"; fi\n  shift 2\n  ssp_start_server \"$@\"\n"
    ));
    // Both ways to start the wrapper, chosen by whether the launch leads
    // its group, and the port checked in the script (by default).
    assert!(scripts[2].contains("\n    ) 3>&4 4>&- </dev/null >>"));
    assert!(scripts[2].contains("exec setsid -f /bin/sh -c "));
    assert!(scripts[2].contains("\ncheck_port='1'\n"));
    assert!(scripts[2].contains("if [ \"$check_port\" = 1 ] && is_listening; then\n"));
    assert!(scripts[2].contains("\nexport B='it'\\''s \"q\"\n$x'\n"));
    // The run directory: a `mkdir` started first thing, or only a test
    // when the spawner made it; no port check when sshd was asked.
    let early_mkdir = "set -eu\nif [ \"$dir_made\" = 0 ]; then\n  mkdir -m 700 -- \"$d\" 2>/dev/null &\n  mk=$!\nfi\n";
    assert!(scripts[2].contains(early_mkdir));
    assert!(scripts[2].contains("\nd='/tmp/a b/c'\n") && scripts[2].contains("\ndir_made='0'\n"));
    assert!(scripts[made_from].contains(early_mkdir));
    assert!(scripts[made_from].contains("\ndir_made='0'\n"));
    assert!(scripts[made_from].contains("\n  wait \"$mk\" || dir_ok=0\n"));
    assert!(scripts[made_from].contains("\ncheck_port='0'\n"));
    for s in &scripts[made_from + 1..] {
        assert!(s.contains("\ndir_made='1'\n"), "{s}");
        assert!(s.contains("\n  [ -d \"$d\" ] || dir_ok=0\n"), "{s}");
    }
    assert!(scripts[made_from + 1].contains("\ncheck_port='0'\n"));
    assert!(scripts[made_from + 2].contains("\ncheck_port='1'\n"));
    assert!(scripts[made_from + 2].contains("is_listening; then\n  if [ \"$dir_made\" = 0 ]; then wait \"$mk\" || :; fi\n  echo port-taken\n"));
}

#[test]
fn truncated_launch_script_runs_nothing() {
    let tmp = Tmp::new();
    let dir = tmp.join("home/run");
    let cmd = strings(&["/bin/sleep", "30"]);
    let no_env = Vec::new();
    let r = run_id();
    let _reaper = Reaper::new(&r);
    let script = launch_script(&spec(&r, &dir, &no_env, &cmd)).unwrap();
    // Every cut short of the final call, including one right before it.
    let last = script.rfind("main </dev/null").unwrap();
    for cut in [
        10,
        script.len() / 4,
        script.len() / 2,
        script.len() * 3 / 4,
        last - 3,
        last,
    ] {
        let mut end = cut;
        while !script.is_char_boundary(end) {
            end -= 1;
        }
        let out = sh(&script[..end]);
        assert!(out.stdout.is_empty(), "cut {cut}: {out:?}");
        assert!(
            !Path::new(&dir).exists(),
            "cut {cut} ran part of the script"
        );
    }
}

// --------------------------------------------------------------- launch

#[test]
fn launch_poll_stop_end_to_end() {
    launch_poll_stop(true);
}

#[test]
fn launch_poll_stop_end_to_end_from_a_process_that_does_not_lead_its_group() {
    launch_poll_stop(false);
}

/// `leader`: run as sshd does (the wrapper is a subshell and the group is
/// the launch's); else from inside the caller's group (`setsid`, and the
/// wrapper leads its own session).
fn launch_poll_stop(leader: bool) {
    let tmp = Tmp::new();
    let dir = tmp.join("home/.jupyterhub-ssh/run-e2e");
    let parent = tmp.join("home/.jupyterhub-ssh");
    let outfile = tmp.join("hostile.out");
    let token = unique("sekrit-");
    let hostile = format!(
        "{token}'\"$(touch {t}/pwned)\"`touch {t}/pwned2`${{HOME}}\\n\\\\\n-x é ✓\t'; exit 9 #",
        t = tmp.path().display()
    );
    let e = env(&[
        ("HOSTILE", &hostile),
        ("OUT", &outfile),
        ("JUPYTERHUB_API_TOKEN", &token),
    ]);
    let cmd = strings(&[
        "/bin/sh",
        "-c",
        "printf %s \"$HOSTILE\" > \"$OUT\"; echo started; exec sleep 30",
    ]);
    let r = run_id();
    let _reaper = Reaper::new(&r);
    let mut s = spec(&r, &dir, &e, &cmd);
    s.port = free_port();
    let out = if leader {
        launch(&s)
    } else {
        launch_in_callers_group(&s)
    };
    assert_eq!(out.status, 0, "{out:?}");
    let l = launched(&out, &dir);

    // What it printed is what /proc says: the server's parent is the
    // wrapper, both are in the recorded group, in a session that is not
    // the caller's.
    let st = stat(l.pid).unwrap();
    assert_eq!(st.start, l.start_time);
    assert_eq!(st.pgrp, l.pgid);
    let wst = stat(st.ppid).unwrap();
    assert_eq!(wst.pgrp, l.pgid);
    assert_eq!(wst.session, l.pgid);
    if leader {
        // The group's leader was the launch itself, gone now; the wrapper
        // is a fork of it (no program ran to make it).
        assert_ne!(st.ppid, l.pgid);
        assert!(stat(l.pgid).is_none(), "the launch's login is still there");
    } else {
        assert_eq!(st.ppid, l.pgid, "the wrapper leads its session");
    }
    assert_ne!(st.session, stat(std::process::id()).unwrap().session);
    assert_eq!(l.uid, real_uid(l.pid));
    assert_eq!(l.uid, my_uid());
    assert_eq!(l.boot_id, boot_id());
    // The wrapper writes the pid file just after it hands the pid over.
    assert!(wait_until(Duration::from_secs(3), || fs::read_to_string(
        format!("{dir}/pid")
    )
    .is_ok_and(|p| p.trim() == l.pid.to_string())));
    let wcmd = fs::read(format!("/proc/{}/cmdline", st.ppid)).unwrap();
    let marker = format!("\0ssh-spawner-run:{r}\0");
    assert!(wcmd.windows(marker.len()).any(|w| w == marker.as_bytes()));
    let dir_arg = format!("\0{dir}");
    assert!(wcmd.windows(dir_arg.len()).any(|w| w == dir_arg.as_bytes()));

    // The server did not inherit ignored HUP/INT/QUIT/TERM (looked at
    // once `env` and the shell have exec'd sleep).
    assert!(wait_until(Duration::from_secs(5), || fs::read(format!(
        "/proc/{}/comm",
        l.pid
    ))
    .is_ok_and(|c| c.starts_with(b"sleep"))));
    let status = fs::read_to_string(format!("/proc/{}/status", l.pid)).unwrap();
    let ign = status
        .lines()
        .find_map(|x| x.strip_prefix("SigIgn:"))
        .unwrap()
        .trim();
    let ign = u64::from_str_radix(ign, 16).unwrap();
    assert_eq!(
        ign & (1 << 0 | 1 << 1 | 1 << 2 | 1 << 14),
        0,
        "SigIgn {ign:x}"
    );

    // The env value arrived byte-exact and was never interpreted.
    assert!(wait_until(Duration::from_secs(3), || Path::new(&outfile)
        .exists()
        && fs::read(&outfile).unwrap().len() == hostile.len()));
    assert_eq!(fs::read(&outfile).unwrap(), hostile.as_bytes());
    assert!(!tmp.path().join("pwned").exists());
    assert!(!tmp.path().join("pwned2").exists());

    // No process's argv carries a secret.
    for (pid, _) in all_procs() {
        if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) {
            assert!(
                !cmdline.windows(token.len()).any(|w| w == token.as_bytes()),
                "pid {pid} has the secret in its argv: {:?}",
                String::from_utf8_lossy(&cmdline)
            );
        }
    }

    // Permissions.
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&parent), 0o700);
    assert!(wait_until(Duration::from_secs(3), || fs::read_to_string(
        format!("{dir}/server.log")
    )
    .is_ok_and(|s| s.contains("started"))));
    assert_eq!(mode(&format!("{dir}/server.log")), 0o600);
    assert_eq!(mode(&format!("{dir}/pid")), 0o600);

    let p = proc_of(&r, &dir, &l);
    assert_eq!(poll_one(&p), ProcStatus::Running);

    // A server that obeys TERM is gone long before a 30 s grace: the
    // stop returns when it is, not at the grace (the margin is wide so a
    // loaded machine cannot make this fail).
    let (stopped, sout) = stop(&p, 30, true);
    assert_eq!(stopped, Stopped::Killed { escalated: false }, "{sout:?}");
    assert!(sout.elapsed < Duration::from_secs(15), "{sout:?}");
    assert!(!alive(l.pid, Some(l.start_time)));
    assert!(!all_procs()
        .iter()
        .any(|(_, s)| s.pgrp == l.pgid && s.state != 'Z'));

    assert_eq!(
        poll_one(&p),
        ProcStatus::Exited {
            status: Some(143),
            reason: ExitReason::Exited
        }
    );
    assert_eq!(dir_names(&dir), ["exit_status", "server.log"]);
    assert_eq!(mode(&format!("{dir}/exit_status")), 0o600);
    let (again, _) = stop(&p, 5, false);
    assert_eq!(again, Stopped::AlreadyGone);
    assert!(!Path::new(&dir).exists());
}

#[test]
fn port_taken_starts_nothing() {
    let tmp = Tmp::new();
    let marker_file = tmp.join("ran");
    let e = env(&[("MARK", &marker_file)]);
    let cmd = strings(&["/bin/sh", "-c", "touch \"$MARK\"; exec sleep 30"]);
    let mut listeners = vec![std::net::TcpListener::bind("127.0.0.1:0").unwrap()];
    if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
        listeners.push(l6);
    }
    // With `ss` and, on a host whose `ss` fails, from /proc/net/tcp*.
    let runs = listeners.iter().flat_map(|l| [(l, false), (l, true)]);
    for (i, (listener, broken_ss)) in runs.enumerate() {
        let dir = tmp.join(&format!("home/run-{i}"));
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &e, &cmd);
        s.port = listener.local_addr().unwrap().port();
        let out = if broken_ss {
            launch_with_broken_ss(&s, &tmp)
        } else {
            launch(&s)
        };
        assert_eq!(out.status, PORT_TAKEN as i32, "{out:?}");
        assert_eq!(out.stdout, "port-taken\n");
        assert!(parse_launch(&out.stdout).is_err());
        assert!(!Path::new(&format!("{dir}/pid")).exists());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!Path::new(&marker_file).exists());
    }
}

#[test]
fn immediate_exit_is_reported_with_status_and_log() {
    let tmp = Tmp::new();
    let no_env = Vec::new();
    let cases: [(&[&str], i32, &str); 2] = [
        (
            &["/bin/sh", "-c", "echo boom; echo on-stderr >&2; exit 7"],
            7,
            "boom\non-stderr",
        ),
        (&["/nonexistent/server"], 127, "/nonexistent/server"),
    ];
    for (cmd, status, log) in cases {
        let dir = tmp.join(&format!("home/run-{status}"));
        let cmd = strings(cmd);
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &no_env, &cmd);
        s.port = free_port();
        // Waiting up to 30 s for the port: the exit ends the wait at once.
        s.ready_cs = 3000;
        let out = launch(&s);
        assert_eq!(out.status, LAUNCH_FAILED as i32, "{out:?}");
        assert!(parse_launch(&out.stdout).is_err());
        let (st, tail) = parse_launch_failure(&out.stdout).unwrap();
        assert_eq!(st, Some(status), "{out:?}");
        assert!(tail.contains(log), "{tail:?}");
        // The exit ended the 30 s wait (half of it is a wide margin).
        assert!(out.elapsed < Duration::from_secs(15), "{out:?}");
    }
}

#[test]
fn launch_returns_once_the_port_listens() {
    let tmp = Tmp::new();
    let no_env = Vec::new();
    // A server that takes 0.4 s to listen, through each way of starting
    // it, and seen by a host whose `ss` fails (/proc/net/tcp* then).
    let runs = [
        (None, false),
        (Some(true), false),
        (Some(false), false),
        (Some(true), true),
    ];
    for (i, (default_signal, broken_ss)) in runs.into_iter().enumerate() {
        let port = free_port();
        let code = format!(
            "import socket,time\ntime.sleep(0.4)\ns=socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('127.0.0.1',{port}))\ns.listen()\ntime.sleep(60)\n"
        );
        let cmd = strings(&["python3", "-c", &code]);
        let dir = tmp.join(&format!("home/ready-{i}"));
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &no_env, &cmd);
        s.port = port;
        s.ready_cs = 3000;
        s.default_signal = default_signal;
        let out = if broken_ss {
            launch_with_broken_ss(&s, &tmp)
        } else {
            launch(&s)
        };
        assert_eq!(out.status, 0, "{out:?}");
        // Connected at the first try: no waiting after the launch.
        std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("not listening after the launch: {e} {out:?}"));
        assert!(launch_listening(&out.stdout), "{out:?}");
        assert!(out.elapsed >= Duration::from_millis(400), "{out:?}");
        let l = launched(&out, &dir);
        let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, false);
        assert_eq!(stopped, Stopped::Killed { escalated: false });
    }
}

#[test]
fn launch_of_a_server_that_never_listens_succeeds_after_the_wait() {
    let tmp = Tmp::new();
    let no_env = Vec::new();
    let cmd = strings(&["/bin/sleep", "30"]);
    let dir = tmp.join("home/deaf");
    let r = run_id();
    let _reaper = Reaper::new(&r);
    let mut s = spec(&r, &dir, &no_env, &cmd);
    s.port = free_port();
    s.ready_cs = 60;
    let out = launch(&s);
    assert_eq!(out.status, 0, "{out:?}");
    assert!(!launch_listening(&out.stdout), "{out:?}");
    assert!(out.elapsed >= Duration::from_millis(600), "{out:?}");
    let l = launched(&out, &dir);
    let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, false);
    assert_eq!(stopped, Stopped::Killed { escalated: false });
}

#[test]
fn prlimit_caps_the_address_space() {
    let tmp = Tmp::new();
    let dir = tmp.join("home/run");
    let no_env = Vec::new();
    let cmd = strings(&["/bin/sleep", "30"]);
    let limits = LimitPlan::Prlimit {
        address_space: Some(8 << 30),
    };
    let r = run_id();
    let _reaper = Reaper::new(&r);
    let mut s = spec(&r, &dir, &no_env, &cmd);
    s.port = free_port();
    s.limits = &limits;
    let out = launch(&s);
    assert_eq!(out.status, 0, "{out:?}");
    let l = launched(&out, &dir);
    // The pid is known before the wrapper's exec chain (prlimit, env)
    // reaches the server: read the limits once it has.
    assert!(
        wait_until(Duration::from_secs(5), || {
            fs::read(format!("/proc/{}/cmdline", l.pid)).is_ok_and(|c| c == b"/bin/sleep\x0030\x00")
        }),
        "the server never exec'd: {out:?}"
    );
    let lim = fs::read_to_string(format!("/proc/{}/limits", l.pid)).unwrap();
    let line = lim
        .lines()
        .find(|x| x.starts_with("Max address space"))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(3), Some("8589934592"), "{line}");
    let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, false);
    assert_eq!(stopped, Stopped::Killed { escalated: false });
}

#[test]
fn workdir_prologue_and_home() {
    let tmp = Tmp::new();
    let wd = tmp.join("work dir 'x'");
    fs::create_dir_all(&wd).unwrap();
    let outfile = tmp.join("out");
    let e = env(&[("FOO", "bar"), ("OUT", &outfile)]);
    let prologue = strings(&[
        "FROM_PROLOGUE=\"p-$FOO\"",
        "export FROM_PROLOGUE",
        ": \"$SURELY_UNSET_VARIABLE_IN_PROLOGUE\"",
        "false",
    ]);
    let cmd = strings(&[
        "/bin/sh",
        "-c",
        "printf %s \"$FROM_PROLOGUE\" > \"$OUT\"; exec sleep 30",
    ]);
    for workdir in [Some(wd.as_str()), None] {
        let dir = tmp.join(&format!("home/run-{}", workdir.is_some()));
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &e, &cmd);
        s.port = free_port();
        s.prologue = &prologue;
        s.workdir = workdir;
        let out = launch(&s);
        assert_eq!(out.status, 0, "{out:?}");
        let l = launched(&out, &dir);
        let cwd = fs::read_link(format!("/proc/{}/cwd", l.pid)).unwrap();
        let want = workdir
            .map(String::from)
            .unwrap_or_else(|| std::env::var("HOME").unwrap());
        assert_eq!(cwd, PathBuf::from(want));
        assert!(wait_until(Duration::from_secs(3), || fs::read_to_string(
            &outfile
        )
        .is_ok_and(|s| s == "p-bar")));
        fs::remove_file(&outfile).unwrap();
        let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, false);
        assert_eq!(stopped, Stopped::Killed { escalated: false });
    }
}

#[test]
fn hostile_comm_does_not_confuse_stat_parsing() {
    // comm comes from the executable's file name, so a symlink named like
    // the rest of a stat line (with ')' and a newline) tries to shift the
    // fields.
    let tmp = Tmp::new();
    let link = tmp.join("a) S 1 2\nz) x");
    std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
    let (r, dir, l, _reaper) = launch_ok(&tmp, "comm", &[&link, "1004"]);
    assert_eq!(stat(l.pid).unwrap().start, l.start_time);
    assert_eq!(l.pgid, stat(l.pid).unwrap().pgrp);
    let comm = fs::read(format!("/proc/{}/comm", l.pid)).unwrap();
    assert!(comm.starts_with(b"a) S 1 2\nz) x"), "{comm:?}");
    let p = proc_of(&r, &dir, &l);
    assert_eq!(poll_one(&p), ProcStatus::Running);
    let (stopped, out) = stop(&p, 5, false);
    assert_eq!(stopped, Stopped::Killed { escalated: false }, "{out:?}");
    assert!(!alive(l.pid, Some(l.start_time)));
}

#[test]
fn server_gets_the_login_umask_or_the_prologues() {
    fn umask_of(pid: u32) -> String {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .unwrap()
            .trim()
            .to_string()
    }
    let tmp = Tmp::new();
    let no_env = Vec::new();
    let cmd = strings(&["/bin/sleep", "30"]);
    let login = umask_of(std::process::id());
    let set_027 = strings(&["umask 027"]);
    for (prologue, want) in [(&[][..], login.as_str()), (&set_027[..], "0027")] {
        let dir = tmp.join(&format!("home/run-{}", prologue.len()));
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &no_env, &cmd);
        s.port = free_port();
        s.prologue = prologue;
        let out = launch(&s);
        assert_eq!(out.status, 0, "{out:?}");
        let l = launched(&out, &dir);
        assert_eq!(umask_of(l.pid), want);
        assert_eq!(umask_of(stat(l.pid).unwrap().ppid), "0077", "the wrapper's");
        // The first run makes the parent (the fallback after the early
        // mkdir failed), the second only its own directory: 0700 either way.
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.join("home")), 0o700);
        assert_eq!(mode(&format!("{dir}/server.log")), 0o600);
        assert_eq!(mode(&format!("{dir}/pid")), 0o600);
        let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, true);
        assert_eq!(stopped, Stopped::Killed { escalated: false });
        assert_eq!(mode(&format!("{dir}/exit_status")), 0o600);
    }
}

/// The spawner made the run directory (`dir_made`): the script uses it
/// as it is (the same directory, not made again); when it vanished in
/// between, the script makes it and its parent, 0700.
#[test]
fn a_run_directory_the_spawner_made_is_used_or_made_again_when_gone() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let tmp = Tmp::new();
    let no_env = Vec::new();
    let cmd = strings(&["/bin/sleep", "30"]);
    for made in [true, false] {
        let dir = tmp.join(&format!("home-{made}/run"));
        let before = made.then(|| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .unwrap();
            fs::metadata(&dir).unwrap().ino()
        });
        let r = run_id();
        let _reaper = Reaper::new(&r);
        let mut s = spec(&r, &dir, &no_env, &cmd);
        s.port = free_port();
        s.check_port = false;
        s.dir_made = true;
        let out = launch(&s);
        assert_eq!(out.status, 0, "{out:?}");
        let l = launched(&out, &dir);
        if let Some(ino) = before {
            assert_eq!(fs::metadata(&dir).unwrap().ino(), ino, "made again");
        }
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.join(&format!("home-{made}"))), 0o700);
        assert_eq!(mode(&format!("{dir}/server.log")), 0o600);
        assert_eq!(
            fs::read_to_string(format!("{dir}/pid")).unwrap(),
            format!("{}\n", l.pid)
        );
        let (stopped, _) = stop(&proc_of(&r, &dir, &l), 5, false);
        assert_eq!(stopped, Stopped::Killed { escalated: false });
    }
}

// -------------------------------------------------------------- parsers

#[test]
fn the_launch_parsers_accept_good_output_and_refuse_garbage() {
    let good = "pid=123\npgid=120\nstart_time=987654\nuid=1000\nboot_id=0a1b2c3d-0000-4000-8000-00000000abcd\n";
    let want = Launched {
        pid: 123,
        pgid: 120,
        start_time: 987654,
        uid: 1000,
        boot_id: "0a1b2c3d-0000-4000-8000-00000000abcd".into(),
    };
    assert_eq!(parse_launch(good).unwrap(), want);
    assert_eq!(
        parse_launch(&format!("Welcome to host!\n{good}")).unwrap(),
        want
    );
    for bad in [
        "",
        "garbage",
        "port-taken\n",
        &good.replace("pid=123", "pid=x"),
        &good.replace("pid=123", "pid=1"),
        &good.replace("pgid=120", "pgid=0"),
        &good.replace("uid=1000", "uid=-1"),
        &good.replace("start_time=987654", "start_time="),
        &good.replace("boot_id=0a1b", "boot_id=zz"),
        &format!("{good}pid=5\n"),
    ] {
        match parse_launch(bad) {
            Err(Error::Invalid { reason, .. }) => {
                assert!(reason.contains(" in \""), "{reason}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    for cut in 0..good.len() {
        let _ = parse_launch(&good[..cut]);
    }
    assert!(parse_launch(&good[..good.len() - 40]).is_err());

    assert_eq!(
        parse_launch_failure("exited 7\nlog: a\nlog: \nlog: b c\n"),
        Some((Some(7), "a\n\nb c".into()))
    );
    assert_eq!(
        parse_launch_failure("exited\n"),
        Some((None, String::new()))
    );
    assert_eq!(parse_launch_failure(good), None);
    assert_eq!(parse_launch_failure(""), None);
}
