//! Shared helpers for tests that cross SSH: they read the testbed's JSON
//! description (written by `scripts/testbed up`) instead of hard-coding hosts.
//!
//! As root, a missing testbed is a failure (CI runs as root and brings the bed
//! up first). Without root, the test prints a loud SKIPPED line and returns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use ssh_spawner::ssh::{ConnectOptions, Identity, Pool, PoolOptions, Target};

#[derive(Debug, Clone, Deserialize)]
pub struct Testbed {
    pub dir: PathBuf,
    pub hub_address: String,
    pub known_hosts: PathBuf,
    pub known_hosts_names: PathBuf,
    pub hub_key: PathBuf,
    pub stranger_key: PathBuf,
    pub venv: PathBuf,
    pub python: PathBuf,
    pub testbed_script: PathBuf,
    pub hosts: Vec<Host>,
    pub users: Vec<User>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub address: String,
    pub port: u16,
    pub host_key_pub_line: String,
    pub max_sessions: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
    pub keys: std::collections::BTreeMap<String, PathBuf>,
}

pub fn json_path() -> PathBuf {
    std::env::var_os("TESTBED_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ssh-spawner-testbed/testbed.json"))
}

fn is_root() -> bool {
    // SAFETY-free way: the effective uid of this process from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The testbed, or `None` (after a loud message) when not running as root.
pub fn testbed(test: &str) -> Option<Testbed> {
    if !is_root() {
        eprintln!(
            "\n!!!!! SKIPPED {test}: needs root and the network-namespace testbed \
             (run `sudo scripts/test`) !!!!!\n"
        );
        return None;
    }
    let path = json_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "testbed description {} unreadable ({e}): run `scripts/testbed up` first",
            path.display()
        )
    });
    Some(serde_json::from_str(&text).expect("testbed.json parses"))
}

impl Testbed {
    pub fn user(&self, name: &str) -> &User {
        self.users
            .iter()
            .find(|u| u.name == name)
            .expect("user in testbed")
    }
    pub fn alice(&self) -> &User {
        &self.users[0]
    }
    pub fn bob(&self) -> &User {
        &self.users[1]
    }
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("host in testbed")
    }

    /// Pool options with short bounds so a failing test fails fast.
    pub fn pool_options(&self) -> PoolOptions {
        let mut connect = ConnectOptions::new(&self.known_hosts);
        connect.connect_timeout = Duration::from_secs(5);
        connect.auth_timeout = Duration::from_secs(5);
        PoolOptions::new(connect)
    }

    pub fn pool(&self) -> Pool {
        Pool::new(self.pool_options())
    }

    /// `user@host` with the hub key.
    pub fn target(&self, host: &str, user: &str) -> Target {
        let h = self.host(host);
        Target::new(&h.address, user, Identity::KeyFile(self.hub_key.clone())).port(h.port)
    }

    /// This checkout's `scripts/testbed`: the one in testbed.json is whichever
    /// checkout last ran `up`, which may be gone or older.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed")
    }

    /// Run a fault handle of `scripts/testbed` and insist it worked.
    pub fn fault(&self, action: &str, host: &str) {
        let out = std::process::Command::new(Self::script())
            .args([action, host])
            .output()
            .expect("run scripts/testbed");
        assert!(
            out.status.success(),
            "scripts/testbed {action} {host} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Undo a fault when the test ends, even if an assertion failed.
pub struct Undo<'a> {
    pub testbed: &'a Testbed,
    pub action: &'static str,
    pub host: String,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Testbed::script())
            .args([self.action, &self.host])
            .status();
    }
}

/// A scratch directory removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "ssh-spawner-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("make scratch dir");
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// Stops a server the test started when the test panics before stopping it
/// itself, so a failing test leaves no process on a shared host. On success
/// it does nothing (the tests stop their servers as part of what they check).
/// The stop runs on a thread of its own with a fresh Spawner (a new pool):
/// the test's runtime is unwinding and cannot drive its own connections.
pub struct StopOnPanic {
    config: ssh_spawner::config::Config,
    state: ssh_spawner::plan::state::ServerState,
}

impl StopOnPanic {
    pub fn new(
        sp: &ssh_spawner::spawner::Spawner,
        state: &ssh_spawner::plan::state::ServerState,
    ) -> StopOnPanic {
        StopOnPanic {
            config: sp.config().clone(),
            state: state.clone(),
        }
    }
}

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (config, state) = (self.config.clone(), self.state.clone());
        let stopped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let sp = ssh_spawner::spawner::Spawner::new(config).map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(30), sp.stop(&state))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        eprintln!(
            "StopOnPanic: the failed test's server {} on {}: {:?}",
            self.state.run_id, self.state.host, stopped
        );
    }
}

/// An sshd of its own in node1's namespace, on a port of its own, with the
/// testbed host's configuration but for `tweaks` (`(keyword, value)`, each
/// replacing that keyword's line, or added when there is none); killed, and
/// its port's blackhole lifted, when dropped.
pub struct OwnSshd {
    child: std::process::Child,
    pub port: u16,
    pub address: String,
    netns: String,
    _scratch: Scratch,
    /// A known_hosts file naming this sshd (`[address]:port`).
    pub known_hosts: PathBuf,
    /// The nft table of [`OwnSshd::blackhole`], while it is there.
    table: std::sync::Mutex<Option<String>>,
}

