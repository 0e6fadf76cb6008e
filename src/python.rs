//! The PyO3 bridge: what `python/ssh_spawner` awaits. Built by maturin with
//! `--features python` as the module `ssh_spawner._core`.
//!
//! Everything crosses as JSON text, plain strings, bytes and tuples, so the
//! Python side stays a thin traitlets class. Every method that touches a
//! host returns an asyncio future, run on a tokio runtime by [`bridge`]: the
//! hub's event loop is never blocked, and no tokio worker ever takes the GIL
//! (results are handed to the loop thread through a queue and a socket it
//! watches). Cancelling the future aborts the Rust task, which drops the
//! Rust future and so closes its channel (see `ssh::exec`).
//!
//! Log records from the core are queued here and drained by the Python side
//! into the hub's logger ([`logs::drain_logs`]): no tokio worker ever waits for the
//! GIL. The spawn request and the user's options are read in `options`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::layer::SubscriberExt;

use crate::config::Config;
use crate::error::Error;
use crate::plan::form;
use crate::plan::retry;
use crate::plan::state;
use crate::spawner::{self, Spawner};

mod bridge;
mod journal;
mod logs;
mod options;

use options::{parse_bounds, request_from, validate_options};

create_exception!(
    _core,
    SpawnerError,
    PyException,
    "An error from the ssh-spawner core; `.kind` names its variant."
);

/// `SpawnerError` for `e`, with `.kind` and `.unreachable` set.
fn spawner_error(py: Python<'_>, e: &Error) -> PyErr {
    let err = SpawnerError::new_err(e.to_string());
    let _ = err.value(py).setattr("kind", e.kind());
    let _ = err.value(py).setattr("unreachable", e.is_unreachable());
    err
}

/// For the synchronous methods only: they run on a Python thread that holds
/// the GIL already. Never call it from a tokio task (return a [`Failure`]).
fn py_err(e: Error) -> PyErr {
    Python::attach(|py| spawner_error(py, &e))
}

/// Why an async call failed, as plain Rust data: a tokio task hands it
/// over as is, and it becomes a `SpawnerError` on the event-loop thread.
enum Failure {
    /// An error of the core (`.kind` and `.unreachable` are set from it).
    Core(Error),
    /// Anything else, as its message.
    Message(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Core(e)
    }
}

impl Failure {
    fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Core(e) => spawner_error(py, &e),
            Failure::Message(m) => SpawnerError::new_err(m),
        }
    }
}

/// (calls spawned, results handed over by tokio tasks, results set on
/// asyncio futures), counted since the module was loaded.
#[pyfunction]
fn bridge_stats() -> (u64, u64, u64) {
    bridge::stats()
}

/// Progress events of one spawn; each watcher reads with its own cursor.
#[pyclass(frozen)]
struct Progress(Arc<spawner::Progress>);

#[pymethods]
impl Progress {
    #[new]
    fn new() -> Self {
        Progress(spawner::Progress::new())
    }

    /// Events from `cursor` on, waiting for one; `[]` once finished.
    fn next<'py>(&self, py: Python<'py>, cursor: usize) -> PyResult<Bound<'py, PyAny>> {
        let p = self.0.clone();
        bridge::spawn(py, async move {
            Ok(p.next_from(cursor)
                .await
                .into_iter()
                .map(|e| (e.progress, e.message))
                .collect::<Vec<_>>())
        })
    }

    /// Events from `cursor` on, without waiting.
    fn snapshot(&self, cursor: usize) -> Vec<(u8, String)> {
        self.0
            .snapshot(cursor)
            .into_iter()
            .map(|e| (e.progress, e.message))
            .collect()
    }

    /// Record an event from the Python side.
    fn emit(&self, progress: u8, message: String) {
        self.0.emit(progress, message);
    }

    /// No more events.
    fn finish(&self) {
        self.0.finish();
    }
}

/// A host and port chosen for one spawn.
#[pyclass(frozen)]
struct Prepared(Arc<Mutex<spawner::Prepared>>);

impl Prepared {
    fn get(&self) -> PyResult<spawner::Prepared> {
        self.0
            .lock()
            .map(|p| p.clone())
            .map_err(|_| SpawnerError::new_err("prepared spawn state is poisoned"))
    }
}

