//! Host-key verification against an OpenSSH known_hosts file.
//!
//! The parser and the check are plain functions over text so they are tested
//! without sshd. Supported: comma-separated patterns, `[host]:port`, `*` and
//! `?` wildcards, `!` negation, hashed entries (`|1|salt|hash`) and the
//! `@revoked` marker. `@cert-authority` lines are recognised and skipped (host
//! certificates are refused by the connection handler).
//!
//! Policy: a key is accepted only when a matching line records exactly that
//! key. If the host is listed with any other key, the key has changed and is
//! refused, whatever the key type (the connection prefers the algorithms on
//! record, as OpenSSH does, so a host with a recorded key never ends up
//! negotiating another type by accident).

use std::io::Write;
use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};
use sha1::Sha1;

use crate::error::{Cause, Error, Result};

/// What the admin allows for hosts not yet in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Only keys already in the known_hosts file are accepted (the default).
    #[default]
    Strict,
    /// Unknown hosts are recorded on first contact; changed keys are still refused.
    AcceptNew,
}

/// A marker at the start of a known_hosts line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One usable line of a known_hosts file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// 1-based line number in the file.
    pub line: usize,
    marker: Marker,
    patterns: String,
    /// The recorded key.
    pub key: PublicKey,
}

/// The outcome of checking a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line records exactly this key.
    Known {
        /// The matching line.
        line: usize,
    },
    /// No line names this host.
    Unknown,
    /// The host is listed with another key.
    Changed {
        /// The first conflicting line.
        line: usize,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// The `@revoked` line.
        line: usize,
    },
}

/// Parse the text of a known_hosts file. Lines that cannot be parsed are
/// skipped (OpenSSH does the same) and reported as `(line, reason)`.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<(usize, String)>) {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut fields = trimmed.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let marker = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            m if m.starts_with('@') => {
                skipped.push((line, format!("unknown marker {m}")));
                continue;
            }
            _ => Marker::None,
        };
        if marker != Marker::None {
            first = fields.next().unwrap_or_default();
        }
        let (Some(_kind), Some(blob)) = (fields.next(), fields.next()) else {
            skipped.push((line, "expected: hosts key-type base64-key".into()));
            continue;
        };
        match russh::keys::parse_public_key_base64(blob) {
            Ok(key) => entries.push(Entry {
                line,
                marker,
                patterns: first.to_string(),
                key,
            }),
            Err(e) => skipped.push((line, format!("bad key: {e}"))),
        }
    }
    (entries, skipped)
}

/// The name OpenSSH looks up for a host: `host` on port 22, `[host]:port` otherwise.
pub fn host_port_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Check a presented key for `host:port` against parsed entries.
pub fn check(entries: &[Entry], host: &str, port: u16, key: &PublicKey) -> Verdict {
    let name = host_port_name(host, port);
    let matching: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.marker != Marker::CertAuthority && patterns_match(&e.patterns, &name))
        .collect();
    if let Some(e) = matching
        .iter()
        .find(|e| e.marker == Marker::Revoked && same_key(&e.key, key))
    {
        return Verdict::Revoked { line: e.line };
    }
    let plain = matching.iter().filter(|e| e.marker == Marker::None);
    if let Some(e) = plain.clone().find(|e| same_key(&e.key, key)) {
        return Verdict::Known { line: e.line };
    }
    match plain.map(|e| e.line).next() {
        Some(line) => Verdict::Changed { line },
        None => Verdict::Unknown,
    }
}

/// Whether a plain line (not `@revoked`, not `@cert-authority`) records a
/// key for `host:port`: the hub would know the host's key without asking it.
pub fn lists(entries: &[Entry], host: &str, port: u16) -> bool {
    let name = host_port_name(host, port);
    entries
        .iter()
        .any(|e| e.marker == Marker::None && patterns_match(&e.patterns, &name))
}

/// Key algorithms recorded for a host, in file order, so the connection can
/// prefer them during key exchange.
pub fn recorded_algorithms(
    entries: &[Entry],
    host: &str,
    port: u16,
) -> Vec<russh::keys::Algorithm> {
    let name = host_port_name(host, port);
    let mut algs = Vec::new();
    for e in entries {
        if e.marker == Marker::None && patterns_match(&e.patterns, &name) {
            let alg = e.key.algorithm();
            if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
    }
    algs
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// OpenSSH semantics: a line applies when some positive pattern matches and no
/// negated pattern does.
fn patterns_match(patterns: &str, name: &str) -> bool {
    let mut positive = false;
    for pattern in patterns.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            if hashed_match(hashed, name) {
                positive = true;
            }
        } else if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard_match(&negated.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
                return false;
            }
        } else if wildcard_match(&pattern.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
            positive = true;
        }
    }
    positive
}

