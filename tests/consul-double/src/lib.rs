//! An in-process test double for the parts of Consul's HTTP API that
//! almond's control plane uses: catalog, health, agent registration and TTL
//! checks, KV, ACL tokens, and blocking queries.
//!
//! Behaviour follows `shared/consul/API.md` (section 13 is the checklist);
//! JSON bodies have the field names and order of the payloads in
//! `shared/consul/fixtures/`.
//!
//! ```no_run
//! # async fn demo() {
//! use almond_consul_double::{CheckDef, ConsulDouble, ServiceDef, Status};
//! use std::time::Duration;
//!
//! let consul = ConsulDouble::builder().acl_token(Some("secret")).start().await;
//! consul
//!     .register(
//!         ServiceDef::new("web")
//!             .id("web-1")
//!             .address("10.0.0.1")
//!             .port(8080)
//!             .check(CheckDef::ttl(Duration::from_secs(10))),
//!     )
//!     .unwrap();
//! consul.set_check("service:web-1", Status::Passing);
//! println!("{}/v1/health/service/web", consul.url());
//! # }
//! ```
//!
//! The server runs on `127.0.0.1:0` on the caller's tokio runtime and stops
//! when the last clone of the handle is dropped. Time is tokio's clock, so
//! blocking waits and TTLs follow `tokio::time::pause()`.
//!
//! # Routes
//!
//! `GET /v1/health/service/:name`, `GET /v1/health/checks/:name`,
//! `GET /v1/catalog/services`, `GET /v1/catalog/service/:name`,
//! `GET /v1/catalog/datacenters`, `PUT /v1/agent/service/register`,
//! `PUT /v1/agent/service/deregister/:id`,
//! `PUT /v1/agent/service/maintenance/:id`, `PUT /v1/agent/maintenance`,
//! `PUT /v1/agent/check/{pass,warn,fail,update}/:id`,
//! `GET|PUT|DELETE /v1/kv/:key`, `GET /v1/status/leader`,
//! `GET /v1/connect/intentions/match` (`by=destination`; intentions are set
//! with [`ConsulDouble::set_intention`]; no blocking). Anything else is
//! 404; a wrong method is 405 with `Allow`.
//!
//! # Known simplifications
//!
//! - One datacenter; `?dc=` naming another answers 500 `No path to
//!   datacenter`. `near` and `cached` do not change results (`cached` adds
//!   `X-Cache: MISS`). No gzip.
//! - Filters: go-bexpr subset (no `matches`); unknown selectors are 500.
//! - Checks are never executed: HTTP/TCP/script checks keep their status
//!   until [`ConsulDouble::set_check`]. Check output changes reach the
//!   catalog immediately (no `check_update_interval`).
//! - Sessions are not modelled: `?acquire=` accepts any session ID.
//! - Intentions: only `GET /v1/connect/intentions/match`, in the default
//!   namespace, sources local or of a cluster peer; no L7 permissions. A
//!   name no intention applies to is answered `null`, as Consul's handler
//!   passes its state's nil slice on.
//! - Without a leader, agent endpoints keep working (agent-local); default
//!   and consistent reads and KV writes fail at once instead of after
//!   `rpc_hold_timeout`.
//! - JSON bodies carry exactly the fields of the fixtures (so e.g.
//!   `/v1/catalog/service` has no `ServiceWeights`, health entries no raft
//!   indexes); `Namespace: "default"` is emitted like the fixtures unless
//!   [`ConsulDoubleBuilder::namespace`] is `None`.

mod acl;
mod filter;
mod server;
mod state;
mod util;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use acl::{Access, AclPolicy};

use crate::acl::AclConfig;
use crate::state::{State, TtlArm};

/// A health check status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// `passing`
    Passing,
    /// `warning`
    Warning,
    /// `critical`
    Critical,
}

