//! `ssh-spawner`: the admin's command line on the same core as the hub class.
//! Human-readable by default, `--json` for scripts.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ssh_spawner::config::{parse_size, Config};
use ssh_spawner::plan::hosts::{human_bytes, Requirements};
use ssh_spawner::plan::limits::Limits;
use ssh_spawner::plan::poll::ExitReason;
use ssh_spawner::plan::state::{self, ServerState};
use ssh_spawner::spawner::{
    PollOutcome, Progress, SpawnRequest, Spawner, StartHooks, StartOptions,
};
use ssh_spawner::ssh::{
    Command, ConnectOptions, HostKeyPolicy, Identity, Pool, PoolOptions, Target,
};
use ssh_spawner::Error;

/// `println!` that ends the CLI quietly when its reader went away
/// (`ssh-spawner check | head -1`), as other command-line tools do, where
/// std's would panic: status 141 (128 + SIGPIPE) for a closed pipe, 1 for
/// any other failed write.
macro_rules! println {
    ($($arg:tt)*) => {{
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe { 141 } else { 1 });
        }
    }};
}

#[derive(Parser)]
#[command(
    name = "ssh-spawner",
    version,
    about = "Start, inspect and stop JupyterHub servers on SSH hosts"
)]
struct Cli {
    /// Configuration file (TOML): hosts, keys, known_hosts, ... See the README.
    #[arg(long, short, global = true, env = "SSH_SPAWNER_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check every host: reachable, host key, auth, command found, memory,
    /// load, servers. Exits 1 when a host fails.
    Check {
        /// Hub user to log in as (its remote user and key are used).
        #[arg(long)]
        user: String,
    },
    /// Start a server for a user; prints its state (keep it for poll and stop).
    Spawn {
        /// Hub user.
        #[arg(long)]
        user: String,
        /// Named server.
        #[arg(long, default_value = "")]
        server_name: String,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Memory a host must have available, e.g. 4G.
        #[arg(long)]
        mem_guarantee: Option<String>,
        /// Idle cores a host must have.
        #[arg(long)]
        cpu_guarantee: Option<f64>,
        /// GPUs the server gets: only a host with this many free is chosen,
        /// and the server sees those alone (CUDA_VISIBLE_DEVICES).
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Memory limit, e.g. 2G.
        #[arg(long)]
        mem_limit: Option<String>,
        /// CPU limit in cores.
        #[arg(long)]
        cpu_limit: Option<f64>,
        /// Extra environment, NAME=VALUE (repeatable). The value is in this
        /// command's argv, which every user of the hub machine can read: put
        /// secrets in --env-file instead.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Extra environment from a file of NAME=VALUE lines (blank lines and
        /// lines starting with `#` are skipped; the value is the rest of the
        /// line, taken as it is). Repeatable; read after --env.
        #[arg(long = "env-file", value_name = "FILE")]
        env_file: Vec<std::path::PathBuf>,
        /// The command (default: `command` from the configuration).
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Is the server running? Exit 0 running, 3 exited, 4 unknown (host not answering).
    Poll {
        /// The state printed by spawn: JSON, @FILE or - for stdin.
        state: String,
    },
    /// Stop the server (TERM, then KILL after the grace) and clean up.
    Stop {
        /// The state printed by spawn: JSON, @FILE or - for stdin.
        state: String,
    },
    /// Servers running on each host, all users.
    List {
        /// Hub user to log in as.
        #[arg(long)]
        user: String,
    },
    /// Run one command on a host through the spawner's verified SSH path
    /// (no configuration file needed).
    Exec {
        /// Host name or address.
        #[arg(long)]
        host: String,
        /// SSH port.
        #[arg(long, default_value_t = 22)]
        port: u16,
        /// Remote user.
        #[arg(long)]
        user: String,
        /// Private key file (a `-cert.pub` next to it is used too).
        #[arg(long, conflicts_with = "agent")]
        key: Option<PathBuf>,
        /// Use the ssh-agent at $SSH_AUTH_SOCK.
        #[arg(long)]
        agent: bool,
        /// known_hosts file.
        #[arg(long)]
        known_hosts: PathBuf,
        /// Record unknown host keys on first contact (changed keys are still refused).
        #[arg(long)]
        accept_new: bool,
        /// Seconds before the command is stopped.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The command, given to the remote user's shell.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ssh-spawner: {e}");
            ExitCode::from(1)
        }
    }
}

fn spawner(config: &Option<PathBuf>) -> Result<Spawner, Error> {
    let Some(path) = config else {
        return Err(Error::Invalid {
            what: "configuration".into(),
            reason: "give --config FILE (or set SSH_SPAWNER_CONFIG)".into(),
        });
    };
    Spawner::new(Config::from_toml_file(path)?)
}