#[pymethods]
impl Prepared {
    /// The state so far, as JSON (save it before launching).
    #[getter]
    fn state(&self) -> PyResult<String> {
        state::encode(&self.get()?.state).map_err(py_err)
    }
    /// Host display name.
    #[getter]
    fn host(&self) -> PyResult<String> {
        Ok(self.get()?.state.host)
    }
    /// Address the hub reaches the server at.
    #[getter]
    fn address(&self) -> PyResult<String> {
        Ok(self.get()?.state.address)
    }
    /// Chosen port.
    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.get()?.state.port)
    }
    /// Alt names for the server's certificate.
    #[getter]
    fn alt_names(&self) -> PyResult<Vec<String>> {
        Ok(self.get()?.alt_names())
    }
}

/// One step of a start for the hub to act on: `kind` "launching" (journal
/// `state` before its launch, then call `done`) or "abandoned" (the launch
/// of `state` may have reached a host that did not answer: stop it later;
/// `why` says which).
#[pyclass(frozen)]
struct Step {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    state: String,
    #[pyo3(get)]
    why: String,
    ack: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
}

#[pymethods]
impl Step {
    /// The hub has acted on the step; `error`: it could not (ends the start).
    #[pyo3(signature = (error=None))]
    fn done(&self, error: Option<String>) {
        if let Some(tx) = self.ack.lock().ok().and_then(|mut a| a.take()) {
            let _ = tx.send(error.map_or(Ok(()), Err));
        }
    }
}

/// How long a launch waits for the hub to record its state.
const RECORD_WAIT: Duration = Duration::from_secs(60);

/// The steps of one start, read by the hub while it awaits `Core.start`.
/// `next()` returns `None` once the start is over.
#[pyclass(frozen)]
struct StartSteps {
    tx: Mutex<Option<mpsc::UnboundedSender<Step>>>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Step>>>,
}

impl StartSteps {
    fn take(&self) -> PyResult<StepHooks> {
        self.tx
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .map(StepHooks)
            .ok_or_else(|| SpawnerError::new_err("these start steps were used already"))
    }
}

#[pymethods]
impl StartSteps {
    #[new]
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        StartSteps {
            tx: Mutex::new(Some(tx)),
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    /// The next step, waiting for one; `None` once the start is over.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let rx = self.rx.clone();
        bridge::spawn(py, async move { Ok(rx.lock().await.recv().await) })
    }
}

/// The hooks of a hub's start: each step goes to the hub's `StartSteps`.
struct StepHooks(mpsc::UnboundedSender<Step>);

impl spawner::StartHooks for StepHooks {
    async fn launching(&self, _sp: &Spawner, st: &state::ServerState) -> crate::Result<()> {
        let (ack, answered) = oneshot::channel();
        let step = Step {
            kind: "launching",
            state: state::encode(st)?,
            why: String::new(),
            ack: Mutex::new(Some(ack)),
        };
        let refused = |reason: String| Error::Invalid {
            what: "the start journal".into(),
            reason,
        };
        self.0
            .send(step)
            .map_err(|_| refused("the hub no longer reads this start's steps".into()))?;
        match tokio::time::timeout(RECORD_WAIT, answered).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(refused(reason)),
            Ok(Err(_)) => Err(refused("the hub dropped the step unanswered".into())),
            Err(_) => Err(refused(format!(
                "not written within {} s",
                RECORD_WAIT.as_secs()
            ))),
        }
    }

    async fn abandoned(&self, sp: &Spawner, st: state::ServerState, why: String) {
        let Ok(text) = state::encode(&st) else {
            sp.clean_up_later(st);
            return;
        };
        let step = Step {
            kind: "abandoned",
            state: text,
            why,
            ack: Mutex::new(None),
        };
        if self.0.send(step).is_err() {
            // Nobody on the hub's side to record it: retry in memory.
            sp.clean_up_later(st);
        }
    }
}

/// The spawner core, one per hub (its connection pool is shared by all spawns).
#[pyclass(frozen)]
struct Core(Spawner);

