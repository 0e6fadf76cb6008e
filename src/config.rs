//! Options, validated on load, and the templates filled from user names.
//!
//! The same structure is read from a TOML file by the CLI and built from
//! traitlets by the JupyterHub class. Durations are seconds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::plan::hosts::Strategy;
use crate::plan::limits::EnforcementMode;
use crate::plan::ports::PortRange;
use crate::plan::run::check_dir;
use crate::ssh::{ConnectOptions, HostKeyPolicy, Identity, PoolOptions};

/// One compute host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// DNS name or IP address the hub connects to (and the server is reached at).
    pub address: String,
    /// SSH port.
    #[serde(default = "d_ssh_port")]
    pub port: u16,
    /// Name shown to users and admins; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// At most this many servers (of all users) on this host.
    #[serde(default)]
    pub max_servers: Option<usize>,
    /// Shell lines run before the server starts on this host only (after the global prologue).
    #[serde(default)]
    pub prologue: Vec<String>,
    /// Draining: no new server goes to this host; the servers already there
    /// are polled and stopped as usual (maintenance, or before retiring it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

impl HostConfig {
    /// The display name.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

/// Everything the spawner is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The compute hosts.
    pub hosts: Vec<HostConfig>,
    /// Remote user name; `{username}` is the hub user.
    #[serde(default = "d_remote_user")]
    pub remote_user: String,
    /// Private key file; `{username}` may appear (a key per user). Unset: use the agent.
    #[serde(default)]
    pub key_path: Option<String>,
    /// ssh-agent socket when `key_path` is unset; default `$SSH_AUTH_SOCK`.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// known_hosts file every host key is checked against.
    pub known_hosts: PathBuf,
    /// `strict` (default) or `accept-new`.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Ports servers may listen on.
    #[serde(default)]
    pub port_range: PortRange,
    /// `random` (default), `round-robin` or `least-loaded`.
    #[serde(default)]
    pub host_selection: Strategy,
    /// Per-user directory on the host for server files, under the remote home (`~/NAME`).
    #[serde(default = "d_state_dir")]
    pub state_dir: String,
    /// Shell lines run before every server starts, e.g. `module load python`.
    #[serde(default)]
    pub prologue: Vec<String>,
    /// How `mem_limit` / `cpu_limit` are enforced: `auto`, `systemd`, `prlimit`, `none`.
    #[serde(default)]
    pub enforcement: EnforcementMode,
    /// Seconds between SIGTERM and SIGKILL on stop.
    #[serde(default = "d_stop_grace")]
    pub stop_grace: f64,
    /// Keep `server.log` in the per-server directory after stop.
    #[serde(default = "d_true")]
    pub keep_log: bool,
    /// Seconds to connect (TCP and key exchange).
    #[serde(default = "d_10")]
    pub connect_timeout: f64,
    /// Seconds to authenticate.
    #[serde(default = "d_10")]
    pub auth_timeout: f64,
    /// Seconds any one remote command may take (stop adds `stop_grace`).
    #[serde(default = "d_30")]
    pub command_timeout: f64,
    /// Seconds host facts are cached for host choice.
    #[serde(default = "d_facts_cache")]
    pub facts_cache: f64,
    /// Seconds a launch waits, once the server's pid is known, for its port
    /// to listen (the hub's first check then succeeds) or for it to exit (the
    /// start fails with its status and log), whichever comes first. When the
    /// wait runs out the start succeeds all the same and the hub's own checks
    /// take over. 0 returns as soon as the pid is known. The hub passes what
    /// is left of its `start_timeout` instead.
    #[serde(default = "d_ready_timeout")]
    pub ready_timeout: f64,
    /// Channels per SSH connection (sshd's MaxSessions).
    #[serde(default = "d_max_sessions")]
    pub max_sessions_per_connection: usize,
    /// SSH connections per host and remote user.
    #[serde(default = "d_max_connections")]
    pub max_connections_per_host: usize,
    /// Seconds before an unused connection is closed.
    #[serde(default = "d_idle")]
    pub idle_timeout: f64,
    /// Seconds of silence from a host before the hub sends an SSH keepalive.
    #[serde(default = "d_keepalive_interval")]
    pub keepalive_interval: f64,
    /// Unanswered keepalives after which a connection counts as dead (its
    /// tunnels then move to a new one): a silently dead link is noticed
    /// after about `keepalive_interval * (keepalive_count + 1)` seconds.
    #[serde(default = "d_keepalive_count")]
    pub keepalive_count: u32,
    /// Other ports tried when the chosen one is taken at launch.
    #[serde(default = "d_port_retries")]
    pub port_retries: u32,
    /// MiB of a GPU's memory a process not of this hub may use on it while
    /// the GPU still counts as free (a monitoring agent's context); a
    /// process using more (an ssh user's training job) makes it taken.
    #[serde(default = "d_gpu_busy_memory_mib")]
    pub gpu_busy_memory_mib: u64,
    /// Carry the hub's traffic to each server through an SSH tunnel over the
    /// pooled connection: the server listens on the host's loopback only and
    /// the hub reaches it at a local port. For hosts whose only open port is 22.
    #[serde(default)]
    pub tunnel: bool,
    /// Carry each server's traffic to the hub API through a remote forward
    /// (a port on the host's loopback): for hosts that cannot reach the hub.
    #[serde(default)]
    pub hub_tunnel: bool,
    /// The single-user command (the CLI's default; the hub passes its own).
    #[serde(default = "d_command")]
    pub command: Vec<String>,
}

