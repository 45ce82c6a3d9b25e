//! State: the catalog behind a lock (the control plane is not a hot
//! path), readiness, the proxies seen (until [`PROXY_STALE`]), and the
//! control plane's metrics.

use crate::catalog::Catalog;
use crate::policy::Policy;
use almond_config::{Service, Snapshot};
use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;

/// Everything the control plane's tasks share.
pub struct State {
    /// What the sources and the store say; the catalog serves their merge.
    inputs: Mutex<Inputs>,
    catalog: Mutex<Catalog>,
    sync: Mutex<Sync>,
    proxies: Mutex<BTreeMap<String, ProxySeen>>,
    /// When the proxies seen were last pruned and counted (ns since
    /// `created`): once a second at most, not on every long-poll (each
    /// index change wakes every proxy: pruning on each poll was work
    /// growing with the square of the fleet, under one lock).
    proxies_pruned: std::sync::atomic::AtomicU64,
    created: Instant,
    /// The other replicas' proxies (their rosters, see `roster`), by ID.
    peers: Mutex<BTreeMap<String, PeerProxy>>,
    snapshots: Mutex<SnapshotCache>,
    /// How far this replica has read the policy store: the Consul index of
    /// its last read of every policy (0 with a file store, or before the
    /// first). Sent with each snapshot, so that a proxy that moves to a
    /// replica behind the one it left does not go back in time.
    policy_stamp: std::sync::atomic::AtomicU64,
    /// Metrics.
    pub metrics: Metrics,
    /// Largest body read from Consul, a proxy's `/metrics` or Prometheus
    /// (`max_body_bytes`).
    pub max_body: usize,
    /// Where rollout and guard events go (`notify`), when webhooks are configured.
    pub notify: Option<crate::notify::Notifier>,
}

#[derive(Default)]
struct Inputs {
    sources: BTreeMap<String, Service>,
    /// Per service and subset: instances the source knows, healthy or
    /// not (only sources that drop unhealthy ones report it).
    registered: BTreeMap<String, BTreeMap<String, usize>>,
    policies: BTreeMap<String, Policy>,
    /// Per service: the store stamp (Consul `ModifyIndex`, file
    /// `revision`) this replica's last write replaced. A read of the store
    /// that shows the service at that stamp or older began before the
    /// write landed: the written policy stays until a read shows it.
    written_over: BTreeMap<String, u64>,
    /// Per service: the allow-list read from Consul intentions, which
    /// replaces the policy's (`source.consul.intentions`).
    intentions: BTreeMap<String, almond_config::Authz>,
    /// Proxies following (seen within `PROXY_STALE`; 0 before the first):
    /// what `scope: fleet` limits are divided by.
    fleet: usize,
    /// When services were last re-served for a new `fleet` count.
    fleet_served_at: Option<Instant>,
    /// A count that came within [`FLEET_SETTLE`] of the last is due then.
    fleet_due: bool,
}

/// The first-sync mark of a service's intentions (no service name has a
/// `:`).
fn intentions_key(name: &str) -> String {
    format!("intentions:{name}")
}

impl Inputs {
    /// What proxies get for `service`: the source's, with the policy
    /// applied, and the intentions' allow-list over both.
    fn served(&self, name: &str, service: Service) -> Service {
        let mut served = match self.policies.get(name) {
            Some(policy) => policy.apply(service),
            None => service,
        };
        if let Some(authz) = self.intentions.get(name) {
            served.authz = Some(authz.clone());
        }
        for guard in &mut served.guards {
            if let Some(limit) = &mut guard.limit {
                *limit = limit.shared(self.fleet);
            }
        }
        served
    }

    /// Does `name` (as served) have a `scope: fleet` limit?
    fn has_fleet_limit(&self, name: &str) -> bool {
        let guards = match self.policies.get(name).and_then(|p| p.guards.as_ref()) {
            Some(g) => g,
            None => match self.sources.get(name) {
                Some(s) => &s.guards,
                None => return false,
            },
        };
        guards.iter().any(|g| {
            g.limit
                .as_ref()
                .is_some_and(|l| l.scope == almond_config::LimitScope::Fleet)
        })
    }
}

#[derive(Default)]
struct Sync {
    catalog: bool,
    /// The policy store has been read once (splits are known).
    policies: bool,
    pending: HashSet<String>,
    ready: bool,
}

/// Serialized snapshots of the current index, by the `since` they answer
/// (0 for the full one).
#[derive(Default)]
struct SnapshotCache {
    index: u64,
    by_since: HashMap<u64, Arc<OnceCell<(u64, Bytes)>>>,
}

/// A proxy, as its long-polls show it.
#[derive(Debug, Clone)]
pub struct ProxySeen {
    /// Its admin address (for the watcher's scrapes).
    pub admin: String,
    /// The index it last asked from.
    pub index: u64,
    /// When it last asked.
    pub seen: Instant,
    /// Another admin address this ID asked from, when it went back and
    /// forth between the two: two proxies share the ID (`proxy_id`), one
    /// of them is counted and scraped at a time.
    pub shared_with: Option<String>,
    /// The admin address it asked from before its last change of address.
    before: Option<String>,
}