impl Status {
    /// The wire form: `passing`, `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Parses the wire form (exact, lowercase).
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

impl Default for Status {
    /// Critical: the initial status of a new check.
    fn default() -> Self {
        Status::Critical
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DNS/load-balancing weights of a service instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weights {
    /// Weight while all checks pass (default 1).
    pub passing: u32,
    /// Weight while some check warns (default 1).
    pub warning: u32,
}

impl Default for Weights {
    /// `{Passing: 1, Warning: 1}`, Consul's default.
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// A service tagged address (`{"Address": ..., "Port": ...}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaggedAddress {
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
}

/// A check definition, embedded in a [`ServiceDef`] or added to a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckDef {
    /// `CheckID`; defaults to `service:<id>` (or `service:<id>:<n>`).
    pub id: Option<String>,
    /// `Name`; defaults to `Service '<name>' check`.
    pub name: Option<String>,
    /// Initial status; defaults to critical.
    pub status: Option<Status>,
    /// TTL: makes this a TTL check that expires to critical.
    pub ttl: Option<Duration>,
    /// `Notes`.
    pub notes: String,
    /// Initial `Output`.
    pub output: String,
}

impl CheckDef {
    /// A TTL check.
    pub fn ttl(ttl: Duration) -> CheckDef {
        CheckDef {
            ttl: Some(ttl),
            ..CheckDef::default()
        }
    }

    /// A non-TTL check (script/HTTP/TCP stand-in) with a fixed initial
    /// status; change it with [`ConsulDouble::set_check`].
    pub fn with_status(status: Status) -> CheckDef {
        CheckDef {
            status: Some(status),
            ..CheckDef::default()
        }
    }

    /// Sets the check ID.
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }

    /// Sets the check name.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Sets the initial status.
    pub fn status(mut self, status: Status) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the notes.
    pub fn notes(mut self, notes: &str) -> Self {
        self.notes = notes.to_string();
        self
    }
}

/// A service instance to register (agent semantics: `ID` defaults to the
/// name, weights to 1/1, checks start critical unless given a status).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDef {
    /// Instance ID; empty = the name.
    pub id: String,
    /// Service name (required).
    pub name: String,
    /// Service address; empty means "use the node address".
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Service metadata.
    pub meta: BTreeMap<String, String>,
    /// Tagged addresses (`lan_ipv4`/`wan_ipv4` are added for IP addresses).
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    /// Weights; `None` = `{Passing: 1, Warning: 1}`.
    pub weights: Option<Weights>,
    /// Node; `None` = the agent's node. Unknown nodes are created.
    pub node: Option<String>,
    /// Service kind (`""` for a plain service, `connect-proxy`, ...).
    pub kind: String,
    /// `EnableTagOverride`.
    pub enable_tag_override: bool,
    /// Checks bound to the instance.
    pub checks: Vec<CheckDef>,
}

impl ServiceDef {
    /// A service named `name` (ID = name, port 0).
    pub fn new(name: &str) -> ServiceDef {
        ServiceDef {
            name: name.to_string(),
            ..ServiceDef::default()
        }
    }
    /// Sets the instance ID.
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self
    }
    /// Sets the address.
    pub fn address(mut self, address: &str) -> Self {
        self.address = address.to_string();
        self
    }
    /// Sets the port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Adds a tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_string());
        self
    }
    /// Adds a metadata pair.
    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }
    /// Adds a tagged address.
    pub fn tagged_address(mut self, name: &str, address: &str, port: u16) -> Self {
        self.tagged_addresses.insert(
            name.to_string(),
            TaggedAddress {
                address: address.to_string(),
                port,
            },
        );
        self
    }
    /// Sets the weights.
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weights = Some(Weights { passing, warning });
        self
    }
    /// Places the instance on `node`.
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }
    /// Sets the service kind.
    pub fn kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_string();
        self
    }
    /// Adds a check.
    pub fn check(mut self, check: CheckDef) -> Self {
        self.checks.push(check);
        self
    }
}

/// A catalog node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDef {
    /// Node name.
    pub name: String,
    /// Node ID (a UUID); generated when `None`.
    pub id: Option<String>,
    /// Node address.
    pub address: String,
    /// Tagged addresses; empty = `lan`, `lan_ipv4`, `wan`, `wan_ipv4` set to
    /// the address.
    pub tagged_addresses: BTreeMap<String, String>,
    /// Node metadata.
    pub meta: BTreeMap<String, String>,
}

