//! The hub's background work on its journal ([`crate::journal`]), on the
//! core's tokio runtime: the sweep of starts a dead hub launched but never
//! saved, and the retrier of pending stops.
//!
//! Both are per hub process and journal directory, whichever core asks
//! first: the run ids the database holds ([`claim`]) are the whole process's,
//! and two retriers of one directory would stop each server twice.
//!
//! - The sweep runs once, after the restarted hub has loaded every saved
//!   state (its first `start` or `poll`): each run written by a hub process
//!   that is gone and claimed by no saved state is stopped on its host.
//! - A pending stop is a server the hub has forgotten while it may still run
//!   (a stop that could not reach its host, a server reported stopped after
//!   `unreachable_grace`, a start abandoned on a host that stopped
//!   answering). It is written to `stops/` before the hub forgets the server,
//!   and retried every `pending_stop_retry`, woken when one is added, by
//!   this hub process and, after a restart, by the next one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::error::Error;
use crate::journal::{live_writers, this_process, Journal};
use crate::metrics;
use crate::plan::journal::{stops_to_retry, to_sweep, Entry};
use crate::plan::state;
use crate::plan::stop::Stopped;
use crate::spawner::Spawner;

#[derive(Default)]
struct Registry {
    /// Run ids whose state this hub process loaded from its database.
    claimed: HashSet<String>,
    /// Journal directories swept already.
    swept: HashSet<PathBuf>,
    /// The retrier of each stops directory, and what wakes it.
    retriers: HashMap<PathBuf, (tokio::task::JoinHandle<()>, watch::Sender<()>)>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The database holds this run (a saved state was loaded): the journal need
/// not, and the sweep never stops it.
pub fn claim(run_id: &str) {
    if let Ok(mut r) = registry().lock() {
        r.claimed.insert(run_id.to_string());
    }
}

/// Start the sweep of `journal` unless this process started it already.
/// Call inside the tokio runtime, once the hub has loaded every saved state.
pub fn sweep_once(sp: &Spawner, journal: &Journal, retry: Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let first = registry()
        .lock()
        .map(|mut r| r.swept.insert(journal.dir().to_path_buf()))
        .unwrap_or(false);
    if first {
        rt.spawn(sweep(sp.clone(), journal.clone(), retry));
    }
}

/// Start this process's retrier of the pending stops of `journal` unless
/// it runs; `wake`: retry now (a stop was just added). Call inside the tokio
/// runtime.
pub fn ensure_retrier(sp: &Spawner, journal: &Journal, retry: Duration, wake: bool) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let stops = journal.stops();
    let Ok(mut r) = registry().lock() else {
        return;
    };
    let running = r
        .retriers
        .get(stops.dir())
        .is_some_and(|(task, _)| !task.is_finished());
    if !running {
        let (tx, rx) = watch::channel(());
        let task = rt.spawn(retry_stops(sp.clone(), journal.clone(), retry, rx));
        r.retriers.insert(stops.dir().to_path_buf(), (task, tx));
    }
    if wake {
        if let Some((_, tx)) = r.retriers.get(stops.dir()) {
            tx.send_replace(());
        }
    }
}

