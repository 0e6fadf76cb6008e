//! The journal's files on the hub: one 0600 file per run in a 0700
//! directory, written durably (fsync, atomic rename, fsync of the directory)
//! before anything is launched. What an entry holds and what the hub does
//! with the entries is decided in [`crate::plan::journal`]; the background
//! work on them is [`crate::pending`]'s.
//!
//! Every call here blocks on the file system: from async code, run it with
//! `tokio::task::spawn_blocking`.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::plan::history::History;
use crate::plan::journal::{self as plan, Entry, Writer};

/// The configuration history's file in the journal directory (not named
/// `*.json`: that is an entry).
pub const HISTORY_FILE: &str = "config-history";

/// A journal directory (created 0700 on the first write; entries 0600).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Journal {
    dir: PathBuf,
}

/// A file in the directory that is not a valid entry, and why.
pub type BadFile = (PathBuf, String);

impl Journal {
    /// The journal at `dir`: `~` is the hub user's home, and a relative path
    /// is taken from the hub's working directory (like `jupyterhub.sqlite`).
    pub fn new(dir: &str) -> Journal {
        let expanded = match (dir.strip_prefix('~'), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
                PathBuf::from(home).join(rest.trim_start_matches('/'))
            }
            _ => PathBuf::from(dir),
        };
        let dir = std::path::absolute(&expanded).unwrap_or(expanded);
        Journal { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The journal of pending stops, `stops/` inside this one.
    pub fn stops(&self) -> Journal {
        Journal {
            dir: self.dir.join("stops"),
        }
    }

    fn ensure_dir(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mode = fs::metadata(&self.dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The configurations the hub ran with (`config-history`), with
    /// today's `remote_user` template and `state_dir` put first and the file
    /// rewritten if that changed it. An unreadable file is replaced, and the
    /// error says so (what it held is lost: servers started under those
    /// values are then refused, never acted on as another login).
    pub fn remember(&self, remote_user: &str, state_dir: &str) -> (History, Option<String>) {
        let path = self.dir.join(HISTORY_FILE);
        let mut problem = None;
        let mut history = match fs::read_to_string(&path) {
            Ok(text) => History::from_json(&text).unwrap_or_else(|e| {
                problem = Some(format!(
                    "{} is not a configuration history ({e}); starting it again",
                    path.display()
                ));
                History::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => History::default(),
            Err(e) => {
                problem = Some(format!("cannot read {}: {e}", path.display()));
                History::default()
            }
        };
        if history.record(remote_user, state_dir) || problem.is_some() {
            if let Err(e) = self.write_file(HISTORY_FILE, &history.to_json()) {
                problem = Some(format!("cannot write {}: {e}", path.display()));
            }
        }
        (history, problem)
    }

    /// Write `name` in the directory durably (0600, atomic rename). A stale
    /// temporary file (a hub killed mid-write) is replaced; `create_new`
    /// never follows a link planted under its name.
    fn write_file(&self, name: &str, text: &str) -> io::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        self.ensure_dir()?;
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Record a state written by `writer`; returns its run id. Durable
    /// before it returns. The error says what could not be done.
    pub fn write(&self, state_json: &str, writer: Writer) -> Result<String, String> {
        let (run_id, text) = plan::encode(state_json, writer)?;
        let name = plan::file_name(&run_id)?;
        self.write_file(&name, &text).map_err(|e| e.to_string())?;
        Ok(run_id)
    }

    /// Remove a run's entry; a missing one, or a run id that names no file
    /// of this journal, is not an error.
    pub fn remove(&self, run_id: &str) {
        if let Ok(name) = plan::file_name(run_id) {
            let _ = fs::remove_file(self.dir.join(name));
        }
    }

    /// Every entry (by file name), and the files that are not valid entries.
    /// A missing directory holds nothing.
    pub fn read_all(&self) -> (Vec<Entry>, Vec<BadFile>) {
        let (mut entries, mut bad) = (Vec::new(), Vec::new());
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return (entries, bad);
        };
        let mut names: Vec<String> = dir
            .filter_map(|d| d.ok())
            .filter_map(|d| d.file_name().into_string().ok())
            .filter(|n| plan::is_entry_name(n))
            .collect();
        names.sort();
        for name in names {
            let path = self.dir.join(&name);
            let read = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8 text".to_string()));
            match read.and_then(|text| plan::entry_in_file(&name, &text)) {
                Ok(e) => entries.push(e),
                Err(why) => bad.push((path, why)),
            }
        }
        (entries, bad)
    }
}

/// This hub process as journal entries name it: its pid and start time
/// (read once from `/proc/self/stat`).
pub fn this_process() -> Writer {
    static ME: std::sync::OnceLock<Writer> = std::sync::OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        Writer {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    })
}

/// A process's start time (clock ticks since boot); `None` if it is gone.
fn process_start(pid: u32) -> Option<u64> {
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    plan::stat_start_time(&String::from_utf8_lossy(&raw))
}

/// Whether the hub process that wrote an entry still runs (the same pid
/// with the same start time: a recycled pid is another process).
pub fn is_alive(writer: Writer) -> bool {
    process_start(writer.pid) == Some(writer.start)
}

/// The writers of `entries` other than `me` that still run.
pub fn live_writers(entries: &[Entry], me: Writer) -> HashSet<Writer> {
    plan::other_writers(entries, me)
        .into_iter()
        .filter(|w| is_alive(*w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str =
        r#"{"run_id": "0123456789abcdef", "host": "node1", "dir": "/h/x/0123456789abcdef"}"#;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ssh-spawner-journal-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        d
    }

    #[test]
    fn files_are_private_and_bad_ones_reported() {
        let root = tmp();
        let j = Journal::new(root.join("journal").to_str().unwrap());
        let me = this_process();
        let run_id = j.write(STATE, me).unwrap();
        let path = root.join("journal").join(format!("{run_id}.json"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&root.join("journal")), 0o700);
        fs::write(root.join("journal/garbage.json"), "{").unwrap();
        let (_, text) = plan::encode(STATE, me).unwrap();
        fs::write(root.join("journal/ffff.json"), text).unwrap(); // name != run id
        let (entries, bad) = j.read_all();
        assert_eq!(
            entries
                .iter()
                .map(|e| e.run_id.as_str())
                .collect::<Vec<_>>(),
            [run_id.as_str()]
        );
        assert_eq!(entries[0].writer, me);
        let mut bad: Vec<String> = bad
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        bad.sort();
        assert_eq!(bad, ["ffff.json", "garbage.json"]);
        j.remove(&run_id);
        j.remove(&run_id); // twice is fine
        j.remove("../../etc/passwd"); // never outside the journal
        assert!(!path.exists());
        let hidden = fs::read_dir(root.join("journal"))
            .unwrap()
            .filter(|d| {
                d.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(hidden, 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_unwritable_journal_says_where() {
        let root = tmp();
        fs::create_dir_all(&root).unwrap();
        let blocker = root.join("not-a-directory");
        fs::write(&blocker, "").unwrap();
        let j = Journal::new(blocker.join("journal").to_str().unwrap());
        assert!(j.write(STATE, this_process()).is_err());
        assert!(j.read_all().0.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_directory_holds_nothing() {
        let j = Journal::new(tmp().to_str().unwrap());
        let (entries, bad) = j.read_all();
        assert!(entries.is_empty() && bad.is_empty());
    }

    #[test]
    fn paths_are_absolute_and_stops_live_inside() {
        let j = Journal::new("ssh-spawner-journal");
        assert!(j.dir().is_absolute());
        assert!(j.dir().ends_with("ssh-spawner-journal"));
        assert_eq!(j.stops().dir(), j.dir().join("stops"));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(Journal::new("~/j").dir(), Path::new(&home).join("j"));
        }
    }

    #[test]
    fn this_process_is_alive_and_a_recycled_pid_is_not() {
        let me = this_process();
        assert!(me.start > 0);
        assert!(is_alive(me));
        assert!(!is_alive(Writer {
            pid: me.pid,
            start: me.start + 1
        }));
        let entries = [Entry {
            run_id: "a".into(),
            state: "{}".into(),
            writer: Writer {
                pid: me.pid,
                start: me.start + 1,
            },
        }];
        assert!(live_writers(&entries, me).is_empty());
    }
}
