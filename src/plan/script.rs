//! The shell scripts that launch, poll and stop single-user servers on a
//! host, and the parsers for what they print.
//!
//! Nothing here does I/O: other code runs each script as `/bin/sh -s` over
//! SSH with the script on stdin. Stdin is the only channel secrets travel
//! on, because every user of a host can read every process's argv; so env
//! values appear in the script text and in `export` (a builtin), never as an
//! argument of any helper program and never in a file.
//!
//! Every script is a single shell function that is defined first and called
//! on the last line. The shell has to parse the whole function before it
//! runs any of it, so a transfer cut short by a dropped connection is a
//! syntax error that runs nothing, rather than a launch or a stop that ran
//! halfway. The call reads stdin from `/dev/null` so that no helper can
//! swallow script text.
//!
//! The scripts target dash, coreutils, procps and util-linux (Debian); they
//! read `/proc` with the `read` builtin rather than spawning helpers, since
//! one poll covers hundreds of servers.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Exit status the launch script uses when the port turned out to be in use.
pub const PORT_TAKEN: u32 = 75;

/// Exit status the launch script uses when the server died right after it
/// started; its stdout then holds what [`parse_launch_failure`] reads.
pub const LAUNCH_FAILED: u32 = 3;

/// How resource limits are enforced for one launch (decided elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitPlan {
    /// No enforcement.
    None,
    /// `systemd-run --user --scope --quiet --unit=UNIT -p MemoryMax=BYTES -p CPUQuota=PCT% -- ...`
    ///
    /// A property that is `None` is left out; with both left out the named
    /// scope is still created, since the caller chose it over [`LimitPlan::None`].
    Systemd {
        /// Name of the transient scope unit.
        unit: String,
        /// `MemoryMax=` in bytes.
        mem_max: Option<u64>,
        /// `CPUQuota=` in percent of one CPU.
        cpu_quota_percent: Option<u32>,
    },
    /// `prlimit --as=BYTES -- ...` (virtual memory cap).
    Prlimit {
        /// `--as=` in bytes.
        address_space: Option<u64>,
    },
}

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

/// One server to poll or stop, as recorded at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// The run id the server was launched with.
    pub run_id: String,
    /// See [`Launched::pid`].
    pub pid: u32,
    /// See [`Launched::pgid`].
    pub pgid: u32,
    /// See [`Launched::start_time`].
    pub start_time: u64,
    /// See [`Launched::uid`].
    pub uid: u32,
    /// See [`Launched::boot_id`].
    pub boot_id: String,
    /// The per-server directory ([`LaunchSpec::dir`]).
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

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// POSIX single-quote a value so `sh` reads it back byte-exact. Refuses NUL
/// (Error::Invalid naming `what`).
pub fn quote(value: &str, what: &str) -> Result<String> {
    if value.contains('\0') {
        return Err(invalid(
            what,
            "contains a NUL byte, which no shell word can carry",
        ));
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            // Inside single quotes nothing is special, not even backslash, so
            // a quote has to close the string, be escaped, and reopen it.
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Environment variable names: `^[A-Za-z_][A-Za-z0-9_]*$`, else
/// Error::Invalid { what: "environment variable name \"NAME\"", reason }.
pub fn check_env_name(name: &str) -> Result<()> {
    let what = || format!("environment variable name {name:?}");
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid(what(), "is empty")),
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        Some(_) => {
            return Err(invalid(
                what(),
                "must start with an ASCII letter or an underscore",
            ))
        }
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(invalid(
            what(),
            "may only contain ASCII letters, digits and underscores",
        ))
    }
}

/// The run-id rule: 1 to 64 characters of a-z, 0-9 and `-` (a run id names
/// a directory on the host and a file in the hub's journal).
pub fn check_run_id(run_id: &str) -> Result<()> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            format!("run id {run_id:?}"),
            "must be 1 to 64 characters of a-z, 0-9 and '-'",
        ))
    }
}

/// Checks a per-server directory and returns its parent. The rules are
/// stricter than "absolute" because stop runs `rm -rf` on it: a path like
/// `/home` or `/a/b/..` must never get that far.
fn check_dir(dir: &str) -> Result<&str> {
    let what = || format!("server directory {dir:?}");
    let Some(rest) = dir.strip_prefix('/') else {
        return Err(invalid(what(), "must be an absolute path"));
    };
    if dir.contains('\0') || dir.contains('\n') {
        return Err(invalid(what(), "must not contain NUL or newline"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid(
            what(),
            "must not contain empty components ('//' or a trailing '/')",
        ));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(invalid(what(), "must not contain '.' or '..' components"));
    }
    if parts.len() < 2 {
        return Err(invalid(
            what(),
            "must be at least two levels below / (stop removes it)",
        ));
    }
    match dir.rfind('/') {
        Some(i) if i > 0 => Ok(&dir[..i]),
        _ => Err(invalid(what(), "has no parent directory")),
    }
}

fn check_proc(p: &Proc) -> Result<()> {
    check_run_id(&p.run_id)?;
    check_dir(&p.dir)?;
    Ok(())
}

/// Shell helpers shared by every script.
///
/// `rs PID` reads `/proc/PID/stat` into `s_state s_ppid s_pgrp s_start`.
/// Field 2 (comm) is chosen by the program, may hold spaces, ')' and even
/// newlines, so only the text after the last ')' is split, and when comm
/// spans lines the last line is the one holding the numeric fields. The
/// shortest-prefix strip comes first because dash's longest-prefix match is
/// quadratic, which is most of the CPU time of a large poll.
/// `ru PID` reads the real uid into `s_uid`. `live` is false for the state
/// `rs` read last when that is a zombie (Z) or dead (X).
const HELPERS: &str = r#"nl='
'
dfl=" 	$nl"
IFS=$dfl
rs() {
  s_line=
  { while IFS= read -r s_l; do s_line=$s_l; done; } 2>/dev/null <"/proc/$1/stat" || return 1
  case $s_line in *')'*) ;; *) return 1 ;; esac
  s_line=${s_line#*')'}
  case $s_line in *')'*) s_line=${s_line##*')'} ;; esac
  set -f
  set -- $s_line
  set +f
  [ "$#" -ge 20 ] || return 1
  s_state=$1 s_ppid=$2 s_pgrp=$3
  shift 19
  s_start=$1
}
ru() {
  s_uid=
  { while read -r s_k s_v s_r; do case $s_k in Uid:) s_uid=$s_v; break ;; esac; done; } 2>/dev/null <"/proc/$1/status" || return 1
  [ -n "$s_uid" ]
}
live() {
  case $s_state in Z|X) return 1 ;; esac
}
boot=
IFS= read -r boot 2>/dev/null </proc/sys/kernel/random/boot_id || boot=
"#;

