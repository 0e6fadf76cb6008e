//! Decisions, no I/O: plain functions over plain data, tested without sshd.
//!
//! - [`hosts`]: what a host reports, and which host a server goes to.
//! - [`gpus`]: a host's GPUs as `nvidia-smi` reports them, which are free,
//!   and which a server gets.
//! - [`holders`]: which server holds which GPU, as the hosts' run
//!   directories say (`ssh-spawner list`).
//! - [`health`]: which hosts answer, for every user at once.
//! - [`ports`]: listening sockets from `/proc/net/tcp*`, and port choice.
//! - [`limits`]: how memory and CPU limits are enforced on a host, and the
//!   words a launch puts before the server's argv for that.
//! - [`run`]: what names one run on a host (its id, directory, marker).
//! - [`quote`]: values quoted for the remote shell, and env names.
//! - [`sh`]: the remote scripts (`plan/sh/*.sh`) and how one is assembled.
//! - [`launch`]: the launch script's inputs, its command and its parsers.
//! - [`poll`]: the poll and ready-check scripts, and the poll's parser.
//! - [`stop`]: the stop script and its parser.
//! - [`adopt`]: finding a server whose start was interrupted.
//! - [`journal`]: the hub's journal entries, and what a sweep and the
//!   pending-stop retrier do with them.
//! - [`form`]: the spawn options form, rendered and validated.
//! - [`state`]: the versioned server state kept by the hub.
//! - [`trust`]: which saved states the spawner acts on, and where.
//! - [`history`]: the configurations a hub ran with (for [`trust`]).
//! - [`retry`]: another port, another host, or give up after a failed launch.

pub mod adopt;
pub mod form;
pub mod gpus;
pub mod health;
pub mod history;
pub mod holders;
pub mod hosts;
pub mod journal;
pub mod launch;
pub mod limits;
pub mod poll;
pub mod ports;
pub mod quote;
pub mod retry;
pub mod run;
pub mod sh;
pub mod state;
pub mod stop;
#[cfg(test)]
pub(crate) mod testing;
pub mod trust;
