//! Decisions, no I/O: plain functions over plain data, tested without sshd.
//!
//! - [`hosts`]: what a host reports, and which host a server goes to.
//! - [`health`]: which hosts answer, for every user at once.
//! - [`ports`]: listening sockets from `/proc/net/tcp*`, and port choice.
//! - [`limits`]: how memory and CPU limits are enforced on a host.
//! - [`script`]: the launch, poll and stop scripts, and what they print.
//! - [`adopt`]: finding a server whose start was interrupted.
//! - [`journal`]: the hub's journal entries, and what a sweep and the
//!   pending-stop retrier do with them.
//! - [`form`]: the spawn options form, rendered and validated.
//! - [`state`]: the versioned server state kept by the hub.
//! - [`retry`]: another port, another host, or give up after a failed launch.

pub mod adopt;
pub mod form;
pub mod health;
pub mod hosts;
pub mod journal;
pub mod limits;
pub mod ports;
pub mod retry;
pub mod script;
pub mod state;
