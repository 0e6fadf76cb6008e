//! Reading a host's facts (memory, load, servers, ports), cached briefly
//! and shared by the starts that miss the cache together, and the live
//! figures the options form shows.

use super::progress::short_reason;
use super::{futures_join, Spawner, StatusCell};
use crate::config::{check_username, Config, HostConfig};
use crate::error::{Error, Result};
use crate::plan::gpus;
use crate::plan::hosts::{self, HostFacts};
use crate::ssh::Target;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Spawner {
    /// Why the host `target` reaches takes no servers now (marked down, or
    /// held down after flapping: [`crate::plan::health`]), in the words
    /// spawns, the options form and `check` show; `None` while it takes them.
    pub(super) fn host_down(&self, target: &Target) -> Option<String> {
        let status = self.pool.health().status(&target.host_label());
        (!status.takes_servers()).then(|| status.describe(std::time::SystemTime::now()))
    }

    /// Read one host's facts (one exec), optionally checking the command.
    pub async fn host_facts(
        &self,
        target: &Target,
        command_check: Option<(&[String], &str)>,
    ) -> Result<HostFacts> {
        let out = self
            .run_script(target, hosts::facts_script(command_check))
            .await?
            .check(target)?;
        let facts = hosts::parse_facts(&String::from_utf8_lossy(&out.stdout))?;
        // The GPU gauges (docs/metrics.md): each GPU and whether a process
        // uses it; which of them this hub holds is counted at the scrape.
        let used = match &facts.gpus {
            gpus::GpuFacts::Ok(report) => Some(
                gpus::gpu_uses(report, &Default::default(), self.config.gpu_busy_memory_mib)
                    .into_iter()
                    .map(|(g, u)| (g.uuid.clone(), matches!(u, gpus::GpuUse::Busy(_))))
                    .collect(),
            ),
            _ => None,
        };
        crate::metrics::gpu_facts(&target.host_label(), used);
        Ok(facts)
    }

    pub(super) async fn cached_facts(
        &self,
        host: &HostConfig,
        target: &Target,
    ) -> Result<HostFacts> {
        let down = || match self.host_down(target) {
            None => Ok(()),
            Some(why) => Err(Error::NoHost {
                detail: format!("{} is {why}", host.display_name()),
            }),
        };
        down()?;
        let key = (host.display_name().to_string(), target.user.clone());
        let max_age = Config::duration(self.config.facts_cache);
        let cached = || -> Option<HostFacts> {
            let cache = self.facts.lock().ok()?;
            let (at, f) = cache.get(&key)?;
            (at.elapsed() < max_age).then(|| f.clone())
        };
        if let Some(f) = cached() {
            return Ok(f);
        }
        if max_age.is_zero() {
            return self.host_facts(target, None).await;
        }
        let read_lock = self
            .facts_reads
            .lock()
            .map(|mut m| m.entry(key.clone()).or_default().clone())
            .unwrap_or_default();
        let read = async {
            let _reading = read_lock.lock().await;
            // Another start may have read them while this one waited, or
            // found the host down.
            if let Some(f) = cached() {
                return Ok(f);
            }
            down()?;
            let f = self.host_facts(target, None).await?;
            if let Ok(mut cache) = self.facts.lock() {
                // Expired figures are never read again: a hub that served
                // many users keeps only the fresh ones.
                cache.retain(|_, (at, _)| at.elapsed() < max_age);
                cache.insert(key.clone(), (Instant::now(), f.clone()));
            }
            Ok(f)
        };
        let result = read.await;
        // The lock goes once no other start holds or waits on it (the map's
        // and this clone are the only references, counted under the map's
        // lock, where every other clone is made).
        if let Ok(mut reads) = self.facts_reads.lock() {
            let ours = reads.get(&key).is_some_and(|l| Arc::ptr_eq(l, &read_lock));
            if ours && Arc::strong_count(&read_lock) <= 2 {
                reads.remove(&key);
            }
        }
        result
    }

    /// How many (host, user) pairs the facts cache and the facts-read locks
    /// hold: bounded by the pairs in use, not by every pair ever served.
    #[doc(hidden)]
    pub fn facts_entries(&self) -> (usize, usize) {
        (
            self.facts.lock().map(|c| c.len()).unwrap_or(0),
            self.facts_reads.lock().map(|r| r.len()).unwrap_or(0),
        )
    }

    /// Live figures of the hosts named in `names` (all hosts when empty), for
    /// the options form: one exec per host, all at once, each waited for at
    /// most `wait` (a host that does not answer by then is shown as not
    /// answering). Results, failures included, are shared for `max_age`:
    /// pages opened together cost one exec per host, not one per page.
    pub async fn host_status(
        &self,
        username: &str,
        names: &[String],
        max_age: Duration,
        wait: Duration,
    ) -> Result<Vec<(String, std::result::Result<HostFacts, String>)>> {
        check_username(username)?;
        let hosts: Vec<&HostConfig> = self
            .config
            .hosts
            .iter()
            .filter(|h| names.is_empty() || names.iter().any(|n| n == h.display_name()))
            .collect();
        let targets = hosts
            .iter()
            .map(|h| self.target(h, username))
            .collect::<Result<Vec<_>>>()?;
        let results = futures_join(hosts.iter().zip(&targets).map(|(h, t)| async move {
            // A host marked down is shown as such, not asked again.
            if h.drain {
                return Err(hosts::DRAINING.to_string());
            }
            if let Some(why) = self.host_down(t) {
                return Err(why);
            }
            let key = (h.display_name().to_string(), t.user.clone());
            let cell = match self.status.lock() {
                Ok(mut cache) => {
                    cache.retain(|_, (at, _)| at.elapsed() < max_age);
                    cache
                        .entry(key)
                        .or_insert_with(|| (Instant::now(), StatusCell::default()))
                        .1
                        .clone()
                }
                Err(_) => StatusCell::default(),
            };
            cell.get_or_init(|| async {
                match tokio::time::timeout(wait, self.host_facts(t, None)).await {
                    Ok(Ok(f)) => Ok(f),
                    Ok(Err(e)) => Err(short_reason(&e)),
                    Err(_) => Err(format!("no answer within {wait:?}")),
                }
            })
            .await
            .clone()
        }))
        .await;
        Ok(hosts
            .iter()
            .map(|h| h.display_name().to_string())
            .zip(results)
            .collect())
    }
}
