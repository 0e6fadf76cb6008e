//! Stopping a server (TERM, KILL after the grace, its directory removed),
//! and the clean-up in the background of starts abandoned on a host that
//! did not answer.

use super::Spawner;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::adopt;
use crate::plan::state::ServerState;
use crate::plan::stop;
use crate::ssh::Command;
use std::time::Duration;
use tracing::Instrument;

impl Spawner {
    /// A launch that failed because the host stopped answering may still have
    /// started the server there. Keep trying to stop it in the background
    /// (every 30 s for an hour), so nothing is left behind once it heals.
    ///
    /// One clean-up per run: asking again while one runs does nothing. The
    /// run's tunnels are closed at once (each try is a [`Spawner::stop`]),
    /// and stay closed when it gives up.
    pub fn clean_up_later(&self, state: ServerState) {
        let me = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.close_tunnel(&state.run_id, true, true);
        let first = self
            .cleaning
            .lock()
            .map(|mut c| c.insert(state.run_id.clone()))
            .unwrap_or(true);
        if !first {
            return;
        }
        let span = tracing::info_span!("server", user = %state.username, server = %state.server_name, host = %state.host);
        rt.spawn(
            async move {
            let mut last = None;
            for _ in 0..120 {
                match me.stop(&state).await {
                    Ok(_) => {
                        tracing::info!(host = %state.host, run = %state.run_id, "cleaned up after an abandoned start");
                        last = None;
                        break;
                    }
                    Err(e) if e.is_unreachable() => {
                        last = Some(e);
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = last {
                // Nothing tries again: say what may be left and where.
                tracing::error!(
                    host = %state.host,
                    remote_user = %state.remote_user,
                    run = %state.run_id,
                    pid = ?state.pid,
                    dir = %state.dir,
                    "gave up cleaning up an abandoned start ({e}); a server may be left running there: stop it with `ssh-spawner stop` and this state: {}",
                    crate::plan::state::encode(&state).unwrap_or_default()
                );
            }
            me.close_tunnel(&state.run_id, true, true);
            if let Ok(mut c) = me.cleaning.lock() {
                c.remove(&state.run_id);
            }
        }
            .instrument(span),
        );
    }

    /// Runs [`Spawner::clean_up_later`] is working on.
    pub fn cleaning_up(&self) -> usize {
        self.cleaning.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Whether [`Spawner::clean_up_later`] is still working on `run_id`
    /// (it has neither stopped it nor given up).
    pub fn is_cleaning_up(&self, run_id: &str) -> bool {
        self.cleaning
            .lock()
            .map(|c| c.contains(run_id))
            .unwrap_or(false)
    }

    /// Stop the server: TERM to its process group and descendants, KILL after
    /// the grace, return once they are gone; the per-server directory is
    /// removed (its log kept unless configured otherwise). Stopping a stopped
    /// server is a no-op; an unreachable host is an error.
    ///
    /// The server's tunnels close whatever the outcome: the hub stops
    /// routing to a server it stops, and a stop that could not reach the
    /// host is finished by [`Spawner::clean_up_later`], not by a tunnel
    /// left open.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn stop(&self, state: &ServerState) -> Result<stop::Stopped> {
        let stopped = self.stop_inner(state).await;
        self.close_tunnel(&state.run_id, true, true);
        // Its GPUs are free once it is gone, not before: a stop that could
        // not reach the host keeps them held (it may still run there), and
        // claims them again if this process did not hold them (a restarted
        // hub retrying a pending stop). Only a state the configuration
        // accepted gets as far as trying its host.
        match &stopped {
            Ok(_) => self.release_gpus(&state.host, &state.run_id),
            Err(e) if e.is_unreachable() => self.reclaim_gpus(state),
            Err(_) => {}
        }
        stopped
    }

    pub(super) async fn stop_inner(&self, state: &ServerState) -> Result<stop::Stopped> {
        if let Ok(mut claims) = self.claims.lock() {
            if let Some(mine) = claims.get_mut(&state.host) {
                mine.remove(&state.port);
            }
        }
        let Some(state) = self.adopt(state).await? else {
            // Nothing was started: remove what prepare and certs left.
            let (target, accepted) = self.state_target(state).await?;
            let script = self.guarded(state, &accepted, adopt::remove_dir_script(&state.dir)?)?;
            self.run_script(&target, script).await?.check(&target)?;
            metrics::server_gone(&state.run_id);
            return Ok(stop::Stopped::AlreadyGone);
        };
        let (target, accepted) = self.state_target(&state).await?;
        let proc_ = state.proc().ok_or_else(|| Error::Invalid {
            what: "server state".into(),
            reason: "incomplete".into(),
        })?;
        let grace = self.config.stop_grace.ceil() as u32;
        let script = self.guarded(
            &state,
            &accepted,
            stop::stop_script(&proc_, grace, self.config.keep_log)?,
        )?;
        let cmd = Command::new("/bin/sh -s").stdin(script).timeout(
            Config::duration(self.config.command_timeout)
                .saturating_add(Duration::from_secs(u64::from(grace))),
        );
        let out = self.pool.exec(&target, &cmd).await?.check(&target)?;
        let stopped = stop::parse_stop(&String::from_utf8_lossy(&out.stdout))?;
        metrics::server_gone(&state.run_id);
        if let stop::Stopped::Killed { escalated: true } = stopped {
            metrics::stop_escalated(&state.host);
        }
        Ok(stopped)
    }
}
