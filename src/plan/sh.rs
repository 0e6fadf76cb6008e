//! The remote scripts, kept as shell files in `sh/` (linted there by
//! `shellcheck -s sh` and `dash -n`, see `scripts/test`), and how one is put
//! together before it is sent.
//!
//! Nothing here does I/O: other code runs each script as `/bin/sh -s` over
//! SSH with the script on stdin. Stdin is the only channel secrets travel
//! on, because every user of a host can read every process's argv; so env
//! values appear in the script text and in `export` (a builtin), never as an
//! argument of any helper program and never in a file.
//!
//! A script as sent is one shell function that is defined first and called
//! on the last line:
//!
//! ```text
//! main() {
//! name='value'            the preamble: the script's values, quoted
//! ...                     (and, for the launch and the facts, a function
//!                         of the admin's lines)
//! <sh/lib.sh>             the shared helpers, for the scripts that use them
//! <sh/SCRIPT.sh>          the script's body
//! }
//! main </dev/null
//! ```
//!
//! The shell has to parse the whole function before it runs any of it, so a
//! transfer cut short by a dropped connection is a syntax error that runs
//! nothing, rather than a launch or a stop that ran halfway. The call reads
//! stdin from `/dev/null` so that no helper can swallow script text.
//! Comment lines of the files are left out of what is sent.
//!
//! The scripts target dash, coreutils, procps and util-linux (Debian); they
//! read `/proc` with the `read` builtin rather than spawning helpers, since
//! one poll covers hundreds of servers.

use std::fmt::Display;

use super::quote::quote;
use crate::error::Result;

/// Helpers shared by the launch, the ready check, poll, stop and adopt.
pub(crate) const LIB: &str = include_str!("sh/lib.sh");
/// The launch ([`super::launch::launch_script`]).
pub(crate) const LAUNCH: &str = include_str!("sh/launch.sh");
/// The wrapper that owns a server, a value of the launch.
pub(crate) const WRAPPER: &str = include_str!("sh/wrapper.sh");
/// The ready check ([`super::poll::ready_check_script`]).
pub(crate) const READY: &str = include_str!("sh/ready.sh");
/// The poll ([`super::poll::poll_script`]).
pub(crate) const POLL: &str = include_str!("sh/poll.sh");
/// The stop ([`super::stop::stop_script`]).
pub(crate) const STOP: &str = include_str!("sh/stop.sh");
/// The adopt ([`super::adopt::adopt_script`]).
pub(crate) const ADOPT: &str = include_str!("sh/adopt.sh");
/// Removing an unused server directory ([`super::adopt::remove_dir_script`]).
pub(crate) const REMOVE_DIR: &str = include_str!("sh/remove_dir.sh");
/// The host facts ([`super::hosts::facts_script`]).
pub(crate) const FACTS: &str = include_str!("sh/facts.sh");
/// The directory guard ([`super::state::host_guard`]).
pub(crate) const GUARD: &str = include_str!("sh/guard.sh");
/// The GPUs of the login's servers ([`super::holders::run_gpus_script`]).
pub(crate) const RUN_GPUS: &str = include_str!("sh/run_gpus.sh");

/// Every file in `sh/`, by name, for the tests.
#[cfg(test)]
pub(crate) const ALL: [(&str, &str); 11] = [
    ("lib.sh", LIB),
    ("launch.sh", LAUNCH),
    ("wrapper.sh", WRAPPER),
    ("ready.sh", READY),
    ("poll.sh", POLL),
    ("stop.sh", STOP),
    ("adopt.sh", ADOPT),
    ("remove_dir.sh", REMOVE_DIR),
    ("facts.sh", FACTS),
    ("guard.sh", GUARD),
    ("run_gpus.sh", RUN_GPUS),
];

/// A file's code: its lines without the comment lines and the blank ones.
/// (No file in `sh/` has a quoted string with such a line in it.)
pub(crate) fn code(file: &str) -> String {
    let mut out = String::with_capacity(file.len());
    for line in file.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One word of a list ([`Preamble::words`]): as it is when no shell
/// reads anything into it (letters, digits and `_./:=@%+,-`: a poll's ids,
/// numbers, boot ids and most directories), else quoted. The list is quoted
/// once more in the preamble, so each word left bare spares the poll of
/// hundreds of servers three quotes to send and to parse.
pub(crate) fn list_word(word: &str, what: &str) -> Result<String> {
    let bare = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b));
    if bare {
        Ok(word.to_string())
    } else {
        quote(word, what)
    }
}

/// The values one script gets: `name='value'` lines, in order.
#[derive(Default)]
pub(crate) struct Preamble {
    text: String,
}

impl Preamble {
    pub(crate) fn new() -> Preamble {
        Preamble::default()
    }

