//! What names one run (one start of one server) on a host: its id, its
//! directory, the marker in its wrapper's argv and the variable in its
//! processes' environment. Each rule is written once, here.

use super::quote::invalid;
use crate::error::Result;

/// Marker in every server wrapper's argv (`ssh-spawner-run:RUN_ID`), so
/// servers can be counted and listed with `pgrep -f` by any user (argv is
/// public; it holds no secret).
pub const RUN_MARKER: &str = "ssh-spawner-run:";

/// Environment variable naming the run in every process of a server.
pub const RUN_ENV: &str = "SSH_SPAWNER_RUN";

/// The marker of one run: [`RUN_MARKER`] and the run id.
pub fn marker(run_id: &str) -> String {
    format!("{RUN_MARKER}{run_id}")
}

/// A basic regular expression (`grep`, `pgrep -f`) that matches
/// [`RUN_MARKER`] but not itself: its last letter is in brackets, so the
/// argv of the `grep` that searches for it does not count.
pub fn marker_pattern() -> String {
    pattern_not_matching_itself(RUN_MARKER)
}

/// `text` (no regular-expression characters in it) as a basic regular
/// expression whose last letter is in brackets: it matches `text` but not
/// itself.
pub(crate) fn pattern_not_matching_itself(text: &str) -> String {
    match text.rfind(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => format!("{}[{}]{}", &text[..i], &text[i..=i], &text[i + 1..]),
        None => text.to_string(),
    }
}

/// `SSH_SPAWNER_RUN=RUN_ID`: the line of a run's processes' environment.
pub fn env_marker(run_id: &str) -> String {
    format!("{RUN_ENV}={run_id}")
}

/// Whether `run_id` is a valid run id: 1 to 64 characters of `a-z`, `0-9`
/// and `-`.
pub fn is_run_id(run_id: &str) -> bool {
    !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// [`is_run_id`] as an Error::Invalid naming the run id.
pub fn check_run_id(run_id: &str) -> Result<()> {
    if is_run_id(run_id) {
        Ok(())
    } else {
        Err(invalid(
            format!("run id {run_id:?}"),
            "must be 1 to 64 characters of a-z, 0-9 and '-'",
        ))
    }
}

/// Checks a per-server directory and returns its parent. The rules are
/// stricter than "absolute" because stop runs `rm -rf` on it: a path like
/// `/home` or `/a/b/..` must never get that far.
pub fn check_dir(dir: &str) -> Result<&str> {
    let what = || format!("server directory {dir:?}");
    let Some(rest) = dir.strip_prefix('/') else {
        return Err(invalid(what(), "must be an absolute path"));
    };
    if dir.contains('\0') || dir.contains('\n') {
        return Err(invalid(what(), "must not contain NUL or newline"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid(
            what(),
            "must not contain empty components ('//' or a trailing '/')",
        ));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(invalid(what(), "must not contain '.' or '..' components"));
    }
    if parts.len() < 2 {
        return Err(invalid(
            what(),
            "must be at least two levels below / (stop removes it)",
        ));
    }
    match dir.rfind('/') {
        Some(i) if i > 0 => Ok(&dir[..i]),
        _ => Err(invalid(what(), "has no parent directory")),
    }
}

/// A host's boot id (`/proc/sys/kernel/random/boot_id`) as a launch reports
/// it and a state records it: 1 to 64 characters of hex digits and `-`. It
/// goes into every poll and stop script of its host and login, so one state
/// with another value must never reach them.
pub fn is_boot_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_pattern_matches_the_marker_and_not_itself() {
        assert_eq!(marker_pattern(), "ssh-spawner-ru[n]:");
        assert_eq!(marker("ab12"), "ssh-spawner-run:ab12");
        assert_eq!(env_marker("ab12"), "SSH_SPAWNER_RUN=ab12");
    }

    #[test]
    fn run_ids() {
        for ok in ["a", "0123abcd", "a-b", &"a".repeat(64)] {
            assert!(is_run_id(ok) && check_run_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a_b", "a b", "a/b", "a;b", "é", &"a".repeat(65)] {
            assert!(!is_run_id(bad) && check_run_id(bad).is_err(), "{bad}");
        }
    }
}
