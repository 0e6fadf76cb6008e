//! What a host reports about itself, and which host a server goes to.
//!
//! One exec per host reads everything a choice needs (free memory, cores,
//! load, servers running, listening ports, whether systemd and prlimit are
//! there). Choosing is a plain function of those facts.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;

use super::gpus::{self, GpuFacts};
use super::ports::listening_ports;
use super::quote::{invalid, quote};
use super::run::{self, marker_pattern, RUN_MARKER};
use super::sh::{self, Preamble};
use crate::error::{Error, Result};

/// How the next server's host is chosen among those that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Uniformly among hosts that fit (the default: spreads a 9 a.m. rush).
    #[default]
    Random,
    /// The next host in configuration order after the last one used.
    RoundRobin,
    /// Fewest servers, then lowest load per core.
    LeastLoaded,
}

/// What one host reported.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFacts {
    /// The host's own name (`hostname`).
    pub hostname: String,
    /// The remote user's home directory.
    pub home: String,
    /// The remote user's uid.
    pub uid: u32,
    /// `MemAvailable` in bytes.
    pub mem_available: u64,
    /// `MemTotal` in bytes.
    pub mem_total: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// One-minute load average.
    pub load1: f64,
    /// `/proc/sys/kernel/random/boot_id`: changes when the host reboots.
    pub boot_id: String,
    /// Servers started by any ssh-spawner on this host (all users).
    pub servers: usize,
    /// A systemd user manager answers (`systemd-run --user` usable).
    pub systemd_user: bool,
    /// `prlimit` is installed.
    pub prlimit: bool,
    /// Whether the single-user command was found (only when asked).
    pub command_found: Option<bool>,
    /// TCP ports in LISTEN state.
    pub listening: BTreeSet<u16>,
    /// `env --default-signal` works (coreutils >= 8.31); `None` when the
    /// facts did not say. Spares each launch testing it.
    pub default_signal: Option<bool>,
    /// The GPUs `nvidia-smi` listed and the processes on them, or that the
    /// host has no `nvidia-smi`, or why it failed ([`gpus`]).
    pub gpus: GpuFacts,
}

impl HostFacts {
    /// Cores not busy, by the one-minute load.
    pub fn free_cores(&self) -> f64 {
        (f64::from(self.cpus) - self.load1).max(0.0)
    }
}

const TCP_MARK: &str = "--- proc-net-tcp";

/// The facts script (`sh/facts.sh`). With `command_check` (the prologue
/// and the command's first word, quoted with [`quote`]), it also runs the
/// prologue in a subshell and reports whether the command is found.
pub fn facts_script(command_check: Option<(&[String], &str)>) -> String {
    facts_script_for(command_check, RUN_MARKER)
}

/// [`facts_script`] counting the runs of wrappers marked `run_marker` (the
/// tests' own marker, so that servers of other tests are not counted).
fn facts_script_for(command_check: Option<(&[String], &str)>, run_marker: &str) -> String {
    let mut p = Preamble::new();
    // The marker, its pattern and the mark are this crate's: nothing to refuse.
    p.quoted(
        "run_pattern",
        &quote_known(&run::pattern_not_matching_itself(run_marker)),
    )
    .quoted("run_marker", &quote_known(run_marker))
    .quoted("tcp_mark", &quote_known(TCP_MARK))
    .quoted("gpu_query", &quote_known(gpus::GPU_QUERY))
    .quoted("app_query", &quote_known(gpus::APP_QUERY))
    .number("gpu_timeout", gpus::NVIDIA_SMI_TIMEOUT_SECS);
    match command_check {
        Some((prologue, command)) => {
            p.flag("check_command", "1")
                .quoted("command", command)
                .function("ssp_prologue", prologue);
        }
        None => {
            p.flag("check_command", "0")
                .quoted("command", "''")
                .function("ssp_prologue", &[]);
        }
    }
    p.script(&[sh::FACTS])
}

/// [`quote`] for a constant of this crate, which holds no NUL.
fn quote_known(text: &str) -> String {
    quote(text, "constant").unwrap_or_else(|_| "''".into())
}

