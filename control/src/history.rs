//! History: a bounded ring per service of once-a-second live samples (rps,
//! success rate, p99 per subset), so the dashboard's chart is full when the
//! page opens; sampled by [`run`] from the watcher's source, served by the
//! API (`GET /v1/services/{svc}/history`, `GET /v1/dashboard`).

use crate::live::{summarize, SubsetLive};
use crate::state::{State, PROXY_STALE};
use crate::watcher::collect;
use almond_config::WatcherSource;
use almond_net::now_ms;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept per service: 10 minutes at one a second.
pub const CAPACITY: usize = 600;
/// The window asked of Prometheus for each sample (its scrapes are
/// seconds apart: a one-second `increase` would mostly be empty).
const PROMETHEUS_WINDOW: Duration = Duration::from_secs(10);

/// One second of a service's traffic, per subset (subsets without
/// traffic are absent).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// When the sample's window ended, Unix ms.
    pub at: u64,
    /// Per subset.
    pub subsets: BTreeMap<String, SubsetLive>,
}

/// The rings, one per service, each at most [`CAPACITY`] samples.
#[derive(Debug, Default)]
pub struct History {
    rings: Mutex<BTreeMap<String, VecDeque<Sample>>>,
}

impl History {
    /// Appends `sample` to `service`'s ring, dropping the oldest past
    /// [`CAPACITY`].
    pub fn push(&self, service: &str, sample: Sample) {
        let Ok(mut rings) = self.rings.lock() else {
            return;
        };
        let ring = rings.entry(service.to_owned()).or_default();
        if ring.len() >= CAPACITY {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Drops the rings of services that are gone.
    pub fn retain(&self, services: &BTreeMap<String, almond_config::Service>) {
        if let Ok(mut rings) = self.rings.lock() {
            rings.retain(|name, _| services.contains_key(name));
        }
    }

    /// `service`'s samples taken after `since` (Unix ms), oldest first.
    pub fn since(&self, service: &str, since: u64) -> Vec<Sample> {
        let Ok(rings) = self.rings.lock() else {
            return Vec::new();
        };
        rings
            .get(service)
            .map(|ring| ring.iter().filter(|s| s.at > since).cloned().collect())
            .unwrap_or_default()
    }

    /// `service`'s newest sample.
    pub fn last(&self, service: &str) -> Option<Sample> {
        let rings = self.rings.lock().ok()?;
        rings.get(service).and_then(|ring| ring.back().cloned())
    }
}

/// Samples every service once per [`INTERVAL`], forever (aborted with the
/// control plane). With `direct`, every fresh proxy's `/metrics` is
/// fetched once per tick and diffed with the previous tick's; with
/// `prometheus`, each sample is the rates over the last 10 s.
pub async fn run(state: Arc<State>, history: Arc<History>, source: WatcherSource) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The previous tick's counters, per service then per proxy, and the
    // proxies it read (one without a service's series had none of it).
    let mut then: BTreeMap<String, BTreeMap<String, collect::Totals>> = BTreeMap::new();
    let mut then_read: BTreeSet<String> = BTreeSet::new();
    let mut then_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let services = state.services();
        history.retain(&services);
        then.retain(|name, _| services.contains_key(name));
        match &source {
            WatcherSource::Direct => {
                let admins = state.proxy_admins(PROXY_STALE);
                // Each body parsed once as it comes in, for every service
                // in it, and let go.
                let read = |body: &str| collect::parse_services(body, None);
                let parsed = collect::fetch_with(&admins, state.max_body, read).await;
                let now_at = tokio::time::Instant::now();
                let seconds = (now_at - then_at).as_secs_f64();
                then_at = now_at;
                let at = now_ms();
                let read_now: BTreeSet<String> = parsed.keys().cloned().collect();
                let mut by_service: BTreeMap<String, BTreeMap<String, collect::Totals>> =
                    BTreeMap::new();
                for (admin, per_service) in parsed {
                    for (name, totals) in per_service {
                        by_service
                            .entry(name)
                            .or_default()
                            .insert(admin.clone(), totals);
                    }
                }
                for name in services.keys() {
                    // A proxy read last tick without the service's series
                    // had none of its traffic: zero then, not missing (else
                    // its first requests are lost). Not one empty entry
                    // per proxy and service, each tick.
                    let now = by_service.remove(name).unwrap_or_default();
                    if let Some(before) = then.get(name) {
                        let window = collect::delta_known(&now, before, Some(&then_read));
                        history.push(
                            name,
                            Sample {
                                at,
                                subsets: summarize(&window, seconds),
                            },
                        );
                    }
                    then.insert(name.clone(), now);
                }
                then_read = read_now;
            }
            WatcherSource::Prometheus(url) => {
                for name in services.keys() {
                    let subsets =
                        crate::live::from_prometheus(url, name, PROMETHEUS_WINDOW, state.max_body)
                            .await;
                    history.push(
                        name,
                        Sample {
                            at: now_ms(),
                            subsets,
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_the_newest_capacity_samples() {
        let history = History::default();
        for at in 1..=(CAPACITY as u64 + 5) {
            let subsets = BTreeMap::new();
            history.push("s", Sample { at, subsets });
        }
        let all = history.since("s", 0);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all.first().map(|s| s.at), Some(6));
        assert_eq!(history.since("s", CAPACITY as u64 + 3).len(), 2);
        assert_eq!(history.last("s").map(|s| s.at), Some(CAPACITY as u64 + 5));
        assert!(history.since("other", 0).is_empty());
    }
}
