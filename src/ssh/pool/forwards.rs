//! Pooled connections held for forwarding, the registry that tells a
//! connection where sshd's forwarded channels go, and the tunnels'
//! constructors: the tunnels get channel openers from the pool and know
//! nothing of connections.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Conn, Pool};
use crate::error::{Cause, Error, Result};
use crate::ssh::connect::ForwardSink;
use crate::ssh::tunnel::{
    BoxFut, CarryTo, ForwardLink, Hold, LocalForward, OpenChannel, RemoteForward, RequestForward,
    FORWARD_PORT_REFUSED,
};
use crate::ssh::{host_label, Target};

/// A pooled connection in use for forwarding. While it lives the idle sweep
/// leaves the connection open.
pub(crate) struct ForwardGuard {
    pub(super) conn: Arc<Conn>,
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
    /// A live connection to `target` for forwarding, opened if there is
    /// none. It takes no session slot and never queues behind sessions:
    /// forwarding channels are not counted by sshd's MaxSessions.
    pub(super) async fn forward_conn(&self, target: &Target) -> Result<ForwardGuard> {
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
            self.inner.forwards.claim(target, u32::from(port), &sink);
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
                self.inner.forwards.release(target, u32::from(port), &sink);
            }
            Err(Error::Tunnel {
                what: what(),
                reason,
                source,
            })
        };
        let bound = match granted {
            Ok(Ok(p)) => p,
            Ok(Err(russh::Error::RequestDenied)) if port != 0 => {
                // A port asked for by number is one this forward had: after
                // a dropped connection or a hub restart, whoever holds it
                // now receives what the server sends there.
                crate::metrics::hub_tunnel_port_taken(&target.host_label());
                return fail(format!("{FORWARD_PORT_REFUSED} (taken on the host's loopback, by another user while the forward was down?, or forwarding no longer allowed)"), None)
            }
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
        self.inner.forwards.set(target, bound, &sink);
        Ok((bound16, guard))
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
            "127.0.0.1:{local_port} -> {} on {}",
            host_label(&remote_host, remote_port),
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
            let (pool, target, to, sink) = (pool.clone(), target.clone(), to.clone(), sink.clone());
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
            Box::new(move || pool.inner.forwards.release(&target, u32::from(port), &sink))
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
