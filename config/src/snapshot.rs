//! The snapshot a proxy receives from the control plane.
//!
//! Versioned by `(epoch, index)`: `epoch` names the control plane process
//! that numbered the state (random at its start), `index` orders states
//! within it. A proxy applies a snapshot whose index is higher than the one
//! it has, or any snapshot of another epoch (which is always full: indexes
//! of two epochs are not comparable). A reply is `full` (every service) or
//! a delta (only services changed since the proxy's index, plus the names
//! of every service, so removals are seen).

use crate::proxy::Service;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One long-poll answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The numbering this snapshot's index belongs to; 0 = unknown (a
    /// cache written before epochs existed).
    #[serde(default)]
    pub epoch: u64,
    /// Version of the control plane's state this reflects.
    pub index: u64,
    /// `true`: `services` is everything; `false`: only what changed.
    pub full: bool,
    /// Services (all, or those changed since the proxy's index).
    pub services: BTreeMap<String, Service>,
    /// Names of every service that exists at `index` (for deltas).
    #[serde(default)]
    pub names: Vec<String>,
}

impl Snapshot {
    /// Applies this snapshot onto `current` (the services a proxy has).
    pub fn apply_to(self, current: &BTreeMap<String, Service>) -> BTreeMap<String, Service> {
        if self.full {
            return self.services;
        }
        let mut next: BTreeMap<String, Service> = current
            .iter()
            .filter(|(name, _)| self.names.binary_search(name).is_ok())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        next.extend(self.services);
        next
    }
}

/// A snapshot as it comes over the wire: each service decoded on its own,
/// so that one a proxy cannot read (a field or value of a newer control
/// plane) is refused alone, as a service that fails validation is, not
/// with every other change.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    epoch: u64,
    index: u64,
    full: bool,
    services: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    names: Vec<String>,
}

impl Snapshot {
    /// Decodes a snapshot from JSON; the services that could not be read
    /// are left out of it and returned with why (the caller keeps the
    /// copy it had). `Err` when the snapshot itself cannot be read.
    pub fn decode(bytes: &[u8]) -> Result<(Snapshot, Vec<(String, String)>), serde_json::Error> {
        let wire: Wire = serde_json::from_slice(bytes)?;
        let mut services = BTreeMap::new();
        let mut unread = Vec::new();
        for (name, value) in wire.services {
            match serde_json::from_value::<Service>(value) {
                Ok(svc) => {
                    services.insert(name, svc);
                }
                Err(e) => unread.push((name, e.to_string())),
            }
        }
        let snapshot = Snapshot {
            epoch: wire.epoch,
            index: wire.index,
            full: wire.full,
            services,
            names: wire.names,
        };
        Ok((snapshot, unread))
    }
}
