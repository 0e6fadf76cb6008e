//! Which saved states the spawner acts on, and where ([`crate::plan::trust`]
//! decides; this reads what it needs: the configuration, the hub's history
//! of configurations, known_hosts).

use super::Spawner;
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::plan::state::{check_host_port, ServerState};
use crate::plan::trust::{self, Accepted, HostNow};
use crate::ssh::{known_hosts, Target};

impl Spawner {
    /// Will poll and stop act on this state, and where? It must be valid
    /// and within the line [`crate::plan::trust`] draws: a forged or
    /// corrupted state cannot make the hub connect to a host known_hosts
    /// does not list, act as a login no configuration of this hub mapped
    /// its user to, or touch a directory other than `HOME/STATE_DIR/RUN`.
    pub async fn accept(&self, state: &ServerState) -> Result<Accepted> {
        let hosts: Vec<trust::Host> = self
            .config
            .hosts
            .iter()
            .map(|h| trust::Host {
                name: h.display_name(),
                address: &h.address,
                port: h.port,
            })
            .collect();
        let configured = hosts.iter().any(|h| {
            (h.address == state.address && h.port == state.ssh_port) || h.name == state.host
        });
        let (templates, state_dirs) = match self.history.lock() {
            Ok(h) => (h.remote_user.clone(), h.state_dir.clone()),
            Err(_) => (
                vec![self.config.remote_user.clone()],
                vec![self.config.state_dir.clone()],
            ),
        };
        let mut logins = vec![self.config.remote_user_for(&state.username)?];
        for t in &templates {
            if let Ok(login) = crate::config::fill(t, &state.username) {
                if !logins.contains(&login) {
                    logins.push(login);
                }
            }
        }
        let listed = if configured || state.validate().is_err() {
            false
        } else {
            match self.known_hosts.entries(&self.config.known_hosts).await {
                Ok(entries) => known_hosts::lists(&entries, &state.address, state.ssh_port),
                Err(e) => {
                    tracing::warn!("cannot read known_hosts for a host no longer configured: {e}");
                    false
                }
            }
        };
        let rules = trust::Rules {
            hosts,
            logins,
            state_dirs,
        };
        trust::accept(state, &rules, |_, _| listed)
    }

    /// Log once per server (per hub process) that its host is no longer
    /// configured, or is at another address now.
    pub(super) fn note_host(&self, state: &ServerState, accepted: &Accepted) {
        if accepted.host == HostNow::Configured {
            return;
        }
        let first = self
            .noted
            .lock()
            .map(|mut n| n.insert(state.run_id.clone()))
            .unwrap_or(false);
        if !first {
            return;
        }
        match accepted.host {
            HostNow::Retired => tracing::warn!(
                "{}: runs on {} ({}:{}), a host no longer configured; it is polled and stopped as on a draining host (ssh-spawner list shows it, ssh-spawner stop stops it)",
                trust::describe(state),
                state.host,
                state.address,
                state.ssh_port
            ),
            _ => tracing::warn!(
                "{}: its host {} is at {}:{} now; reaching the server there",
                trust::describe(state),
                state.host,
                accepted.address,
                accepted.port
            ),
        }
    }

    /// Put this configuration in the history kept in `journal` (once per
    /// directory and process), and take the history's earlier ones: a server
    /// started under an earlier `remote_user` or `state_dir` is still
    /// polled and stopped. Blocks on the file system (a small file, once).
    pub fn remember(&self, journal: &Journal) {
        let first = self
            .remembered
            .lock()
            .map(|mut r| r.insert(journal.dir().to_path_buf()))
            .unwrap_or(false);
        if !first {
            return;
        }
        let (stored, problem) = journal.remember(&self.config.remote_user, &self.config.state_dir);
        if let Some(p) = problem {
            tracing::error!("SSHSpawner: configuration history: {p}");
        }
        if let Ok(mut h) = self.history.lock() {
            h.merge(&stored);
        }
    }

    /// The hub API address (`host:port`) hub tunnels carry to. A saved
    /// state's hub tunnel is opened again to this address, never to the one
    /// the state names: a forged state cannot make the hub carry connections
    /// to an address of its choosing, and a server whose hub moved reaches
    /// it where it is now.
    pub fn set_hub_api(&self, to: &str) -> Result<()> {
        check_host_port(to).map_err(|r| Error::Invalid {
            what: format!("hub API address {to:?}"),
            reason: r,
        })?;
        if let Ok(mut h) = self.hub_api.lock() {
            *h = Some(to.to_string());
        }
        Ok(())
    }

    /// The hub API address set by [`Spawner::set_hub_api`], if any.
    pub(super) fn hub_api(&self) -> Option<String> {
        self.hub_api.lock().ok().and_then(|h| h.clone())
    }

