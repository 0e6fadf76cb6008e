//! The configurations a hub ran with: its `remote_user` templates and
//! `state_dir` values, today's first. A server started under an older one
//! is still polled and stopped after the admin changes it
//! ([`super::trust`]); a state naming a login or directory no configuration
//! of this hub produced is not. Kept in the hub's `journal_dir`
//! (`config-history`, 0600), which the hub database cannot write.

use serde::{Deserialize, Serialize};

/// How many earlier values of each setting are kept.
pub const KEEP: usize = 32;

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Format version.
    #[serde(default = "v1")]
    pub version: u32,
    /// `remote_user` templates, the latest first.
    #[serde(default)]
    pub remote_user: Vec<String>,
    /// `state_dir` values, the latest first.
    #[serde(default)]
    pub state_dir: Vec<String>,
}

fn v1() -> u32 {
    1
}

impl History {
    /// A history holding only today's values.
    pub fn now(remote_user: &str, state_dir: &str) -> History {
        History {
            version: 1,
            remote_user: vec![remote_user.to_string()],
            state_dir: vec![state_dir.to_string()],
        }
    }

    /// Put today's values first (keeping at most [`KEEP`] of each); true if
    /// that changed what a file holding `self` should say.
    pub fn record(&mut self, remote_user: &str, state_dir: &str) -> bool {
        let before = self.clone();
        self.version = 1;
        put_first(&mut self.remote_user, remote_user);
        put_first(&mut self.state_dir, state_dir);
        *self != before
    }

    /// Every value of `other` that `self` lacks, after its own.
    pub fn merge(&mut self, other: &History) {
        for t in &other.remote_user {
            if !self.remote_user.contains(t) && self.remote_user.len() < KEEP {
                self.remote_user.push(t.clone());
            }
        }
        for d in &other.state_dir {
            if !self.state_dir.contains(d) && self.state_dir.len() < KEEP {
                self.state_dir.push(d.clone());
            }
        }
    }

    /// The file's text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Read the file's text.
    pub fn from_json(text: &str) -> Result<History, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

fn put_first(list: &mut Vec<String>, value: &str) {
    list.retain(|v| v != value);
    list.insert(0, value.to_string());
    list.truncate(KEEP);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn todays_values_come_first_and_earlier_ones_are_kept_once() {
        let mut h = History::now("{username}", "~/.jupyterhub-ssh");
        assert!(!h.record("{username}", "~/.jupyterhub-ssh"), "nothing new");
        assert!(h.record("lab-{username}", "~/.jupyterhub-ssh"));
        assert!(h.record("{username}", "~/.jh"));
        assert_eq!(h.remote_user, ["{username}", "lab-{username}"]);
        assert_eq!(h.state_dir, ["~/.jh", "~/.jupyterhub-ssh"]);
        let back = History::from_json(&h.to_json()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn it_is_bounded() {
        let mut h = History::default();
        for i in 0..100 {
            h.record(&format!("u{i}-{{username}}"), "~/.x");
        }
        assert_eq!(h.remote_user.len(), KEEP);
        assert_eq!(h.remote_user[0], "u99-{username}");
        let mut other = History::default();
        other.merge(&h);
        other.merge(&h);
        assert_eq!(other.remote_user.len(), KEEP);
    }

    #[test]
    fn a_file_of_another_shape_is_an_error_not_a_panic() {
        assert!(History::from_json("7").is_err());
        assert!(History::from_json(r#"{"remote_user": 3}"#).is_err());
        assert!(History::from_json("").is_err());
        // Fields a newer version adds are ignored.
        let h = History::from_json(r#"{"version":2,"remote_user":["a"],"gpus":1}"#).unwrap();
        assert_eq!(h.remote_user, ["a"]);
    }
}
