//! Closing pooled connections that have had no channel for the idle
//! timeout, in the background.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{disconnect, Inner, Slot};

/// Close connections that have had no channel for `idle_timeout`.
pub(super) async fn sweep_idle(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => {
            (i.opts.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let idle = inner.opts.idle_timeout;
        let slots: Vec<Arc<Slot>> = match inner.slots.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(_) => continue,
        };
        drop(inner);
        for slot in slots {
            // Never wait behind a handshake: try again next round.
            let Ok(mut conns) = slot.conns.try_lock() else {
                continue;
            };
            let mut closing = Vec::new();
            conns.retain(|c| {
                let quiet = c
                    .last_used
                    .lock()
                    .map(|t| t.elapsed() >= idle)
                    .unwrap_or(false);
                let busy = c.in_use() > 0 || c.forwards.load(Ordering::Relaxed) > 0;
                let keep = !(c.handle.is_closed() || quiet && !busy);
                if !keep {
                    closing.push(c.clone());
                }
                keep
            });
            drop(conns);
            for conn in closing {
                tracing::debug!("closing idle SSH connection");
                disconnect(conn).await;
            }
        }
    }
}