fn read_state(arg: &str) -> Result<ServerState, Error> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::Invalid {
                what: "state on stdin".into(),
                reason: e.to_string(),
            })?;
        s
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).map_err(|e| Error::Invalid {
            what: format!("state file {path}"),
            reason: e.to_string(),
        })?
    } else {
        arg.to_string()
    };
    state::decode(&text)
}

/// The CLI's start hooks: an attempt abandoned on a host that stopped
/// answering (its server may have started there) is cleaned up in the
/// background as everywhere, and kept, so that the CLI waits for that
/// before it exits and prints what it could not stop.
#[derive(Default)]
struct Abandoned(std::sync::Mutex<Vec<ServerState>>);

impl StartHooks for Abandoned {
    async fn launching(&self, _sp: &Spawner, _state: &ServerState) -> Result<(), Error> {
        Ok(())
    }

    async fn abandoned(&self, sp: &Spawner, state: ServerState, why: String) {
        eprintln!("ssh-spawner: {why}: stopping what it may have started there");
        if let Ok(mut all) = self.0.lock() {
            all.push(state.clone());
        }
        sp.clean_up_later(state);
    }
}

impl Abandoned {
    /// Wait for the clean-ups (at most twice a stop's own bound: the
    /// connect and command timeouts and the grace), then print every
    /// abandoned attempt not known to be stopped, with the state
    /// `ssh-spawner stop` takes. The runtime ends with the CLI: nothing
    /// would retry.
    async fn finish(&self, sp: &Spawner) {
        let all = self.0.lock().map(|a| a.clone()).unwrap_or_default();
        if all.is_empty() {
            return;
        }
        let c = sp.config();
        let bound =
            Duration::from_secs_f64(2.0 * (c.connect_timeout + c.command_timeout + c.stop_grace));
        let until = tokio::time::Instant::now() + bound;
        while all.iter().any(|s| sp.is_cleaning_up(&s.run_id))
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for s in &all {
            // A clean-up that ended may have given up: only a poll that
            // finds nothing running there clears the attempt.
            if !sp.is_cleaning_up(&s.run_id)
                && matches!(sp.poll(s).await, PollOutcome::Exited { .. })
            {
                continue;
            }
            match state::encode(s) {
                Ok(text) => eprintln!(
                    "ssh-spawner: the start abandoned on {} is not known to be stopped (waited {bound:?}); \
                     a server may be running there as {}: once the host answers, run: ssh-spawner stop '{text}'",
                    s.host, s.remote_user
                ),
                Err(e) => eprintln!("ssh-spawner: {}: cannot print the state of run {}: {e}", s.host, s.run_id),
            }
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("ssh-spawner: cannot print JSON: {e}"),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Cmd::Check { user } => {
            let sp = spawner(&cli.config)?;
            let rows = sp.check(&user).await?;
            let failed = rows.iter().any(|r| !r.ok());
            if cli.json {
                print_json(&rows);
            } else {
                println!(
                    "{:<10} {:<20} {:<9} {:<8} {:<7} {:<7} {:>8} {:>11} {:>7} {:<10} {:<7}",
                    "HOST",
                    "ADDRESS",
                    "REACHABLE",
                    "HOST KEY",
                    "AUTH",
                    "COMMAND",
                    "MEM FREE",
                    "LOAD/CORES",
                    "SERVERS",
                    "GPUS",
                    "LIMITS"
                );
                for r in &rows {
                    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    println!(
                        "{:<10} {:<20} {:<9} {:<8} {:<7} {:<7} {:>8} {:>11} {:>7} {:<10} {:<7}",
                        r.host,
                        r.address,
                        match (r.reachable, &r.down) {
                            (true, None) => "yes",
                            (true, Some(_)) => "held",
                            (false, _) => "DOWN",
                        },
                        r.host_key,
                        r.auth,
                        match r.command_found {
                            Some(true) => "found",
                            Some(false) => "MISSING",
                            None => "-",
                        },
                        opt(r.mem_available.map(human_bytes)),
                        opt(r.load1.zip(r.cpus).map(|(l, c)| format!("{l:.2}/{c}"))),
                        opt(r.servers.map(|s| s.to_string())),
                        r.gpu_column(),
                        opt(r.limits.clone()),
                    );
                }
                for line in rows.iter().filter_map(|r| r.gpu_line()) {
                    println!("\n{line}");
                }
                for r in rows.iter().filter(|r| r.draining) {
                    println!("\n{}: {}", r.host, ssh_spawner::plan::hosts::DRAINING);
                }
                for r in &rows {
                    if let Some(advice) = &r.limits_advice {
                        println!("\n{}: limits: {advice}", r.host);
                    }
                }
                for r in rows
                    .iter()
                    .filter(|r| r.error.is_some() || r.down.is_some())
                {
                    match (&r.down, &r.error) {
                        (Some(down), _) => println!("\n{}: {down}", r.host),
                        (None, Some(e)) => println!("\n{}: {e}", r.host),
                        (None, None) => {}
                    }
                }
            }
            sp.pool().close_all().await;
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Spawn {
            user,
            server_name,
            host,
            mem_guarantee,
            cpu_guarantee,
            gpus,
            mem_limit,
            cpu_limit,
            env,
            env_file,
            command,
        } => {
            let sp = spawner(&cli.config)?;
            if sp.config().tunnel || sp.config().hub_tunnel {
                // Tunnels live in the process that opened them; this one exits.
                return Err(Error::Invalid {
                    what: "tunnel / hub_tunnel".into(),
                    reason: "the CLI cannot keep SSH tunnels open after it exits; \
                             spawn servers that need tunnels from the hub"
                        .into(),
                });
            }
            let size = |v: Option<String>| v.map(|s| parse_size(&s)).transpose();
            let req = SpawnRequest {
                username: user.clone(),
                server_name: server_name.clone(),
                requirements: Requirements {
                    mem_guarantee: size(mem_guarantee)?,
                    cpu_guarantee,
                    gpus,
                },
                limits: Limits {
                    mem: size(mem_limit)?,
                    cpu: cpu_limit,
                },
                host,
                exclude: Vec::new(),
            };
            let mut extra = Vec::new();
            for kv in env {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(Error::Invalid {
                        what: format!("--env {kv:?}"),
                        reason: "expected NAME=VALUE".into(),
                    });
                };
                extra.push((k.to_string(), v.to_string()));
            }
            for path in env_file {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::Invalid {
                    what: format!("--env-file {}", path.display()),
                    reason: e.to_string(),
                })?;
                extra.extend(
                    parse_env_file(&text).map_err(|(line, reason)| Error::Invalid {
                        what: format!("--env-file {} line {line}", path.display()),
                        reason,
                    })?,
                );
            }
            let command = if command.is_empty() {
                sp.config().command.clone()
            } else {
                command
            };
            let progress = Progress::new();
            let printer = {
                let progress = progress.clone();
                tokio::spawn(async move {
                    let mut cursor = 0;
                    loop {
                        let events = progress.next_from(cursor).await;
                        if events.is_empty() {
                            return;
                        }
                        cursor += events.len();
                        for e in events {
                            eprintln!("[{:>3}%] {}", e.progress, e.message);
                        }
                    }
                })
            };
            let env_for = |s: &ServerState| {
                // What JupyterHub would export, minus hub-only values.
                let prefix = if server_name.is_empty() {
                    format!("/user/{user}/")
                } else {
                    format!("/user/{user}/{server_name}/")
                };
                let mut env = vec![
                    (
                        "JUPYTERHUB_SERVICE_URL".to_string(),
                        format!("http://0.0.0.0:{}{prefix}", s.port),
                    ),
                    ("JUPYTERHUB_SERVICE_PREFIX".to_string(), prefix),
                    ("JUPYTERHUB_USER".to_string(), user.clone()),
                    ("JUPYTERHUB_SERVER_NAME".to_string(), server_name.clone()),
                ];
                if let Some(m) = req.limits.mem {
                    env.push(("MEM_LIMIT".into(), m.to_string()));
                }
                if let Some(c) = req.limits.cpu {
                    env.push(("CPU_LIMIT".into(), c.to_string()));
                }
                env.extend(extra.iter().cloned());
                env
            };
            let abandoned = Abandoned::default();
            let result = match sp.prepare(&req, &progress).await {
                Ok(prepared) => {
                    let opts = StartOptions {
                        ready_until: None,
                        hub_api: None,
                        may_move: true,
                    };
                    sp.start(
                        prepared, &req, env_for, &command, &progress, &opts, &abandoned,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            progress.finish();
            let _ = printer.await;
            abandoned.finish(&sp).await;
            let state = result?;
            sp.pool().close_all().await;
            if cli.json {
                print_json(&state);
            } else {
                println!(
                    "{} on {} ({}:{}) as {}, pid {}",
                    command.join(" "),
                    state.host,
                    state.address,
                    state.port,
                    state.remote_user,
                    state.pid.unwrap_or(0)
                );
                println!("state: {}", state::encode(&state)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Poll { state } => {
            let sp = spawner(&cli.config)?;
            let state = read_state(&state)?;
            let outcome = sp.poll(&state).await;
            sp.pool().close_all().await;
            let (word, detail, code) = match &outcome {
                PollOutcome::Running => ("running", String::new(), 0),
                PollOutcome::Exited { status, reason } => (
                    "exited",
                    format!(
                        "{}{}",
                        match reason {
                            ExitReason::Exited => "the process ended",
                            ExitReason::Zombie => "the process is a zombie",
                            ExitReason::PidReused => "its pid now belongs to another process",
                            ExitReason::Rebooted => "the host rebooted",
                            ExitReason::Gone => "the process is gone",
                        },
                        status.map(|s| format!(", status {s}")).unwrap_or_default()
                    ),
                    3,
                ),
                PollOutcome::Unknown(e) => ("unknown", e.to_string(), 4),
            };
            if cli.json {
                print_json(&serde_json::json!({"status": word, "detail": detail}));
            } else if detail.is_empty() {
                println!("{word}");
            } else {
                println!("{word}: {detail}");
            }
            Ok(ExitCode::from(code))
        }
        Cmd::Stop { state } => {
            let sp = spawner(&cli.config)?;
            let state = read_state(&state)?;
            let stopped = sp.stop(&state).await?;
            sp.pool().close_all().await;
            let word = stopped.to_string();
            if cli.json {
                print_json(&serde_json::json!({"stopped": word}));
            } else {
                println!("{}: {word}", state.host);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { user } => {
            let sp = spawner(&cli.config)?;
            let hosts = sp.list(&user).await?;
            sp.pool().close_all().await;
            let draining = |h: &str| sp.config().host(h).is_some_and(|c| c.drain);
            let failed = hosts.iter().any(|(_, r)| r.is_err());
            if cli.json {
                let v: Vec<_> = hosts
                    .iter()
                    .map(|(h, r)| match r {
                        Ok(l) => serde_json::json!({
                            "host": h, "draining": draining(h), "servers": l.servers,
                            "gpus": l.gpus, "gpu_error": l.gpu_error, "gpus_skipped": l.skipped,
                        }),
                        Err(e) => serde_json::json!({"host": h, "draining": draining(h), "error": e.to_string()}),
                    })
                    .collect();
                print_json(&v);
            } else {
                println!("{}", ssh_spawner::plan::holders::header());
                let mut gpu_lines = Vec::new();
                for (h, r) in &hosts {
                    if draining(h) {
                        println!("{h:<10} {}", ssh_spawner::plan::hosts::DRAINING);
                    }
                    match r {
                        Ok(list) => {
                            for row in list.rows() {
                                println!("{row}");
                            }
                            gpu_lines.extend(list.gpu_line());
                        }
                        Err(e) => println!("{h:<10} error: {e}"),
                    }
                }
                for line in gpu_lines {
                    println!("{line}");
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Exec {
            host,
            port,
            user,
            key,
            agent,
            known_hosts,
            accept_new,
            timeout,
            command,
        } => {
            let identity = match (key, agent) {
                (Some(k), _) => Identity::KeyFile(k),
                (None, true) => Identity::agent_from_env()?,
                (None, false) => {
                    return Err(Error::Invalid {
                        what: "credentials".into(),
                        reason: "give --key FILE or --agent".into(),
                    })
                }
            };
            let mut connect = ConnectOptions::new(known_hosts);
            if accept_new {
                connect.host_key_policy = HostKeyPolicy::AcceptNew;
            }
            let pool = Pool::new(PoolOptions::new(connect));
            let target = Target::new(host, user, identity).port(port);
            let cmd = Command::new(command.join(" ")).timeout(Duration::from_secs(timeout));
            let out = pool.exec(&target, &cmd).await?;
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
            pool.close_all().await;
            Ok(ExitCode::from(
                out.status.map(|s| s.min(255) as u8).unwrap_or(255),
            ))
        }
    }
}

/// `NAME=VALUE` lines; blank lines and `#` comments skipped. A bad line is
/// `(line number, reason)`, never its text (it may hold a secret).
fn parse_env_file(text: &str) -> std::result::Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err((i + 1, "expected NAME=VALUE".into()));
        };
        ssh_spawner::plan::quote::check_env_name(name).map_err(|e| (i + 1, e.to_string()))?;
        out.push((name.to_string(), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod env_file_tests {
    use super::parse_env_file;

    #[test]
    fn env_files_parse_and_bad_lines_are_named_without_their_text() {
        let vars = parse_env_file("# token\n\nAPI_TOKEN=s3cr=t \nEMPTY=\r\n").unwrap();
        assert_eq!(
            vars,
            vec![
                ("API_TOKEN".to_string(), "s3cr=t ".to_string()),
                ("EMPTY".to_string(), String::new())
            ]
        );
        assert_eq!(
            parse_env_file("A=1\nsecret-without-name\n").unwrap_err().0,
            2
        );
        let (line, reason) = parse_env_file("BAD NAME=secret\n").unwrap_err();
        assert_eq!(line, 1);
        assert!(!reason.contains("secret"), "{reason}");
    }
}
