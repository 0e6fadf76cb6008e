//! One error type whose variants an admin can act on.
//!
//! Every variant that comes from a host names the host (`address:port`) and the
//! remote user, so a message in the hub log or on the spawn page is enough to
//! know where to look.
//!
//! The underlying error (an `io::Error`, a `russh::Error`, an SFTP or JSON
//! error) is kept as the [`std::error::Error::source`] of the variants that
//! come from one, so a caller can walk the chain and downcast; the message
//! already says it in words.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The underlying error of an [`Error`], shared so that `Error` stays `Clone`.
/// `Error::source()` returns the error inside (downcast it to `io::Error`,
/// `russh::Error`, `serde_json::Error`...), not this wrapper.
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    /// Keep `e`.
    pub fn new<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Cause(Arc::new(e))
    }

    /// `Some(Cause::new(e))`, for the `source` fields.
    pub fn of<E: std::error::Error + Send + Sync + 'static>(e: E) -> Option<Self> {
        Some(Cause::new(e))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

// Deliberately not `std::error::Error` itself: thiserror then reaches the
// inner error through this deref, so `source()` can be downcast.
impl std::ops::Deref for Cause {
    type Target = dyn std::error::Error + Send + Sync + 'static;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// Which bounded wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect plus SSH key exchange.
    Connect,
    /// User authentication.
    Auth,
    /// Opening a channel on an established connection.
    Channel,
    /// A remote command, from sending it to its exit status.
    Command,
    /// An SFTP transfer.
    Sftp,
    /// Waiting for a free session slot on the pooled connections.
    Queue,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting",
            Phase::Auth => "authenticating",
            Phase::Channel => "opening a channel",
            Phase::Command => "running a command",
            Phase::Sftp => "copying files over SFTP",
            Phase::Queue => "waiting for a free SSH session",
        })
    }
}