fn d_ssh_port() -> u16 {
    22
}
fn d_remote_user() -> String {
    "{username}".into()
}
fn d_state_dir() -> String {
    "~/.jupyterhub-ssh".into()
}
fn d_stop_grace() -> f64 {
    10.0
}
fn d_true() -> bool {
    true
}
fn d_10() -> f64 {
    10.0
}
fn d_30() -> f64 {
    30.0
}
fn d_facts_cache() -> f64 {
    5.0
}
fn d_ready_timeout() -> f64 {
    60.0
}
fn d_max_sessions() -> usize {
    10
}
fn d_max_connections() -> usize {
    4
}
fn d_idle() -> f64 {
    300.0
}
fn d_keepalive_interval() -> f64 {
    15.0
}
fn d_keepalive_count() -> u32 {
    3
}
fn d_port_retries() -> u32 {
    5
}
fn d_gpu_busy_memory_mib() -> u64 {
    crate::plan::gpus::DEFAULT_BUSY_MEMORY_MIB
}
/// More MiB than any GPU has (16 TiB): a larger `gpu_busy_memory_mib` would
/// count every process as idle, which cannot be meant.
const MAX_GPU_BUSY_MEMORY_MIB: u64 = 16 << 20;
fn d_command() -> Vec<String> {
    vec!["jupyterhub-singleuser".into()]
}

/// Options of [`Config`] the JupyterHub class does not send, and why: it
/// has its own for them. Every other field is a traitlet of the class tagged
/// `rust=True`, sent by `_config_json` under the same name (a test of the
/// Python package compares the two lists through
/// `ssh_spawner._core.config_fields`).
pub const NOT_FROM_HUB: [(&str, &str); 2] = [
    (
        "ready_timeout",
        "each start passes what is left of Spawner.start_timeout",
    ),
    ("command", "each start passes Spawner.cmd and its arguments"),
];

impl Config {
    /// The names of every option (the serde fields of [`Config`]), read from
    /// its `Deserialize` implementation, so the list cannot drift from the
    /// struct.
    pub fn field_names() -> &'static [&'static str] {
        fields_of::<Config>()
    }
}

/// The field names a derived `Deserialize` asks for (`deserialize_struct`'s
/// `fields`), caught by a deserializer that answers nothing else.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Catch<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Catch<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _v: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("field names only"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _v: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("field names only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Catch(&mut fields));
    fields
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Duration options: name, value, whether 0 is allowed, most seconds. A
/// bound keeps every sum of durations far from overflowing and refuses
/// values that cannot be meant (0 for a timeout, 1e19 s).
type DurationBound = (&'static str, fn(&Config) -> f64, bool, f64);
const DURATION_BOUNDS: [DurationBound; 8] = [
    (
        "keepalive_interval",
        |c| c.keepalive_interval,
        false,
        3600.0,
    ),
    ("stop_grace", |c| c.stop_grace, true, 3600.0),
    ("connect_timeout", |c| c.connect_timeout, false, 600.0),
    ("auth_timeout", |c| c.auth_timeout, false, 600.0),
    ("command_timeout", |c| c.command_timeout, false, 3600.0),
    ("facts_cache", |c| c.facts_cache, true, 3600.0),
    ("idle_timeout", |c| c.idle_timeout, false, 86400.0),
    ("ready_timeout", |c| c.ready_timeout, true, 3600.0),
];

fn secs(what: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| invalid(what, format!("{v} is not a duration in seconds")))
}