/// The wrapper that owns the server, with `DIR ARGV...` as its arguments and
/// fd 3 open on the pipe the launch script reads the pid from. It runs as a
/// subshell of the launch when the launch leads its process group (the
/// login sshd started for the session, whose argv carries the marker
/// `ssh-spawner-run:RUN_ID`, see [`launch_command`]), and otherwise as
/// `setsid -f /bin/sh -c WRAPPER MARKER DIR ARGV...`, leading a session of
/// its own. Either way the group is that of everything the server starts
/// without calling setsid, and it outlives the launch. It ignores TERM/INT/HUP only
/// after the fork, so the server does not inherit ignored signals, and so
/// that a TERM to the group stops the server while the wrapper lives on to
/// record the exit status. It starts with the umask the login and the
/// prologue left, which the server inherits at the fork (the subshell forks
/// once and execs, so `$!` is the server); then it takes umask 077 for its
/// own files. The pid file is written first (one `echo`, a builtin: a reader
/// sees no file, an empty one or the whole number, and `adopt` takes only a
/// number), so it exists by the time the launch returns; then the pid goes
/// down fd 3, which the launch script is blocked reading (no polling, no
/// `sleep`). The server does not inherit fd 3, so the launch sees
/// end-of-file at once. The exit status is written to a temporary name and
/// renamed (off the start's path), since poll reads its presence as "exited".
const WRAPPER: &str = r#"d=$1
shift
(exec 3>&-; exec "$@") &
c=$!
umask 077
trap '' TERM INT HUP
echo "$c" >"$d/pid"
echo "$c" >&3
exec 3>&-
wait "$c"
s=$?
echo "$s" >"$d/exit_status.tmp" && mv -f -- "$d/exit_status.tmp" "$d/exit_status"
"#;

/// Prints the failure report (exit status and log tail) and exits
/// [`LAUNCH_FAILED`]. The wrapper writes `exit_status` right after it reaps
/// the server, so a short wait is enough to get the real status.
const LAUNCH_FAILED_FN: &str = r#"failed() {
  i=0
  while [ "$i" -lt 50 ] && [ ! -e "$d/exit_status" ]; do
    i=$((i + 1))
    sleep 0.02
  done
  x=
  if [ -e "$d/exit_status" ]; then
    IFS= read -r x 2>/dev/null <"$d/exit_status" || :
  fi
  case $x in ''|*[!0-9]*) x= ;; esac
  printf 'exited%s\n' "${x:+ $x}"
  tail -n 20 -- "$d/server.log" 2>/dev/null | while IFS= read -r l || [ -n "$l" ]; do
    printf 'log: %s\n' "$l"
  done || :
  exit 3
}
"#;

/// `listening [UID]`: whether something (owned by UID, when given) listens
/// on TCP port `$port` (`$port_hex` in hex), asked of `ss` (a netlink dump
/// of the listening sockets only) when `$ss` names it, else read from
/// `/proc/net/tcp*` with `grep`.
const LISTENING_FN: &str = r#"listening() {
  if [ -n "$ss" ] && l_out=$(ss -Hltne "sport = :$port" 2>/dev/null); then
    case ${1:-0} in
      0) [ -n "$l_out" ] ;;
      *) case $l_out in *" uid:$1 "*) ;; *) false ;; esac ;;
    esac
  else
    case ${1:-0} in
      0) grep -qsE "^ *[0-9]+: [0-9A-F]+:$port_hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6 ;;
      *) grep -qsE "^ *[0-9]+: [0-9A-F]+:$port_hex [0-9A-F]+:[0-9A-F]+ 0A [0-9A-F]+:[0-9A-F]+ [0-9A-F]+:[0-9A-F]+ [0-9A-F]+ +$1 " /proc/net/tcp /proc/net/tcp6 ;;
    esac
  fi
}
"#;

/// The one check the spawner runs on the host when, waiting for a launched
/// server from the hub ([`LaunchSpec::ready_cs`] 0), it finds the server's
/// port accepting connections, or wants to know whether it still runs: one
/// `sh` and, when the server lives, one `ss`. Prints `listening=yes` when
/// the server lives and a socket of its login listens on the port (another
/// user's listener is never taken for it), `listening=no` while it lives
/// without one; when it is gone (or its pid is another process now) it
/// prints the launch's failure report (`exited STATUS` and the log's last
/// lines) and exits [`LAUNCH_FAILED`].
pub fn ready_check_script(p: &Proc, port: u16) -> Result<String> {
    check_proc(p)?;
    let dir_q = quote(&p.dir, "server directory")?;
    Ok(format!(
        r#"main() {{
{HELPERS}{LAUNCH_FAILED_FN}d={dir_q}
pid={pid} start={start} me={uid}
port={port} port_hex={port:04X}
ss=
if command -v ss >/dev/null 2>&1; then ss=ss; fi
{LISTENING_FN}if [ -e "$d/exit_status" ] || ! rs "$pid" || ! live || [ "$s_start" != "$start" ]; then
  failed
fi
if listening "$me"; then echo listening=yes; else echo listening=no; fi
}}
main </dev/null
"#,
        pid = p.pid,
        start = p.start_time,
        uid = p.uid,
    ))
}

