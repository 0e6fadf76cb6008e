//! Waiting, from the hub, for a launched server to listen or exit.
//!
//! The launch script returns as soon as the server's pid is known. The hub
//! then watches, through the pooled connection, in a way that starts no
//! program on the host while the server boots, however long it takes:
//!
//! - each turn connects to the server's port the way the hub will reach it:
//!   straight from the hub (the host's kernel answers; nothing else runs),
//!   or, with `tunnel`, by asking sshd for a direct-tcpip channel (sshd's
//!   own `connect`, which sshd logs when refused);
//! - every [`STAT_EVERY`] (every [`STAT_EVERY_LATER`] after 5 s) the
//!   connection's kept SFTP session is asked whether the wrapper has
//!   written `exit_status` (one `stat`);
//! - turns start 10 ms apart and back off to
//!   [`crate::plan::ports::ready_probe_delay`]'s 200 ms, and 1 s after 5 s;
//! - once the port accepts, or the server has exited, one command on the
//!   host ([`poll::ready_check_script`]: `sh` and `ss`) tells whether the
//!   listener is the server's (its login's uid; another user's listener is
//!   never taken for it) or reports the exit status and the log's tail;
//! - without a kept SFTP session (its connection too busy to give it a
//!   slot, as in a rush), the server is polled every [`CHECK_EVERY`]
//!   instead: the poll's one exec of builtins answers every server of the
//!   login on the host at once, waits and hub polls batched together.
//!
//! A host where sshd will not forward (the port probe could not tell) keeps
//! the launch script's own wait ([`crate::plan::launch::LaunchSpec::ready_cs`]).

use std::time::{Duration, Instant};

use super::{PollOutcome, Spawner};
use crate::error::{Error, Result};
use crate::plan::state::ServerState;
use crate::plan::{self, launch, poll};
use crate::ssh::Target;

/// How often the server is polled when no kept SFTP session can tell an
/// exit, and at most how often a port that accepts is checked again.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(2);

/// How often the wrapper's `exit_status` is looked for over SFTP in the
/// first 5 s (when a server that fails usually does: a missing command, an
/// import error), and after that. Each look is one SFTP `stat`, about a
/// quarter of a millisecond of the host's CPU (sshd and sftp-server).
pub(super) const STAT_EVERY: Duration = Duration::from_millis(500);
/// See [`STAT_EVERY`].
pub(super) const STAT_EVERY_LATER: Duration = Duration::from_secs(2);

/// Does something accept a TCP connection at `address:port`, from here? A
/// refusal answers at once; a filtered port is given a second.
async fn connects(address: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((address, port))
        )
        .await,
        Ok(Ok(_))
    )
}

impl Spawner {
    /// Wait up to `ready` for the launched server of `state` to listen
    /// (`Ok(true)`), or for `ready` to run out with it alive (`Ok(false)`).
    /// [`Error::ServerExited`] with its status and log when it exits first;
    /// the pool's error when the host stops answering.
    pub(super) async fn wait_listening(
        &self,
        target: &Target,
        state: &ServerState,
        ready: Duration,
    ) -> Result<bool> {
        let Some(proc_) = state.proc() else {
            return Err(Error::Invalid {
                what: format!("server state of {:?}", state.username),
                reason: "has no process to wait for".into(),
            });
        };
        let at = if self.config.tunnel {
            "127.0.0.1".to_string()
        } else {
            state.address.clone()
        };
        let exit_file = format!("{}/exit_status", state.dir);
        let started = Instant::now();
        let mut last_check: Option<Instant> = None;
        let mut last_stat: Option<Instant> = None;
        let mut last_poll: Option<Instant> = None;
        let mut turn = 0u32;
        loop {
            let accepted = if self.config.tunnel {
                // The hub reaches the server only through sshd: ask sshd.
                self.pool.accepts(target, &at, state.port).await?
            } else {
                // The hub reaches the server directly: so does the wait,
                // with nothing on the host but the kernel's answer (no
                // sshd channel, no line in sshd's log).
                Some(connects(&at, state.port).await)
            };
            let stat_every = if started.elapsed() < Duration::from_secs(5) {
                STAT_EVERY
            } else {
                STAT_EVERY_LATER
            };
            let stat_due = last_stat.is_none_or(|t| t.elapsed() >= stat_every);
            let exited = if stat_due {
                last_stat = Some(Instant::now());
                self.pool.path_exists(target, &exit_file).await
            } else {
                Some(false)
            };
            let due = last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
            let mut check = exited == Some(true) || (accepted == Some(true) && due);
            // No kept SFTP session to tell an exit (a connection too busy to
            // give one a slot, as in a rush): ask the poll, which answers
            // every server of this login on the host in one exec of
            // builtins, batched with the other waits and polls.
            let poll_due = last_poll.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
            if !check && exited.is_none() && poll_due && started.elapsed() >= CHECK_EVERY {
                last_poll = Some(Instant::now());
                check = matches!(self.poll(state).await, PollOutcome::Exited { .. });
            }
            if check {
                last_check = Some(Instant::now());
                if self.ready_check(target, state, &proc_).await? {
                    return Ok(true);
                }
            }
            if started.elapsed() >= ready {
                return Ok(false);
            }
            let pause = plan::ports::ready_probe_delay(turn, started.elapsed());
            tokio::time::sleep(pause.min(ready.saturating_sub(started.elapsed()))).await;
            turn = turn.saturating_add(1);
        }
    }

    /// One [`poll::ready_check_script`] on the host: `true` when the
    /// server's own socket listens on its port.
    async fn ready_check(
        &self,
        target: &Target,
        state: &ServerState,
        proc_: &poll::Proc,
    ) -> Result<bool> {
        let out = self
            .run_script(target, poll::ready_check_script(proc_, state.port)?)
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status == Some(launch::LAUNCH_FAILED) {
            if let Some(e) = super::start::server_exited(&state.host, &stdout) {
                return Err(e);
            }
        }
        out.check(target)?;
        Ok(launch::launch_listening(&stdout))
    }
}