/// A proxy another replica sees (its roster, see `roster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProxy {
    /// Its admin address, as that replica scrapes it.
    pub admin: String,
    /// The replica it follows.
    pub replica: String,
}

/// Most serialized snapshots kept for one index (by the index a proxy
/// asks from).
const MAX_CACHED_SNAPSHOTS: usize = 64;

/// Most proxies recorded at once (each seen within `PROXY_STALE`).
pub const MAX_PROXIES: usize = 10_000;

/// How often the proxies seen are pruned and counted, at most.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Proxies not seen for this long are forgotten (and so not scraped).
pub const PROXY_STALE: std::time::Duration = std::time::Duration::from_secs(90);

/// Fleet-wide limits are shared out anew at most this often: proxies
/// joining one by one (a control plane's restart: every proxy comes back
/// within seconds) would each move the index and wake every waiting
/// long-poll, work growing with the square of the fleet. A count that
/// changes meanwhile is taken at the next proxy's poll after it.
const FLEET_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The control plane's own metrics.
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// `almond_control_snapshot_index`.
    pub index: IntGauge,
    /// `almond_control_services`.
    pub services: IntGauge,
    /// `almond_control_consul_up`.
    pub consul_up: IntGauge,
    /// `almond_control_consul_errors_total`.
    pub consul_errors: IntCounter,
    /// `almond_control_consul_watches`: blocking queries held open, one
    /// per followed service (each one connection to the agent).
    pub consul_watches: IntGauge,
    /// `almond_control_long_polls` (waiting now).
    pub long_polls: IntGauge,
    /// `almond_control_snapshots_sent_total`.
    pub snapshots_sent: IntCounter,
    /// `almond_rollout_step{service}`: canary percent of the current step.
    pub rollout_step: IntGaugeVec,
    /// `almond_rollout_verdicts_total{service, verdict}`.
    pub verdicts: IntCounterVec,
    /// `almond_rollbacks_total{service}`.
    pub rollbacks: IntCounterVec,
    /// `almond_control_refused_total{request}`: requests refused for their
    /// credentials (`change`, `snapshot`).
    pub refused: IntCounterVec,
    /// `almond_control_notify_dropped_total`: events not queued (full).
    pub notify_dropped: IntCounter,
    /// `almond_control_notify_failed_total`: posts that failed every try.
    pub notify_failed: IntCounter,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let rollout_step = IntGaugeVec::new(
            Opts::new(
                "almond_rollout_step",
                "Canary percent of the rollout in force (0 after a rollback).",
            ),
            &["service"],
        )?;
        let verdicts = IntCounterVec::new(
            Opts::new("almond_rollout_verdicts_total", "Rollout step verdicts."),
            &["service", "verdict"],
        )?;
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "almond_rollbacks_total",
                "Rollouts rolled back by the watcher.",
            ),
            &["service"],
        )?;
        registry.register(Box::new(rollout_step.clone()))?;
        registry.register(Box::new(verdicts.clone()))?;
        registry.register(Box::new(rollbacks.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "almond_control_refused_total",
                "API requests refused for a missing or wrong credential.",
            ),
            &["request"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        // Both series from the start, so a first refusal is an increase.
        for request in ["change", "snapshot", "read"] {
            refused.with_label_values(&[request]);
        }
        let m = Metrics {
            refused,
            notify_dropped: counter(
                "almond_control_notify_dropped_total",
                "Rollout events not queued for the webhooks (queue full).",
            )?,
            notify_failed: counter(
                "almond_control_notify_failed_total",
                "Rollout event posts to a webhook that failed every try.",
            )?,
            rollout_step,
            verdicts,
            rollbacks,
            index: gauge(
                "almond_control_snapshot_index",
                "Index of the served state.",
            )?,
            services: gauge("almond_control_services", "Services served.")?,
            consul_up: gauge("almond_control_consul_up", "1 while Consul answers.")?,
            consul_watches: gauge(
                "almond_control_consul_watches",
                "Consul health watches (blocking queries, one connection each) of the services followed.",
            )?,
            consul_errors: counter(
                "almond_control_consul_errors_total",
                "Failed Consul queries.",
            )?,
            long_polls: gauge("almond_control_long_polls", "Snapshot long-polls waiting.")?,
            snapshots_sent: counter(
                "almond_control_snapshots_sent_total",
                "Snapshots (full or delta) sent to proxies.",
            )?,
            registry,
        };
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }
}

impl Metrics {
    /// Sets a service's current rollout step.
    pub fn rollout_step(&self, service: &str, percent: u32) {
        self.rollout_step
            .with_label_values(&[service])
            .set(i64::from(percent));
    }

    /// Counts a verdict.
    pub fn verdict(&self, service: &str, verdict: &str) {
        self.verdicts.with_label_values(&[service, verdict]).inc();
    }

    /// Counts a rollback.
    pub fn rollback(&self, service: &str) {
        self.rollbacks.with_label_values(&[service]).inc();
    }