impl Config {
    /// Read and validate a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("config file {}", path.display()), e.to_string()))?;
        let config: Config = toml::from_str(&text)
            .map_err(|e| invalid(format!("config file {}", path.display()), e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Read and validate JSON (what the Python class hands over).
    pub fn from_json(text: &str) -> Result<Config> {
        let config: Config = serde_json::from_str(text)
            .map_err(|e| invalid("spawner configuration", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check everything that can be checked without a host.
    pub fn validate(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return Err(invalid("hosts", "no hosts configured"));
        }
        let mut names = BTreeSet::new();
        for h in &self.hosts {
            if h.address.is_empty()
                || h.address
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "host address",
                    format!("{:?} is not a host name or address", h.address),
                ));
            }
            if !names.insert(h.display_name()) {
                return Err(invalid(
                    "hosts",
                    format!("{} is listed twice", h.display_name()),
                ));
            }
            if h.max_servers == Some(0) {
                return Err(invalid(
                    format!("max_servers of {}", h.display_name()),
                    "0 would never take a server",
                ));
            }
        }
        self.port_range.validate()?;
        check_template("remote_user", &self.remote_user)?;
        if let Some(k) = &self.key_path {
            check_template("key_path", k)?;
        }
        let dir = self.state_dir.strip_prefix("~/").unwrap_or(&self.state_dir);
        // Per user, under the home directory: launch makes the parent 0700.
        // Every launch checks `HOME/STATE_DIR/RUN` ([`check_dir`]; a
        // trailing `/` is dropped before): a `state_dir` it would refuse
        // (`~/./x`, `~/a//b`) is refused here, at load, not at every spawn.
        if dir.is_empty()
            || !self.state_dir.starts_with("~/")
            || check_dir(&format!("/home/user/{}/run", dir.trim_end_matches('/'))).is_err()
            || !dir
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
        {
            return Err(invalid(
                "state_dir",
                format!("{:?} must be `~/NAME` (per user, under the home directory) of letters, digits, `/._-`", self.state_dir),
            ));
        }
        for (what, v, zero_ok, max) in DURATION_BOUNDS {
            let v = v(self);
            secs(what, v)?;
            if v > max {
                return Err(invalid(
                    what,
                    format!("{v} s is more than the {max} s this option allows"),
                ));
            }
            if v == 0.0 && !zero_ok {
                return Err(invalid(
                    what,
                    "0 s would time out at once; give at least a fraction of a second",
                ));
            }
        }
        if self.gpu_busy_memory_mib > MAX_GPU_BUSY_MEMORY_MIB {
            return Err(invalid(
                "gpu_busy_memory_mib",
                format!(
                    "{} MiB is more than any GPU has (at most {MAX_GPU_BUSY_MEMORY_MIB})",
                    self.gpu_busy_memory_mib
                ),
            ));
        }
        if !(1..=100).contains(&self.keepalive_count) {
            return Err(invalid(
                "keepalive_count",
                format!("{} is not between 1 and 100", self.keepalive_count),
            ));
        }
        for (what, v) in [
            (
                "max_sessions_per_connection",
                self.max_sessions_per_connection,
            ),
            ("max_connections_per_host", self.max_connections_per_host),
        ] {
            if !(1..=1000).contains(&v) {
                return Err(invalid(what, format!("{v} is not between 1 and 1000")));
            }
        }
        if self.command.is_empty() {
            return Err(invalid("command", "empty"));
        }
        Ok(())
    }

    /// Seconds as a duration (values were validated).
    pub fn duration(v: f64) -> Duration {
        Duration::try_from_secs_f64(v).unwrap_or(Duration::ZERO)
    }

    /// Pool settings from these options.
    pub fn pool_options(&self) -> PoolOptions {
        let mut connect = ConnectOptions::new(&self.known_hosts);
        connect.host_key_policy = self.host_key_policy;
        connect.connect_timeout = Self::duration(self.connect_timeout);
        connect.auth_timeout = Self::duration(self.auth_timeout);
        connect.keepalive_interval = Self::duration(self.keepalive_interval);
        connect.keepalive_max = self.keepalive_count as usize;
        let mut opts = PoolOptions::new(connect);
        opts.max_sessions_per_connection = self.max_sessions_per_connection;
        opts.max_connections_per_target = self.max_connections_per_host;
        opts.idle_timeout = Self::duration(self.idle_timeout);
        opts.channel_timeout = Self::duration(self.connect_timeout);
        opts
    }

    /// The remote user for a hub user.
    pub fn remote_user_for(&self, username: &str) -> Result<String> {
        let user = fill(&self.remote_user, username)?;
        check_unix_user(&user)?;
        Ok(user)
    }

    /// The credential for a hub user.
    pub fn identity_for(&self, username: &str) -> Result<Identity> {
        match &self.key_path {
            Some(t) => Ok(Identity::KeyFile(PathBuf::from(fill(t, username)?))),
            None => match &self.agent_socket {
                Some(s) => Ok(Identity::Agent(s.clone())),
                None => Identity::agent_from_env(),
            },
        }
    }

    /// A host by display name.
    pub fn host(&self, name: &str) -> Option<&HostConfig> {
        self.hosts.iter().find(|h| h.display_name() == name)
    }
}

fn check_template(what: &str, template: &str) -> Result<()> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(invalid(what, format!("unclosed `{{` in {template:?}")));
        };
        let name = &after[..close];
        if name != "username" {
            return Err(invalid(
                what,
                format!("unknown placeholder {{{name}}} in {template:?}; only {{username}}"),
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// A hub user name is refused unless it is safe in a path and in a shell:
/// letters, digits and `._@+-`, not starting with `.` or `-`, at most 64 characters.
pub fn check_username(username: &str) -> Result<()> {
    let ok = !username.is_empty()
        && username.len() <= 64
        && !username.starts_with(['.', '-'])
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            format!("user name {username:?}"),
            "only letters, digits and `._@+-` (not first: `.` `-`), at most 64, can be used on a host",
        ))
    }
}