impl NodeDef {
    /// A node with a name and an address.
    pub fn new(name: &str, address: &str) -> NodeDef {
        NodeDef {
            name: name.to_string(),
            address: address.to_string(),
            ..NodeDef::default()
        }
    }
    /// Sets the node ID.
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }
    /// Adds a metadata pair.
    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }
    /// Adds a tagged address.
    pub fn tagged_address(mut self, name: &str, address: &str) -> Self {
        self.tagged_addresses
            .insert(name.to_string(), address.to_string());
        self
    }
}

/// A KV entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// Key.
    pub key: String,
    /// Raw value.
    pub value: Vec<u8>,
    /// Opaque flags.
    pub flags: u64,
    /// Index of the creating write.
    pub create_index: u64,
    /// Index of the last write.
    pub modify_index: u64,
    /// Number of times the lock was acquired.
    pub lock_index: u64,
    /// Session holding the lock.
    pub session: Option<String>,
}

/// A registration rejected by validation; `Display` is Consul's 400 body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterError(pub String);

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RegisterError {}

/// A request as received by the double.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Method.
    pub method: http::Method,
    /// Path as sent (still percent-encoded).
    pub path: String,
    /// Raw query string (without `?`; empty when absent).
    pub query: String,
    /// Request headers.
    pub headers: http::HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// When the request arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// Decoded query parameters, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        util::parse_query(&self.query)
    }

    /// First value of a query parameter (`Some("")` for a bare `?name`).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Mutable fault-injection and timing knobs.
pub(crate) struct Runtime {
    pub leader: bool,
    pub leader_lost_at: Option<Instant>,
    pub last_contact: Duration,
    pub failures: VecDeque<(u16, String)>,
    pub delay: Duration,
    pub streaming: bool,
    pub zero_index: bool,
    pub wait_scale: f64,
    pub max_wait: Option<Duration>,
    pub jitter: bool,
    pub sync_delay: Duration,
}

/// Fixed configuration.
pub(crate) struct Config {
    pub datacenter: String,
    pub namespace: Option<String>,
    pub kv_max_value_size: usize,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub rt: Mutex<Runtime>,
    pub acl: Mutex<AclConfig>,
    pub cfg: Config,
    pub changes: watch::Sender<u64>,
    /// Bumped by `reset_index` / `release_blocked`: blocked queries answer.
    pub wake_gen: AtomicU64,
    pub blocked: AtomicUsize,
    pub requests: Mutex<Vec<RecordedRequest>>,
    /// Service intentions (source peer, source, destination, action), in
    /// creation order; the peer is empty for this cluster's sources.
    pub intentions: Mutex<Vec<(String, String, String, String)>>,
    pub me: Weak<Shared>,
    /// The runtime the double was started on (timers are spawned there even
    /// when a hook is called from outside it).
    pub runtime: tokio::runtime::Handle,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Runs a state mutation, arms TTL timers it reports, wakes watchers.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut State) -> (R, Vec<TtlArm>)) -> R {
        let (r, arms) = {
            let mut st = lock(&self.state);
            f(&mut st)
        };
        for arm in arms {
            self.arm_ttl(arm);
        }
        self.notify();
        r
    }

    pub(crate) fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn arm_ttl(&self, arm: TtlArm) {
        let weak = self.me.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(arm.ttl).await;
            if let Some(shared) = weak.upgrade() {
                shared.write(|st| {
                    (
                        st.ttl_expire(&arm.node, &arm.check_id, Some(arm.gen)),
                        Vec::new(),
                    )
                });
            }
        });
    }
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builder for [`ConsulDouble`].
#[derive(Clone, Debug)]
pub struct ConsulDoubleBuilder {
    acl_management: Option<String>,
    extra_tokens: Vec<(String, AclPolicy)>,
    anonymous: AclPolicy,
    datacenter: String,
    node_name: String,
    node_address: String,
    namespace: Option<String>,
    consul_service: bool,
    jitter: bool,
    wait_scale: f64,
    max_wait: Option<Duration>,
    kv_max_value_size: usize,
}