#[pymethods]
impl Core {
    /// Validate the configuration (JSON of the Config fields) and make the pool.
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config = Config::from_json(config_json).map_err(py_err)?;
        let _guard = bridge::runtime()?.enter();
        // One claim set for all cores: see `Spawner::sharing_process_gpu_claims`.
        Spawner::new(config)
            .map(|s| Core(s.sharing_process_gpu_claims()))
            .map_err(py_err)
    }

    /// Choose host and port. `request_json`: username, server_name,
    /// mem_guarantee, cpu_guarantee, gpus, mem_limit, cpu_limit (bytes / cores), host, exclude.
    fn prepare<'py>(
        &self,
        py: Python<'py>,
        request_json: &str,
        progress: &Progress,
    ) -> PyResult<Bound<'py, PyAny>> {
        let req = request_from(request_json)?;
        let (sp, p) = (self.0.clone(), progress.0.clone());
        bridge::spawn(py, async move {
            let prepared = sp.prepare(&req, &p).await?;
            Ok(Prepared(Arc::new(Mutex::new(prepared))))
        })
    }

    /// Upload the key, certificate and CA files at these local paths; returns
    /// (keyfile, certfile, cafile) remote paths. Files are read asynchronously.
    fn upload_certs<'py>(
        &self,
        py: Python<'py>,
        prepared: &Prepared,
        key: String,
        cert: String,
        ca: String,
        progress: &Progress,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (sp, p, prep) = (self.0.clone(), progress.0.clone(), prepared.get()?);
        bridge::spawn(py, async move {
            let read = |path: String| async move {
                tokio::fs::read(&path).await.map_err(|e| {
                    Failure::Message(format!("cannot read certificate file {path}: {e}"))
                })
            };
            let (key, cert, ca) = (read(key).await?, read(cert).await?, read(ca).await?);
            let paths = sp.upload_certs(&prep, key, cert, ca, &p).await?;
            Ok((paths.keyfile, paths.certfile, paths.cafile))
        })
    }

    /// Connections held and sessions in use, by host display name (or
    /// `address:port` for a host not in this configuration): a list of
    /// (host, connections, sessions).
    fn pool_by_host(&self) -> Vec<(String, usize, usize)> {
        let names = crate::metrics::snapshot().host_names;
        self.0
            .pool()
            .stats_by_host()
            .into_iter()
            .map(|(label, c, s)| (names.get(&label).cloned().unwrap_or(label), c, s))
            .collect()
    }

    /// The hub API (its URL, `url`) hub tunnels carry to, as `host:port`
    /// (also returned): a saved state's hub tunnel is opened again to it,
    /// never to the address the state names. An address that cannot be
    /// carried to is an error only when `strict` (`hub_tunnel` is on);
    /// otherwise it is left unset and None is returned.
    fn tell_hub_api(&self, url: &str, strict: bool) -> PyResult<Option<String>> {
        // `strict`: hub_tunnel is on. Without internal_ssl its port on each
        // host carries the token in clear (docs/security.md): say so once.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if strict
            && state::hub_api_in_clear(url)
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "SSHSpawner: hub_tunnel without internal_ssl: each server's hub API calls, its token included, \
                 cross the tunnel's port on its host in clear, and a user of that host who takes the port while \
                 the hub is away receives them; set c.JupyterHub.internal_ssl = True on hosts users you do not \
                 trust share (docs/security.md, \"The hub tunnel's port on a shared host\")"
            );
        }
        let to = state::hub_api_to(url);
        match self.0.set_hub_api(&to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if strict => Err(py_err(e)),
            Err(_) => Ok(None),
        }
    }

    /// Start the command on the prepared host, retrying another port or
    /// another host as the core's one start loop decides
    /// (`Spawner::start`); returns the state JSON of the server that runs.
    /// `env`: the environment built for the prepared port (each attempt's
    /// port and hub tunnel are put in by the core). `steps` hands the hub
    /// each state before its launch and each abandoned attempt.
    /// `ready_timeout`: seconds to wait in all for the server to listen.
    /// `may_move`: false when a certificate names the prepared host.
    /// `hub_api`: open a hub tunnel to this `host:port` on each host.
    #[pyo3(signature = (prepared, request_json, env, command, progress, steps, ready_timeout, may_move, hub_api=None))]
    #[allow(clippy::too_many_arguments)]
    fn start<'py>(
        &self,
        py: Python<'py>,
        prepared: &Prepared,
        request_json: &str,
        env: Vec<(String, String)>,
        command: Vec<String>,
        progress: &Progress,
        steps: &StartSteps,
        ready_timeout: f64,
        may_move: bool,
        hub_api: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Taken first: on any error below the steps end, and a hub reading
        // them is not left waiting.
        let hooks = steps.take()?;
        let req = request_from(request_json)?;
        let (sp, p, prep) = (self.0.clone(), progress.0.clone(), prepared.get()?);
        let ready =
            Duration::try_from_secs_f64(ready_timeout.clamp(0.0, 3600.0)).unwrap_or(Duration::ZERO);
        let opts = spawner::StartOptions {
            ready_until: Some(std::time::Instant::now() + ready),
            hub_api,
            may_move,
        };
        bridge::spawn(py, async move {
            let env_for =
                |s: &state::ServerState| retry::attempt_env(&env, s.port, s.hub_forward_port);
            let st = sp
                .start(prep, &req, env_for, &command, &p, &opts, &hooks)
                .await?;
            Ok(state::encode(&st)?)
        })
    }

    /// Stop the server; returns what was done.
    fn stop<'py>(&self, py: Python<'py>, state_json: &str) -> PyResult<Bound<'py, PyAny>> {
        let st = state::decode(state_json).map_err(py_err)?;
        let sp = self.0.clone();
        bridge::spawn(py, async move {
            let done = sp.stop(&st).await?;
            Ok(done.to_string())
        })
    }

    /// Display names of the configured hosts, in configuration order.
    fn host_names(&self) -> Vec<String> {
        self.0
            .config()
            .hosts
            .iter()
            .map(|h| h.display_name().to_string())
            .collect()
    }

    /// The options form's bounds, as JSON (`plan::form::Bounds`): the hosts
    /// a user may choose (`user_hosts`, or else every configured host), each
    /// a configured host's name, and the limits; GPUs as `(user_gpus_max,
    /// gpus)`.
    fn form_bounds(
        &self,
        user_hosts: Vec<String>,
        mem_limit_max: Option<u64>,
        cpu_limit_max: Option<f64>,
        mem_limit_default: Option<u64>,
        cpu_limit_default: Option<f64>,
        gpus: (u32, u32),
    ) -> PyResult<String> {
        let (gpus_max, gpus_default) = gpus;
        let names = self.host_names();
        let hosts = if user_hosts.is_empty() {
            names.clone()
        } else {
            user_hosts
        };
        let unknown: Vec<&str> = hosts
            .iter()
            .filter(|h| !names.contains(h))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(SpawnerError::new_err(format!(
                "SSHSpawner.user_hosts: {} not in SSHSpawner.hosts (names: {})",
                unknown.join(", "),
                names.join(", ")
            )));
        }
        let bounds = form::Bounds {
            hosts,
            mem_limit_max,
            cpu_limit_max,
            mem_limit_default,
            cpu_limit_default,
            gpus_max,
            gpus_default,
        };
        serde_json::to_string(&bounds).map_err(|e| SpawnerError::new_err(e.to_string()))
    }

    /// The options form's HTML for `username`: the hosts in `bounds.hosts`
    /// with live figures and GPUs (read through the pool, shared for
    /// `max_age` seconds, each waited for at most `wait` seconds), and the
    /// memory, CPU and GPU fields the bounds allow. `current_json`: earlier
    /// options. The rows are kept for [`Core::validate_form`].
    fn options_form<'py>(
        &self,
        py: Python<'py>,
        username: String,
        bounds_json: &str,
        current_json: &str,
        max_age: f64,
        wait: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bounds = parse_bounds(bounds_json)?;
        // Earlier options that no longer validate are simply not preselected.
        let current = serde_json::from_str::<serde_json::Value>(current_json)
            .ok()
            .and_then(|v| form::fields_from_json(&v).ok())
            .and_then(|f| form::parse(&f, &bounds).ok())
            .unwrap_or_default();
        let sp = self.0.clone();
        bridge::spawn(py, async move {
            let rows = if bounds.hosts.is_empty() {
                Vec::new()
            } else {
                sp.form_rows(
                    &username,
                    &bounds.hosts,
                    Config::duration(max_age),
                    Config::duration(wait),
                )
                .await?
            };
            Ok(form::render(&rows, &bounds, &current))
        })
    }

    /// The options form `username` submitted (JSON of its fields),
    /// validated as `validate_options` does, then refused when it asks for
    /// more GPUs than any host it may use had free in the form `username`
    /// was last shown (`plan::form::refuse_gpus`); returns the choice as JSON.
    fn validate_form(
        &self,
        username: &str,
        options_json: &str,
        bounds_json: &str,
    ) -> PyResult<String> {
        let json = validate_options(options_json, bounds_json)?;
        let choice: form::Choice =
            serde_json::from_str(&json).map_err(|e| SpawnerError::new_err(e.to_string()))?;
        self.0.refuse_form(username, &choice).map_err(py_err)?;
        Ok(json)
    }

    /// Write `state_json` to the journal in `journal_dir` (durably, before
    /// its launch); returns its run id. Fails with "cannot write the start
    /// journal in DIR: why".
    fn journal_write<'py>(
        &self,
        py: Python<'py>,
        journal_dir: &str,
        state_json: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        journal::write(py, journal_dir, state_json)
    }

    /// Remove these runs' entries from the journal (in the background).
    fn journal_forget(&self, journal_dir: &str, run_ids: Vec<String>) -> PyResult<()> {
        journal::forget(journal_dir, run_ids)
    }

    /// Start, unless they run, the retrier of the pending stops in
    /// `journal_dir` (every `retry` seconds) and, with `sweep` (the hub has
    /// loaded every saved state), the sweep of the journal, once per process.
    fn background(&self, journal_dir: &str, retry: f64, sweep: bool) -> PyResult<()> {
        journal::background(&self.0, journal_dir, retry, sweep)
    }

    /// Record a pending stop of `state_json` (`why`: what happened) and retry
    /// it until its host answers; returns whether it was recorded on disk.
    fn stop_later<'py>(
        &self,
        py: Python<'py>,
        journal_dir: &str,
        state_json: String,
        why: String,
        retry: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        journal::stop_later(py, &self.0, journal_dir, state_json, why, retry)
    }

    /// What `poll()` returns for the server (None: running; else its exit
    /// status), and the state to keep: see `spawner::watch`.
    fn watch_poll<'py>(
        &self,
        py: Python<'py>,
        watch: &journal::Watch,
        state_json: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        journal::poll(py, &self.0, watch, state_json)
    }
}