    fn assign(&mut self, name: &str, quoted: &str) {
        debug_assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{name}"
        );
        self.text.push_str(name);
        self.text.push('=');
        self.text.push_str(quoted);
        self.text.push('\n');
    }

    /// `name='value'`; Error::Invalid naming `what` when the value has a NUL.
    pub(crate) fn value(&mut self, name: &str, value: &str, what: &str) -> Result<&mut Self> {
        let q = quote(value, what)?;
        self.assign(name, &q);
        Ok(self)
    }

    /// `name='N'` for a number.
    pub(crate) fn number(&mut self, name: &str, n: impl Display) -> &mut Self {
        // Digits (or hex digits): nothing to refuse, nothing to escape.
        let text = format!("'{n}'");
        self.assign(name, &text);
        self
    }

    /// `name='WORD'` for a flag: a word of this crate's (`yes`, `test`...).
    pub(crate) fn flag(&mut self, name: &str, word: &'static str) -> &mut Self {
        debug_assert!(word.bytes().all(|b| b.is_ascii_alphanumeric()), "{word}");
        self.number(name, word)
    }

    /// `name=QUOTED` for a value its caller has quoted ([`quote`]) already.
    pub(crate) fn quoted(&mut self, name: &str, quoted: &str) -> &mut Self {
        self.assign(name, quoted);
        self
    }

    /// A list: `name='...'` holding each word as [`list_word`] writes it,
    /// which the script reads back with `eval "set -- $name"`.
    pub(crate) fn words<'a>(
        &mut self,
        name: &str,
        words: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Result<&mut Self> {
        let mut list = String::new();
        for (word, what) in words {
            if !list.is_empty() {
                list.push(' ');
            }
            list.push_str(&list_word(word, &what)?);
        }
        self.value(name, &list, name)
    }

    /// `name() { LINES :; }`: a function of lines that are shell already
    /// (the admin's prologue, or `export` lines built from quoted values).
    pub(crate) fn function(&mut self, name: &str, lines: &[String]) -> &mut Self {
        self.text.push_str(name);
        self.text.push_str("() {\n");
        for line in lines {
            self.text.push_str(line);
            self.text.push('\n');
        }
        // A function may not be empty, and the last line may be a comment.
        self.text.push_str(":\n}\n");
        self
    }

    /// The preamble alone, for a prefix that is not a `main` of its own
    /// ([`super::state::host_guard`]).
    pub(crate) fn into_text(self) -> String {
        self.text
    }

    /// The script: `main() {`, this preamble, the code of each file in
    /// `files`, `}`, and the call `main </dev/null`.
    pub(crate) fn script(self, files: &[&str]) -> String {
        let mut out = String::with_capacity(
            self.text.len() + files.iter().map(|f| f.len()).sum::<usize>() + 32,
        );
        out.push_str("main() {\n");
        out.push_str(&self.text);
        for f in files {
            out.push_str(&code(f));
        }
        out.push_str("}\nmain </dev/null\n");
        out
    }
}

/// Text a script printed, cut short, for an error message.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn every_file_says_what_it_gets_and_parses_in_dash() {
        for (name, text) in ALL {
            assert!(text.starts_with("# shellcheck shell=sh\n"), "{name}");
            assert!(text.contains("Gets"), "{name} says what it gets");
            let out = Command::new("dash")
                .arg("-n")
                .arg(format!("{}/src/plan/sh/{name}", env!("CARGO_MANIFEST_DIR")))
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {out:?}");
            // What is sent has no comments, and no blank lines.
            let code = code(text);
            assert!(!code.lines().any(|l| l.trim_start().starts_with('#')));
            assert!(!code.lines().any(|l| l.trim().is_empty()), "{name}");
        }
    }

    #[test]
    fn a_script_is_one_function_called_on_its_last_line() {
        let mut p = Preamble::new();
        p.value("d", "/tmp/it's", "dir").unwrap();
        p.number("n", 5);
        let words = ["a b", "it's", "run-1", "/tmp/x:y=z@%+,_.", "*", "~", ""];
        p.words("argv", words.iter().map(|w| (*w, "w".to_string())))
            .unwrap();
        p.function("f", &["echo hi".to_string(), "# last".to_string()]);
        let s = p.script(&["echo \"$d\" \"$n\"\neval \"set -- $argv\"\nprintf '<%s>' \"$@\"\nf\n"]);
        assert!(
            s.starts_with("main() {\nd='/tmp/it'\\''s'\nn='5'\nargv="),
            "{s}"
        );
        assert!(s.ends_with("}\nmain </dev/null\n"), "{s}");
        let out = Command::new("dash").arg("-c").arg(&s).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/tmp/it's 5\n<a b><it's><run-1></tmp/x:y=z@%+,_.><*><~><>hi\n"
        );
        assert!(p_refuses_nul());
    }

    /// Every script, as sent: one `main`, and cut short anywhere before its
    /// last line it runs nothing (it prints nothing, removes nothing).
    #[test]
    fn every_script_is_one_main_and_a_cut_short_one_runs_nothing() {
        use crate::plan::testing::{assert_one_main, proc_fixture, sh, Tmp};
        let tmp = Tmp::new();
        let dir = tmp.join("home/run");
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = proc_fixture("a", 100);
        p.dir = dir.clone();
        let prologue = ["echo from the prologue".to_string()];
        let scripts = [
            crate::plan::poll::poll_script(std::slice::from_ref(&p)).unwrap(),
            crate::plan::poll::ready_check_script(&p, 1).unwrap(),
            crate::plan::stop::stop_script(&p, 1, false).unwrap(),
            crate::plan::adopt::adopt_script(&dir, "a").unwrap(),
            crate::plan::adopt::remove_dir_script(&dir).unwrap(),
            crate::plan::hosts::facts_script(None),
            crate::plan::hosts::facts_script(Some((&prologue, "'sh'"))),
        ];
        for script in &scripts {
            assert_one_main(script);
            let whole = sh(script);
            assert!(
                !whole.stdout.is_empty() || script.contains("rm -rf"),
                "{whole:?}"
            );
            std::fs::create_dir_all(&dir).unwrap();
            let last = script.rfind("main </dev/null").unwrap();
            for cut in [10, script.len() / 2, last - 3, last] {
                let mut end = cut;
                while !script.is_char_boundary(end) {
                    end -= 1;
                }
                let out = sh(&script[..end]);
                assert!(out.stdout.is_empty(), "cut {cut}: {out:?}");
                assert!(std::path::Path::new(&dir).exists(), "cut {cut} ran");
            }
        }
    }

    fn p_refuses_nul() -> bool {
        Preamble::new().value("x", "a\0", "x").is_err()
            && Preamble::new()
                .words("x", [("a\0", "w".to_string())])
                .is_err()
    }
}
