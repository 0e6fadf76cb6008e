//! The spawner lifecycle: prepare (host and port), certificates, launch,
//! poll, stop. It ties the decisions of [`crate::plan`] to the byte-moving of
//! [`crate::ssh`]; the CLI and the Python class both drive it.
//!
//! Start is two steps because JupyterHub must know host and port before it
//! builds the environment and the certificates: [`Spawner::prepare`] picks
//! them, [`Spawner::launch`] starts the command. If the port was taken in the
//! meantime, launch says so ([`crate::error::Error::PortTaken`]) and
//! [`Spawner::repick_port`] chooses another.
//!
//! One file per job: [`progress`] (what a spawn tells its user), `facts`
//! (reading and caching hosts' facts), `form` (the options form's rows, and
//! a submitted form checked against them), `prepare` (host and port choice),
//! `gpus` (which GPUs this hub's servers hold), `certs` (internal TLS),
//! `start` (launch and the start loop), `ready` (waiting from the hub for
//! a launched server to listen), `tunnels`, `poll`, `stop`, `admin`
//! (`check`, `list`), `trust` (which saved states it acts on, and
//! where). [`Spawner`] itself holds the shared state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::config::{Config, HostConfig};
use crate::error::Result;
use crate::metrics;

use crate::plan::history::History;
use crate::plan::hosts::{HostFacts, Requirements};
use crate::plan::limits::Limits;
use crate::plan::poll::{Proc, ProcStatus};
use crate::ssh::{Command, Output, Pool, Target};
use crate::ssh::{LocalForward, RemoteForward};

mod admin;
mod certs;
mod facts;
mod form;
mod gpus;
mod poll;
mod prepare;
pub mod progress;
mod ready;
mod start;
mod stop;
mod trust;
mod tunnels;
pub mod watch;

pub use admin::HostCheck;
pub use certs::{alt_names, CertPaths};
pub use poll::PollOutcome;
pub use prepare::Prepared;
pub use progress::{Event, Progress};
pub use start::{CleanUpLater, StartHooks, StartOptions};

/// What a spawn asks for.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    /// The hub user.
    pub username: String,
    /// Named server ("" for the default server).
    pub server_name: String,
    /// Memory, cores and GPUs a host must have free.
    pub requirements: Requirements,
    /// Limits to enforce.
    pub limits: Limits,
    /// Only this host (by display name), e.g. from the options form.
    pub host: Option<String>,
    /// Hosts not to use (they failed during this spawn).
    pub exclude: Vec<String>,
}

/// Host facts by (host, remote user), with when they were read.
type FactsCache = HashMap<(String, String), (Instant, HostFacts)>;

/// What the options form shows per (host, remote user): read once, shared by
/// every page opened while it is fresh.
type StatusCell = Arc<tokio::sync::OnceCell<std::result::Result<HostFacts, String>>>;
type StatusCache = HashMap<(String, String), (Instant, StatusCell)>;

pub use crate::plan::run::RUN_ENV;

/// A lock per (host, remote user) held while its facts are read.
type FactsReads = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// Ports recently handed to starts, by host display name, with when.
type PortClaims = HashMap<String, HashMap<u16, Instant>>;

/// Where a queued poll gets its answer.
type PollReply = oneshot::Sender<Result<ProcStatus>>;

/// Polls waiting for one exec on one target.
#[derive(Default)]
struct PollQueue {
    pending: Vec<(Proc, PollReply)>,
    draining: bool,
}

/// The tunnels of one server; dropping them closes them.
#[derive(Default)]
struct ServerTunnels {
    local: Option<LocalForward>,
    hub: Option<RemoteForward>,
}

