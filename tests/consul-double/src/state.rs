//! The double's cluster state: catalog (nodes, service instances, checks),
//! KV store with tombstones, and the Raft-like index bookkeeping of
//! API.md §2.3.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use crate::{
    CheckDef, KvEntry, NodeDef, RegisterError, ServiceDef, Status, TaggedAddress, Weights,
};

/// Consul's `serfHealth` node check.
pub(crate) const SERF_CHECK_ID: &str = "serfHealth";
/// Prefix of per-service maintenance checks.
pub(crate) const SERVICE_MAINT_PREFIX: &str = "_service_maintenance:";
/// Node maintenance check ID.
pub(crate) const NODE_MAINT_ID: &str = "_node_maintenance";
/// Default maintenance reason (agent.go `defaultServiceMaintReason`).
pub(crate) const DEFAULT_SERVICE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
/// Default node maintenance reason (agent.go `defaultNodeMaintReason`).
pub(crate) const DEFAULT_NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Node {
    pub id: String,
    pub name: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Instance {
    pub node: String,
    pub id: String,
    pub name: String,
    pub kind: String,
    pub tags: Vec<String>,
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Instance {
    fn same_content(&self, other: &Instance) -> bool {
        let mut a = self.clone();
        a.create_index = other.create_index;
        a.modify_index = other.modify_index;
        a == *other
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Check {
    pub node: String,
    pub check_id: String,
    pub name: String,
    pub status: Status,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub ttl: Option<Duration>,
    pub ttl_gen: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Check {
    fn same_content(&self, other: &Check) -> bool {
        let mut a = self.clone();
        a.create_index = other.create_index;
        a.modify_index = other.modify_index;
        a.ttl_gen = other.ttl_gen;
        a == *other
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvItem {
    pub value: Vec<u8>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    pub session: Option<String>,
}

/// How a KV PUT is conditioned.
#[derive(Clone, Debug)]
pub(crate) enum KvMode {
    Plain,
    Cas(u64),
    Acquire(String),
    Release(String),
}

/// A TTL timer to (re)arm after a state change.
#[derive(Clone, Debug)]
pub(crate) struct TtlArm {
    pub node: String,
    pub check_id: String,
    pub gen: u64,
    pub ttl: Duration,
}

/// One `/v1/health/service` element before serialisation.
#[derive(Clone, Debug)]
pub(crate) struct HealthRow {
    pub node: Node,
    pub inst: Instance,
    pub checks: Vec<Check>,
}

/// One `/v1/catalog/service` element before serialisation.
#[derive(Clone, Debug)]
pub(crate) struct CatalogRow {
    pub node: Node,
    pub inst: Instance,
}

pub(crate) struct State {
    /// The Raft-like index: advanced by every write.
    pub index: u64,
    /// Max index of any catalog table (nodes, services, checks).
    pub catalog_index: u64,
    /// Index of the services table (`/v1/catalog/services`).
    pub services_index: u64,
    /// Last time any service lost its last instance.
    pub extinction_index: u64,
    /// Per service name, while the service has instances.
    pub service_indexes: HashMap<String, u64>,
    pub nodes: BTreeMap<String, Node>,
    pub instances: BTreeMap<(String, String), Instance>,
    pub checks: BTreeMap<(String, String), Check>,
    pub kv: BTreeMap<String, KvItem>,
    pub tombstones: BTreeMap<String, u64>,
    /// Max index of the KV + tombstones tables.
    pub kv_index: u64,
    pub datacenter: String,
    pub agent_node: String,
    node_counter: u64,
}

fn node_uuid(n: u64) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", 0x6e6f_6465u64 + n, n)
}

impl State {
    pub(crate) fn new(datacenter: &str, agent_node: &str, agent_address: &str) -> State {
        let mut s = State {
            index: 1,
            catalog_index: 1,
            services_index: 1,
            extinction_index: 0,
            service_indexes: HashMap::new(),
            nodes: BTreeMap::new(),
            instances: BTreeMap::new(),
            checks: BTreeMap::new(),
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            kv_index: 1,
            datacenter: datacenter.to_string(),
            agent_node: agent_node.to_string(),
            node_counter: 0,
        };
        let mut agent = NodeDef::new(agent_node, agent_address);
        agent
            .meta
            .insert("consul-network-segment".into(), String::new());
        s.upsert_node(agent);
        s
    }

    pub(crate) fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn touch_service(&mut self, name: &str, idx: u64) {
        self.service_indexes.insert(name.to_string(), idx);
        self.catalog_index = self.catalog_index.max(idx);
    }

    fn service_exists(&self, name: &str) -> bool {
        self.instances.values().any(|i| i.name == name)
    }

    /// After removals: a service without instances loses its index and
    /// records the extinction.
    fn settle_service(&mut self, name: &str, idx: u64) {
        if self.service_exists(name) {
            self.touch_service(name, idx);
        } else if self.service_indexes.remove(name).is_some() {
            self.extinction_index = idx;
            self.catalog_index = self.catalog_index.max(idx);
        }
    }

    fn touch_services_on_node(&mut self, node: &str, idx: u64) {
        let names: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.node == node)
            .map(|i| i.name.clone())
            .collect();
        for n in names {
            self.touch_service(&n, idx);
        }
        self.catalog_index = self.catalog_index.max(idx);
    }

    /// Creates or updates a node (plus its `serfHealth` check).
    pub(crate) fn upsert_node(&mut self, def: NodeDef) -> u64 {
        let idx = self.next_index();
        let mut tagged = def.tagged_addresses.clone();
        if tagged.is_empty() && !def.address.is_empty() {
            let v6 = def.address.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6());
            let fam = if v6 { "ipv6" } else { "ipv4" };
            for k in ["lan", "wan"] {
                tagged.insert(k.to_string(), def.address.clone());
                tagged.insert(format!("{k}_{fam}"), def.address.clone());
            }
        }
        let existing = self.nodes.get(&def.name).cloned();
        let id = match (&def.id, &existing) {
            (Some(id), _) => id.clone(),
            (None, Some(e)) => e.id.clone(),
            (None, None) => {
                self.node_counter += 1;
                node_uuid(self.node_counter)
            }
        };
        let node = Node {
            id,
            name: def.name.clone(),
            address: def.address.clone(),
            datacenter: self.datacenter.clone(),
            tagged_addresses: tagged,
            meta: def.meta.clone(),
            create_index: existing.as_ref().map_or(idx, |e| e.create_index),
            modify_index: idx,
        };
        if let Some(e) = &existing {
            let mut cmp = node.clone();
            cmp.modify_index = e.modify_index;
            if cmp == *e {
                return e.modify_index;
            }
        }
        self.nodes.insert(def.name.clone(), node);
        let key = (def.name.clone(), SERF_CHECK_ID.to_string());
        self.checks.entry(key).or_insert_with(|| Check {
            node: def.name.clone(),
            check_id: SERF_CHECK_ID.into(),
            name: "Serf Health Status".into(),
            status: Status::Passing,
            notes: String::new(),
            output: "Agent alive and reachable".into(),
            service_id: String::new(),
            service_name: String::new(),
            service_tags: Vec::new(),
            ttl: None,
            ttl_gen: 0,
            create_index: idx,
            modify_index: idx,
        });
        self.catalog_index = idx;
        self.touch_services_on_node(&def.name, idx);
        idx
    }

    /// Removes a node with all its services and checks.
    pub(crate) fn remove_node(&mut self, name: &str) -> bool {
        if !self.nodes.contains_key(name) {
            return false;
        }
        let idx = self.next_index();
        self.nodes.remove(name);
        let names: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.node == name)
            .map(|i| i.name.clone())
            .collect();
        self.instances.retain(|(n, _), _| n != name);
        self.checks.retain(|(n, _), _| n != name);
        if !names.is_empty() {
            self.services_index = idx;
        }
        for n in names {
            self.settle_service(&n, idx);
        }
        self.catalog_index = idx;
        true
    }

    /// Agent-style registration (API.md §7): validation, defaults, upsert by
    /// ID, check statuses preserved across re-registration. Returns the
    /// service ID and the TTL timers to arm.
    pub(crate) fn register(
        &mut self,
        def: ServiceDef,
        replace_existing_checks: bool,
    ) -> Result<(String, Vec<TtlArm>), RegisterError> {
        validate_def(&def)?;
        let weights = def.weights.unwrap_or_default();
        let id = if def.id.is_empty() {
            def.name.clone()
        } else {
            def.id.clone()
        };
        let node_name = def.node.clone().unwrap_or_else(|| self.agent_node.clone());
        if !self.nodes.contains_key(&node_name) {
            let addr = if def.address.is_empty() {
                "127.0.0.1".to_string()
            } else {
                def.address.clone()
            };
            self.upsert_node(NodeDef::new(&node_name, &addr));
        }
        let mut tagged = def.tagged_addresses.clone();
        if let Ok(ip) = def.address.parse::<IpAddr>() {
            let fam = if ip.is_ipv6() { "ipv6" } else { "ipv4" };
            for k in ["lan", "wan"] {
                tagged
                    .entry(format!("{k}_{fam}"))
                    .or_insert_with(|| TaggedAddress {
                        address: def.address.clone(),
                        port: def.port,
                    });
            }
        }
        let key = (node_name.clone(), id.clone());
        let existing = self.instances.get(&key).cloned();
        let mut inst = Instance {
            node: node_name.clone(),
            id: id.clone(),
            name: def.name.clone(),
            kind: def.kind.clone(),
            tags: def.tags.clone(),
            address: def.address.clone(),
            port: def.port,
            meta: def.meta.clone(),
            tagged_addresses: tagged,
            weights,
            enable_tag_override: def.enable_tag_override,
            create_index: 0,
            modify_index: 0,
        };

        // Checks, with Consul's default IDs and names.
        let n_checks = def.checks.len();
        let mut new_checks: Vec<Check> = Vec::new();
        for (i, c) in def.checks.iter().enumerate() {
            let check_id = match &c.id {
                Some(cid) if !cid.is_empty() => cid.clone(),
                _ if n_checks > 1 => format!("service:{id}:{}", i + 1),
                _ => format!("service:{id}"),
            };
            let name = match &c.name {
                Some(n) if !n.is_empty() => n.clone(),
                _ => format!("Service '{}' check", def.name),
            };
            let prev = self.checks.get(&(node_name.clone(), check_id.clone()));
            // Re-registration keeps the current status and output.
            let (status, output) = match prev {
                Some(p) if p.service_id == id => (p.status, p.output.clone()),
                _ => (c.status.unwrap_or(Status::Critical), c.output.clone()),
            };
            new_checks.push(Check {
                node: node_name.clone(),
                check_id,
                name,
                status,
                notes: c.notes.clone(),
                output,
                service_id: id.clone(),
                service_name: def.name.clone(),
                service_tags: def.tags.clone(),
                ttl: c.ttl,
                ttl_gen: prev.map_or(0, |p| p.ttl_gen),
                create_index: 0,
                modify_index: 0,
            });
        }
        // Checks of this service that would be removed (replace-existing-checks)
        // or that must follow a tag change.
        let own_existing: Vec<Check> = self
            .checks
            .values()
            .filter(|c| c.node == node_name && c.service_id == id)
            .cloned()
            .collect();
        let mut removed: Vec<String> = Vec::new();
        let mut retagged: Vec<Check> = Vec::new();
        for c in &own_existing {
            if new_checks.iter().any(|n| n.check_id == c.check_id) {
                continue;
            }
            if replace_existing_checks && !c.check_id.starts_with(SERVICE_MAINT_PREFIX) {
                removed.push(c.check_id.clone());
            } else if c.service_tags != def.tags || c.service_name != def.name {
                let mut c2 = c.clone();
                c2.service_tags = def.tags.clone();
                c2.service_name = def.name.clone();
                retagged.push(c2);
            }
        }

        let unchanged = existing.as_ref().is_some_and(|e| inst.same_content(e))
            && removed.is_empty()
            && retagged.is_empty()
            && new_checks.iter().all(|n| {
                self.checks
                    .get(&(node_name.clone(), n.check_id.clone()))
                    .is_some_and(|c| n.same_content(c))
            });
        let idx = self.next_index();
        let mut arms = Vec::new();
        if unchanged {
            return Ok((id, arms));
        }
        inst.create_index = existing.as_ref().map_or(idx, |e| e.create_index);
        inst.modify_index = idx;
        let old_name = existing.as_ref().map(|e| e.name.clone());
        self.instances.insert(key, inst);
        for cid in removed {
            self.checks.remove(&(node_name.clone(), cid));
        }
        for mut c in retagged.into_iter().chain(new_checks) {
            let ck = (node_name.clone(), c.check_id.clone());
            c.create_index = self.checks.get(&ck).map_or(idx, |p| p.create_index);
            c.modify_index = idx;
            if let Some(ttl) = c.ttl {
                c.ttl_gen += 1;
                arms.push(TtlArm {
                    node: node_name.clone(),
                    check_id: c.check_id.clone(),
                    gen: c.ttl_gen,
                    ttl,
                });
            }
            self.checks.insert(ck, c);
        }
        self.services_index = idx;
        self.touch_service(&def.name, idx);
        if let Some(old) = old_name {
            if old != def.name {
                self.settle_service(&old, idx);
            }
        }
        Ok((id, arms))
    }

    /// Finds the node of a service instance by ID (agent node first).
    pub(crate) fn find_instance(&self, id: &str) -> Option<(String, String)> {
        let agent_key = (self.agent_node.clone(), id.to_string());
        if self.instances.contains_key(&agent_key) {
            return Some(agent_key);
        }
        self.instances.keys().find(|(_, i)| i == id).cloned()
    }

    /// Removes a service instance and its checks.
    pub(crate) fn deregister(&mut self, id: &str) -> bool {
        let Some(key) = self.find_instance(id) else {
            return false;
        };
        let idx = self.next_index();
        let Some(inst) = self.instances.remove(&key) else {
            return false;
        };
        self.checks
            .retain(|(n, _), c| !(n == &key.0 && c.service_id == inst.id));
        self.services_index = idx;
        self.settle_service(&inst.name, idx);
        self.catalog_index = idx;
        true
    }

    /// Sets status (and output if given) of every check with that ID.
    /// Returns whether any matched.
    pub(crate) fn set_check(
        &mut self,
        node: Option<&str>,
        check_id: &str,
        status: Status,
        output: Option<&str>,
    ) -> bool {
        let keys: Vec<(String, String)> = self
            .checks
            .keys()
            .filter(|(n, c)| c == check_id && node.is_none_or(|want| want == n))
            .cloned()
            .collect();
        if keys.is_empty() {
            return false;
        }
        let idx = self.next_index();
        for k in keys {
            let Some(c) = self.checks.get_mut(&k) else {
                continue;
            };
            let new_output = output.map_or_else(|| c.output.clone(), str::to_string);
            if c.status == status && c.output == new_output {
                continue;
            }
            c.status = status;
            c.output = new_output;
            c.modify_index = idx;
            let (node, service) = (c.node.clone(), c.service_name.clone());
            if service.is_empty() {
                self.touch_services_on_node(&node, idx);
            } else {
                self.touch_service(&service, idx);
            }
        }
        true
    }

    /// Adds (or replaces) a node-level check.
    pub(crate) fn add_node_check(&mut self, node: &str, def: CheckDef) -> Option<TtlArm> {
        if !self.nodes.contains_key(node) {
            self.upsert_node(NodeDef::new(node, "127.0.0.1"));
        }
        let idx = self.next_index();
        let check_id = def.id.clone().unwrap_or_else(|| "node-check".into());
        let key = (node.to_string(), check_id.clone());
        let prev = self.checks.get(&key);
        let mut c = Check {
            node: node.to_string(),
            check_id: check_id.clone(),
            name: def.name.clone().unwrap_or_else(|| check_id.clone()),
            status: def.status.unwrap_or(Status::Critical),
            notes: def.notes.clone(),
            output: def.output.clone(),
            service_id: String::new(),
            service_name: String::new(),
            service_tags: Vec::new(),
            ttl: def.ttl,
            ttl_gen: prev.map_or(0, |p| p.ttl_gen) + 1,
            create_index: prev.map_or(idx, |p| p.create_index),
            modify_index: idx,
        };
        let arm = c.ttl.map(|ttl| TtlArm {
            node: node.to_string(),
            check_id: check_id.clone(),
            gen: c.ttl_gen,
            ttl,
        });
        c.modify_index = idx;
        self.checks.insert(key, c);
        self.touch_services_on_node(node, idx);
        arm
    }

    /// Removes a check by ID (any node).
    pub(crate) fn remove_check(&mut self, check_id: &str) -> bool {
        let keys: Vec<(String, String)> = self
            .checks
            .keys()
            .filter(|(_, c)| c == check_id)
            .cloned()
            .collect();
        if keys.is_empty() {
            return false;
        }
        let idx = self.next_index();
        for k in keys {
            if let Some(c) = self.checks.remove(&k) {
                if c.service_name.is_empty() {
                    self.touch_services_on_node(&c.node, idx);
                } else {
                    self.touch_service(&c.service_name, idx);
                }
            }
        }
        true
    }

    /// Service maintenance: adds/removes `_service_maintenance:<id>`.
    /// `None` when the service is unknown.
    pub(crate) fn service_maintenance(
        &mut self,
        service_id: &str,
        enable: bool,
        reason: &str,
    ) -> Option<()> {
        let key = self.find_instance(service_id)?;
        let inst = self.instances.get(&key)?.clone();
        let check_id = format!("{SERVICE_MAINT_PREFIX}{service_id}");
        let ck = (key.0.clone(), check_id.clone());
        if enable == self.checks.contains_key(&ck) {
            return Some(());
        }
        let idx = self.next_index();
        if enable {
            let notes = if reason.is_empty() {
                DEFAULT_SERVICE_MAINT_REASON.to_string()
            } else {
                reason.to_string()
            };
            self.checks.insert(
                ck,
                Check {
                    node: key.0.clone(),
                    check_id,
                    name: "Service Maintenance Mode".into(),
                    status: Status::Critical,
                    notes,
                    output: String::new(),
                    service_id: inst.id.clone(),
                    service_name: inst.name.clone(),
                    service_tags: inst.tags.clone(),
                    ttl: None,
                    ttl_gen: 0,
                    create_index: idx,
                    modify_index: idx,
                },
            );
        } else {
            self.checks.remove(&ck);
        }
        self.touch_service(&inst.name, idx);
        Some(())
    }

    /// Node maintenance on the agent node (`_node_maintenance`).
    pub(crate) fn node_maintenance(&mut self, enable: bool, reason: &str) {
        let node = self.agent_node.clone();
        let ck = (node.clone(), NODE_MAINT_ID.to_string());
        if enable == self.checks.contains_key(&ck) {
            return;
        }
        let idx = self.next_index();
        if enable {
            let notes = if reason.is_empty() {
                DEFAULT_NODE_MAINT_REASON.to_string()
            } else {
                reason.to_string()
            };
            self.checks.insert(
                ck,
                Check {
                    node: node.clone(),
                    check_id: NODE_MAINT_ID.into(),
                    name: "Node Maintenance Mode".into(),
                    status: Status::Critical,
                    notes,
                    output: String::new(),
                    service_id: String::new(),
                    service_name: String::new(),
                    service_tags: Vec::new(),
                    ttl: None,
                    ttl_gen: 0,
                    create_index: idx,
                    modify_index: idx,
                },
            );
        } else {
            self.checks.remove(&ck);
        }
        self.touch_services_on_node(&node, idx);
    }

    /// A TTL update from the agent API. Err(404 body) / Err(500 body).
    pub(crate) fn ttl_update(
        &mut self,
        check_id: &str,
        status: Status,
        output: &str,
    ) -> Result<Option<TtlArm>, (u16, String)> {
        let key = {
            let agent_key = (self.agent_node.clone(), check_id.to_string());
            if self.checks.contains_key(&agent_key) {
                agent_key
            } else {
                match self.checks.keys().find(|(_, c)| c == check_id) {
                    Some(k) => k.clone(),
                    None => {
                        return Err((
                            404,
                            format!(
                                "Unknown check ID \"{check_id}\". Ensure that the check ID is passed, not the check name."
                            ),
                        ))
                    }
                }
            }
        };
        let Some(c) = self.checks.get(&key) else {
            return Err((404, format!("Unknown check ID \"{check_id}\".")));
        };
        let Some(ttl) = c.ttl else {
            return Err((
                500,
                format!("CheckID \"{check_id}\" does not have associated TTL"),
            ));
        };
        let output = truncate_output(output);
        self.set_check(Some(&key.0), check_id, status, Some(&output));
        let c = self.checks.get_mut(&key).ok_or((404, String::new()))?;
        c.ttl_gen += 1;
        Ok(Some(TtlArm {
            node: key.0,
            check_id: check_id.to_string(),
            gen: c.ttl_gen,
            ttl,
        }))
    }

    /// TTL timer fired: flips to critical unless the check was updated since.
    pub(crate) fn ttl_expire(&mut self, node: &str, check_id: &str, gen: Option<u64>) -> bool {
        let key = (node.to_string(), check_id.to_string());
        let Some(c) = self.checks.get(&key) else {
            return false;
        };
        if gen.is_some_and(|g| g != c.ttl_gen) {
            return false;
        }
        let output = if c.output.is_empty() {
            "TTL expired".to_string()
        } else if c.output.starts_with("TTL expired") {
            c.output.clone()
        } else {
            format!(
                "TTL expired (last output before timeout follows): {}",
                c.output
            )
        };
        self.set_check(Some(node), check_id, Status::Critical, Some(&output))
    }

    /// Idempotent write: the service index moves, content stays.
    pub(crate) fn bump_without_change(&mut self, service: &str) -> u64 {
        let idx = self.next_index();
        if self.service_exists(service) {
            self.touch_service(service, idx);
        } else {
            self.extinction_index = idx;
            self.catalog_index = idx;
        }
        idx
    }

    /// Snapshot restore: every stored index is clamped to `to`.
    pub(crate) fn reset_index(&mut self, to: u64) {
        let to = to.max(1);
        let clamp = |x: &mut u64| *x = (*x).min(to);
        self.index = to;
        clamp(&mut self.catalog_index);
        clamp(&mut self.services_index);
        clamp(&mut self.extinction_index);
        clamp(&mut self.kv_index);
        self.service_indexes.values_mut().for_each(clamp);
        for n in self.nodes.values_mut() {
            clamp(&mut n.create_index);
            clamp(&mut n.modify_index);
        }
        for i in self.instances.values_mut() {
            clamp(&mut i.create_index);
            clamp(&mut i.modify_index);
        }
        for c in self.checks.values_mut() {
            clamp(&mut c.create_index);
            clamp(&mut c.modify_index);
        }
        for e in self.kv.values_mut() {
            clamp(&mut e.create_index);
            clamp(&mut e.modify_index);
        }
        self.tombstones.values_mut().for_each(clamp);
    }

    // ---- reads --------------------------------------------------------

    /// Index of `/v1/health/service/:name` and `/v1/catalog/service/:name`.
    pub(crate) fn service_index(&self, name: &str) -> u64 {
        match self.service_indexes.get(name) {
            Some(i) => *i,
            None if self.extinction_index > 0 => self.extinction_index,
            None => self.catalog_index,
        }
        .max(1)
    }

    fn checks_for(&self, inst: &Instance) -> Vec<Check> {
        let on_node = self
            .checks
            .range((inst.node.clone(), String::new())..)
            .take_while(|((n, _), _)| *n == inst.node)
            .map(|(_, c)| c);
        let mut node_level = Vec::new();
        let mut own = Vec::new();
        for c in on_node {
            if c.service_id.is_empty() {
                node_level.push(c.clone());
            } else if c.service_id == inst.id {
                own.push(c.clone());
            }
        }
        node_level.extend(own);
        node_level
    }

    fn instances_of<'a>(
        &'a self,
        name: &'a str,
        tags: &'a [String],
        node_meta: &'a [(String, String)],
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.values().filter(move |i| {
            // Consul indexes service names in lower case: `billing` finds
            // `Billing`'s instances too.
            i.name.to_lowercase() == name.to_lowercase()
                && tags.iter().all(|t| {
                    let t = t.to_lowercase();
                    i.tags.iter().any(|x| x.to_lowercase() == t)
                })
                && node_meta.iter().all(|(k, v)| {
                    self.nodes
                        .get(&i.node)
                        .is_some_and(|n| n.meta.get(k) == Some(v))
                })
        })
    }

    pub(crate) fn health_rows(
        &self,
        name: &str,
        tags: &[String],
        node_meta: &[(String, String)],
    ) -> Vec<HealthRow> {
        self.instances_of(name, tags, node_meta)
            .filter_map(|i| {
                Some(HealthRow {
                    node: self.nodes.get(&i.node)?.clone(),
                    inst: i.clone(),
                    checks: self.checks_for(i),
                })
            })
            .collect()
    }

    /// Checks bound to instances of a service (`/v1/health/checks/:name`).
    pub(crate) fn service_checks(&self, name: &str) -> Vec<Check> {
        self.checks
            .values()
            .filter(|c| c.service_name == name && !c.service_id.is_empty())
            .cloned()
            .collect()
    }

    pub(crate) fn catalog_rows(
        &self,
        name: &str,
        tags: &[String],
        node_meta: &[(String, String)],
    ) -> Vec<CatalogRow> {
        self.instances_of(name, tags, node_meta)
            .filter_map(|i| {
                Some(CatalogRow {
                    node: self.nodes.get(&i.node)?.clone(),
                    inst: i.clone(),
                })
            })
            .collect()
    }

    pub(crate) fn all_catalog_rows(&self, node_meta: &[(String, String)]) -> Vec<CatalogRow> {
        self.instances
            .values()
            .filter(|i| {
                node_meta.iter().all(|(k, v)| {
                    self.nodes
                        .get(&i.node)
                        .is_some_and(|n| n.meta.get(k) == Some(v))
                })
            })
            .filter_map(|i| {
                Some(CatalogRow {
                    node: self.nodes.get(&i.node)?.clone(),
                    inst: i.clone(),
                })
            })
            .collect()
    }

    // ---- KV -----------------------------------------------------------

    pub(crate) fn kv_entry(&self, key: &str) -> Option<KvEntry> {
        self.kv.get(key).map(|e| KvEntry {
            key: key.to_string(),
            value: e.value.clone(),
            flags: e.flags,
            create_index: e.create_index,
            modify_index: e.modify_index,
            lock_index: e.lock_index,
            session: e.session.clone(),
        })
    }

    /// Index of a single-key read.
    pub(crate) fn kv_key_index(&self, key: &str) -> u64 {
        self.kv
            .get(key)
            .map_or(self.kv_index, |e| e.modify_index)
            .max(1)
    }

    /// Index of a prefix read: max ModifyIndex incl. tombstones; table
    /// index when the prefix is empty or nothing matches.
    pub(crate) fn kv_prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.kv_index.max(1);
        }
        let live = self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        let idx = live.max(dead);
        if idx == 0 {
            self.kv_index.max(1)
        } else {
            idx
        }
    }

    pub(crate) fn kv_list(&self, prefix: &str) -> Vec<KvEntry> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| self.kv_entry(k))
            .collect()
    }

    /// PUT. Returns whether the write happened (CAS/lock semantics).
    pub(crate) fn kv_set(&mut self, key: &str, value: Vec<u8>, flags: u64, mode: KvMode) -> bool {
        let idx = self.next_index();
        let existing = self.kv.get(key).cloned();
        let (mut session, mut lock_index) = existing
            .as_ref()
            .map_or((None, 0), |e| (e.session.clone(), e.lock_index));
        match &mode {
            KvMode::Plain => {}
            KvMode::Cas(0) => {
                if existing.is_some() {
                    return false;
                }
            }
            KvMode::Cas(n) => match &existing {
                Some(e) if e.modify_index == *n => {}
                _ => return false,
            },
            KvMode::Acquire(s) => match &session {
                Some(cur) if cur != s => return false,
                Some(_) => {}
                None => {
                    session = Some(s.clone());
                    lock_index += 1;
                }
            },
            KvMode::Release(s) => {
                if session.as_deref() != Some(s.as_str()) {
                    return false;
                }
                session = None;
            }
        }
        let item = KvItem {
            value,
            flags,
            create_index: existing.as_ref().map_or(idx, |e| e.create_index),
            modify_index: idx,
            lock_index,
            session,
        };
        if let Some(e) = &existing {
            let mut cmp = item.clone();
            cmp.modify_index = e.modify_index;
            if cmp == *e {
                // identical write: skipped by the state store
                return true;
            }
        }
        self.kv.insert(key.to_string(), item);
        self.kv_index = idx;
        true
    }

    /// Idempotent KV write that still moves ModifyIndex (older servers).
    pub(crate) fn kv_touch(&mut self, key: &str) -> Option<u64> {
        let idx = self.next_index();
        let e = self.kv.get_mut(key)?;
        e.modify_index = idx;
        self.kv_index = idx;
        Some(idx)
    }

    /// DELETE. Returns the response boolean.
    pub(crate) fn kv_delete(&mut self, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        let idx = self.next_index();
        if recurse {
            let keys: Vec<String> = self
                .kv
                .range(key.to_string()..)
                .take_while(|(k, _)| k.starts_with(key))
                .map(|(k, _)| k.clone())
                .collect();
            if keys.is_empty() {
                return true;
            }
            for k in keys {
                self.kv.remove(&k);
                self.tombstones.insert(k, idx);
            }
            self.kv_index = idx;
            return true;
        }
        match (self.kv.get(key), cas) {
            (None, _) => return true,
            (Some(_), Some(0)) => return false,
            (Some(e), Some(n)) if e.modify_index != n => return false,
            _ => {}
        }
        self.kv.remove(key);
        self.tombstones.insert(key.to_string(), idx);
        self.kv_index = idx;
        true
    }

    pub(crate) fn reap_tombstones(&mut self) {
        self.tombstones.clear();
    }
}

