//! The launch: the script that starts one server on a host
//! (`sh/launch.sh`, with `sh/wrapper.sh`), the command it is fed to, and the
//! parsers for what it prints.

use std::collections::HashMap;

use super::limits::{self, LimitPlan};
use super::quote::{check_env_name, invalid, quote};
use super::run::{self, check_dir, check_run_id, is_boot_id};
use super::sh::{self, excerpt, Preamble};
use crate::error::Result;

/// Exit status the launch script uses when the port turned out to be in use.
pub const PORT_TAKEN: u32 = 75;

/// Exit status the launch script uses when the server died right after it
/// started; its stdout then holds what [`parse_launch_failure`] reads.
pub const LAUNCH_FAILED: u32 = 3;

/// Everything the launch script needs. Its `Debug` shows env names only:
/// the values are secrets.
#[derive(Clone, Copy)]
pub struct LaunchSpec<'a> {
    /// Identifies the server on the host: `[a-z0-9-]{1,64}`.
    pub run_id: &'a str,
    /// Absolute per-server directory on the host, e.g.
    /// `/home/u/.jupyterhub-ssh/run-ab12`: no `.`, `..` or empty components,
    /// at least two levels below `/` (stop removes it), no NUL or newline.
    pub dir: &'a str,
    /// Must not be listening (TCP, v4 or v6, any address) when the command starts.
    pub port: u16,
    /// Exported to the server; names must pass [`check_env_name`].
    pub env: &'a [(String, String)],
    /// Raw shell lines from the admin (trusted), run after the exports and
    /// before the start.
    pub prologue: &'a [String],
    /// The server's argv; non-empty.
    pub command: &'a [String],
    /// Where the server starts; `None` means `$HOME`.
    pub workdir: Option<&'a str>,
    /// How limits are enforced.
    pub limits: &'a LimitPlan,
    /// Centiseconds to wait, after the pid is known, for something to listen
    /// on `port` (the server is ready for the hub's first check) or for the
    /// server to exit (reported with its log), whichever comes first. 0
    /// returns as soon as the pid is known; when the wait runs out with the
    /// server alive and not listening, the launch succeeds all the same.
    pub ready_cs: u32,
    /// Whether the host's `env` has `--default-signal` (from its facts);
    /// `None` tests it in the script.
    pub default_signal: Option<bool>,
    /// Whether the script checks that nothing listens on `port` before the
    /// start (`ss`, in a process of its own). `false` when the spawner has
    /// already asked sshd to connect to the port and every address was
    /// refused ([`crate::spawner`]'s port probe): nothing runs for it on
    /// the host.
    pub check_port: bool,
    /// Whether the spawner has just made `dir` (mode 0700, empty) without
    /// starting a program on the host (over the SFTP session a pooled
    /// connection keeps, [`crate::ssh::Pool::make_dir`]). The script then
    /// starts no `mkdir`; it still makes the directory when it is missing.
    pub dir_made: bool,
    /// The GPUs (UUIDs) the server is given, written one a line to
    /// `DIR/gpus` (0600) so the host records who holds what; none: no file.
    pub gpus: &'a [String],
}

impl std::fmt::Debug for LaunchSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("LaunchSpec")
            .field("run_id", &self.run_id)
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("env_names", &names)
            .field("prologue", &self.prologue)
            .field("command", &self.command)
            .field("workdir", &self.workdir)
            .field("limits", &self.limits)
            .field("ready_cs", &self.ready_cs)
            .field("default_signal", &self.default_signal)
            .field("check_port", &self.check_port)
            .field("dir_made", &self.dir_made)
            .field("gpus", &self.gpus)
            .finish()
    }
}

/// What the launch script printed on success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// The server process (the wrapper's child).
    pub pid: u32,
    /// The server's process group: the launch's login process (a session
    /// leader made by sshd, gone once the launch returns; the group lives
    /// on with the wrapper and the server), or the wrapper itself when the
    /// launch did not lead its group and had to `setsid`.
    pub pgid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_time: u64,
    /// Real uid of the server process.
    pub uid: u32,
    /// `/proc/sys/kernel/random/boot_id` at launch.
    pub boot_id: String,
}

