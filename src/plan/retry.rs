//! What a start does after a failed launch: another port on the same host,
//! another host, or give up. One rule set for every caller (the hub class,
//! the CLI, the tests): [`crate::spawner::Spawner::start`] asks [`next`].
//!
//! The rules:
//! - A port taken between choosing and starting (`port_taken`): another port
//!   on the same host, until `port_retries` more ports were tried there.
//! - A host that did not answer during the launch (`unreachable`, `timeout`,
//!   `ssh`): the launch may have reached it, so the attempt is always
//!   abandoned to a clean-up that stops it once the host answers. The start
//!   then moves to another host, unless the user chose this host (a pinned
//!   server is never moved behind the user's back) or the server's TLS
//!   certificate names this host (`internal_ssl`). Hosts run out by
//!   themselves: each host is tried at most once per start.
//! - Anything else (the server exited, a refused key, an invalid value):
//!   the start fails with that error; another host would not help.

use crate::error::Error;

/// How a launch failed, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The chosen port was taken when the server was about to start.
    PortTaken,
    /// The host did not answer; what happened there is unknown.
    Unreachable,
    /// Any other failure.
    Other,
}

impl Failure {
    /// The retry class of an error.
    pub fn of(e: &Error) -> Failure {
        match e {
            Error::PortTaken { .. } => Failure::PortTaken,
            e if e.is_unreachable() => Failure::Unreachable,
            _ => Failure::Other,
        }
    }
}

/// Where a start stands when a launch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Ports tried on the current host so far, the failed one included.
    pub ports_tried: usize,
    /// `port_retries`: other ports a host gets after the first was taken.
    pub port_retries: u32,
    /// The user chose this host (options form or REST option `host`).
    pub pinned: bool,
    /// The server may move to another host (false when its certificate
    /// already names this one).
    pub may_move: bool,
}

/// Why a start gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The failure is not one a retry can help with: report it as it is.
    AsItIs,
    /// `port_retries` ports in a row were taken on this host.
    PortsExhausted,
    /// The host the user chose did not answer.
    PinnedUnreachable,
    /// The host did not answer and the certificate names it.
    CertificateNamesHost,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Launch again on the same host with another port.
    OtherPort,
    /// Abandon this attempt to a later clean-up and try another host.
    OtherHost,
    /// Give up.
    Fail {
        /// Why.
        why: Stop,
        /// The launch may have reached the host: leave the attempt to a
        /// clean-up that stops it once the host answers.
        abandon: bool,
    },
}

/// The decision after a failed launch.
pub fn next(failure: Failure, at: &Attempt) -> Next {
    match failure {
        Failure::PortTaken if at.ports_tried <= at.port_retries as usize => Next::OtherPort,
        Failure::PortTaken => Next::Fail {
            why: Stop::PortsExhausted,
            abandon: false,
        },
        Failure::Unreachable if at.pinned => Next::Fail {
            why: Stop::PinnedUnreachable,
            abandon: true,
        },
        Failure::Unreachable if !at.may_move => Next::Fail {
            why: Stop::CertificateNamesHost,
            abandon: true,
        },
        Failure::Unreachable => Next::OtherHost,
        Failure::Other => Next::Fail {
            why: Stop::AsItIs,
            abandon: false,
        },
    }
}

/// The environment of one attempt, from the environment the hub built for
/// the first one: `JUPYTERHUB_SERVICE_URL` (where the server listens) gets
/// the attempt's port, and with a hub tunnel (`hub_forward_port`) every
/// value naming the hub API's origin (scheme and authority of
/// `JUPYTERHUB_API_URL`) names `127.0.0.1:PORT` on the host instead.
pub fn attempt_env(
    base: &[(String, String)],
    port: u16,
    hub_forward_port: Option<u16>,
) -> Vec<(String, String)> {
    let origin = hub_forward_port.and_then(|_| {
        base.iter()
            .find(|(k, _)| k == "JUPYTERHUB_API_URL")
            .and_then(|(_, v)| split_url(v))
            .map(|(scheme, authority, _)| (scheme.to_string(), format!("{scheme}://{authority}")))
    });
    base.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            if k == "JUPYTERHUB_SERVICE_URL" {
                if let Some(url) = with_port(&v, port) {
                    v = url;
                }
            }
            if let (Some((scheme, origin)), Some(remote)) = (&origin, hub_forward_port) {
                if let Some(rest) = v.strip_prefix(origin.as_str()) {
                    if rest.is_empty() || rest.starts_with('/') {
                        v = format!("{scheme}://127.0.0.1:{remote}{rest}");
                    }
                }
            }
            (k.clone(), v)
        })
        .collect()
}

/// `(scheme, authority, rest)` of `scheme://authority/rest`.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find('/').unwrap_or(after.len());
    Some((scheme, &after[..end], &after[end..]))
}