/// Kibibytes as printed by /proc/meminfo, in bytes; `None` if not a number or too large.
fn kib(v: &str) -> Option<u64> {
    v.parse::<u64>().ok()?.checked_mul(1024)
}

/// Parse what [`facts_script`] printed.
pub fn parse_facts(stdout: &str) -> Result<HostFacts> {
    let (head, tcp) = stdout.split_once(TCP_MARK).unwrap_or((stdout, ""));
    let mut f = HostFacts {
        hostname: String::new(),
        home: String::new(),
        uid: u32::MAX,
        mem_available: 0,
        mem_total: 0,
        cpus: 0,
        load1: 0.0,
        boot_id: String::new(),
        servers: 0,
        systemd_user: false,
        prlimit: false,
        command_found: None,
        listening: listening_ports(tcp),
        default_signal: None,
        gpus: GpuFacts::None,
    };
    // The GPU lines, gathered for gpus::from_facts.
    let (mut smi, mut gpu, mut gpu_app, mut said) = (None, String::new(), String::new(), vec![]);
    let bad = |what: &str, v: &str| Error::Invalid {
        what: "host facts".into(),
        reason: format!("{what} is not a valid number: {v:?}"),
    };
    for line in head.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "hostname" => f.hostname = v.to_string(),
            "home" => f.home = v.to_string(),
            "uid" => f.uid = v.parse().map_err(|_| bad(k, v))?,
            "mem_total_kb" => f.mem_total = kib(v).ok_or_else(|| bad(k, v))?,
            "mem_available_kb" => f.mem_available = kib(v).ok_or_else(|| bad(k, v))?,
            "cpus" => f.cpus = v.parse().map_err(|_| bad(k, v))?,
            "load1" => {
                f.load1 = v
                    .parse::<f64>()
                    .ok()
                    .filter(|l| l.is_finite() && *l >= 0.0)
                    .ok_or_else(|| bad(k, v))?
            }
            "boot_id" => f.boot_id = v.to_string(),
            "servers" => {
                f.servers = if v.is_empty() {
                    0
                } else {
                    v.parse().map_err(|_| bad(k, v))?
                }
            }
            "systemd_user" => f.systemd_user = v == "yes",
            "prlimit" => f.prlimit = v == "yes",
            "command" => f.command_found = Some(v == "yes"),
            "default_signal" => f.default_signal = Some(v == "yes"),
            "nvidia_smi" => smi = Some(v),
            "gpu" => {
                gpu.push_str(v);
                gpu.push('\n');
            }
            "gpu_app" => {
                gpu_app.push_str(v);
                gpu_app.push('\n');
            }
            "nvidia_smi_said" => said.push(v),
            _ => {}
        }
    }
    f.gpus = gpus::from_facts(smi, &gpu, &gpu_app, &said);
    if f.home.is_empty() || !f.home.starts_with('/') || f.uid == u32::MAX || f.cpus == 0 {
        return Err(Error::Invalid {
            what: "host facts".into(),
            reason: format!(
                "incomplete report (home {:?}, uid {}, cpus {})",
                f.home, f.uid, f.cpus
            ),
        });
    }
    Ok(f)
}

/// One server found running on a host by [`list_script`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// The server's process group (the wrapper's).
    pub pgid: u32,
    /// Remote user it runs as.
    pub user: String,
    /// How long it has run, as `ps` prints it.
    pub elapsed: String,
    /// The run id from the marker.
    pub run_id: String,
}

/// Lists every user's servers on a host: argv (and so the marker) is
/// public. A command line for the login's shell (whatever it is), not a
/// script of `sh/`.
pub fn list_script() -> String {
    format!(
        "ps -eo pgid=,user:32=,etime=,args= | grep -e {} || true\n",
        quote_known(&marker_pattern())
    )
}