/// The launch script: `sh/launch.sh` (which says how, step by step, and
/// what each step costs) behind a preamble of the spec's values.
///
/// It creates `dir` (0700, and its parent), refuses to start when `port` is
/// listening (when `check_port`; prints `port-taken`, exits [`PORT_TAKEN`]),
/// exports `env`, runs the prologue, changes to the working directory and
/// starts `command` detached, in a process group of its own that outlives
/// the SSH session, under a wrapper whose argv carries the marker
/// `ssh-spawner-run:RUN_ID` (find it with `pgrep -f`; run the script with
/// [`launch_command`]). The wrapper writes the
/// server's pid to `DIR/pid` and its exit status to `DIR/exit_status`; server
/// output is appended to `DIR/server.log`. The script returns once the port
/// listens (or after `ready_cs`, or at once when that is 0); the server
/// outlives the SSH session.
///
/// Exit status and stdout:
/// - 0: `pid=`, `pgid=`, `start_time=`, `uid=`, `boot_id=` lines, for
///   [`parse_launch`], and `listening=yes|no` ([`launch_listening`]).
/// - [`PORT_TAKEN`]: `port-taken`; nothing was started.
/// - [`LAUNCH_FAILED`]: the server died before its port listened (within
///   `ready_cs`), or the wrapper reported no pid: see [`parse_launch_failure`].
/// - 4: the server's wrapper vanished under it; stderr says so.
/// - anything else: a step failed (mkdir, the prologue's `cd`, a missing
///   `setsid`); stderr says which.
///
/// The prologue runs with `set +eu`: admin lines often source profile
/// scripts that use unset variables or let commands fail. Only the
/// script's own files get umask 077; the prologue and the server run with
/// the login's umask, and the server with whatever the prologue set.
/// The `uid=` reported is the launching login's real uid (the server's, as
/// nothing between them can change it without privileges).
pub fn launch_script(spec: &LaunchSpec) -> Result<String> {
    check_run_id(spec.run_id)?;
    let parent = check_dir(spec.dir)?;
    let Some(program) = spec.command.first() else {
        return Err(invalid("command", "is empty"));
    };
    if program.is_empty() {
        return Err(invalid("command", "the program name is empty"));
    }
    if program.contains('=') {
        // `env` (which resets INT/QUIT, see sh/launch.sh) would take a first
        // word with '=' for an assignment instead of the program.
        return Err(invalid(
            format!("command program {program:?}"),
            "must not contain '='",
        ));
    }

    let limit_argv = limits::argv(spec.limits)?;
    let argv = limit_argv
        .iter()
        .map(|w| (w.as_str(), "limit option".to_string()))
        .chain(
            spec.command
                .iter()
                .enumerate()
                .map(|(i, w)| (w.as_str(), format!("command argument {i}"))),
        );

    // The exports and the prologue, in one function the script calls where
    // neither can change what the rest of it relies on.
    let mut lines = Vec::with_capacity(spec.env.len() + spec.prologue.len());
    for (name, value) in spec.env {
        check_env_name(name)?;
        let v = quote(value, &format!("value of environment variable {name}"))?;
        lines.push(format!("export {name}={v}"));
    }
    for (i, line) in spec.prologue.iter().enumerate() {
        if line.contains('\0') {
            return Err(invalid(
                format!("prologue line {}", i + 1),
                "contains a NUL byte",
            ));
        }
        lines.push(line.clone());
    }

    if let Some(bad) = spec.gpus.iter().find(|g| !super::gpus::valid_uuid(g)) {
        return Err(invalid(format!("GPU {bad:?}"), "is not a GPU UUID"));
    }
    let default_signal = match spec.default_signal {
        Some(true) => "yes",
        Some(false) => "no",
        None => "test",
    };
    let mut p = Preamble::new();
    p.value("d", spec.dir, "server directory")?
        .value("parent", parent, "server directory")?
        .number("port", spec.port)
        .number("port_hex", format!("{:04X}", spec.port))
        .number("ready_cs", spec.ready_cs)
        .number("check_port", u8::from(spec.check_port))
        .number("dir_made", u8::from(spec.dir_made))
        .value("gpus", &spec.gpus.join("\n"), "GPUs")?
        .flag("default_signal", default_signal)
        .number("cd_home", u8::from(spec.workdir.is_none()))
        .value("workdir", spec.workdir.unwrap_or(""), "working directory")?
        .value("marker", &run::marker(spec.run_id), "run id")?
        .value("wrapper", &sh::code(sh::WRAPPER), "wrapper")?
        .words("server_argv", argv)?
        .number("launch_failed", LAUNCH_FAILED)
        .number("port_taken", PORT_TAKEN)
        .function("ssp_exports_and_prologue", &lines);
    Ok(p.script(&[sh::LIB, sh::LAUNCH]))
}

