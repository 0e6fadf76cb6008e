//! The SSH layer: moves bytes, decides nothing.
//!
//! - [`known_hosts`]: host-key verification (pure parsing and checking).
//! - [`auth`]: key files, certificates, ssh-agent.
//! - [`connect`]: one bounded, verified, authenticated connection; it hands
//!   the channels sshd opens for remote forwards to their forward's sink.
//! - [`tunnel`]: carrying bytes between TCP sockets and channels, given a
//!   channel opener; knows nothing of connections.
//! - [`pool`]: many channels over few connections, with replacement and idle
//!   close; it sits above `connect` and `tunnel` and builds the tunnels
//!   ([`LocalForward::bind`], [`RemoteForward::open`]).
//! - [`exec`]: a command with stdin, bounded in time and output.
//! - [`health`]: which hosts answer, and the background probe of a down one.
//! - [`sftp`]: uploads with exact modes.

pub mod auth;
pub mod connect;
pub mod exec;
pub mod health;
pub mod known_hosts;
pub mod pool;
pub mod sftp;
pub mod tunnel;

pub use auth::Identity;
pub use connect::ConnectOptions;
pub use exec::{Command, Output};
pub use known_hosts::HostKeyPolicy;
pub use pool::{Pool, PoolOptions, PoolStats};
pub use sftp::Upload;
pub use tunnel::{forward_port_refused, LocalForward, RemoteForward};

/// Where to connect and as whom: the pool key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// DNS name or IP address of the host.
    pub address: String,
    /// SSH port.
    pub port: u16,
    /// Remote user name.
    pub user: String,
    /// The credential.
    pub identity: Identity,
}

impl Target {
    /// A target on port 22.
    pub fn new(address: impl Into<String>, user: impl Into<String>, identity: Identity) -> Self {
        Target {
            address: address.into(),
            port: 22,
            user: user.into(),
            identity,
        }
    }

    /// Set the port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// `address:port`, as errors name a host.
    pub fn host_label(&self) -> String {
        host_label(&self.address, self.port)
    }
}

/// `address:port`, with an IPv6 address in brackets: how errors, metrics
/// and the hosts' health name a host.
pub fn host_label(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_label_brackets_an_ipv6_address_only() {
        assert_eq!(host_label("198.18.0.11", 22), "198.18.0.11:22");
        assert_eq!(host_label("node1.lab", 2222), "node1.lab:2222");
        assert_eq!(host_label("fd00::5", 22), "[fd00::5]:22");
        let target =
            Target::new("::1", "alice", Identity::KeyFile("/nonexistent".into())).port(2222);
        assert_eq!(target.host_label(), "[::1]:2222");
    }
}
