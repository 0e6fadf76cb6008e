//! Opening one authenticated SSH connection: TCP connect, key exchange with the
//! host key checked against known_hosts, then authentication. Every step is
//! bounded by its own timeout.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::PublicKeyOrCertificate;

use std::collections::HashMap;
use std::sync::Mutex;

use russh::client::Msg;
use russh::Channel;
use tokio::sync::mpsc;

use super::auth;
use super::known_hosts::{self, HostKeyPolicy, Verdict};
use super::Target;
use crate::error::{Cause, Error, Phase, Result};

/// Settings for opening a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// known_hosts file consulted for every host key.
    pub known_hosts: PathBuf,
    /// What to do with hosts not in that file.
    pub host_key_policy: HostKeyPolicy,
    /// Bound on TCP connect plus key exchange.
    pub connect_timeout: Duration,
    /// Bound on authentication.
    pub auth_timeout: Duration,
    /// Send a keepalive after this much silence from the server.
    pub keepalive_interval: Duration,
    /// Declare the connection dead after this many unanswered keepalives.
    pub keepalive_max: usize,
    /// The parsed `known_hosts`, kept while the file is unchanged.
    pub known_hosts_cache: known_hosts::Cache,
}

impl ConnectOptions {
    /// Strict host-key checking against `known_hosts`, with the default bounds.
    pub fn new(known_hosts: impl Into<PathBuf>) -> Self {
        ConnectOptions {
            known_hosts: known_hosts.into(),
            host_key_policy: HostKeyPolicy::Strict,
            connect_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            known_hosts_cache: known_hosts::Cache::default(),
        }
    }
}

/// Where the forwarded connections of one remote forward go: the forward
/// that asked for it carries them (and ends them when it is dropped).
pub(crate) type ForwardSink = mpsc::UnboundedSender<Channel<Msg>>;

/// The remote forwards of a pool, by the connection's [`Target`] (host,
/// port, user and credential: the pool's key, so one user's forwards are
/// never another's) and the port sshd listens on for it on the host's
/// loopback, with their sinks. Every connection's handler consults it for
/// its own target; forwards not in it are refused. Each forward changes
/// only its own entry: another user's failing request for the same port
/// (taken, by that very forward) leaves it in place.
#[derive(Clone, Default)]
pub(crate) struct ForwardTargets(Arc<Mutex<HashMap<(Target, u32), ForwardSink>>>);

impl ForwardTargets {
    /// Before sshd answers a request for `port`: record `sink` unless a live
    /// forward of the same target has the port (it keeps it until the
    /// answer says otherwise). So no connection arrives unclaimed.
    pub(crate) fn claim(&self, target: &Target, port: u32, sink: &ForwardSink) {
        if let Ok(mut map) = self.0.lock() {
            let key = (target.clone(), port);
            if map.get(&key).is_none_or(|s| s.is_closed()) {
                map.insert(key, sink.clone());
            }
        }
    }

    /// sshd granted `port`: connections to it go to `sink`.
    pub(crate) fn set(&self, target: &Target, port: u32, sink: &ForwardSink) {
        if let Ok(mut map) = self.0.lock() {
            map.insert((target.clone(), port), sink.clone());
        }
    }

    /// Forget `port` if it is `sink`'s (a failed request, a dropped forward).
    pub(crate) fn release(&self, target: &Target, port: u32, sink: &ForwardSink) {
        if let Ok(mut map) = self.0.lock() {
            let key = (target.clone(), port);
            if map.get(&key).is_some_and(|s| s.same_channel(sink)) {
                map.remove(&key);
            }
        }
    }

    /// Where a connection to `port` forwarded on `target`'s connection goes.
    fn sink(&self, target: &Target, port: u32) -> Option<ForwardSink> {
        let map = self.0.lock().ok()?;
        map.get(&(target.clone(), port))
            .filter(|s| !s.is_closed())
            .cloned()
    }
}

/// The russh handler: checks the host key and hands forwarded connections
/// to their forward.
pub(crate) struct Client {
    host: String,
    port: u16,
    target: Target,
    known_hosts: PathBuf,
    entries: Arc<Vec<known_hosts::Entry>>,
    policy: HostKeyPolicy,
    forwards: ForwardTargets,
}

/// Errors raised inside the handler travel through russh as this type.
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKey(Error),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

impl client::Handler for Client {
    type Error = HandlerError;