impl Default for ConsulDoubleBuilder {
    fn default() -> Self {
        ConsulDoubleBuilder {
            acl_management: None,
            extra_tokens: Vec::new(),
            anonymous: AclPolicy::deny_all(),
            datacenter: "dc1".into(),
            node_name: "node-1".into(),
            node_address: "127.0.0.1".into(),
            namespace: Some("default".into()),
            consul_service: true,
            jitter: true,
            wait_scale: 1.0,
            max_wait: None,
            kv_max_value_size: 512 * 1024,
        }
    }
}

impl ConsulDoubleBuilder {
    /// Enables ACLs (default policy `deny`) with `token` as a management
    /// token; `None` disables ACLs (the default).
    pub fn acl_token(mut self, token: Option<&str>) -> Self {
        self.acl_management = token.map(str::to_string);
        self
    }

    /// Adds a token with the given rules (enables ACLs only together with
    /// [`acl_token`](Self::acl_token)).
    pub fn token(mut self, token: &str, policy: AclPolicy) -> Self {
        self.extra_tokens.push((token.to_string(), policy));
        self
    }

    /// Rules of the anonymous token (requests without a token). Default:
    /// deny everything.
    pub fn anonymous_policy(mut self, policy: AclPolicy) -> Self {
        self.anonymous = policy;
        self
    }

    /// The local datacenter (default `dc1`); any other `?dc=` answers 500
    /// `No path to datacenter`.
    pub fn datacenter(mut self, dc: &str) -> Self {
        self.datacenter = dc.to_string();
        self
    }

    /// Name and address of the agent's own node (default `node-1`,
    /// `127.0.0.1`).
    pub fn agent_node(mut self, name: &str, address: &str) -> Self {
        self.node_name = name.to_string();
        self.node_address = address.to_string();
        self
    }

    /// `Namespace` field emitted on services and checks (default
    /// `Some("default")`, as in the fixtures; `None` omits it like Consul
    /// OSS).
    pub fn namespace(mut self, ns: Option<&str>) -> Self {
        self.namespace = ns.map(str::to_string);
        self
    }

    /// Whether the servers' own `consul` service is registered (default
    /// true, as on a real cluster).
    pub fn consul_service(mut self, on: bool) -> Self {
        self.consul_service = on;
        self
    }

    /// Random jitter of up to wait/16 on blocking queries (default true).
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// Multiplies every effective blocking wait (default 1.0).
    pub fn wait_scale(mut self, scale: f64) -> Self {
        self.wait_scale = scale;
        self
    }

    /// Caps every effective blocking wait (applied after scaling).
    pub fn max_wait(mut self, max: Duration) -> Self {
        self.max_wait = Some(max);
        self
    }

