//! Starting a server: the launch on the chosen host (port probe, run
//! directory, the launch script, the wait until it listens) and the one
//! start loop that retries another port or another host.

use super::prepare::Prepared;
use super::progress::{short_reason, Progress};
use super::{SpawnRequest, Spawner, RUN_ENV};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::gpus::{self, GpuFacts};
use crate::plan::launch::{self, LaunchSpec};
use crate::plan::limits;
use crate::plan::ports::{self, PortProbe};
use crate::plan::retry;
use crate::plan::state::ServerState;
use crate::ssh::{LocalForward, Target};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How [`Spawner::start`] runs, beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The last moment to wait for the server to listen; each attempt waits
    /// what is left. `None`: `ready_timeout` per attempt.
    pub ready_until: Option<Instant>,
    /// Open a hub tunnel to this hub API address (`host:port`) on each host
    /// before launching there (the environment must then name its port; see
    /// [`crate::plan::retry::attempt_env`]).
    pub hub_api: Option<String>,
    /// The server may move to another host (false once a TLS certificate
    /// names the first one).
    pub may_move: bool,
}

/// What the caller of [`Spawner::start`] does between attempts.
pub trait StartHooks: Sync {
    /// The state about to be launched (a new host, port or hub tunnel), before
    /// anything starts there. An error ends the start.
    fn launching(
        &self,
        sp: &Spawner,
        state: &ServerState,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
    /// An attempt abandoned on a host that did not answer: stop it once the
    /// host answers.
    fn abandoned(
        &self,
        sp: &Spawner,
        state: ServerState,
        why: String,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Hooks that record nothing and leave abandoned attempts to
/// [`Spawner::clean_up_later`] (in memory: the CLI, the tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct CleanUpLater;

impl StartHooks for CleanUpLater {
    async fn launching(&self, _sp: &Spawner, _state: &ServerState) -> Result<()> {
        Ok(())
    }
    async fn abandoned(&self, sp: &Spawner, state: ServerState, why: String) {
        tracing::info!(host = %state.host, run = %state.run_id, "{why}: stopped once it answers");
        sp.clean_up_later(state);
    }
}

impl Spawner {
    /// Start the command on the prepared host. `env` is exported inside the
    /// script on stdin (never in argv). On [`Error::PortTaken`], call
    /// [`Spawner::repick_port`], rebuild the environment and launch again.
    ///
    /// The launch returns once the server listens on its port, or fails when
    /// it exits first (with its status and log), waiting at most
    /// `ready_timeout`; see [`Spawner::launch_within`].
    pub async fn launch(
        &self,
        prepared: &Prepared,
        env: &[(String, String)],
        command: &[String],
        progress: &Progress,
    ) -> Result<ServerState> {
        let ready = Config::duration(self.config.ready_timeout);
        self.launch_within(prepared, env, command, progress, ready)
            .await
    }

    /// [`Spawner::launch`], waiting at most `ready` for the server to listen
    /// or exit (zero: return as soon as its pid is known). When the wait runs
    /// out with the server alive, the launch succeeds all the same.
    #[tracing::instrument(name = "server", skip_all, fields(user = %prepared.state.username, server = %prepared.state.server_name, host = %prepared.state.host))]
    pub async fn launch_within(
        &self,
        prepared: &Prepared,
        env: &[(String, String)],
        command: &[String],
        progress: &Progress,
        ready: Duration,
    ) -> Result<ServerState> {
        let state = &prepared.state;
        let (target, _) = self.state_target(state).await?;
        // The local end of the tunnel is bound before anything starts, so a
        // failure here leaves nothing running on the host.
        let tunnel_port = if self.config.tunnel {
            self.close_tunnel(&state.run_id, true, false);
            let fwd = LocalForward::bind(
                self.pool.clone(),
                target.clone(),
                0,
                "127.0.0.1".into(),
                state.port,
            )
            .await?;
            let port = fwd.port();
            self.put_tunnel(&state.run_id, Some(fwd), None);
            Some(port)
        } else {
            None
        };
        let launched = self
            .launch_inner(prepared, &target, env, command, progress, ready)
            .await;
        match launched {
            Ok(mut state) => {
                state.tunnel_port = tunnel_port;
                metrics::spawn_done(&state.host, "ok", prepared.started.elapsed());
                metrics::server_running(&state.run_id, &state.host);
                Ok(state)
            }
            Err(e) => {
                self.close_tunnel(&state.run_id, true, false);
                // A taken port is retried on the same spawn, not an outcome.
                if !matches!(e, Error::PortTaken { .. }) {
                    metrics::spawn_done(&state.host, e.kind(), prepared.started.elapsed());
                }
                Err(e)
            }
        }
    }

    pub(super) async fn launch_inner(
        &self,
        prepared: &Prepared,
        target: &Target,
        env: &[(String, String)],
        command: &[String],
        progress: &Progress,
        ready: Duration,
    ) -> Result<ServerState> {
        let state = &prepared.state;
        let target = target.clone();
        // Centiseconds, the resolution of the host's clock (/proc/uptime).
        let ready_cs = u32::try_from(ready.as_millis().div_ceil(10)).unwrap_or(u32::MAX);
        let (plan, enforcement) = limits::decide(
            self.config.enforcement,
            &prepared.facts,
            &prepared.limits,
            &state.run_id,
            &state.remote_user,
        )?;
        // Every descendant inherits this, so stop can find kernels and helpers
        // even after the server itself died and they were re-parented.
        let mut env = env.to_vec();
        env.push((RUN_ENV.to_string(), state.run_id.clone()));
        // On a host with GPUs the server sees exactly its own (none when it
        // asked for none), whatever the hub's environment said; on a host
        // without nvidia-smi the environment is left as it is.
        if !state.gpus.is_empty() || !matches!(prepared.facts.gpus, GpuFacts::None) {
            let uuids: Vec<&str> = state.gpus.iter().map(String::as_str).collect();
            let visible = gpus::visible_devices_by_uuid(&uuids);
            env.retain(|(k, _)| !visible.iter().any(|(name, _)| k == name));
            env.extend(visible.map(|(k, v)| (k.to_string(), v)));
        }
        // The port is asked of sshd while the run directory is made over the
        // connection's kept SFTP session: no program runs on the host for
        // either.
        let (probed, dir_made) = tokio::join!(
            self.probe_port(&target, state),
            self.pool.make_dir(&target, &state.dir)
        );
        if dir_made && !matches!(probed, Ok(PortProbe::Free | PortProbe::Unknown)) {
            self.pool.remove_empty_dir(&target, &state.dir).await;
        }
        let check_port = match probed? {
            PortProbe::Taken(at) => {
                tracing::debug!(host = %state.host, port = state.port, at = %at,
                    "the port answers on the host; another port");
                return Err(Error::PortTaken {
                    host: state.host.clone(),
                    port: state.port,
                });
            }
            PortProbe::Free => false,
            PortProbe::Unknown => true,
        };
        // The hub waits for the server to listen itself (no program runs on
        // the host meanwhile) wherever sshd answered the port probe.
        let hub_waits =
            !check_port && !ready.is_zero() && !self.ready_on_host.load(Ordering::Relaxed);
        let spec = LaunchSpec {
            run_id: &state.run_id,
            dir: &state.dir,
            port: state.port,
            env: &env,
            prologue: &prepared.prologue,
            command,
            workdir: None,
            limits: &plan,
            ready_cs: if hub_waits { 0 } else { ready_cs },
            default_signal: prepared.facts.default_signal,
            check_port,
            dir_made,
            gpus: &state.gpus,
        };
        let script = launch::launch_script(&spec)?;
        let launch_command = launch::launch_command(&spec)?;
        progress.emit(
            45,
            format!(
                "Starting the server on {} as {} ({enforcement})",
                state.host, state.remote_user
            ),
        );
        let started = Instant::now();
        let out = self
            .pool
            .exec(
                &target,
                &self
                    .command(&launch_command)
                    .stdin(script)
                    .timeout(Config::duration(self.config.command_timeout) + ready),
            )
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        match out.status {
            Some(0) => {}
            Some(launch::PORT_TAKEN) => {
                return Err(Error::PortTaken {
                    host: state.host.clone(),
                    port: state.port,
                })
            }
            _ => {
                if let Some(e) = server_exited(&state.host, &stdout) {
                    return Err(e);
                }
                out.check(&target)?;
            }
        }
        let launched = launch::parse_launch(&stdout)?;
        let pid = launched.pid;
        let mut state = state.clone();
        state.record(launched);
        state.enforcement = Some(enforcement);
        let listening = if hub_waits {
            progress.emit(
                60,
                format!(
                    "Server started on {} as pid {}; waiting for it to listen on port {}",
                    state.host, pid, state.port
                ),
            );
            self.wait_listening(&target, &state, ready.saturating_sub(started.elapsed()))
                .await?
        } else {
            launch::launch_listening(&stdout)
        };
        let took = started.elapsed();
        tracing::debug!(
            host = %state.host,
            run = %state.run_id,
            pid,
            port = state.port,
            listening,
            launch_ms = took.as_millis() as u64,
            "launch returned"
        );
        progress.emit(
            70,
            if listening {
                format!(
                    "Server started on {} as pid {}, listening on port {} after {:.1} s",
                    state.host,
                    pid,
                    state.port,
                    took.as_secs_f64()
                )
            } else if ready.is_zero() {
                format!(
                    "Server started on {} as pid {}, waiting for it to answer",
                    state.host, pid
                )
            } else {
                format!(
                    "Server started on {} as pid {}, not listening on port {} yet after {:.0} s; waiting for it to answer",
                    state.host,
                    pid,
                    state.port,
                    took.as_secs_f64()
                )
            },
        );
        Ok(state)
    }

    /// Is the server's port free on its host, just before the launch? sshd
    /// is asked to connect to it at each of [`ports::probe_addresses`], all
    /// at once over the pooled connection (no program runs on the host for
    /// it). When sshd cannot be reached the launch fails with that error
    /// right away (a host cut since the choice is moved away from like any
    /// unanswered launch), instead of waiting a second time in the exec.
    pub(super) async fn probe_port(
        &self,
        target: &Target,
        state: &ServerState,
    ) -> Result<PortProbe> {
        let addrs = ports::probe_addresses(&state.address, self.config.tunnel);
        let mut probes = tokio::task::JoinSet::new();
        for a in addrs {
            let (pool, target, port) = (self.pool.clone(), target.clone(), state.port);
            probes.spawn(async move {
                let answer = pool.accepts(&target, &a, port).await;
                (a, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok((a, Ok(x))) => answers.push((a, x)),
                Ok((_, Err(e))) => return Err(e),
                Err(e) => {
                    tracing::debug!(host = %state.host, "port probe task failed ({e})");
                    answers.push((String::new(), None));
                }
            }
        }
        Ok(ports::probe_verdict(&answers))
    }

    /// Prepare and launch in one go (the CLI's and the tests' start): see
    /// [`Spawner::start`]. `env` builds the environment for a given state (it
    /// contains the port). An attempt abandoned on a host that did not answer
    /// is cleaned up in memory ([`Spawner::clean_up_later`]).
    pub async fn spawn(
        &self,
        req: &SpawnRequest,
        env: impl Fn(&ServerState) -> Vec<(String, String)>,
        command: &[String],
        progress: &Progress,
    ) -> Result<ServerState> {
        let prepared = self.prepare(req, progress).await?;
        let opts = StartOptions {
            ready_until: None,
            hub_api: None,
            may_move: true,
        };
        self.start(prepared, req, env, command, progress, &opts, &CleanUpLater)
            .await
    }

    /// Launch a prepared spawn, retrying as [`crate::plan::retry::next`]
    /// decides: another port on the same host when the port was taken,
    /// another host (prepared anew, the failed ones excluded) when the host
    /// did not answer. The one start loop of the project: the hub class
    /// awaits it once, the CLI through [`Spawner::spawn`].
    ///
    /// Before each launch `hooks.launching` gets the state about to be
    /// launched (the hub journals it: a hub killed during the launch stops
    /// it after a restart); an error there ends the start. Every attempt
    /// abandoned on a host that did not answer (the launch may have reached
    /// it) has its tunnels closed and goes to `hooks.abandoned`, which must
    /// stop it once the host answers.
    #[allow(clippy::too_many_arguments)]
    pub async fn start<H: StartHooks>(
        &self,
        mut prepared: Prepared,
        req: &SpawnRequest,
        env: impl Fn(&ServerState) -> Vec<(String, String)>,
        command: &[String],
        progress: &Progress,
        opts: &StartOptions,
        hooks: &H,
    ) -> Result<ServerState> {
        let mut req = req.clone();
        loop {
            let attempt = async {
                if let Some(to) = &opts.hub_api {
                    self.open_hub_forward(&mut prepared, to).await?;
                }
                hooks.launching(self, &prepared.state).await?;
                let ready = match opts.ready_until {
                    Some(until) => until.saturating_duration_since(Instant::now()),
                    None => Config::duration(self.config.ready_timeout),
                };
                self.launch_within(&prepared, &env(&prepared.state), command, progress, ready)
                    .await
            };
            let e = match attempt.await {
                Ok(state) => return Ok(state),
                Err(e) => e,
            };
            let at = retry::Attempt {
                ports_tried: prepared.tried_ports.len(),
                port_retries: self.config.port_retries,
                pinned: req.host.is_some(),
                may_move: opts.may_move,
            };
            let host = prepared.state.host.clone();
            match retry::next(retry::Failure::of(&e), &at) {
                retry::Next::OtherPort => {
                    let taken = prepared.state.port;
                    let next = self.repick_port(&mut prepared).inspect_err(|_| {
                        self.release_gpus(&host, &prepared.state.run_id);
                    })?;
                    progress.emit(
                        40,
                        format!("Port {taken} was taken meanwhile; trying port {next}"),
                    );
                }
                retry::Next::OtherHost => {
                    progress.emit(
                        15,
                        format!(
                            "{host} did not answer ({}); trying another host",
                            short_reason(&e)
                        ),
                    );
                    tracing::warn!(host = %host, "launch unanswered ({e}); trying another host");
                    self.abandon(
                        &prepared.state,
                        format!("launch on {host} unanswered"),
                        hooks,
                    )
                    .await;
                    req.exclude.push(host);
                    prepared = self.prepare(&req, progress).await?;
                }
                retry::Next::Fail { why, abandon } => {
                    if abandon {
                        // Its GPUs stay claimed until the clean-up's stop:
                        // the server may run there.
                        self.abandon(
                            &prepared.state,
                            format!("launch on {host} unanswered"),
                            hooks,
                        )
                        .await;
                    } else {
                        self.release_gpus(&host, &prepared.state.run_id);
                    }
                    return Err(match why {
                        retry::Stop::AsItIs | retry::Stop::CertificateNamesHost => e,
                        retry::Stop::PortsExhausted => Error::NoHost {
                            detail: format!(
                                "{host}: {} ports in a row were taken before the server could start",
                                prepared.tried_ports.len()
                            ),
                        },
                        retry::Stop::PinnedUnreachable => Error::NoHost {
                            detail: format!(
                                "{host}, the host you chose, stopped answering ({e}); the server was not moved to another host: choose another host or let the spawner choose"
                            ),
                        },
                    });
                }
            }
        }
    }

    /// An attempt whose launch may have reached an unanswering host: its
    /// tunnels close now, the hooks stop it once the host answers.
    pub(super) async fn abandon<H: StartHooks>(&self, state: &ServerState, why: String, hooks: &H) {
        self.close_tunnel(&state.run_id, true, true);
        hooks.abandoned(self, state.clone(), why).await;
    }
}

/// [`Error::ServerExited`] from a launch script's (or the ready check's)
/// failure report, `None` when `stdout` is not one.
pub(super) fn server_exited(host: &str, stdout: &str) -> Option<Error> {
    let (status, log_tail) = launch::parse_launch_failure(stdout)?;
    Some(Error::ServerExited {
        host: host.to_string(),
        status: status
            .map(|s| format!("status {s}"))
            .unwrap_or_else(|| "unknown status".into()),
        log_tail,
    })
}
