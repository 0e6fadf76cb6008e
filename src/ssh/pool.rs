//! The connection pool: one authenticated connection carries many channels.
//!
//! Keyed by [`Target`] (address, port, remote user, identity). For each key the
//! pool keeps up to `max_connections_per_target` connections, each allowed
//! `max_sessions_per_connection` channels at once (OpenSSH's `MaxSessions`,
//! default 10). A caller takes a session slot (a semaphore permit) on a live
//! connection; when every connection is full a new one is opened; callers that
//! arrive while a handshake is under way wait for it and share it.
//!
//! Dead connections (sshd restarted, keepalives unanswered, a channel that
//! cannot be opened) are dropped and replaced on the next use: the caller sees
//! no error if the host answers again. A server whose `MaxSessions` is lower
//! than configured refuses a channel; the pool then lowers that connection's
//! capacity and moves on. Connections with no channel open for `idle_timeout`
//! are closed by a background sweep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::Channel;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connect::{self, ConnectOptions, Connection};
use super::Target;
use crate::error::{Error, Phase, Result};

/// Pool settings. `connect` holds the per-connection bounds and host-key policy.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// How each connection is opened.
    pub connect: ConnectOptions,
    /// Channels per connection before another connection is opened.
    pub max_sessions_per_connection: usize,
    /// Connections per target at most; beyond that, callers queue.
    pub max_connections_per_target: usize,
    /// A connection with no open channel for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on opening a channel on an established connection.
    pub channel_timeout: Duration,
}

