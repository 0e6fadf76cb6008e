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
//!
//! This file holds the bookkeeping: the pool, its slots (connections per
//! target) and leases, connecting into a slot, queueing for a session slot,
//! the counters and closing. The rest, one job a file:
//!
//! - `channels`: opening a session or a direct-tcpip channel, with what a
//!   refusal means, and the port probe (`Pool::accepts`).
//! - `kept_sftp`: the SFTP session a connection keeps open, and the file
//!   operations made through it ([`Pool::make_dir`], [`Pool::path_exists`],
//!   [`Pool::remove_empty_dir`]).
//! - `forwards`: connections held for forwarding, the remote-forward
//!   registry, and the tunnels' constructors ([`LocalForward::bind`],
//!   [`RemoteForward::open`]).
//! - `sweep`: closing idle connections in the background.
//!
//! [`LocalForward::bind`]: super::LocalForward::bind
//! [`RemoteForward::open`]: super::RemoteForward::open

mod channels;
mod forwards;
mod kept_sftp;
mod sweep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::Channel;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connect::{self, ConnectOptions, Connection, ForwardTargets};
use super::health::HostWatch;
use super::Target;
use crate::error::{Error, Phase, Result};
use kept_sftp::Keep;

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
    /// Tunnel tasks alive: listeners, remote-forward keepers and the
    /// connections they carry. 0 once every tunnel is closed.
    pub tunnel_tasks: usize,
    /// Connections keeping an SFTP session open ([`Pool::make_dir`]). Not
    /// counted in `channels`.
    pub kept_sftp: usize,
    /// Targets (host and user) the pool keeps a slot for: the ones with a
    /// connection or a caller, evicted by the idle sweep once they have
    /// neither.
    pub targets: usize,
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
    forwards: ForwardTargets,
    tunnel_tasks: Arc<AtomicUsize>,
    /// Which hosts answer, for every target of the pool.
    health: HostWatch,
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
    /// Forwarding channels and remote forwards on this connection. They take
    /// no session slot (sshd's MaxSessions counts sessions only) but keep the
    /// connection from being closed as idle.
    forwards: AtomicUsize,
    /// The SFTP session this connection keeps open ([`Pool::make_dir`]).
    keep: Mutex<Keep>,
    /// Session slots the kept SFTP session holds (0 or 1). They are not
    /// counted as in use: the kept session neither keeps the connection
    /// from closing as idle nor shows in the counters.
    kept: AtomicUsize,
}