/// The hub forgets a server that may still run on a host that does not
/// answer: record a pending stop (durable before this returns) and retry it
/// in the background until the host answers, across hub restarts. False if
/// it could not be recorded (then it is retried in memory only, for an
/// hour: [`Spawner::clean_up_later`]).
pub async fn stop_later(
    sp: &Spawner,
    journal: &Journal,
    state_json: String,
    why: &str,
    retry: Duration,
) -> bool {
    let stops = journal.stops();
    let span = server_span(&state_json);
    let (dir, text) = (stops.clone(), state_json.clone());
    let written = tokio::task::spawn_blocking(move || dir.write(&text, this_process()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let _in_span = span.enter();
    match written {
        Err(e) => {
            tracing::error!(
                "SSHSpawner: cannot record the pending stop ({why}) in {}: {e}; retrying in memory only (lost if the hub restarts)",
                stops.dir().display()
            );
            if let Ok(st) = state::decode(&state_json) {
                sp.clean_up_later(st);
            }
            false
        }
        Ok(run_id) => {
            tracing::warn!(
                "SSHSpawner: pending stop of run {run_id} ({why}) recorded in {}; retried every {:.0} s until its host answers",
                stops.dir().display(),
                retry.as_secs_f64()
            );
            ensure_retrier(sp, journal, retry, true);
            true
        }
    }
}

/// The span a run's lines are logged in: its hub user, server and host.
fn server_span(state_json: &str) -> tracing::Span {
    let v: serde_json::Value = serde_json::from_str(state_json).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_string();
    tracing::info_span!("server", user = %field("username"), server = %field("server_name"), host = %field("host"))
}

async fn stop_state(sp: &Spawner, state_json: &str) -> Result<Stopped, Error> {
    sp.stop(&state::decode(state_json)?).await
}

/// Every entry of `journal`, its files that are not entries, and the hub
/// processes among the writers that still run.
async fn read(journal: &Journal) -> Option<(Vec<Entry>, Vec<(PathBuf, String)>, Liveness)> {
    let j = journal.clone();
    tokio::task::spawn_blocking(move || {
        let (entries, bad) = j.read_all();
        let me = this_process();
        let alive = live_writers(&entries, me);
        (entries, bad, Liveness { me, alive })
    })
    .await
    .ok()
}

struct Liveness {
    me: crate::plan::journal::Writer,
    alive: HashSet<crate::plan::journal::Writer>,
}

async fn remove(journal: &Journal, run_id: &str) {
    let (j, r) = (journal.clone(), run_id.to_string());
    let _ = tokio::task::spawn_blocking(move || j.remove(&r)).await;
}

async fn sweep(sp: Spawner, journal: Journal, retry: Duration) {
    let Some((entries, bad, live)) = read(&journal).await else {
        tracing::error!(
            "SSHSpawner journal: the sweep of {} failed",
            journal.dir().display()
        );
        return;
    };
    for (path, why) in bad {
        tracing::error!("SSHSpawner journal: ignoring {}: {why}", path.display());
    }
    let claimed = registry()
        .lock()
        .map(|r| r.claimed.clone())
        .unwrap_or_default();
    let plan = to_sweep(entries, &claimed, live.me, &live.alive);
    for e in &plan.forget {
        remove(&journal, &e.run_id).await;
    }
    metrics::journal_swept("forgotten", plan.forget.len() as u64);
    for e in plan.stop {
        let span = server_span(&e.state);
        async {
            match stop_state(&sp, &e.state).await {
                Ok(done) => {
                    tracing::warn!(
                        "SSHSpawner journal: run {} was launched by a hub that died before saving it; stopped it ({done})",
                        e.run_id
                    );
                    remove(&journal, &e.run_id).await;
                    metrics::journal_swept("stopped", 1);
                }
                Err(err) => {
                    metrics::journal_swept("failed", 1);
                    tracing::error!(
                        "SSHSpawner journal: cannot stop orphaned run {} yet: {err}",
                        e.run_id
                    );
                    // A pending stop now, retried until the host answers;
                    // otherwise kept in the journal: the next restart tries again.
                    if err.is_unreachable()
                        && stop_later(&sp, &journal, e.state.clone(), "orphaned start", retry).await
                    {
                        remove(&journal, &e.run_id).await;
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
}

async fn retry_stops(
    sp: Spawner,
    journal: Journal,
    retry: Duration,
    mut wake: watch::Receiver<()>,
) {
    let stops = journal.stops();
    // Runs and files whose failure was logged already.
    let mut failing: HashSet<String> = HashSet::new();
    loop {
        wake.borrow_and_update();
        match read(&stops).await {
            Some(found) => retry_once(&sp, &stops, found, &mut failing).await,
            None => tracing::error!(
                "SSHSpawner: retrying the pending stops in {} failed",
                stops.dir().display()
            ),
        }
        if tokio::time::timeout(retry, wake.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // Nothing can wake it any more: wait out the interval.
            tokio::time::sleep(retry).await;
        }
    }
}

async fn retry_once(
    sp: &Spawner,
    stops: &Journal,
    (entries, bad, live): (Vec<Entry>, Vec<(PathBuf, String)>, Liveness),
    failing: &mut HashSet<String>,
) {
    for (path, why) in bad {
        if failing.insert(path.display().to_string()) {
            tracing::error!(
                "SSHSpawner: ignoring pending stop {}: {why}",
                path.display()
            );
        }
    }
    for e in stops_to_retry(entries, live.me, &live.alive) {
        let span = server_span(&e.state);
        async {
            match stop_state(sp, &e.state).await {
                // Never valid again: nothing to act on.
                Err(err) if err.kind() == "invalid" => {
                    tracing::error!(
                        "SSHSpawner: dropping the pending stop of run {}: {err}",
                        e.run_id
                    );
                    remove(stops, &e.run_id).await;
                }
                Err(err) => {
                    if failing.insert(e.run_id.clone()) {
                        tracing::warn!(
                            "SSHSpawner: pending stop of run {} not done yet ({err}); retrying",
                            e.run_id
                        );
                    }
                }
                Ok(done) => {
                    remove(stops, &e.run_id).await;
                    failing.remove(&e.run_id);
                    let host = serde_json::from_str::<serde_json::Value>(&e.state)
                        .ok()
                        .and_then(|v| v.get("host").and_then(|h| h.as_str()).map(String::from))
                        .unwrap_or_else(|| "None".into());
                    tracing::info!(
                        "SSHSpawner: finished the pending stop of run {} on {host} ({done})",
                        e.run_id
                    );
                }
            }
        }
        .instrument(span)
        .await;
    }
}