impl PoolOptions {
    /// Defaults suited to OpenSSH's defaults (MaxSessions 10, MaxStartups 10).
    pub fn new(connect: ConnectOptions) -> Self {
        PoolOptions {
            connect,
            max_sessions_per_connection: 10,
            max_connections_per_target: 4,
            idle_timeout: Duration::from_secs(300),
            channel_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters for tests, benchmarks and the admin CLI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections opened (successful handshakes) since the pool was made.
    pub handshakes: u64,
    /// Connections currently held.
    pub connections: usize,
    /// Channels currently open.
    pub channels: usize,
}

/// A cheaply clonable handle to the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    opts: PoolOptions,
    slots: Mutex<HashMap<Target, Arc<Slot>>>,
    handshakes: AtomicU64,
}

/// The connections of one target. The async mutex is held across a handshake,
/// which is how concurrent first uses end up sharing one.
#[derive(Default)]
struct Slot {
    conns: tokio::sync::Mutex<Vec<Arc<Conn>>>,
    /// The most recent failed connect, so callers that queued behind it fail
    /// with the same error instead of each waiting out their own timeout.
    last_failure: Mutex<Option<(Instant, Error)>>,
}

struct Conn {
    handle: Connection,
    sessions: Arc<Semaphore>,
    /// Permits this connection started with minus those given up because the
    /// server refused a channel.
    capacity: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Conn {
    fn in_use(&self) -> usize {
        self.capacity
            .load(Ordering::Relaxed)
            .saturating_sub(self.sessions.available_permits())
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }
}

/// An open session channel and the slot it occupies.
pub(crate) struct Lease {
    pub(crate) channel: Channel<Msg>,
    pub(crate) slot: SlotGuard,
}

/// A session slot on a pooled connection. Dropping it frees the slot.
pub(crate) struct SlotGuard {
    conn: Arc<Conn>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.conn.touch();
    }
}

impl Pool {
    /// Make a pool. When called inside a tokio runtime, a background task
    /// closes idle connections; it ends when the last handle is dropped.
    pub fn new(opts: PoolOptions) -> Pool {
        let inner = Arc::new(Inner {
            opts,
            slots: Mutex::new(HashMap::new()),
            handshakes: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep_idle(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// The settings this pool was made with.
    pub fn options(&self) -> &PoolOptions {
        &self.inner.opts
    }

    /// Counters across every target.
    pub fn stats(&self) -> PoolStats {
        let mut stats = PoolStats {
            handshakes: self.inner.handshakes.load(Ordering::Relaxed),
            ..Default::default()
        };
        for slot in self.slots() {
            if let Ok(conns) = slot.conns.try_lock() {
                stats.connections += conns.len();
                stats.channels += conns.iter().map(|c| c.in_use()).sum::<usize>();
            }
        }
        stats
    }

    /// Close every connection now (e.g. at hub shutdown).
    pub async fn close_all(&self) {
        for slot in self.slots() {
            let conns = std::mem::take(&mut *slot.conns.lock().await);
            for conn in conns {
                disconnect(conn).await;
            }
        }
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        match self.inner.slots.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    fn slot(&self, target: &Target) -> Arc<Slot> {
        match self.inner.slots.lock() {
            Ok(mut map) => map.entry(target.clone()).or_default().clone(),
            // A poisoned map only means another thread panicked mid-insert;
            // a private slot still works, it just is not shared.
            Err(_) => Arc::new(Slot::default()),
        }
    }

    /// Open a session channel to `target`, reusing a pooled connection when one
    /// has room. A dead pooled connection is replaced transparently once.
    pub(crate) async fn open_session(&self, target: &Target) -> Result<Lease> {
        let slot = self.slot(target);
        let mut replaced_dead = false;
        loop {
            let (conn, permit) = self.take_slot(target, &slot).await?;
            let opened = tokio::time::timeout(
                self.inner.opts.channel_timeout,
                conn.handle.channel_open_session(),
            )
            .await;
            match opened {
                Ok(Ok(channel)) => {
                    return Ok(Lease {
                        channel,
                        slot: SlotGuard {
                            conn,
                            _permit: permit,
                        },
                    })
                }
                Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                    // The server's MaxSessions is below ours: this connection
                    // holds fewer channels than we assumed. Give up the slot
                    // for good and try elsewhere.
                    let in_use_by_others = conn.in_use().saturating_sub(1);
                    if in_use_by_others == 0 {
                        return Err(Error::Ssh {
                            host: target.host_label(),
                            user: target.user.clone(),
                            reason: format!("the server refused to open a session: {reason:?}"),
                        });
                    }
                    permit.forget();
                    conn.capacity.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(host = %target.host_label(), user = %target.user,
                        capacity = in_use_by_others, "server refused a channel; lowering this connection's capacity");
                }
                Ok(Err(e)) => {
                    drop(permit);
                    remove(&slot, &conn).await;
                    if replaced_dead {
                        return Err(Error::Ssh {
                            host: target.host_label(),
                            user: target.user.clone(),
                            reason: e.to_string(),
                        });
                    }
                    tracing::info!(host = %target.host_label(), user = %target.user,
                        "pooled connection is dead ({e}); reconnecting");
                    replaced_dead = true;
                }
                Err(_) => {
                    // A connection that cannot open a channel in time is
                    // presumed dead: the next caller gets a fresh one.
                    drop(permit);
                    remove(&slot, &conn).await;
                    return Err(Error::Timeout {
                        host: target.host_label(),
                        user: target.user.clone(),
                        phase: Phase::Channel,
                        after: self.inner.opts.channel_timeout,
                    });
                }
            }
        }
    }

    /// Take a session slot on a live connection, opening one if needed.
    async fn take_slot(
        &self,
        target: &Target,
        slot: &Slot,
    ) -> Result<(Arc<Conn>, OwnedSemaphorePermit)> {
        let arrived = Instant::now();
        let opts = &self.inner.opts;
        let mut conns = slot.conns.lock().await;
        conns.retain(|c| !c.handle.is_closed());

        // Least busy live connection with room.
        conns.sort_by_key(|c| c.in_use());
        for conn in conns.iter() {
            if let Ok(permit) = conn.sessions.clone().try_acquire_owned() {
                return Ok((conn.clone(), permit));
            }
        }

        if conns.len() < opts.max_connections_per_target.max(1) {
            // If a handshake failed while we were queued, share its verdict.
            if let Ok(last) = slot.last_failure.lock() {
                if let Some((at, err)) = last.as_ref() {
                    if *at >= arrived {
                        return Err(err.clone());
                    }
                }
            }
            match connect::connect(target, &opts.connect).await {
                Ok(handle) => {
                    self.inner.handshakes.fetch_add(1, Ordering::Relaxed);
                    let capacity = opts.max_sessions_per_connection.max(1);
                    let conn = Arc::new(Conn {
                        handle,
                        sessions: Arc::new(Semaphore::new(capacity)),
                        capacity: AtomicUsize::new(capacity),
                        last_used: Mutex::new(Instant::now()),
                    });
                    conns.push(conn.clone());
                    let permit = conn
                        .sessions
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| queue_timeout(target, opts))?;
                    return Ok((conn, permit));
                }
                Err(e) => {
                    if let Ok(mut last) = slot.last_failure.lock() {
                        *last = Some((Instant::now(), e.clone()));
                    }
                    return Err(e);
                }
            }
        }

        // Every connection is full and no more may be opened: queue on the
        // least busy one.
        let Some(conn) = conns.first().cloned() else {
            return Err(queue_timeout(target, opts));
        };
        drop(conns);
        let wait = opts.connect.connect_timeout + opts.channel_timeout;
        match tokio::time::timeout(wait, conn.sessions.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok((conn, permit)),
            _ => Err(queue_timeout(target, opts)),
        }
    }
}

fn queue_timeout(target: &Target, opts: &PoolOptions) -> Error {
    Error::Timeout {
        host: target.host_label(),
        user: target.user.clone(),
        phase: Phase::Queue,
        after: opts.connect.connect_timeout + opts.channel_timeout,
    }
}

async fn remove(slot: &Slot, dead: &Arc<Conn>) {
    let mut conns = slot.conns.lock().await;
    conns.retain(|c| !Arc::ptr_eq(c, dead));
}

async fn disconnect(conn: Arc<Conn>) {
    let _ = conn
        .handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
}

/// Close connections that have had no channel for `idle_timeout`.
async fn sweep_idle(inner: Weak<Inner>) {
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
                let keep = !(c.handle.is_closed() || quiet && c.in_use() == 0);
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
