//! Which hosts answer, shared by every user of a pool, and the background
//! probe that asks a down host again, one attempt at a time.
//!
//! The rules are [`crate::plan::health`]'s; this module feeds them what
//! connections and probes report and runs the probe. A probe opens a TCP
//! connection to sshd and reads its greeting (`SSH-...`): it sends nothing,
//! logs in as nobody, and is bounded by the connect timeout.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;

use crate::error::Error;
use crate::metrics;
use crate::plan::health::{self, AfterFailure, Health, ProbeNext, Status};

/// The hosts' health as one pool sees it.
#[derive(Clone, Default)]
pub struct HostWatch {
    inner: Arc<Mutex<Health>>,
}

impl HostWatch {
    /// The status of the host `address:port`.
    pub fn status(&self, label: &str) -> Status {
        self.inner
            .lock()
            .map(|h| h.status(label))
            .unwrap_or(Status::Up)
    }

    /// Every host that does not take servers now.
    pub fn not_up(&self) -> Vec<(String, Status)> {
        self.inner.lock().map(|h| h.not_up()).unwrap_or_default()
    }

    /// A connection to `address:port` ended in `error`. When that means the
    /// host does not answer, it is marked down for everyone and, the first
    /// time, a background probe starts (`connect_timeout` bounds each
    /// attempt). Other errors (authentication, host keys) prove the host
    /// answers.
    pub fn connect_failed(
        &self,
        address: &str,
        port: u16,
        error: &Error,
        connect_timeout: Duration,
    ) {
        let label = super::host_label(address, port);
        if !health::means_host_down(error) {
            self.answered(&label);
            return;
        }
        let reason = short(error);
        let after = self
            .inner
            .lock()
            .map(|mut h| h.failed(&label, &reason, Instant::now(), SystemTime::now()));
        publish(&label, &self.status(&label));
        if let Ok(AfterFailure::StartProbe) = after {
            tracing::warn!(host = %label, error = %reason,
                "host does not answer: no new servers go there until it answers again (asked again in the background every {:?})",
                health::PROBE_EVERY);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(probe(
                    Arc::downgrade(&self.inner),
                    address.to_string(),
                    port,
                    connect_timeout,
                ));
            }
        }
    }

    /// A connection to the host `label` was made.
    pub fn answered(&self, label: &str) {
        let Ok(mut h) = self.inner.lock() else {
            return;
        };
        let was_held = !h.status(label).takes_servers();
        if let Some(down_for) = h.answered(label, Instant::now(), SystemTime::now()) {
            let now = h.status(label);
            drop(h);
            tracing::warn!(host = %label, down_for = ?down_for,
            "host answers again{}", match &now {
                Status::HeldDown { .. } => format!(": {}", now.describe(SystemTime::now())),
                _ => String::new(),
            });
            publish(label, &now);
        } else if was_held && h.status(label).takes_servers() {
            drop(h);
            tracing::warn!(host = %label, "host held down for flapping takes servers again");
            publish(label, &Status::Up);
        }
    }
}

/// The host's status in the metrics.
fn publish(label: &str, status: &Status) {
    match status {
        Status::Up => {
            metrics::host_down(label, None);
            metrics::host_held(label, None);
        }
        Status::Down(d) => {
            metrics::host_down(label, Some(d.since));
            metrics::host_held(label, None);
        }
        Status::HeldDown { until, .. } => {
            metrics::host_down(label, None);
            metrics::host_held(label, Some(*until));
        }
    }
}

/// The error without the user it was met as: the host's status is everyone's.
fn short(e: &Error) -> String {
    match e {
        Error::Unreachable { reason, .. } => format!("cannot connect: {reason}"),
        Error::Timeout { after, .. } => format!("no answer within {after:?}"),
        other => other.to_string(),
    }
}

/// Ask the host again until it takes servers (or the pool is gone).
async fn probe(watch: Weak<Mutex<Health>>, address: String, port: u16, timeout: Duration) {
    let label = super::host_label(&address, port);
    let mut wait = health::PROBE_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = watch.upgrade() else {
            return;
        };
        let started = Instant::now();
        let outcome = sshd_answers(&address, port, timeout).await;
        metrics::host_probe(&label, outcome.is_ok());
        let watch_now = HostWatch { inner };
        match outcome {
            Ok(()) => watch_now.answered(&label),
            Err(reason) => {
                if let Ok(mut h) = watch_now.inner.lock() {
                    h.failed(&label, &reason, Instant::now(), SystemTime::now());
                }
                publish(&label, &watch_now.status(&label));
                tracing::debug!(host = %label, %reason, "probe: still no answer");
            }
        }
        let next = watch_now
            .inner
            .lock()
            .map(|h| h.probe_next(&label, started.elapsed()))
            .unwrap_or(ProbeNext::Done);
        match next {
            ProbeNext::Done => return,
            ProbeNext::Again(after) => wait = after,
        }
    }
}

/// Does sshd at `address:port` greet within `timeout`? A TCP connection and
/// the first bytes of its identification line; nothing is sent.
pub async fn sshd_answers(address: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((address, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut buf = [0u8; 256];
        let mut got = 0;
        // sshd may send other lines before its version line (RFC 4253 4.2).
        loop {
            let n = stream
                .read(&mut buf[got..])
                .await
                .map_err(|e| format!("connection failed before the SSH greeting: {e}"))?;
            if n == 0 {
                return Err("connection closed before the SSH greeting".to_string());
            }
            got += n;
            let seen = &buf[..got];
            if seen.starts_with(b"SSH-") || seen.windows(5).any(|w| w == b"\nSSH-") {
                return Ok(());
            }
            if got == buf.len() {
                return Err("no SSH greeting in the first 256 bytes".to_string());
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_greeting_is_an_answer_and_silence_or_a_close_is_not() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            // 1: a greeting after a banner line; 2: closes; 3: silent.
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"hello\r\nSSH-2.0-OpenSSH_9.2\r\n")
                .await
                .unwrap();
            let (s2, _) = l.accept().await.unwrap();
            drop(s2);
            let (s3, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop((s, s3));
        });
        let t = Duration::from_millis(500);
        assert_eq!(sshd_answers("127.0.0.1", port, t).await, Ok(()));
        assert!(sshd_answers("127.0.0.1", port, t)
            .await
            .unwrap_err()
            .contains("closed before the SSH greeting"));
        assert!(sshd_answers("127.0.0.1", port, t)
            .await
            .unwrap_err()
            .contains("no answer within"));
        server.await.unwrap();
        // Nothing listens any more: refused, at once.
        let err = sshd_answers("127.0.0.1", port, t).await.unwrap_err();
        assert!(err.starts_with("cannot connect"), "{err}");
    }
}