    /// `script` behind the host-side check that the state's directory is
    /// `$HOME/STATE_DIR/RUN_ID` of the login, for the `state_dir` it was
    /// made under (see [`crate::plan::state::host_guard`]).
    pub(super) fn guarded(
        &self,
        state: &ServerState,
        accepted: &Accepted,
        script: String,
    ) -> Result<String> {
        Ok(crate::plan::state::host_guard(state, &accepted.state_dir)? + &script)
    }

    /// Where to act on `state` ([`Spawner::accept`]), and how.
    pub(super) async fn state_target(&self, state: &ServerState) -> Result<(Target, Accepted)> {
        let accepted = self.accept(state).await?;
        self.note_host(state, &accepted);
        let target = Target::new(
            &accepted.address,
            &state.remote_user,
            self.config.identity_for(&state.username)?,
        )
        .port(accepted.port);
        Ok((target, accepted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn spawner(extra: &str) -> Spawner {
        spawner_as("lab-{username}", extra)
    }

    fn spawner_as(remote_user: &str, extra: &str) -> Spawner {
        let c: Config = toml::from_str(&format!(
            "known_hosts = \"/nonexistent\"\nkey_path = \"/keys/{{username}}\"\nremote_user = \"{remote_user}\"\n{extra}\
             [[hosts]]\naddress = \"198.18.0.11\"\n",
        ))
        .unwrap();
        Spawner::new(c).unwrap()
    }

    fn good() -> ServerState {
        crate::plan::state::decode(
            r#"{"username": "ann", "host": "h", "address": "198.18.0.11", "remote_user": "lab-ann",
                "port": 20000, "run_id": "0123456789abcdef",
                "dir": "/home/lab-ann/.jupyterhub-ssh/0123456789abcdef"}"#,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_state_naming_another_login_is_refused() {
        let sp = spawner("");
        let good = good();
        sp.accept(&good).await.unwrap();
        for (user, remote) in [("ann", "lab-bob"), ("ann", "ann"), ("bob", "lab-ann")] {
            let mut bad = good.clone();
            bad.username = user.into();
            bad.remote_user = remote.into();
            let e = sp.accept(&bad).await.unwrap_err().to_string();
            assert!(e.contains("refusing to act on it"), "{e}");
            assert!(e.contains(remote) && e.contains(user), "{e}");
        }
        let mut bad = good.clone();
        bad.username = "x$(id)".into();
        assert!(sp.accept(&bad).await.is_err());
        // Where it runs and what it removes must match the configuration.
        let mut home = good.clone();
        home.run_id = "ann".into();
        home.dir = "/home/lab-ann".into();
        let e = sp.accept(&home).await.unwrap_err().to_string();
        assert!(e.contains("/home/lab-ann"), "{e}");
        for (address, port) in [("198.18.0.99", 22), ("198.18.0.11", 2222)] {
            let mut elsewhere = good.clone();
            elsewhere.address = address.into();
            elsewhere.ssh_port = port;
            let e = sp.accept(&elsewhere).await.unwrap_err().to_string();
            assert!(e.contains("not a configured host"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_login_and_directory_of_an_earlier_configuration_are_accepted_once_remembered() {
        let journal = std::env::temp_dir().join(format!(
            "ssh-spawner-trust-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let journal = Journal::new(journal.to_str().unwrap());
        // The old configuration ran with this journal.
        spawner("").remember(&journal);
        // Today's maps ann elsewhere and keeps servers in another directory.
        let sp = spawner_as("x-{username}", "state_dir = \"~/.jh\"\n");
        let e = sp.accept(&good()).await.unwrap_err().to_string();
        assert!(e.contains("\"lab-ann\""), "{e}");
        sp.remember(&journal);
        let a = sp.accept(&good()).await.unwrap();
        assert_eq!(a.state_dir, "~/.jupyterhub-ssh");
        let mode = std::fs::metadata(journal.dir().join(crate::journal::HISTORY_FILE))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(journal.dir());
    }

    #[tokio::test]
    async fn a_hub_tunnel_is_accepted_whatever_it_named_and_carries_to_the_hub_api() {
        let sp = spawner("hub_tunnel = true\n");
        let mut hub = good();
        hub.hub_forward_port = Some(40000);
        hub.hub_forward_to = Some("10.1.2.3:22".into());
        sp.accept(&hub).await.unwrap();
        assert_eq!(sp.hub_api(), None);
        sp.set_hub_api("198.18.0.1:8081").unwrap();
        assert_eq!(sp.hub_api().as_deref(), Some("198.18.0.1:8081"));
        assert!(sp.set_hub_api("no port").is_err());
        // hub_tunnel off now: a server started with one is still accepted.
        spawner("").accept(&hub).await.unwrap();
    }
}