/// The agent's validation of a service definition (400 bodies).
pub(crate) fn validate_def(def: &ServiceDef) -> Result<(), RegisterError> {
    if def.name.is_empty() {
        return Err(RegisterError("Missing service name".into()));
    }
    if def.address == "0.0.0.0" || def.address == "::" || def.address == "[::]" {
        return Err(RegisterError("Invalid service address".into()));
    }
    let weights = def.weights.unwrap_or_default();
    validate_weights(weights.passing as i64, weights.warning as i64)?;
    validate_meta(&def.meta).map_err(|e| RegisterError(format!("Invalid Service Meta: {e}")))?;
    Ok(())
}

/// structs.go `ValidateWeights`, wrapped as the agent does.
pub(crate) fn validate_weights(passing: i64, warning: i64) -> Result<(), RegisterError> {
    let err = |m: &str| Err(RegisterError(format!("Invalid Weights: {m}")));
    if passing < 1 {
        return err("Passing must be greater than 0");
    }
    if warning < 0 {
        return err("Warning must be greater or equal than 0");
    }
    if passing > 65535 || warning > 65535 {
        return err("DNS Weight must be between 0 and 65535");
    }
    Ok(())
}

/// structs.go `ValidateServiceMetadata` / `validateMetaPair`.
pub(crate) fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), String> {
    if meta.len() > 64 {
        return Err("Node metadata cannot contain more than 64 key/value pairs".into());
    }
    for (k, v) in meta {
        let pair_err = |e: &str| Err(format!("Couldn't load metadata pair ('{k}', '{v}'): {e}"));
        if k.is_empty() {
            return pair_err("Key cannot be blank");
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return pair_err("Key contains invalid characters");
        }
        if k.len() > 128 {
            return pair_err("Key is too long (limit: 128 characters)");
        }
        if k.starts_with("consul-") {
            return pair_err("Key prefix 'consul-' is reserved for internal use");
        }
        if v.len() > 512 {
            return pair_err("Value is too long (limit: 512 characters)");
        }
    }
    Ok(())
}

/// Check output limit (default `OutputMaxSize` 4096).
pub(crate) fn truncate_output(output: &str) -> String {
    const MAX: usize = 4096;
    if output.len() <= MAX {
        return output.to_string();
    }
    let mut cut = MAX;
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{} ... (captured {} of {} bytes)",
        &output[..cut],
        cut,
        output.len()
    )
}
