//! Internal TLS: the names a server's certificate is valid for, and the
//! key, certificate and CA copied into its directory over SFTP.

use super::prepare::Prepared;
use super::progress::Progress;
use super::Spawner;
use crate::config::Config;
use crate::error::Result;
use crate::ssh::Upload;

impl Prepared {
    /// DNS name and IP alt names for the host's TLS certificate.
    pub fn alt_names(&self) -> Vec<String> {
        alt_names(&self.state.address, &self.facts.hostname, &self.state.host)
    }
}

/// Alt names for a certificate valid for a host reached at `address`.
pub fn alt_names(address: &str, hostname: &str, display: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut push = |n: String| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    if address.parse::<std::net::IpAddr>().is_ok() {
        push(format!("IP:{address}"));
    } else {
        push(format!("DNS:{address}"));
    }
    for n in [hostname, display] {
        let dns_like = !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if dns_like && n.parse::<std::net::IpAddr>().is_err() {
            push(format!("DNS:{n}"));
        }
    }
    names
}

/// Remote paths of uploaded certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertPaths {
    /// Private key.
    pub keyfile: String,
    /// Certificate.
    pub certfile: String,
    /// CA bundle.
    pub cafile: String,
}

impl Spawner {
    /// Upload key, certificate and CA into the per-server directory (0600)
    /// and return their remote paths.
    #[tracing::instrument(name = "server", skip_all, fields(user = %prepared.state.username, server = %prepared.state.server_name, host = %prepared.state.host))]
    pub async fn upload_certs(
        &self,
        prepared: &Prepared,
        key: Vec<u8>,
        cert: Vec<u8>,
        ca: Vec<u8>,
        progress: &Progress,
    ) -> Result<CertPaths> {
        let dir = format!("{}/certs", prepared.state.dir);
        let paths = CertPaths {
            keyfile: format!("{dir}/server.key"),
            certfile: format!("{dir}/server.crt"),
            cafile: format!("{dir}/ca.crt"),
        };
        let files = vec![
            Upload {
                path: paths.keyfile.clone(),
                contents: key,
                mode: 0o600,
            },
            Upload {
                path: paths.certfile.clone(),
                contents: cert,
                mode: 0o600,
            },
            Upload {
                path: paths.cafile.clone(),
                contents: ca,
                mode: 0o600,
            },
        ];
        let (target, _) = self.state_target(&prepared.state).await?;
        self.pool
            .upload(
                &target,
                &files,
                Config::duration(self.config.command_timeout),
            )
            .await?;
        progress.emit(
            35,
            format!(
                "Certificates copied to {} (readable only by {})",
                prepared.state.host, prepared.state.remote_user
            ),
        );
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_names_cover_ip_and_names() {
        assert_eq!(
            alt_names("198.18.0.11", "node1", "node1"),
            vec!["IP:198.18.0.11", "DNS:node1"]
        );
        assert_eq!(
            alt_names("gpu1.lab.org", "gpu1", "GPU 1"),
            vec!["DNS:gpu1.lab.org", "DNS:gpu1"]
        );
    }
}
