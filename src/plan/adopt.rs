//! Finding a server whose start was interrupted (the hub's `start_timeout`
//! cancelled it, or the hub died) after the launch script ran but before its
//! pid reached the hub's state. The launch wrapper writes the pid into the
//! per-server directory, which the state names before launch, so the server
//! is found from there instead of being orphaned.

use super::run;
use super::sh::{self, Preamble};
use crate::error::Result;

/// What the adopt script prints when nothing of that run is alive.
pub const NOTHING: &str = "nothing";

/// Prints the same `key=value` lines as the launch script for the process in
/// `DIR/pid`, or [`NOTHING`]: only when everything says it is this run's
/// server (`sh/adopt.sh` says what).
pub fn adopt_script(dir: &str, run_id: &str) -> Result<String> {
    let mut p = Preamble::new();
    p.value("d", dir, "server directory")?
        .value("env_marker", &run::env_marker(run_id), "run id")?
        .value("nothing", NOTHING, "nothing")?;
    Ok(p.script(&[sh::LIB, sh::ADOPT]))
}

/// Removes a per-server directory in which nothing was started.
pub fn remove_dir_script(dir: &str) -> Result<String> {
    let mut p = Preamble::new();
    p.value("d", dir, "server directory")?;
    Ok(p.script(&[sh::REMOVE_DIR]))
}

#[cfg(test)]
mod tests {
    //! The adopt script run with the local `/bin/sh` against real processes.

    use super::*;
    use crate::plan::run::RUN_ENV;
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