/// A remote (POSIX) user name: letters, digits, `._-`, not starting with `-`, at most 32.
fn check_unix_user(user: &str) -> Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with(['-', '.'])
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            format!("remote user name {user:?}"),
            "not a valid user name on a host",
        ))
    }
}

/// A size as people write it (the rule lives with the plan's other size
/// helpers, which read it too).
pub use crate::plan::hosts::parse_size;

/// Fill `{username}` after validating the value.
pub fn fill(template: &str, username: &str) -> Result<String> {
    check_username(username)?;
    Ok(template.replace("{username}", username))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_the_structs_and_name_the_hub_exceptions() {
        let names = Config::field_names();
        for f in [
            "hosts",
            "known_hosts",
            "port_range",
            "keepalive_count",
            "hub_tunnel",
        ] {
            assert!(names.contains(&f), "{f} in {names:?}");
        }
        for (f, _) in NOT_FROM_HUB {
            assert!(names.contains(&f), "{f} in {names:?}");
        }
        // Every name is a key the JSON reader takes, and nothing else is.
        let mut all = serde_json::Map::new();
        let c: Config = toml::from_str(MIN).unwrap();
        let full = serde_json::to_value(&c).unwrap();
        for f in names {
            let v = full.get(*f).cloned().unwrap_or(serde_json::json!(1.0));
            all.insert(f.to_string(), v);
        }
        Config::from_json(&serde_json::Value::Object(all.clone()).to_string()).unwrap();
        all.insert("no_such_option".into(), serde_json::json!(1));
        let err = Config::from_json(&serde_json::Value::Object(all).to_string()).unwrap_err();
        assert!(err.to_string().contains("no_such_option"), "{err}");
    }

    const MIN: &str = r#"
known_hosts = "/etc/ssh/ssh_known_hosts"
key_path = "/etc/jupyterhub/ssh/{username}"
[[hosts]]
address = "node1.lab"
[[hosts]]
address = "198.18.0.12"
name = "node2"
max_servers = 20
prologue = ["module load python"]
"#;

    #[test]
    fn ready_timeout_defaults_to_60_s_and_bad_values_are_named() {
        let c: Config = toml::from_str(MIN).unwrap();
        assert_eq!(c.ready_timeout, 60.0);
        for bad in ["-1", "3601", "nan"] {
            let text = format!("ready_timeout = {bad}\n{MIN}");
            let c: Config = toml::from_str(&text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("ready_timeout"), "{bad}: {err}");
        }
        let c: Config = toml::from_str(&format!("ready_timeout = 0\n{MIN}")).unwrap();
        c.validate().unwrap();
        // The fixed wait it replaced is gone from the file format (the hub
        // class still accepts and ignores it, with a warning): a file that
        // sets it is refused with its name.
        let err = toml::from_str::<Config>(&format!("launch_settle = 0.3\n{MIN}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("launch_settle"), "{err}");
    }

    #[test]
    fn a_minimal_toml_gets_the_documented_defaults() {
        let c: Config = toml::from_str(MIN).unwrap();
        c.validate().unwrap();
        assert_eq!(c.remote_user, "{username}");
        let pool = c.pool_options();
        assert_eq!(pool.connect.keepalive_interval, Duration::from_secs(15));
        assert_eq!(pool.connect.keepalive_max, 3);
        assert_eq!(c.state_dir, "~/.jupyterhub-ssh");
        assert_eq!(c.host_selection, Strategy::Random);
        assert_eq!(c.host_key_policy, HostKeyPolicy::Strict);
        assert_eq!(c.enforcement, EnforcementMode::Auto);
        assert_eq!(c.hosts[0].port, 22);
        assert_eq!(c.hosts[0].display_name(), "node1.lab");
        assert_eq!(c.hosts[1].display_name(), "node2");
        assert_eq!(
            c.port_range,
            PortRange {
                start: 20000,
                end: 29999
            }
        );
        assert_eq!(
            c.identity_for("tb.bob-2").unwrap(),
            Identity::KeyFile("/etc/jupyterhub/ssh/tb.bob-2".into())
        );
        assert_eq!(c.remote_user_for("tb.bob-2").unwrap(), "tb.bob-2");
    }

    #[test]
    fn hostile_user_names_are_refused_with_the_name_in_the_error() {
        let c: Config = toml::from_str(MIN).unwrap();
        for bad in [
            "../x",
            "a b",
            "$(reboot)",
            "`id`",
            "-rf",
            ".hidden",
            "a/b",
            "a;b",
            "",
            "é",
            &"x".repeat(65),
        ] {
            let err = c.identity_for(bad).unwrap_err();
            assert!(err.to_string().contains("user name"), "{bad}: {err}");
            assert!(c.remote_user_for(bad).is_err(), "{bad}");
        }
        // Valid for the hub, not as a Unix user.
        assert!(c.remote_user_for("ann@lab.org").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        for bad in ["", "G", "2X", "-1G", "lots"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_options_name_the_option() {
        let cases = [
            ("hosts = []\nknown_hosts = \"k\"", "no hosts"),
            (&format!("remote_user = \"{{user}}\"\n{MIN}"), "placeholder"),
            (&format!("state_dir = \"../../etc\"\n{MIN}"), "state_dir"),
            (&format!("state_dir = \"/tmp/shared\"\n{MIN}"), "state_dir"),
            (&format!("state_dir = \"~/./x\"\n{MIN}"), "state_dir"),
            (&format!("state_dir = \"~/a//b\"\n{MIN}"), "state_dir"),
            (&format!("stop_grace = -1\n{MIN}"), "stop_grace"),
            (&format!("command_timeout = 0\n{MIN}"), "command_timeout"),
            (&format!("connect_timeout = 0\n{MIN}"), "time out at once"),
            (
                &format!("command_timeout = 1.8e19\n{MIN}"),
                "command_timeout",
            ),
            (&format!("stop_grace = 1e30\n{MIN}"), "stop_grace"),
            (&format!("idle_timeout = 86401\n{MIN}"), "idle_timeout"),
            (
                &format!("keepalive_interval = 0\n{MIN}"),
                "keepalive_interval",
            ),
            (&format!("keepalive_count = 0\n{MIN}"), "keepalive_count"),
            (&format!("auth_timeout = inf\n{MIN}"), "auth_timeout"),
            (
                &format!("max_sessions_per_connection = 0\n{MIN}"),
                "max_sessions_per_connection",
            ),
            (
                &format!("max_connections_per_host = 0\n{MIN}"),
                "max_connections_per_host",
            ),
            (
                &format!("port_range = {{ start = 10, end = 20 }}\n{MIN}"),
                "port range",
            ),
            (&format!("bogus = 1\n{MIN}"), "unknown field"),
        ];
        for (text, needle) in cases {
            let err = toml::from_str::<Config>(text)
                .map_err(|e| invalid("config", e.to_string()))
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }
}