fn hashed_match(salt_and_hash: &str, name: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` matches any run of characters, `?` any one character.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// SHA256 fingerprint as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The line `accept-new` appends for a first-seen host.
pub fn entry_line(host: &str, port: u16, key: &PublicKey) -> Result<String> {
    let openssh = key.to_openssh().map_err(|e| Error::Invalid {
        what: "host key".into(),
        reason: e.to_string(),
    })?;
    Ok(format!("{} {}\n", host_port_name(host, port), openssh))
}

/// Read and parse a known_hosts file. A missing file is an empty file (every
/// host is then unknown, which strict policy refuses with a clear error).
pub fn load(path: &Path) -> Result<Vec<Entry>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let (entries, skipped) = parse(&text);
            for (line, reason) in skipped {
                tracing::warn!(path = %path.display(), line, "skipping known_hosts line: {reason}");
            }
            Ok(entries)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::KnownHosts {
            path: path.to_path_buf(),
            reason: e.to_string(),
            source: Cause::of(e),
        }),
    }
}

/// known_hosts entries read once and kept while the file is unchanged (same
/// modification time, size and inode), so a handshake costs no file read.
/// Reads happen on tokio's blocking pool, never on a runtime worker. Clones
/// share the cache.
#[derive(Clone, Default)]
pub struct Cache {
    inner: std::sync::Arc<std::sync::Mutex<Option<Cached>>>,
}

struct Cached {
    path: PathBuf,
    stamp: Option<Stamp>,
    entries: std::sync::Arc<Vec<Entry>>,
}

/// What identifies a version of the file.
type Stamp = (std::time::SystemTime, u64, u64);

fn stamp(path: &Path) -> Result<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((
            m.modified().unwrap_or(std::time::UNIX_EPOCH),
            m.len(),
            m.ino(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::KnownHosts {
            path: path.to_path_buf(),
            reason: e.to_string(),
            source: Cause::of(e),
        }),
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("known_hosts::Cache")
    }
}

impl Cache {
    /// The entries of `path`, read again only when the file changed.
    pub async fn entries(&self, path: &Path) -> Result<std::sync::Arc<Vec<Entry>>> {
        let (inner, path) = (self.inner.clone(), path.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let now = stamp(&path)?;
            if let Ok(c) = inner.lock() {
                if let Some(c) = c.as_ref().filter(|c| c.path == path && c.stamp == now) {
                    return Ok(c.entries.clone());
                }
            }
            let entries = std::sync::Arc::new(load(&path)?);
            // Stamped before the read: a change during the read is seen next time.
            if let Ok(mut c) = inner.lock() {
                *c = Some(Cached {
                    path,
                    stamp: now,
                    entries: entries.clone(),
                });
            }
            Ok(entries)
        })
        .await
        .map_err(|e| Error::Invalid {
            what: "known_hosts read".into(),
            reason: e.to_string(),
        })?
    }
}

/// Serialises every accept-new recording in this process (the file lock in
/// [`record_first_seen`] does the same across processes).
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// accept-new for a host the entries read at connect time did not list:
/// under a process-wide lock and an exclusive `flock` on the file, read the
/// file again and check `key` against what it says now. Only a host still
/// unknown gets `key` appended (and [`Verdict::Unknown`] is returned: it was
/// recorded); otherwise the verdict of the file as it is now, so a second
/// first contact that presents another key (a man in the middle on one of
/// two concurrent connections) is refused as [`Verdict::Changed`] instead of
/// being recorded next to the first. Runs on tokio's blocking pool.
pub async fn record_first_seen(
    path: &Path,
    host: &str,
    port: u16,
    key: &PublicKey,
) -> Result<Verdict> {
    let line = entry_line(host, port, key)?;
    let (path, host, key) = (path.to_path_buf(), host.to_string(), key.clone());
    tokio::task::spawn_blocking(move || {
        let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
        let locked = lock_file(&path)?;
        let verdict = check(&load(&path)?, &host, port, &key);
        if verdict == Verdict::Unknown {
            append(&path, &line)?;
        }
        drop(locked);
        Ok(verdict)
    })
    .await
    .map_err(|e| Error::Invalid {
        what: "known_hosts append".into(),
        reason: e.to_string(),
    })?
}

/// The file opened (created 0600 when missing) and locked with `flock`
/// (exclusive) until the returned handle is dropped.
fn lock_file(path: &PathBuf) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::KnownHosts {
        path: path.clone(),
        reason: e.to_string(),
        source: Cause::of(e),
    };
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

/// [`append`] on tokio's blocking pool.
pub async fn append_blocking(path: &Path, line: String) -> Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || append(&path, &line))
        .await
        .map_err(|e| Error::Invalid {
            what: "known_hosts append".into(),
            reason: e.to_string(),
        })?
}

/// Append a first-seen key (accept-new). The file is created 0600 when missing.
pub fn append(path: &PathBuf, line: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::KnownHosts {
        path: path.clone(),
        reason: e.to_string(),
        source: Cause::of(e),
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(line.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cache_reads_the_file_again_only_when_it_changed() {
        let dir = std::env::temp_dir().join(format!("kh-cache-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("known_hosts");
        let cache = Cache::default();
        assert!(
            cache.entries(&path).await.unwrap().is_empty(),
            "missing file"
        );
        std::fs::write(&path, format!("198.18.0.11 ssh-ed25519 {K1}\n")).unwrap();
        let first = cache.entries(&path).await.unwrap();
        assert_eq!(first.len(), 1);
        let again = cache.entries(&path).await.unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&first, &again),
            "read again unchanged"
        );
        append_blocking(&path, format!("198.18.0.12 ssh-ed25519 {K2}\n"))
            .await
            .unwrap();
        let grown = cache.entries(&path).await.unwrap();
        assert_eq!(grown.len(), 2, "an appended key is seen");
        // Replaced by a file of the same size: another inode.
        let other = dir.join("other");
        std::fs::write(
            &other,
            format!("198.18.0.13 ssh-ed25519 {K1}\n198.18.0.12 ssh-ed25519 {K2}\n"),
        )
        .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let replaced = cache.entries(&path).await.unwrap();
        assert_eq!(
            check(&replaced, "198.18.0.13", 22, &key(K1)),
            Verdict::Known { line: 1 }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const K1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const K2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G1sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    #[test]
    fn known_unknown_changed_with_line_numbers() {
        let text =
            format!("# comment\n198.18.0.11 ssh-ed25519 {K1}\n198.18.0.12 ssh-ed25519 {K2}\n");
        let (entries, skipped) = parse(&text);
        assert!(skipped.is_empty());
        assert_eq!(
            check(&entries, "198.18.0.11", 22, &key(K1)),
            Verdict::Known { line: 2 }
        );
        assert_eq!(
            check(&entries, "198.18.0.11", 22, &key(K2)),
            Verdict::Changed { line: 2 }
        );
        assert_eq!(
            check(&entries, "198.18.0.13", 22, &key(K1)),
            Verdict::Unknown
        );
        // A non-default port is a different name.
        assert_eq!(
            check(&entries, "198.18.0.11", 2222, &key(K1)),
            Verdict::Unknown
        );
    }

    #[test]
    fn bracketed_ports_lists_wildcards_and_negation() {
        let text = format!(
            "[node1]:2222,198.18.0.11 ssh-ed25519 {K1}\n*.lab,!evil.lab ssh-ed25519 {K2}\n"
        );
        let (entries, _) = parse(&text);
        assert_eq!(
            check(&entries, "node1", 2222, &key(K1)),
            Verdict::Known { line: 1 }
        );
        assert_eq!(
            check(&entries, "198.18.0.11", 22, &key(K1)),
            Verdict::Known { line: 1 }
        );
        assert_eq!(
            check(&entries, "gpu1.lab", 22, &key(K2)),
            Verdict::Known { line: 2 }
        );
        assert_eq!(
            check(&entries, "GPU1.LAB", 22, &key(K2)),
            Verdict::Known { line: 2 }
        );
        assert_eq!(check(&entries, "evil.lab", 22, &key(K2)), Verdict::Unknown);
        assert!(wildcard_match("node?", "node1"));
        assert!(!wildcard_match("node?", "node12"));
        assert!(wildcard_match("*", ""));
    }

    #[test]
    fn hashed_entries() {
        // From russh's own test vector: hashed "example.com".
        let text = format!(
            "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= ssh-ed25519 {K1}\n"
        );
        let (entries, _) = parse(&text);
        assert_eq!(
            check(&entries, "example.com", 22, &key(K1)),
            Verdict::Known { line: 1 }
        );
        assert_eq!(
            check(&entries, "example.org", 22, &key(K1)),
            Verdict::Unknown
        );
    }

    #[test]
    fn revoked_and_cert_authority_markers() {
        let text = format!(
            "@revoked * ssh-ed25519 {K2}\n@cert-authority *.lab ssh-ed25519 {K1}\nh ssh-ed25519 {K2}\n"
        );
        let (entries, _) = parse(&text);
        assert_eq!(
            check(&entries, "h", 22, &key(K2)),
            Verdict::Revoked { line: 1 }
        );
        // A CA line never vouches for a plain key.
        assert_eq!(check(&entries, "a.lab", 22, &key(K1)), Verdict::Unknown);
    }

    #[test]
    fn garbage_lines_are_skipped_and_reported() {
        let text = format!(
            "onlyhost\nh ssh-ed25519 !!!notbase64\n@bogus h ssh-ed25519 {K1}\nh ssh-ed25519 {K1}\n"
        );
        let (entries, skipped) = parse(&text);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].line, 4);
        assert_eq!(
            skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn accept_new_line_round_trips() {
        let line = entry_line("198.18.0.11", 2222, &key(K1)).unwrap();
        assert!(line.starts_with("[198.18.0.11]:2222 ssh-ed25519 "));
        let (entries, _) = parse(&line);
        assert_eq!(
            check(&entries, "198.18.0.11", 2222, &key(K1)),
            Verdict::Known { line: 1 }
        );
    }
}
