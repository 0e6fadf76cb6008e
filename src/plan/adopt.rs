//! Finding a server whose start was interrupted (the hub's `start_timeout`
//! cancelled it, or the hub died) after the launch script ran but before its
//! pid reached the hub's state. The launch wrapper writes the pid into the
//! per-server directory, which the state names before launch, so the server
//! is found from there instead of being orphaned.

use super::script::quote;
use crate::error::Result;

/// Environment variable naming the run in every process of a server.
pub const RUN_ENV: &str = "SSH_SPAWNER_RUN";

/// What the adopt script prints when nothing of that run is alive.
pub const NOTHING: &str = "nothing";

/// Prints the same `key=value` lines as the launch script for the process in
/// `DIR/pid`, or [`NOTHING`].
///
/// A pid file can outlive its process (the server exited, the host
/// rebooted) and its pid can then belong to another program of the same
/// user, which stop would signal with its whole group. So the process is
/// reported only when everything says it is this run's server:
/// - the wrapper has not recorded an exit status;
/// - the pid file was written during this boot (its mtime is after the
///   boot time), and the process started no later than that (a process
///   started after the pid file was written is a reused pid);
/// - it is alive, not a zombie, and runs as this login;
/// - its environment carries `SSH_SPAWNER_RUN=RUN_ID`, which the launch
///   exports into every process of the run.
pub fn adopt_script(dir: &str, run_id: &str) -> Result<String> {
    let dir = quote(dir, "server directory")?;
    let marker = quote(&format!("{}={run_id}", RUN_ENV), "run id")?;
    Ok(format!(
        r#"set -u
d={dir}
no() {{ echo {NOTHING}; exit 0; }}
[ -e "$d/exit_status" ] && no
pid=$(cat "$d/pid" 2>/dev/null) || pid=
case $pid in ''|*[!0-9]*) no ;; esac
[ "$pid" -gt 1 ] || no
written=$(stat -c %Y -- "$d/pid" 2>/dev/null) || no
btime=$(while read -r k v; do [ "$k" = btime ] && echo "$v"; done < /proc/stat)
tck=$(getconf CLK_TCK 2>/dev/null) || tck=100
case $written$btime$tck in *[!0-9]*|'') no ;; esac
[ "$written" -ge "$btime" ] || no
stat=$(cat "/proc/$pid/stat" 2>/dev/null) || no
rest=${{stat##*) }}
set -f
set -- $rest
set +f
state=$1; pgid=$3
case $state in Z|X) no ;; esac
shift 19; start=$1
case $start in ''|*[!0-9]*) no ;; esac
[ $((btime + start / tck)) -le $((written + 1)) ] || no
uid=$(while read -r k v _; do [ "$k" = Uid: ] && echo "$v"; done < "/proc/$pid/status")
me=$(id -u)
[ "$uid" = "$me" ] || no
tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF {marker} || no
printf 'pid=%s\npgid=%s\nstart_time=%s\nuid=%s\nboot_id=%s\n' "$pid" "$pgid" "$start" "$uid" "$(cat /proc/sys/kernel/random/boot_id)"
"#
    ))
}

/// Removes a per-server directory in which nothing was started.
pub fn remove_dir_script(dir: &str) -> Result<String> {
    let dir = quote(dir, "server directory")?;
    Ok(format!("set -u\nrm -rf -- {dir}\n"))
}

#[cfg(test)]
mod tests {
    //! The adopt script run with the local `/bin/sh` against real processes.

    use super::*;
    use std::process::{Command, Stdio};

    fn adopt(dir: &std::path::Path, run_id: &str) -> String {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(adopt_script(&dir.display().to_string(), run_id).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper(marker: Option<&str>) -> Kill {
        let mut c = Command::new("sleep");
        c.arg("300").stdin(Stdio::null());
        c.env_remove(RUN_ENV);
        if let Some(m) = marker {
            c.env(RUN_ENV, m);
        }
        Kill(c.spawn().unwrap())
    }

    #[test]
    fn only_a_process_proven_to_be_this_runs_is_adopted() {
        let dir = std::env::temp_dir().join(format!("adopt-test-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = "0123456789abcdef";
        // A process of this user without the run's marker (pid reuse, or an
        // old pid file): never adopted.
        let stranger = sleeper(None);
        std::fs::write(dir.join("pid"), format!("{}\n", stranger.0.id())).unwrap();
        assert_eq!(adopt(&dir, run).trim(), NOTHING);
        // Another run's marker: not adopted either.
        let other = sleeper(Some("fedcba9876543210"));
        std::fs::write(dir.join("pid"), format!("{}\n", other.0.id())).unwrap();
        assert_eq!(adopt(&dir, run).trim(), NOTHING);
        // This run's process, started before its pid file was written: adopted.
        let ours = sleeper(Some(run));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("pid"), format!("{}\n", ours.0.id())).unwrap();
        let out = adopt(&dir, run);
        assert!(out.contains(&format!("pid={}\n", ours.0.id())), "{out}");
        // A pid file older than the process (the pid came back later): no.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30);
        std::fs::File::options()
            .write(true)
            .open(dir.join("pid"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(adopt(&dir, run).trim(), NOTHING);
        // Written before this boot: no.
        std::fs::File::options()
            .write(true)
            .open(dir.join("pid"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        assert_eq!(adopt(&dir, run).trim(), NOTHING);
        // The wrapper recorded an exit status: the run is over.
        std::fs::write(dir.join("pid"), format!("{}\n", ours.0.id())).unwrap();
        assert!(adopt(&dir, run).contains("pid="));
        std::fs::write(dir.join("exit_status"), "0\n").unwrap();
        assert_eq!(adopt(&dir, run).trim(), NOTHING);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
