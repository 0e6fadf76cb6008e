//! What the launch, ready check, poll, stop and adopt scripts really printed
//! (`fixtures/scripts`, see its README.md), read by their parsers in
//! `plan::launch`, `plan::poll` and `plan::stop`.

use ssh_spawner::plan::launch::{launch_listening, parse_launch, parse_launch_failure, Launched};
use ssh_spawner::plan::poll::{parse_poll, ExitReason, Proc, ProcStatus};
use ssh_spawner::plan::stop::{parse_stop, Stopped};
use ssh_spawner::Error;

fn fixture(path: &str) -> String {
    let p = format!("{}/fixtures/scripts/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

const BOOT: &str = "d49ccf43-46a3-4eb0-8ae3-8cb2b515151a";

fn launched() -> Launched {
    Launched {
        pid: 17646,
        pgid: 17638,
        start_time: 1285454,
        uid: 1001,
        boot_id: BOOT.into(),
    }
}

/// A record as the hub keeps it; the poll parser looks at the run id only.
fn record(run_id: &str) -> Proc {
    let l = launched();
    Proc {
        run_id: run_id.into(),
        pid: l.pid,
        pgid: l.pgid,
        start_time: l.start_time,
        uid: l.uid,
        boot_id: l.boot_id,
        dir: format!("/tmp/fixcap-run/{run_id}"),
    }
}

#[test]
fn a_launch_that_listened_and_the_same_server_adopted() {
    let out = fixture("launch.txt");
    assert_eq!(parse_launch(&out).unwrap(), launched());
    assert!(launch_listening(&out));
    assert_eq!(parse_launch_failure(&out), None);
    // adopt prints the launch's lines for the process in the pid file.
    let adopt = fixture("adopt.txt");
    assert_eq!(parse_launch(&adopt).unwrap(), launched());
    assert!(!launch_listening(&adopt));
    assert!(launch_listening(&fixture("ready-check.txt")));
}

#[test]
fn a_port_already_taken() {
    match parse_launch(&fixture("launch-port-taken.txt")) {
        Err(Error::Invalid { what, reason }) => {
            assert_eq!(what, "launch script output");
            assert_eq!(reason, "the port is already in use in \"port-taken\\n\"");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_launch_failure(&fixture("launch-port-taken.txt")),
        None
    );
}

#[test]
fn a_server_that_died_at_once_and_one_that_was_stopped() {
    let out = fixture("launch-fails.txt");
    assert!(parse_launch(&out).is_err());
    assert!(!launch_listening(&out));
    assert_eq!(
        parse_launch_failure(&out),
        Some((
            Some(1),
            "Traceback (most recent call last):\n  \
             File \"<frozen runpy>\", line 198, in _run_module_as_main\n\
             ModuleNotFoundError: No module named 'jupyterhub'"
                .to_string()
        ))
    );
    // The ready check of a server that was stopped: its status and log.
    assert_eq!(
        parse_launch_failure(&fixture("ready-check-gone.txt")),
        Some((
            Some(143),
            "Serving HTTP on 0.0.0.0 port 28417 (http://0.0.0.0:28417/) ...\nTerminated"
                .to_string()
        ))
    );
}

#[test]
fn a_poll_of_one_server_and_three_that_are_not_running() {
    let asked = [
        record("5f0c1d2e3a4b6978"),
        record("a1a1a1a1a1a1a1a1"),
        record("b2b2b2b2b2b2b2b2"),
        record("c3c3c3c3c3c3c3c3"),
    ];
    let exited = |reason| ProcStatus::Exited {
        status: None,
        reason,
    };
    assert_eq!(
        parse_poll(&fixture("poll.txt"), &asked).unwrap(),
        vec![
            ("5f0c1d2e3a4b6978".to_string(), ProcStatus::Running),
            ("a1a1a1a1a1a1a1a1".to_string(), exited(ExitReason::Gone)),
            (
                "b2b2b2b2b2b2b2b2".to_string(),
                exited(ExitReason::PidReused)
            ),
            ("c3c3c3c3c3c3c3c3".to_string(), exited(ExitReason::Rebooted)),
        ]
    );
    // Asked in another order, answered in the order asked.
    let two = [asked[3].clone(), asked[0].clone()];
    let got = parse_poll(&fixture("poll.txt"), &two).unwrap();
    assert_eq!(got[0].0, "c3c3c3c3c3c3c3c3");
    assert_eq!(got[1].1, ProcStatus::Running);
    // A record the output does not mention is an error, not "running".
    assert!(parse_poll(&fixture("poll.txt"), &[record("d4d4d4d4d4d4d4d4")]).is_err());

    assert_eq!(
        parse_poll(&fixture("poll-after-stop.txt"), &asked[..1]).unwrap(),
        vec![(
            "5f0c1d2e3a4b6978".to_string(),
            ProcStatus::Exited {
                status: Some(143),
                reason: ExitReason::Exited
            }
        )]
    );
}

#[test]
fn a_stop_and_a_second_stop() {
    let first = parse_stop(&fixture("stop.txt")).unwrap();
    assert_eq!(first, Stopped::Killed { escalated: false });
    assert_eq!(first.to_string(), "stopped with SIGTERM");
    let again = parse_stop(&fixture("stop-again.txt")).unwrap();
    assert_eq!(again, Stopped::AlreadyGone);
    assert_eq!(again.to_string(), "nothing was running");
    // Other scripts' output is no stop result.
    assert!(parse_stop(&fixture("launch.txt")).is_err());
}