impl OwnSshd {
    pub fn start(tb: &Testbed, tweaks: &[(&str, &str)]) -> OwnSshd {
        let host = tb.host("node1");
        let scratch = Scratch::new("sshd");
        let port = 2300 + (rand::random::<u16>() % 2000);
        let config = std::fs::read_to_string(format!(
            "/var/lib/ssh-spawner-testbed/hosts/{}/sshd_config",
            host.name
        ))
        .unwrap();
        let mut config: String = config
            .lines()
            .map(|l| {
                let key = l.split_whitespace().next().unwrap_or_default();
                if key == "ListenAddress" {
                    format!("ListenAddress {}:{port}", host.address)
                } else if key == "PidFile" {
                    format!("PidFile {}", scratch.path("sshd.pid").display())
                } else if let Some((k, v)) = tweaks.iter().find(|(k, _)| *k == key) {
                    format!("{k} {v}")
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        for (k, v) in tweaks {
            if !config
                .lines()
                .any(|l| l.split_whitespace().next() == Some(k))
            {
                config.push_str(&format!("{k} {v}\n"));
            }
        }
        let cfg = scratch.path("sshd_config");
        std::fs::write(&cfg, config).unwrap();
        let known_hosts = scratch.path("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[{}]:{port} {}\n", host.address, host.host_key_pub_line),
        )
        .unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &host.netns, "/usr/sbin/sshd", "-D", "-f"])
            .arg(&cfg)
            .args(["-E"])
            .arg(scratch.path("sshd.log"))
            .spawn()
            .unwrap();
        let sshd = OwnSshd {
            child,
            port,
            address: host.address.clone(),
            netns: host.netns.clone(),
            _scratch: scratch,
            known_hosts,
            table: std::sync::Mutex::new(None),
        };
        let addr = format!("{}:{port}", host.address);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < end,
                "sshd on {addr} never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sshd
    }

    fn nft(&self, script: &str) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "nft {script:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Drop every packet to and from this sshd's port, as a crashed host
    /// does: a new connection gets no answer at all, and one already made
    /// carries nothing more either way (only this port: the host's own sshd
    /// and everything else there are untouched).
    pub fn blackhole(&self) {
        let table = format!("ssbh{}", self.port);
        self.nft(&format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority 0;\n  tcp dport {port} drop\n }}\n chain output {{\n  type filter hook output priority 0;\n  tcp sport {port} drop\n }}\n}}\n",
            port = self.port
        ));
        *self.table.lock().unwrap() = Some(table);
    }

    /// The sshd's pid (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lift [`OwnSshd::blackhole`].
    pub fn heal(&self) {
        if let Some(table) = self.table.lock().unwrap().take() {
            self.nft(&format!("delete table inet {table}\n"));
        }
    }
}

impl Drop for OwnSshd {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(table) = t.take() {
                let _ = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.netns,
                        "nft",
                        "delete",
                        "table",
                        "inet",
                        &table,
                    ])
                    .status();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The messages a spawn's progress showed so far, in order.
pub fn messages(progress: &ssh_spawner::spawner::Progress) -> Vec<String> {
    progress
        .snapshot(0)
        .into_iter()
        .map(|e| e.message)
        .collect()
}

/// Whether `cond` became true within `limit` (checked every 50 ms; the
/// runtime's other tasks run meanwhile).
pub async fn until_true(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stand-in `nvidia-smi` (scripts/testbed-nvidia-smi) in `scratch/bin`,
/// printing the fixture set named in `scratch/selected` (a test switches it
/// by writing that file; `sets` are copied
/// from fixtures/gpus, the first one selected): returns the `PATH` an sshd
/// gives its sessions (`SetEnv`) so they find it first.
pub fn standin_nvidia_smi(scratch: &Scratch, sets: &[&str]) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = scratch.path("gpus");
    for set in sets {
        std::fs::create_dir_all(dir.join(set)).unwrap();
        for file in std::fs::read_dir(repo.join("fixtures/gpus").join(set)).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), dir.join(set).join(file.file_name())).unwrap();
        }
    }
    let selected = scratch.path("selected");
    std::fs::write(&selected, format!("{}\n", sets[0])).unwrap();
    let bin = scratch.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let standin = std::fs::read_to_string(repo.join("scripts/testbed-nvidia-smi"))
        .unwrap()
        .replace("@SELECTION@", selected.to_str().unwrap())
        .replace("@FIXTURES@", dir.to_str().unwrap());
    std::fs::write(bin.join("nvidia-smi"), standin).unwrap();
    std::fs::set_permissions(
        bin.join("nvidia-smi"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    format!(
        "PATH={}:/usr/local/bin:/usr/bin:/bin:/usr/games",
        bin.display()
    )
}

/// The bed's known_hosts plus `sshd`'s key, in `scratch/known_hosts`.
pub fn known_hosts_with(tb: &Testbed, sshd: &OwnSshd, scratch: &Scratch) -> PathBuf {
    let known_hosts = scratch.path("known_hosts");
    std::fs::write(
        &known_hosts,
        std::fs::read_to_string(&tb.known_hosts).unwrap()
            + &std::fs::read_to_string(&sshd.known_hosts).unwrap(),
    )
    .unwrap();
    known_hosts
}
