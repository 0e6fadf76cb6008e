//! Who the hub is when it logs in: a private key file (with its OpenSSH
//! certificate when one lies next to it) or an ssh-agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::Handle;
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{Algorithm, PrivateKeyWithHashAlg};

use crate::error::{Cause, Error, Result};

/// The credential used for a connection. Part of the pool key: two users whose
/// keys differ never share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    /// An unencrypted OpenSSH or PEM private key (ed25519, ECDSA, RSA). If
    /// `PATH-cert.pub` exists, the certificate is offered instead of the bare key.
    KeyFile(PathBuf),
    /// The keys of an ssh-agent listening on this socket.
    Agent(PathBuf),
}

impl Identity {
    /// The agent named by `$SSH_AUTH_SOCK`.
    pub fn agent_from_env() -> Result<Identity> {
        match std::env::var_os("SSH_AUTH_SOCK") {
            Some(sock) if !sock.is_empty() => Ok(Identity::Agent(PathBuf::from(sock))),
            _ => Err(Error::Invalid {
                what: "ssh-agent".into(),
                reason: "SSH_AUTH_SOCK is not set; give the agent socket explicitly".into(),
            }),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::KeyFile(p) => write!(f, "key {}", p.display()),
            Identity::Agent(p) => write!(f, "ssh-agent {}", p.display()),
        }
    }
}

/// Authenticate `user` on an established connection. Returns
/// [`Error::AuthRefused`] when the server accepts none of what was offered.
pub(crate) async fn authenticate<H: russh::client::Handler>(
    handle: &mut Handle<H>,
    host: &str,
    user: &str,
    identity: &Identity,
) -> Result<()> {
    let ok = match identity {
        Identity::KeyFile(path) => with_key_file(handle, host, user, path).await?,
        Identity::Agent(socket) => with_agent(handle, host, user, socket).await?,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::AuthRefused {
            host: host.to_string(),
            user: user.to_string(),
            identity: identity.to_string(),
        })
    }
}

fn ssh_err<E: std::error::Error + Send + Sync + 'static>(host: &str, user: &str, e: E) -> Error {
    Error::Ssh {
        host: host.to_string(),
        user: user.to_string(),
        reason: e.to_string(),
        source: Cause::of(e),
    }
}

async fn with_key_file<H: russh::client::Handler>(
    handle: &mut Handle<H>,
    host: &str,
    user: &str,
    path: &Path,
) -> Result<bool> {
    let key_err = |reason: String, source: Option<Cause>| Error::Key {
        path: path.to_path_buf(),
        reason,
        source,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| key_err(e.to_string(), Cause::of(e)))?;
    // The decoder's message never contains key material.
    let key = russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => key_err(
            "is protected by a passphrase; load it into an ssh-agent and use agent authentication"
                .into(),
            Cause::of(e),
        ),
        other => key_err(
            format!("cannot be read as a private key: {other}"),
            Cause::of(other),
        ),
    })?;
    let key = Arc::new(key);

    let mut cert_path = path.as_os_str().to_owned();
    cert_path.push("-cert.pub");
    let cert_path = PathBuf::from(cert_path);
    if tokio::fs::try_exists(&cert_path).await.unwrap_or(false) {
        let text = tokio::fs::read_to_string(&cert_path)
            .await
            .map_err(|e| Error::Key {
                path: cert_path.clone(),
                reason: e.to_string(),
                source: Cause::of(e),
            })?;
        let cert = russh::keys::Certificate::from_openssh(text.trim()).map_err(|e| Error::Key {
            path: cert_path.clone(),
            reason: format!("cannot be read as an OpenSSH certificate: {e}"),
            source: Cause::of(e),
        })?;
        let result = handle
            .authenticate_openssh_cert(user, key.clone(), cert)
            .await
            .map_err(|e| ssh_err(host, user, e))?;
        if result.success() {
            return Ok(true);
        }
        tracing::debug!(host, user, cert = %cert_path.display(), "certificate refused, trying the bare key");
    }

    let hash = rsa_hash(handle, key.algorithm(), host, user).await?;
    let result = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
        .await
        .map_err(|e| ssh_err(host, user, e))?;
    Ok(result.success())
}

async fn rsa_hash<H: russh::client::Handler>(
    handle: &Handle<H>,
    alg: Algorithm,
    host: &str,
    user: &str,
) -> Result<Option<russh::keys::HashAlg>> {
    if !matches!(alg, Algorithm::Rsa { .. }) {
        return Ok(None);
    }
    Ok(handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| ssh_err(host, user, e))?
        .flatten())
}

async fn with_agent<H: russh::client::Handler>(
    handle: &mut Handle<H>,
    host: &str,
    user: &str,
    socket: &Path,
) -> Result<bool> {
    let agent_err = |reason: String, source: Option<Cause>| Error::Agent {
        socket: socket.to_path_buf(),
        reason,
        source,
    };
    let mut agent = AgentClient::connect_uds(socket)
        .await
        .map_err(|e| agent_err(format!("cannot connect: {e}"), Cause::of(e)))?;
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| agent_err(format!("cannot list keys: {e}"), Cause::of(e)))?;
    if identities.is_empty() {
        return Err(agent_err("holds no keys".into(), None));
    }
    for identity in identities {
        let result = match identity {
            AgentIdentity::PublicKey { key, .. } => {
                let hash = rsa_hash(handle, key.algorithm(), host, user).await?;
                handle
                    .authenticate_publickey_with(user, key, hash, &mut agent)
                    .await
            }
            AgentIdentity::Certificate { certificate, .. } => {
                let hash = rsa_hash(handle, certificate.algorithm(), host, user).await?;
                handle
                    .authenticate_certificate_with(user, certificate, hash, &mut agent)
                    .await
            }
        };
        match result {
            Ok(r) if r.success() => return Ok(true),
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(host, user, "agent could not sign: {e}");
                continue;
            }
        }
    }
    Ok(false)
}
