//! GPU claims: which GPUs of each host this hub's servers hold, so that a
//! GPU is given to one server at a time.
//!
//! Like the port claims, the choice and the claim happen under one lock:
//! spawns that run at once (each with its own, possibly equally old, cached
//! view of the host) never get the same GPU. Unlike a port, a GPU's claim
//! does not expire: a server's GPU stays claimed until the server is
//! stopped or found gone ([`Spawner::release_gpus`]), never because its
//! host stopped answering. A restarted hub claims a state's GPUs again on
//! its first poll ([`Spawner::reclaim_gpus`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use super::Spawner;
use crate::plan::gpus::{self, Gpu, GpuFacts};
use crate::plan::state::ServerState;

/// The GPUs held on one host: UUID → the run id of the server holding it.
pub(super) type HostClaims = BTreeMap<String, String>;

/// GPU claims by host display name.
pub(super) type GpuClaims = std::collections::HashMap<String, HostClaims>;

/// The claims every core of this process shares ([`Spawner::sharing_process_gpu_claims`]).
static PROCESS_CLAIMS: std::sync::OnceLock<Arc<Mutex<GpuClaims>>> = std::sync::OnceLock::new();

/// Choose `n` GPUs of `facts` not in `held` (nor busy with another
/// process) and record them as held by `run_id`: the decision made inside
/// the claims lock. `Err` says how many are free and why the others are
/// not, as [`gpus::choose`] does.
pub(super) fn claim(
    held: &mut HostClaims,
    facts: &GpuFacts,
    busy_memory_mib: u64,
    n: u32,
    run_id: &str,
) -> Result<Vec<Gpu>, String> {
    let taken: BTreeSet<String> = held.keys().cloned().collect();
    let chosen: Vec<Gpu> = gpus::choose(facts, &taken, busy_memory_mib, n as usize)
        .map_err(|why| format!("{why}, {n} asked"))?
        .into_iter()
        .cloned()
        .collect();
    for g in &chosen {
        held.insert(g.uuid.clone(), run_id.to_string());
    }
    Ok(chosen)
}

impl Spawner {
    /// This spawner, holding its GPU claims in the set every other spawner
    /// of the process that called this shares, instead of its own. The hub
    /// makes one core per distinct core configuration (ProfilesSpawner
    /// profiles that differ in a `rust=True` option such as `hosts`); they
    /// all hand out the same hosts' GPUs, so they must see each other's
    /// claims. A host is the same host when its display name is.
    pub fn sharing_process_gpu_claims(mut self) -> Spawner {
        self.gpu_claims = PROCESS_CLAIMS.get_or_init(Default::default).clone();
        self
    }

    /// The GPUs (UUIDs) this hub's servers hold on `host`.
    pub fn held_gpus(&self, host: &str) -> BTreeSet<String> {
        self.gpu_claims
            .lock()
            .map(|c| c.get(host).map(|h| h.keys().cloned().collect()))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// `n` free GPUs of `host` for the server `run_id`, chosen and claimed
    /// under one lock ([`claim`]). `n` = 0 claims nothing.
    pub(super) fn claim_gpus(
        &self,
        host: &str,
        facts: &GpuFacts,
        n: u32,
        run_id: &str,
    ) -> Result<Vec<Gpu>, String> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let busy = self.config.gpu_busy_memory_mib;
        let mut claims = self
            .gpu_claims
            .lock()
            .map_err(|_| "the GPU claims are unreadable (a thread panicked)".to_string())?;
        let chosen = claim(
            claims.entry(host.to_string()).or_default(),
            facts,
            busy,
            n,
            run_id,
        )?;
        crate::metrics::gpus_claimed(host, run_id, chosen.iter().map(|g| &g.uuid));
        Ok(chosen)
    }

    /// Release what the server `run_id` holds on `host`: after its stop, or
    /// once a poll found it gone, or when its start failed before anything
    /// could run.
    pub fn release_gpus(&self, host: &str, run_id: &str) {
        if let Ok(mut claims) = self.gpu_claims.lock() {
            if let Some(held) = claims.get_mut(host) {
                held.retain(|_, r| r != run_id);
            }
        }
        crate::metrics::gpus_released(host, run_id);
    }