/// Everything that can go wrong between the hub and a host.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TCP connection could not be made (refused, no route, DNS).
    #[error("{host}: cannot connect as {user}: {reason}")]
    Unreachable {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// What the operating system said.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// A bounded wait ran out. The host may be down, blackholed or overloaded.
    #[error("{host}: timed out after {after:?} {phase} as {user}")]
    Timeout {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// What was being waited for.
        phase: Phase,
        /// The configured bound.
        after: Duration,
    },

    /// The host presented a key that the known_hosts file does not list.
    #[error(
        "{host}: host key unknown ({fingerprint}) is not in {known_hosts}; \
         add it (ssh-keyscan -p PORT ADDRESS) or set the host key policy to accept-new"
    )]
    HostKeyUnknown {
        /// `address:port`
        host: String,
        /// SHA256 fingerprint of the presented key.
        fingerprint: String,
        /// The file that was consulted.
        known_hosts: PathBuf,
    },

    /// The host presented a key that differs from the one on record: either the
    /// host was reinstalled or someone is in the middle.
    #[error(
        "{host}: host key changed: presented {fingerprint}, \
         {known_hosts} line {line} records another key"
    )]
    HostKeyChanged {
        /// `address:port`
        host: String,
        /// SHA256 fingerprint of the presented key.
        fingerprint: String,
        /// The file that was consulted.
        known_hosts: PathBuf,
        /// 1-based line number of the conflicting entry.
        line: usize,
    },

    /// The host presented a key marked `@revoked`.
    #[error("{host}: host key {fingerprint} is revoked ({known_hosts} line {line})")]
    HostKeyRevoked {
        /// `address:port`
        host: String,
        /// SHA256 fingerprint of the presented key.
        fingerprint: String,
        /// The file that was consulted.
        known_hosts: PathBuf,
        /// 1-based line number of the `@revoked` entry.
        line: usize,
    },

    /// The known_hosts file could not be read or written.
    #[error("known_hosts file {path}: {reason}")]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The server refused every credential offered.
    #[error("{host}: authentication refused for {user} with {identity}")]
    AuthRefused {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// Which key file or agent was tried.
        identity: String,
    },

    /// A private key or certificate could not be loaded.
    #[error("key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong (never the key material).
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The ssh-agent could not be used.
    #[error("ssh-agent {socket}: {reason}")]
    Agent {
        /// The agent socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The SSH connection failed after it was established (disconnect, protocol error).
    #[error("{host}: SSH connection as {user} failed: {reason}")]
    Ssh {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// What russh reported.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// A remote command ended with a non-zero status or a signal.
    #[error("{host}: remote command as {user} failed with {status}{}", stderr_suffix(.stderr_tail))]
    CommandFailed {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// `status N`, `signal KILL` or `no exit status`.
        status: String,
        /// The last lines of the command's stderr.
        stderr_tail: String,
    },

    /// A remote command printed more than the configured cap; it was stopped.
    #[error("{host}: remote command as {user} printed more than {limit} bytes; stopped it")]
    OutputTooLarge {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// The cap in bytes.
        limit: usize,
    },

    /// An SFTP operation failed.
    #[error("{host}: SFTP as {user} failed on {path}: {reason}")]
    Sftp {
        /// `address:port`
        host: String,
        /// Remote user.
        user: String,
        /// The remote path.
        path: String,
        /// What the server said.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// No configured host can take the server; `detail` lists every host and why.
    #[error("{detail}")]
    NoHost {
        /// e.g. `no host has 8G free: node1: 3.1G free, node2: down (...)`.
        detail: String,
    },

    /// The server process ended while it was being started.
    #[error("{host}: server exited during start with {status}{}", stderr_suffix(.log_tail))]
    ServerExited {
        /// Host display name.
        host: String,
        /// `status 1`, `signal 9` or `unknown status`.
        status: String,
        /// The last lines of the server's log.
        log_tail: String,
    },

    /// The chosen port was taken between choosing and starting; choose another.
    #[error("{host}: port {port} was taken before the server could start")]
    PortTaken {
        /// Host display name.
        host: String,
        /// The port.
        port: u16,
    },

    /// An SSH tunnel could not be set up (a local port taken, a forward refused).
    #[error("tunnel {what}: {reason}")]
    Tunnel {
        /// Which tunnel, e.g. `127.0.0.1:23456 -> node1:20001`.
        what: String,
        /// Why it failed.
        reason: String,
        /// The underlying error, if there is one.
        #[source]
        source: Option<Cause>,
    },

    /// A value that does not parse (a saved state that is not valid JSON...):
    /// names it; the parser's error is the `source()`. Its `kind` is
    /// `invalid`, as for [`Error::Invalid`].
    #[error("invalid {what}: {source}")]
    Malformed {
        /// Which value.
        what: String,
        /// What the parser said.
        #[source]
        source: Cause,
    },

    /// A saved server state this configuration does not let the spawner act
    /// on (yet): written by a newer version, or naming a host, login or
    /// directory today's configuration (and the configurations this hub ran
    /// with before) could not have produced. It may become acceptable again
    /// (an upgrade, the host put back), so it is kept, never taken for a
    /// stopped server.
    #[error("{what}: {reason}")]
    Refused {
        /// Which state (`server state of "alice" (pid 4242 on node2)`).
        what: String,
        /// Why, and what an admin can do.
        reason: String,
    },

    /// A value handed to this crate is not acceptable (names what and why).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which value.
        what: String,
        /// Why it was refused.
        reason: String,
    },
}

fn stderr_suffix(tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{}", printable(tail))
    }
}

/// Text a host printed, fit for a message a person reads (a progress event,
/// a log line, a terminal): every control character but newline and tab,
/// and every character that reorders text (bidi embeddings, overrides and
/// isolates, the direction marks), becomes `?`. A host's stderr or a
/// server's log could otherwise move the cursor, recolour or hide text, or
/// rewrite what an admin's terminal shows.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control() => '?',
            '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => '?',
            c => c,
        })
        .collect()
}

