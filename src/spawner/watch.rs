//! What the hub's `poll()` answers for one server, across polls: a host that
//! does not answer says nothing about the server, so the server is reported
//! running for `unreachable_grace`; right after a hub restart the first poll
//! waits for the host that long (servers survive a switch reboot); past the
//! grace the server is reported stopped and left to a pending stop
//! ([`crate::pending`]), and is reported stopped from then on.
//!
//! A state the spawner will not act on ([`crate::plan::trust`]: a newer
//! version's, or one naming a host, login or directory outside the line)
//! is never reported stopped: the server may still run. It is reported
//! running, nothing is done to it, and the log says once what it is and
//! what an admin can do. A stop of it from the hub becomes a pending stop,
//! acted on once the configuration accepts it.
//!
//! One [`Watch`] per hub spawner, made anew when the hub clears its state.
//! Every line is logged with the hub's name for the server first
//! (`alice` or `alice:name`) and in the server's span, as the hub's own
//! lines about it are.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{PollOutcome, Spawner};
use crate::journal::Journal;
use crate::metrics;
use crate::pending;
use crate::plan::state::{self, ServerState};
use crate::plan::trust::{Accepted, HostNow};

/// The settings a watch needs from the hub.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// The hub's name for the server in log lines (`alice`, `alice:name`).
    pub log_name: String,
    /// `unreachable_grace`.
    pub grace: Duration,
    /// `journal_dir`.
    pub journal: Journal,
    /// `pending_stop_retry`.
    pub retry: Duration,
}

/// One hub spawner's poll state.
#[derive(Debug)]
pub struct Watch {
    settings: WatchSettings,
    marks: Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    unreachable_since: Option<Instant>,
    freshly_loaded: bool,
    /// The state of an exited server already cleaned up after.
    cleaned_up: Option<String>,
    /// The state reported stopped and left to a pending stop.
    pending_stop: Option<String>,
    /// The refused state whose refusal was logged.
    refused: Option<String>,
    /// The state this watch wrote (a host's new address, a tunnel's new
    /// port): the only one whose address the hub's URL follows.
    followed: Option<String>,
}

/// What one poll found.
enum Answer {
    Running,
    Exited(Option<i32>, String),
    Unknown(String),
    /// Not acted on: see [`Watch::refused`].
    Refused(crate::error::Error),
}

impl Answer {
    fn words(&self) -> (&'static str, &str) {
        match self {
            Answer::Running => ("running", ""),
            Answer::Exited(_, d) => ("exited", d),
            Answer::Unknown(d) => ("unknown", d),
            Answer::Refused(_) => ("refused", ""),
        }
    }
}

impl Watch {
    /// A watch with nothing seen yet.
    pub fn new(settings: WatchSettings) -> Watch {
        Watch {
            settings,
            marks: Mutex::new(Marks::default()),
        }
    }

    /// The hub loaded this server's state from its database (a restart).
    pub fn loaded(&self) {
        self.mark(|m| m.freshly_loaded = true);
    }

    fn mark<T>(&self, f: impl FnOnce(&mut Marks) -> T) -> Option<T> {
        self.marks.lock().ok().map(|mut m| f(&mut m))
    }

    /// [`Watch::poll`] for the state as the hub saved it: a state this
    /// version cannot read is never reported stopped if it may name a
    /// running server (a newer version's); one that is not a server state at
    /// all is reported stopped, with the text in the log.
    pub async fn poll_json(&self, sp: &Spawner, state_json: String) -> (Option<i32>, String) {
        match state::decode_unchecked(&state_json) {
            Ok(st) => self.poll(sp, st, state_json).await,
            Err(e) if e.kind() == "refused" => (self.refused(&e, &state_json), state_json),
            Err(e) => {
                tracing::error!(
                    "{}: the saved state is not a server state ({e}); nothing can be stopped with it; reporting no server: {state_json}",
                    self.settings.log_name
                );
                (Some(1), state_json)
            }
        }
    }

    /// What `poll()` returns for the server `st` (its state saved as
    /// `state_json`): None while it runs, else its exit status; and the
    /// state to keep from now on (a tunnel that had to move to another local
    /// port is recorded in it).
    pub async fn poll(
        &self,
        sp: &Spawner,
        st: ServerState,
        state_json: String,
    ) -> (Option<i32>, String) {
        if self.mark(|m| m.pending_stop.as_deref() == Some(state_json.as_str())) == Some(true) {
            // Reported stopped already (a pending stop): the hub polls once
            // or twice more on its way to clearing the state.
            return (Some(1), state_json);
        }
        let span = tracing::info_span!("server", user = %st.username, server = %st.server_name, host = %st.host);
        self.poll_state(sp, st, state_json).instrument(span).await
    }

