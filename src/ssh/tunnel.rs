//! SSH tunnels over pooled connections: bytes only, no decisions.
//!
//! - [`LocalForward`]: a listener on the hub's loopback; each accepted
//!   connection opens a direct-tcpip channel to a port on the host's loopback
//!   through the pool. A dead connection is replaced by the pool, so after an
//!   sshd restart or a dropped link the next accepted connection works again.
//! - [`RemoteForward`]: sshd listens on the host's loopback and carries each
//!   connection back to a local address (the hub API). A keeper task watches
//!   the connection the forward lives on and asks for the same port again on a
//!   new connection when it dies.
//!
//! Both close when dropped: the listener and every connection it carries end,
//! the remote forward is refused from then on.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::Msg;
use russh::Channel;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Cause, Error, Result};

/// A boxed future, as the pool hands its channel openers to the tunnels.
pub(crate) type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Something that keeps a pooled connection in use while a channel lives.
pub(crate) type Hold = Box<dyn Send + Sync>;

/// Opens one direct-tcpip channel for a carried connection (the pool's
/// `open_direct_tcpip` for one target and port).
pub(crate) type OpenChannel = Arc<dyn Fn() -> BoxFut<Result<(Channel<Msg>, Hold)>> + Send + Sync>;

/// The connection a remote forward lives on.
pub(crate) trait ForwardLink: Send + Sync {
    /// The connection is gone (sshd restarted, keepalives unanswered).
    fn is_closed(&self) -> bool;
    /// Ask sshd to stop listening on `port` (best effort, bounded).
    fn cancel(self: Arc<Self>, port: u32) -> BoxFut<()>;
}

/// Requests the remote forward on `port` again on a live connection.
pub(crate) type RequestForward =
    Arc<dyn Fn(u16) -> BoxFut<Result<(u16, Arc<dyn ForwardLink>)>> + Send + Sync>;

/// Bound on connecting to the local end of a remote forward.
const CARRY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts a live tunnel task (accept loops, keepers, carried connections)
/// in its pool's tally until the task ends or is aborted.
pub(crate) struct Live(Arc<AtomicUsize>);

