//! The tunnels of each server in this hub process: the local end of the
//! tunnel to the server and the hub tunnel on its host, opened again after
//! a restart on the ports the state records.

use super::prepare::Prepared;
use super::{ServerTunnels, Spawner};
use crate::error::{Error, Result};
use crate::plan::state::{check_host_port, ServerState};
use crate::ssh::{LocalForward, RemoteForward};

impl Spawner {
    /// Hub tunnel: ask sshd on the prepared host to listen on its loopback and
    /// carry connections to the hub API at `to` (`host:port`); returns the
    /// port on the host, which the server's environment must point at.
    /// Asking again for the same spawn returns the same port.
    #[tracing::instrument(name = "server", skip_all, fields(user = %prepared.state.username, server = %prepared.state.server_name, host = %prepared.state.host))]
    pub async fn open_hub_forward(&self, prepared: &mut Prepared, to: &str) -> Result<u16> {
        check_host_port(to).map_err(|r| Error::Invalid {
            what: format!("hub API address {to:?}"),
            reason: r,
        })?;
        let run_id = prepared.state.run_id.clone();
        if let (Some(port), Some(old)) = (
            self.hub_forward_port(&run_id),
            prepared.state.hub_forward_to.as_deref(),
        ) {
            if old == to {
                return Ok(port);
            }
        }
        let (target, _) = self.state_target(&prepared.state).await?;
        let fwd = RemoteForward::open(self.pool.clone(), target, 0, to.to_string()).await?;
        let port = fwd.port();
        self.put_tunnel(&run_id, None, Some(fwd));
        prepared.state.hub_forward_port = Some(port);
        prepared.state.hub_forward_to = Some(to.to_string());
        Ok(port)
    }

    pub(super) fn hub_forward_port(&self, run_id: &str) -> Option<u16> {
        self.tunnels
            .lock()
            .ok()?
            .get(run_id)?
            .hub
            .as_ref()
            .map(|f| f.port())
    }

    pub(super) fn put_tunnel(
        &self,
        run_id: &str,
        local: Option<LocalForward>,
        hub: Option<RemoteForward>,
    ) {
        if let Ok(mut map) = self.tunnels.lock() {
            let t = map.entry(run_id.to_string()).or_default();
            if local.is_some() {
                t.local = local;
            }
            if hub.is_some() {
                t.hub = hub;
            }
        }
    }

    /// Close a server's tunnels (dropped outside the lock).
    pub(super) fn close_tunnel(&self, run_id: &str, local: bool, hub: bool) {
        let mut closing = ServerTunnels::default();
        if let Ok(mut map) = self.tunnels.lock() {
            if let Some(t) = map.get_mut(run_id) {
                if local {
                    closing.local = t.local.take();
                }
                if hub {
                    closing.hub = t.hub.take();
                }
                if t.local.is_none() && t.hub.is_none() {
                    map.remove(run_id);
                }
            }
        }
        drop(closing);
    }

    /// Open the tunnels a state records and this process does not have yet
    /// (after a hub restart), on the same ports: the hub's proxy routes and
    /// the server's environment name them. The hub calls it after each poll
    /// that found the server running; one-shot tools (the CLI) do not.
    ///
    /// A local port taken meanwhile by another program is replaced by a free
    /// one ([`Spawner::local_tunnel_port`] tells which): the hub moves its
    /// route there (JupyterHub asks `get_url()` after a restart's poll), so the
    /// server is neither lost nor left running unknown to the hub.
    #[tracing::instrument(name = "server", skip_all, fields(user = %state.username, server = %state.server_name, host = %state.host))]
    pub async fn ensure_tunnels(&self, state: &ServerState) -> Result<()> {
        let (has_local, has_hub) = match self.tunnels.lock() {
            Ok(map) => map
                .get(&state.run_id)
                .map(|t| (t.local.is_some(), t.hub.is_some()))
                .unwrap_or((false, false)),
            Err(_) => (false, false),
        };
        let want_local = state.tunnel_port.filter(|_| !has_local);
        // The hub tunnel carries to the hub API as this hub knows it, not
        // to what the state names (see `Spawner::set_hub_api`); until the
        // hub says where that is, it is not asked for again.
        let want_hub = match (state.hub_forward_port, self.hub_api(), has_hub) {
            (Some(p), Some(to), false) => Some((p, to)),
            _ => None,
        };
        if want_local.is_none() && want_hub.is_none() {
            return Ok(());
        }
        let (target, _) = self.state_target(state).await?;
        if let Some(port) = want_local {
            let bind = |port| {
                LocalForward::bind(
                    self.pool.clone(),
                    target.clone(),
                    port,
                    "127.0.0.1".into(),
                    state.port,
                )
            };
            let fwd = match bind(port).await {
                Ok(fwd) => {
                    tracing::info!(host = %state.host, run = %state.run_id, port, "tunnel to the server listening again");
                    fwd
                }
                Err(taken) => {
                    let fwd = bind(0).await?;
                    tracing::warn!(host = %state.host, run = %state.run_id, port, new_port = fwd.port(), "tunnel port taken by another program ({taken}); the tunnel to the server listens on another port");
                    fwd
                }
            };
            self.put_tunnel(&state.run_id, Some(fwd), None);
        }
        if let Some((port, to)) = want_hub {
            let fwd = RemoteForward::open(self.pool.clone(), target, port, to)
                .await
                .inspect_err(|e| {
                    if crate::ssh::forward_port_refused(e) {
                        tracing::error!(host = %state.host, run = %state.run_id, port, "the hub tunnel's port is taken on the host since the hub was down: another user may be receiving the server's hub API calls (their token too, unless internal_ssl); the server is kept for unreachable_grace while it is retried: {e}");
                    }
                })?;
            tracing::info!(host = %state.host, run = %state.run_id, port, "hub tunnel requested again");
            self.put_tunnel(&state.run_id, None, Some(fwd));
        }
        Ok(())
    }

    /// The local port of a server's tunnel in this process, if it has one
    /// (it differs from the state's `tunnel_port` once that was taken).
    pub fn local_tunnel_port(&self, run_id: &str) -> Option<u16> {
        self.tunnels
            .lock()
            .ok()?
            .get(run_id)?
            .local
            .as_ref()
            .map(|f| f.port())
    }
}
