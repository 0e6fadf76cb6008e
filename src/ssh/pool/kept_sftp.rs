//! The SFTP session a pooled connection keeps open, and the file
//! operations made through it: one request each, no program started on the
//! host ([`Pool::make_dir`], [`Pool::path_exists`],
//! [`Pool::remove_empty_dir`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::FileAttributes;
use tokio::sync::OwnedSemaphorePermit;

use super::{Conn, Pool};
use crate::ssh::Target;

/// The SFTP session a connection keeps open, so that a run directory is
/// made with one request and no program started on the host. It holds a
/// session slot from the moment it is tried until it is given up.
pub(super) enum Keep {
    /// Not tried on this connection yet.
    Untried,
    /// Asked for ([`Pool::make_dir`]): opened next time a session is open on
    /// the connection, so that sshd granting it proves it holds at least two
    /// sessions and SFTP never takes a host's only one.
    Wanted,
    /// Being opened in the background.
    Opening(OwnedSemaphorePermit),
    /// Open: requests go to this sftp-server.
    Open {
        sftp: Arc<RawSftpSession>,
        _slot: OwnedSemaphorePermit,
    },
    /// Not on this connection: sshd refused or failed it, a request failed
    /// other than with a status, or sshd refused a session while it was
    /// open (it holds fewer sessions than assumed).
    Off,
}

