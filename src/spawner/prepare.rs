//! Choosing a host and a port for a spawn: the facts of every eligible
//! host read at once (hosts marked down skipped), the ranking, the port
//! claimed under one lock, and the state recorded before anything starts.

use crate::config::{check_username, HostConfig};
use crate::error::{Error, Result};
use crate::metrics;
use crate::plan::gpus as gpu;
use crate::plan::health;
use crate::plan::hosts::{self, Candidate, HostFacts, Strategy, DRAINING};
use crate::plan::limits::Limits;
use crate::plan::ports::choose_port;
use crate::plan::state::{ServerState, STATE_VERSION};
use crate::ssh::Target;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;

use super::progress::{plural, short_reason, Progress};
use super::{SpawnRequest, Spawner};

/// A host and port chosen, not yet launched.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The state so far (no pid yet); save it before launching.
    pub state: ServerState,
    pub(super) facts: HostFacts,
    pub(super) tried_ports: BTreeSet<u16>,
    pub(super) limits: Limits,
    pub(super) prologue: Vec<String>,
    /// When the spawn began (for the spawn duration metric).
    pub(super) started: Instant,
}

impl Prepared {
    /// Facts of the chosen host.
    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }
}

/// How long a port handed to a start stays claimed (unless the server is
/// stopped first): long enough for its server to listen, after which the
/// host's facts show the port taken anyway.
const PORT_CLAIM: Duration = Duration::from_secs(120);

impl Spawner {
    /// Count a new server against the cached facts, so spawns that arrive
    /// together within the cache time spread out instead of piling onto the
    /// host that looked best a moment ago.
    pub(super) fn reserve(&self, host: &str, user: &str, port: u16, mem: Option<u64>) {
        if let Ok(mut cache) = self.facts.lock() {
            // Every user's cached view of this host gets the new server.
            for ((h, u), (_, f)) in cache.iter_mut() {
                if h == host {
                    f.servers += 1;
                    f.mem_available = f.mem_available.saturating_sub(mem.unwrap_or(0));
                    if u == user {
                        f.listening.insert(port);
                    }
                }
            }
        }
    }

    /// A free port on `host`, claimed under one lock: starts that run at once
    /// (each with its own, possibly equally old, view of the host) never get
    /// the same port, even before their servers listen.
    pub(super) fn claim_port(
        &self,
        host: &str,
        listening: &BTreeSet<u16>,
        tried: &BTreeSet<u16>,
    ) -> Option<u16> {
        let Ok(mut claims) = self.claims.lock() else {
            return choose_port(self.config.port_range, listening, tried, &mut rand::rng());
        };
        let now = Instant::now();
        let mine = claims.entry(host.to_string()).or_default();
        mine.retain(|_, at| now.duration_since(*at) < PORT_CLAIM);
        let mut avoid = tried.clone();
        avoid.extend(mine.keys().copied());
        let port = choose_port(self.config.port_range, listening, &avoid, &mut rand::rng())?;
        mine.insert(port, now);
        Some(port)
    }