fn limit_words(limits: &LimitPlan) -> Result<Vec<String>> {
    match limits {
        LimitPlan::None => Ok(Vec::new()),
        LimitPlan::Prlimit { address_space } => match address_space {
            None => Ok(Vec::new()),
            Some(0) => Err(invalid("address space limit", "must be more than 0 bytes")),
            Some(n) => Ok(vec!["prlimit".into(), format!("--as={n}"), "--".into()]),
        },
        LimitPlan::Systemd {
            unit,
            mem_max,
            cpu_quota_percent,
        } => {
            let unit_ok = !unit.is_empty()
                && unit.len() <= 255
                && !unit.starts_with('-')
                && unit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_.@-".contains(&b));
            if !unit_ok {
                return Err(invalid(
                    format!("systemd unit name {unit:?}"),
                    "must be 1 to 255 characters of A-Z, a-z, 0-9, ':', '_', '.', '@', '-' and not start with '-'",
                ));
            }
            let mut w: Vec<String> = ["systemd-run", "--user", "--scope", "--quiet"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            w.push(format!("--unit={unit}"));
            match mem_max {
                Some(0) => return Err(invalid("memory limit", "must be more than 0 bytes")),
                Some(n) => {
                    w.push("-p".into());
                    w.push(format!("MemoryMax={n}"));
                }
                None => {}
            }
            match cpu_quota_percent {
                Some(0) => return Err(invalid("CPU quota", "must be more than 0%")),
                Some(p) => {
                    w.push("-p".into());
                    w.push(format!("CPUQuota={p}%"));
                }
                None => {}
            }
            w.push("--".into());
            Ok(w)
        }
    }
}

/// The launch script.
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
        // `env` (which resets INT/QUIT, see below) would take a first word
        // with '=' for an assignment instead of the program.
        return Err(invalid(
            format!("command program {program:?}"),
            "must not contain '='",
        ));
    }

    let dir_q = quote(spec.dir, "server directory")?;
    let parent_q = quote(parent, "server directory")?;
    let log_q = quote(&format!("{}/server.log", spec.dir), "server directory")?;
    let marker_q = quote(&format!("ssh-spawner-run:{}", spec.run_id), "run id")?;
    let wrapper_q = quote(WRAPPER, "wrapper")?;

    let mut argv = String::new();
    for w in limit_words(spec.limits)? {
        argv.push(' ');
        argv.push_str(&quote(&w, "limit option")?);
    }
    for (i, w) in spec.command.iter().enumerate() {
        argv.push(' ');
        argv.push_str(&quote(w, &format!("command argument {i}"))?);
    }

    let mut exports = String::new();
    for (name, value) in spec.env {
        check_env_name(name)?;
        let v = quote(value, &format!("value of environment variable {name}"))?;
        exports.push_str(&format!("  export {name}={v}\n"));
    }

    let mut prologue = String::new();
    for (i, line) in spec.prologue.iter().enumerate() {
        if line.contains('\0') {
            return Err(invalid(
                format!("prologue line {}", i + 1),
                "contains a NUL byte",
            ));
        }
        prologue.push_str(line);
        prologue.push('\n');
    }

    let cd = match spec.workdir {
        Some(w) => quote(w, "working directory")?,
        None => "\"$HOME\"".to_string(),
    };
    let port = spec.port;
    let port_hex = format!("{port:04X}");
    let ready_cs = spec.ready_cs;
    let with_env = format!("  set -- {dir_q} env --default-signal=INT,QUIT --{argv}\n");
    let without_env = format!("  set -- {dir_q}{argv}\n");
    let args = match spec.default_signal {
        Some(true) => with_env,
        Some(false) => without_env,
        None => format!(
            "  if env --default-signal=INT,QUIT true >/dev/null 2>&1; then\n  {with_env}  else\n  {without_env}  fi\n"
        ),
    };
    let redirects = format!("3>&4 4>&- </dev/null >>{log_q} 2>&1");
    // The start, chosen before the exports and the prologue run (neither
    // can change a function: dash exports none). When the launch leads its
    // process group (sshd makes each session's login a session leader; a
    // group whose id is the script's pid exists only then, which `kill -s
    // 0` tells without reading a file), the wrapper is a subshell of it: no
    // program runs before the pid is known, and the subshell's pid (`$!`)
    // comes down the pipe next to the server's, so that the server's stat
    // line alone proves its parent is that wrapper. Otherwise (a login
    // shell that forks its command) `setsid` and a wrapper `sh` make the
    // group. (dash's `read` takes a byte per system call: every file read
    // on this path costs hundreds of them.)
    let start_fns = format!(
        "if kill -s 0 -- \"-$$\" 2>/dev/null; then\nssp_start() {{\n{args}  (\n  set +eu\n{WRAPPER}  ) {redirects} &\n  echo \"w$!\" >&4\n}}\nelse\nssp_start() {{\n{args}  exec setsid -f /bin/sh -c {wrapper_q} {marker_q} \"$@\" {redirects}\n}}\nfi\n"
    );
    // The run directory: made by the spawner already (checked with a
    // builtin), or by a `mkdir` started first thing, in the background.
    let (mkdir_bg, mkdir_wait) = if spec.dir_made {
        (String::new(), "[ -d \"$d\" ]")
    } else {
        (
            format!("mkdir -m 700 -- {dir_q} 2>/dev/null &\nmk=$!\n"),
            "wait \"$mk\"",
        )
    };
    let port_check = match (spec.check_port, spec.dir_made) {
        (false, _) => String::new(),
        (true, true) => format!("if listening; then echo port-taken; exit {PORT_TAKEN}; fi\n"),
        (true, false) => format!(
            "if listening; then wait \"$mk\" || :; echo port-taken; exit {PORT_TAKEN}; fi\n"
        ),
    };

    // The exports, prologue and start run in a command substitution (a
    // subshell) so that neither the env (think IFS or PATH) nor the prologue
    // can change the variables and IFS the rest of the script relies on;
    // after the prologue only literals are used for the same reason. Its
    // stdout is the pipe the wrapper writes the server's pid to (fd 4 until
    // the start, fd 3 in the wrapper); the prologue's output goes to stderr,
    // and the prologue does not get the pipe, so nothing it leaves running
    // can hold the launch open.
    //
    // A non-interactive sh starts `cmd &` with SIGINT and SIGQUIT ignored
    // and dash does not let the child undo that, so the command goes through
    // `env --default-signal` (coreutils >= 8.31) when the host has it (a
    // fact read with the host's other facts; tested here when unknown).
    //
    // Every process the script starts is on the critical path of a start
    // (each costs a fork and an exec on the host; docs/benchmarks.md, "The
    // launch, step by step"). Before the pid is known the host runs, when
    // the launch leads its group (sshd's sessions): `mkdir` (while the
    // script is read), the command substitution's fork, the wrapper
    // subshell's fork and its fork; the port check's `ss` only when the
    // spawner could not ask sshd.
    // A launch that does not lead its group adds `setsid`, its fork and the
    // wrapper's `sh`.
    // - The login's umask and uid are read from `/proc/self/status` with the
    //   `read` builtin, not with `$(umask)` (a fork each); the prologue's
    //   umask reaches the server by inheritance, and the wrapper takes 077
    //   for its own files after its fork. `server.log` is created (0600)
    //   before the prologue runs, so its umask never applies to it.
    // - The spawner makes the run directory itself when it can (`dir_made`:
    //   one SFTP request on a session its pooled connection keeps open, no
    //   program on the host; the script only tests that it is there).
    //   Otherwise it is made 0700 by a `mkdir` started first thing, in the
    //   background, so that it runs while `sh` reads the rest of the script,
    //   its own status and the boot id (and while the port check runs, when
    //   there is one). Only when that failed (the parent is missing: the
    //   first launch as this login; or a directory of an earlier attempt is
    //   there), or the spawner's directory is gone, the parent is made with
    //   umask 077 and `install -d -m 700` makes both 0700. Stale files are
    //   removed only if there are any.
    // - The port check (before the start when `check_port`, and each turn of
    //   the readiness wait) asks `ss -l` for listeners on the port: a netlink
    //   dump of the listening sockets only. Reading `/proc/net/tcp` and
    //   `tcp6` makes the kernel walk the whole established-connections hash
    //   (262144 buckets on the 2-core test machine: 6 to 13 ms per file, per
    //   read), and dash's `read` takes one byte per system call; `grep` of
    //   those files is the fallback on a host without a working `ss`
    //   (iproute2). The readiness wait counts only a listener with the
    //   login's uid, so another user's socket on the port (on an address the
    //   spawner's probe did not reach) is never taken for the server.
    // - The pid comes down a pipe instead of being polled for, the wrapper
    //   writes the pid file with a builtin (no `mv`), and the server's stat
    //   line (and its parent's, when the wrapper does not lead the group)
    //   proves that the wrapper is its parent and the group is theirs.
    //
    // Then, for up to `ready_cs`, the script waits for the port to listen
    // (the hub's first check then succeeds) or for the server to exit (the
    // start fails with its log), checking every 10 ms at first and every
    // 50 ms after the first second; `/proc/uptime` is the clock (read with
    // a builtin).
    Ok(format!(
        r#"main() {{
set -eu
{mkdir_bg}{HELPERS}{LAUNCH_FAILED_FN}d={dir_q}
um= me=
{{ while read -r s_k s_v s_r; do
  case $s_k in Umask:) um=$s_v ;; Uid:) me=$s_v; break ;; esac
done; }} 2>/dev/null </proc/self/status || :
case $um in ''|*[!0-7]*) um=$(umask) ;; esac
umask 077
ss=
if command -v ss >/dev/null 2>&1; then ss=ss; fi
port={port} port_hex={port_hex}
{LISTENING_FN}up() {{
  IFS=' .' read -r u_s u_c _ </proc/uptime
  now=$u_s$u_c
}}
{start_fns}{port_check}if ! {mkdir_wait}; then
  [ -d {parent_q} ] || mkdir -p -- {parent_q}
  install -d -m 700 -- {parent_q} "$d"