/// Open a kept SFTP session on `conn` in the background (bounded by
/// `timeout`) when one is wanted, unless the connection lacks a spare session
/// slot. Called with a session open on the connection. Never waits.
pub(super) fn open_keep(conn: &Arc<Conn>, timeout: Duration) {
    let Ok(mut keep) = conn.keep.lock() else {
        return;
    };
    if !matches!(*keep, Keep::Wanted) {
        return;
    }
    // Leave room for commands: only a connection with at least three slots
    // and two of them free gives one to SFTP.
    if conn.capacity.load(Ordering::Relaxed) < 3 || conn.sessions.available_permits() < 2 {
        return;
    }
    let Ok(permit) = conn.sessions.clone().try_acquire_owned() else {
        return;
    };
    *keep = Keep::Opening(permit);
    conn.kept.store(1, Ordering::Relaxed);
    drop(keep);
    let conn = conn.clone();
    tokio::spawn(async move {
        let opened = tokio::time::timeout(timeout, async {
            let channel = conn
                .handle
                .channel_open_session()
                .await
                .map_err(|e| e.to_string())?;
            channel
                .request_subsystem(true, "sftp")
                .await
                .map_err(|e| e.to_string())?;
            let sftp = RawSftpSession::new(channel.into_stream());
            sftp.set_timeout(timeout.as_secs().max(1));
            sftp.init().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(sftp)
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let Ok(mut keep) = conn.keep.lock() else {
            return;
        };
        // Given up while it opened (a session refused meanwhile): stay off.
        let Keep::Opening(_) = &*keep else {
            return;
        };
        match (opened, std::mem::replace(&mut *keep, Keep::Off)) {
            (Ok(sftp), Keep::Opening(permit)) => {
                *keep = Keep::Open {
                    sftp: Arc::new(sftp),
                    _slot: permit,
                }
            }
            (Err(e), _) => {
                conn.kept.store(0, Ordering::Relaxed);
                tracing::debug!("no kept SFTP session on this connection ({e}); run directories are made by the launch script");
            }
            (Ok(_), _) => conn.kept.store(0, Ordering::Relaxed),
        }
    });
}

impl Conn {
    /// The kept SFTP session, when it is open.
    pub(super) fn kept_sftp(&self) -> Option<Arc<RawSftpSession>> {
        match &*self.keep.lock().ok()? {
            Keep::Open { sftp, .. } => Some(sftp.clone()),
            _ => None,
        }
    }

    /// Ask for a kept SFTP session, opened with the next session.
    fn want_keep(&self) {
        if let Ok(mut keep) = self.keep.lock() {
            if matches!(*keep, Keep::Untried) {
                *keep = Keep::Wanted;
            }
        }
    }

    /// Give up the kept SFTP session for good (its slot comes back; sshd
    /// frees its session once sftp-server has exited). Whether one was open
    /// or opening.
    pub(super) fn drop_keep(&self) -> bool {
        let Ok(mut keep) = self.keep.lock() else {
            return false;
        };
        let was = std::mem::replace(&mut *keep, Keep::Off);
        self.kept.store(0, Ordering::Relaxed);
        matches!(was, Keep::Opening(_) | Keep::Open { .. })
    }
}

impl Pool {
    /// Make the directory `path` (mode 0700; `~/`-less paths are relative to
    /// the home directory) on `target` with one request to the SFTP session
    /// a live pooled connection keeps open: no program starts on the host.
    /// `false` when it was not made that way, and the caller makes it
    /// another way: no live connection (this never connects or waits for a
    /// handshake), no kept session yet (one is then opened in the
    /// background, for the next time), the directory exists or its parent
    /// does not, or any failure.
    pub async fn make_dir(&self, target: &Target, path: &str) -> bool {
        // One request of a few bytes: an sftp-server slower than this is
        // given up, and the launch script makes the directory instead (it
        // copes with one that appears meanwhile).
        let timeout = self.inner.opts.channel_timeout.min(Duration::from_secs(2));
        let Some(conn) = self.live_conn(target) else {
            return false;
        };
        let Some(sftp) = conn.kept_sftp() else {
            conn.want_keep();
            return false;
        };
        let attrs = FileAttributes {
            permissions: Some(0o700),
            ..FileAttributes::empty()
        };
        let path = path.strip_prefix("~/").unwrap_or(path);
        match tokio::time::timeout(timeout, sftp.mkdir(path, attrs)).await {
            Ok(Ok(_)) => true,
            // The server's answer (it exists, the parent is missing): the
            // session is fine.
            Ok(Err(russh_sftp::client::error::Error::Status(status))) => {
                tracing::debug!(host = %target.host_label(), user = %target.user, path,
                    "SFTP mkdir: {}", status.error_message);
                false
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                tracing::debug!(host = %target.host_label(), user = %target.user,
                    "kept SFTP session failed ({reason}); giving it up on this connection");
                conn.drop_keep();
                false
            }
        }
    }

    /// Whether `path` exists on `target`, asked of the SFTP session a live
    /// pooled connection keeps open (one request, no program started on the
    /// host). `None` when it cannot be asked that way (no kept session, no
    /// answer within a second, or any failure but "no such file").
    pub async fn path_exists(&self, target: &Target, path: &str) -> Option<bool> {
        let conn = self.live_conn(target)?;
        let sftp = conn.kept_sftp()?;
        let path = path.strip_prefix("~/").unwrap_or(path);
        let wait = self.inner.opts.channel_timeout.min(Duration::from_secs(1));
        match tokio::time::timeout(wait, sftp.stat(path)).await {
            Ok(Ok(_)) => Some(true),
            Ok(Err(russh_sftp::client::error::Error::Status(status)))
                if status.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
            {
                Some(false)
            }
            _ => None,
        }
    }

    /// Remove the empty directory `path` on `target` through the kept SFTP
    /// session, when there is one (a directory [`Pool::make_dir`] made for a
    /// start that did not happen). Whether it was removed.
    pub async fn remove_empty_dir(&self, target: &Target, path: &str) -> bool {
        let Some(sftp) = self.live_conn(target).and_then(|c| c.kept_sftp()) else {
            return false;
        };
        let path = path.strip_prefix("~/").unwrap_or(path);
        matches!(
            tokio::time::timeout(self.inner.opts.channel_timeout, sftp.rmdir(path)).await,
            Ok(Ok(_))
        )
    }

    /// A live connection to `target` that keeps an SFTP session open, or
    /// else the least busy one; `None` when there is none or a handshake
    /// holds the list.
    fn live_conn(&self, target: &Target) -> Option<Arc<Conn>> {
        let slot = self.slot(target);
        let conns = slot.conns.try_lock().ok()?;
        let live = || conns.iter().filter(|c| !c.handle.is_closed());
        live()
            .find(|c| c.kept_sftp().is_some())
            .or_else(|| live().min_by_key(|c| c.in_use()))
            .cloned()
    }
}
