//! Which saved states the spawner acts on, and where: the line between a
//! server started under an older configuration (still polled, reached and
//! stopped) and a forged or corrupted state (never followed).
//!
//! A state comes from the hub database, so whoever can write that database
//! could hand the hub any state. The line, explained in docs/security.md
//! ("Saved states"):
//! - **Host**: a configured host, by address and port; else the configured
//!   host of the same name (the host was re-addressed: it is reached at its
//!   new address); else a host whose key known_hosts lists (a host retired
//!   from `hosts`: its servers are polled and stopped as on a draining host).
//!   Never a host known_hosts does not list: the hub does not even connect.
//! - **Login**: what `remote_user` maps the hub user to today, or mapped it
//!   to under a configuration this hub ran with before (its history, kept in
//!   `journal_dir`, which the database cannot write).
//! - **Directory**: `HOME/STATE_DIR/RUN_ID` for today's `state_dir` or one
//!   this hub ran with before; the host checks the home part again
//!   ([`super::state::host_guard`]).
//!
//! A state outside the line is [`Error::Refused`] (or [`Error::Invalid`]
//! when nothing could make it valid): the hub keeps it, logs what to do, and
//! acts on nothing.

use super::state::ServerState;
use crate::error::{Error, Result};

/// A configured host, as far as this decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// Display name (the address when the entry names none).
    pub name: &'a str,
    /// Address the hub connects to.
    pub address: &'a str,
    /// SSH port.
    pub port: u16,
}

/// What a state may name.
#[derive(Debug, Clone)]
pub struct Rules<'a> {
    /// The configured hosts.
    pub hosts: Vec<Host<'a>>,
    /// Logins the hub user is mapped to, today's first.
    pub logins: Vec<String>,
    /// `state_dir` values, today's first.
    pub state_dirs: Vec<String>,
}

/// How the state's host stands in today's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNow {
    /// Configured at the address and port the state names.
    Configured,
    /// The configured host of the state's name is at another address now.
    Readdressed,
    /// No longer configured; known_hosts lists its key.
    Retired,
}

/// Where and how to act on an accepted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Address to connect to.
    pub address: String,
    /// SSH port to connect to.
    pub port: u16,
    /// The `state_dir` the server's directory was made under.
    pub state_dir: String,
    /// How its host stands.
    pub host: HostNow,
}

/// Decide whether to act on `state`. `listed(address, port)`: known_hosts
/// lists a key for that host; asked only for a host that is not configured.
pub fn accept(
    state: &ServerState,
    rules: &Rules,
    listed: impl FnOnce(&str, u16) -> bool,
) -> Result<Accepted> {
    state.validate()?;
    let what = describe(state);
    let refuse = |reason: String| Error::Refused {
        what: what.clone(),
        reason: format!("{reason}; refusing to act on it"),
    };
    let Some(state_dir) = rules
        .state_dirs
        .iter()
        .find(|d| state.check_dir_layout(d).is_ok())
    else {
        return Err(refuse(format!(
            "its directory {:?} is not HOME/STATE_DIR/{} for any state_dir this hub ran with ({})",
            state.dir,
            state.run_id,
            quoted(&rules.state_dirs)
        )));
    };
    if !rules.logins.contains(&state.remote_user) {
        return Err(refuse(format!(
            "it names remote user {:?}, but the configuration maps {:?} to {} (and mapped it to no other login on this hub before)",
            state.remote_user,
            state.username,
            quoted(&rules.logins[..rules.logins.len().min(1)])
        )));
    }
    let at = |address: &str, port: u16, host: HostNow| Accepted {
        address: address.to_string(),
        port,
        state_dir: state_dir.clone(),
        host,
    };
    if rules
        .hosts
        .iter()
        .any(|h| h.address == state.address && h.port == state.ssh_port)
    {
        return Ok(at(&state.address, state.ssh_port, HostNow::Configured));
    }
    if let Some(h) = rules.hosts.iter().find(|h| h.name == state.host) {
        return Ok(at(h.address, h.port, HostNow::Readdressed));
    }
    if listed(&state.address, state.ssh_port) {
        return Ok(at(&state.address, state.ssh_port, HostNow::Retired));
    }
    Err(refuse(format!(
        "it names {}:{}, which is not a configured host, and known_hosts lists no key for it",
        state.address, state.ssh_port
    )))
}

