//! The hub's journal of starts in flight and of pending stops: what an entry
//! holds, and what the hub does with the entries it finds. No I/O: the files
//! are [`crate::journal`]'s, the background work [`crate::pending`]'s.
//!
//! JupyterHub saves a spawner's state to its database only after `start()`
//! returns. A hub killed between the launch on the host and that save has a
//! server running that its database does not know. So before anything is
//! launched the state is written to the journal, one entry per run, and the
//! entry is removed once the state is safely in the database. After a
//! restart, every run written by a hub process that is gone and not claimed
//! by a state the database holds is stopped ([`to_sweep`]).
//!
//! Pending stops use the same entries: a server the hub has forgotten while
//! it may still run is retried until its host answers ([`stops_to_retry`]).
//!
//! An entry is JSON, version 1:
//! `{"version": 1, "run_id": ..., "state": {...}, "writer": {"pid": ..., "start": ...}}`.
//! The state is the core's server state (nothing secret in it); the writer is
//! the hub process, named by its pid and its start time so that a recycled
//! pid is never taken for the same process.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::run::check_run_id;

/// The entry format this build writes and reads.
pub const ENTRY_VERSION: u64 = 1;

/// How every entry's file name ends.
pub const SUFFIX: &str = ".json";

/// A hub process: its pid and its start time (clock ticks since boot,
/// `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Writer {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The run it is for; names its file.
    pub run_id: String,
    /// The core's server state, JSON text.
    pub state: String,
    /// The hub process that wrote it.
    pub writer: Writer,
}

/// The entry for `state_json` written by `writer`: (run id, entry text).
pub fn encode(state_json: &str, writer: Writer) -> Result<(String, String), String> {
    let state: Value =
        serde_json::from_str(state_json).map_err(|e| format!("server state is not JSON: {e}"))?;
    let run_id = match state.get("run_id") {
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        _ => return Err("server state without a run_id".into()),
    };
    file_name(&run_id)?;
    let text = json!({
        "version": ENTRY_VERSION,
        "run_id": run_id,
        "state": state,
        "writer": {"pid": writer.pid, "start": writer.start},
    })
    .to_string();
    Ok((run_id, text))
}

/// Parse an entry; a malformed one is an error naming what is wrong.
pub fn decode(text: &str) -> Result<Entry, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if doc.get("version").and_then(Value::as_u64) != Some(ENTRY_VERSION) {
        return Err("not a version 1 journal entry".into());
    }
    let run_id = match doc.get("run_id") {
        Some(Value::String(r)) if check_run_id(r).is_ok() => r.clone(),
        other => return Err(format!("bad run_id {}", shown(other))),
    };
    let state = match doc.get("state") {
        Some(s @ Value::Object(m)) if m.get("run_id").and_then(Value::as_str) == Some(&run_id) => {
            s.to_string()
        }
        _ => return Err("state missing or for another run".into()),
    };
    let Some(writer) = doc.get("writer").filter(|w| w.is_object()) else {
        return Err("writer missing".into());
    };
    let pid = writer.get("pid").and_then(Value::as_u64);
    let start = writer.get("start").and_then(Value::as_u64);
    match (pid.and_then(|p| u32::try_from(p).ok()), start) {
        (Some(pid), Some(start)) if pid > 0 => Ok(Entry {
            run_id,
            state,
            writer: Writer { pid, start },
        }),
        _ => Err(format!("bad writer {writer}")),
    }
}

fn shown(v: Option<&Value>) -> String {
    v.map_or_else(|| "None".into(), Value::to_string)
}

/// The entry's file name for a run id (the crate's run-id rule: never a
/// path outside the journal).
pub fn file_name(run_id: &str) -> Result<String, String> {
    check_run_id(run_id).map_err(|_| format!("bad run_id {run_id:?}"))?;
    Ok(format!("{run_id}{SUFFIX}"))
}

/// The temporary name an entry is written under before it is renamed.
pub fn temp_name(run_id: &str) -> Result<String, String> {
    Ok(format!(".{}.tmp", file_name(run_id)?))
}

/// Whether a file in the journal directory is read as an entry.
pub fn is_entry_name(name: &str) -> bool {
    name.ends_with(SUFFIX) && !name.starts_with('.')
}