/// Parse what [`list_script`] printed; lines that do not match are skipped.
pub fn parse_list(stdout: &str) -> Vec<Listed> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let mut f = line.split_whitespace();
        let (Some(pid), Some(user), Some(elapsed)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(pgid) = pid.parse() else { continue };
        let Some((_, after)) = line.split_once(RUN_MARKER) else {
            continue;
        };
        let run_id: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if run_id.is_empty() || out.iter().any(|l: &Listed| l.run_id == run_id) {
            continue;
        }
        out.push(Listed {
            pgid,
            user: user.to_string(),
            elapsed: elapsed.to_string(),
            run_id,
        });
    }
    out
}

/// What a server asks of its host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Requirements {
    /// Bytes of memory that must be available.
    pub mem_guarantee: Option<u64>,
    /// Cores that must be idle.
    pub cpu_guarantee: Option<f64>,
    /// GPUs that must be free ([`gpus::free_gpus`]); 0: none asked.
    pub gpus: u32,
}

/// Why a draining host takes no server, as spawns, the form and `check` say.
pub const DRAINING: &str = "draining (no new servers; the ones there run on)";

/// One configured host as the chooser sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Display name.
    pub name: &'a str,
    /// Server cap from the configuration.
    pub max_servers: Option<usize>,
    /// The configuration drains the host: it takes no new server.
    pub draining: bool,
    /// Its facts, or why they could not be read.
    pub facts: std::result::Result<&'a HostFacts, String>,
    /// The GPUs (UUIDs) our servers hold there: not free, whatever the
    /// facts say (they may be older than the claim).
    pub held_gpus: BTreeSet<String>,
    /// `gpu_busy_memory_mib`: a process using more makes a GPU taken.
    pub gpu_busy_memory_mib: u64,
}

/// Why a host was passed over, in words for the spawn page.
fn unfit(c: &Candidate, req: &Requirements) -> Option<String> {
    if c.draining {
        return Some(DRAINING.into());
    }
    let f = match &c.facts {
        Ok(f) => f,
        Err(e) => return Some(unread(e)),
    };
    if let Some(max) = c.max_servers {
        if f.servers >= max {
            return Some(format!("full ({}/{max} servers)", f.servers));
        }
    }
    if let Some(mem) = req.mem_guarantee {
        if f.mem_available < mem {
            return Some(format!("{} free", human_bytes(f.mem_available)));
        }
    }
    if let Some(cpu) = req.cpu_guarantee {
        if f.free_cores() < cpu {
            return Some(format!("{:.1} cores idle", f.free_cores()));
        }
    }
    gpus_unfit(&f.gpus, &c.held_gpus, c.gpu_busy_memory_mib, req.gpus)
}

/// Why a host whose facts could not be read takes no server, from why they
/// could not (`e`), in the words spawns and the options form use.
pub fn unread(e: &str) -> String {
    // Marked down for everyone (plan::health): the reason says since when;
    // drained by the admin: it says so.
    if e.starts_with("down since") || e.starts_with("answering again") || e == DRAINING {
        e.to_string()
    } else {
        format!("down ({e})")
    }
}

/// Why a host cannot give `n` GPUs now (how many it has free and why the
/// others are not), `None` when it can: [`gpus::choose`] with `held` taken.
pub fn gpus_unfit(
    facts: &GpuFacts,
    held: &BTreeSet<String>,
    busy_memory_mib: u64,
    n: u32,
) -> Option<String> {
    if n == 0 {
        return None;
    }
    gpus::choose(facts, held, busy_memory_mib, n as usize)
        .err()
        .map(|why| format!("{why}, {n} asked"))
}

/// A refusal (`detail`) of the host `host` the user pinned the server to.
pub fn pinned_refusal(host: &str, detail: &str) -> String {
    format!("{host}, the host you chose, cannot take the server now ({detail}); choose another host or let the spawner choose")
}