impl Live {
    pub(crate) fn new(tally: &Arc<AtomicUsize>) -> Live {
        tally.fetch_add(1, Ordering::Relaxed);
        Live(tally.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A local port whose connections are carried to a port on a host.
pub struct LocalForward {
    port: u16,
    task: JoinHandle<()>,
}

impl LocalForward {
    /// Listen on `127.0.0.1:local_port` (0: any free port) and carry every
    /// connection over a channel from `open`. `what` names the tunnel in
    /// errors; a taken port is a clear error naming it.
    pub(crate) async fn listen(
        local_port: u16,
        what: String,
        label: String,
        remote_port: u16,
        open: OpenChannel,
        tally: Arc<AtomicUsize>,
    ) -> Result<LocalForward> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, local_port)))
            .await
            .map_err(|e| Error::Tunnel {
                what: what.clone(),
                reason: format!("cannot listen on the hub: {e}"),
                source: Cause::of(e),
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Tunnel {
                what,
                reason: e.to_string(),
                source: Cause::of(e),
            })?
            .port();
        let live = Live::new(&tally);
        let task = tokio::spawn(accept_loop(listener, label, remote_port, open, tally, live));
        Ok(LocalForward { port, task })
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for LocalForward {
    fn drop(&mut self) {
        // Ends the accept loop, which owns the listener and every carried
        // connection (a JoinSet aborts its tasks when dropped).
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    label: String,
    remote_port: u16,
    open: OpenChannel,
    tally: Arc<AtomicUsize>,
    _live: Live,
) {
    let mut carried = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    carried.spawn(carry_from(
                        stream,
                        open.clone(),
                        label.clone(),
                        remote_port,
                        Live::new(&tally),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(host = %label, "tunnel listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = carried.join_next(), if !carried.is_empty() => {}
        }
    }
}

/// One accepted local connection, carried over a direct-tcpip channel.
async fn carry_from(
    mut stream: TcpStream,
    open: OpenChannel,
    label: String,
    remote_port: u16,
    _live: Live,
) {
    let (channel, _hold) = match open().await {
        Ok(c) => c,
        Err(e) => {
            // The client sees its connection closed, as with a refused port.
            // Refused while the server starts is expected (the hub probes
            // until it answers); anything else is worth a warning.
            if matches!(e, Error::Tunnel { .. }) {
                tracing::debug!(host = %label, port = remote_port, "{e}");
            } else {
                tracing::warn!(host = %label, port = remote_port, "tunnel: {e}");
            }
            return;
        }
    };
    let mut remote = channel.into_stream();
    // Half-close both ways: EOF from one side is passed on as EOF (channel
    // EOF / TCP FIN) while the other direction keeps flowing.
    if let Err(e) = copy_bidirectional(&mut stream, &mut remote).await {
        tracing::debug!(host = %label, port = remote_port, "tunnel connection ended: {e}");
    }
}

/// A forwarded-tcpip channel from sshd, carried to the local `to`.
async fn carry_to(channel: Channel<Msg>, to: String, host: String, _live: Live) {
    let mut local = match tokio::time::timeout(CARRY_CONNECT_TIMEOUT, TcpStream::connect(&to)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(host = %host, "remote forward: cannot connect to {to}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(host = %host, "remote forward: no answer from {to} within {CARRY_CONNECT_TIMEOUT:?}");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    let mut remote = channel.into_stream();
    if let Err(e) = copy_bidirectional(&mut remote, &mut local).await {
        tracing::debug!(host = %host, "remote forward connection to {to} ended: {e}");
    }
}

/// The start of the reason of an [`Error::Tunnel`] when sshd refused a
/// remote forward's port asked for by number (one the forward had before).
pub(crate) const FORWARD_PORT_REFUSED: &str = "sshd refused the port this forward had";

/// Whether `e` says sshd refused a port the forward had before: taken on
/// the host's loopback, presumably by another user of the host, who then
/// receives what the server sends there.
pub fn forward_port_refused(e: &Error) -> bool {
    matches!(e, Error::Tunnel { reason, .. } if reason.starts_with(FORWARD_PORT_REFUSED))
}

/// A port on a host's loopback whose connections are carried to a local
/// address, kept across lost connections.
pub struct RemoteForward {
    port: u16,
    current: Current,
    task: JoinHandle<()>,
    forget: Box<dyn Fn() + Send + Sync>,
}

/// Where a remote forward's connections go, and the tally its tasks count in.
pub(crate) struct CarryTo {
    /// The local `host:port`.
    pub(crate) to: String,
    /// The host, for logs.
    pub(crate) label: String,
    /// See [`Live`].
    pub(crate) tally: Arc<AtomicUsize>,
}

/// The connection the forward currently lives on.
type Current = Arc<Mutex<Option<Arc<dyn ForwardLink>>>>;

impl RemoteForward {
    /// A granted forward on `port`, living on `link`: its forwarded channels
    /// arrive on `channels` and are carried to `to`; when `link` dies the
    /// forward is requested again with `request`. Dropping it ends the
    /// keeper and every carried connection, calls `forget` (connections to
    /// the port are refused from then on) and cancels the forward on sshd.
    pub(crate) fn start(
        port: u16,
        link: Arc<dyn ForwardLink>,
        request: RequestForward,
        channels: mpsc::UnboundedReceiver<Channel<Msg>>,
        carry: CarryTo,
        forget: Box<dyn Fn() + Send + Sync>,
    ) -> RemoteForward {
        let current: Current = Arc::new(Mutex::new(Some(link)));
        let live = Live::new(&carry.tally);
        let task = tokio::spawn(keep(port, request, channels, carry, current.clone(), live));
        RemoteForward {
            port,
            current,
            task,
            forget,
        }
    }

    /// The port sshd listens on, on the host's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RemoteForward {
    fn drop(&mut self) {
        (self.forget)();
        // Ends the keeper, which owns every carried connection.
        self.task.abort();
        // Ask sshd to stop listening on the connection the forward lives on
        // (connections to it are refused by the handler from now on anyway).
        let link = self.current.lock().ok().and_then(|mut c| c.take());
        let port = u32::from(self.port);
        if let (Some(link), Ok(rt)) = (link, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), link.cancel(port)).await;
            });
        }
    }
}

/// Carry the forward's connections and watch the connection it lives on;
/// when that dies, request the same port on a new one, backing off while
/// the host does not answer. Everything it started ends with it.
async fn keep(
    port: u16,
    request: RequestForward,
    mut channels: mpsc::UnboundedReceiver<Channel<Msg>>,
    carry: CarryTo,
    current: Current,
    _live: Live,
) {
    let CarryTo { to, label, tally } = carry;
    let closed = || {
        current
            .lock()
            .map(|c| c.as_ref().is_none_or(|g| g.is_closed()))
            .unwrap_or(true)
    };
    let mut carried = JoinSet::new();
    let mut backoff = Duration::from_millis(200);
    let mut lost = false;
    let mut reported_taken = false;
    loop {
        let wait = if !lost && closed() {
            lost = true;
            tracing::info!(host = %label, port, "remote forward lost with its connection; requesting it again");
            Duration::ZERO
        } else if lost {
            backoff
        } else {
            Duration::from_millis(250)
        };
        tokio::select! {
            Some(channel) = channels.recv() => {
                carried.spawn(carry_to(channel, to.clone(), label.clone(), Live::new(&tally)));
                continue;
            }
            Some(_) = carried.join_next(), if !carried.is_empty() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        if !lost {
            continue;
        }
        match request(port).await {
            Ok((_, link)) => {
                tracing::info!(host = %label, port, "remote forward back");
                if let Ok(mut c) = current.lock() {
                    *c = Some(link);
                }
                lost = false;
                reported_taken = false;
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                if forward_port_refused(&e) && !reported_taken {
                    // Said once per loss: the retries go on (and are counted).
                    reported_taken = true;
                    tracing::error!(host = %label, port, "the hub tunnel's port is taken on the host while the forward was down: another user may be receiving the server's hub API calls (their token too, unless internal_ssl); retrying: {e}");
                } else {
                    tracing::warn!(host = %label, port, "remote forward: {e}; retrying");
                }
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
            }
        }
    }
}