/// The entry in the file `name`: its text must decode and name that run.
pub fn entry_in_file(name: &str, text: &str) -> Result<Entry, String> {
    let entry = decode(text)?;
    if file_name(&entry.run_id).as_deref() != Ok(name) {
        return Err("file name does not match its run_id".into());
    }
    Ok(entry)
}

/// What a sweep does with the entries of a journal of starts in flight.
#[derive(Debug, Default, PartialEq)]
pub struct Sweep {
    /// Runs nobody owns any more (written by a hub process that is gone, and
    /// no state in the database names them): their servers must be stopped.
    pub stop: Vec<Entry>,
    /// Entries whose run the database knows: no longer needed.
    pub forget: Vec<Entry>,
}

/// Decide a sweep. `claimed`: run ids the database holds; `alive`: the
/// writers other than `me` that still run. Entries of this process or of
/// another live hub process are left alone.
pub fn to_sweep(
    entries: Vec<Entry>,
    claimed: &HashSet<String>,
    me: Writer,
    alive: &HashSet<Writer>,
) -> Sweep {
    let mut sweep = Sweep::default();
    for e in entries {
        if claimed.contains(&e.run_id) {
            sweep.forget.push(e);
        } else if e.writer != me && !alive.contains(&e.writer) {
            sweep.stop.push(e);
        }
    }
    sweep
}

/// The pending stops this process retries: its own, and those of hub
/// processes that are gone. A pending stop of another live hub process (two
/// hubs sharing a journal) is that process's to finish.
pub fn stops_to_retry(entries: Vec<Entry>, me: Writer, alive: &HashSet<Writer>) -> Vec<Entry> {
    entries
        .into_iter()
        .filter(|e| e.writer == me || !alive.contains(&e.writer))
        .collect()
}

/// The writers whose liveness a decision needs: every one but `me`, once.
pub fn other_writers(entries: &[Entry], me: Writer) -> HashSet<Writer> {
    entries
        .iter()
        .map(|e| e.writer)
        .filter(|w| *w != me)
        .collect()
}