    /// Claim again the GPUs a saved state names (a restarted hub's first
    /// poll of a server that runs, or a stop that could not reach its host:
    /// a restarted hub retrying a pending stop). A GPU claimed by another
    /// server is left to it, and logged: two states naming one GPU is a
    /// fault to look at.
    pub(super) fn reclaim_gpus(&self, state: &ServerState) {
        if state.gpus.is_empty() {
            return;
        }
        let Ok(mut claims) = self.gpu_claims.lock() else {
            return;
        };
        let held = claims.entry(state.host.clone()).or_default();
        for uuid in &state.gpus {
            match held.get(uuid) {
                Some(other) if *other != state.run_id => tracing::warn!(
                    host = %state.host, run = %state.run_id, gpu = %uuid,
                    "the state names a GPU that server {other} holds; left to it"
                ),
                Some(_) => {}
                None => {
                    held.insert(uuid.clone(), state.run_id.clone());
                    crate::metrics::gpus_claimed(&state.host, &state.run_id, [uuid]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::gpus::from_facts;

    const A100: &str = include_str!("../../fixtures/gpus/a100x4-one-busy/query-gpu.csv");
    const A100_APPS: &str =
        include_str!("../../fixtures/gpus/a100x4-one-busy/query-compute-apps.csv");

    fn a100() -> GpuFacts {
        from_facts(Some("ok"), A100, A100_APPS, &[])
    }

    #[test]
    fn a_claim_takes_free_gpus_and_the_next_claim_does_not_get_them() {
        let facts = a100();
        let mut held = HostClaims::new();
        let first = claim(&mut held, &facts, 100, 2, "run1").unwrap();
        assert_eq!(first.len(), 2);
        let second = claim(&mut held, &facts, 100, 1, "run2").unwrap();
        assert!(first.iter().all(|g| g.uuid != second[0].uuid));
        // 4 GPUs, one busy with another user's job, three held now.
        let e = claim(&mut held, &facts, 100, 1, "run3").unwrap_err();
        assert!(e.starts_with("0 of 4 GPUs free"), "{e}");
        assert!(e.contains("held by a server") && e.contains("busy"), "{e}");
        assert!(e.ends_with(", 1 asked"), "{e}");
        // Releasing one run frees exactly its GPUs.
        held.retain(|_, r| r != "run1");
        assert_eq!(claim(&mut held, &facts, 100, 2, "run3").unwrap().len(), 2);
    }

    #[test]
    fn no_gpus_or_a_failed_nvidia_smi_gives_none() {
        let mut held = HostClaims::new();
        let e = claim(&mut held, &GpuFacts::None, 100, 1, "r").unwrap_err();
        assert!(e.contains("no nvidia-smi"), "{e}");
        let failed = GpuFacts::Failed {
            reason: "nvidia-smi --query-gpu exited with status 9".into(),
        };
        let e = claim(&mut held, &failed, 100, 1, "r").unwrap_err();
        assert!(e.contains("GPUs unknown"), "{e}");
        assert!(held.is_empty());
    }

    fn spawner() -> Spawner {
        let config = crate::config::Config::from_json(
            r#"{"hosts": [{"address": "198.18.0.11", "name": "node1"}], "known_hosts": "/nonexistent"}"#,
        )
        .unwrap();
        Spawner::new(config).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_claims_at_once_never_share_a_gpu() {
        let sp = spawner();
        let facts = std::sync::Arc::new(a100());
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (sp, facts) = (sp.clone(), facts.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                sp.claim_gpus("node1", &facts, 1, &format!("run{i}"))
            }));
        }
        let mut given = Vec::new();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(g) => given.extend(g.into_iter().map(|g| g.uuid)),
                Err(e) => {
                    assert!(e.starts_with("0 of 4 GPUs free"), "{e}");
                    refused += 1;
                }
            }
        }
        let distinct: BTreeSet<&String> = given.iter().collect();
        assert_eq!((given.len(), distinct.len(), refused), (3, 3, 17));
        assert_eq!(sp.held_gpus("node1").len(), 3);
    }

    #[tokio::test]
    async fn a_restarted_hub_claims_a_states_gpus_again_and_release_frees_them() {
        let sp = spawner();
        let facts = a100();
        let uuid = facts.gpus()[0].uuid.clone();
        let mut state: ServerState =
            crate::plan::state::decode(r#"{"version":1,"username":"a","host":"node1","address":"198.18.0.11","remote_user":"a","port":40000,"run_id":"r1","dir":"/home/a/.jupyterhub-ssh/r1"}"#)
                .unwrap();
        state.gpus = vec![uuid.clone()];
        sp.reclaim_gpus(&state);
        assert_eq!(sp.held_gpus("node1"), BTreeSet::from([uuid.clone()]));
        let got = sp.claim_gpus("node1", &facts, 2, "r2").unwrap();
        assert!(got.iter().all(|g| g.uuid != uuid));
        // Another state naming a held GPU does not take it over.
        let mut other = state.clone();
        other.run_id = "r3".into();
        sp.reclaim_gpus(&other);
        sp.release_gpus("node1", "r3");
        assert!(sp.held_gpus("node1").contains(&uuid));
        sp.release_gpus("node1", "r1");
        assert!(!sp.held_gpus("node1").contains(&uuid));
        assert_eq!(sp.held_gpus("node1").len(), 2);
    }

    #[tokio::test]
    async fn cores_of_one_hub_process_share_their_gpu_claims_and_a_plain_spawner_keeps_its_own() {
        // Two cores, as ProfilesSpawner profiles that differ in `hosts`
        // make: what one claims on node1 the other does not give, and its
        // release is seen by both. The host name is unique to this test, as
        // the process set is shared with any other test that asks for it.
        let (a, b) = (
            spawner().sharing_process_gpu_claims(),
            spawner().sharing_process_gpu_claims(),
        );
        let own = spawner();
        let facts = a100();
        let first = a.claim_gpus("shared-node", &facts, 2, "ra").unwrap();
        let second = b.claim_gpus("shared-node", &facts, 1, "rb").unwrap();
        assert!(first.iter().all(|g| g.uuid != second[0].uuid));
        assert_eq!(b.held_gpus("shared-node"), a.held_gpus("shared-node"));
        let e = b.claim_gpus("shared-node", &facts, 1, "rc").unwrap_err();
        assert!(e.starts_with("0 of 4 GPUs free"), "{e}");
        // A spawner made on its own (the CLI, a test) is not part of it.
        assert!(own.held_gpus("shared-node").is_empty());
        a.release_gpus("shared-node", "ra");
        assert_eq!(b.held_gpus("shared-node").len(), 1);
        b.release_gpus("shared-node", "rb");
        assert!(a.held_gpus("shared-node").is_empty());
    }
}
