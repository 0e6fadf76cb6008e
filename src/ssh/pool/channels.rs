//! Opening a channel on a pooled connection: a session takes a session
//! slot, a direct-tcpip channel only a live connection. What sshd's refusal
//! means (fewer sessions than assumed, nothing listening, forwarding not
//! allowed) and the replacement of a dead connection are decided here, once,
//! for commands, SFTP, tunnels and the port probe ([`Pool::accepts`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::Channel;

use super::forwards::ForwardGuard;
use super::kept_sftp::open_keep;
use super::{remove, Conn, Lease, Pool, SlotGuard};
use crate::error::{Cause, Error, Phase, Result};
use crate::ssh::{host_label, Target};

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

impl Pool {
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
                    what: format!("to {} on {}", host_label(host, port), target.host_label()),
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
}
