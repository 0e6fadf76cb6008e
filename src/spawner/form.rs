//! The options form's rows (each host's live figures, its GPUs counted as
//! placement counts them) and a submitted form checked against the rows
//! its user was shown.
//!
//! The check runs when the form is submitted, before JupyterHub starts
//! anything: a count of GPUs no host had free comes back above the form,
//! in placement's words, instead of as a failed spawn. It reads only what
//! the user was shown (no host is asked again), so the spawn's own
//! placement still has the last word.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Spawner;
use crate::error::Result;
use crate::plan::form::{self, Choice, HostLoad, HostRow};

/// The rows each user was last shown, by hub user name, with when.
pub(super) type Shown = HashMap<String, (Instant, Vec<HostRow>)>;

/// How long the rows a user was shown are checked against: a form
/// submitted later is left to placement alone (and such old rows are
/// dropped, so the map holds only the users of the last minutes).
pub const SHOWN_FOR: Duration = Duration::from_secs(15 * 60);

impl Spawner {
    /// The options form's rows for `username`: [`Spawner::host_status`]
    /// of `names` with the GPUs this hub's servers hold now, remembered for
    /// [`Spawner::refuse_form`].
    pub async fn form_rows(
        &self,
        username: &str,
        names: &[String],
        max_age: Duration,
        wait: Duration,
    ) -> Result<Vec<HostRow>> {
        let status = self.host_status(username, names, max_age, wait).await?;
        let rows: Vec<HostRow> = status
            .into_iter()
            .map(|(name, status)| HostRow {
                status: status.map(|f| HostLoad {
                    mem_available: f.mem_available,
                    load1: f.load1,
                    cpus: f.cpus,
                    servers: f.servers,
                    gpus: f.gpus,
                    held_gpus: self.held_gpus(&name),
                    gpu_busy_memory_mib: self.config.gpu_busy_memory_mib,
                }),
                name,
            })
            .collect();
        if let Ok(mut shown) = self.form_shown.lock() {
            shown.retain(|_, (at, _)| at.elapsed() < SHOWN_FOR);
            shown.insert(username.to_string(), (Instant::now(), rows.clone()));
        }
        Ok(rows)
    }

    /// Refuse `choice`, submitted by `username` through the form, when it
    /// asks for more GPUs than the hosts it may use had free in the rows
    /// the user was last shown ([`form::refuse_gpus`]). `Ok` when no rows
    /// were shown within [`SHOWN_FOR`].
    pub fn refuse_form(&self, username: &str, choice: &Choice) -> Result<()> {
        let rows = self.form_shown.lock().ok().and_then(|shown| {
            shown
                .get(username)
                .filter(|(at, _)| at.elapsed() < SHOWN_FOR)
                .map(|(_, rows)| rows.clone())
        });
        match rows {
            Some(rows) => form::refuse_gpus(&rows, choice),
            None => Ok(()),
        }
    }
}
