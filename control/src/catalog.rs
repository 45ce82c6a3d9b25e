//! Catalog: the services the control plane serves, each with the index at
//! which it last changed, and the snapshots (full or delta) cut from it.
//!
//! Index rule: a change gets `max(source index, catalog index + 1)`, so
//! indexes never go backwards, not even after a Consul restore. Indexes are
//! this process's own (the `+ 1` makes them depend on the order answers
//! arrived in), so every snapshot carries the catalog's random `epoch`: a
//! proxy of another epoch (a previous run, another replica) gets a full
//! snapshot, never a delta cut by another numbering.

use almond_config::{Service, Snapshot};
use std::collections::BTreeMap;
use tokio::sync::watch;

/// One service and when it last changed.
#[derive(Debug, Clone)]
struct Entry {
    service: Service,
    modified: u64,
}

/// The served state, and a channel that announces its index.
pub struct Catalog {
    services: BTreeMap<String, Entry>,
    /// This process's numbering: indexes of another epoch (a previous run,
    /// another replica) say nothing about this catalog's changes.
    epoch: u64,
    index: u64,
    notify: watch::Sender<u64>,
}

impl Catalog {
    /// An empty catalog at index 0.
    pub fn new() -> Catalog {
        Catalog {
            services: BTreeMap::new(),
            epoch: fastrand::u64(1..),
            index: 0,
            notify: watch::channel(0).0,
        }
    }

    /// Subscribes to index changes (for long-polls).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// This catalog's epoch (never 0).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sets a service; returns whether anything changed.
    pub fn set(&mut self, name: &str, service: Service, source_index: u64) -> bool {
        if self
            .services
            .get(name)
            .is_some_and(|e| e.service == service)
        {
            return false;
        }
        let modified = source_index.max(self.index + 1);
        self.services
            .insert(name.to_owned(), Entry { service, modified });
        self.bump(modified);
        true
    }

    /// Removes a service; returns whether it was there.
    pub fn remove(&mut self, name: &str, source_index: u64) -> bool {
        if self.services.remove(name).is_none() {
            return false;
        }
        let modified = source_index.max(self.index + 1);
        self.bump(modified);
        true
    }

    /// Wakes every subscriber (readiness changed: long-polls re-check
    /// whether they can answer). The index stays, except that an empty catalog moves to index 1 here, so that proxies (which
    /// apply only snapshots above the index they have, 0 at first) take
    /// even an empty first state.
    pub fn wake(&mut self) {
        self.index = self.index.max(1);
        self.notify.send_replace(self.index);
    }

    fn bump(&mut self, modified: u64) {
        self.index = self.index.max(modified);
        self.notify.send_replace(self.index);
    }

    /// Whether a proxy at `since` of `epoch` can only be given everything.
    pub fn needs_full(&self, epoch: u64, since: u64) -> bool {
        since == 0 || since > self.index || epoch != self.epoch
    }

    /// One service, if known.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name).map(|e| &e.service)
    }

    /// Every service by name.
    pub fn services(&self) -> impl Iterator<Item = (&String, &Service)> {
        self.services.iter().map(|(k, e)| (k, &e.service))
    }

    /// What a proxy at `since` of epoch `epoch` needs: everything when
    /// `since` is 0, ahead of us or of another epoch, else the services
    /// changed after it and the names of all services.
    pub fn snapshot_since(&self, epoch: u64, since: u64) -> Snapshot {
        let full = self.needs_full(epoch, since);
        let services = self
            .services
            .iter()
            .filter(|(_, e)| full || e.modified > since)
            .map(|(k, e)| (k.clone(), e.service.clone()))
            .collect();
        Snapshot {
            epoch: self.epoch,
            index: self.index,
            full,
            services,
            names: self.services.keys().cloned().collect(),
        }
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::new()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A service with one endpoint on `port`.
    pub(crate) fn svc(port: u16) -> Service {
        serde_json::from_value(serde_json::json!({
            "endpoints": [{ "addr": format!("127.0.0.1:{port}") }]
        }))
        .unwrap()
    }

    #[test]
    fn deltas_carry_only_what_changed_and_every_name() {
        let mut c = Catalog::new();
        c.set("a", svc(1), 10);
        c.set("b", svc(2), 11);
        assert!(!c.set("b", svc(2), 12), "identical content is no change");
        assert_eq!(c.index(), 11);
        c.set("a", svc(3), 15);
        let delta = c.snapshot_since(c.epoch(), 11);
        assert!(!delta.full);
        assert_eq!(delta.index, 15);
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(delta.names, vec!["a", "b"]);
        // A proxy applying the delta ends with the full state.
        let mut proxy = c.snapshot_since(c.epoch(), 0).services;
        proxy.insert("a".into(), svc(1));
        let applied = delta.apply_to(&proxy);
        assert_eq!(applied, c.snapshot_since(c.epoch(), 0).services);
    }

    #[test]
    fn indexes_never_go_backwards() {
        let mut c = Catalog::new();
        c.set("a", svc(1), 100);
        // Consul restored from an older snapshot: its index is lower now.
        c.set("a", svc(2), 40);
        assert_eq!(c.index(), 101);
        c.remove("a", 41);
        assert_eq!(c.index(), 102);
        let delta = c.snapshot_since(c.epoch(), 101);
        assert!(delta.services.is_empty() && delta.names.is_empty());
    }

    #[test]
    fn another_epoch_gets_everything() {
        let mut c = Catalog::new();
        c.set("a", svc(1), 10);
        c.set("b", svc(2), 20);
        let other = c.epoch().wrapping_add(1);
        let snap = c.snapshot_since(other, 15);
        assert!(snap.full);
        assert_eq!(snap.epoch, c.epoch());
        assert_eq!(snap.services.len(), 2);
        // Index 0 (a proxy that has nothing) is full whatever its epoch.
        assert!(c.snapshot_since(c.epoch(), 0).full);
        assert!(!c.snapshot_since(c.epoch(), 15).full);
    }
}
