//! # ssh-spawner
//!
//! A JupyterHub spawner that starts each user's single-user server on one of a
//! lab's shared hosts over SSH.
//!
//! The crate is layered so that decisions stay apart from I/O:
//!
//! - [`ssh`] moves bytes: a pool of verified, authenticated connections to
//!   OpenSSH servers that carries many concurrent commands and SFTP uploads,
//!   with every wait bounded. It decides nothing about spawning.
//! - [`plan`] decides, with no I/O: which host and port, the remote scripts
//!   that launch, poll and stop a server, what hosts report, the state kept.
//! - [`spawner`] ties the two together: prepare, certificates, launch, poll,
//!   stop, progress. The JupyterHub class and the `ssh-spawner` CLI drive it.
//! - [`config`] holds the options and fills templates with validated names.
//! - [`error`] is the one error type; each variant names the host and user and
//!   says what an admin can do about it.
//! - [`journal`] keeps the hub's journal of starts in flight and of pending
//!   stops on disk; [`pending`] sweeps it after a restart and retries the
//!   pending stops in the background.
//!
//! Host keys are always verified against a known_hosts file; the only
//! relaxation is the opt-in `accept-new` policy, which records a host seen for
//! the first time and still refuses a changed key.
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod error;
pub mod journal;
pub mod metrics;
pub mod pending;
pub mod plan;
pub mod spawner;
pub mod ssh;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
