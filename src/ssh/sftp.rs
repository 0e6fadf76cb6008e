//! Copying files to a host over SFTP with exact modes.
//!
//! A file is created with at most 0600 (the remote umask can only narrow
//! that), its final mode is then set explicitly before any byte is written, so
//! a secret never sits in a file wider than asked for, not even briefly.
//! Missing parent directories are made with mode 0700.

use std::time::Duration;

use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags};
use tokio::io::AsyncWriteExt;

use super::pool::Pool;
use super::Target;
use crate::error::{Cause, Error, Phase, Result};

/// One file to write on the remote host.
#[derive(Clone)]
pub struct Upload {
    /// Remote path; relative paths (and `~/...`) are relative to the remote
    /// user's home directory.
    pub path: String,
    /// The file's contents.
    pub contents: Vec<u8>,
    /// The exact final permission bits, e.g. `0o600`.
    pub mode: u32,
}

impl std::fmt::Debug for Upload {
    // Contents are often keys: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// `~/x` and `x` both mean `x` under the home directory for SFTP.
fn remote_path(path: &str) -> &str {
    path.strip_prefix("~/").unwrap_or(path)
}

/// The directories above `path`, outermost first (`a/b/c` gives `a`, `a/b`).
pub(crate) fn parents(path: &str) -> Vec<String> {
    let path = remote_path(path);
    let absolute = path.starts_with('/');
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut out = Vec::new();
    for i in 1..parts.len() {
        let joined = parts[..i].join("/");
        out.push(if absolute {
            format!("/{joined}")
        } else {
            joined
        });
    }
    out
}

fn mode_attrs(mode: u32) -> FileAttributes {
    FileAttributes {
        permissions: Some(mode & 0o7777),
        ..FileAttributes::empty()
    }
}

impl Pool {
    /// Write every file in `files` on `target` in one SFTP session, bounded by
    /// `timeout` as a whole.
    pub async fn upload(&self, target: &Target, files: &[Upload], timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, self.upload_unbounded(target, files))
            .await
            .map_err(|_| Error::Timeout {
                host: target.host_label(),
                user: target.user.clone(),
                phase: Phase::Sftp,
                after: timeout,
            })?
    }

    async fn sftp(&self, target: &Target) -> Result<(SftpSession, super::pool::SlotGuard)> {
        let lease = self.open_session(target).await?;
        lease
            .channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| sftp_err(target, "(subsystem)", e))?;
        let sftp = SftpSession::new(lease.channel.into_stream())
            .await
            .map_err(|e| sftp_err(target, "(subsystem)", e))?;
        Ok((sftp, lease.slot))
    }

    async fn upload_unbounded(&self, target: &Target, files: &[Upload]) -> Result<()> {
        let (sftp, _slot) = self.sftp(target).await?;
        for file in files {
            for dir in parents(&file.path) {
                if sftp.try_exists(dir.as_str()).await.unwrap_or(false) {
                    continue;
                }
                if let Err(e) = sftp.create_dir(dir.as_str()).await {
                    // Another upload made it between the check and here.
                    if sftp.try_exists(dir.as_str()).await.unwrap_or(false) {
                        continue;
                    }
                    return Err(sftp_err(target, &dir, e));
                }
                sftp.set_metadata(dir.as_str(), mode_attrs(0o700))
                    .await
                    .map_err(|e| sftp_err(target, &dir, e))?;
            }
            let path = remote_path(&file.path);
            let mut handle = sftp
                .open_with_flags_and_attributes(
                    path,
                    OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
                    mode_attrs(file.mode & 0o600),
                )
                .await
                .map_err(|e| sftp_err(target, path, e))?;
            // Exact mode first (also narrows a pre-existing wider file), then data.
            handle
                .set_metadata(mode_attrs(file.mode))
                .await
                .map_err(|e| sftp_err(target, path, e))?;
            handle
                .write_all(&file.contents)
                .await
                .map_err(|e| sftp_err(target, path, e))?;
            handle
                .shutdown()
                .await
                .map_err(|e| sftp_err(target, path, e))?;
        }
        let _ = sftp.close().await;
        Ok(())
    }
}

fn sftp_err<E: std::error::Error + Send + Sync + 'static>(
    target: &Target,
    path: &str,
    e: E,
) -> Error {
    Error::Sftp {
        host: target.host_label(),
        user: target.user.clone(),
        path: path.to_string(),
        reason: e.to_string(),
        source: Cause::of(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_of_relative_home_and_absolute_paths() {
        assert_eq!(parents("a/b/c"), vec!["a", "a/b"]);
        assert_eq!(
            parents("~/.jupyterhub-ssh/run1/cert.pem"),
            vec![".jupyterhub-ssh", ".jupyterhub-ssh/run1"]
        );
        assert_eq!(parents("/tmp/x/y"), vec!["/tmp", "/tmp/x"]);
        assert!(parents("file").is_empty());
        assert_eq!(parents("a//b/"), vec!["a"]);
    }

    #[test]
    fn upload_debug_never_shows_contents() {
        let u = Upload {
            path: "k".into(),
            contents: b"-----BEGIN OPENSSH PRIVATE KEY-----".to_vec(),
            mode: 0o600,
        };
        let shown = format!("{u:?}");
        assert!(!shown.contains("BEGIN"), "{shown}");
        assert!(shown.contains("600"));
    }
}