/// The command the launch script is fed to on stdin (by the login shell,
/// whatever it is): `/bin/sh -s` with the run's marker and, when it needs
/// no quoting in any shell, the server directory as arguments the script
/// ignores. They put the marker (and the directory) in the argv of the
/// wrapper, which is a fork of this `sh`, for `pgrep -f`, [`list_script`]
/// and the facts' server count.
///
/// [`list_script`]: super::hosts::list_script
pub fn launch_command(spec: &LaunchSpec) -> Result<String> {
    check_run_id(spec.run_id)?;
    let mut cmd = format!("/bin/sh -s {}", run::marker(spec.run_id));
    if spec
        .dir
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@=".contains(&b))
    {
        cmd.push(' ');
        cmd.push_str(spec.dir);
    }
    Ok(cmd)
}

/// Whether the server was listening on its port when a successful launch
/// returned (`listening=yes` in its stdout); `false` when the wait for it was
/// off or ran out.
pub fn launch_listening(stdout: &str) -> bool {
    stdout
        .lines()
        .any(|l| l.trim_end_matches('\r') == "listening=yes")
}

/// Parse the launch script's stdout (status 0). Error::Invalid with the
/// offending text on garbage.
///
/// Lines that are not `key=value` for one of the five keys are ignored (a
/// login script on the host may print noise); each key must appear exactly
/// once with a valid value.
pub fn parse_launch(stdout: &str) -> Result<Launched> {
    let bad = |reason: String| {
        invalid(
            "launch script output",
            format!("{reason} in {}", excerpt(stdout)),
        )
    };
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for line in stdout.lines() {
        let line = line.trim_end_matches('\r');
        if line == "port-taken" {
            return Err(bad("the port is already in use".into()));
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !matches!(key, "pid" | "pgid" | "start_time" | "uid" | "boot_id") {
            continue;
        }
        if fields.insert(key, value).is_some() {
            return Err(bad(format!("{key} appears twice")));
        }
    }
    let get = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| bad(format!("no {key}")))
    };
    let num_u32 = |key: &str| -> Result<u32> {
        let v = get(key)?;
        v.parse::<u32>()
            .map_err(|_| bad(format!("{key}={v:?} is not a number")))
    };
    let pid = num_u32("pid")?;
    let pgid = num_u32("pgid")?;
    if pid < 2 || pgid < 2 {
        return Err(bad(format!("pid {pid} / pgid {pgid} cannot be a server")));
    }
    let st = get("start_time")?;
    let start_time = st
        .parse::<u64>()
        .map_err(|_| bad(format!("start_time={st:?} is not a number")))?;
    let uid = num_u32("uid")?;
    let boot_id = get("boot_id")?;
    if !is_boot_id(boot_id) {
        return Err(bad(format!("boot_id={boot_id:?} is not a boot id")));
    }
    Ok(Launched {
        pid,
        pgid,
        start_time,
        uid,
        boot_id: boot_id.to_string(),
    })
}

/// Parse the launch script's stdout when it exited [`LAUNCH_FAILED`]: the
/// server's exit status (when the wrapper recorded one) and the last lines
/// of `server.log`, joined by newlines. `None` when the output is not such a
/// report.
pub fn parse_launch_failure(stdout: &str) -> Option<(Option<i32>, String)> {
    let mut status = None;
    let mut found = false;
    let mut log: Vec<&str> = Vec::new();
    for line in stdout.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("log: ") {
            log.push(rest);
        } else if line == "log:" {
            log.push("");
        } else if line == "exited" {
            found = true;
        } else if let Some(rest) = line.strip_prefix("exited ") {
            found = true;
            status = rest.trim().parse::<i32>().ok();
        }
    }
    found.then(|| (status, log.join("\n")))
}

#[cfg(test)]
mod tests;
