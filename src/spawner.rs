//! The spawner lifecycle: prepare (host and port), certificates, launch,
//! poll, stop. It ties the decisions of [`crate::plan`] to the byte-moving of
//! [`crate::ssh`]; the CLI and the Python class both drive it.
//!
//! Start is two steps because JupyterHub must know host and port before it
//! builds the environment and the certificates: [`Spawner::prepare`] picks
//! them, [`Spawner::launch`] starts the command. If the port was taken in the
//! meantime, launch says so ([`Error::PortTaken`]) and
//! [`Spawner::repick_port`] chooses another.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tracing::Instrument;

use crate::config::{check_username, Config, HostConfig};
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::adopt;
use crate::plan::health;
use crate::plan::hosts::{self, Candidate, HostFacts, Requirements, Strategy};
use crate::plan::limits::{self, Limits};
use crate::plan::ports::{self, choose_port, PortProbe};
use crate::plan::retry;
use crate::plan::script::{self, LaunchSpec, Proc, ProcStatus};
use crate::plan::state::{check_host_port, ServerState, STATE_VERSION};
use crate::ssh::{Command, LocalForward, Pool, RemoteForward, Target, Upload};

mod ready;

/// One step of a spawn, for the progress bar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// 0–100.
    pub progress: u8,
    /// In words a user understands.
    pub message: String,
}

/// The events of one spawn. Any number of watchers read it, each with its own
/// cursor; writers never wait for readers.
#[derive(Debug, Default)]
pub struct Progress {
    events: Mutex<Vec<Event>>,
    changed: Notify,
    done: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// A new, empty stream.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Record an event.
    pub fn emit(&self, progress: u8, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(progress, "{message}");
        if let Ok(mut e) = self.events.lock() {
            e.push(Event { progress, message });
        }
        self.changed.notify_waiters();
    }

    /// No more events will come.
    pub fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Events from `cursor` on; waits for one if there are none yet. Empty
    /// means the stream is finished.
    pub async fn next_from(&self, cursor: usize) -> Vec<Event> {
        loop {
            let notified = self.changed.notified();
            let (events, done) = (self.snapshot(cursor), self.done.load(Ordering::SeqCst));
            if !events.is_empty() || done {
                return events;
            }
            notified.await;
        }
    }

    /// Events from `cursor` on, without waiting.
    pub fn snapshot(&self, cursor: usize) -> Vec<Event> {
        self.events
            .lock()
            .map(|e| e.get(cursor..).map(|s| s.to_vec()).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// What a spawn asks for.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    /// The hub user.
    pub username: String,
    /// Named server ("" for the default server).
    pub server_name: String,
    /// Memory and cores a host must have free.
    pub requirements: Requirements,
    /// Limits to enforce.
    pub limits: Limits,
    /// Only this host (by display name), e.g. from the options form.
    pub host: Option<String>,
    /// Hosts not to use (they failed during this spawn).
    pub exclude: Vec<String>,
}

/// A host and port chosen, not yet launched.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The state so far (no pid yet); save it before launching.
    pub state: ServerState,
    facts: HostFacts,
    tried_ports: BTreeSet<u16>,
    limits: Limits,
    prologue: Vec<String>,
    /// When the spawn began (for the spawn duration metric).
    started: Instant,
}

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

impl Prepared {
    /// DNS name and IP alt names for the host's TLS certificate.
    pub fn alt_names(&self) -> Vec<String> {
        alt_names(&self.state.address, &self.facts.hostname, &self.state.host)
    }

    /// Facts of the chosen host.
    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }
}

/// Alt names for a certificate valid for a host reached at `address`.
pub fn alt_names(address: &str, hostname: &str, display: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut push = |n: String| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    if address.parse::<std::net::IpAddr>().is_ok() {
        push(format!("IP:{address}"));
    } else {
        push(format!("DNS:{address}"));
    }
    for n in [hostname, display] {
        let dns_like = !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if dns_like && n.parse::<std::net::IpAddr>().is_err() {
            push(format!("DNS:{n}"));
        }
    }
    names
}

/// Remote paths of uploaded certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertPaths {
    /// Private key.
    pub keyfile: String,
    /// Certificate.
    pub certfile: String,
    /// CA bundle.
    pub cafile: String,
}

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
        reason: script::ExitReason,
    },
    /// The host could not be asked: say nothing about the server.
    Unknown(Error),
}

type PollReply = oneshot::Sender<Result<ProcStatus>>;

/// Host facts by (host, remote user), with when they were read.
type FactsCache = HashMap<(String, String), (Instant, HostFacts)>;

/// What the options form shows per (host, remote user): read once, shared by
/// every page opened while it is fresh.
type StatusCell = Arc<tokio::sync::OnceCell<std::result::Result<HostFacts, String>>>;
type StatusCache = HashMap<(String, String), (Instant, StatusCell)>;

/// Polls waiting for one exec on one target.
#[derive(Default)]
struct PollQueue {
    pending: Vec<(Proc, PollReply)>,
    draining: bool,
}

pub use crate::plan::adopt::RUN_ENV;

/// Most servers polled in one exec.
const POLL_CHUNK: usize = 500;

/// The tunnels of one server; dropping them closes them.
#[derive(Default)]
struct ServerTunnels {
    local: Option<LocalForward>,
    hub: Option<RemoteForward>,
}

/// How long a port handed to a start stays claimed (unless the server is
/// stopped first): long enough for its server to listen, after which the
/// host's facts show the port taken anyway.
const PORT_CLAIM: Duration = Duration::from_secs(120);

