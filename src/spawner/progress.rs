//! What a spawn tells its user: the progress events every watcher reads,
//! and the short words for why a host was passed over.

use crate::error::Error;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

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
        // Host text inside a message never reaches a page or a log raw.
        let message = crate::error::printable(&message.into());
        // Logged under the spawner's own name whatever file emits it: admins
        // and the tests follow a spawn by `[ssh_spawner::spawner]` lines.
        tracing::info!(target: "ssh_spawner::spawner", progress, "{message}");
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

pub(super) fn short_reason(e: &Error) -> String {
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
pub(super) fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

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