    async fn poll_state(
        &self,
        sp: &Spawner,
        st: ServerState,
        state_json: String,
    ) -> (Option<i32>, String) {
        let name = &self.settings.log_name;
        let grace = self.settings.grace;
        let (answer, accepted) = self.ask(sp, &st).await;
        let detail = match answer {
            Answer::Running => {
                let state_json = self.follow(sp, st, accepted, state_json);
                return (self.answered(false), state_json);
            }
            Answer::Refused(why) => return (self.refused(&why, &state_json), state_json),
            Answer::Exited(code, why) => {
                self.mark(|m| m.freshly_loaded = false);
                tracing::info!("{name}: server is gone ({why})");
                self.clean_up_exited(sp, &st, &state_json).await;
                return (Some(code.unwrap_or(0)), state_json);
            }
            Answer::Unknown(detail) => detail,
        };
        // The host did not answer: that says nothing about the server.
        let now = Instant::now();
        let (since, fresh) = self
            .mark(|m| {
                let first = m.unreachable_since.is_none();
                let since = *m.unreachable_since.get_or_insert(now);
                (since, first, std::mem::take(&mut m.freshly_loaded))
            })
            .map(|(since, first, fresh)| {
                if first {
                    tracing::warn!(
                        "{name}: cannot reach the host ({detail}); keeping the server for up to {:.0} s",
                        grace.as_secs_f64()
                    );
                }
                (since, fresh)
            })
            .unwrap_or((now, false));
        if fresh {
            // Right after a hub restart the hub checks the URL as soon as
            // poll says "running": wait for the host instead of losing the
            // server.
            while since.elapsed() < grace {
                tokio::time::sleep(grace.min(Duration::from_secs(5))).await;
                match self.ask(sp, &st).await {
                    (Answer::Running, accepted) => {
                        let state_json = self.follow(sp, st, accepted, state_json);
                        return (self.answered(true), state_json);
                    }
                    (Answer::Exited(code, _), _) => {
                        self.clean_up_exited(sp, &st, &state_json).await;
                        return (Some(code.unwrap_or(0)), state_json);
                    }
                    (Answer::Refused(why), _) => {
                        return (self.refused(&why, &state_json), state_json)
                    }
                    (Answer::Unknown(_), _) => {}
                }
            }
        }
        if since.elapsed() < grace {
            return (None, state_json);
        }
        tracing::error!(
            "{name}: host unreachable for {:.0} s ({detail}); reporting the server stopped",
            since.elapsed().as_secs_f64()
        );
        // The hub clears the state without calling stop(): the server may
        // still run, so stop it once the host answers again.
        let why = format!("{name} reported stopped unreached");
        let s = &self.settings;
        pending::stop_later(sp, &s.journal, state_json.clone(), &why, s.retry).await;
        self.mark(|m| m.pending_stop = Some(state_json.clone()));
        (Some(1), state_json)
    }

    /// One poll of the host, logged (a line per poll: tests and admins
    /// count them); and where the state was accepted.
    async fn ask(&self, sp: &Spawner, st: &ServerState) -> (Answer, Option<Accepted>) {
        // A state the core refuses to act on (forged, corrupted, another
        // configuration's): no waiting for its host to answer, no exec.
        let mut accepted = None;
        let answer = match sp.accept(st).await {
            Err(e) => Answer::Refused(e),
            Ok(a) => {
                accepted = Some(a);
                match sp.poll(st).await {
                    // A restarted hub listens on the server's tunnel ports again.
                    PollOutcome::Running => match sp.ensure_tunnels(st).await {
                        Ok(()) => Answer::Running,
                        Err(e) => Answer::Unknown(e.to_string()),
                    },
                    PollOutcome::Exited { status, reason } => {
                        Answer::Exited(status, format!("{reason:?}"))
                    }
                    PollOutcome::Unknown(e) => Answer::Unknown(e.to_string()),
                }
            }
        };
        let (status, detail) = answer.words();
        tracing::debug!(
            "{}: poll answered {status} {detail}",
            self.settings.log_name
        );
        (answer, accepted)
    }