    /// A `file` source: the Consul families are not served (nothing
    /// queries Consul), so that `almond_control_consul_up`'s alert
    /// (`AlmondConsulUnreachable`) sees control planes that follow Consul
    /// alone, as the proxy's `almond_control_connected` is not served in
    /// static mode.
    pub fn without_consul(&self) {
        let _ = (self.registry).unregister(Box::new(self.consul_up.clone()));
        let _ = (self.registry).unregister(Box::new(self.consul_watches.clone()));
        let _ = (self.registry).unregister(Box::new(self.consul_errors.clone()));
    }

    /// A service in the catalog: its rollback counter is served from now
    /// on, at 0, so a first rollback is an increase (`AlmondRollback`).
    pub fn know_service(&self, service: &str) {
        self.rollbacks.with_label_values(&[service]);
    }

    /// Drops the rollout series of a service gone from the catalog: the
    /// services of a preview deploy per pull request would otherwise keep
    /// theirs for the life of the process.
    pub fn forget_service(&self, service: &str) {
        let _ = self.rollout_step.remove_label_values(&[service]);
        let _ = self.rollbacks.remove_label_values(&[service]);
        for verdict in ["pass", "fail", "inconclusive"] {
            let _ = self.verdicts.remove_label_values(&[service, verdict]);
        }
    }
}

impl State {
    /// Fresh state.
    pub fn new() -> Result<State, prometheus::Error> {
        Ok(State {
            inputs: Mutex::new(Inputs::default()),
            catalog: Mutex::new(Catalog::new()),
            sync: Mutex::new(Sync::default()),
            proxies: Mutex::new(BTreeMap::new()),
            proxies_pruned: std::sync::atomic::AtomicU64::new(0),
            created: Instant::now(),
            peers: Mutex::new(BTreeMap::new()),
            snapshots: Mutex::new(SnapshotCache::default()),
            policy_stamp: std::sync::atomic::AtomicU64::new(0),
            metrics: Metrics::new()?,
            max_body: 64 * 1024 * 1024,
            notify: None,
        })
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        // A panic while holding the lock leaves a consistent catalog (every
        // method finishes its writes before it can panic), so go on.
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync(&self) -> std::sync::MutexGuard<'_, Sync> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inputs(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a service from a source.
    pub fn set_service(&self, name: &str, service: Service, source_index: u64) {
        self.metrics.know_service(name);
        let mut inputs = self.inputs();
        inputs.sources.insert(name.to_owned(), service.clone());
        let served = inputs.served(name, service);
        let mut catalog = self.catalog();
        drop(inputs);
        if catalog.set(name, served, source_index) {
            tracing::info!(service = name, index = catalog.index(), "service updated");
        }
        self.publish(&catalog);
        drop(catalog);
        let mut sync = self.sync();
        sync.pending.remove(name);
        if Self::check_ready(&mut sync) {
            drop(sync);
            self.catalog().wake();
        }
    }

    /// Notes how many instances per subset the source knows for a
    /// service, healthy or not (the `total` of `almond status`).
    pub fn set_registered(&self, name: &str, per_subset: BTreeMap<String, usize>) {
        self.inputs().registered.insert(name.to_owned(), per_subset);
    }

    /// Per subset of a served service: (healthy endpoints, instances the
    /// source knows). Without a count from the source, every endpoint
    /// served is all there is.
    pub fn endpoint_counts(&self, name: &str) -> BTreeMap<String, (usize, usize)> {
        let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        if let Some(svc) = self.catalog().service(name) {
            for e in &svc.endpoints {
                out.entry(e.subset.clone()).or_default().0 += 1;
            }
        }
        let registered = self.inputs().registered.get(name).cloned();
        for (subset, counts) in out.iter_mut() {
            counts.1 = counts.0;
            if let Some(n) = registered.as_ref().and_then(|r| r.get(subset)) {
                counts.1 = counts.1.max(*n);
            }
        }
        for (subset, n) in registered.into_iter().flatten() {
            out.entry(subset).or_insert((0, n));
        }
        out
    }

    /// Admin addresses of the proxies seen within `fresh` (the ones worth
    /// scraping), this replica's and the other replicas' (a proxy in
    /// both, as it moves, once).
    pub fn proxy_admins(&self, fresh: std::time::Duration) -> Vec<String> {
        let own = self.proxies();
        let peers = self.peer_proxies();
        let mut admins: Vec<String> = own
            .values()
            .filter(|p| !p.admin.is_empty() && p.seen.elapsed() < fresh)
            .map(|p| p.admin.clone())
            .collect();
        admins.extend(
            (peers.into_iter())
                .filter(|(id, p)| !p.admin.is_empty() && !own.contains_key(id))
                .map(|(_, p)| p.admin),
        );
        admins
    }

    /// The proxies the other replicas see, by ID (a proxy that follows
    /// this replica too may be among them, as it moves).
    pub fn peer_proxies(&self) -> BTreeMap<String, PeerProxy> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This replica's live proxies, ID to admin address (its roster).
    pub fn own_roster(&self) -> BTreeMap<String, String> {
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        proxies.retain(|_, p| p.seen.elapsed() < PROXY_STALE);
        (proxies.iter())
            .map(|(id, p)| (id.clone(), p.admin.clone()))
            .collect()
    }

    /// Takes the other replicas' live proxies (their rosters); the fleet
    /// they make with this replica's is what `scope: fleet` limits are
    /// divided by.
    pub fn set_peer_proxies(self: &Arc<Self>, peers: BTreeMap<String, PeerProxy>) {
        let mut held = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if *held == peers {
            return;
        }
        *held = peers;
        drop(held);
        let live = self.live_proxies();
        self.set_fleet(live);
    }

    /// Removes a service.
    pub fn remove_service(&self, name: &str, source_index: u64) {
        let mut inputs = self.inputs();
        inputs.sources.remove(name);
        inputs.registered.remove(name);
        let mut catalog = self.catalog();
        drop(inputs);
        if catalog.remove(name, source_index) {
            tracing::info!(service = name, index = catalog.index(), "service removed");
            self.metrics.forget_service(name);
        }
        self.publish(&catalog);
        drop(catalog);
        let mut sync = self.sync();
        sync.pending.remove(name);
        sync.pending.remove(&intentions_key(name));
    }

    /// Replaces every policy (from the store) and re-serves the services
    /// whose policy changed.
    pub fn set_policies(&self, policies: BTreeMap<String, Policy>, source_index: u64) {
        self.change_policies(|all, _| *all = policies, source_index, true);
    }

    /// Sets every policy from a read of the store, each with its stamp
    /// (Consul `ModifyIndex`, file `revision`): a service this replica
    /// wrote after the read began (its stamp no newer than the one the
    /// write replaced) keeps the written policy, so a slow read does not
    /// put an older split back, even briefly.
    pub fn set_read_policies(&self, read: BTreeMap<String, (Policy, u64)>, source_index: u64) {
        self.change_policies(
            |all, written_over| {
                let mut next = BTreeMap::new();
                for (name, (policy, stamp)) in read {
                    match written_over.get(&name) {
                        Some(&over) if stamp <= over => {
                            if let Some(kept) = all.remove(&name) {
                                next.insert(name, kept);
                            }
                        }
                        _ => {
                            written_over.remove(&name);
                            next.insert(name, policy);
                        }
                    }
                }
                // Written here, not in the read at all: a new key the
                // read began before.
                for name in written_over.keys() {
                    if let Some(kept) = all.remove(name) {
                        next.entry(name.clone()).or_insert(kept);
                    }
                }
                *all = next;
            },
            source_index,
            true,
        );
    }

    /// Sets one service's policy after this replica wrote it to the store
    /// over `stamp` (the check-and-set token it was read with).
    pub fn set_written_policy(&self, name: &str, policy: Policy, stamp: u64) {
        self.change_policies(
            |all, written_over| {
                let over = written_over.entry(name.to_owned()).or_insert(stamp);
                *over = (*over).max(stamp);
                all.insert(name.to_owned(), policy);
            },
            0,
            false,
        );
    }

    /// Sets one service's policy (after a successful store write).
    pub fn set_policy(&self, name: &str, policy: Policy, source_index: u64) {
        self.change_policies(
            |all, _| {
                all.insert(name.to_owned(), policy);
            },
            source_index,
            false,
        );
    }

    /// Changes the policies with `change` and re-serves the services whose
    /// policy changed. The change is made under the lock the services are
    /// served from: two writers that each read the policies, changed their
    /// own and put them back would lose the first one's change. `read`:
    /// the change is a read of the whole store (the first one is part of
    /// the first full sync; one service's policy written here is not).
    fn change_policies(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Policy>, &mut BTreeMap<String, u64>),
        source_index: u64,
        read: bool,
    ) {
        let mut inputs = self.inputs();
        let inputs_ref = &mut *inputs;
        change(&mut inputs_ref.policies, &mut inputs_ref.written_over);
        let mut catalog = self.catalog();
        for (name, service) in &inputs.sources {
            let served = inputs.served(name, service.clone());
            if catalog.set(name, served, source_index) {
                tracing::info!(service = %name, index = catalog.index(), "policy applied");
            }
        }
        self.publish(&catalog);
        drop(catalog);
        drop(inputs);
        if !read {
            return;
        }
        // Ready only once the policies are in the catalog.
        let mut sync = self.sync();
        sync.policies = true;
        if Self::check_ready(&mut sync) {
            drop(sync);
            self.catalog().wake();
        }
    }