/// A lock per (host, remote user) held while its facts are read.
type FactsReads = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// Ports recently handed to starts, by host display name, with when.
type PortClaims = HashMap<String, HashMap<u16, Instant>>;

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
    /// One facts read at a time per (host, user): starts that miss the cache
    /// together wait for the first read instead of each running their own.
    facts_reads: Arc<Mutex<FactsReads>>,
    /// See [`Spawner::set_hub_api`].
    hub_api: Arc<Mutex<Option<String>>>,
    /// Run ids [`Spawner::clean_up_later`] is working on.
    cleaning: Arc<Mutex<std::collections::HashSet<String>>>,
    /// See [`Spawner::set_ready_wait_on_host`].
    ready_on_host: Arc<std::sync::atomic::AtomicBool>,
}

impl Spawner {
    /// A spawner with its own connection pool. Call inside a tokio runtime.
    pub fn new(config: Config) -> Result<Spawner> {
        config.validate()?;
        if let Some(v) = config.launch_settle {
            tracing::warn!(
                launch_settle = v,
                "launch_settle is deprecated and ignored: a start now waits until the server listens on its port or exits (ready_timeout, or what is left of the hub's start_timeout)"
            );
        }
        let pool = Pool::new(config.pool_options());
        for h in &config.hosts {
            metrics::name_host(crate::ssh::host_label(&h.address, h.port), h.display_name());
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
            facts_reads: Arc::new(Mutex::new(HashMap::new())),
            hub_api: Arc::new(Mutex::new(None)),
            cleaning: Arc::new(Mutex::new(Default::default())),
            ready_on_host: Arc::new(std::sync::atomic::AtomicBool::new(false)),
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

    fn command(&self, text: impl Into<String>) -> Command {
        Command::new(text).timeout(Config::duration(self.config.command_timeout))
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

    /// Will poll and stop act on this state? It must be valid, and name the
    /// remote user the configuration maps its hub user to: a forged or
    /// corrupted state naming another login would let one user's state act
    /// as another's. (The remote scripts then only ever touch that login's
    /// own processes.)
    pub fn check_state(&self, state: &ServerState) -> Result<()> {
        state.validate()?;
        state.check_dir_layout(&self.config.state_dir)?;
        let refuse = |reason: String| Error::Invalid {
            what: format!("server state of {:?}", state.username),
            reason: format!("{reason}; refusing to act on it"),
        };
        if !self
            .config
            .hosts
            .iter()
            .any(|h| h.address == state.address && h.port == state.ssh_port)
        {
            return Err(refuse(format!(
                "names {}:{}, which is not a configured host",
                state.address, state.ssh_port
            )));
        }
        if let Some(to) = &state.hub_forward_to {
            if !self.config.hub_tunnel {
                return Err(refuse(format!(
                    "has a hub tunnel to {to:?}, but hub_tunnel is off"
                )));
            }
            let known = self.hub_api.lock().ok().and_then(|h| h.clone());
            if let Some(api) = known.filter(|api| api != to) {
                return Err(refuse(format!(
                    "has a hub tunnel to {to:?}, but the hub API is at {api:?}"
                )));
            }
        }
        let expected = self.config.remote_user_for(&state.username)?;
        if state.remote_user != expected {
            return Err(Error::Invalid {
                what: format!("server state of {:?}", state.username),
                reason: format!(
                    "names remote user {:?}, but the configuration maps {:?} to {:?}; refusing to act on it",
                    state.remote_user, state.username, expected
                ),
            });
        }
        Ok(())
    }

    /// The hub API address (`host:port`) hub tunnels carry to: a state whose
    /// hub tunnel names another address is refused by
    /// [`Spawner::check_state`], so a forged state cannot make the hub carry
    /// connections to an address of its choosing.
    pub fn set_hub_api(&self, to: &str) -> Result<()> {
        check_host_port(to).map_err(|r| Error::Invalid {
            what: format!("hub API address {to:?}"),
            reason: r,
        })?;
        if let Ok(mut h) = self.hub_api.lock() {
            *h = Some(to.to_string());
        }
        Ok(())
    }

    /// `script` behind the host-side check that the state's directory is
    /// `$HOME/state_dir/run_id` of the login (see [`crate::plan::state::host_guard`]).
    fn guarded(&self, state: &ServerState, script: String) -> Result<String> {
        Ok(crate::plan::state::host_guard(state, &self.config.state_dir)? + &script)
    }

    fn state_target(&self, state: &ServerState) -> Result<Target> {
        self.check_state(state)?;
        Ok(Target::new(
            &state.address,
            &state.remote_user,
            self.config.identity_for(&state.username)?,
        )
        .port(state.ssh_port))
    }

    /// Read one host's facts (one exec), optionally checking the command.
    pub async fn host_facts(
        &self,
        target: &Target,
        command_check: Option<(&[String], &str)>,
    ) -> Result<HostFacts> {
        let out = self
            .pool
            .exec(
                target,
                &self
                    .command("/bin/sh -s")
                    .stdin(hosts::facts_script(command_check)),
            )
            .await?
            .check(target)?;
        hosts::parse_facts(&String::from_utf8_lossy(&out.stdout))
    }

    async fn cached_facts(&self, host: &HostConfig, target: &Target) -> Result<HostFacts> {
        let down = || -> Result<()> {
            let status = self.pool.health().status(&target.host_label());
            if status.takes_servers() {
                return Ok(());
            }
            Err(Error::NoHost {
                detail: format!(
                    "{} is {}",
                    host.display_name(),
                    status.describe(std::time::SystemTime::now())
                ),
            })
        };
        down()?;
        let key = (host.display_name().to_string(), target.user.clone());
        let max_age = Config::duration(self.config.facts_cache);
        let cached = || -> Option<HostFacts> {
            let cache = self.facts.lock().ok()?;
            let (at, f) = cache.get(&key)?;
            (at.elapsed() < max_age).then(|| f.clone())
        };
        if let Some(f) = cached() {
            return Ok(f);
        }
        if max_age.is_zero() {
            return self.host_facts(target, None).await;
        }
        let read_lock = self
            .facts_reads
            .lock()
            .map(|mut m| m.entry(key.clone()).or_default().clone())
            .unwrap_or_default();
        let _reading = read_lock.lock().await;
        // Another start may have read them while this one waited, or found
        // the host down.
        if let Some(f) = cached() {
            return Ok(f);
        }
        down()?;
        let f = self.host_facts(target, None).await?;
        if let Ok(mut cache) = self.facts.lock() {
            cache.insert(key, (Instant::now(), f.clone()));
        }
        Ok(f)
    }

    /// Live figures of the hosts named in `names` (all hosts when empty), for
    /// the options form: one exec per host, all at once, each waited for at
    /// most `wait` (a host that does not answer by then is shown as not
    /// answering). Results, failures included, are shared for `max_age`:
    /// pages opened together cost one exec per host, not one per page.
    pub async fn host_status(
        &self,
        username: &str,
        names: &[String],
        max_age: Duration,
        wait: Duration,
    ) -> Result<Vec<(String, std::result::Result<HostFacts, String>)>> {
        check_username(username)?;
        let hosts: Vec<&HostConfig> = self
            .config
            .hosts
            .iter()
            .filter(|h| names.is_empty() || names.iter().any(|n| n == h.display_name()))
            .collect();
        let targets = hosts
            .iter()
            .map(|h| self.target(h, username))
            .collect::<Result<Vec<_>>>()?;
        let results = futures_join(hosts.iter().zip(&targets).map(|(h, t)| async move {
            // A host marked down is shown as such, not asked again.
            let status = self.pool.health().status(&t.host_label());
            if !status.takes_servers() {
                return Err(status.describe(std::time::SystemTime::now()));
            }
            let key = (h.display_name().to_string(), t.user.clone());
            let cell = match self.status.lock() {
                Ok(mut cache) => {
                    cache.retain(|_, (at, _)| at.elapsed() < max_age);
                    cache
                        .entry(key)
                        .or_insert_with(|| (Instant::now(), StatusCell::default()))
                        .1
                        .clone()
                }
                Err(_) => StatusCell::default(),
            };
            cell.get_or_init(|| async {
                match tokio::time::timeout(wait, self.host_facts(t, None)).await {
                    Ok(Ok(f)) => Ok(f),
                    Ok(Err(e)) => Err(short_reason(&e)),
                    Err(_) => Err(format!("no answer within {wait:?}")),
                }
            })
            .await
            .clone()
        }))
        .await;
        Ok(hosts
            .iter()
            .map(|h| h.display_name().to_string())
            .zip(results)
            .collect())
    }

    /// Count a new server against the cached facts, so spawns that arrive
    /// together within the cache time spread out instead of piling onto the
    /// host that looked best a moment ago.
    fn reserve(&self, host: &str, user: &str, port: u16, mem: Option<u64>) {
        if let Ok(mut cache) = self.facts.lock() {
            // Every user's cached view of this host gets the new server.
            for ((h, u), (_, f)) in cache.iter_mut() {
                if h == host {
                    f.servers += 1;
                    f.mem_available = f.mem_available.saturating_sub(mem.unwrap_or(0));
                    if u == user {
                        f.listening.insert(port);
                    }
                }
            }
        }
    }

    /// A free port on `host`, claimed under one lock: starts that run at once
    /// (each with its own, possibly equally old, view of the host) never get
    /// the same port, even before their servers listen.
    fn claim_port(
        &self,
        host: &str,
        listening: &BTreeSet<u16>,
        tried: &BTreeSet<u16>,
    ) -> Option<u16> {
        let Ok(mut claims) = self.claims.lock() else {
            return choose_port(self.config.port_range, listening, tried, &mut rand::rng());
        };
        let now = Instant::now();
        let mine = claims.entry(host.to_string()).or_default();
        mine.retain(|_, at| now.duration_since(*at) < PORT_CLAIM);
        let mut avoid = tried.clone();
        avoid.extend(mine.keys().copied());
        let port = choose_port(self.config.port_range, listening, &avoid, &mut rand::rng())?;
        mine.insert(port, now);
        Some(port)
    }

    /// The facts of `hosts` for a host choice, each `Err` with why it cannot
    /// be considered. Hosts marked down ([`crate::plan::health`]) are not
    /// asked. The others are asked all at once; once one has answered, the
    /// rest are waited for only [`health::straggler_wait`] longer (unless the
    /// user chose the host): a host that stopped answering a moment ago
    /// costs this spawn a second or two, not the connect timeout. Reads
    /// not waited for go on in the background and fill the cache (or mark
    /// the host down) for the spawns that follow.
    async fn read_facts_for_choice(
        &self,
        hosts: &[&HostConfig],
        targets: &[Target],
        pinned: bool,
        progress: &Progress,
    ) -> Vec<std::result::Result<HostFacts, String>> {
        let now = std::time::SystemTime::now();
        let mut facts: Vec<Option<std::result::Result<HostFacts, String>>> =
            vec![None; hosts.len()];
        let mut down = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let status = self.pool.health().status(&t.host_label());
            if !status.takes_servers() {
                let why = status.describe(now);
                down.push(format!("{} is {why}", hosts[i].display_name()));
                facts[i] = Some(Err(why));
            }
        }
        let asked = facts.iter().filter(|f| f.is_none()).count();
        let skipped = if down.is_empty() {
            String::new()
        } else {
            format!("; not asking {}", down.join("; "))
        };
        progress.emit(
            5,
            match asked {
                0 => format!("No host to connect to{skipped}"),
                1 => format!(
                    "Connecting to {} to check its free memory and load{skipped}",
                    hosts[facts.iter().position(|f| f.is_none()).unwrap_or(0)].display_name()
                ),
                n => {
                    format!("Connecting to {n} hosts to check their free memory and load{skipped}")
                }
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, (h, t)) in hosts.iter().zip(targets).enumerate() {
            if facts[i].is_some() {
                continue;
            }
            let (me, host, target, tx) = (self.clone(), (*h).clone(), t.clone(), tx.clone());
            // A task of its own, so that a read not waited for still ends
            // (and caches its facts or marks the host down).
            tokio::spawn(
                async move {
                    let got = me.cached_facts(&host, &target).await;
                    let _ = tx.send((i, got));
                }
                .in_current_span(),
            );
        }
        drop(tx);
        let started = Instant::now();
        let mut until: Option<tokio::time::Instant> = None;
        let mut pending = asked;
        while pending > 0 {
            let next = match until {
                Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => rx.recv().await,
            };
            let Some((i, got)) = next else { break };
            pending -= 1;
            if got.is_ok() && until.is_none() && !pinned {
                until =
                    Some(tokio::time::Instant::now() + health::straggler_wait(started.elapsed()));
            }
            facts[i] = Some(got.map_err(|e| short_reason(&e)));
        }
        let waited = started.elapsed();
        facts
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.unwrap_or_else(|| {
                    tracing::info!(host = hosts[i].display_name(),
                        "no answer within {waited:.1?} while other hosts answered; choosing among those");
                    Err(format!("no answer within {:.1} s while other hosts answered", waited.as_secs_f64()))
                })
            })
            .collect()
    }

    /// Choose host and port: every eligible host's facts are read at once
    /// (cached briefly), hosts that do not fit are passed over, and when none
    /// fits the error lists every host and why.
    #[tracing::instrument(name = "server", skip_all, fields(user = %req.username, server = %req.server_name, host = tracing::field::Empty))]
    pub async fn prepare(&self, req: &SpawnRequest, progress: &Progress) -> Result<Prepared> {
        let started = Instant::now();
        let prepared = self.prepare_inner(req, progress, started).await;
        if let Err(e) = &prepared {
            metrics::spawn_done(
                req.host.as_deref().unwrap_or("-"),
                e.kind(),
                started.elapsed(),
            );
        }
        prepared
    }

    async fn prepare_inner(
        &self,
        req: &SpawnRequest,
        progress: &Progress,
        started: Instant,
    ) -> Result<Prepared> {
        check_username(&req.username)?;
        let hosts: Vec<&HostConfig> = self
            .config
            .hosts
            .iter()
            .filter(|h| {
                req.host
                    .as_deref()
                    .is_none_or(|want| want == h.display_name())
            })
            .filter(|h| !req.exclude.iter().any(|x| x == h.display_name()))
            .collect();
        if hosts.is_empty() {
            return Err(Error::NoHost {
                detail: match &req.host {
                    Some(h) if self.config.host(h).is_none() => {
                        format!("no host named {h:?} is configured")
                    }
                    _ => "no host left to try".into(),
                },
            });
        }
        let targets = hosts
            .iter()
            .map(|h| self.target(h, &req.username))
            .collect::<Result<Vec<_>>>()?;
        let facts = self
            .read_facts_for_choice(&hosts, &targets, req.host.is_some(), progress)
            .await;
        let candidates: Vec<Candidate> = hosts
            .iter()
            .zip(&facts)
            .map(|(h, f)| Candidate {
                name: h.display_name(),
                max_servers: h.max_servers,
                facts: f.as_ref().map_err(String::clone),
            })
            .collect();
        let rr = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let order = hosts::rank(
            &candidates,
            &req.requirements,
            self.config.host_selection,
            rr,
            &mut rand::rng(),
        )
        .map_err(|e| match (&req.host, e) {
            // The user pinned this host: say so, and do not move the server.
            (Some(h), Error::NoHost { detail }) => Error::NoHost {
                detail: format!("{h}, the host you chose, cannot take the server now ({detail}); choose another host or let the spawner choose"),
            },
            (_, e) => e,
        })?;
        let fit = order.len();
        for i in order {
            let (host, Ok(f)) = (hosts[i], &facts[i]) else {
                continue;
            };
            let Some(port) = self.claim_port(host.display_name(), &f.listening, &BTreeSet::new())
            else {
                continue;
            };
            tracing::Span::current().record("host", host.display_name());
            let run_id = new_run_id();
            let rest = self.config.state_dir.trim_start_matches("~/");
            let base = format!("{}/{rest}", f.home.trim_end_matches('/'));
            let state = ServerState {
                version: STATE_VERSION,
                username: req.username.clone(),
                server_name: req.server_name.clone(),
                host: host.display_name().to_string(),
                address: host.address.clone(),
                ssh_port: host.port,
                remote_user: targets[i].user.clone(),
                port,
                dir: format!("{}/{run_id}", base.trim_end_matches('/')),
                run_id,
                pid: None,
                pgid: None,
                start_time: None,
                uid: None,
                boot_id: None,
                enforcement: None,
                tunnel_port: None,
                hub_forward_port: None,
                hub_forward_to: None,
                extra: Default::default(),
            };
            self.reserve(
                host.display_name(),
                &targets[i].user,
                port,
                req.requirements.mem_guarantee,
            );
            let others: Vec<String> = candidates
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| match &c.facts {
                    Ok(f) => format!("{} {}", c.name, plural(f.servers, "server")),
                    Err(e) => format!("{} {e}", c.name),
                })
                .collect();
            let why = if req.host.is_some() {
                "as you asked".to_string()
            } else {
                match self.config.host_selection {
                    _ if fit == 1 => "the only host that fits".to_string(),
                    Strategy::Random => format!("at random among the {fit} hosts that fit"),
                    Strategy::RoundRobin => format!("next in turn among the {fit} hosts that fit"),
                    Strategy::LeastLoaded => {
                        format!("the least busy of the {fit} hosts that fit")
                    }
                }
            };
            progress.emit(
                20,
                format!(
                    "Host {} chosen, {why} ({} free, load {:.1} on {} cores, {}){}; port {port}",
                    host.display_name(),
                    hosts::human_bytes(f.mem_available),
                    f.load1,
                    f.cpus,
                    plural(f.servers, "server"),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!("; others: {}", others.join(", "))
                    }
                ),
            );
            let mut prologue = self.config.prologue.clone();
            prologue.extend(host.prologue.iter().cloned());
            return Ok(Prepared {
                state,
                facts: f.clone(),
                tried_ports: BTreeSet::from([port]),
                limits: req.limits,
                prologue,
                started,
            });
        }
        Err(Error::NoHost {
            detail: format!(
                "no free port in {}-{} on any host that fits",
                self.config.port_range.start, self.config.port_range.end
            ),
        })
    }

    /// Another free port on the same host after [`Error::PortTaken`].
    pub fn repick_port(&self, prepared: &mut Prepared) -> Result<u16> {
        if prepared.tried_ports.len() > self.config.port_retries as usize {
            return Err(Error::NoHost {
                detail: format!(
                    "{}: {} ports in a row were taken before the server could start",
                    prepared.state.host,
                    prepared.tried_ports.len()
                ),
            });
        }
        let port = self
            .claim_port(
                &prepared.state.host,
                &prepared.facts.listening,
                &prepared.tried_ports,
            )
            .ok_or_else(|| Error::NoHost {
                detail: format!("{}: no free port left in the range", prepared.state.host),
            })?;
        prepared.tried_ports.insert(port);
        prepared.state.port = port;
        Ok(port)
    }

    /// Upload key, certificate and CA into the per-server directory (0600)
    /// and return their remote paths.
    #[tracing::instrument(name = "server", skip_all, fields(user = %prepared.state.username, server = %prepared.state.server_name, host = %prepared.state.host))]
    pub async fn upload_certs(
        &self,
        prepared: &Prepared,
        key: Vec<u8>,
        cert: Vec<u8>,
        ca: Vec<u8>,
        progress: &Progress,
    ) -> Result<CertPaths> {
        let dir = format!("{}/certs", prepared.state.dir);
        let paths = CertPaths {
            keyfile: format!("{dir}/server.key"),
            certfile: format!("{dir}/server.crt"),
            cafile: format!("{dir}/ca.crt"),
        };
        let files = vec![
            Upload {
                path: paths.keyfile.clone(),
                contents: key,
                mode: 0o600,
            },
            Upload {
                path: paths.certfile.clone(),
                contents: cert,
                mode: 0o600,
            },
            Upload {
                path: paths.cafile.clone(),
                contents: ca,
                mode: 0o600,
            },
        ];
        let target = self.state_target(&prepared.state)?;
        self.pool
            .upload(
                &target,
                &files,
                Config::duration(self.config.command_timeout),
            )
            .await?;
        progress.emit(
            35,
            format!(
                "Certificates copied to {} (readable only by {})",
                prepared.state.host, prepared.state.remote_user
            ),
        );
        Ok(paths)
    }

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
        let target = self.state_target(state)?;
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

    async fn launch_inner(
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
        };
        let script = script::launch_script(&spec)?;
        let launch_command = script::launch_command(&spec)?;
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
            Some(script::PORT_TAKEN) => {
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
        let launched = script::parse_launch(&stdout)?;
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
            script::launch_listening(&stdout)
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
    async fn probe_port(&self, target: &Target, state: &ServerState) -> Result<PortProbe> {
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

    /// Hub tunnel: ask sshd on the prepared host to listen on its loopback and
    /// carry connections to the hub API at `to` (`host:port`); returns the
    /// port on the host, which the server's environment must point at.
    /// Asking again for the same spawn returns the same port.
    #[tracing::instrument(name = "server", skip_all, fields(user = %prepared.state.username, server = %prepared.state.server_name, host = %prepared.state.host))]
    pub async fn open_hub_forward(&self, prepared: &mut Prepared, to: &str) -> Result<u16> {
        check_host_port(to).map_err(|r| Error::Invalid {
            what: format!("hub API address {to:?}"),
            reason: r,
        })?;
        let run_id = prepared.state.run_id.clone();
        if let (Some(port), Some(old)) = (
            self.hub_forward_port(&run_id),
            prepared.state.hub_forward_to.as_deref(),
        ) {
            if old == to {
                return Ok(port);
            }
        }
        let target = self.state_target(&prepared.state)?;
        let fwd = RemoteForward::open(self.pool.clone(), target, 0, to.to_string()).await?;
        let port = fwd.port();
        self.put_tunnel(&run_id, None, Some(fwd));
        prepared.state.hub_forward_port = Some(port);
        prepared.state.hub_forward_to = Some(to.to_string());
        Ok(port)
    }

    fn hub_forward_port(&self, run_id: &str) -> Option<u16> {
        self.tunnels
            .lock()
            .ok()?
            .get(run_id)?
            .hub
            .as_ref()
            .map(|f| f.port())
    }

    fn put_tunnel(&self, run_id: &str, local: Option<LocalForward>, hub: Option<RemoteForward>) {
        if let Ok(mut map) = self.tunnels.lock() {
            let t = map.entry(run_id.to_string()).or_default();
            if local.is_some() {
                t.local = local;
            }
            if hub.is_some() {
                t.hub = hub;
            }
        }
    }

    /// Close a server's tunnels (dropped outside the lock).
    fn close_tunnel(&self, run_id: &str, local: bool, hub: bool) {
        let mut closing = ServerTunnels::default();
        if let Ok(mut map) = self.tunnels.lock() {
            if let Some(t) = map.get_mut(run_id) {
                if local {
                    closing.local = t.local.take();
                }
                if hub {
                    closing.hub = t.hub.take();
                }
                if t.local.is_none() && t.hub.is_none() {
                    map.remove(run_id);
                }
            }
        }
        drop(closing);
    }

    /// Open the tunnels a state records and this process does not have yet
    /// (after a hub restart), on the same ports: the hub's proxy routes and
    /// the server's environment name them. The hub calls it after each poll
    /// that found the server running; one-shot tools (the CLI) do not.
    ///
    /// A local port taken meanwhile by another program is replaced by a free
    /// one ([`Spawner::local_tunnel_port`] tells which): the hub moves its
    /// route there (JupyterHub asks `get_url()` after a restart's poll), so the
    /// server is neither lost nor left running unknown to the hub.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn ensure_tunnels(&self, state: &ServerState) -> Result<()> {
        let (has_local, has_hub) = match self.tunnels.lock() {
            Ok(map) => map
                .get(&state.run_id)
                .map(|t| (t.local.is_some(), t.hub.is_some()))
                .unwrap_or((false, false)),
            Err(_) => (false, false),
        };
        let want_local = state.tunnel_port.filter(|_| !has_local);
        let want_hub = match (&state.hub_forward_port, &state.hub_forward_to, has_hub) {
            (Some(p), Some(to), false) => Some((*p, to.clone())),
            _ => None,
        };
        if want_local.is_none() && want_hub.is_none() {
            return Ok(());
        }
        let target = self.state_target(state)?;
        if let Some(port) = want_local {
            let bind = |port| {
                LocalForward::bind(
                    self.pool.clone(),
                    target.clone(),
                    port,
                    "127.0.0.1".into(),
                    state.port,
                )
            };
            let fwd = match bind(port).await {
                Ok(fwd) => {
                    tracing::info!(host = %state.host, run = %state.run_id, port, "tunnel to the server listening again");
                    fwd
                }
                Err(taken) => {
                    let fwd = bind(0).await?;
                    tracing::warn!(host = %state.host, run = %state.run_id, port, new_port = fwd.port(), "tunnel port taken by another program ({taken}); the tunnel to the server listens on another port");
                    fwd
                }
            };
            self.put_tunnel(&state.run_id, Some(fwd), None);
        }
        if let Some((port, to)) = want_hub {
            let fwd = RemoteForward::open(self.pool.clone(), target, port, to).await?;
            tracing::info!(host = %state.host, run = %state.run_id, port, "hub tunnel requested again");
            self.put_tunnel(&state.run_id, None, Some(fwd));
        }
        Ok(())
    }

    /// The local port of a server's tunnel in this process, if it has one
    /// (it differs from the state's `tunnel_port` once that was taken).
    pub fn local_tunnel_port(&self, run_id: &str) -> Option<u16> {
        self.tunnels
            .lock()
            .ok()?
            .get(run_id)?
            .local
            .as_ref()
            .map(|f| f.port())
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
                    let next = self.repick_port(&mut prepared)?;
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
                        self.abandon(
                            &prepared.state,
                            format!("launch on {host} unanswered"),
                            hooks,
                        )
                        .await;
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
    async fn abandon<H: StartHooks>(&self, state: &ServerState, why: String, hooks: &H) {
        self.close_tunnel(&state.run_id, true, true);
        hooks.abandoned(self, state.clone(), why).await;
    }

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
            for _ in 0..120 {
                match me.stop(&state).await {
                    Ok(_) => {
                        tracing::info!(host = %state.host, run = %state.run_id, "cleaned up after an abandoned start");
                        break;
                    }
                    Err(e) if e.is_unreachable() => tokio::time::sleep(Duration::from_secs(30)).await,
                    Err(e) => {
                        tracing::warn!(host = %state.host, run = %state.run_id, "cannot clean up an abandoned start: {e}");
                        break;
                    }
                }
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

    /// Fill in the pid of a server whose start was interrupted before launch
    /// reported it, from the pid file in its directory. `None`: nothing runs.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn adopt(&self, state: &ServerState) -> Result<Option<ServerState>> {
        state.validate()?;
        if state.launched() {
            return Ok(Some(state.clone()));
        }
        let target = self.state_target(state)?;
        let out = self
            .pool
            .exec(
                &target,
                &self
                    .command("/bin/sh -s")
                    .stdin(self.guarded(state, adopt::adopt_script(&state.dir, &state.run_id)?)?),
            )
            .await?
            .check(&target)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim() == adopt::NOTHING {
            return Ok(None);
        }
        let mut s = state.clone();
        s.record(script::parse_launch(&stdout)?);
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
                    return PollOutcome::Exited {
                        status: None,
                        reason: script::ExitReason::Gone,
                    }
                }
                Err(e) => return PollOutcome::Unknown(e),
            }
        };
        let (target, proc_) = match (self.state_target(&state), state.proc()) {
            (Ok(t), Some(p)) => (t, p),
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
                PollOutcome::Running
            }
            Ok(Ok(ProcStatus::Exited { status, reason })) => {
                metrics::server_gone(&state.run_id);
                PollOutcome::Exited { status, reason }
            }
            Ok(Err(e)) => PollOutcome::Unknown(e),
            Err(_) => PollOutcome::Unknown(Error::Invalid {
                what: "poll".into(),
                reason: "the poll batch was dropped".into(),
            }),
        }
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
    pub async fn stop(&self, state: &ServerState) -> Result<script::Stopped> {
        let stopped = self.stop_inner(state).await;
        self.close_tunnel(&state.run_id, true, true);
        stopped
    }

    async fn stop_inner(&self, state: &ServerState) -> Result<script::Stopped> {
        if let Ok(mut claims) = self.claims.lock() {
            if let Some(mine) = claims.get_mut(&state.host) {
                mine.remove(&state.port);
            }
        }
        let Some(state) = self.adopt(state).await? else {
            // Nothing was started: remove what prepare and certs left.
            let target = self.state_target(state)?;
            self.pool
                .exec(
                    &target,
                    &self
                        .command("/bin/sh -s")
                        .stdin(self.guarded(state, adopt::remove_dir_script(&state.dir)?)?),
                )
                .await?
                .check(&target)?;
            metrics::server_gone(&state.run_id);
            return Ok(script::Stopped::AlreadyGone);
        };
        let target = self.state_target(&state)?;
        let proc_ = state.proc().ok_or_else(|| Error::Invalid {
            what: "server state".into(),
            reason: "incomplete".into(),
        })?;
        let grace = self.config.stop_grace.ceil() as u32;
        let script = self.guarded(
            &state,
            script::stop_script(&proc_, grace, self.config.keep_log)?,
        )?;
        let cmd = Command::new("/bin/sh -s").stdin(script).timeout(
            Config::duration(self.config.command_timeout)
                .saturating_add(Duration::from_secs(u64::from(grace))),
        );
        let out = self.pool.exec(&target, &cmd).await?.check(&target)?;
        let stopped = script::parse_stop(&String::from_utf8_lossy(&out.stdout))?;
        metrics::server_gone(&state.run_id);
        if let script::Stopped::Killed { escalated: true } = stopped {
            metrics::stop_escalated(&state.host);
        }
        Ok(stopped)
    }
}