fi
for f in pid exit_status exit_status.tmp; do
  if [ -e "$d/$f" ]; then rm -f -- "$d/$f"; fi
done
: >>{log_q}
pid=$(
  exec 4>&1 >&2
  umask "$um"
{exports}  set +eu
  {{
{prologue}  :
  }} 4>&-
  set -eu
  cd -- {cd}
  ssp_start
)
out=$pid pid= wp=
for x in $out; do
  case $x in w*) wp=${{x#w}} ;; *) pid=$x ;; esac
done
case $pid in
  ''|*[!0-9]*) failed ;;
esac
ready=no
if [ {ready_cs} -gt 0 ]; then
  up
  end=$((now + {ready_cs}))
  n=0
  while :; do
    if [ -e "$d/exit_status" ] || ! rs "$pid" || ! live; then failed; fi
    if listening "$me"; then ready=yes; break; fi
    up
    [ "$now" -lt "$end" ] || break
    n=$((n + 1))
    if [ "$n" -le 20 ]; then sleep 0.01; elif [ "$n" -le 50 ]; then sleep 0.02; else sleep 0.05; fi
  done
fi
if [ ! -e "$d/exit_status" ] && rs "$pid" && live; then
  start=$s_start w=$s_ppid g=$s_pgrp
  if [ -z "$me" ]; then ru "$pid" || failed; me=$s_uid; fi
  if [ "$w" -gt 1 ] && {{ [ "$g" = "$w" ] || {{ [ "$g" = "$$" ] && [ "$w" = "$wp" ]; }}; }}; then
    printf 'pid=%s\npgid=%s\nstart_time=%s\nuid=%s\nboot_id=%s\nlistening=%s\n' "$pid" "$g" "$start" "$me" "$boot" "$ready"
    exit 0
  fi
  echo "ssh-spawner launch: server pid $pid is no longer a child of its wrapper" >&2
  exit 4
fi
failed
}}
main </dev/null
"#
    ))
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
    let mut cmd = format!("/bin/sh -s ssh-spawner-run:{}", spec.run_id);
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

fn excerpt(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &text[..end])
}

fn is_boot_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
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