    /// Consul intentions will give `name` its allow-list: until they are
    /// first read it admits nobody (a list that failed to load is not an
    /// open door), and the first full sync waits for them.
    pub fn expect_intentions(&self, name: &str) {
        self.inputs()
            .intentions
            .insert(name.to_owned(), almond_config::Authz::default());
        self.sync().pending.insert(intentions_key(name));
    }

    /// Sets (or, with `None`, clears) the allow-list Consul intentions give
    /// `name`, and re-serves it when it changed.
    pub fn set_intentions(&self, name: &str, authz: Option<almond_config::Authz>) {
        self.apply_intentions(name, authz);
        let mut sync = self.sync();
        if sync.pending.remove(&intentions_key(name)) && Self::check_ready(&mut sync) {
            drop(sync);
            self.catalog().wake();
        }
    }

    fn apply_intentions(&self, name: &str, authz: Option<almond_config::Authz>) {
        let mut inputs = self.inputs();
        let changed = match &authz {
            Some(a) => {
                inputs
                    .intentions
                    .insert(name.to_owned(), a.clone())
                    .as_ref()
                    != Some(a)
            }
            None => inputs.intentions.remove(name).is_some(),
        };
        let Some(service) = inputs.sources.get(name).cloned().filter(|_| changed) else {
            return;
        };
        let served = inputs.served(name, service);
        let mut catalog = self.catalog();
        drop(inputs);
        if catalog.set(name, served, 0) {
            tracing::info!(service = name, index = catalog.index(), authz = ?authz, "intentions applied");
        }
        self.publish(&catalog);
    }