    /// The server answers: forget any outage. `waited`: the first poll after
    /// a restart waited for the host.
    fn answered(&self, waited: bool) -> Option<i32> {
        let was_unreachable = self
            .mark(|m| {
                m.freshly_loaded = false;
                m.unreachable_since.take().is_some()
            })
            .unwrap_or(false);
        if was_unreachable || waited {
            tracing::info!("{}: host answers again", self.settings.log_name);
        }
        None
    }

    /// A state the spawner will not act on: the server may still run, so it
    /// is reported running and nothing is done to it; the log says once, for
    /// this state, what it is and what an admin can do.
    fn refused(&self, why: &crate::error::Error, state_json: &str) -> Option<i32> {
        let first = self
            .mark(|m| {
                m.freshly_loaded = false;
                if m.refused.as_deref() == Some(state_json) {
                    false
                } else {
                    m.refused = Some(state_json.to_string());
                    true
                }
            })
            .unwrap_or(false);
        if first {
            metrics::state_refused();
            let todo = if why.kind() == "invalid" {
                "nothing can act on it: look for the server on its host by hand; stopping it from the hub forgets it"
            } else {
                "if its host or login was taken out of the configuration, put it back (or the host's key in known_hosts) and it is polled and stopped again; or stop it by hand with `ssh-spawner stop` and this state, with a configuration that names its host; stopping it from the hub keeps it as a pending stop, done once the configuration accepts it"
            };
            tracing::error!(
                "{}: refusing the saved state: {why}. The server is reported running and nothing is done to it; {todo}. State: {state_json}",
                self.settings.log_name
            );
        }
        None
    }

    /// The server's URL as the hub should have it: `url`, or, for a state
    /// this watch wrote after a poll that accepted it (a host's new
    /// address, a tunnel's new local port), that state's address. Never the
    /// address of a state it did not write: a refused or forged state's
    /// address is not routed to.
    pub fn url(&self, state_json: &str, url: &str) -> String {
        let ours = self.mark(|m| m.followed.as_deref() == Some(state_json)) == Some(true);
        match state::decode_unchecked(state_json) {
            Ok(st) if ours => state::server_url(&st, url),
            _ => url.to_string(),
        }
    }

    /// What the hub keeps as the state of a running server: a host at
    /// another address now is recorded there, and so is a tunnel's new
    /// local port ([`Watch::follow_tunnel_port`]).
    fn follow(
        &self,
        sp: &Spawner,
        mut st: ServerState,
        accepted: Option<Accepted>,
        state_json: String,
    ) -> String {
        let input = state_json.clone();
        let state_json = match accepted.filter(|a| a.host == HostNow::Readdressed) {
            Some(a) => {
                tracing::warn!(
                    "{}: its host {} moved from {}:{} to {}:{}; the server is reached there now",
                    self.settings.log_name,
                    st.host,
                    st.address,
                    st.ssh_port,
                    a.address,
                    a.port
                );
                st.address = a.address;
                st.ssh_port = a.port;
                state::encode(&st).unwrap_or(state_json)
            }
            None => state_json,
        };
        let after = self.follow_tunnel_port(sp, st, state_json);
        if after != input {
            self.mark(|m| m.followed = Some(after.clone()));
        }
        after
    }

    /// After a hub restart the tunnel's old local port may have been taken
    /// by another program: the core then listens on another one. Record it
    /// in the state; the hub's `get_url()` gives it the new address, and
    /// the hub moves the proxy route there.
    fn follow_tunnel_port(&self, sp: &Spawner, mut st: ServerState, state_json: String) -> String {
        let Some(recorded) = st.tunnel_port else {
            return state_json;
        };
        match sp.local_tunnel_port(&st.run_id) {
            Some(port) if port != recorded => {
                tracing::warn!(
                    "{}: tunnel port {recorded} was taken by another program; the server is reached through port {port} now",
                    self.settings.log_name
                );
                st.tunnel_port = Some(port);
                state::encode(&st).unwrap_or(state_json)
            }
            _ => state_json,
        }
    }

