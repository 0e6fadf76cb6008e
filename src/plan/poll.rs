//! The poll and the ready check: what became of launched servers
//! (`sh/poll.sh`, `sh/ready.sh`), and the parser for what the poll prints.

use std::collections::{HashMap, HashSet};

use super::launch::LAUNCH_FAILED;
use super::quote::invalid;
use super::run::{check_dir, check_run_id};
use super::sh::{self, excerpt, Preamble};
use crate::error::Result;

/// One server to poll or stop, as recorded at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// The run id the server was launched with.
    pub run_id: String,
    /// See [`super::launch::Launched::pid`].
    pub pid: u32,
    /// See [`super::launch::Launched::pgid`].
    pub pgid: u32,
    /// See [`super::launch::Launched::start_time`].
    pub start_time: u64,
    /// See [`super::launch::Launched::uid`].
    pub uid: u32,
    /// See [`super::launch::Launched::boot_id`].
    pub boot_id: String,
    /// The per-server directory ([`super::launch::LaunchSpec::dir`]).
    pub dir: String,
}

/// What poll learned about one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcStatus {
    /// The recorded process is alive and is still the one that was launched.
    Running,
    /// The process is gone (or a zombie, or its pid now belongs to another
    /// process/owner, or the host rebooted).
    Exited {
        /// The real exit status from the wrapper's file when there is one.
        status: Option<i32>,
        /// Which of those it was.
        reason: ExitReason,
    },
}

/// Why poll considers a server not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The process is gone and the wrapper recorded its exit status.
    Exited,
    /// The process is a zombie: dead, not yet reaped.
    Zombie,
    /// The pid is alive but belongs to another process (start time or owner differ).
    PidReused,
    /// The host booted since the launch.
    Rebooted,
    /// The process is gone and left no exit status.
    Gone,
}

/// Checks what a script takes from a recorded server.
pub(crate) fn check_proc(p: &Proc) -> Result<()> {
    check_run_id(&p.run_id)?;
    check_dir(&p.dir)?;
    Ok(())
}

/// The one check the spawner runs on the host when, waiting for a launched
/// server from the hub ([`super::launch::LaunchSpec::ready_cs`] 0), it finds the server's
/// port accepting connections, or wants to know whether it still runs: one
/// `sh` and, when the server lives, one `ss`. Prints `listening=yes` when
/// the server lives and a socket of its login listens on the port (another
/// user's listener is never taken for it), `listening=no` while it lives
/// without one; when it is gone (or its pid is another process now) it
/// prints the launch's failure report (`exited STATUS` and the log's last
/// lines) and exits [`LAUNCH_FAILED`].
pub fn ready_check_script(p: &Proc, port: u16) -> Result<String> {
    check_proc(p)?;
    let mut pre = Preamble::new();
    pre.value("d", &p.dir, "server directory")?
        .number("pid", p.pid)
        .number("start", p.start_time)
        .number("uid", p.uid)
        .number("port", port)
        .number("port_hex", format!("{port:04X}"))
        .number("launch_failed", LAUNCH_FAILED);
    Ok(pre.script(&[sh::LIB, sh::READY]))
}

/// The poll script (`sh/poll.sh`) for many servers of ONE remote user on
/// one host; one exec answers all.
///
/// Prints one line per server: `RUN_ID STATE [STATUS]`, STATE one of
/// `running exited zombie reused rebooted gone`, STATUS the number in
/// `DIR/exit_status` when that file exists (never for `running`). It only
/// reads files with shell builtins, so it spawns no process at all.
pub fn poll_script(procs: &[Proc]) -> Result<String> {
    let mut seen = HashSet::new();
    let mut words: Vec<(String, &str)> = Vec::with_capacity(procs.len() * 6);
    for p in procs {
        check_proc(p)?;
        if !seen.insert(p.run_id.as_str()) {
            return Err(invalid(
                format!("run id {:?}", p.run_id),
                "appears twice in one poll",
            ));
        }
        words.push((p.run_id.clone(), "run id"));
        words.push((p.pid.to_string(), "pid"));
        words.push((p.start_time.to_string(), "start time"));
        words.push((p.uid.to_string(), "uid"));
        words.push((p.boot_id.clone(), "boot id"));
        words.push((p.dir.clone(), "server directory"));
    }
    let mut pre = Preamble::new();
    pre.words(
        "servers",
        words.iter().map(|(w, what)| (w.as_str(), what.to_string())),
    )?;
    Ok(pre.script(&[sh::LIB, sh::POLL]))
}

/// Parse the poll script's stdout into (run_id, status) for every run_id
/// asked, in the order asked; a run_id missing from the output is an
/// Error::Invalid. Lines for other ids are ignored; a malformed or repeated
/// line for an asked id is an error.
pub fn parse_poll(stdout: &str, asked: &[Proc]) -> Result<Vec<(String, ProcStatus)>> {
    let bad = |reason: String| {
        invalid(
            "poll script output",
            format!("{reason} in {}", excerpt(stdout)),
        )
    };
    let wanted: HashSet<&str> = asked.iter().map(|p| p.run_id.as_str()).collect();
    let mut found: HashMap<&str, ProcStatus> = HashMap::new();
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        let Some(id) = words.next() else { continue };
        if !wanted.contains(id) {
            continue;
        }
        let state = words
            .next()
            .ok_or_else(|| bad(format!("no state for {id}")))?;
        let status = match words.next() {
            None => None,
            Some(s) => Some(
                s.parse::<i32>()
                    .map_err(|_| bad(format!("bad exit status {s:?} for {id}")))?,
            ),
        };
        if words.next().is_some() {
            return Err(bad(format!("trailing words for {id}")));
        }
        let reason = match state {
            "running" => None,
            "exited" => Some(ExitReason::Exited),
            "zombie" => Some(ExitReason::Zombie),
            "reused" => Some(ExitReason::PidReused),
            "rebooted" => Some(ExitReason::Rebooted),
            "gone" => Some(ExitReason::Gone),
            other => return Err(bad(format!("unknown state {other:?} for {id}"))),
        };
        let st = match reason {
            None => ProcStatus::Running,
            Some(reason) => ProcStatus::Exited { status, reason },
        };
        if found.insert(id, st).is_some() {
            return Err(bad(format!("{id} reported twice")));
        }
    }
    asked
        .iter()
        .map(|p| {
            found
                .get(p.run_id.as_str())
                .cloned()
                .map(|s| (p.run_id.clone(), s))
                .ok_or_else(|| bad(format!("no line for {}", p.run_id)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