/// One row of `ssh-spawner check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostCheck {
    /// Display name.
    pub host: String,
    /// `address:port`.
    pub address: String,
    /// TCP and SSH answered.
    pub reachable: bool,
    /// `ok`, `unknown`, `changed`, `revoked` or `-` (not reached).
    pub host_key: String,
    /// `ok`, `refused` or `-`.
    pub auth: String,
    /// The single-user command was found (after the prologue).
    pub command_found: Option<bool>,
    /// Available memory in bytes.
    pub mem_available: Option<u64>,
    /// Cores.
    pub cpus: Option<u32>,
    /// One-minute load.
    pub load1: Option<f64>,
    /// Servers of all users on the host.
    pub servers: Option<usize>,
    /// How `mem_limit` / `cpu_limit` are enforced there: `systemd`,
    /// `prlimit` or `none` (see [`limits::host_summary`]).
    pub limits: Option<String>,
    /// What the admin should do so that systemd enforces the limits there.
    pub limits_advice: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// When the host does not answer: since when and why, as spawns see it
    /// (`down since 09:01:02 UTC (12 s ago): no answer within 10s`).
    pub down: Option<String>,
}

impl HostCheck {
    /// Everything an admin needs is in order.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.command_found != Some(false)
    }
}

impl Spawner {
    /// Check every host as `username`: reachable, host key, auth, command
    /// found, free memory, load, servers. Hosts are checked at once.
    pub async fn check(&self, username: &str) -> Result<Vec<HostCheck>> {
        let targets = self
            .config
            .hosts
            .iter()
            .map(|h| self.target(h, username))
            .collect::<Result<Vec<_>>>()?;
        let command = self.config.command.first().cloned().unwrap_or_default();
        let command = script::quote(&command, "command")?;
        let results = futures_join(self.config.hosts.iter().zip(&targets).map(|(h, t)| {
            let command = command.clone();
            async move {
                let mut prologue = self.config.prologue.clone();
                prologue.extend(h.prologue.iter().cloned());
                self.host_facts(t, Some((&prologue, &command))).await
            }
        }))
        .await;
        Ok(self
            .config
            .hosts
            .iter()
            .zip(targets)
            .zip(results)
            .map(|((h, t), r)| {
                let mut c = HostCheck {
                    host: h.display_name().to_string(),
                    address: t.host_label(),
                    reachable: true,
                    host_key: "ok".into(),
                    auth: "ok".into(),
                    command_found: None,
                    mem_available: None,
                    cpus: None,
                    load1: None,
                    servers: None,
                    limits: None,
                    limits_advice: None,
                    error: None,
                    down: None,
                };
                let status = self.pool.health().status(&t.host_label());
                if !status.takes_servers() {
                    c.down = Some(status.describe(std::time::SystemTime::now()));
                }
                match r {
                    Ok(f) => {
                        match limits::host_summary(self.config.enforcement, &f, &t.user) {
                            Ok((how, advice)) => (c.limits, c.limits_advice) = (Some(how), advice),
                            Err(e) => {
                                c.limits = Some("-".into());
                                c.error = Some(format!("host {}: {e}", f.hostname));
                            }
                        }
                        c.command_found = f.command_found;
                        c.mem_available = Some(f.mem_available);
                        c.cpus = Some(f.cpus);
                        c.load1 = Some(f.load1);
                        c.servers = Some(f.servers);
                    }
                    Err(e) => {
                        match &e {
                            Error::Unreachable { .. } | Error::Timeout { .. } => {
                                c.reachable = false;
                                c.host_key = "-".into();
                                c.auth = "-".into();
                            }
                            Error::HostKeyUnknown { .. } => {
                                (c.host_key, c.auth) = ("unknown".into(), "-".into())
                            }
                            Error::HostKeyChanged { .. } => {
                                (c.host_key, c.auth) = ("changed".into(), "-".into())
                            }
                            Error::HostKeyRevoked { .. } => {
                                (c.host_key, c.auth) = ("revoked".into(), "-".into())
                            }
                            Error::AuthRefused { .. } | Error::Key { .. } | Error::Agent { .. } => {
                                c.auth = "refused".into()
                            }
                            _ => {}
                        }
                        c.error = Some(e.to_string());
                    }
                }
                c
            })
            .collect())
    }