/// `text` cut to its first `max` characters, with `…` when it was longer:
/// what a host or a user sent, quoted in a message without filling it.
pub fn clipped(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

impl Error {
    /// A stable, short name for the variant (what the Python class acts on).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "unreachable",
            Error::Timeout { .. } => "timeout",
            Error::HostKeyUnknown { .. } => "host_key_unknown",
            Error::HostKeyChanged { .. } => "host_key_changed",
            Error::HostKeyRevoked { .. } => "host_key_revoked",
            Error::KnownHosts { .. } => "known_hosts",
            Error::AuthRefused { .. } => "auth_refused",
            Error::Key { .. } => "key",
            Error::Agent { .. } => "agent",
            Error::Ssh { .. } => "ssh",
            Error::CommandFailed { .. } => "command_failed",
            Error::OutputTooLarge { .. } => "output_too_large",
            Error::Sftp { .. } => "sftp",
            Error::NoHost { .. } => "no_host",
            Error::ServerExited { .. } => "server_exited",
            Error::PortTaken { .. } => "port_taken",
            Error::Tunnel { .. } => "tunnel",
            Error::Refused { .. } => "refused",
            Error::Invalid { .. } | Error::Malformed { .. } => "invalid",
        }
    }

    /// True when the error says nothing about the remote process, only that the
    /// host could not be asked: callers must treat the server's state as unknown.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::Ssh { .. }
        )
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_keeps_short_text_and_marks_a_cut() {
        assert_eq!(clipped("abc", 3), "abc");
        assert_eq!(clipped("abcd", 3), "abc…");
        assert_eq!(clipped("ééé", 2), "éé…");
        assert_eq!(clipped("", 0), "");
    }

    #[test]
    fn host_text_in_messages_is_printable() {
        let hostile = "ok\x1b[2J\x1b]0;title\x07\rover\u{202e}txt.exe\u{2066}\nnext\tline\x00";
        for err in [
            Error::CommandFailed {
                host: "h".into(),
                user: "u".into(),
                status: "status 2".into(),
                stderr_tail: hostile.into(),
            },
            Error::ServerExited {
                host: "h".into(),
                status: "status 1".into(),
                log_tail: hostile.into(),
            },
        ] {
            let msg = err.to_string();
            assert!(
                !msg.chars()
                    .any(|c| (c.is_control() && c != '\n' && c != '\t')
                        || ('\u{202A}'..='\u{202E}').contains(&c)
                        || ('\u{2066}'..='\u{2069}').contains(&c)),
                "{msg:?}"
            );
            assert!(
                msg.ends_with("ok?[2J?]0;title??over?txt.exe?\nnext\tline?"),
                "{msg:?}"
            );
        }
    }

    /// One of each variant. The match has no wildcard: a new variant does
    /// not compile until it is added here (and so to the check below).
    fn one_of_each() -> Vec<Error> {
        let h = || "node1:22".to_string();
        let u = || "alice".to_string();
        let all = vec![
            Error::Unreachable {
                host: h(),
                user: u(),
                reason: "refused".into(),
                source: None,
            },
            Error::Timeout {
                host: h(),
                user: u(),
                phase: Phase::Connect,
                after: Duration::from_secs(1),
            },
            Error::HostKeyUnknown {
                host: h(),
                fingerprint: "SHA256:x".into(),
                known_hosts: "k".into(),
            },
            Error::HostKeyChanged {
                host: h(),
                fingerprint: "SHA256:x".into(),
                known_hosts: "k".into(),
                line: 1,
            },
            Error::HostKeyRevoked {
                host: h(),
                fingerprint: "SHA256:x".into(),
                known_hosts: "k".into(),
                line: 1,
            },
            Error::KnownHosts {
                path: "k".into(),
                reason: "missing".into(),
                source: None,
            },
            Error::AuthRefused {
                host: h(),
                user: u(),
                identity: "key k".into(),
            },
            Error::Key {
                path: "k".into(),
                reason: "missing".into(),
                source: None,
            },
            Error::Agent {
                socket: "s".into(),
                reason: "missing".into(),
                source: None,
            },
            Error::Ssh {
                host: h(),
                user: u(),
                reason: "eof".into(),
                source: None,
            },
            Error::CommandFailed {
                host: h(),
                user: u(),
                status: "status 1".into(),
                stderr_tail: String::new(),
            },
            Error::OutputTooLarge {
                host: h(),
                user: u(),
                limit: 1,
            },
            Error::Sftp {
                host: h(),
                user: u(),
                path: "p".into(),
                reason: "denied".into(),
                source: None,
            },
            Error::NoHost {
                detail: "none".into(),
            },
            Error::ServerExited {
                host: h(),
                status: "status 1".into(),
                log_tail: String::new(),
            },
            Error::PortTaken { host: h(), port: 1 },
            Error::Tunnel {
                what: "t".into(),
                reason: "r".into(),
                source: None,
            },
            Error::Refused {
                what: "w".into(),
                reason: "r".into(),
            },
            Error::Invalid {
                what: "w".into(),
                reason: "r".into(),
            },
            Error::Malformed {
                what: "w".into(),
                source: Cause::new(std::io::Error::other("r")),
            },
        ];
        for e in &all {
            match e {
                Error::Unreachable { .. }
                | Error::Timeout { .. }
                | Error::HostKeyUnknown { .. }
                | Error::HostKeyChanged { .. }
                | Error::HostKeyRevoked { .. }
                | Error::KnownHosts { .. }
                | Error::AuthRefused { .. }
                | Error::Key { .. }
                | Error::Agent { .. }
                | Error::Ssh { .. }
                | Error::CommandFailed { .. }
                | Error::OutputTooLarge { .. }
                | Error::Sftp { .. }
                | Error::NoHost { .. }
                | Error::ServerExited { .. }
                | Error::PortTaken { .. }
                | Error::Tunnel { .. }
                | Error::Refused { .. }
                | Error::Invalid { .. }
                | Error::Malformed { .. } => {}
            }
        }
        all
    }

    /// The chain from `e` down: `e`, its source, that one's source...
    fn chain(e: &Error) -> Vec<&(dyn std::error::Error + 'static)> {
        std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .collect()
    }

    #[tokio::test]
    async fn a_refused_connect_keeps_the_io_error() {
        use crate::ssh::{Command, ConnectOptions, Identity, Pool, PoolOptions, Target};
        // A port nobody listens on (bound, then let go).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let pool = Pool::new(PoolOptions::new(ConnectOptions::new(
            "/nonexistent/known_hosts",
        )));
        let target = Target::new(
            "127.0.0.1",
            "nobody",
            Identity::KeyFile("/nonexistent/key".into()),
        )
        .port(port);
        let err = pool.exec(&target, &Command::new("true")).await.unwrap_err();
        assert_eq!(err.kind(), "unreachable", "{err}");
        // The message is as before: where, as whom, what the system said.
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("127.0.0.1:{port}: cannot connect as nobody: ")),
            "{msg}"
        );
        let source = std::error::Error::source(&err).expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .unwrap_or_else(|| panic!("source is not an io::Error: {source:?}"));
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(msg.ends_with(&io.to_string()), "{msg}");
    }

    #[test]
    fn a_state_that_is_not_json_keeps_the_parser_error() {
        let err = crate::plan::state::decode("{\"run_id\": ").unwrap_err();
        assert_eq!(err.kind(), "invalid");
        let msg = err.to_string();
        assert!(msg.starts_with("invalid server state: "), "{msg}");
        let chain = chain(&err);
        assert_eq!(chain.len(), 2, "{chain:?}");
        let json = chain[1]
            .downcast_ref::<serde_json::Error>()
            .unwrap_or_else(|| panic!("source is not a serde_json::Error: {:?}", chain[1]));
        assert!(json.is_eof());
        assert_eq!(msg, format!("invalid server state: {json}"));
    }

    #[test]
    fn an_unwritable_known_hosts_keeps_the_io_error() {
        let path = PathBuf::from("/nonexistent-ssh-spawner-dir/known_hosts");
        let err = crate::ssh::known_hosts::append(&path, "line").unwrap_err();
        assert_eq!(err.kind(), "known_hosts");
        assert!(
            err.to_string()
                .starts_with("known_hosts file /nonexistent-ssh-spawner-dir/known_hosts: "),
            "{err}"
        );
        let io = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("an io::Error source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn errors_without_an_underlying_one_have_no_source() {
        for e in one_of_each() {
            let has = std::error::Error::source(&e).is_some();
            assert_eq!(has, matches!(e, Error::Malformed { .. }), "{e}");
        }
    }

    #[test]
    fn every_error_kind_is_in_the_troubleshooting_page() {
        let page = include_str!("../docs/troubleshooting.md");
        for e in one_of_each() {
            let needle = format!("`kind`: `{}`", e.kind());
            assert!(
                page.contains(&needle),
                "docs/troubleshooting.md lacks {needle} ({e})"
            );
        }
    }
}
