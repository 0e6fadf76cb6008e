//! Quoting values for the remote shell, and the checks on what goes into a
//! script as a value: environment variable names.
//!
//! Every value a script gets is one `name='value'` line of its preamble
//! ([`super::sh`]), quoted here, so that `sh` reads it back byte-exact and
//! never interprets it.

use crate::error::{Error, Result};

/// The error for a value a script refuses: `what` names it.
pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// POSIX single-quote a value so `sh` reads it back byte-exact. Refuses NUL
/// (Error::Invalid naming `what`).
pub fn quote(value: &str, what: &str) -> Result<String> {
    if value.contains('\0') {
        return Err(invalid(
            what,
            "contains a NUL byte, which no shell word can carry",
        ));
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            // Inside single quotes nothing is special, not even backslash, so
            // a quote has to close the string, be escaped, and reopen it.
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Environment variable names: `^[A-Za-z_][A-Za-z0-9_]*$`, else
/// Error::Invalid { what: "environment variable name \"NAME\"", reason }.
pub fn check_env_name(name: &str) -> Result<()> {
    let what = || format!("environment variable name {name:?}");
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid(what(), "is empty")),
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        Some(_) => {
            return Err(invalid(
                what(),
                "must start with an ASCII letter or an underscore",
            ))
        }
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(invalid(
            what(),
            "may only contain ASCII letters, digits and underscores",
        ))
    }
}

#[cfg(test)]
mod tests {
    //! `quote` round trips run the local `/bin/sh` (dash on Debian, like
    //! the hosts).

    use super::*;
    use crate::plan::testing::{sh, strings};
    use proptest::prelude::*;
    use std::path::Path;

    fn roundtrip(values: &[String]) -> Vec<Vec<u8>> {
        let mut script = String::from("set -eu\n");
        for (i, v) in values.iter().enumerate() {
            script.push_str(&format!(
                "export X{i}={}\n",
                quote(v, "test value").unwrap()
            ));
            script.push_str(&format!("printf '%s\\000' \"$X{i}\"\n"));
        }
        let out = sh(&script);
        assert_eq!(out.status, 0, "{out:?}");
        let mut parts: Vec<Vec<u8>> = out
            .stdout_bytes
            .split(|b| *b == 0)
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(parts.pop(), Some(Vec::new()));
        parts
    }

    #[test]
    fn quote_round_trips_every_char_through_sh() {
        let mut values: Vec<String> = (1u32..0x800)
            .chain([0xFFFD, 0x1F600, 0x10FFFF, 0x2028, 0xFEFF])
            .filter_map(char::from_u32)
            .map(|c| c.to_string())
            .collect();
        values.push((1u32..0x800).filter_map(char::from_u32).collect());
        values.extend(strings(&[
            "",
            "'",
            "''",
            "'\\''",
            "\"",
            "$(touch /tmp/ssh-spawner-pwned)",
            "`touch /tmp/ssh-spawner-pwned`",
            "${HOME}",
            "a\nb\n",
            "\n",
            "\\",
            "\\\\n",
            "-n",
            "-e \\t",
            "--",
            "é ✓ 日本",
            "*",
            "~",
            "x' ; touch /tmp/ssh-spawner-pwned ; '",
            "\r\n\t\x0b\x0c\x1b[31m",
        ]));
        let got = roundtrip(&values);
        assert_eq!(got.len(), values.len());
        for (v, g) in values.iter().zip(&got) {
            assert_eq!(v.as_bytes(), g.as_slice(), "value {v:?}");
        }
        assert!(!Path::new("/tmp/ssh-spawner-pwned").exists());
    }

    fn nasty_string() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            3 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            1 => prop::sample::select(vec!['\'', '"', '$', '(', ')', '`', '\\', '\n', '-', ' ', '*', '{', '}', ';', '&', '|', '!', 'é', '#', '~']),
        ];
        prop::collection::vec(c, 0..48).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn quote_round_trips_arbitrary_strings(values in prop::collection::vec(nasty_string(), 1..16)) {
            let got = roundtrip(&values);
            prop_assert_eq!(got.len(), values.len());
            for (v, g) in values.iter().zip(&got) {
                prop_assert_eq!(v.as_bytes(), g.as_slice());
            }
        }
    }

    #[test]
    fn quote_refuses_nul_and_names_the_value() {
        match quote("a\0b", "value of FOO") {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "value of FOO"),
            other => panic!("{other:?}"),
        }
        assert_eq!(quote("", "x").unwrap(), "''");
        assert_eq!(quote("it's", "x").unwrap(), "'it'\\''s'");
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "_x", "JUPYTERHUB_API_TOKEN", "a1_B2", "PATH"] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "1A", "A-B", "A B", "A=B", "é", "A\n", "$A", "A.B", "-x", "A\0",
        ] {
            match check_env_name(bad) {
                Err(Error::Invalid { what, .. }) => {
                    assert_eq!(what, format!("environment variable name {bad:?}"))
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