    /// Servers running on each host (all users), looked up as `username`.
    pub async fn list(&self, username: &str) -> Result<Vec<(String, Result<Vec<hosts::Listed>>)>> {
        let targets = self
            .config
            .hosts
            .iter()
            .map(|h| self.target(h, username))
            .collect::<Result<Vec<_>>>()?;
        let results = futures_join(targets.iter().map(|t| async move {
            let out = self
                .pool
                .exec(t, &self.command(hosts::list_script()))
                .await?
                .check(t)?;
            Ok(hosts::parse_list(&String::from_utf8_lossy(&out.stdout)))
        }))
        .await;
        Ok(self
            .config
            .hosts
            .iter()
            .map(|h| h.display_name().to_string())
            .zip(results)
            .collect())
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
            let script = script::poll_script(&procs)?;
            let out = pool
                .exec(&target, &cmd.clone().stdin(script))
                .await?
                .check(&target)?;
            script::parse_poll(&String::from_utf8_lossy(&out.stdout), &procs)
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

/// [`Error::ServerExited`] from a launch script's (or the ready check's)
/// failure report, `None` when `stdout` is not one.
fn server_exited(host: &str, stdout: &str) -> Option<Error> {
    let (status, log_tail) = script::parse_launch_failure(stdout)?;
    Some(Error::ServerExited {
        host: host.to_string(),
        status: status
            .map(|s| format!("status {s}"))
            .unwrap_or_else(|| "unknown status".into()),
        log_tail,
    })
}

fn short_reason(e: &Error) -> String {
    match e {
        Error::Timeout { phase, after, .. } => format!("timed out after {after:?} {phase}"),
        Error::Unreachable { reason, .. } => format!("unreachable: {reason}"),
        Error::HostKeyChanged {
            known_hosts, line, ..
        } => {
            format!("host key changed ({} line {line})", known_hosts.display())
        }
        Error::HostKeyUnknown { .. } => "host key unknown".into(),
        Error::AuthRefused { .. } => "authentication refused".into(),
        Error::NoHost { detail } => detail.clone(),
        other => other.to_string(),
    }
}

/// `1 server`, `3 servers`.
fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn new_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_names_cover_ip_and_names() {
        assert_eq!(
            alt_names("198.18.0.11", "node1", "node1"),
            vec!["IP:198.18.0.11", "DNS:node1"]
        );
        assert_eq!(
            alt_names("gpu1.lab.org", "gpu1", "GPU 1"),
            vec!["DNS:gpu1.lab.org", "DNS:gpu1"]
        );
    }

    #[tokio::test]
    async fn a_state_naming_another_login_is_refused() {
        let c: Config = toml::from_str(
            "known_hosts = \"/nonexistent\"\nkey_path = \"/keys/{username}\"\nremote_user = \"lab-{username}\"\n\
             [[hosts]]\naddress = \"198.18.0.11\"\n",
        )
        .unwrap();
        let sp = Spawner::new(c).unwrap();
        let good = crate::plan::state::decode(
            r#"{"username": "ann", "host": "h", "address": "198.18.0.11", "remote_user": "lab-ann",
                "port": 20000, "run_id": "0123456789abcdef",
                "dir": "/home/lab-ann/.jupyterhub-ssh/0123456789abcdef"}"#,
        )
        .unwrap();
        sp.check_state(&good).unwrap();
        for (user, remote) in [("ann", "lab-bob"), ("ann", "ann"), ("bob", "lab-ann")] {
            let mut bad = good.clone();
            bad.username = user.into();
            bad.remote_user = remote.into();
            let e = sp.check_state(&bad).unwrap_err().to_string();
            assert!(e.contains("refusing to act on it"), "{e}");
            assert!(e.contains(remote) && e.contains(user), "{e}");
        }
        let mut bad = good.clone();
        bad.username = "x$(id)".into();
        assert!(sp.check_state(&bad).is_err());
        // Where it runs and what it removes must match the configuration.
        let mut home = good.clone();
        home.run_id = "ann".into();
        home.dir = "/home/lab-ann".into();
        let e = sp.check_state(&home).unwrap_err().to_string();
        assert!(e.contains("/home/lab-ann"), "{e}");
        for (address, port) in [("198.18.0.99", 22), ("198.18.0.11", 2222)] {
            let mut elsewhere = good.clone();
            elsewhere.address = address.into();
            elsewhere.ssh_port = port;
            let e = sp.check_state(&elsewhere).unwrap_err().to_string();
            assert!(e.contains("not a configured host"), "{e}");
        }
        let mut hub = good.clone();
        hub.hub_forward_port = Some(40000);
        hub.hub_forward_to = Some("10.1.2.3:22".into());
        let e = sp.check_state(&hub).unwrap_err().to_string();
        assert!(e.contains("hub_tunnel is off"), "{e}");
        let c: Config = toml::from_str(
            "known_hosts = \"/nonexistent\"\nkey_path = \"/keys/{username}\"\nremote_user = \"lab-{username}\"\n\
             hub_tunnel = true\n[[hosts]]\naddress = \"198.18.0.11\"\n",
        )
        .unwrap();
        let sp = Spawner::new(c).unwrap();
        sp.set_hub_api("198.18.0.1:8081").unwrap();
        let e = sp.check_state(&hub).unwrap_err().to_string();
        assert!(e.contains("the hub API is at"), "{e}");
        hub.hub_forward_to = Some("198.18.0.1:8081".into());
        sp.check_state(&hub).unwrap();
    }

    #[tokio::test]
    async fn progress_watchers_each_get_every_event() {
        let p = Progress::new();
        p.emit(10, "a");
        let (a, b) = (p.snapshot(0), p.snapshot(0));
        assert_eq!(a, b);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.next_from(1).await })
        };
        tokio::task::yield_now().await;
        p.emit(20, "b");
        assert_eq!(
            waiter.await.unwrap(),
            vec![Event {
                progress: 20,
                message: "b".into()
            }]
        );
        p.finish();
        assert!(p.next_from(2).await.is_empty());
    }
}