    /// KV value size limit (default 512 KiB).
    pub fn kv_max_value_size(mut self, bytes: usize) -> Self {
        self.kv_max_value_size = bytes;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    ///
    /// # Panics
    /// If the listener cannot be bound.
    pub async fn start(self) -> ConsulDouble {
        let mut st = State::new(&self.datacenter, &self.node_name, &self.node_address);
        if self.consul_service {
            let mut def = ServiceDef::new("consul").port(8300);
            for (k, v) in [
                ("non_voter", "false"),
                ("raft_version", "3"),
                ("read_replica", "false"),
                ("serf_protocol_current", "2"),
                ("serf_protocol_max", "5"),
                ("serf_protocol_min", "1"),
                ("version", "1.20.0"),
            ] {
                def = def.meta(k, v);
            }
            if let Err(e) = st.register(def, false) {
                panic!("consul double: registering the consul service: {e}");
            }
        }
        let mut acl = AclConfig::new(self.acl_management.is_some());
        if let Some(t) = &self.acl_management {
            acl.add(t, AclPolicy::management());
        }
        for (t, p) in self.extra_tokens {
            acl.add(&t, p);
        }
        acl.anonymous = self.anonymous;
        let (changes, _) = watch::channel(0u64);
        let shared = Arc::new_cyclic(|me| Shared {
            state: Mutex::new(st),
            rt: Mutex::new(Runtime {
                leader: true,
                leader_lost_at: None,
                last_contact: Duration::ZERO,
                failures: VecDeque::new(),
                delay: Duration::ZERO,
                streaming: false,
                zero_index: false,
                wait_scale: self.wait_scale,
                max_wait: self.max_wait,
                jitter: self.jitter,
                sync_delay: Duration::ZERO,
            }),
            acl: Mutex::new(acl),
            cfg: Config {
                datacenter: self.datacenter.clone(),
                namespace: self.namespace.clone(),
                kv_max_value_size: self.kv_max_value_size,
            },
            changes,
            wake_gen: AtomicU64::new(0),
            blocked: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            intentions: Mutex::new(Vec::new()),
            me: me.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("consul double: binding 127.0.0.1:0: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("consul double: local_addr: {e}"),
        };
        let task = tokio::spawn(server::serve(listener, Arc::downgrade(&shared)));
        ConsulDouble {
            inner: Arc::new(Inner { shared, addr, task }),
        }
    }
}

/// Handle to a running Consul double. Cheap to clone; the server stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct ConsulDouble {
    inner: Arc<Inner>,
}

impl fmt::Debug for ConsulDouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDouble")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl ConsulDouble {
    /// A builder with Consul-like defaults.
    pub fn builder() -> ConsulDoubleBuilder {
        ConsulDoubleBuilder::default()
    }

    /// Starts a double with the defaults (ACLs off).
    pub async fn start() -> ConsulDouble {
        ConsulDouble::builder().start().await
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The agent node's name.
    pub fn agent_node(&self) -> String {
        lock(&self.shared().state).agent_node.clone()
    }

    // ---- indexes -------------------------------------------------------

    /// The global (Raft-like) index.
    pub fn index(&self) -> u64 {
        lock(&self.shared().state).index
    }

    /// Index `/v1/health/service/<name>` would report.
    pub fn service_index(&self, name: &str) -> u64 {
        lock(&self.shared().state).service_index(name)
    }

    /// Index `/v1/catalog/services` would report.
    pub fn services_index(&self) -> u64 {
        lock(&self.shared().state).services_index.max(1)
    }

    /// Index a KV read of `prefix` with `?recurse` would report.
    pub fn kv_prefix_index(&self, prefix: &str) -> u64 {
        lock(&self.shared().state).kv_prefix_index(prefix)
    }

    // ---- catalog -------------------------------------------------------

    /// Creates or replaces the intention from `source` (a service name or
    /// `*`) to `destination`, with `action` `allow` or `deny`, as `consul
    /// intention create -replace` would.
    pub fn set_intention(&self, source: &str, destination: &str, action: &str) {
        self.set_peer_intention("", source, destination, action);
    }

    /// As [`set_intention`](Self::set_intention), for a source in the
    /// cluster peer `peer` (`consul intention create peer:PEER/SOURCE`);
    /// an empty `peer` is this cluster.
    pub fn set_peer_intention(&self, peer: &str, source: &str, destination: &str, action: &str) {
        let mut all = lock(&self.shared().intentions);
        all.retain(|(p, s, d, _)| !(p == peer && s == source && d == destination));
        all.push((
            peer.to_owned(),
            source.to_owned(),
            destination.to_owned(),
            action.to_owned(),
        ));
    }

    /// Deletes the intention from this cluster's `source` to `destination`.
    pub fn delete_intention(&self, source: &str, destination: &str) {
        lock(&self.shared().intentions)
            .retain(|(p, s, d, _)| !(p.is_empty() && s == source && d == destination));
    }

    /// Registers (upserts) a service instance like `PUT
    /// /v1/agent/service/register` would; returns its ID.
    pub fn register(&self, def: ServiceDef) -> Result<String, RegisterError> {
        self.shared().write(|st| match st.register(def, false) {
            Ok((id, arms)) => (Ok(id), arms),
            Err(e) => (Err(e), Vec::new()),
        })
    }

    /// Removes a service instance (and its checks). False if unknown.
    pub fn deregister(&self, service_id: &str) -> bool {
        self.shared()
            .write(|st| (st.deregister(service_id), Vec::new()))
    }

    /// Adds or updates a node (with its `serfHealth` check).
    pub fn add_node(&self, node: NodeDef) {
        self.shared().write(|st| {
            st.upsert_node(node);
            ((), Vec::new())
        });
    }

    /// Removes a node, its services and checks. False if unknown.
    pub fn remove_node(&self, name: &str) -> bool {
        self.shared().write(|st| (st.remove_node(name), Vec::new()))
    }

    /// Adds a node-level check (applies to every instance on the node).
    pub fn add_node_check(&self, node: &str, check: CheckDef) {
        self.shared().write(|st| {
            let arm = st.add_node_check(node, check);
            ((), arm.into_iter().collect())
        });
    }

    /// Removes every check with this ID. False if none.
    pub fn remove_check(&self, check_id: &str) -> bool {
        self.shared()
            .write(|st| (st.remove_check(check_id), Vec::new()))
    }

    /// Sets the status of every check with this ID (service checks such as
    /// `service:web-1`, or node checks such as `serfHealth` on all nodes).
    /// False if none exists. Same status and output = no write.
    pub fn set_check(&self, check_id: &str, status: Status) -> bool {
        self.shared()
            .write(|st| (st.set_check(None, check_id, status, None), Vec::new()))
    }

    /// Like [`set_check`](Self::set_check), also setting `Output`.
    pub fn set_check_output(&self, check_id: &str, status: Status, output: &str) -> bool {
        self.shared().write(|st| {
            (
                st.set_check(None, check_id, status, Some(output)),
                Vec::new(),
            )
        })
    }

    /// Sets a check on one node only (e.g. `serfHealth` of `node-2`).
    pub fn set_node_check(&self, node: &str, check_id: &str, status: Status) -> bool {
        self.shared()
            .write(|st| (st.set_check(Some(node), check_id, status, None), Vec::new()))
    }

    /// Expires a TTL check now (as if its TTL elapsed). False if unknown.
    pub fn expire_ttl(&self, check_id: &str) -> bool {
        self.shared().write(|st| {
            let keys: Vec<(String, String)> = st
                .checks
                .keys()
                .filter(|(_, c)| c == check_id)
                .cloned()
                .collect();
            let mut any = false;
            for (n, c) in keys {
                any |= st.ttl_expire(&n, &c, None);
            }
            (any, Vec::new())
        })
    }

    /// Service maintenance mode (`_service_maintenance:<id>`, critical).
    /// False if the service is unknown.
    pub fn maintenance(&self, service_id: &str, enable: bool) -> bool {
        self.shared().write(|st| {
            (
                st.service_maintenance(service_id, enable, "").is_some(),
                Vec::new(),
            )
        })
    }

    /// Node maintenance mode on the agent node (`_node_maintenance`).
    pub fn node_maintenance(&self, enable: bool) {
        self.shared().write(|st| {
            st.node_maintenance(enable, "");
            ((), Vec::new())
        });
    }

    // ---- KV ------------------------------------------------------------

    /// Writes a key (flags 0, no CAS); returns its ModifyIndex.
    pub fn kv_put(&self, key: &str, value: impl Into<Vec<u8>>) -> u64 {
        let value = value.into();
        self.shared().write(|st| {
            st.kv_set(key, value, 0, state::KvMode::Plain);
            (st.kv_key_index(key), Vec::new())
        })
    }

    /// Reads a key.
    pub fn kv_get(&self, key: &str) -> Option<KvEntry> {
        lock(&self.shared().state).kv_entry(key)
    }

    /// Deletes a key (leaves a tombstone). False if it did not exist.
    pub fn kv_delete(&self, key: &str) -> bool {
        self.shared().write(|st| {
            let existed = st.kv.contains_key(key);
            st.kv_delete(key, false, None);
            (existed, Vec::new())
        })
    }

    /// Drops all KV tombstones (prefix indexes may then go down).
    pub fn reap_tombstones(&self) {
        self.shared().write(|st| {
            st.reap_tombstones();
            ((), Vec::new())
        });
    }

    // ---- fault hooks ---------------------------------------------------

    /// Snapshot restore: the index (and every stored index above it) drops
    /// to `to` (min 1); every blocked query answers immediately with the
    /// lower index.
    pub fn reset_index(&self, to: u64) {
        {
            let mut st = lock(&self.shared().state);
            st.reset_index(to);
        }
        self.shared().wake_gen.fetch_add(1, Ordering::SeqCst);
        self.shared().notify();
    }

    /// Idempotent write: the service's index moves, content is identical.
    /// Returns the new index.
    pub fn bump_without_change(&self, service: &str) -> u64 {
        self.shared()
            .write(|st| (st.bump_without_change(service), Vec::new()))
    }

    /// Rewrites a key with identical content, moving its ModifyIndex (as
    /// older servers did). `None` if the key does not exist.
    pub fn kv_bump_without_change(&self, key: &str) -> Option<u64> {
        self.shared().write(|st| (st.kv_touch(key), Vec::new()))
    }

    /// Every currently blocked query returns now with an unchanged index
    /// (an early return without change).
    pub fn release_blocked(&self) {
        self.shared().wake_gen.fetch_add(1, Ordering::SeqCst);
        self.shared().notify();
    }

    /// Leader present (default) or lost: without a leader, default and
    /// `?consistent` reads and KV writes answer 500 `No cluster leader`;
    /// `?stale` reads still answer with `X-Consul-KnownLeader: false`.
    pub fn set_leader(&self, leader: bool) {
        let mut rt = lock(&self.shared().rt);
        if rt.leader && !leader {
            rt.leader_lost_at = Some(Instant::now());
        }
        if leader {
            rt.leader_lost_at = None;
        }
        rt.leader = leader;
    }

    /// `X-Consul-LastContact` reported on `?stale` reads while a leader
    /// exists (default 0). Without a leader the time since it was lost is
    /// added.
    pub fn set_last_contact(&self, d: Duration) {
        lock(&self.shared().rt).last_contact = d;
    }

    /// The next `n` requests (any route) answer `status` with `body`.
    pub fn fail_next(&self, n: usize, status: u16, body: &str) {
        let mut rt = lock(&self.shared().rt);
        for _ in 0..n {
            rt.failures.push_back((status, body.to_string()));
        }
    }

    /// Delay added before every response.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.shared().rt).delay = d;
    }

    /// Streaming backend: `/v1/health/service` with `index` (or `cached`)
    /// omits `X-Consul-KnownLeader` / `X-Consul-LastContact` and sends
    /// `X-Consul-Query-Backend: streaming`.
    pub fn set_streaming(&self, on: bool) {
        lock(&self.shared().rt).streaming = on;
    }

    /// Buggy server: query responses carry `X-Consul-Index: 0`.
    pub fn set_zero_index(&self, on: bool) {
        lock(&self.shared().rt).zero_index = on;
    }

    /// Multiplies every effective blocking wait (e.g. 0.001 turns the 5 min
    /// default into 300 ms).
    pub fn set_wait_scale(&self, scale: f64) {
        lock(&self.shared().rt).wait_scale = scale;
    }

    /// Caps every effective blocking wait.
    pub fn set_max_wait(&self, max: Option<Duration>) {
        lock(&self.shared().rt).max_wait = max;
    }

    /// Turns blocking-query jitter on or off.
    pub fn set_jitter(&self, on: bool) {
        lock(&self.shared().rt).jitter = on;
    }

    /// Anti-entropy delay: writes through the agent HTTP API reach the
    /// catalog only after `d` (default 0 = immediately).
    pub fn set_sync_delay(&self, d: Duration) {
        lock(&self.shared().rt).sync_delay = d;
    }

    /// Adds an ACL token; returns its AccessorID.
    pub fn add_acl_token(&self, token: &str, policy: AclPolicy) -> String {
        lock(&self.shared().acl).add(token, policy)
    }

    /// Deletes an ACL token (later requests with it get 403 `ACL not
    /// found`). False if unknown.
    pub fn remove_acl_token(&self, token: &str) -> bool {
        lock(&self.shared().acl).remove(token)
    }

    // ---- observation ---------------------------------------------------

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared().requests).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared().requests).clear();
    }

    /// Number of queries currently blocked waiting for a change.
    pub fn blocked_queries(&self) -> usize {
        self.shared().blocked.load(Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until at least `n` queries are blocked; returns
    /// whether that happened.
    pub async fn wait_blocked(&self, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.blocked_queries() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }
}
