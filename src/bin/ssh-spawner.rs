//! `ssh-spawner`: the admin's command line on the same core as the hub class.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ssh_spawner::ssh::{
    Command, ConnectOptions, HostKeyPolicy, Identity, Pool, PoolOptions, Target,
};

#[derive(Parser)]
#[command(
    name = "ssh-spawner",
    version,
    about = "Start, inspect and stop JupyterHub servers on SSH hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one command on a host through the spawner's verified SSH path
    /// (host key checked, key or agent auth, bounded in time and output).
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
    match Cli::parse().command {
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
                (None, true) => match Identity::agent_from_env() {
                    Ok(i) => i,
                    Err(e) => return fail(&e),
                },
                (None, false) => {
                    eprintln!("ssh-spawner: give --key FILE or --agent");
                    return ExitCode::from(2);
                }
            };
            let mut connect = ConnectOptions::new(known_hosts);
            if accept_new {
                connect.host_key_policy = HostKeyPolicy::AcceptNew;
            }
            let pool = Pool::new(PoolOptions::new(connect));
            let target = Target::new(host, user, identity).port(port);
            let cmd = Command::new(command.join(" ")).timeout(Duration::from_secs(timeout));
            match pool.exec(&target, &cmd).await {
                Ok(out) => {
                    let _ = std::io::stdout().write_all(&out.stdout);
                    let _ = std::io::stderr().write_all(&out.stderr);
                    pool.close_all().await;
                    ExitCode::from(out.status.map(|s| s.min(255) as u8).unwrap_or(255))
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(e: &ssh_spawner::Error) -> ExitCode {
    eprintln!("ssh-spawner: {e}");
    ExitCode::from(1)
}