/// The poll script for many servers of ONE remote user on one host; one
/// exec answers all.
///
/// Prints one line per server: `RUN_ID STATE [STATUS]`, STATE one of
/// `running exited zombie reused rebooted gone`, STATUS the number in
/// `DIR/exit_status` when that file exists (never for `running`). It only
/// reads files with shell builtins, so it spawns no process at all.
pub fn poll_script(procs: &[Proc]) -> Result<String> {
    let mut calls = String::new();
    let mut seen = std::collections::HashSet::new();
    for p in procs {
        check_proc(p)?;
        if !seen.insert(p.run_id.as_str()) {
            return Err(invalid(
                format!("run id {:?}", p.run_id),
                "appears twice in one poll",
            ));
        }
        calls.push_str(&format!(
            "p {} {} {} {} {} {}\n",
            p.run_id,
            p.pid,
            p.start_time,
            p.uid,
            quote(&p.boot_id, "boot id")?,
            quote(&p.dir, "server directory")?,
        ));
    }
    // The checks run cheapest and most decisive first: a reboot makes every
    // pid meaningless; a missing /proc entry needs nothing more; a zombie has
    // no owner worth checking.
    Ok(format!(
        r#"main() {{
set -u
umask 077
{HELPERS}xs() {{
  xf= x=
  [ -e "$1/exit_status" ] || return 0
  xf=1
  IFS= read -r x 2>/dev/null <"$1/exit_status" || :
  case $x in ''|*[!0-9]*) x= ;; esac
}}
say() {{
  printf '%s %s%s\n' "$1" "$2" "${{x:+ $x}}"
}}
dead() {{
  xs "$2"
  if [ -n "$xf" ]; then say "$1" exited; else say "$1" gone; fi
}}
# The login's own uid: a state whose uid is another user's names a process
# that is not this login's server, whatever its pid and start time say.
me=
if ru "$$"; then me=$s_uid; fi
p() {{
  if [ "$5" != "$boot" ]; then xs "$6"; say "$1" rebooted; return 0; fi
  if ! rs "$2"; then dead "$1" "$6"; return 0; fi
  if ! live; then xs "$6"; say "$1" zombie; return 0; fi
  if [ "$s_start" != "$3" ]; then xs "$6"; say "$1" reused; return 0; fi
  if ! ru "$2"; then dead "$1" "$6"; return 0; fi
  if [ "$s_uid" != "$4" ] || [ "$4" != "$me" ]; then xs "$6"; say "$1" reused; return 0; fi
  x=
  say "$1" running
}}
{calls}}}
main </dev/null
"#
    ))
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
    let wanted: std::collections::HashSet<&str> = asked.iter().map(|p| p.run_id.as_str()).collect();
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

/// The stop script for one server.
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
    let boot_q = quote(&proc_.boot_id, "boot id")?;
    let dir_q = quote(&proc_.dir, "server directory")?;
    let run_q = quote(&proc_.run_id, "run id")?;
    let unit_q = quote(
        &format!("{}.scope", super::limits::scope_unit(&proc_.run_id)),
        "run id",
    )?;
    let keep = u8::from(keep_log);
    let Proc {
        pid,
        pgid,
        start_time,
        uid,
        ..
    } = proc_;
    // TERM goes only to what was there at first: the wrapper spawns `mv` to
    // record the exit status once the server is gone, and TERMing that would
    // lose the status. Latecomers are still waited for and get KILL if they
    // outlast the grace period.
    Ok(format!(
        r#"main() {{
set -u
umask 077
{HELPERS}pid={pid} pgid={pgid} start={start_time} uid={uid} want={boot_q}
d={dir_q} grace={grace_secs} keep={keep} run={run_q} unit={unit_q}
cleanup() {{
  [ -d "$d" ] || return 0
  if [ "$keep" = 1 ]; then
    for f in "$d"/* "$d"/.[!.]* "$d"/..?*; do
      case ${{f##*/}} in server.log|exit_status) continue ;; esac
      if [ -e "$f" ] || [ -L "$f" ]; then rm -rf -- "$f" || :; fi
    done
  else
    rm -rf -- "$d" || :
  fi
}}
snap() {{
  sn=
  if [ -n "$use_ps" ] && sn=$(ps -e -o pid= -o ppid= -o pgid= 2>/dev/null); then
    case $sn in *[!0-9\ $nl]*|'') ;; *) return 0 ;; esac
  fi
  if [ -n "$use_ps" ]; then
    use_ps=
    echo "ssh-spawner stop: ps gave no usable process table; reading /proc" >&2
  fi
  sn=
  for f in /proc/[0-9]*; do
    q=${{f#/proc/}}
    rs "$q" && live || continue
    sn="$sn$q $s_ppid $s_pgrp $s_start$nl"
  done
}}
got() {{
  g_start=$2
  if [ "$g_start" = - ]; then rs "$1" && live || return 1; g_start=$s_start; fi
}}
intree() {{
  case $tree in *" $1:"*) ;; *) return 1 ;; esac
  got "$1" "$2" || return 1
  case $tree in *" $1:$g_start "*) ;; *) return 1 ;; esac
}}
scan() {{
  snap
  grp=0
  more=1
  while [ "$more" = 1 ]; do
    more=0
    mine=' '
    set -f
    IFS=$nl
    for ln in $sn; do
      IFS=' '
      set -- $ln -
      if intree "$1" "$4"; then
        mine="$mine$1 "
        [ "$3" != "$pgid" ] || grp=1
      fi
    done
    IFS=$nl
    for ln in $sn; do
      IFS=' '
      set -- $ln -
      case $mine in *" $1 "*) continue ;; esac
      case $mine in *" $2 "*) ;; *) [ "$grp" = 1 ] && [ "$3" = "$pgid" ] || continue ;; esac
      if got "$1" "$4"; then tree="$tree$1:$g_start "; more=1; fi
    done
    IFS=$dfl
    set +f
  done
  alive=
  n=0
  set -f
  IFS=$nl
  for ln in $sn; do
    IFS=' '
    set -- $ln -
    if intree "$1" "$4"; then alive="$alive $1:$g_start"; n=$((n + 1)); fi
  done
  IFS=$dfl
  set +f
}}
hit() {{
  if [ -n "$sc" ]; then systemctl --user kill --signal="$1" -- "$unit" >/dev/null 2>&1 || :; fi
  if [ "$grp" = 1 ]; then kill -s "$1" -- "-$pgid" 2>/dev/null || :; fi
  for e in $alive; do
    q=${{e%%:*}}
    if rs "$q" && [ "$s_start" = "${{e#*:}}" ]; then kill -s "$1" "$q" 2>/dev/null || :; fi
  done
}}
# The process table comes from `ps` (one program, reading /proc in C) when
# the host has a POSIX one that prints only numbers for these columns;
# otherwise from /proc with the `read` builtin, which takes a system call
# per byte: about 300 per process, every turn of the wait, which on a host
# with hundreds of processes was most of a stop. With `ps` the start time
# (the proof a pid was not reused) is read only for the run's own
# processes and their children.
use_ps=
if command -v ps >/dev/null 2>&1; then use_ps=1; fi
tree=' '
# Only the login's own processes are ever signalled: a state (forged, or
# corrupted) whose uid is another user's matches nothing.
me=
if ru "$$"; then me=$s_uid; fi
[ "$uid" = "$me" ] || want=not-this-login
if [ "$boot" = "$want" ] && rs "$pid" && live && [ "$s_start" = "$start" ] && ru "$pid" && [ "$s_uid" = "$uid" ]; then
  tree=" $pid:$start "
  c_ppid=$s_ppid c_pgrp=$s_pgrp
  if [ "$c_ppid" = "$pgid" ] || [ "$c_pgrp" = "$pgid" ]; then
    if rs "$pgid" && live && [ "$s_pgrp" = "$pgid" ] && ru "$pgid" && [ "$s_uid" = "$uid" ]; then
      tree="$tree$pgid:$s_start "
    fi
  fi
  # The wrapper, when it is a member of the group rather than its leader
  # (the launch's login led the group and is gone): the server's parent,
  # in the server's group, ours.
  if [ "$c_pgrp" = "$pgid" ] && [ "$c_ppid" -gt 1 ] && [ "$c_ppid" != "$pgid" ]; then
    if rs "$c_ppid" && live && [ "$s_pgrp" = "$pgid" ] && ru "$c_ppid" && [ "$s_uid" = "$uid" ]; then
      tree="$tree$c_ppid:$s_start "
    fi
  fi