    /// Every policy as last seen.
    pub fn policies(&self) -> BTreeMap<String, Policy> {
        self.inputs().policies.clone()
    }

    /// One service's policy as last seen.
    pub fn policy(&self, name: &str) -> Option<Policy> {
        self.inputs().policies.get(name).cloned()
    }

    /// One service as its source describes it (before policy).
    pub fn source_service(&self, name: &str) -> Option<Service> {
        self.inputs().sources.get(name).cloned()
    }

    fn publish(&self, catalog: &Catalog) {
        self.metrics.index.set(catalog.index() as i64);
        self.metrics.services.set(catalog.services().count() as i64);
    }

    /// Is the service known?
    pub fn has_service(&self, name: &str) -> bool {
        self.catalog().service(name).is_some()
    }

    /// A source will deliver this service before the first sync is done.
    pub fn expect_service(&self, name: &str) {
        self.sync().pending.insert(name.to_owned());
    }

    /// The source's list of services has been read.
    pub fn catalog_synced(&self) {
        let mut sync = self.sync();
        sync.catalog = true;
        if Self::check_ready(&mut sync) {
            drop(sync);
            self.catalog().wake();
        }
    }

    /// Marks the first full sync done once it is; `true` when it just
    /// happened: the caller wakes the long-polls that wait for it (nothing
    /// else may change in the catalog to wake them).
    fn check_ready(sync: &mut Sync) -> bool {
        if sync.catalog && sync.policies && sync.pending.is_empty() && !sync.ready {
            sync.ready = true;
            tracing::info!("first full sync done: ready");
            return true;
        }
        false
    }

    /// Ready after the first full sync.
    pub fn is_ready(&self) -> bool {
        self.sync().ready
    }

    /// The snapshot a proxy at `since` of `epoch` needs.
    pub fn snapshot_since(&self, epoch: u64, since: u64) -> Snapshot {
        self.catalog().snapshot_since(epoch, since)
    }

    /// The snapshot a proxy at `since` of `epoch` needs, serialized: its
    /// index and JSON. Long-polls woken by one change ask for the same
    /// few snapshots, so each is cut and serialized once per index and
    /// shared (a thousand proxies reconnecting at once hold one copy).
    pub async fn snapshot_json(&self, epoch: u64, since: u64) -> serde_json::Result<(u64, Bytes)> {
        let cell = {
            let catalog = self.catalog();
            let key = if catalog.needs_full(epoch, since) {
                0
            } else {
                since
            };
            let mut cache = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
            if cache.index != catalog.index() {
                cache.index = catalog.index();
                cache.by_since.clear();
            }
            // Proxies hold a few indexes; any number a client names is
            // answered, but only so many are kept (each may be a whole
            // copy of the catalog until the next change).
            match cache.by_since.get(&key) {
                Some(cell) => cell.clone(),
                None if cache.by_since.len() >= MAX_CACHED_SNAPSHOTS => Arc::default(),
                None => cache.by_since.entry(key).or_default().clone(),
            }
        };
        // A change between the lookup and the cut makes the snapshot newer
        // than its key's index; it is still exactly right from `since`.
        cell.get_or_try_init(|| async {
            let snap = self.snapshot_since(epoch, since);
            Ok((snap.index, Bytes::from(serde_json::to_vec(&snap)?)))
        })
        .await
        .cloned()
    }

    /// How far this replica has read the policy store (see `policy_stamp`).
    pub fn policy_stamp(&self) -> u64 {
        self.policy_stamp.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Raises the policy stamp to `index`: a read of every policy, or a
    /// write of this replica's. Never lowered: a read that answers below a
    /// write of this replica's began before it (and the written policy
    /// stays, see `written_over`).
    pub fn raise_policy_stamp(&self, index: u64) {
        self.policy_stamp
            .fetch_max(index, std::sync::atomic::Ordering::AcqRel);
    }

    /// This control plane's epoch.
    pub fn epoch(&self) -> u64 {
        self.catalog().epoch()
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.catalog().index()
    }

    /// Index changes, for long-polls.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.catalog().subscribe()
    }

    /// One service.
    pub fn service(&self, name: &str) -> Option<Service> {
        self.catalog().service(name).cloned()
    }