/// `url` with its authority's port replaced (IPv6 literals kept).
fn with_port(url: &str, port: u16) -> Option<String> {
    let (scheme, authority, rest) = split_url(url)?;
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    Some(format!("{scheme}://{host}:{port}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ports_tried: usize, pinned: bool, may_move: bool) -> Attempt {
        Attempt {
            ports_tried,
            port_retries: 2,
            pinned,
            may_move,
        }
    }

    #[test]
    fn a_taken_port_gets_port_retries_more_ports_on_the_same_host() {
        assert_eq!(
            next(Failure::PortTaken, &at(1, false, true)),
            Next::OtherPort
        );
        assert_eq!(
            next(Failure::PortTaken, &at(2, false, true)),
            Next::OtherPort
        );
        assert_eq!(
            next(Failure::PortTaken, &at(3, false, true)),
            Next::Fail {
                why: Stop::PortsExhausted,
                abandon: false
            }
        );
        // A pinned host or a certificate does not change the port rule.
        assert_eq!(
            next(Failure::PortTaken, &at(1, true, false)),
            Next::OtherPort
        );
        let none = Attempt {
            port_retries: 0,
            ..at(1, false, true)
        };
        assert!(matches!(next(Failure::PortTaken, &none), Next::Fail { .. }));
    }

    #[test]
    fn an_unanswering_host_is_left_for_another_unless_pinned_or_certified() {
        assert_eq!(
            next(Failure::Unreachable, &at(1, false, true)),
            Next::OtherHost
        );
        assert_eq!(
            next(Failure::Unreachable, &at(1, true, true)),
            Next::Fail {
                why: Stop::PinnedUnreachable,
                abandon: true
            }
        );
        assert_eq!(
            next(Failure::Unreachable, &at(1, false, false)),
            Next::Fail {
                why: Stop::CertificateNamesHost,
                abandon: true
            }
        );
    }

    #[test]
    fn other_failures_end_the_start_and_leave_nothing_to_clean_up() {
        for a in [at(1, false, true), at(1, true, false), at(9, false, true)] {
            assert_eq!(
                next(Failure::Other, &a),
                Next::Fail {
                    why: Stop::AsItIs,
                    abandon: false
                }
            );
        }
    }

    #[test]
    fn errors_are_classed_by_what_a_retry_can_do() {
        let port = Error::PortTaken {
            host: "node1".into(),
            port: 20001,
        };
        assert_eq!(Failure::of(&port), Failure::PortTaken);
        let down = Error::Unreachable {
            host: "node1:22".into(),
            user: "alice".into(),
            reason: "refused".into(),
            source: None,
        };
        assert_eq!(Failure::of(&down), Failure::Unreachable);
        let exited = Error::ServerExited {
            host: "node1".into(),
            status: "status 1".into(),
            log_tail: String::new(),
        };
        assert_eq!(Failure::of(&exited), Failure::Other);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_attempt_env_names_the_attempts_port() {
        let base = env(&[
            ("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:20001/user/a/"),
            ("JUPYTERHUB_API_URL", "http://10.0.0.1:8081/hub/api"),
            ("OTHER", "http://0.0.0.0:20001/"),
        ]);
        let out = attempt_env(&base, 27005, None);
        assert_eq!(out[0].1, "http://0.0.0.0:27005/user/a/");
        assert_eq!(out[1].1, "http://10.0.0.1:8081/hub/api");
        assert_eq!(out[2].1, "http://0.0.0.0:20001/", "only the service URL");
        let v6 = env(&[("JUPYTERHUB_SERVICE_URL", "https://[::]:20001/x")]);
        assert_eq!(attempt_env(&v6, 1, None)[0].1, "https://[::]:1/x");
        let bare = env(&[("JUPYTERHUB_SERVICE_URL", "http://[::1]/")]);
        assert_eq!(attempt_env(&bare, 2, None)[0].1, "http://[::1]:2/");
        let junk = env(&[("JUPYTERHUB_SERVICE_URL", "not a url")]);
        assert_eq!(attempt_env(&junk, 2, None)[0].1, "not a url");
    }

    #[test]
    fn with_a_hub_tunnel_the_hub_api_is_reached_on_the_hosts_loopback() {
        let base = env(&[
            ("JUPYTERHUB_API_URL", "http://10.0.0.1:8081/hub/api"),
            (
                "JUPYTERHUB_ACTIVITY_URL",
                "http://10.0.0.1:8081/hub/api/users/a/activity",
            ),
            ("NEAR", "http://10.0.0.1:80815/"),
            ("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:20001/user/a/"),
        ]);
        let out = attempt_env(&base, 20001, Some(41000));
        assert_eq!(out[0].1, "http://127.0.0.1:41000/hub/api");
        assert_eq!(out[1].1, "http://127.0.0.1:41000/hub/api/users/a/activity");
        assert_eq!(out[2].1, "http://10.0.0.1:80815/", "another origin");
        assert_eq!(out[3].1, "http://0.0.0.0:20001/user/a/");
    }
}
