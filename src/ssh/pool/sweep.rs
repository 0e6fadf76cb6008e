//! Closing pooled connections that have had no channel for the idle
//! timeout, in the background, and forgetting the targets left with no
//! connection and no caller (a hub that served many users over weeks would
//! otherwise keep a slot for each it ever served).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{disconnect, Inner, Slot};

/// Close connections that have had no channel for `idle_timeout`.
pub(super) async fn sweep_idle(weak: Weak<Inner>) {
    let period = match weak.upgrade() {
        Some(i) => {
            (i.opts.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = weak.upgrade() else {
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
        if let Some(inner) = weak.upgrade() {
            evict_unused(&inner);
        }
    }
}

/// Forget the slots nobody holds (the map's is the only reference, so no
/// caller waits on it or is about to) that have no connection left.
fn evict_unused(inner: &Inner) {
    if let Ok(mut map) = inner.slots.lock() {
        map.retain(|_, slot| {
            Arc::strong_count(slot) > 1 || slot.conns.try_lock().map_or(true, |c| !c.is_empty())
        });
    }
}