    /// sshd opens a channel for a connection to one of our remote forwards:
    /// carry it to the local address recorded for that forward, refuse it
    /// when there is none (a forward we no longer want).
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let label = super::host_label(&self.host, self.port);
        let Some(sink) = self.forwards.sink(&self.target, connected_port) else {
            tracing::warn!(host = %label, port = connected_port, "refused a forwarded connection for a forward not in use");
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        if sink.send(channel).is_err() {
            // The forward went away meanwhile: the channel closes here.
            tracing::debug!(host = %label, port = connected_port, "forwarded connection arrived as its forward closed");
        }
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let label = super::host_label(&self.host, self.port);
        let key = match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                return Err(HandlerError::HostKey(Error::Invalid {
                    what: format!("{label} host key"),
                    reason: "the host presented a certificate; host certificates are not supported"
                        .into(),
                }))
            }
        };
        let fingerprint = known_hosts::fingerprint(key);
        let mut verdict = known_hosts::check(&self.entries, &self.host, self.port, key);
        if verdict == Verdict::Unknown && self.policy == HostKeyPolicy::AcceptNew {
            // Checked again against the file under a lock: another first
            // contact may have recorded a key since the entries were read.
            verdict = known_hosts::record_first_seen(&self.known_hosts, &self.host, self.port, key)
                .await
                .map_err(HandlerError::HostKey)?;
            if verdict == Verdict::Unknown {
                tracing::warn!(host = %label, %fingerprint, known_hosts = %self.known_hosts.display(),
                    "accept-new: recorded the key of a host seen for the first time");
                return Ok(true);
            }
        }
        match verdict {
            Verdict::Known { .. } => Ok(true),
            Verdict::Changed { line } => Err(HandlerError::HostKey(Error::HostKeyChanged {
                host: label,
                fingerprint,
                known_hosts: self.known_hosts.clone(),
                line,
            })),
            Verdict::Revoked { line } => Err(HandlerError::HostKey(Error::HostKeyRevoked {
                host: label,
                fingerprint,
                known_hosts: self.known_hosts.clone(),
                line,
            })),
            Verdict::Unknown => Err(HandlerError::HostKey(Error::HostKeyUnknown {
                host: label,
                fingerprint,
                known_hosts: self.known_hosts.clone(),
            })),
        }
    }
}

/// An authenticated connection.
pub(crate) type Connection = client::Handle<Client>;

/// Open and authenticate one connection to `target`.
pub(crate) async fn connect(
    target: &Target,
    opts: &ConnectOptions,
    forwards: ForwardTargets,
) -> Result<Connection> {
    let label = target.host_label();
    let entries = opts.known_hosts_cache.entries(&opts.known_hosts).await?;

    let mut config = client::Config {
        keepalive_interval: Some(opts.keepalive_interval),
        keepalive_max: opts.keepalive_max,
        nodelay: true,
        ..Default::default()
    };
    // Prefer the key types on record, as OpenSSH does, so a host known by its
    // RSA key is not reported "changed" because it also offers ed25519.
    let recorded = known_hosts::recorded_algorithms(&entries, &target.address, target.port);
    if !recorded.is_empty() {
        let mut order = recorded.clone();
        order.extend(
            config
                .preferred
                .key
                .iter()
                .filter(|a| !recorded.contains(a))
                .cloned(),
        );
        config.preferred.key = Cow::Owned(order);
    }
    let handler = Client {
        host: target.address.clone(),
        port: target.port,
        target: target.clone(),
        known_hosts: opts.known_hosts.clone(),
        entries,
        policy: opts.host_key_policy,
        forwards,
    };

    let addr = (target.address.as_str(), target.port);
    let timeout = |phase| Error::Timeout {
        host: label.clone(),
        user: target.user.clone(),
        phase,
        after: match phase {
            Phase::Auth => opts.auth_timeout,
            _ => opts.connect_timeout,
        },
    };
    let mut handle = tokio::time::timeout(
        opts.connect_timeout,
        client::connect(Arc::new(config), addr, handler),
    )
    .await
    .map_err(|_| timeout(Phase::Connect))?
    .map_err(|e| match e {
        HandlerError::HostKey(e) => e,
        HandlerError::Russh(russh::Error::IO(io)) => Error::Unreachable {
            host: label.clone(),
            user: target.user.clone(),
            reason: io.to_string(),
            source: Cause::of(io),
        },
        HandlerError::Russh(e) => Error::Ssh {
            host: label.clone(),
            user: target.user.clone(),
            reason: e.to_string(),
            source: Cause::of(e),
        },
    })?;

    tokio::time::timeout(
        opts.auth_timeout,
        auth::authenticate(&mut handle, &label, &target.user, &target.identity),
    )
    .await
    .map_err(|_| timeout(Phase::Auth))??;
    Ok(handle)
}