fi
# Processes of ours that carry this run's marker in their environment:
# kernels and helpers of a server that has already died (their parent is
# gone, so the tree above cannot reach them) are found this way.
# One `grep -z` reads every environment we may read (GNU and busybox grep
# take -z); without it, a `tr | grep` per process of ours.
if [ "$boot" = "$want" ]; then
  if printf 'x\0' | grep -qzxF x 2>/dev/null; then
    envs=$(grep -lzxF "SSH_SPAWNER_RUN=$run" /proc/[0-9]*/environ 2>/dev/null) || :
    set -f
    for f in $envs; do
      q=${{f#/proc/}}
      q=${{q%/environ}}
      case $q in ''|*[!0-9]*) continue ;; esac
      [ "$q" != "$$" ] || continue
      ru "$q" && [ "$s_uid" = "$uid" ] || continue
      rs "$q" && live || continue
      case $tree in *" $q:$s_start "*) continue ;; esac
      tree="$tree$q:$s_start "
    done
    set +f
  else
    for f in /proc/[0-9]*; do
      q=${{f#/proc/}}
      [ "$q" != "$$" ] || continue
      # Only a process whose /proc entry is ours has an environment we may
      # read: one stat, instead of reading its status, for everyone else's.
      [ -O "$f" ] || continue
      ru "$q" && [ "$s_uid" = "$uid" ] || continue
      rs "$q" && live || continue
      case $tree in *" $q:$s_start "*) continue ;; esac
      if tr '\0' '\n' < "$f/environ" 2>/dev/null | grep -qxF "SSH_SPAWNER_RUN=$run"; then
        rs "$q" && tree="$tree$q:$s_start "
      fi
    done
  fi
fi
# A server started in a systemd scope (enforcement = systemd): everything in
# the scope is the run's, including processes that left the process group
# and dropped the marker; the scope is signalled with the rest and waited
# for until its cgroup is empty (not until systemd calls it inactive: a
# user manager on cgroup v1 may not hear that a scope emptied).
sc=
scg=
if [ "$boot" = "$want" ] && command -v systemctl >/dev/null 2>&1 &&
  systemctl --user is-active --quiet -- "$unit" 2>/dev/null; then
  sc=1
  cg=$(systemctl --user show -p ControlGroup --value -- "$unit" 2>/dev/null) || cg=
  case $cg in
    /*)
      for f in "/sys/fs/cgroup/systemd$cg/cgroup.procs" "/sys/fs/cgroup$cg/cgroup.procs"; do
        if [ -r "$f" ]; then scg=$f; break; fi
      done ;;
  esac
fi
busy() {{
  if [ -n "$scg" ]; then
    {{ IFS= read -r _x <"$scg"; }} 2>/dev/null
  else
    systemctl --user is-active --quiet -- "$unit" 2>/dev/null
  fi
}}
n=0
if [ "$tree" != ' ' ]; then scan; fi
if [ "$n" = 0 ] && [ -z "$sc" ]; then
  echo gone
  cleanup
  exit 0
fi
hit TERM
i=0
lim=$((grace * 10))
while [ "$i" -lt "$lim" ]; do
  sleep 0.1
  scan
  [ "$n" != 0 ] || break
  i=$((i + 1))
done
esc=
if [ "$n" != 0 ]; then
  esc=1
  i=0
  while [ "$n" != 0 ] && [ "$i" -lt 50 ]; do
    hit KILL
    sleep 0.1
    scan
    i=$((i + 1))
  done
fi
if [ -n "$sc" ]; then
  i=0
  while [ "$i" -lt "$((grace * 10))" ] && busy; do
    sleep 0.1
    i=$((i + 1))
  done
  i=0
  while [ "$i" -lt 50 ] && busy; do
    esc=1
    systemctl --user kill --signal=KILL -- "$unit" >/dev/null 2>&1 || :
    sleep 0.1
    i=$((i + 1))
  done
  if busy; then
    echo "ssh-spawner stop: processes left in systemd scope $unit after SIGKILL" >&2
    exit 1
  fi
  # Empty: have systemd drop the unit and its cgroups now.
  systemctl --user stop -- "$unit" >/dev/null 2>&1 || :
fi
if [ "$n" != 0 ]; then
  echo "ssh-spawner stop: still running after SIGKILL (pid:start):$alive" >&2
  exit 1
fi
echo "killed${{esc:+ escalated}}"
cleanup
exit 0
}}
main </dev/null
"#
    ))
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
mod tests {
    //! These run the generated scripts with the local `/bin/sh` (dash on
    //! Debian, like the hosts) and inspect `/proc`. They run as root here, so
    //! the uid checks compare against 0; nothing in them depends on that.

    use super::*;
    use proptest::prelude::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn unique(prefix: &str) -> String {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("{prefix}{}-{n}-{nanos:x}", std::process::id())
    }

    /// A scratch directory under /tmp, removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new() -> Tmp {
            let p = PathBuf::from(format!("/tmp/{}", unique("ssh-spawner-script-")));
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
        fn join(&self, rest: &str) -> String {
            self.0.join(rest).to_str().unwrap().to_string()
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Debug)]
    struct Out {
        status: i32,
        stdout_bytes: Vec<u8>,
        stdout: String,
        stderr: String,
        elapsed: Duration,
    }

    /// Runs `script` as `/bin/sh -s` with the script on stdin, like the
    /// remote side does; `timeout` keeps a broken script from hanging the suite.
    fn sh(script: &str) -> Out {
        sh_argv(&["/bin/sh", "-s"], script)
    }

    /// Runs `argv` (a `/bin/sh -s` of some form) with `script` on stdin,
    /// under `timeout 60`.
    fn sh_argv(argv: &[&str], script: &str) -> Out {
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
    struct Stat {
        state: char,
        ppid: u32,
        pgrp: u32,
        session: u32,
        start: u64,
    }

    fn stat(pid: u32) -> Option<Stat> {
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
    fn alive(pid: u32, start: Option<u64>) -> bool {
        match stat(pid) {
            Some(s) => s.state != 'Z' && s.state != 'X' && start.is_none_or(|t| t == s.start),
            None => false,
        }
    }

    fn all_procs() -> Vec<(u32, Stat)> {
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

    fn descendants(roots: &[u32]) -> Vec<(u32, u64)> {
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

    fn real_uid(pid: u32) -> u32 {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn my_uid() -> u32 {
        real_uid(std::process::id())
    }

    fn boot_id() -> String {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap()
            .trim()
            .to_string()
    }

    fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        f()
    }

    fn kill_pids(pids: &[u32]) {
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
    struct Reaper {
        marker: Vec<u8>,
    }
    impl Reaper {
        fn new(run_id: &str) -> Reaper {
            let mut marker = format!("ssh-spawner-run:{run_id}").into_bytes();
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
    struct ChildGuard(Child);
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

    fn spawn_guarded(args: &[&str]) -> ChildGuard {
        let child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        ChildGuard(child)
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run_id() -> String {
        unique("t-")
    }

    fn proc_of(run_id: &str, dir: &str, l: &Launched) -> Proc {
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

    fn poll_one(p: &Proc) -> ProcStatus {
        let out = sh(&poll_script(std::slice::from_ref(p)).unwrap());
        assert_eq!(out.status, 0, "{out:?}");
        parse_poll(&out.stdout, std::slice::from_ref(p)).unwrap()[0]
            .1
            .clone()
    }

    fn stop(p: &Proc, grace: u32, keep_log: bool) -> (Stopped, Out) {
        let out = sh(&stop_script(p, grace, keep_log).unwrap());
        assert_eq!(out.status, 0, "{out:?}");
        (parse_stop(&out.stdout).unwrap(), out)
    }

    fn mode(path: &str) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn dir_names(dir: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Runs the launch script as sshd does: [`launch_command`], by a
    /// session leader (sshd's session child calls setsid).
    fn launch(spec: &LaunchSpec) -> Out {
        let cmd = launch_command(spec).unwrap();
        let mut argv = vec!["setsid"];
        argv.extend(cmd.split(' '));
        sh_argv(&argv, &launch_script(spec).unwrap())
    }

    /// Runs the launch script from a process that does not lead its group
    /// (a login shell that forks its command): the script makes the group
    /// with `setsid`.
    fn launch_in_callers_group(spec: &LaunchSpec) -> Out {
        sh(&launch_script(spec).unwrap())
    }

    /// [`launch`] on a host whose `ss` fails (after printing a listener, so
    /// its output is seen not to be trusted): the script falls back to
    /// reading `/proc/net/tcp*`.
    fn launch_with_broken_ss(spec: &LaunchSpec, tmp: &Tmp) -> Out {
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

    const NO_LIMITS: LimitPlan = LimitPlan::None;

    // ---------------------------------------------------------------- quote

    fn roundtrip(values: &[String]) -> Vec<Vec<u8>> {
        let mut script = String::from("set -eu\n");
        for (i, v) in values.iter().enumerate() {
            script.push_str(&format!(
                "export X{i}={}\n",
                quote(v, "test value").unwrap()
            ));
            script.push_str(&format!("printf '%s\\000' \"$X{i}\"\n"));
        }
        let out = sh(&script);
        assert_eq!(out.status, 0, "{out:?}");
        let mut parts: Vec<Vec<u8>> = out
            .stdout_bytes
            .split(|b| *b == 0)
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(parts.pop(), Some(Vec::new()));
        parts
    }

    #[test]
    fn quote_round_trips_every_char_through_sh() {
        let mut values: Vec<String> = (1u32..0x800)
            .chain([0xFFFD, 0x1F600, 0x10FFFF, 0x2028, 0xFEFF])
            .filter_map(char::from_u32)
            .map(|c| c.to_string())
            .collect();
        values.push((1u32..0x800).filter_map(char::from_u32).collect());
        values.extend(strings(&[
            "",
            "'",
            "''",
            "'\\''",
            "\"",
            "$(touch /tmp/ssh-spawner-pwned)",
            "`touch /tmp/ssh-spawner-pwned`",
            "${HOME}",
            "a\nb\n",
            "\n",
            "\\",
            "\\\\n",
            "-n",
            "-e \\t",
            "--",
            "é ✓ 日本",
            "*",
            "~",
            "x' ; touch /tmp/ssh-spawner-pwned ; '",
            "\r\n\t\x0b\x0c\x1b[31m",
        ]));
        let got = roundtrip(&values);
        assert_eq!(got.len(), values.len());
        for (v, g) in values.iter().zip(&got) {
            assert_eq!(v.as_bytes(), g.as_slice(), "value {v:?}");
        }
        assert!(!Path::new("/tmp/ssh-spawner-pwned").exists());
    }

    fn nasty_string() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            3 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            1 => prop::sample::select(vec!['\'', '"', '$', '(', ')', '`', '\\', '\n', '-', ' ', '*', '{', '}', ';', '&', '|', '!', 'é', '#', '~']),
        ];
        prop::collection::vec(c, 0..48).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn quote_round_trips_arbitrary_strings(values in prop::collection::vec(nasty_string(), 1..16)) {
            let got = roundtrip(&values);
            prop_assert_eq!(got.len(), values.len());
            for (v, g) in values.iter().zip(&got) {
                prop_assert_eq!(v.as_bytes(), g.as_slice());
            }
        }

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
    fn quote_refuses_nul_and_names_the_value() {
        match quote("a\0b", "value of FOO") {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "value of FOO"),
            other => panic!("{other:?}"),
        }
        assert_eq!(quote("", "x").unwrap(), "''");
        assert_eq!(quote("it's", "x").unwrap(), "'it'\\''s'");
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "_x", "JUPYTERHUB_API_TOKEN", "a1_B2", "PATH"] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "1A", "A-B", "A B", "A=B", "é", "A\n", "$A", "A.B", "-x", "A\0",
        ] {
            match check_env_name(bad) {
                Err(Error::Invalid { what, .. }) => {
                    assert_eq!(what, format!("environment variable name {bad:?}"))
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    // ----------------------------------------------------------- validation

    fn spec<'a>(
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
        }
    }

    fn proc_fixture(run_id: &str, pid: u32) -> Proc {
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
        assert!(
            launch_script(&spec("r", "/tmp/x", &no_env, &strings(&["/bin/x", "a\0"]))).is_err()
        );
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
            assert!(s.starts_with("main() {\nset -"), "{s}");
            assert!(s.contains("umask 077\n"));
            assert!(s.ends_with("}\nmain </dev/null\n"));
        }
        // The limit prefixes, word by word.
        assert!(scripts[6].contains(
            " 'systemd-run' '--user' '--scope' '--quiet' '--unit=jupyter-u-1.scope' '-p' 'MemoryMax=1073741824' '-p' 'CPUQuota=150%' '--' 'jupyterhub-singleuser' '--ip=127.0.0.1' 'it'\\''s'\n"
        ));
        assert!(scripts[8].contains(
            " 'systemd-run' '--user' '--scope' '--quiet' '--unit=j' '--' 'jupyterhub-singleuser'"
        ));
        assert!(scripts[4].contains(" 'prlimit' '--as=1073741824' '--' 'jupyterhub-singleuser'"));
        assert!(!scripts[2].contains("prlimit"));
        assert!(scripts[3].contains("cd -- '/srv/work dir'\n"));
        assert!(scripts[2].contains("cd -- \"$HOME\"\n  ssp_start\n"));
        // Both ways to start the wrapper, chosen by whether the launch leads
        // its group, and the port checked in the script (by default).
        assert!(scripts[2].contains("\n  ) 3>&4 4>&- </dev/null >>"));
        assert!(scripts[2].contains("exec setsid -f /bin/sh -c "));
        assert!(scripts[2].contains("if listening; then"));
        assert!(scripts[2].contains("  export B='it'\\''s \"q\"\n$x'\n"));
        // The run directory: a `mkdir` started first thing, or only a test
        // when the spawner made it; no port check when sshd was asked.
        let early_mkdir = "set -eu\nmkdir -m 700 -- '/tmp/a b/c' 2>/dev/null &\nmk=$!\n";
        assert!(scripts[2].contains(early_mkdir));
        assert!(scripts[made_from].contains(early_mkdir));
        assert!(scripts[made_from].contains("if ! wait \"$mk\"; then\n"));
        assert!(!scripts[made_from].contains("if listening; then"));
        for s in &scripts[made_from + 1..] {
            assert!(!s.contains("mkdir -m 700"), "{s}");
            assert!(!s.contains("$mk"), "{s}");
            assert!(s.contains("if ! [ -d \"$d\" ]; then\n"), "{s}");
        }
        assert!(!scripts[made_from + 1].contains("if listening; then"));
        assert!(scripts[made_from + 2].contains("if listening; then echo port-taken;"));
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
                fs::read(format!("/proc/{}/cmdline", l.pid))
                    .is_ok_and(|c| c == b"/bin/sleep\x0030\x00")
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

    // ----------------------------------------------------------------- stop

    /// What a successful launch printed, once the server has exec'd (the
    /// launch returns when the pid is known, which can be a moment before)
    /// and the wrapper has written the pid file.
    fn launched(out: &Out, dir: &str) -> Launched {
        let l = parse_launch(&out.stdout).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || {
                fs::read(format!("/proc/{}/cmdline", l.pid))
                    .is_ok_and(|c| !c.windows(16).any(|w| w == b"ssh-spawner-run:"))
                    // past the exec chain's own steps (env, prlimit) too
                    && fs::read(format!("/proc/{}/comm", l.pid))
                        .is_ok_and(|c| c != b"env\n" && c != b"prlimit\n")
                    && Path::new(&format!("{dir}/pid")).exists()
            }),
            "the server never exec'd: {out:?}"
        );
        l
    }

    fn launch_ok(tmp: &Tmp, name: &str, cmd: &[&str]) -> (String, String, Launched, Reaper) {
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
                kernel = descendants(&[l.pid]).into_iter().find(|(p, _)| {
                    stat(*p).is_some_and(|s| s.session != l.pgid && s.session == *p)
                });
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
            format!(
                "#!/bin/sh\nfor a; do case $a in -*z*) exit 2 ;; esac; done\nexec {real} \"$@\"\n"
            ),
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

    // -------------------------------------------------------------- parsers

    #[test]
    fn parsers_accept_good_output_and_refuse_garbage() {
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
}
