//! The server state the hub keeps in its database: everything poll and stop
//! need, so a restarted hub finds its servers again.
//!
//! Versioned JSON. Fields unknown to this version are kept (a downgrade, or a
//! field added by a newer version, survives a round trip); a state from a
//! newer major version, or one that is malformed, is a clear error, never a
//! panic. Nothing in it is secret.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::launch::Launched;
use super::poll::Proc;
use super::run::{is_boot_id, is_run_id};
use super::sh::{self, Preamble};
use crate::error::{Cause, Error, Result};

/// Most GPUs a state may name (more than any host has).
const MAX_GPUS: usize = 64;

/// The version this build writes.
pub const STATE_VERSION: u32 = 1;

/// One server's state. `pid` and the fields after it are `None` between
/// "host and directory chosen" and "launch reported the pid": a state saved
/// in that window still lets stop find the server through its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    /// Format version.
    #[serde(default = "v1")]
    pub version: u32,
    /// The hub user the server belongs to.
    pub username: String,
    /// The hub's name for the server ("" for the default server); only for
    /// log lines (states saved before it was recorded have none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_name: String,
    /// The host's display name.
    pub host: String,
    /// Address the hub connects to over SSH.
    pub address: String,
    /// SSH port.
    #[serde(default = "port22")]
    pub ssh_port: u16,
    /// Remote user the server runs as.
    pub remote_user: String,
    /// Port the server listens on.
    pub port: u16,
    /// Random id of this run; names the per-server directory.
    pub run_id: String,
    /// Absolute per-server directory on the host.
    pub dir: String,
    /// Server process id.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Process group (the wrapper, session leader).
    #[serde(default)]
    pub pgid: Option<u32>,
    /// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Owner uid of `pid`.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The host's boot id at launch: a reboot means the server is gone.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// How limits were enforced, in words.
    #[serde(default)]
    pub enforcement: Option<String>,
    /// SSH tunnel: the port on the hub's loopback that carries to `port` on
    /// the host. The hub keeps `127.0.0.1:tunnel_port` as the server's URL, so
    /// a restarted hub listens on the same port again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// Hub tunnel: the port on the host's loopback that carries to the hub
    /// API; the server's environment points at it, so it is requested again
    /// with the same number after a lost connection or a hub restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_forward_port: Option<u16>,
    /// Hub tunnel: the hub API address (`host:port`) it carries to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_forward_to: Option<String>,
    /// The GPUs (UUIDs, `GPU-…`) the server was given: a restarted hub
    /// claims them again on its first poll, so they are not given twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// Fields this version does not know, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn v1() -> u32 {
    1
}
fn port22() -> u16 {
    22
}

impl ServerState {
    /// True once launch reported the process.
    pub fn launched(&self) -> bool {
        self.pid.is_some()
    }

    /// Record what the launch (or adopt) script reported.
    pub fn record(&mut self, launched: Launched) {
        self.pid = Some(launched.pid);
        self.pgid = Some(launched.pgid);
        self.start_time = Some(launched.start_time);
        self.uid = Some(launched.uid);
        self.boot_id = Some(launched.boot_id);
    }

    /// The process as poll and stop scripts see it; `None` until launched.
    pub fn proc(&self) -> Option<Proc> {
        Some(Proc {
            run_id: self.run_id.clone(),
            pid: self.pid?,
            pgid: self.pgid?,
            start_time: self.start_time?,
            uid: self.uid?,
            boot_id: self.boot_id.clone()?,
            dir: self.dir.clone(),
        })
    }