/// `server state of "alice" (pid 4242 on node2)`: what an admin needs to
/// find the server.
pub fn describe(state: &ServerState) -> String {
    let server = if state.server_name.is_empty() {
        String::new()
    } else {
        format!(" server {:?}", state.server_name)
    };
    let pid = state
        .pid
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "not launched".into());
    format!(
        "server state of {:?}{server} ({pid} on {} at {}:{} as {:?}, run {})",
        state.username, state.host, state.address, state.ssh_port, state.remote_user, state.run_id
    )
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::state::decode;

    fn state() -> ServerState {
        decode(
            r#"{"username": "alice", "host": "node2", "address": "10.0.0.12", "ssh_port": 22,
            "remote_user": "alice", "port": 20000, "run_id": "0123456789abcdef",
            "dir": "/home/alice/.jupyterhub-ssh/0123456789abcdef", "pid": 4242, "pgid": 4242,
            "start_time": 99, "uid": 1000, "boot_id": "b"}"#,
        )
        .unwrap()
    }

    fn rules<'a>(hosts: &[Host<'a>]) -> Rules<'a> {
        Rules {
            hosts: hosts.to_vec(),
            logins: vec!["alice".into()],
            state_dirs: vec!["~/.jupyterhub-ssh".into()],
        }
    }

    const NODE2: Host = Host {
        name: "node2",
        address: "10.0.0.12",
        port: 22,
    };
    const NODE1: Host = Host {
        name: "node1",
        address: "10.0.0.11",
        port: 22,
    };

    fn never(_: &str, _: u16) -> bool {
        panic!("known_hosts is asked only about a host that is not configured")
    }

    #[test]
    fn a_configured_host_is_acted_on_where_the_state_says() {
        let a = accept(&state(), &rules(&[NODE1, NODE2]), never).unwrap();
        assert_eq!(
            (a.address.as_str(), a.port, a.host),
            ("10.0.0.12", 22, HostNow::Configured)
        );
        assert_eq!(a.state_dir, "~/.jupyterhub-ssh");
    }

    #[test]
    fn a_host_removed_from_hosts_is_followed_only_if_known_hosts_lists_it() {
        let asked = std::cell::Cell::new(None);
        let a = accept(&state(), &rules(&[NODE1]), |h, p| {
            asked.set(Some((h.to_string(), p)));
            true
        })
        .unwrap();
        assert_eq!(a.host, HostNow::Retired);
        assert_eq!((a.address.as_str(), a.port), ("10.0.0.12", 22));
        assert_eq!(asked.take(), Some(("10.0.0.12".into(), 22)));
        let e = accept(&state(), &rules(&[NODE1]), |_, _| false).unwrap_err();
        assert_eq!(e.kind(), "refused");
        let e = e.to_string();
        assert!(
            e.contains("10.0.0.12:22, which is not a configured host"),
            "{e}"
        );
        assert!(e.contains("known_hosts lists no key"), "{e}");
        // What an admin needs to find the server by hand.
        assert!(e.contains("\"alice\" (pid 4242 on node2"), "{e}");
    }

    #[test]
    fn a_readdressed_host_is_reached_at_its_new_address() {
        let moved = Host {
            address: "10.0.9.12",
            port: 2222,
            ..NODE2
        };
        let a = accept(&state(), &rules(&[NODE1, moved]), never).unwrap();
        assert_eq!(
            (a.address.as_str(), a.port, a.host),
            ("10.0.9.12", 2222, HostNow::Readdressed)
        );
    }

    #[test]
    fn a_login_or_directory_of_an_earlier_configuration_is_accepted_and_no_other() {
        let mut r = rules(&[NODE2]);
        r.logins = vec!["x-alice".into()];
        let e = accept(&state(), &r, never).unwrap_err().to_string();
        assert!(e.contains("names remote user \"alice\""), "{e}");
        assert!(e.contains("maps \"alice\" to \"x-alice\""), "{e}");
        r.logins.push("alice".into());
        accept(&state(), &r, never).unwrap();

        r.state_dirs = vec!["~/.other".into()];
        let e = accept(&state(), &r, never).unwrap_err();
        assert_eq!(e.kind(), "refused");
        assert!(e.to_string().contains("\"~/.other\""), "{e}");
        r.state_dirs.push("~/.jupyterhub-ssh/".into());
        let a = accept(&state(), &r, never).unwrap();
        assert_eq!(a.state_dir, "~/.jupyterhub-ssh/");
    }

    #[test]
    fn a_forged_state_is_invalid_before_anything_else_is_asked() {
        let mut s = state();
        s.dir = "/home/alice".into();
        s.run_id = "alice".into();
        let e = accept(&s, &rules(&[]), never).unwrap_err();
        assert_eq!(e.kind(), "refused", "{e}");
        let mut s = state();
        s.pid = Some(1);
        assert_eq!(
            accept(&s, &rules(&[]), never).unwrap_err().kind(),
            "invalid"
        );
        let mut s = state();
        s.version = 7;
        let e = accept(&s, &rules(&[NODE2]), never).unwrap_err();
        assert_eq!(e.kind(), "refused");
        assert!(e.to_string().contains("upgrade"), "{e}");
    }
}