impl Conn {
    fn in_use(&self) -> usize {
        self.capacity
            .load(Ordering::Relaxed)
            .saturating_sub(self.sessions.available_permits())
            .saturating_sub(self.kept.load(Ordering::Relaxed))
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
    permit: Option<OwnedSemaphorePermit>,
}

impl SlotGuard {
    /// Give the slot up for good: the server holds fewer sessions.
    fn forget(mut self) {
        if let Some(p) = self.permit.take() {
            p.forget();
        }
    }
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
            forwards: ForwardTargets::default(),
            tunnel_tasks: Arc::new(AtomicUsize::new(0)),
            health: HostWatch::default(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep::sweep_idle(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// Which hosts answer, as this pool's connections found them
    /// ([`crate::plan::health`]).
    pub fn health(&self) -> &HostWatch {
        &self.inner.health
    }

    /// Counters across every target.
    pub fn stats(&self) -> PoolStats {
        let mut stats = PoolStats {
            handshakes: self.inner.handshakes.load(Ordering::Relaxed),
            tunnel_tasks: self.inner.tunnel_tasks.load(Ordering::Relaxed),
            ..Default::default()
        };
        let slots = self.slots();
        stats.targets = slots.len();
        for slot in slots {
            if let Ok(conns) = slot.conns.try_lock() {
                stats.connections += conns.len();
                stats.channels += conns.iter().map(|c| c.in_use()).sum::<usize>();
                stats.kept_sftp += conns.iter().filter(|c| c.kept_sftp().is_some()).count();
            }
        }
        stats
    }

    /// Connections held and channels open, by host (`address:port`, summed
    /// over remote users).
    pub fn stats_by_host(&self) -> Vec<(String, usize, usize)> {
        let slots: Vec<(Target, Arc<Slot>)> = match self.inner.slots.lock() {
            Ok(map) => map.iter().map(|(t, s)| (t.clone(), s.clone())).collect(),
            Err(_) => Vec::new(),
        };
        let mut by_host: std::collections::BTreeMap<String, (usize, usize)> =
            std::collections::BTreeMap::new();
        for (target, slot) in slots {
            let row = by_host.entry(target.host_label()).or_default();
            if let Ok(conns) = slot.conns.try_lock() {
                row.0 += conns.iter().filter(|c| !c.handle.is_closed()).count();
                row.1 += conns.iter().map(|c| c.in_use()).sum::<usize>();
            }
        }
        by_host.into_iter().map(|(h, (c, s))| (h, c, s)).collect()
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
            let conn = self.connect_into(target, slot, &mut conns, arrived).await?;
            let permit = conn
                .sessions
                .clone()
                .try_acquire_owned()
                .map_err(|_| queue_timeout(target, opts))?;
            return Ok((conn, permit));
        }

        // Every connection is full and no more may be opened: queue on all
        // of them and take the first slot that frees on any.
        let full: Vec<Arc<Conn>> = conns.clone();
        drop(conns);
        match tokio::time::timeout(queue_wait(opts), first_free(full)).await {
            Ok(Some(taken)) => Ok(taken),
            _ => Err(queue_timeout(target, opts)),
        }
    }

    /// Open a new connection to `target` and add it to `conns` (the slot's
    /// list, locked by the caller, which is how callers that arrive during a
    /// handshake share it). A failure is remembered so callers that queued
    /// behind it fail with the same error instead of each waiting it out.
    async fn connect_into(
        &self,
        target: &Target,
        slot: &Slot,
        conns: &mut Vec<Arc<Conn>>,
        arrived: Instant,
    ) -> Result<Arc<Conn>> {
        let opts = &self.inner.opts;
        if let Ok(last) = slot.last_failure.lock() {
            if let Some((at, err)) = last.as_ref() {
                if *at >= arrived {
                    return Err(err.clone());
                }
            }
        }
        // The attempt runs as a task of its own: a caller that gives up
        // first (a command's own timeout shorter than the connect timeout)
        // does not cut it short, so its outcome still reaches the hosts'
        // health and the metrics, for every other user.
        let attempt = {
            let (target, connect_opts) = (target.clone(), opts.connect.clone());
            let (forwards, health) = (self.inner.forwards.clone(), self.inner.health.clone());
            async move {
                let connected = connect::connect(&target, &connect_opts, forwards).await;
                crate::metrics::ssh_connect(
                    &target.host_label(),
                    connected.as_ref().err().map(|e| e.kind()),
                );
                match &connected {
                    Ok(_) => health.answered(&target.host_label()),
                    Err(e) => health.connect_failed(
                        &target.address,
                        target.port,
                        e,
                        connect_opts.connect_timeout,
                    ),
                }
                connected
            }
        };
        let connected = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt
                .spawn(tracing::Instrument::in_current_span(attempt))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::Ssh {
                        host: target.host_label(),
                        user: target.user.clone(),
                        reason: format!("the connection attempt ended abnormally: {e}"),
                        source: None,
                    })
                }),
            Err(_) => attempt.await,
        };
        match connected {
            Ok(handle) => {
                self.inner.handshakes.fetch_add(1, Ordering::Relaxed);
                let capacity = opts.max_sessions_per_connection.max(1);
                let conn = Arc::new(Conn {
                    handle,
                    sessions: Arc::new(Semaphore::new(capacity)),
                    capacity: AtomicUsize::new(capacity),
                    last_used: Mutex::new(Instant::now()),
                    forwards: AtomicUsize::new(0),
                    keep: Mutex::new(Keep::Untried),
                    kept: AtomicUsize::new(0),
                });
                conns.push(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                if let Ok(mut last) = slot.last_failure.lock() {
                    *last = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }
}

/// The first session slot that frees on any of `conns` (the waits on the
/// others are dropped, which takes them out of their queues); `None` when
/// every connection's slots are closed (the connections died).
async fn first_free(conns: Vec<Arc<Conn>>) -> Option<(Arc<Conn>, OwnedSemaphorePermit)> {
    let mut waits: Vec<_> = conns
        .iter()
        .map(|c| Some(Box::pin(c.sessions.clone().acquire_owned())))
        .collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, wait) in waits.iter_mut().enumerate() {
            let Some(w) = wait else { continue };
            match std::future::Future::poll(w.as_mut(), cx) {
                std::task::Poll::Ready(Ok(permit)) => {
                    return std::task::Poll::Ready(Some((conns[i].clone(), permit)))
                }
                std::task::Poll::Ready(Err(_)) => *wait = None,
                std::task::Poll::Pending => pending = true,
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(None)
        }
    })
    .await
}

fn queue_timeout(target: &Target, opts: &PoolOptions) -> Error {
    Error::Timeout {
        host: target.host_label(),
        user: target.user.clone(),
        phase: Phase::Queue,
        after: queue_wait(opts),
    }
}

/// How long a caller queues for a session slot when every connection is full.
fn queue_wait(opts: &PoolOptions) -> Duration {
    opts.connect
        .connect_timeout
        .saturating_add(opts.channel_timeout)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_wait_of_huge_bounds_saturates_instead_of_panicking() {
        let mut connect = ConnectOptions::new("/nonexistent");
        connect.connect_timeout = Duration::MAX;
        let mut opts = PoolOptions::new(connect);
        opts.channel_timeout = Duration::from_secs(10);
        assert_eq!(queue_wait(&opts), Duration::MAX);
    }
}