    /// Check what a forged or corrupted state could use to do harm.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::Invalid {
            what: "server state".into(),
            reason,
        };
        if self.version > STATE_VERSION {
            return Err(newer(self.version));
        }
        if self.address.is_empty()
            || self
                .address
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!("bad address {:?}", self.address)));
        }
        if !is_run_id(&self.run_id) {
            return Err(bad(format!("bad run id {:?}", self.run_id)));
        }
        if !self.dir.starts_with('/')
            || self.dir.contains("/../")
            || self.dir.ends_with("/..")
            || self.dir.chars().any(|c| c.is_control())
            || !self.dir.ends_with(&self.run_id)
        {
            return Err(bad(format!("bad server directory {:?}", self.dir)));
        }
        if let Some(b) = self.boot_id.as_deref().filter(|b| !is_boot_id(b)) {
            // A NUL or a newline here would fail the poll script of every
            // server of this host and login, not just this one.
            return Err(bad(format!("bad boot id {b:?}")));
        }
        if matches!(self.pid, Some(0 | 1)) || matches!(self.pgid, Some(0 | 1)) {
            return Err(bad("pid 0 or 1 is never a server".into()));
        }
        if self.tunnel_port == Some(0) || self.hub_forward_port == Some(0) {
            return Err(bad("tunnel port 0".into()));
        }
        if self.hub_forward_port.is_some() != self.hub_forward_to.is_some() {
            return Err(bad(
                "hub_forward_port and hub_forward_to come together".into()
            ));
        }
        if let Some(to) = &self.hub_forward_to {
            check_host_port(to).map_err(|r| bad(format!("bad hub_forward_to {to:?}: {r}")))?;
        }
        // The UUIDs go into the server's environment and a file on the
        // host: the shape nvidia-smi prints, no more than a host can have.
        if self.gpus.len() > MAX_GPUS {
            return Err(bad(format!(
                "{} GPUs (at most {MAX_GPUS})",
                self.gpus.len()
            )));
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if !super::gpus::valid_uuid(g) {
                return Err(bad(format!("bad GPU UUID {g:?}")));
            }
            if self.gpus[..i].contains(g) {
                return Err(bad(format!("GPU {g} listed twice")));
            }
        }
        Ok(())
    }
}

impl ServerState {
    /// The per-server directory must be exactly `HOME/STATE_DIR/RUN_ID`
    /// (`state_dir` as configured, `~/NAME`): stop removes it with `rm -rf`,
    /// so a state naming any other directory (`/home/alice` with run id
    /// `alice`) is refused here, and [`host_guard`] checks the home part on
    /// the host, where `$HOME` is known.
    pub fn check_dir_layout(&self, state_dir: &str) -> Result<()> {
        let suffix = format!("/{}/{}", state_rel(state_dir), self.run_id);
        let home = self.dir.strip_suffix(&suffix);
        let ok = match home {
            Some("") => true,
            Some(h) => {
                h.starts_with('/')
                    && !h
                        .split('/')
                        .skip(1)
                        .any(|p| p.is_empty() || p == "." || p == "..")
            }
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid {
                what: "server state".into(),
                reason: format!(
                    "server directory {:?} is not HOME{suffix} (state_dir {state_dir:?}, run id {:?}); refusing to act on it",
                    self.dir, self.run_id
                ),
            })
        }
    }
}

/// `state_dir` (`~/NAME`) without `~/` and trailing slashes.
pub(crate) fn state_rel(state_dir: &str) -> &str {
    state_dir
        .strip_prefix("~/")
        .unwrap_or(state_dir)
        .trim_end_matches('/')
}

/// What a remote script that may remove a server directory runs first: it
/// exits [`GUARD_REFUSED`] (before anything is read, signalled or removed)
/// unless the directory is `$HOME/STATE_DIR/RUN_ID` of the login it runs as.
pub fn host_guard(state: &ServerState, state_dir: &str) -> Result<String> {
    state.check_dir_layout(state_dir)?;
    let mut p = Preamble::new();
    p.value(
        "guard_suffix",
        &format!("/{}/{}", state_rel(state_dir), state.run_id),
        "state_dir",
    )?
    .value("guard_dir", &state.dir, "server directory")?
    .number("guard_refused", GUARD_REFUSED);
    // A prefix, not a `main` of its own: a transfer cut short in it is a
    // syntax error (an `if` left open) or runs only the check.
    Ok(p.into_text() + &sh::code(sh::GUARD))
}

/// Exit status of a script whose [`host_guard`] refused the directory.
pub const GUARD_REFUSED: u32 = 65;

/// `host:port` or `[v6]:port` with a nonzero port and no spaces or controls.
pub fn check_host_port(text: &str) -> std::result::Result<(), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_string())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty()
        || host.contains(['[', ']'])
        || host.chars().any(|c| c.is_whitespace() || c.is_control())
        || (host.contains(':') && !text.starts_with('['))
    {
        return Err("bad host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err("bad port".into()),
    }
}