/// The core's option names (`Config`'s fields) and those the JupyterHub
/// class does not send, each with why: `(names, [(name, why)])`.
#[pyfunction]
fn config_fields() -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    (
        Config::field_names().to_vec(),
        crate::config::NOT_FROM_HUB.to_vec(),
    )
}

/// The metric families to export now (see `metrics::families`); `pool`:
/// (host, connections, sessions) of every core's pool.
#[pyfunction]
fn metric_families(pool: Vec<(String, usize, usize)>) -> Vec<crate::metrics::families::Family> {
    crate::metrics::families::families(&crate::metrics::snapshot(), &pool)
}

/// The `ssh_spawner._core` module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Route the core's tracing events into the queue once per process.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(logs::QueueLayer),
    );
    m.add("SpawnerError", m.py().get_type::<SpawnerError>())?;
    m.add_class::<Core>()?;
    m.add_class::<Prepared>()?;
    m.add_class::<Progress>()?;
    m.add_class::<StartSteps>()?;
    m.add_class::<Step>()?;
    m.add_class::<journal::Watch>()?;
    m.add_function(wrap_pyfunction!(journal::claim_run, m)?)?;
    m.add_function(wrap_pyfunction!(logs::drain_logs, m)?)?;
    m.add_function(wrap_pyfunction!(validate_options, m)?)?;
    m.add_function(wrap_pyfunction!(metric_families, m)?)?;
    m.add_function(wrap_pyfunction!(config_fields, m)?)?;
    m.add_function(wrap_pyfunction!(bridge_stats, m)?)?;
    Ok(())
}