    /// The facts of `hosts` for a host choice, each `Err` with why it cannot
    /// be considered. Hosts marked down ([`crate::plan::health`]) are not
    /// asked. The others are asked all at once; once one has answered, the
    /// rest are waited for only [`health::straggler_wait`] longer (unless the
    /// user chose the host): a host that stopped answering a moment ago
    /// costs this spawn a second or two, not the connect timeout. Reads
    /// not waited for go on in the background and fill the cache (or mark
    /// the host down) for the spawns that follow.
    pub(super) async fn read_facts_for_choice(
        &self,
        hosts: &[&HostConfig],
        targets: &[Target],
        pinned: bool,
        progress: &Progress,
    ) -> Vec<std::result::Result<HostFacts, String>> {
        let mut facts: Vec<Option<std::result::Result<HostFacts, String>>> =
            vec![None; hosts.len()];
        let mut down = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if hosts[i].drain {
                down.push(format!("{} is {DRAINING}", hosts[i].display_name()));
                facts[i] = Some(Err(DRAINING.into()));
            } else if let Some(why) = self.host_down(t) {
                down.push(format!("{} is {why}", hosts[i].display_name()));
                facts[i] = Some(Err(why));
            }
        }
        let asked = facts.iter().filter(|f| f.is_none()).count();
        let skipped = if down.is_empty() {
            String::new()
        } else {
            format!("; not asking {}", down.join("; "))
        };
        progress.emit(
            5,
            match asked {
                0 => format!("No host to connect to{skipped}"),
                1 => format!(
                    "Connecting to {} to check its free memory and load{skipped}",
                    hosts[facts.iter().position(|f| f.is_none()).unwrap_or(0)].display_name()
                ),
                n => {
                    format!("Connecting to {n} hosts to check their free memory and load{skipped}")
                }
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, (h, t)) in hosts.iter().zip(targets).enumerate() {
            if facts[i].is_some() {
                continue;
            }
            let (me, host, target, tx) = (self.clone(), (*h).clone(), t.clone(), tx.clone());
            // A task of its own, so that a read not waited for still ends
            // (and caches its facts or marks the host down).
            tokio::spawn(
                async move {
                    let got = me.cached_facts(&host, &target).await;
                    let _ = tx.send((i, got));
                }
                .in_current_span(),
            );
        }
        drop(tx);
        let started = Instant::now();
        let mut until: Option<tokio::time::Instant> = None;
        let mut pending = asked;
        while pending > 0 {
            let next = match until {
                Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => rx.recv().await,
            };
            let Some((i, got)) = next else { break };
            pending -= 1;
            if got.is_ok() && until.is_none() && !pinned {
                until =
                    Some(tokio::time::Instant::now() + health::straggler_wait(started.elapsed()));
            }
            facts[i] = Some(got.map_err(|e| short_reason(&e)));
        }
        let waited = started.elapsed();
        facts
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.unwrap_or_else(|| {
                    tracing::info!(host = hosts[i].display_name(),
                        "no answer within {waited:.1?} while other hosts answered; choosing among those");
                    Err(format!("no answer within {:.1} s while other hosts answered", waited.as_secs_f64()))
                })
            })
            .collect()
    }

    /// Choose host and port: every eligible host's facts are read at once
    /// (cached briefly), hosts that do not fit are passed over, and when none
    /// fits the error lists every host and why.
    #[tracing::instrument(name = "server", skip_all, fields(user = %req.username, server = %req.server_name, host = tracing::field::Empty))]
    pub async fn prepare(&self, req: &SpawnRequest, progress: &Progress) -> Result<Prepared> {
        let started = Instant::now();
        let prepared = self.prepare_inner(req, progress, started).await;
        if let Err(e) = &prepared {
            metrics::spawn_done(
                req.host.as_deref().unwrap_or("-"),
                e.kind(),
                started.elapsed(),
            );
        }
        prepared
    }

    pub(super) async fn prepare_inner(
        &self,
        req: &SpawnRequest,
        progress: &Progress,
        started: Instant,
    ) -> Result<Prepared> {
        check_username(&req.username)?;
        let hosts: Vec<&HostConfig> = self
            .config
            .hosts
            .iter()
            .filter(|h| {
                req.host
                    .as_deref()
                    .is_none_or(|want| want == h.display_name())
            })
            .filter(|h| !req.exclude.iter().any(|x| x == h.display_name()))
            .collect();
        if hosts.is_empty() {
            return Err(Error::NoHost {
                detail: match &req.host {
                    Some(h) if self.config.host(h).is_none() => {
                        format!("no host named {h:?} is configured")
                    }
                    _ => "no host left to try".into(),
                },
            });
        }
        let targets = hosts
            .iter()
            .map(|h| self.target(h, &req.username))
            .collect::<Result<Vec<_>>>()?;
        let facts = self
            .read_facts_for_choice(&hosts, &targets, req.host.is_some(), progress)
            .await;
        let candidates: Vec<Candidate> = hosts
            .iter()
            .zip(&facts)
            .map(|(h, f)| Candidate {
                name: h.display_name(),
                max_servers: h.max_servers,
                draining: h.drain,
                facts: f.as_ref().map_err(String::clone),
                held_gpus: if req.requirements.gpus > 0 {
                    self.held_gpus(h.display_name())
                } else {
                    BTreeSet::new()
                },
                gpu_busy_memory_mib: self.config.gpu_busy_memory_mib,
            })
            .collect();
        let rr = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let order = hosts::rank(
            &candidates,
            &req.requirements,
            self.config.host_selection,
            rr,
            &mut rand::rng(),
        )
        .map_err(|e| match (&req.host, e) {
            // The user pinned this host: say so, and do not move the server.
            (Some(h), Error::NoHost { detail }) => Error::NoHost {
                detail: hosts::pinned_refusal(h, &detail),
            },
            (_, e) => e,
        })?;
        let fit = order.len();
        // Hosts whose GPUs other spawns claimed since the ranking, and why.
        let mut gpus_gone = Vec::new();
        for i in order {
            let (host, Ok(f)) = (hosts[i], &facts[i]) else {
                continue;
            };
            let run_id = new_run_id();
            // The GPUs are chosen and claimed under one lock, against the
            // claims as they are now (the ranking saw them a moment ago).
            let gpus =
                match self.claim_gpus(host.display_name(), &f.gpus, req.requirements.gpus, &run_id)
                {
                    Ok(g) => g,
                    Err(why) => {
                        gpus_gone.push(format!("{}: {why}", host.display_name()));
                        continue;
                    }
                };
            let Some(port) = self.claim_port(host.display_name(), &f.listening, &BTreeSet::new())
            else {
                self.release_gpus(host.display_name(), &run_id);
                continue;
            };
            tracing::Span::current().record("host", host.display_name());
            let rest = self.config.state_dir.trim_start_matches("~/");
            let base = format!("{}/{rest}", f.home.trim_end_matches('/'));
            let state = ServerState {
                version: STATE_VERSION,
                username: req.username.clone(),
                server_name: req.server_name.clone(),
                host: host.display_name().to_string(),
                address: host.address.clone(),
                ssh_port: host.port,
                remote_user: targets[i].user.clone(),
                port,
                dir: format!("{}/{run_id}", base.trim_end_matches('/')),
                run_id,
                pid: None,
                pgid: None,
                start_time: None,
                uid: None,
                boot_id: None,
                enforcement: None,
                tunnel_port: None,
                hub_forward_port: None,
                hub_forward_to: None,
                gpus: gpus.iter().map(|g| g.uuid.clone()).collect(),
                extra: Default::default(),
            };
            self.reserve(
                host.display_name(),
                &targets[i].user,
                port,
                req.requirements.mem_guarantee,
            );
            let others: Vec<String> = candidates
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| match &c.facts {
                    Ok(f) => format!("{} {}", c.name, plural(f.servers, "server")),
                    Err(e) => format!("{} {e}", c.name),
                })
                .collect();
            let why = if req.host.is_some() {
                "as you asked".to_string()
            } else {
                match self.config.host_selection {
                    _ if fit == 1 => "the only host that fits".to_string(),
                    Strategy::Random => format!("at random among the {fit} hosts that fit"),
                    Strategy::RoundRobin => format!("next in turn among the {fit} hosts that fit"),
                    Strategy::LeastLoaded => {
                        format!("the least busy of the {fit} hosts that fit")
                    }
                }
            };
            progress.emit(
                20,
                format!(
                    "Host {} chosen, {why} ({} free, load {:.1} on {} cores, {}){}; port {port}",
                    host.display_name(),
                    hosts::human_bytes(f.mem_available),
                    f.load1,
                    f.cpus,
                    plural(f.servers, "server"),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!("; others: {}", others.join(", "))
                    }
                ),
            );
            if !gpus.is_empty() {
                progress.emit(22, gpu::assigned(host.display_name(), &gpus));
            }
            let mut prologue = self.config.prologue.clone();
            prologue.extend(host.prologue.iter().cloned());
            return Ok(Prepared {
                state,
                facts: f.clone(),
                tried_ports: BTreeSet::from([port]),
                limits: req.limits,
                prologue,
                started,
            });
        }
        if !gpus_gone.is_empty() {
            // Other spawns claimed the GPUs the ranking saw free. Said as a
            // ranking with the claims as they are now says it: every host,
            // and why it cannot take the server (the GPUs claimed meanwhile
            // among the reasons).
            let n = req.requirements.gpus;
            let now: Vec<Candidate> = candidates
                .iter()
                .map(|c| Candidate {
                    held_gpus: self.held_gpus(c.name),
                    ..c.clone()
                })
                .collect();
            let detail = match hosts::rank(
                &now,
                &req.requirements,
                self.config.host_selection,
                rr,
                &mut rand::rng(),
            ) {
                Err(Error::NoHost { detail }) => detail,
                _ => format!(
                    "no host has {n} free GPU{}: {}",
                    if n == 1 { "" } else { "s" },
                    gpus_gone.join(", ")
                ),
            };
            return Err(Error::NoHost {
                detail: match &req.host {
                    Some(h) => hosts::pinned_refusal(h, &detail),
                    None => detail,
                },
            });
        }
        Err(Error::NoHost {
            detail: format!(
                "no free port in {}-{} on any host that fits",
                self.config.port_range.start, self.config.port_range.end
            ),
        })
    }

    /// Another free port on the same host after [`Error::PortTaken`].
    pub fn repick_port(&self, prepared: &mut Prepared) -> Result<u16> {
        if prepared.tried_ports.len() > self.config.port_retries as usize {
            return Err(Error::NoHost {
                detail: format!(
                    "{}: {} ports in a row were taken before the server could start",
                    prepared.state.host,
                    prepared.tried_ports.len()
                ),
            });
        }
        let port = self
            .claim_port(
                &prepared.state.host,
                &prepared.facts.listening,
                &prepared.tried_ports,
            )
            .ok_or_else(|| Error::NoHost {
                detail: format!("{}: no free port left in the range", prepared.state.host),
            })?;
        prepared.tried_ports.insert(port);
        prepared.state.port = port;
        Ok(port)
    }
}

fn new_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