/// The refusal when no host fits `req`: what it needs, then every host and
/// why not (`reasons`, `name: why`).
pub fn no_host(req: &Requirements, reasons: &[String]) -> Error {
    let mut need = Vec::new();
    if let Some(m) = req.mem_guarantee {
        need.push(format!("{} free", human_bytes(m)));
    }
    if let Some(c) = req.cpu_guarantee {
        need.push(format!("{c} idle cores"));
    }
    if req.gpus > 0 {
        let s = if req.gpus == 1 { "" } else { "s" };
        need.push(format!("{} free GPU{s}", req.gpus));
    }
    let what = if need.is_empty() {
        "no host can take a server".to_string()
    } else {
        format!("no host has {}", need.join(" and "))
    };
    Error::NoHost {
        detail: format!("{what}: {}", reasons.join(", ")),
    }
}

/// Order the hosts that fit, best first (the rest are the fail-over order).
/// `round_robin_next` is where round-robin starts. When none fits, one error
/// lists every host and why.
pub fn rank(
    candidates: &[Candidate],
    req: &Requirements,
    strategy: Strategy,
    round_robin_next: usize,
    rng: &mut impl Rng,
) -> Result<Vec<usize>> {
    let mut fit: Vec<usize> = Vec::new();
    let mut reasons = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        match unfit(c, req) {
            None => fit.push(i),
            Some(why) => reasons.push(format!("{}: {why}", c.name)),
        }
    }
    if fit.is_empty() {
        return Err(no_host(req, &reasons));
    }
    match strategy {
        Strategy::Random => fit.shuffle(rng),
        Strategy::RoundRobin => {
            let n = candidates.len().max(1);
            let start = round_robin_next % n;
            fit.sort_by_key(|i| (i + n - start) % n);
        }
        Strategy::LeastLoaded => {
            fit.shuffle(rng);
            let load = |i: &usize| match &candidates[*i].facts {
                Ok(f) => (f.servers, f.load1 / f64::from(f.cpus.max(1))),
                Err(_) => (usize::MAX, f64::MAX),
            };
            fit.sort_by(|a, b| {
                let (sa, la) = load(a);
                let (sb, lb) = load(b);
                sa.cmp(&sb).then(la.total_cmp(&lb))
            });
        }
    }
    Ok(fit)
}

/// A size as people write it: `2G`, `512M`, `1.5G`, `1048576` (bytes).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(invalid(
                        format!("size {text:?}"),
                        "unit must be K, M, G or T",
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult as f64) as u64),
        _ => Err(invalid(
            format!("size {text:?}"),
            "expected a number with an optional K, M, G or T",
        )),
    }
}