    /// Every service.
    pub fn services(&self) -> BTreeMap<String, Service> {
        self.catalog()
            .services()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Notes a proxy's long-poll.
    pub fn saw_proxy(self: &Arc<Self>, id: &str, admin: &str, index: u64) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        // Proxies gone quiet are forgotten, so the map holds only live
        // ones: pruned (and the fleet counted) once a second at most, or
        // when the map is full.
        let now_ns = self.created.elapsed().as_nanos() as u64;
        let pruned = self
            .proxies_pruned
            .load(std::sync::atomic::Ordering::Relaxed);
        let due = now_ns.saturating_sub(pruned) >= PRUNE_EVERY.as_nanos() as u64 || pruned == 0;
        if due || proxies.len() >= MAX_PROXIES {
            proxies.retain(|_, p| p.seen.elapsed() < PROXY_STALE);
            (self.proxies_pruned).store(now_ns.max(1), std::sync::atomic::Ordering::Relaxed);
        }
        if proxies.len() >= MAX_PROXIES && !proxies.contains_key(id) {
            tracing::warn!(
                proxy = id,
                "{MAX_PROXIES} proxies seen: not recording another"
            );
            return;
        }
        let (mut before, mut shared_with) = (None, None);
        if let Some(was) = proxies.get(id) {
            (before, shared_with) = (was.before.clone(), was.shared_with.clone());
            if was.admin != admin {
                // Back to the address it left: two proxies, one ID (a
                // proxy restarted on a new port goes one way only).
                if before.as_deref() == Some(admin) && shared_with.is_none() {
                    tracing::warn!(proxy = id, admins = %format!("{admin}, {}", was.admin), "two proxies follow under one proxy ID: only one at a time is counted and scraped (set proxy_id apart)");
                    shared_with = Some(was.admin.clone());
                }
                before = Some(was.admin.clone());
            }
        }
        let new = proxies
            .insert(
                id.to_owned(),
                ProxySeen {
                    admin: admin.to_owned(),
                    index,
                    seen: Instant::now(),
                    shared_with,
                    before,
                },
            )
            .is_none();
        drop(proxies);
        // The fleet is counted when it may have changed: a new proxy, or
        // a prune.
        if new || due {
            let live = self.live_proxies();
            self.set_fleet(live);
        }
    }

