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

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::Msg;
use russh::Channel;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::pool::{ForwardGuard, Pool};
use super::Target;
use crate::error::{Error, Result};

/// A local port whose connections are carried to a port on a host.
pub struct LocalForward {
    port: u16,
    task: JoinHandle<()>,
}

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
        let what = || {
            format!(
                "127.0.0.1:{local_port} -> {remote_host}:{remote_port} on {}",
                target.host_label()
            )
        };
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, local_port)))
            .await
            .map_err(|e| Error::Tunnel {
                what: what(),
                reason: format!("cannot listen on the hub: {e}"),
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Tunnel {
                what: what(),
                reason: e.to_string(),
            })?
            .port();
        let task = tokio::spawn(accept_loop(
            listener,
            pool,
            target,
            remote_host,
            remote_port,
        ));
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
    pool: Pool,
    target: Target,
    remote_host: String,
    remote_port: u16,
) {
    let mut carried = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    carried.spawn(carry_from(
                        stream,
                        pool.clone(),
                        target.clone(),
                        remote_host.clone(),
                        remote_port,
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(host = %target.host_label(), "tunnel listener: {e}");
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
    pool: Pool,
    target: Target,
    remote_host: String,
    remote_port: u16,
) {
    let (channel, _guard) = match pool
        .open_direct_tcpip(&target, &remote_host, remote_port)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            // The client sees its connection closed, as with a refused port.
            // Refused while the server starts is expected (the hub probes
            // until it answers); anything else is worth a warning.
            if matches!(e, Error::Tunnel { .. }) {
                tracing::debug!(host = %target.host_label(), port = remote_port, "{e}");
            } else {
                tracing::warn!(host = %target.host_label(), port = remote_port, "tunnel: {e}");
            }
            return;
        }
    };
    let mut remote = channel.into_stream();
    // Half-close both ways: EOF from one side is passed on as EOF (channel
    // EOF / TCP FIN) while the other direction keeps flowing.
    if let Err(e) = copy_bidirectional(&mut stream, &mut remote).await {
        tracing::debug!(host = %target.host_label(), port = remote_port, "tunnel connection ended: {e}");
    }
}

/// A forwarded-tcpip channel from sshd, carried to the local `to`.
pub(crate) async fn carry_to(channel: Channel<Msg>, to: String, host: String) {
    let mut local = match TcpStream::connect(&to).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(host = %host, "remote forward: cannot connect to {to}: {e}");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    let mut remote = channel.into_stream();
    if let Err(e) = copy_bidirectional(&mut remote, &mut local).await {
        tracing::debug!(host = %host, "remote forward connection to {to} ended: {e}");
    }
}

/// A port on a host's loopback whose connections are carried to a local
/// address, kept across lost connections.
pub struct RemoteForward {
    port: u16,
    pool: Pool,
    target: Target,
    current: Current,
    task: JoinHandle<()>,
}

/// The connection the forward currently lives on.
type Current = Arc<Mutex<Option<Arc<ForwardGuard>>>>;

impl RemoteForward {
    /// Ask sshd on `target` to listen on `127.0.0.1:port` (0: sshd chooses)
    /// and carry connections to the local `to` (`host:port`). The first
    /// request's failure is returned; later ones (after the connection was
    /// replaced) are retried in the background with the same port.
    pub async fn open(pool: Pool, target: Target, port: u16, to: String) -> Result<RemoteForward> {
        let (port, guard) = pool.request_forward(&target, port, &to).await?;
        let current: Current = Arc::new(Mutex::new(Some(Arc::new(guard))));
        let task = tokio::spawn(keep(
            pool.clone(),
            target.clone(),
            port,
            to,
            current.clone(),
        ));
        Ok(RemoteForward {
            port,
            pool,
            target,
            current,
            task,
        })
    }

    /// The port sshd listens on, on the host's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RemoteForward {
    fn drop(&mut self) {
        self.pool
            .set_forward_target(&self.target, u32::from(self.port), None);
        self.task.abort();
        // Ask sshd to stop listening on the connection the forward lives on
        // (connections to it are refused by the handler from now on anyway).
        let guard = self.current.lock().ok().and_then(|mut c| c.take());
        let port = u32::from(self.port);
        if let (Some(guard), Ok(rt)) = (guard, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), guard.cancel_forward(port)).await;
            });
        }
    }
}

/// Watch the connection the forward lives on; when it dies, request the same
/// port on a new one, backing off while the host does not answer.
async fn keep(pool: Pool, target: Target, port: u16, to: String, current: Current) {
    let closed = || {
        current
            .lock()
            .map(|c| c.as_ref().is_none_or(|g| g.is_closed()))
            .unwrap_or(true)
    };
    loop {
        while !closed() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::info!(host = %target.host_label(), port, "remote forward lost with its connection; requesting it again");
        let mut backoff = Duration::from_millis(200);
        loop {
            match pool.request_forward(&target, port, &to).await {
                Ok((_, g)) => {
                    tracing::info!(host = %target.host_label(), port, "remote forward back");
                    if let Ok(mut c) = current.lock() {
                        *c = Some(Arc::new(g));
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(host = %target.host_label(), port, "remote forward: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
