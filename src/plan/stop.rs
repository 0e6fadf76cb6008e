//! The stop: ending a server and everything it started (`sh/stop.sh`), and
//! the parser for what it prints.

use super::limits::scope_unit;
use super::poll::{check_proc, Proc};
use super::quote::invalid;
use super::run;
use super::sh::{self, excerpt, Preamble};
use crate::error::Result;

/// What stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The group was signalled and is gone.
    Killed {
        /// Whether SIGKILL was needed after the grace period.
        escalated: bool,
    },
    /// Nothing of ours was running (already exited, pid reused, rebooted).
    AlreadyGone,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stopped::Killed { escalated: false } => "stopped with SIGTERM",
            Stopped::Killed { escalated: true } => "killed with SIGKILL after the grace",
            Stopped::AlreadyGone => "nothing was running",
        })
    }
}

/// The stop script (`sh/stop.sh`) for one server.
///
/// It signals nothing unless the recorded pid is verified to be ours: same
/// boot, same start time, same real uid, not a zombie. The wrapper counts
/// as ours when it is the server's parent, alive, has our uid and is in the
/// recorded group (which it leads, or which the launch's login led), or when
/// it is the recorded group's leader and the server's parent or group. Then it collects every descendant (walking
/// ppid links, since kernels and other children may have called setsid and
/// left the group) and every member of the group, sends TERM to the group
/// and to each of them, waits up to `grace_secs` for all to be gone, then
/// sends KILL to what remains and waits up to about 5 s more. Each pid is
/// re-checked against its start time just before it is signalled, and the
/// group is signalled only while a process verified as ours is in it.
///
/// Prints `killed`, `killed escalated` or `gone` (nothing of ours was
/// running) and exits 0, after removing the server directory, or when
/// `keep_log` everything in it except `server.log` and `exit_status`
/// (certificates included). If something survives SIGKILL it prints the
/// survivors on stderr, leaves the directory alone and exits 1.
pub fn stop_script(proc_: &Proc, grace_secs: u32, keep_log: bool) -> Result<String> {
    check_proc(proc_)?;
    if proc_.pid < 2 || proc_.pgid < 2 {
        // kill -- -1 would signal every process the user may signal.
        return Err(invalid(
            format!("recorded pid {} / pgid {}", proc_.pid, proc_.pgid),
            "cannot belong to a server",
        ));
    }
    let mut pre = Preamble::new();
    pre.number("pid", proc_.pid)
        .number("pgid", proc_.pgid)
        .number("start", proc_.start_time)
        .number("uid", proc_.uid)
        .value("boot_id", &proc_.boot_id, "boot id")?
        .value("d", &proc_.dir, "server directory")?
        .number("grace", grace_secs)
        .number("keep", u8::from(keep_log))
        .value("env_marker", &run::env_marker(&proc_.run_id), "run id")?
        .value(
            "unit",
            &format!("{}.scope", scope_unit(&proc_.run_id)),
            "run id",
        )?;
    Ok(pre.script(&[sh::LIB, sh::STOP]))
}

/// Parse the stop script's stdout. Exactly one of `killed`, `killed
/// escalated` or `gone` must appear; other lines are ignored.
pub fn parse_stop(stdout: &str) -> Result<Stopped> {
    let mut result = None;
    for line in stdout.lines() {
        let r = match line.trim() {
            "killed" => Stopped::Killed { escalated: false },
            "killed escalated" => Stopped::Killed { escalated: true },
            "gone" => Stopped::AlreadyGone,
            _ => continue,
        };
        if result.replace(r).is_some() {
            return Err(invalid(
                "stop script output",
                format!("more than one result in {}", excerpt(stdout)),
            ));
        }
    }
    result.ok_or_else(|| {
        invalid(
            "stop script output",
            format!("no result in {}", excerpt(stdout)),
        )
    })
}

#[cfg(test)]
mod tests;