    /// The hub calls stop() only for a server poll() says is running, so a
    /// server that exited on its own would leave its pid file and
    /// certificates on the host: remove them (the log is kept), once.
    async fn clean_up_exited(&self, sp: &Spawner, st: &ServerState, state_json: &str) {
        let first = self
            .mark(|m| {
                let first = m.cleaned_up.as_deref() != Some(state_json);
                m.cleaned_up = Some(state_json.to_string());
                first
            })
            .unwrap_or(false);
        if !first {
            return;
        }
        let name = &self.settings.log_name;
        match sp.stop(st).await {
            Ok(done) => tracing::debug!("{name}: cleaned up after the server ({done})"),
            Err(e) => tracing::warn!("{name}: cannot clean up after the server: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A spawner whose one host refuses every connection, a launched state
    /// on it, and a watch journaling into a fresh directory.
    fn setup(grace_ms: u64) -> (Spawner, ServerState, String, Watch, std::path::PathBuf) {
        let c: Config = toml::from_str(
            "known_hosts = \"/nonexistent\"\nkey_path = \"/nonexistent\"\nconnect_timeout = 2.0\n\
             [[hosts]]\naddress = \"127.0.0.1\"\nport = 1\n",
        )
        .unwrap();
        let sp = Spawner::new(c).unwrap();
        let json = r#"{"username": "ann", "host": "127.0.0.1", "address": "127.0.0.1", "ssh_port": 1,
            "remote_user": "ann", "port": 20000, "run_id": "0123456789abcdef",
            "dir": "/home/ann/.jupyterhub-ssh/0123456789abcdef", "pid": 4242, "pgid": 4242,
            "start_time": 99, "uid": 1000, "boot_id": "b"}"#;
        let st = state::decode(json).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "ssh-spawner-watch-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let watch = Watch::new(WatchSettings {
            log_name: "ann".into(),
            grace: Duration::from_millis(grace_ms),
            journal: Journal::new(dir.to_str().unwrap()),
            retry: Duration::from_secs(3600),
        });
        (sp, st, json.to_string(), watch, dir)
    }

    fn pending_stops(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir.join("stops"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn an_unreachable_host_keeps_the_server_for_the_grace_then_leaves_a_pending_stop() {
        let (sp, st, json, watch, dir) = setup(300);
        let (answer, kept) = watch.poll(&sp, st.clone(), json.clone()).await;
        assert_eq!(
            answer, None,
            "within the grace the server is reported running"
        );
        assert_eq!(kept, json);
        assert!(pending_stops(&dir).is_empty());
        tokio::time::sleep(Duration::from_millis(350)).await;
        let (answer, _) = watch.poll(&sp, st.clone(), json.clone()).await;
        assert_eq!(answer, Some(1), "past the grace it is reported stopped");
        assert_eq!(pending_stops(&dir), ["0123456789abcdef.json"]);
        // From then on: stopped, without asking the host again.
        let t0 = Instant::now();
        assert_eq!(watch.poll(&sp, st, json).await.0, Some(1));
        assert!(t0.elapsed() < Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_first_poll_after_a_restart_waits_out_the_grace() {
        let (sp, st, json, watch, dir) = setup(300);
        watch.loaded();
        let t0 = Instant::now();
        let (answer, _) = watch.poll(&sp, st, json).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(answer, Some(1));
        assert_eq!(pending_stops(&dir), ["0123456789abcdef.json"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_refused_state_is_reported_running_and_never_stopped() {
        let (sp, st, json, watch, dir) = setup(0);
        // Another host, which known_hosts (missing here) does not list.
        let mut other = st.clone();
        other.address = "198.18.0.99".into();
        other.host = "gone".into();
        let other_json = state::encode(&other).unwrap();
        let before = metrics::snapshot().states_refused;
        for _ in 0..3 {
            let t0 = Instant::now();
            let (answer, kept) = watch.poll(&sp, other.clone(), other_json.clone()).await;
            assert_eq!(
                answer, None,
                "a server that may run is not reported stopped"
            );
            assert_eq!(kept, other_json);
            assert!(t0.elapsed() < Duration::from_secs(1), "no host is asked");
        }
        assert_eq!(
            metrics::snapshot().states_refused - before,
            1,
            "counted once per state"
        );
        assert!(pending_stops(&dir).is_empty());
        // Its address is never routed to: the hub keeps the URL it has.
        let url = "http://127.0.0.1:20000/user/ann/";
        assert_eq!(watch.url(&other_json, url), url);
        // A newer version's state, whatever its shape: running, untouched.
        let newer = r#"{"version": 2, "servers": [{"pid": 4242}]}"#.to_string();
        assert_eq!(watch.poll_json(&sp, newer).await.0, None);
        let mut v2 = json.replace("\"username\"", "\"version\": 2, \"username\"");
        assert_eq!(watch.poll_json(&sp, v2.clone()).await.0, None);
        v2.push_str("garbage");
        // Not a server state at all: nothing names a server; reported gone.
        assert_eq!(watch.poll_json(&sp, v2).await.0, Some(1));
        assert!(pending_stops(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
