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
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::FileAttributes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::connect::{self, ConnectOptions, Connection, ForwardSink, ForwardTargets};
use super::health::HostWatch;
use super::tunnel::{
    BoxFut, CarryTo, ForwardLink, Hold, LocalForward, OpenChannel, RemoteForward, RequestForward,
};
use super::Target;
use crate::error::{Cause, Error, Phase, Result};

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

/// The SFTP session a connection keeps open, so that a run directory is
/// made with one request and no program started on the host. It holds a
/// session slot from the moment it is tried until it is given up.
enum Keep {
    /// Not tried on this connection yet.
    Untried,
    /// Asked for ([`Pool::make_dir`]): opened next time a session is open on
    /// the connection, so that sshd granting it proves it holds at least two
    /// sessions and SFTP never takes a host's only one.
    Wanted,
    /// Being opened in the background.
    Opening(OwnedSemaphorePermit),
    /// Open: requests go to this sftp-server.
    Open {
        sftp: Arc<RawSftpSession>,
        _slot: OwnedSemaphorePermit,
    },
    /// Not on this connection: sshd refused or failed it, a request failed
    /// other than with a status, or sshd refused a session while it was
    /// open (it holds fewer sessions than assumed).
    Off,
}

/// Open a kept SFTP session on `conn` in the background (bounded by
/// `timeout`) when one is wanted, unless the connection lacks a spare session
/// slot. Called with a session open on the connection. Never waits.
fn open_keep(conn: &Arc<Conn>, timeout: Duration) {
    let Ok(mut keep) = conn.keep.lock() else {
        return;
    };
    if !matches!(*keep, Keep::Wanted) {
        return;
    }
    // Leave room for commands: only a connection with at least three slots
    // and two of them free gives one to SFTP.
    if conn.capacity.load(Ordering::Relaxed) < 3 || conn.sessions.available_permits() < 2 {
        return;
    }
    let Ok(permit) = conn.sessions.clone().try_acquire_owned() else {
        return;
    };
    *keep = Keep::Opening(permit);
    conn.kept.store(1, Ordering::Relaxed);
    drop(keep);
    let conn = conn.clone();
    tokio::spawn(async move {
        let opened = tokio::time::timeout(timeout, async {
            let channel = conn
                .handle
                .channel_open_session()
                .await
                .map_err(|e| e.to_string())?;
            channel
                .request_subsystem(true, "sftp")
                .await
                .map_err(|e| e.to_string())?;
            let sftp = RawSftpSession::new(channel.into_stream());
            sftp.set_timeout(timeout.as_secs().max(1));
            sftp.init().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(sftp)
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let Ok(mut keep) = conn.keep.lock() else {
            return;
        };
        // Given up while it opened (a session refused meanwhile): stay off.
        let Keep::Opening(_) = &*keep else {
            return;
        };
        match (opened, std::mem::replace(&mut *keep, Keep::Off)) {
            (Ok(sftp), Keep::Opening(permit)) => {
                *keep = Keep::Open {
                    sftp: Arc::new(sftp),
                    _slot: permit,
                }
            }
            (Err(e), _) => {
                conn.kept.store(0, Ordering::Relaxed);
                tracing::debug!("no kept SFTP session on this connection ({e}); run directories are made by the launch script");
            }
            (Ok(_), _) => conn.kept.store(0, Ordering::Relaxed),
        }
    });
}

impl Conn {
    fn in_use(&self) -> usize {
        self.capacity
            .load(Ordering::Relaxed)
            .saturating_sub(self.sessions.available_permits())
            .saturating_sub(self.kept.load(Ordering::Relaxed))
    }

    /// The kept SFTP session, when it is open.
    fn kept_sftp(&self) -> Option<Arc<RawSftpSession>> {
        match &*self.keep.lock().ok()? {
            Keep::Open { sftp, .. } => Some(sftp.clone()),
            _ => None,
        }
    }

    /// Ask for a kept SFTP session, opened with the next session.
    fn want_keep(&self) {
        if let Ok(mut keep) = self.keep.lock() {
            if matches!(*keep, Keep::Untried) {
                *keep = Keep::Wanted;
            }
        }
    }

    /// Give up the kept SFTP session for good (its slot comes back; sshd
    /// frees its session once sftp-server has exited). Whether one was open
    /// or opening.
    fn drop_keep(&self) -> bool {
        let Ok(mut keep) = self.keep.lock() else {
            return false;
        };
        let was = std::mem::replace(&mut *keep, Keep::Off);
        self.kept.store(0, Ordering::Relaxed);
        matches!(was, Keep::Opening(_) | Keep::Open { .. })
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

/// A pooled connection in use for forwarding. While it lives the idle sweep
/// leaves the connection open.
pub(crate) struct ForwardGuard {
    conn: Arc<Conn>,
}

impl ForwardGuard {
    fn new(conn: Arc<Conn>) -> ForwardGuard {
        conn.forwards.fetch_add(1, Ordering::Relaxed);
        ForwardGuard { conn }
    }
}

impl ForwardLink for ForwardGuard {
    fn is_closed(&self) -> bool {
        self.conn.handle.is_closed()
    }

    fn cancel(self: Arc<Self>, port: u32) -> BoxFut<()> {
        Box::pin(async move {
            let _ = self
                .conn
                .handle
                .cancel_tcpip_forward("127.0.0.1", port)
                .await;
        })
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.conn.forwards.fetch_sub(1, Ordering::Relaxed);
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
            forwards: Arc::new(Mutex::new(HashMap::new())),
            tunnel_tasks: Arc::new(AtomicUsize::new(0)),
            health: HostWatch::default(),
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
        for slot in self.slots() {
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

    /// Open a session channel to `target`, reusing a pooled connection when one
    /// has room. A dead pooled connection is replaced transparently once.
    pub(crate) async fn open_session(&self, target: &Target) -> Result<Lease> {
        let (channel, held) = self.open_channel(target, Open::Session).await?;
        match held {
            Held::Session(slot) => Ok(Lease { channel, slot }),
            Held::Forward(_) => Err(Error::Invalid {
                what: "session channel".into(),
                reason: "opened without a session slot".into(),
            }),
        }
    }

    /// Open a direct-tcpip channel: sshd on `target` connects to
    /// `host:port` (as seen from the host) and the channel carries the bytes.
    /// It takes no session slot: a tunnel never waits behind commands.
    pub(crate) async fn open_direct_tcpip(
        &self,
        target: &Target,
        host: &str,
        port: u16,
    ) -> Result<(Channel<Msg>, ForwardGuard)> {
        let (channel, held) = self
            .open_channel(target, Open::DirectTcpip { host, port })
            .await?;
        match held {
            Held::Forward(guard) => Ok((channel, guard)),
            Held::Session(_) => Err(Error::Invalid {
                what: "tunnel channel".into(),
                reason: "opened on a session slot".into(),
            }),
        }
    }

    /// Whether something on `target` accepts TCP connections at `host:port`
    /// (as the host sees it), asked of sshd with a direct-tcpip open that is
    /// closed at once: sshd connects itself, nothing runs on the host.
    /// `Some(true)`: something accepted; `Some(false)`: sshd's connect
    /// failed (nothing listens there); `None`: sshd would not try
    /// (forwarding prohibited, or another refusal). Like a tunnel it takes a
    /// live pooled connection and no session slot; a dead one is replaced
    /// once, and an error means the host could not be asked at all (the
    /// same error a command would get).
    pub(crate) async fn accepts(
        &self,
        target: &Target,
        host: &str,
        port: u16,
    ) -> Result<Option<bool>> {
        match self
            .open_or_refusal(target, Open::DirectTcpip { host, port })
            .await?
        {
            Ok((channel, _held)) => {
                let _ = channel.close().await;
                Ok(Some(true))
            }
            Err(russh::ChannelOpenFailure::ConnectFailed) => Ok(Some(false)),
            Err(_) => Ok(None),
        }
    }

    /// Make the directory `path` (mode 0700; `~/`-less paths are relative to
    /// the home directory) on `target` with one request to the SFTP session
    /// a live pooled connection keeps open: no program starts on the host.
    /// `false` when it was not made that way, and the caller makes it
    /// another way: no live connection (this never connects or waits for a
    /// handshake), no kept session yet (one is then opened in the
    /// background, for the next time), the directory exists or its parent
    /// does not, or any failure.
    pub async fn make_dir(&self, target: &Target, path: &str) -> bool {
        // One request of a few bytes: an sftp-server slower than this is
        // given up, and the launch script makes the directory instead (it
        // copes with one that appears meanwhile).
        let timeout = self.inner.opts.channel_timeout.min(Duration::from_secs(2));
        let Some(conn) = self.live_conn(target) else {
            return false;
        };
        let Some(sftp) = conn.kept_sftp() else {
            conn.want_keep();
            return false;
        };
        let attrs = FileAttributes {
            permissions: Some(0o700),
            ..FileAttributes::empty()
        };
        let path = path.strip_prefix("~/").unwrap_or(path);
        match tokio::time::timeout(timeout, sftp.mkdir(path, attrs)).await {
            Ok(Ok(_)) => true,
            // The server's answer (it exists, the parent is missing): the
            // session is fine.
            Ok(Err(russh_sftp::client::error::Error::Status(status))) => {
                tracing::debug!(host = %target.host_label(), user = %target.user, path,
                    "SFTP mkdir: {}", status.error_message);
                false
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                tracing::debug!(host = %target.host_label(), user = %target.user,
                    "kept SFTP session failed ({reason}); giving it up on this connection");
                conn.drop_keep();
                false
            }
        }
    }

    /// Whether `path` exists on `target`, asked of the SFTP session a live
    /// pooled connection keeps open (one request, no program started on the
    /// host). `None` when it cannot be asked that way (no kept session, no
    /// answer within a second, or any failure but "no such file").
    pub async fn path_exists(&self, target: &Target, path: &str) -> Option<bool> {
        let conn = self.live_conn(target)?;
        let sftp = conn.kept_sftp()?;
        let path = path.strip_prefix("~/").unwrap_or(path);
        let wait = self.inner.opts.channel_timeout.min(Duration::from_secs(1));
        match tokio::time::timeout(wait, sftp.stat(path)).await {
            Ok(Ok(_)) => Some(true),
            Ok(Err(russh_sftp::client::error::Error::Status(status)))
                if status.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
            {
                Some(false)
            }
            _ => None,
        }
    }

    /// Remove the empty directory `path` on `target` through the kept SFTP
    /// session, when there is one (a directory [`Pool::make_dir`] made for a
    /// start that did not happen). Whether it was removed.
    pub async fn remove_empty_dir(&self, target: &Target, path: &str) -> bool {
        let Some(sftp) = self.live_conn(target).and_then(|c| c.kept_sftp()) else {
            return false;
        };
        let path = path.strip_prefix("~/").unwrap_or(path);
        matches!(
            tokio::time::timeout(self.inner.opts.channel_timeout, sftp.rmdir(path)).await,
            Ok(Ok(_))
        )
    }

    /// A live connection to `target` that keeps an SFTP session open, or
    /// else the least busy one; `None` when there is none or a handshake
    /// holds the list.
    fn live_conn(&self, target: &Target) -> Option<Arc<Conn>> {
        let slot = self.slot(target);
        let conns = slot.conns.try_lock().ok()?;
        let live = || conns.iter().filter(|c| !c.handle.is_closed());
        live()
            .find(|c| c.kept_sftp().is_some())
            .or_else(|| live().min_by_key(|c| c.in_use()))
            .cloned()
    }

    /// The one path that opens a channel: a session takes a session slot
    /// (queueing when every connection is full), a forward only a live
    /// connection. A channel the server refuses for lack of sessions lowers
    /// that connection's capacity; a dead pooled connection is replaced once.
    async fn open_channel(&self, target: &Target, what: Open<'_>) -> Result<(Channel<Msg>, Held)> {
        match self.open_or_refusal(target, what).await? {
            Ok(opened) => Ok(opened),
            Err(reason) => {
                let (host, port) = match what {
                    Open::DirectTcpip { host, port } => (host, port),
                    Open::Session => ("session", 0),
                };
                Err(Error::Tunnel {
                    what: format!("to {host}:{port} on {}", target.host_label()),
                    reason: format!("sshd refused to connect ({reason:?}); is the server listening, and does sshd allow TCP forwarding?"),
                    source: None,
                })
            }
        }
    }

    /// [`Pool::open_channel`], with sshd's refusal of a direct-tcpip channel
    /// given back as its reason (a session refused is handled here).
    async fn open_or_refusal(
        &self,
        target: &Target,
        what: Open<'_>,
    ) -> Result<std::result::Result<(Channel<Msg>, Held), russh::ChannelOpenFailure>> {
        let slot = self.slot(target);
        let mut replaced_dead = false;
        // Since when this caller waits for sshd to free a session.
        let mut freeing: Option<Instant> = None;
        loop {
            let held = match what {
                Open::Session => {
                    let (conn, permit) = self.take_slot(target, &slot).await?;
                    Held::Session(SlotGuard {
                        conn,
                        permit: Some(permit),
                    })
                }
                Open::DirectTcpip { .. } => Held::Forward(self.forward_conn(target).await?),
            };
            let conn = held.conn().clone();
            let opened = tokio::time::timeout(self.inner.opts.channel_timeout, async {
                match what {
                    Open::Session => conn.handle.channel_open_session().await,
                    Open::DirectTcpip { host, port } => {
                        conn.handle
                            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
                            .await
                    }
                }
            })
            .await;
            match opened {
                Ok(Ok(channel)) => {
                    if let Open::Session = what {
                        open_keep(&conn, self.inner.opts.channel_timeout);
                    }
                    return Ok(Ok((channel, held)));
                }
                Ok(Err(russh::Error::ChannelOpenFailure(reason))) => match (what, held) {
                    (Open::DirectTcpip { .. }, _) => return Ok(Err(reason)),
                    (Open::Session, Held::Session(slot_guard)) => {
                        // sshd holds fewer sessions than we assumed. A kept
                        // SFTP session is given up first (its slot comes
                        // back once sshd has freed it).
                        conn.drop_keep();
                        let in_use_by_others = conn.in_use().saturating_sub(1);
                        if in_use_by_others == 0 {
                            // Nothing else of ours is open there: sshd has
                            // yet to free a session just closed (OpenSSH
                            // frees it after reading our close, so a
                            // host with MaxSessions 1 refuses the next
                            // command for a moment), or it holds none at
                            // all. Ask again, briefly, before saying so.
                            let since = *freeing.get_or_insert_with(Instant::now);
                            if since.elapsed() < self.inner.opts.channel_timeout {
                                drop(slot_guard);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                            return Err(Error::Ssh {
                                host: target.host_label(),
                                user: target.user.clone(),
                                reason: format!("the server refused to open a session: {reason:?}"),
                                source: None,
                            });
                        }
                        // Give up the slot for good and try elsewhere.
                        slot_guard.forget();
                        conn.capacity.fetch_sub(1, Ordering::Relaxed);
                        tracing::debug!(host = %target.host_label(), user = %target.user,
                            capacity = in_use_by_others, "server refused a channel; lowering this connection's capacity");
                    }
                    (Open::Session, Held::Forward(_)) => {}
                },
                Ok(Err(e)) => {
                    drop(held);
                    remove(&slot, &conn).await;
                    if replaced_dead {
                        return Err(Error::Ssh {
                            host: target.host_label(),
                            user: target.user.clone(),
                            reason: e.to_string(),
                            source: Cause::of(e),
                        });
                    }
                    tracing::info!(host = %target.host_label(), user = %target.user,
                        "pooled connection is dead ({e}); reconnecting");
                    replaced_dead = true;
                }
                Err(_) => {
                    // A connection that cannot open a channel in time is
                    // presumed dead: the next caller gets a fresh one.
                    drop(held);
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

    /// A live connection to `target` for forwarding, opened if there is
    /// none. It takes no session slot and never queues behind sessions:
    /// forwarding channels are not counted by sshd's MaxSessions.
    async fn forward_conn(&self, target: &Target) -> Result<ForwardGuard> {
        let slot = self.slot(target);
        let arrived = Instant::now();
        let mut conns = slot.conns.lock().await;
        conns.retain(|c| !c.handle.is_closed());
        if let Some(conn) = conns.iter().min_by_key(|c| c.in_use()) {
            return Ok(ForwardGuard::new(conn.clone()));
        }
        let conn = self
            .connect_into(target, &slot, &mut conns, arrived)
            .await?;
        Ok(ForwardGuard::new(conn))
    }

    /// Ask sshd on `target` to listen on its loopback at `port` (0: sshd
    /// chooses) and carry each connection to the local `to` (`host:port`).
    /// Returns the port and the connection the forward lives on: when that
    /// connection dies, so does the forward; request it again.
    pub(crate) async fn request_forward(
        &self,
        target: &Target,
        port: u16,
        to: &str,
        sink: ForwardSink,
    ) -> Result<(u16, ForwardGuard)> {
        let guard = self.forward_conn(target).await?;
        let what = || format!("from 127.0.0.1:{port} on {} to {to}", target.host_label());
        // Known before sshd answers, so no connection arrives unclaimed.
        if port != 0 {
            self.set_forward_target(target, u32::from(port), Some(sink.clone()));
        }
        let granted = tokio::time::timeout(
            self.inner.opts.channel_timeout,
            guard
                .conn
                .handle
                .tcpip_forward("127.0.0.1", u32::from(port)),
        )
        .await;
        let fail = |reason: String, source: Option<Cause>| {
            if port != 0 {
                self.set_forward_target(target, u32::from(port), None);
            }
            Err(Error::Tunnel {
                what: what(),
                reason,
                source,
            })
        };
        let bound = match granted {
            Ok(Ok(p)) => p,
            Ok(Err(russh::Error::RequestDenied)) => {
                return fail("sshd refused the forward (port taken on the host, or AllowTcpForwarding not `yes`/`remote`)".into(), None)
            }
            Ok(Err(e)) => return fail(e.to_string(), Cause::of(e)),
            Err(_) => {
                return fail(format!(
                    "no answer within {:?}",
                    self.inner.opts.channel_timeout
                ), None)
            }
        };
        // OpenSSH answers 0 when the requested port was not 0.
        let bound = if bound == 0 { u32::from(port) } else { bound };
        let Ok(bound16) = u16::try_from(bound) else {
            return fail(format!("sshd reported port {bound}"), None);
        };
        if bound16 == 0 {
            return fail("sshd reported no port".into(), None);
        }
        self.set_forward_target(target, bound, Some(sink));
        Ok((bound16, guard))
    }

    /// Where connections to the remote forward on `port` go; `None` forgets it.
    pub(crate) fn set_forward_target(&self, target: &Target, port: u32, to: Option<ForwardSink>) {
        let key = (target.host_label(), port);
        if let Ok(mut map) = self.inner.forwards.lock() {
            match to {
                Some(to) => {
                    map.insert(key, to);
                }
                None => {
                    map.remove(&key);
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
            let conn = self.connect_into(target, slot, &mut conns, arrived).await?;
            let permit = conn
                .sessions
                .clone()
                .try_acquire_owned()
                .map_err(|_| queue_timeout(target, opts))?;
            return Ok((conn, permit));
        }

        // Every connection is full and no more may be opened: queue on the
        // least busy one.
        let Some(conn) = conns.first().cloned() else {
            return Err(queue_timeout(target, opts));
        };
        drop(conns);
        let wait = queue_wait(opts);
        match tokio::time::timeout(wait, conn.sessions.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok((conn, permit)),
            _ => Err(queue_timeout(target, opts)),
        }
    }
}

impl Pool {
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

/// What a channel is opened for.
#[derive(Clone, Copy)]
enum Open<'a> {
    /// A session (exec, SFTP): takes a session slot.
    Session,
    /// A forwarding channel to `host:port` as seen from the host.
    DirectTcpip { host: &'a str, port: u16 },
}

/// What keeps a channel's connection in use.
enum Held {
    Session(SlotGuard),
    Forward(ForwardGuard),
}

impl Held {
    fn conn(&self) -> &Arc<Conn> {
        match self {
            Held::Session(s) => &s.conn,
            Held::Forward(f) => &f.conn,
        }
    }
}

/// The pool builds the tunnels: they get channel openers from it and know
/// nothing of connections.
impl LocalForward {
    /// Listen on `127.0.0.1:local_port` (0: any free port) and carry every
    /// connection to `remote_host:remote_port` as seen from `target`.
    /// A taken port is a clear error naming it.
    pub async fn bind(
        pool: Pool,
        target: Target,
        local_port: u16,
        remote_host: String,
        remote_port: u16,
    ) -> Result<LocalForward> {
        let what = format!(
            "127.0.0.1:{local_port} -> {remote_host}:{remote_port} on {}",
            target.host_label()
        );
        let label = target.host_label();
        let tally = pool.inner.tunnel_tasks.clone();
        let open: OpenChannel = Arc::new(move || {
            let (pool, target, host) = (pool.clone(), target.clone(), remote_host.clone());
            Box::pin(async move {
                let (channel, guard) = pool.open_direct_tcpip(&target, &host, remote_port).await?;
                Ok((channel, Box::new(guard) as Hold))
            })
        });
        LocalForward::listen(local_port, what, label, remote_port, open, tally).await
    }
}

impl RemoteForward {
    /// Ask sshd on `target` to listen on `127.0.0.1:port` (0: sshd chooses)
    /// and carry connections to the local `to` (`host:port`). The first
    /// request's failure is returned; later ones (after the connection was
    /// replaced) are retried in the background with the same port.
    pub async fn open(pool: Pool, target: Target, port: u16, to: String) -> Result<RemoteForward> {
        let (sink, channels) = mpsc::unbounded_channel();
        let (port, guard) = pool
            .request_forward(&target, port, &to, sink.clone())
            .await?;
        let request: RequestForward = {
            let (pool, target, to) = (pool.clone(), target.clone(), to.clone());
            Arc::new(move |port| {
                let (pool, target, to, sink) =
                    (pool.clone(), target.clone(), to.clone(), sink.clone());
                Box::pin(async move {
                    let (port, guard) = pool.request_forward(&target, port, &to, sink).await?;
                    Ok((port, Arc::new(guard) as Arc<dyn ForwardLink>))
                })
            })
        };
        let forget = {
            let (pool, target) = (pool.clone(), target.clone());
            Box::new(move || pool.set_forward_target(&target, u32::from(port), None))
        };
        Ok(RemoteForward::start(
            port,
            Arc::new(guard),
            request,
            channels,
            CarryTo {
                to,
                label: target.host_label(),
                tally: pool.inner.tunnel_tasks.clone(),
            },
            forget,
        ))
    }
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
