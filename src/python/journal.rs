//! The hub's side of a server's life that outlives one call: the journal of
//! starts in flight, the pending stops and the poll watch, as the
//! JupyterHub class awaits them ([`crate::journal`], [`crate::pending`],
//! [`crate::spawner::watch`]).

use std::sync::Arc;

use pyo3::prelude::*;

use super::{bridge, Failure};
use crate::config::Config;
use crate::journal::{this_process, Journal};
use crate::pending;
use crate::spawner::watch::{self, WatchSettings};
use crate::spawner::Spawner;

/// One hub spawner's poll state: made with the spawner's name for log lines,
/// `unreachable_grace`, `journal_dir` and `pending_stop_retry`.
#[pyclass(frozen)]
pub(super) struct Watch(Arc<watch::Watch>);

#[pymethods]
impl Watch {
    #[new]
    fn new(log_name: String, grace: f64, journal_dir: &str, retry: f64) -> Self {
        Watch(Arc::new(watch::Watch::new(WatchSettings {
            log_name,
            grace: Config::duration(grace),
            journal: Journal::new(journal_dir),
            retry: Config::duration(retry),
        })))
    }

    /// The hub loaded the server's state from its database (a restart).
    fn loaded(&self) {
        self.0.loaded();
    }

    /// The server's URL (`url`: what the hub has) as the state this watch
    /// made says: see `spawner::watch::Watch::url`.
    fn url(&self, state_json: &str, url: &str) -> String {
        self.0.url(state_json, url)
    }
}

/// The database holds this run: its journal entry is not needed, and the
/// sweep never stops it.
#[pyfunction]
pub(super) fn claim_run(run_id: &str) {
    pending::claim(run_id);
}

/// See `Core.journal_write`.
pub(super) fn write<'py>(
    py: Python<'py>,
    journal_dir: &str,
    state_json: String,
) -> PyResult<Bound<'py, PyAny>> {
    let journal = Journal::new(journal_dir);
    bridge::spawn(py, async move {
        let dir = journal.dir().display().to_string();
        tokio::task::spawn_blocking(move || journal.write(&state_json, this_process()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
            .map_err(|e| Failure::Message(format!("cannot write the start journal in {dir}: {e}")))
    })
}

/// See `Core.journal_forget`.
pub(super) fn forget(journal_dir: &str, run_ids: Vec<String>) -> PyResult<()> {
    let journal = Journal::new(journal_dir);
    bridge::runtime()?.spawn_blocking(move || {
        for run_id in run_ids {
            journal.remove(&run_id);
        }
    });
    Ok(())
}

/// See `Core.background`.
pub(super) fn background(sp: &Spawner, journal_dir: &str, retry: f64, sweep: bool) -> PyResult<()> {
    let _guard = bridge::runtime()?.enter();
    let (journal, retry) = (Journal::new(journal_dir), Config::duration(retry));
    // Before any state is checked: servers started under an earlier
    // remote_user or state_dir are still acted on.
    sp.remember(&journal);
    pending::ensure_retrier(sp, &journal, retry, false);
    if sweep {
        pending::sweep_once(sp, &journal, retry);
    }
    Ok(())
}

/// See `Core.stop_later`.
pub(super) fn stop_later<'py>(
    py: Python<'py>,
    sp: &Spawner,
    journal_dir: &str,
    state_json: String,
    why: String,
    retry: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (sp, journal, retry) = (
        sp.clone(),
        Journal::new(journal_dir),
        Config::duration(retry),
    );
    bridge::spawn(py, async move {
        Ok(pending::stop_later(&sp, &journal, state_json, &why, retry).await)
    })
}

/// See `Core.watch_poll`.
pub(super) fn poll<'py>(
    py: Python<'py>,
    sp: &Spawner,
    watch: &Watch,
    state_json: String,
) -> PyResult<Bound<'py, PyAny>> {
    let (sp, watch) = (sp.clone(), watch.0.clone());
    bridge::spawn(
        py,
        async move { Ok(watch.poll_json(&sp, state_json).await) },
    )
}