/// `host:port` (`[v6]:port`) a hub tunnel carries to for the hub API at
/// `url` (`http://10.0.0.1:8081/hub/api`): the scheme's port when the URL
/// names none, and the hub's loopback when it names a wildcard address
/// (`0.0.0.0`, `::`) or no host.
pub fn hub_api_to(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let netloc = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = netloc.rsplit_once('@').map_or(netloc, |(_, h)| h);
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => (v6, None),
        },
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    let port = port.and_then(|p| p.parse::<u16>().ok()).unwrap_or(
        if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        },
    );
    let host = host.to_ascii_lowercase();
    let host = match host.as_str() {
        "0.0.0.0" | "" | "::" => "127.0.0.1",
        h => h,
    };
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Whether the hub API at `url` is spoken without TLS (anything but
/// `https://`): through a hub tunnel, the token then crosses the tunnel's
/// port on the host in clear.
pub fn hub_api_in_clear(url: &str) -> bool {
    !url.trim_start()
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// The server's URL as the state says it is reached now: `url` (what the
/// hub has) with its host and port replaced by the tunnel's local port, or
/// else by the state's address and port (a host re-addressed since).
pub fn server_url(state: &ServerState, url: &str) -> String {
    let netloc = match state.tunnel_port {
        Some(p) => format!("127.0.0.1:{p}"),
        None if state.address.contains(':') => format!("[{}]:{}", state.address, state.port),
        None => format!("{}:{}", state.address, state.port),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    format!("{scheme}://{netloc}{}", &rest[end..])
}

/// Read a state from the hub database (JSON text) and check it
/// ([`ServerState::validate`]).
pub fn decode(json: &str) -> Result<ServerState> {
    let state = decode_unchecked(json)?;
    state.validate()?;
    Ok(state)
}

/// Read a state without checking it (the poll's watch checks it and says
/// what it refuses). A state of a newer version is [`Error::Refused`],
/// whatever its shape: this version cannot tell whether its server runs.
pub fn decode_unchecked(json: &str) -> Result<ServerState> {
    serde_json::from_str::<ServerState>(json).map_err(|e| {
        let version = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("version").and_then(|v| v.as_u64()));
        match version {
            Some(v) if v > u64::from(STATE_VERSION) => newer(u32::try_from(v).unwrap_or(u32::MAX)),
            _ => Error::Malformed {
                what: "server state".into(),
                source: Cause::new(e),
            },
        }
    })
}

/// A state written by a newer version: kept, never taken for stopped.
fn newer(version: u32) -> Error {
    Error::Refused {
        what: "server state".into(),
        reason: format!(
            "written by a newer ssh-spawner (state version {version}, this one reads up to \
             {STATE_VERSION}); nothing is done to its server until the hub runs a version \
             that reads it: upgrade ssh-spawner again"
        ),
    }
}

/// The JSON text stored in the hub database.
pub fn encode(state: &ServerState) -> Result<String> {
    serde_json::to_string(state).map_err(|e| Error::Malformed {
        what: "server state".into(),
        source: Cause::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ServerState {
        ServerState {
            version: STATE_VERSION,
            username: "alice".into(),
            server_name: String::new(),
            host: "node1".into(),
            address: "198.18.0.11".into(),
            ssh_port: 22,
            remote_user: "alice".into(),
            port: 23456,
            run_id: "r1a2b3".into(),
            dir: "/home/alice/.jupyterhub-ssh/r1a2b3".into(),
            pid: Some(4242),
            pgid: Some(4241),
            start_time: Some(123456),
            uid: Some(1001),
            boot_id: Some("b007".into()),
            enforcement: Some("none".into()),
            tunnel_port: None,
            hub_forward_port: None,
            hub_forward_to: None,
            gpus: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn the_hub_api_a_hub_tunnel_carries_to() {
        for (url, want) in [
            ("http://127.0.0.1:8081/hub/api", "127.0.0.1:8081"),
            ("https://hub.example/hub/api", "hub.example:443"),
            ("http://Hub.Example/hub/api", "hub.example:80"),
            ("http://[::1]:8081/hub/api", "[::1]:8081"),
            ("http://[fe80::1]/x", "[fe80::1]:80"),
            ("http://0.0.0.0:8081/hub/api", "127.0.0.1:8081"),
            ("http://[::]:8081/hub/api", "127.0.0.1:8081"),
            ("http://:8081/hub/api", "127.0.0.1:8081"),
            ("http://user:pw@10.0.0.1:9000/hub/api", "10.0.0.1:9000"),
            ("http://10.0.0.1:8081?x=1", "10.0.0.1:8081"),
        ] {
            assert_eq!(hub_api_to(url), want, "{url}");
        }
    }

    #[test]
    fn only_an_https_hub_api_is_not_in_clear() {
        for url in ["https://hub/hub/api", "HTTPS://10.0.0.1:8081/hub/api"] {
            assert!(!hub_api_in_clear(url), "{url}");
        }
        for url in ["http://127.0.0.1:8081/hub/api", "hub:8081", "", "https:/x"] {
            assert!(hub_api_in_clear(url), "{url}");
        }
    }

    #[test]
    fn gpus_round_trip_are_absent_without_gpus_and_must_be_uuids() {
        let plain = encode(&sample()).unwrap();
        assert!(!plain.contains("gpus"), "{plain}");
        let mut s = sample();
        s.gpus = vec![
            "GPU-4f1c9d2e-8a7b-4c3d-9e1f-0a2b3c4d5e6f".into(),
            "GPU-0a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d".into(),
        ];
        s.validate().unwrap();
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
        // What a forged state could smuggle into the server's environment
        // or the host's `RUN/gpus` file is refused.
        for bad in [
            "GPU-1,GPU-2",
            "GPU-1\nrm -rf ~",
            "GPU 1",
            "",
            "$(id)",
            "GPU-1;x",
        ] {
            let mut s = sample();
            s.gpus = vec![bad.into()];
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("bad GPU UUID"), "{bad:?}: {e}");
        }
        let mut s = sample();
        s.gpus = vec!["GPU-1".into(), "GPU-1".into()];
        assert!(s.validate().unwrap_err().to_string().contains("twice"));
        s.gpus = (0..65).map(|i| format!("GPU-{i}")).collect();
        assert!(s.validate().unwrap_err().to_string().contains("at most 64"));
    }

    #[test]
    fn tunnel_fields_round_trip_and_are_absent_without_tunnels() {
        let plain = encode(&sample()).unwrap();
        assert!(
            !plain.contains("tunnel") && !plain.contains("forward"),
            "{plain}"
        );
        let mut s = sample();
        s.tunnel_port = Some(41234);
        s.hub_forward_port = Some(40001);
        s.hub_forward_to = Some("198.18.0.1:8081".into());
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
        s.hub_forward_to = Some("[::1]:8081".into());
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn bad_tunnel_fields_are_clear_errors() {
        let base = r#""username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/h/r1""#;
        for (extra, needle) in [
            (r#""tunnel_port":0"#, "tunnel port 0"),
            (r#""tunnel_port":70000"#, "server state"),
            (r#""hub_forward_port":4000"#, "together"),
            (
                r#""hub_forward_port":4000,"hub_forward_to":"h:0""#,
                "hub_forward_to",
            ),
            (
                r#""hub_forward_port":4000,"hub_forward_to":"a b:80""#,
                "hub_forward_to",
            ),
            (
                r#""hub_forward_port":4000,"hub_forward_to":"::1:80""#,
                "hub_forward_to",
            ),
        ] {
            let err = decode(&format!("{{{base},{extra}}}")).unwrap_err();
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn the_directory_must_be_home_state_dir_run_id() {
        let s = sample();
        s.check_dir_layout("~/.jupyterhub-ssh").unwrap();
        s.check_dir_layout("~/.jupyterhub-ssh/").unwrap();
        // The review's example: rm -rf of a home directory.
        let mut home = sample();
        home.run_id = "alice".into();
        home.dir = "/home/alice".into();
        home.validate().unwrap();
        let err = home.check_dir_layout("~/.jupyterhub-ssh").unwrap_err();
        assert!(err.to_string().contains("/home/alice"), "{err}");
        assert!(host_guard(&home, "~/.jupyterhub-ssh").is_err());
        for dir in [
            "/home/alice/other/r1a2b3",
            "/home/alice/x.jupyterhub-ssh/r1a2b3",
            "/home/alice/.jupyterhub-ssh/r1a2b3/r1a2b3",
            "home/.jupyterhub-ssh/r1a2b3",
            "//.jupyterhub-ssh/r1a2b3",
            "/a/../.jupyterhub-ssh/r1a2b3",
        ] {
            let mut s = sample();
            s.dir = dir.into();
            assert!(s.check_dir_layout("~/.jupyterhub-ssh").is_err(), "{dir}");
        }
        let mut s = sample();
        s.dir = "/home/alice/lab/ssh/r1a2b3".into();
        s.check_dir_layout("~/lab/ssh").unwrap();
        assert!(s.check_dir_layout("~/.jupyterhub-ssh").is_err());
    }

    #[test]
    fn the_host_guard_runs_the_script_only_under_the_logins_home() {
        let s = sample();
        let guard = host_guard(&s, "~/.jupyterhub-ssh").unwrap();
        let run = |home: &str| {
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("{guard}echo ran"))
                .env("HOME", home)
                .output()
                .unwrap()
        };
        for home in ["/home/alice", "/home/alice/"] {
            let out = run(home);
            assert_eq!(out.status.code(), Some(0), "{home}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
        }
        for home in ["/home/bob", "/home", "/", ""] {
            let out = run(home);
            assert_eq!(out.status.code(), Some(GUARD_REFUSED as i32), "{home}");
            assert!(out.stdout.is_empty(), "{home}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("refusing") && err.contains(&s.dir), "{err}");
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn older_minimal_states_and_unknown_fields_load() {
        let old = r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,
                      "run_id":"r1","dir":"/h/r1","future_field":{"x":[1,2]}}"#;
        let s = decode(old).unwrap();
        assert_eq!((s.version, s.ssh_port, s.pid), (1, 22, None));
        assert_eq!((s.tunnel_port, s.hub_forward_port), (None, None));
        assert!(!s.launched());
        // The unknown field survives a round trip.
        assert!(encode(&s).unwrap().contains("future_field"));
    }

    #[test]
    fn malformed_and_forged_states_are_clear_errors() {
        for (json, needle) in [
            ("", "server state"),
            ("[]", "server state"),
            ("{\"host\":1}", "server state"),
            (
                r#"{"version":9,"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/h/r1"}"#,
                "newer",
            ),
            // A newer version may change the shape too: still "newer".
            (r#"{"version":2,"servers":[]}"#, "upgrade ssh-spawner again"),
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"../x","dir":"/h/r1"}"#,
                "run id",
            ),
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/etc"}"#,
                "directory",
            ),
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/h/r1","pid":1}"#,
                "pid",
            ),
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":70000,"run_id":"r1","dir":"/h/r1"}"#,
                "server state",
            ),
            // A boot id every poll of the host and login would carry: one bad
            // state must fail alone, not the poll of its neighbours.
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/h/r1","pid":7,"boot_id":"ab\u0000cd"}"#,
                "bad boot id",
            ),
            (
                r#"{"username":"a","host":"n","address":"h","remote_user":"a","port":2,"run_id":"r1","dir":"/h/r1","pid":7,"boot_id":"ab'$(id)"}"#,
                "bad boot id",
            ),
        ] {
            let err = decode(json).unwrap_err();
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn the_url_follows_the_tunnel_port_or_the_address() {
        let mut s = sample();
        let url = "http://198.18.0.11:23456/user/alice/";
        assert_eq!(server_url(&s, url), url);
        s.address = "10.0.9.11".into();
        assert_eq!(server_url(&s, url), "http://10.0.9.11:23456/user/alice/");
        s.address = "fd00::11".into();
        assert_eq!(server_url(&s, url), "http://[fd00::11]:23456/user/alice/");
        s.tunnel_port = Some(40001);
        assert_eq!(server_url(&s, "https://x:1"), "https://127.0.0.1:40001");
        assert_eq!(server_url(&s, "not a url"), "not a url");
    }
}
