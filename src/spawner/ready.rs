//! Waiting, from the hub, for a launched server to listen or exit.
//!
//! The launch script returns as soon as the server's pid is known. The hub
//! then watches, through the pooled connection, in a way that starts no
//! program on the host while the server boots, however long it takes:
//!
//! - each turn asks sshd to connect to the server's port where the hub will
//!   reach it (a direct-tcpip channel opened and closed: sshd's own
//!   `connect`, as the port probe before the launch does), and asks the
//!   connection's kept SFTP session whether the wrapper has written
//!   `exit_status` (one `stat`);
//! - turns start 10 ms apart and back off to [`plan::ports::ready_probe_delay`]'s
//!   200 ms, and 500 ms after 5 s;
//! - once the port accepts, or the server has exited, one command on the
//!   host ([`script::ready_check_script`]: `sh` and `ss`) tells whether the
//!   listener is the server's (its login's uid; another user's listener is
//!   never taken for it) or reports the exit status and the log's tail;
//! - without a kept SFTP session that command also runs every
//!   [`CHECK_EVERY`], so that an exit is still seen.
//!
//! A host where sshd will not forward (the port probe could not tell) keeps
//! the launch script's own wait ([`crate::plan::script::LaunchSpec::ready_cs`]).

use std::time::{Duration, Instant};

use super::Spawner;
use crate::error::{Error, Result};
use crate::plan::state::ServerState;
use crate::plan::{self, script};
use crate::ssh::Target;

/// How often the host-side check runs when no kept SFTP session can tell an
/// exit, and at most how often a port that accepts is checked again.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(2);

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
        let mut turn = 0u32;
        loop {
            let (accepted, exited) = tokio::join!(
                self.pool.accepts(target, &at, state.port),
                self.pool.path_exists(target, &exit_file)
            );
            let accepted = accepted?;
            let due = last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
            let check = exited == Some(true)
                || (accepted == Some(true) && due)
                || (exited.is_none() && due && started.elapsed() >= CHECK_EVERY);
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

    /// One [`script::ready_check_script`] on the host: `true` when the
    /// server's own socket listens on its port.
    async fn ready_check(
        &self,
        target: &Target,
        state: &ServerState,
        proc_: &script::Proc,
    ) -> Result<bool> {
        let out = self
            .pool
            .exec(
                target,
                &self
                    .command("/bin/sh -s")
                    .stdin(script::ready_check_script(proc_, state.port)?),
            )
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status == Some(script::LAUNCH_FAILED) {
            if let Some((status, log_tail)) = script::parse_launch_failure(&stdout) {
                return Err(Error::ServerExited {
                    host: state.host.clone(),
                    status: status
                        .map(|s| format!("status {s}"))
                        .unwrap_or_else(|| "unknown status".into()),
                    log_tail,
                });
            }
        }
        out.check(target)?;
        Ok(script::launch_listening(&stdout))
    }
}