    /// Notes how many proxies follow; when the number changed, re-serves
    /// the services with `scope: fleet` limits (their share changed), so
    /// the index moves and every proxy gets the new share.
    fn set_fleet(self: &Arc<Self>, live: usize) {
        let mut inputs = self.inputs();
        if inputs.fleet == live {
            return;
        }
        let names: Vec<String> = inputs
            .sources
            .keys()
            .filter(|n| inputs.has_fleet_limit(n))
            .cloned()
            .collect();
        if names.is_empty() {
            inputs.fleet = live;
            return;
        }
        if let Some(at) = (inputs.fleet_served_at).filter(|at| at.elapsed() < FLEET_SETTLE) {
            // Shared out once the spell is over, with the count then (the
            // proxies may all have polled already, and the next poll be a
            // long-poll's wait away).
            if !inputs.fleet_due {
                inputs.fleet_due = true;
                let state = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at + FLEET_SETTLE).await;
                    state.inputs().fleet_due = false;
                    let live = state.live_proxies();
                    state.set_fleet(live);
                });
            }
            return;
        }
        inputs.fleet = live;
        let mut catalog = self.catalog();
        let mut moved = false;
        for name in names {
            let Some(service) = inputs.sources.get(&name).cloned() else {
                continue;
            };
            let served = inputs.served(&name, service);
            if catalog.set(&name, served, 0) {
                moved = true;
                tracing::info!(service = %name, proxies = live, index = catalog.index(), "fleet-wide limits shared out anew");
            }
        }
        // Only a move of the index wakes the long-polls.
        if moved {
            inputs.fleet_served_at = Some(Instant::now());
        }
        self.publish(&catalog);
    }

    /// Proxies seen within `PROXY_STALE`, by this replica or (their
    /// rosters) by the others.
    fn live_proxies(&self) -> usize {
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        proxies.retain(|_, p| p.seen.elapsed() < PROXY_STALE);
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let elsewhere = peers.keys().filter(|id| !proxies.contains_key(*id)).count();
        proxies.len() + elsewhere
    }

    /// The proxies seen, by ID.
    pub fn proxies(&self) -> BTreeMap<String, ProxySeen> {
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::svc;

    #[tokio::test(start_paused = true)]
    async fn proxies_not_seen_for_proxy_stale_are_dropped() {
        let state = Arc::new(State::new().unwrap());
        state.saw_proxy("old", "127.0.0.1:4191", 1);
        tokio::time::advance(PROXY_STALE / 2).await;
        state.saw_proxy("new", "127.0.0.2:4191", 1);
        assert_eq!(state.proxies().len(), 2);
        tokio::time::advance(PROXY_STALE / 2 + std::time::Duration::from_secs(1)).await;
        // Any poll prunes: `old` was last seen PROXY_STALE + 1 s ago.
        state.saw_proxy("new", "127.0.0.2:4191", 2);
        let ids: Vec<String> = state.proxies().into_keys().collect();
        assert_eq!(ids, vec!["new".to_owned()]);
        assert_eq!(state.proxy_admins(PROXY_STALE), vec!["127.0.0.2:4191"]);
    }

    /// The other replicas' proxies are scraped and counted with this
    /// one's; a proxy on both lists (moving between replicas) once, at the
    /// address this replica saw it poll from.
    #[tokio::test]
    async fn other_replicas_proxies_count_once() {
        let state = Arc::new(State::new().unwrap());
        state.saw_proxy("a", "127.0.0.1:4191", 1);
        let peer = |admin: &str| PeerProxy {
            admin: admin.to_owned(),
            replica: "other".to_owned(),
        };
        state.set_peer_proxies(BTreeMap::from([
            ("a".to_owned(), peer("10.0.0.1:4191")),
            ("b".to_owned(), peer("10.0.0.2:4191")),
        ]));
        let mut admins = state.proxy_admins(PROXY_STALE);
        admins.sort();
        assert_eq!(admins, vec!["10.0.0.2:4191", "127.0.0.1:4191"]);
        assert_eq!(state.live_proxies(), 2);
        assert_eq!(
            state.own_roster().len(),
            1,
            "the roster is this replica's own"
        );
        state.set_peer_proxies(BTreeMap::new());
        assert_eq!(state.proxy_admins(PROXY_STALE), vec!["127.0.0.1:4191"]);
        assert_eq!(state.live_proxies(), 1);
    }

    /// A service gone from the catalog takes its rollout series with it
    /// (preview services per pull request kept theirs for good).
    #[test]
    fn a_removed_service_s_rollout_series_go() {
        let state = State::new().unwrap();
        state.set_service("pr-1234", svc(1), 10);
        state.metrics.rollout_step("pr-1234", 10);
        state.metrics.verdict("pr-1234", "pass");
        state.metrics.rollback("pr-1234");
        let text = || {
            let mut out = Vec::new();
            let families = state.metrics.registry.gather();
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(text().contains("service=\"pr-1234\""));
        // A service newly in the catalog: its rollback counter at 0 at
        // once, so a first rollback is an increase.
        state.set_service("pr-5678", svc(1), 10);
        assert!(
            text().contains("almond_rollbacks_total{service=\"pr-5678\"} 0"),
            "{}",
            text()
        );
        state.remove_service("pr-1234", 11);
        assert!(!text().contains("service=\"pr-1234\""), "{}", text());
    }

    #[tokio::test]
    async fn snapshots_are_serialized_once_per_index_and_since() {
        let state = State::new().unwrap();
        state.set_service("a", svc(1), 10);
        state.set_service("b", svc(2), 20);
        let epoch = state.epoch();
        let (i1, full1) = state.snapshot_json(epoch, 0).await.unwrap();
        let (i2, full2) = state.snapshot_json(epoch + 1, 15).await.unwrap();
        assert_eq!((i1, i2), (20, 20));
        assert_eq!(full1.as_ptr(), full2.as_ptr(), "one shared full snapshot");
        let (_, delta) = state.snapshot_json(epoch, 15).await.unwrap();
        let delta: Snapshot = serde_json::from_slice(&delta).unwrap();
        assert!(!delta.full);
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), vec!["b"]);
        // A change makes new snapshots.
        state.set_service("a", svc(3), 30);
        let (i3, full3) = state.snapshot_json(epoch, 0).await.unwrap();
        assert_eq!(i3, 30);
        let full3: Snapshot = serde_json::from_slice(&full3).unwrap();
        assert_eq!(full3.services["a"], svc(3));
        assert_eq!(full3.epoch, epoch);
    }

    /// A client asking from every index it can name gets each answered,
    /// but the cache keeps only so many (each may be a whole catalog).
    #[tokio::test]
    async fn the_snapshot_cache_is_bounded() {
        let state = State::new().unwrap();
        state.set_service("a", svc(1), 10);
        state.set_service("b", svc(2), 2_000);
        let epoch = state.epoch();
        for since in 1..1_000 {
            let (index, _) = state.snapshot_json(epoch, since).await.unwrap();
            assert_eq!(index, 2_000);
        }
        let kept = state.snapshots.lock().unwrap().by_since.len();
        assert_eq!(kept, MAX_CACHED_SNAPSHOTS);
        // What is kept is shared still.
        let (_, one) = state.snapshot_json(epoch, 1).await.unwrap();
        let (_, again) = state.snapshot_json(epoch, 1).await.unwrap();
        assert_eq!(one.as_ptr(), again.as_ptr());
    }

    /// Policies set at the same moment for different services (an
    /// operator's shift beside the watcher's rollout step) are all kept:
    /// each writer copied the policies, added its own and put the copy
    /// back, so the last one put back lost the others'.
    #[test]
    fn policies_set_at_once_are_all_kept() {
        let state = State::new().unwrap();
        let names: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
        for (port, name) in (1..).zip(&names) {
            state.set_service(name, svc(port), 1);
        }
        let start = std::sync::Barrier::new(names.len());
        for round in 1..=200 {
            std::thread::scope(|scope| {
                for name in &names {
                    let (state, start) = (&state, &start);
                    scope.spawn(move || {
                        let policy = Policy {
                            version: round,
                            ..Policy::default()
                        };
                        start.wait();
                        state.set_policy(name, policy, 0);
                    });
                }
            });
            for name in &names {
                let version = state.policy(name).map(|p| p.version);
                assert_eq!(
                    version,
                    Some(round),
                    "{name}'s policy of round {round} lost"
                );
            }
        }
    }

    /// One service's policy written by this replica before the store was
    /// first read (an operator's shift while the read fails) does not make
    /// the control plane ready: the other services' policies are not in
    /// yet, and proxies would get their services without their splits.
    #[test]
    fn a_policy_written_before_the_store_is_read_does_not_make_it_ready() {
        let state = State::new().unwrap();
        state.set_service("web", svc(1), 1);
        state.catalog_synced();
        state.set_written_policy("web", Policy::default(), 0);
        assert!(!state.is_ready(), "the store was never read");
        state.set_read_policies(BTreeMap::new(), 2);
        assert!(state.is_ready());
    }

    /// A read of the store that began before this replica's write (it
    /// shows the service at the stamp the write replaced) does not put
    /// the older policy back; a read that shows the write, or a later
    /// one, is taken.
    #[test]
    fn a_read_older_than_a_write_does_not_revert_it() {
        let state = State::new().unwrap();
        state.set_service("web", svc(1), 1);
        state.set_service("new", svc(2), 1);
        let v = |version| Policy {
            version,
            ..Policy::default()
        };
        let version = |name| state.policy(name).map(|p| p.version);
        state.set_read_policies([("web".to_owned(), (v(1), 10))].into(), 2);
        // Written over stamp 10; `new`'s key written for the first time.
        state.set_written_policy("web", v(2), 10);
        state.set_written_policy("new", v(1), 0);
        // A slow read, begun before both writes.
        state.set_read_policies([("web".to_owned(), (v(1), 10))].into(), 3);
        assert_eq!(version("web"), Some(2), "the older split came back");
        assert_eq!(version("new"), Some(1), "the new policy was dropped");
        // The reads that show the writes, then another replica's change.
        let read = [
            ("web".to_owned(), (v(2), 11)),
            ("new".to_owned(), (v(1), 12)),
        ];
        state.set_read_policies(read.into(), 4);
        state.set_read_policies([("web".to_owned(), (v(3), 13))].into(), 5);
        assert_eq!(version("web"), Some(3));
        assert_eq!(version("new"), None, "deleted elsewhere: gone");
    }

    #[tokio::test(start_paused = true)]
    async fn fleet_limits_follow_the_number_of_proxies() {
        let state = Arc::new(State::new().unwrap());
        let mut limited = svc(1);
        limited.guards = vec![serde_json::from_value(serde_json::json!({
            "match": { "path_prefix": "/x" },
            "limit": { "rate": "20/s", "burst": 10, "scope": "fleet" }
        }))
        .unwrap()];
        state.set_service("a", limited, 10);
        state.set_service("b", svc(2), 20);
        let epoch = state.epoch();
        let share = |state: &State| {
            let l = state.service("a").unwrap().guards[0].limit.clone().unwrap();
            (l.rate.to_string(), l.burst, l.shared_by)
        };
        state.saw_proxy("p1", "", 20);
        assert_eq!(share(&state), ("20/s".into(), Some(10), None));
        assert_eq!(state.index(), 20, "one proxy: nothing to share out");
        let (_, before) = state.snapshot_json(epoch, 0).await.unwrap();
        state.saw_proxy("p2", "", 20);
        assert_eq!(share(&state), ("10/s".into(), Some(5), Some(2)));
        assert_eq!(state.index(), 21);
        // The cached snapshot is not served again: the share is in the new one.
        let (i, after) = state.snapshot_json(epoch, 20).await.unwrap();
        assert_eq!(i, 21);
        assert_ne!(before, after);
        let delta: Snapshot = serde_json::from_slice(&after).unwrap();
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), vec!["a"]);
        // The same proxies polling again change nothing.
        state.saw_proxy("p1", "", 21);
        assert_eq!(state.index(), 21);
        // One goes quiet: the other gets the whole rate back.
        tokio::time::advance(PROXY_STALE / 2).await;
        state.saw_proxy("p1", "", 21);
        tokio::time::advance(PROXY_STALE / 2 + std::time::Duration::from_secs(1)).await;
        state.saw_proxy("p1", "", 21);
        assert_eq!(share(&state), ("20/s".into(), Some(10), None));
        assert_eq!(state.index(), 22);
    }

    /// A fleet coming back at once (the control plane restarted) moves
    /// the index a few times, not once a proxy: each move woke every
    /// waiting long-poll (5,350 snapshots for 100 proxies, 497 without a
    /// fleet limit). The share still ends right.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_coming_back_at_once_moves_the_index_a_few_times() {
        let state = Arc::new(State::new().unwrap());
        let mut limited = svc(1);
        limited.guards = vec![serde_json::from_value(serde_json::json!({
            "match": { "path_prefix": "/x" },
            "limit": { "rate": "100/s", "scope": "fleet" }
        }))
        .unwrap()];
        state.set_service("a", limited, 10);
        for i in 0..100 {
            state.saw_proxy(&format!("p{i}"), "", 10);
            tokio::time::advance(std::time::Duration::from_millis(20)).await;
        }
        let moves = state.index() - 10;
        assert!(moves <= 3, "the index moved {moves} times for 100 proxies");
        // No proxy polls again: the last count is shared out all the same.
        tokio::time::sleep(FLEET_SETTLE).await;
        let l = state.service("a").unwrap().guards[0].limit.clone().unwrap();
        assert_eq!(l.shared_by, Some(100));
    }
}