/// The lifecycle, shared by every spawn of a hub. Clones share everything.
#[derive(Clone)]
pub struct Spawner {
    config: Arc<Config>,
    pool: Pool,
    facts: Arc<Mutex<FactsCache>>,
    status: Arc<Mutex<StatusCache>>,
    round_robin: Arc<AtomicUsize>,
    polls: Arc<Mutex<HashMap<Target, PollQueue>>>,
    poll_execs: Arc<AtomicUsize>,
    /// Tunnels by run id; closed on stop and when the last clone is dropped.
    tunnels: Arc<Mutex<HashMap<String, ServerTunnels>>>,
    claims: Arc<Mutex<PortClaims>>,
    /// GPUs held by this hub's servers, by host ([`gpus`]).
    gpu_claims: Arc<Mutex<gpus::GpuClaims>>,
    /// One facts read at a time per (host, user): starts that miss the cache
    /// together wait for the first read instead of each running their own.
    facts_reads: Arc<Mutex<FactsReads>>,
    /// See [`Spawner::set_hub_api`].
    hub_api: Arc<Mutex<Option<String>>>,
    /// The configurations this hub ran with ([`Spawner::remember`]).
    history: Arc<Mutex<History>>,
    /// Journal directories whose history was read.
    remembered: Arc<Mutex<std::collections::HashSet<std::path::PathBuf>>>,
    /// known_hosts, read for a state naming a host no longer configured.
    known_hosts: crate::ssh::known_hosts::Cache,
    /// Run ids whose host standing was logged ([`Spawner::note_host`]).
    noted: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Run ids [`Spawner::clean_up_later`] is working on.
    cleaning: Arc<Mutex<std::collections::HashSet<String>>>,
    /// See [`Spawner::set_ready_wait_on_host`].
    ready_on_host: Arc<std::sync::atomic::AtomicBool>,
    /// The rows of the options form each user was last shown ([`form`]).
    form_shown: Arc<Mutex<form::Shown>>,
}

impl Spawner {
    /// A spawner with its own connection pool. Call inside a tokio runtime.
    pub fn new(config: Config) -> Result<Spawner> {
        config.validate()?;
        let history = History::now(&config.remote_user, &config.state_dir);
        let pool = Pool::new(config.pool_options());
        for h in &config.hosts {
            metrics::name_host(crate::ssh::host_label(&h.address, h.port), h.display_name());
            metrics::host_draining(h.display_name(), h.drain);
        }
        Ok(Spawner {
            config: Arc::new(config),
            pool,
            facts: Arc::new(Mutex::new(HashMap::new())),
            status: Arc::new(Mutex::new(HashMap::new())),
            round_robin: Arc::new(AtomicUsize::new(0)),
            polls: Arc::new(Mutex::new(HashMap::new())),
            poll_execs: Arc::new(AtomicUsize::new(0)),
            tunnels: Arc::new(Mutex::new(HashMap::new())),
            claims: Arc::new(Mutex::new(HashMap::new())),
            gpu_claims: Arc::new(Mutex::new(HashMap::new())),
            facts_reads: Arc::new(Mutex::new(HashMap::new())),
            hub_api: Arc::new(Mutex::new(None)),
            history: Arc::new(Mutex::new(history)),
            remembered: Arc::new(Mutex::new(Default::default())),
            known_hosts: Default::default(),
            noted: Arc::new(Mutex::new(Default::default())),
            cleaning: Arc::new(Mutex::new(Default::default())),
            ready_on_host: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            form_shown: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Wait for a launched server to listen in the launch script on the
    /// host (a turn every 10-50 ms running `ss` and `sleep`), as before the
    /// hub watched it itself ([`ready`]). For benchmarks that compare the
    /// two; a host where sshd does not forward always waits that way.
    #[doc(hidden)]
    pub fn set_ready_wait_on_host(&self, on_host: bool) {
        self.ready_on_host.store(on_host, Ordering::Relaxed);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The connection pool (for stats).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Poll execs run so far (each may answer many polls).
    pub fn poll_execs(&self) -> usize {
        self.poll_execs.load(Ordering::Relaxed)
    }

    pub(super) fn command(&self, text: impl Into<String>) -> Command {
        Command::new(text).timeout(Config::duration(self.config.command_timeout))
    }

    /// Run `script` on `target` as `/bin/sh -s` (the script on stdin, the
    /// only channel for what it carries), within `command_timeout`.
    pub(super) async fn run_script(&self, target: &Target, script: String) -> Result<Output> {
        self.pool
            .exec(target, &self.command("/bin/sh -s").stdin(script))
            .await
    }

    /// The SSH targets of every configured host for `username`, in order.
    pub(super) fn all_targets(&self, username: &str) -> Result<Vec<Target>> {
        self.config
            .hosts
            .iter()
            .map(|h| self.target(h, username))
            .collect()
    }

    /// The SSH target for a user on a host.
    pub fn target(&self, host: &HostConfig, username: &str) -> Result<Target> {
        Ok(Target::new(
            &host.address,
            self.config.remote_user_for(username)?,
            self.config.identity_for(username)?,
        )
        .port(host.port))
    }
}

/// Await futures concurrently on this task.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    let mut futs: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in results.iter_mut().zip(futs.iter_mut()) {
            if let Some(f) = fut {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *slot = Some(v);
                        *fut = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}
