//! Is a server running: polls of servers on one host and login batched
//! into one exec, and adopting a server whose launch never reported its pid.

use super::{PollQueue, PollReply, Spawner};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::adopt;
use crate::plan::launch;
use crate::plan::poll::{self, Proc, ProcStatus};
use crate::plan::state::ServerState;
use crate::ssh::{Command, Pool, Target};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// What poll found.
#[derive(Debug, Clone)]
pub enum PollOutcome {
    /// The server process is alive.
    Running,
    /// It is gone; the exit status when the wrapper recorded one.
    Exited {
        /// Exit status, if known.
        status: Option<i32>,
        /// Why it counts as gone.
        reason: poll::ExitReason,
    },
    /// The host could not be asked: say nothing about the server.
    Unknown(Error),
}

/// Most servers polled in one exec.
const POLL_CHUNK: usize = 500;

impl Spawner {
    /// Fill in the pid of a server whose start was interrupted before launch
    /// reported it, from the pid file in its directory. `None`: nothing runs.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn adopt(&self, state: &ServerState) -> Result<Option<ServerState>> {
        state.validate()?;
        if state.launched() {
            return Ok(Some(state.clone()));
        }
        let (target, accepted) = self.state_target(state).await?;
        let script = self.guarded(
            state,
            &accepted,
            adopt::adopt_script(&state.dir, &state.run_id)?,
        )?;
        let out = self.run_script(&target, script).await?.check(&target)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim() == adopt::NOTHING {
            return Ok(None);
        }
        let mut s = state.clone();
        s.record(launch::parse_launch(&stdout)?);
        Ok(Some(s))
    }

    /// Is the server running? Polls of servers on the same host and user that
    /// arrive together are answered by one exec.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn poll(&self, state: &ServerState) -> PollOutcome {
        if let Err(e) = state.validate() {
            return PollOutcome::Unknown(e);
        }
        let state = if state.launched() {
            state.clone()
        } else {
            match self.adopt(state).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    self.release_gpus(&state.host, &state.run_id);
                    return PollOutcome::Exited {
                        status: None,
                        reason: poll::ExitReason::Gone,
                    };
                }
                Err(e) => return PollOutcome::Unknown(e),
            }
        };
        let (target, proc_) = match (self.state_target(&state).await, state.proc()) {
            (Ok((t, _)), Some(p)) => (t, p),
            (Err(e), _) => return PollOutcome::Unknown(e),
            (_, None) => {
                return PollOutcome::Unknown(Error::Invalid {
                    what: "server state".into(),
                    reason: "incomplete".into(),
                })
            }
        };
        let (tx, rx) = oneshot::channel();
        let start_drain = match self.polls.lock() {
            Ok(mut queues) => {
                let q = queues.entry(target.clone()).or_default();
                q.pending.push((proc_, tx));
                !std::mem::replace(&mut q.draining, true)
            }
            Err(_) => false,
        };
        let label = target.host_label();
        if start_drain {
            // The drain runs on its own task for as long as polls keep
            // arriving; this poll waits for its own batch only.
            tokio::spawn(drain_polls(
                self.polls.clone(),
                self.pool.clone(),
                target,
                self.command("/bin/sh -s"),
                self.poll_execs.clone(),
            ));
        }
        // A batch is one exec bounded by command_timeout (after a queue wait
        // bounded by the pool); batches ahead of this one are bounded too,
        // but an answer later than this says nothing about the server.
        let bound = Config::duration(self.config.command_timeout)
            .saturating_mul(2)
            .saturating_add(Config::duration(self.config.connect_timeout));
        let answer = match tokio::time::timeout(bound, rx).await {
            Ok(answer) => answer,
            Err(_) => {
                return PollOutcome::Unknown(Error::Timeout {
                    host: label,
                    user: state.remote_user.clone(),
                    phase: crate::error::Phase::Command,
                    after: bound,
                })
            }
        };
        match answer {
            Ok(Ok(ProcStatus::Running)) => {
                metrics::server_running(&state.run_id, &state.host);
                // A restarted hub learns here what its servers hold.
                self.reclaim_gpus(&state);
                PollOutcome::Running
            }
            Ok(Ok(ProcStatus::Exited { status, reason })) => {
                metrics::server_gone(&state.run_id);
                self.release_gpus(&state.host, &state.run_id);
                PollOutcome::Exited { status, reason }
            }
            Ok(Err(e)) => PollOutcome::Unknown(e),
            Err(_) => PollOutcome::Unknown(Error::Invalid {
                what: "poll".into(),
                reason: "the poll batch was dropped".into(),
            }),
        }
    }
}

/// Run queued polls for one target, one exec per batch, until none are left.
async fn drain_polls(
    polls: Arc<Mutex<HashMap<Target, PollQueue>>>,
    pool: Pool,
    target: Target,
    cmd: Command,
    execs: Arc<AtomicUsize>,
) {
    loop {
        let batch: Vec<(Proc, PollReply)> = match polls.lock() {
            Ok(mut queues) => {
                let Some(q) = queues.get_mut(&target) else {
                    return;
                };
                if q.pending.is_empty() {
                    q.draining = false;
                    queues.remove(&target);
                    return;
                }
                let n = q.pending.len().min(POLL_CHUNK);
                q.pending.drain(..n).collect()
            }
            Err(_) => return,
        };
        // The same server polled twice at once (two hub calls racing) sits
        // in one batch twice: the script asks about it once, and both get
        // that answer.
        let mut seen = std::collections::HashSet::new();
        let procs: Vec<Proc> = batch
            .iter()
            .filter(|(p, _)| seen.insert(p.run_id.clone()))
            .map(|(p, _)| p.clone())
            .collect();
        execs.fetch_add(1, Ordering::Relaxed);
        let round = Instant::now();
        let result = async {
            let script = poll::poll_script(&procs)?;
            let out = pool
                .exec(&target, &cmd.clone().stdin(script))
                .await?
                .check(&target)?;
            poll::parse_poll(&String::from_utf8_lossy(&out.stdout), &procs)
        }
        .await;
        metrics::poll_round(&target.host_label(), round.elapsed());
        match result {
            Ok(statuses) => {
                let by_run: HashMap<String, ProcStatus> = statuses.into_iter().collect();
                for (p, reply) in batch {
                    let r = by_run
                        .get(&p.run_id)
                        .cloned()
                        .ok_or_else(|| Error::Invalid {
                            what: "poll report".into(),
                            reason: format!("no answer for {}", p.run_id),
                        });
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