/// `3.1G`, `512M`: how people write memory sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v >= 10.0 || (v - v.round()).abs() < 0.05 {
                format!("{:.0}{unit}", v)
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A process group the test started; killed on drop.
    struct Group(std::process::Child);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0.id())])
                .status();
            let _ = self.0.wait();
        }
    }

    fn group(argv: &[&str], stdin: &str) -> Group {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        // Kept open: a `sh -s` reads on after its `sleep`.
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        Group(child)
    }

    /// The facts count runs whose wrapper runs, each once: not every process
    /// with the marker somewhere in its argv (which any user can start).
    #[test]
    fn the_server_count_matches_the_wrappers_argv_exactly() {
        let marker = format!("ssp-test-{:x}z:", rand::random::<u32>());
        let m = |id: &str| format!("{marker}{id}");
        let code = "sleep 1000; :";
        let (r1, r2, bad) = (m("run-1"), m("run-2"), m("Bad_Id"));
        let evil = m("evil");
        let procs = [
            // A launch leading its group and its wrapper subshell: one run.
            group(&["/bin/sh", "-s", &r1, "/tmp/ssp-x/run-1"], "sleep 1000\n"),
            group(&["/bin/sh", "-s", &r1, "/tmp/ssp-x/run-1"], "sleep 1000\n"),
            // A setsid'd wrapper.
            group(
                &["/bin/sh", "-c", code, &r2, "/tmp/ssp-x/run-2", "sleep", "1"],
                "",
            ),
            // The marker elsewhere in an argv.
            group(&["/bin/sh", "-c", code, "x", &evil, "y"], ""),
            group(&["/bin/sh", "-s", "x", &evil], "sleep 1000\n"),
            group(&["/bin/sh", "-s", &evil, "dir", "more"], "sleep 1000\n"),
            group(&["/bin/sh", "-c", code, &evil], ""),
            group(&["/bin/sh", "-s", &bad], "sleep 1000\n"),
            group(&["/bin/sh", "-s", &marker], "sleep 1000\n"),
        ];
        let all_up = || {
            procs.iter().all(|g| {
                std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                    std::fs::read_to_string(e.path().join("stat")).is_ok_and(|st| {
                        st.rsplit_once(')')
                            .and_then(|(_, r)| r.split_whitespace().nth(1))
                            .is_some_and(|ppid| ppid == g.0.id().to_string())
                    })
                })
            })
        };
        assert!(crate::plan::testing::wait_until(
            std::time::Duration::from_secs(5),
            all_up
        ));
        let out = crate::plan::testing::sh(&facts_script_for(None, &marker));
        let f = parse_facts(&out.stdout).unwrap();
        assert_eq!(f.servers, 2, "stderr: {}", out.stderr);
        drop(procs);
    }

    const REPORT: &str = "hostname=node1\nhome=/home/tb-alice\nuid=1001\nmem_total_kb=16000000\n\
mem_available_kb=3250585\ncpus=4\nload1=1.50\nboot_id=abc\nservers=2\nsystemd_user=no\nprlimit=yes\n\
--- proc-net-tcp\n  sl local rem st\n   0: 00000000:0016 00000000:0000 0A x\n";

    fn facts(servers: usize, mem_gb: f64, load1: f64) -> HostFacts {
        let mut f = parse_facts(REPORT).unwrap();
        f.servers = servers;
        f.mem_available = (mem_gb * (1u64 << 30) as f64) as u64;
        f.load1 = load1;
        f
    }

    #[test]
    fn parses_a_report() {
        let f = parse_facts(REPORT).unwrap();
        assert_eq!(f.default_signal, None);
        for (v, want) in [("yes", Some(true)), ("no", Some(false))] {
            let text = REPORT.replace(
                "prlimit=yes\n",
                &format!("prlimit=yes\ndefault_signal={v}\n"),
            );
            assert_eq!(parse_facts(&text).unwrap().default_signal, want);
        }
        assert_eq!(f.hostname, "node1");
        assert_eq!(f.home, "/home/tb-alice");
        assert_eq!(f.uid, 1001);
        assert_eq!(f.mem_available, 3250585 * 1024);
        assert_eq!(
            (f.cpus, f.servers, f.systemd_user, f.prlimit),
            (4, 2, false, true)
        );
        assert_eq!(f.free_cores(), 2.5);
        assert_eq!(f.listening.iter().copied().collect::<Vec<_>>(), vec![22]);
        assert_eq!(f.command_found, None);
    }

    #[test]
    fn refuses_garbage_and_partial_reports() {
        assert!(parse_facts("").is_err());
        assert!(parse_facts("home=/h\nuid=x\ncpus=2").is_err());
        assert!(parse_facts("home=relative\nuid=1\ncpus=2").is_err());
        let err = parse_facts("home=/h\nuid=1\ncpus=2\nload1=high").unwrap_err();
        assert!(err.to_string().contains("load1"), "{err}");
        for bad in [
            "load1=NaN",
            "load1=inf",
            "load1=-1",
            "mem_total_kb=18014398509481984",
        ] {
            assert!(
                parse_facts(&format!("home=/h\nuid=1\ncpus=2\n{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn no_host_fits_lists_every_host_and_why() {
        let (a, b) = (facts(0, 3.1, 0.0), facts(5, 64.0, 0.0));
        let cands = [
            Candidate {
                name: "node1",
                max_servers: None,
                draining: false,
                facts: Ok(&a),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
            Candidate {
                name: "node2",
                max_servers: Some(5),
                draining: false,
                facts: Ok(&b),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
            Candidate {
                name: "node3",
                max_servers: None,
                draining: false,
                facts: Err("timed out".into()),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
        ];
        let req = Requirements {
            mem_guarantee: Some(8 << 30),
            cpu_guarantee: None,
            gpus: 0,
        };
        let err = rank(&cands, &req, Strategy::Random, 0, &mut rand::rng()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no host has 8G free: node1: 3.1G free, node2: full (5/5 servers), node3: down (timed out)"
        );
    }

    #[test]
    fn a_draining_host_takes_no_new_server_however_idle_it_is() {
        let (idle, busy) = (facts(0, 64.0, 0.0), facts(9, 8.0, 1.9));
        let cands = [
            Candidate {
                name: "idle",
                max_servers: None,
                draining: true,
                facts: Ok(&idle),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
            Candidate {
                name: "busy",
                max_servers: None,
                draining: false,
                facts: Ok(&busy),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
        ];
        let req = Requirements::default();
        for strategy in [
            Strategy::LeastLoaded,
            Strategy::RoundRobin,
            Strategy::Random,
        ] {
            for rr in 0..4 {
                let order = rank(&cands, &req, strategy, rr, &mut rand::rng()).unwrap();
                assert_eq!(order, vec![1], "{strategy:?} {rr}");
            }
        }
        let err = rank(
            &cands[..1],
            &req,
            Strategy::LeastLoaded,
            0,
            &mut rand::rng(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no host can take a server: idle: {DRAINING}")
        );
    }

    #[test]
    fn strategies_order_the_hosts_that_fit() {
        let (a, b, c) = (facts(3, 8.0, 3.0), facts(1, 8.0, 0.5), facts(1, 8.0, 0.1));
        let cands = [
            Candidate {
                name: "a",
                max_servers: None,
                draining: false,
                facts: Ok(&a),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
            Candidate {
                name: "b",
                max_servers: None,
                draining: false,
                facts: Ok(&b),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
            Candidate {
                name: "c",
                max_servers: None,
                draining: false,
                facts: Ok(&c),
                held_gpus: Default::default(),
                gpu_busy_memory_mib: 100,
            },
        ];
        let req = Requirements::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(
            rank(&cands, &req, Strategy::LeastLoaded, 0, &mut rng).unwrap(),
            vec![2, 1, 0]
        );
        assert_eq!(
            rank(&cands, &req, Strategy::RoundRobin, 1, &mut rng).unwrap(),
            vec![1, 2, 0]
        );
        assert_eq!(
            rank(&cands, &req, Strategy::RoundRobin, 5, &mut rng).unwrap(),
            vec![2, 0, 1]
        );
        // Random reaches every host.
        let mut firsts = BTreeSet::new();
        for _ in 0..100 {
            firsts.insert(rank(&cands, &req, Strategy::Random, 0, &mut rng).unwrap()[0]);
        }
        assert_eq!(firsts.len(), 3);
        // cpu_guarantee: a has 1 idle core of 4.
        let req = Requirements {
            mem_guarantee: None,
            cpu_guarantee: Some(2.0),
            gpus: 0,
        };
        assert_eq!(
            rank(&cands, &req, Strategy::LeastLoaded, 0, &mut rng).unwrap(),
            vec![2, 1]
        );
    }

    #[test]
    fn lists_servers_from_ps() {
        let ps = "  4242 tb-alice      01:02:03 /bin/sh -c ... ssh-spawner-run:0123abcd x y\n\
                    4243 tb-alice      01:02:03 sleep 1 ssh-spawner-run:0123abcd\n\
                    bad line\n  77 tb.bob-2 00:05 sh ssh-spawner-run:ffff0000\n";
        let l = parse_list(ps);
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            Listed {
                pgid: 4242,
                user: "tb-alice".into(),
                elapsed: "01:02:03".into(),
                run_id: "0123abcd".into()
            }
        );
        assert_eq!(l[1].user, "tb.bob-2");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(8 << 30), "8G");
        assert_eq!(human_bytes(3_328_599_040), "3.1G");
        assert_eq!(human_bytes(512 << 20), "512M");
        assert_eq!(human_bytes(100), "100B");
    }
}
