//! Running one remote command on a pooled connection.
//!
//! Bytes go in on stdin (that is how scripts and secrets travel: never in the
//! command line, which every user of a host can read), stdout and stderr come
//! back with the exit status. Every run is bounded in time and in captured
//! output; a command that overruns either is sent SIGKILL and its channel
//! closed. If the caller's future is dropped mid-run, the channel is closed
//! too, so neither the slot in the pool nor the server-side session leaks.

use std::time::Duration;

use russh::client::Msg;
use russh::{ChannelMsg, ChannelWriteHalf, Sig};

use super::pool::Pool;
use super::Target;
use crate::error::{Cause, Error, Phase, Result};

/// How long the output of a command that reported its exit status is read
/// on before its channel is closed (a background job it started may hold the
/// channel open).
const AFTER_EXIT: Duration = Duration::from_secs(2);

/// One command to run.
#[derive(Clone)]
pub struct Command {
    /// The command line given to the remote user's shell. Keep secrets out of it.
    pub command: String,
    /// Sent on stdin, then EOF.
    pub stdin: Vec<u8>,
    /// Bound on the whole run, from opening the channel to the exit status.
    pub timeout: Duration,
    /// Stdout beyond this many bytes stops the command with
    /// [`Error::OutputTooLarge`]; stderr keeps only its last this-many bytes.
    pub max_output: usize,
}

/// Shows the length of stdin only: it carries secrets (the API token of a
/// launch).
impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("command", &self.command)
            .field("stdin_len", &self.stdin.len())
            .field("timeout", &self.timeout)
            .field("max_output", &self.max_output)
            .finish()
    }
}

impl Command {
    /// A command with empty stdin, a 30 s bound and a 1 MiB output cap.
    pub fn new(command: impl Into<String>) -> Self {
        Command {
            command: command.into(),
            stdin: Vec::new(),
            timeout: Duration::from_secs(30),
            max_output: 1 << 20,
        }
    }

    /// Set stdin.
    pub fn stdin(mut self, stdin: impl Into<Vec<u8>>) -> Self {
        self.stdin = stdin.into();
        self
    }

    /// Set the time bound.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Set the output cap.
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }
}

/// What a finished command left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit status, when the command exited.
    pub status: Option<u32>,
    /// Signal name, when the command was killed by one.
    pub signal: Option<String>,
    /// Everything it printed on stdout.
    pub stdout: Vec<u8>,
    /// The last `max_output` bytes of stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// True for exit status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// `status 3`, `signal KILL` or `no exit status`.
    pub fn describe_status(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("status {s}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status".to_string(),
        }
    }

    /// The last `lines` lines of stderr, lossily decoded.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail_lines(&self.stderr, lines)
    }

    /// Turn a non-zero exit into [`Error::CommandFailed`].
    pub fn check(self, target: &Target) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            Err(Error::CommandFailed {
                host: target.host_label(),
                user: target.user.clone(),
                status: self.describe_status(),
                stderr_tail: self.stderr_tail(20),
            })
        }
    }
}

/// The last `lines` lines of `bytes`, lossily decoded.
pub fn tail_lines(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Closes the channel unless the run finished: a dropped future or an early
/// return never leaves a session open on the server.
struct CloseGuard {
    write: Option<ChannelWriteHalf<Msg>>,
    kill: bool,
}

impl CloseGuard {
    fn finish(&mut self) {
        self.write = None;
    }
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let Some(write) = self.write.take() else {
            return;
        };
        let kill = self.kill;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if kill {
                    let _ = write.signal(Sig::KILL).await;
                }
                let _ = write.close().await;
            });
        }
    }
}

impl Pool {
    /// Run `cmd` on `target` and collect its output. A non-zero exit is not an
    /// error here (see [`Output::check`]); a timeout, an output overrun or a
    /// lost connection is.
    pub async fn exec(&self, target: &Target, cmd: &Command) -> Result<Output> {
        let timed_out = || Error::Timeout {
            host: target.host_label(),
            user: target.user.clone(),
            phase: Phase::Command,
            after: cmd.timeout,
        };
        tokio::time::timeout(cmd.timeout, self.exec_unbounded(target, cmd))
            .await
            .map_err(|_| timed_out())?
    }