/// A process's start time from its `/proc/PID/stat` text; `None` for a
/// zombie or a text that is not a stat line. The command name (field 2) may
/// hold anything, `)` and spaces included: the fields are read after its
/// last `)`.
pub fn stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X")) | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Writer = Writer {
        pid: 100,
        start: 5000,
    };
    const DEAD: Writer = Writer {
        pid: 200,
        start: 6000,
    };
    const OTHER: Writer = Writer {
        pid: 300,
        start: 7000,
    };

    fn state() -> String {
        json!({"run_id": "0123456789abcdef", "host": "node1", "dir": "/h/x/0123456789abcdef"})
            .to_string()
    }

    fn entry(run_id: &str, writer: Writer) -> Entry {
        Entry {
            run_id: run_id.into(),
            state: json!({ "run_id": run_id }).to_string(),
            writer,
        }
    }

    fn ids(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.run_id.as_str()).collect()
    }

    #[test]
    fn entries_round_trip_and_hold_no_more_than_the_state() {
        let (run_id, text) = encode(&state(), ME).unwrap();
        assert_eq!(run_id, "0123456789abcdef");
        let e = decode(&text).unwrap();
        assert_eq!(e.run_id, "0123456789abcdef");
        let got: Value = serde_json::from_str(&e.state).unwrap();
        assert_eq!(got, serde_json::from_str::<Value>(&state()).unwrap());
        assert_eq!(e.writer, ME);
        let doc: Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["run_id", "state", "version", "writer"]);
    }

    #[test]
    fn entries_written_by_the_python_journal_are_read() {
        // json.dumps(..., sort_keys=True) of the journal before it moved to Rust.
        let text = r#"{"run_id": "0123456789abcdef", "state": {"dir": "/h/x/0123456789abcdef", "host": "node1", "run_id": "0123456789abcdef"}, "version": 1, "writer": {"pid": 100, "start": 5000}}"#;
        let e = entry_in_file("0123456789abcdef.json", text).unwrap();
        assert_eq!(e.writer, ME);
        assert_eq!(e.run_id, "0123456789abcdef");
    }

    #[test]
    fn malformed_entries_are_named_errors() {
        for (text, why) in [
            ("", "not JSON"),
            ("[]", "version 1"),
            (r#"{"version": 2}"#, "version 1"),
            (
                r#"{"version": 1, "run_id": "../x", "state": {}, "writer": {}}"#,
                "bad run_id",
            ),
            (
                r#"{"version": 1, "run_id": "ab", "state": {"run_id": "cd"}, "writer": {}}"#,
                "another run",
            ),
            (
                r#"{"version": 1, "run_id": "ab", "state": {"run_id": "ab"}, "writer": {"pid": -1, "start": 0}}"#,
                "bad writer",
            ),
            (
                r#"{"version": 1, "run_id": "ab", "state": {"run_id": "ab"}, "writer": {"pid": "1", "start": 0}}"#,
                "bad writer",
            ),
            (
                r#"{"version": 1, "run_id": "ab", "state": {"run_id": "ab"}, "writer": {"pid": 0, "start": 0}}"#,
                "bad writer",
            ),
            (
                r#"{"version": 1, "run_id": "ab", "state": {"run_id": "ab"}}"#,
                "writer missing",
            ),
        ] {
            let err = decode(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn a_state_without_run_id_is_refused() {
        assert!(encode("{}", ME).unwrap_err().contains("run_id"));
        assert!(encode(r#"{"run_id": "../../etc"}"#, ME).is_err());
    }

    #[test]
    fn file_names_never_leave_the_journal() {
        assert_eq!(file_name("ab12").unwrap(), "ab12.json");
        assert_eq!(temp_name("ab12").unwrap(), ".ab12.json.tmp");
        for bad in ["", "../../etc/passwd", "a/b", ".x", "A", "a_b"] {
            assert!(file_name(bad).is_err(), "{bad:?}");
        }
        assert!(is_entry_name("ab.json"));
        assert!(!is_entry_name(".ab.json.tmp"));
        assert!(!is_entry_name(".ab.json"));
        assert!(!is_entry_name("ab.txt"));
    }

    #[test]
    fn an_entry_must_sit_in_the_file_of_its_run() {
        let (_, text) = encode(&state(), ME).unwrap();
        assert!(entry_in_file("0123456789abcdef.json", &text).is_ok());
        let err = entry_in_file("ffff.json", &text).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn sweep_stops_only_unclaimed_runs_of_dead_writers() {
        let entries = vec![
            entry("a", DEAD),  // a dead hub's start the database never saw: stop
            entry("b", DEAD),  // a dead hub's start the database knows: forget the entry
            entry("c", ME),    // a start in flight in this process: leave
            entry("d", OTHER), // another live hub's start: leave
            entry("e", ME),    // this process's, and saved already: forget
        ];
        let claimed = HashSet::from(["b".to_string(), "e".to_string()]);
        let sweep = to_sweep(entries, &claimed, ME, &HashSet::from([OTHER]));
        assert_eq!(ids(&sweep.stop), ["a"]);
        assert_eq!(ids(&sweep.forget), ["b", "e"]);
    }

    #[test]
    fn a_recycled_pid_is_not_the_same_writer() {
        // Same pid, another start time: the writer died and its pid was reused.
        let reused = Writer {
            pid: ME.pid,
            start: ME.start - 1,
        };
        let sweep = to_sweep(
            vec![entry("a", reused)],
            &HashSet::new(),
            ME,
            &HashSet::new(),
        );
        assert_eq!(ids(&sweep.stop), ["a"]);
    }

    #[test]
    fn pending_stops_retried_are_this_processes_and_dead_hubs() {
        let entries = vec![entry("a", ME), entry("b", DEAD), entry("c", OTHER)];
        let mine = stops_to_retry(entries, ME, &HashSet::from([OTHER]));
        assert_eq!(ids(&mine), ["a", "b"]);
    }

    #[test]
    fn other_writers_leave_out_this_process() {
        let entries = [entry("a", ME), entry("b", DEAD), entry("c", DEAD)];
        assert_eq!(other_writers(&entries, ME), HashSet::from([DEAD]));
    }

    #[test]
    fn start_time_is_read_after_a_hostile_command_name() {
        let tail = "S 1 2 3 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            stat_start_time(&format!("42 (a) b\nc) {tail}")),
            Some(987654)
        );
        assert_eq!(stat_start_time(&format!("42 (sleep) {tail}")), Some(987654));
        let zombie = tail.replacen('S', "Z", 1);
        assert_eq!(stat_start_time(&format!("42 (x) {zombie}")), None);
        assert_eq!(stat_start_time("42 (x) S 1"), None);
        assert_eq!(stat_start_time("garbage"), None);
    }
}
