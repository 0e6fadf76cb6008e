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

/// One command to run.
#[derive(Debug, Clone)]
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
            while let Some(msg) = read.wait().await {
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
            Ok(out)
        };
        let (sent, received) = tokio::join!(send_stdin, receive);
        let out = received?;
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
        guard.finish();
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