    async fn exec_unbounded(&self, target: &Target, cmd: &Command) -> Result<Output> {
        let lease = self.open_session(target).await?;
        let ssh_err = |e: russh::Error| Error::Ssh {
            host: target.host_label(),
            user: target.user.clone(),
            reason: e.to_string(),
            source: Cause::of(e),
        };
        let (mut read, write) = lease.channel.split();
        let mut guard = CloseGuard {
            write: Some(write),
            kill: true,
        };
        let Some(write) = guard.write.as_ref() else {
            return Err(ssh_err(russh::Error::SendError));
        };
        write
            .exec(true, cmd.command.as_bytes())
            .await
            .map_err(ssh_err)?;

        // Write stdin while reading: a command that prints before it reads
        // must not deadlock against a full window.
        let send_stdin = async {
            if !cmd.stdin.is_empty() {
                write.data(&cmd.stdin[..]).await?;
            }
            write.eof().await
        };
        let receive = async {
            let mut out = Output::default();
            let mut drained = true;
            loop {
                // Once the command reported its exit, what it printed is
                // already on its way: the rest is read for a bounded while,
                // as a process it left in the background may hold its output
                // (and so the channel) open for as long as it runs.
                let msg = if out.status.is_some() || out.signal.is_some() {
                    match tokio::time::timeout(AFTER_EXIT, read.wait()).await {
                        Ok(msg) => msg,
                        Err(_) => {
                            drained = false;
                            break;
                        }
                    }
                } else {
                    read.wait().await
                };
                let Some(msg) = msg else { break };
                match msg {
                    ChannelMsg::Data { data } => {
                        if out.stdout.len() + data.len() > cmd.max_output {
                            return Err(Error::OutputTooLarge {
                                host: target.host_label(),
                                user: target.user.clone(),
                                limit: cmd.max_output,
                            });
                        }
                        out.stdout.extend_from_slice(&data);
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        out.stderr.extend_from_slice(&data);
                        let excess = out.stderr.len().saturating_sub(cmd.max_output);
                        if excess > 0 {
                            out.stderr.drain(..excess);
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        out.signal = Some(signal_name_str(&signal_name))
                    }
                    ChannelMsg::Failure => {
                        return Err(Error::Ssh {
                            host: target.host_label(),
                            user: target.user.clone(),
                            reason: "the server refused to run the command".into(),
                            source: None,
                        })
                    }
                    _ => {}
                }
            }
            Ok((out, drained))
        };
        let (sent, received) = tokio::join!(send_stdin, receive);
        let (out, drained) = received?;
        // A command may exit without reading all of stdin; that is its business.
        if let Err(e) = sent {
            tracing::debug!(host = %target.host_label(), "stdin not fully sent: {e}");
        }
        if out.status.is_none() && out.signal.is_none() {
            // The channel closed without an exit report: the connection died.
            return Err(Error::Ssh {
                host: target.host_label(),
                user: target.user.clone(),
                reason: "connection lost before the command reported its exit status".into(),
                source: None,
            });
        }
        if drained {
            guard.finish();
        } else {
            // The command exited: close the channel its leftovers hold open,
            // without signalling them.
            tracing::debug!(host = %target.host_label(), "output still open after the exit status; closing the channel");
            guard.kill = false;
            drop(guard);
        }
        drop(lease.slot);
        Ok(out)
    }
}

fn signal_name_str(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_length_of_stdin_not_its_bytes() {
        let cmd = Command::new("/bin/sh -s").stdin("export JUPYTERHUB_API_TOKEN=s3cr3t\n");
        let shown = format!("{cmd:?}");
        // Neither as text nor as the bytes a derived Debug prints.
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("115, 51, 99, 114, 51, 116"), "{shown}");
        assert!(shown.contains("stdin_len: 35"), "{shown}");
        assert!(shown.contains("/bin/sh -s"), "{shown}");
    }
}
