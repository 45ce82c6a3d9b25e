//! The proxy config model (`almond proxy --config FILE`), as in CONTRACT.md.
//!
//! The per-service shape ([`Service`]) is also what the control plane sends
//! in snapshots, so static and dynamic mode share one model.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The subset of an endpoint that names none.
pub const DEFAULT_SUBSET: &str = "default";

/// The whole proxy config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/endpoints`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Control plane URL; omitted = run on the static `services`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    /// Environment variable holding the bearer token this proxy presents
    /// to the control plane (its `proxy_token_env`); set but unset or
    /// empty in the environment = the proxy refuses to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// With an `https://` control URL: PEM file of the CAs the control
    /// plane's certificate must chain to (default: `tls.ca`, else the
    /// system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_ca: Option<PathBuf>,
    /// Largest snapshot read from the control plane.
    #[serde(default = "default_control_max_bytes")]
    pub control_max_bytes: usize,
    /// Environment variable holding the bearer token that `/config`,
    /// `/endpoints` and `/log-level` need when `admin` is not a loopback
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_env: Option<String>,
    /// This proxy's name towards the control plane (default: hostname).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_id: Option<String>,
    /// Where the last snapshot is cached for starts while control is away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// This proxy's zone (availability zone); omitted = the environment
    /// variable `ALMOND_ZONE`, else none (no zone-aware balancing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Zone-aware balancing sends everything to endpoints of the local
    /// zone while at least this percent of them are available.
    #[serde(
        default = "default_zone_min_healthy",
        skip_serializing_if = "is_default_zone_min_healthy"
    )]
    pub zone_min_healthy: u32,
    /// Runtime worker threads (default: the CPUs this process may use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_drain", with = "crate::duration")]
    pub drain_timeout: Duration,
    /// Where the local app (or other proxies) reach this proxy.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<Listener>,
    /// Downstream HTTP limits.
    #[serde(default)]
    pub limits: Limits,
    /// Static services (the control plane sends the same shape).
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// Request IDs and W3C trace context.
    #[serde(default)]
    pub tracing: crate::Tracing,
    /// One line per request; omitted = no access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<crate::AccessLog>,
    /// This proxy's identity and trust bundle for mTLS (PEM files, re-read
    /// when they change); needed by `tls` listeners and services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// The proxy's certificate, key and trust bundle (all PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain presented to peers (leaf first).
    pub cert: PathBuf,
    /// Private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that peers' certificates must chain to.
    pub ca: PathBuf,
}

/// A service's callers: client certificate identities, typed
/// (`spiffe://…` URI SAN, `dns:NAME` DNS SAN, `cn:NAME` subject CN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authz {
    /// Identities allowed; empty = nobody (the policy exists, and admits
    /// no one).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Checks one typed identity of an `allow` list: `spiffe://…`,
/// `dns:NAME` or `cn:NAME` (a bare name is refused: it used to match any
/// kind of name).
pub fn check_identity(id: &str) -> Result<(), String> {
    let typed = ["spiffe://", "dns:", "cn:"]
        .iter()
        .find_map(|p| id.strip_prefix(p).map(|rest| (p, rest)));
    match typed {
        Some((_, rest)) if !rest.trim().is_empty() && rest.trim() == rest => Ok(()),
        Some((p, _)) => Err(format!("{id:?}: nothing (or spaces) after {p}")),
        None => Err(format!(
            "{id:?} is not typed: write spiffe://TRUST-DOMAIN/PATH (a URI SAN), dns:NAME (a DNS SAN) or cn:NAME (the subject CN)"
        )),
    }
}

/// Checks a service name: what clients send in `Host` (or `:authority`)
/// to reach it, so a host name as clients write it: lower-case letters,
/// digits, `-`, `_` and `.` (Consul's DNS-compatible names, with the `_`
/// and `.` that real ones carry). Host names are case-insensitive and the
/// proxy looks a request's `Host` up in lower case, so an upper-case name
/// could never be reached by it.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    if name.is_empty() {
        return Err("a service name must not be empty".into());
    }
    if name.bytes().all(ok) {
        return Ok(());
    }
    let lower = name.to_ascii_lowercase();
    if lower.bytes().all(ok) {
        return Err(format!(
            "{name:?}: clients' Host is matched in lower case (host names are \
             case-insensitive), so name it {lower:?}"
        ));
    }
    Err(format!(
        "{name:?} is not a host name: a service name is lower-case letters, digits, \
         '-', '_' and '.', as clients send it in Host"
    ))
}

/// Upstream TLS of a service: `tls: true` or `tls: { server_name: NAME }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Name the upstream's certificate must carry (SNI too); default: the
    /// service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// `tls: true`, `tls: false` or `tls: { server_name: NAME }`.
pub(crate) fn flag_or_upstream_tls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<UpstreamTls>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Flag(bool),
        Options(UpstreamTls),
    }
    match Raw::deserialize(d) {
        Ok(Raw::Flag(on)) => Ok(on.then(UpstreamTls::default)),
        Ok(Raw::Options(options)) => Ok(Some(options)),
        Err(_) => Err(serde::de::Error::custom(
            "expected true, false or { server_name: NAME }",
        )),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_zone_min_healthy() -> u32 {
    70
}
fn is_default_zone_min_healthy(p: &u32) -> bool {
    *p == default_zone_min_healthy()
}

impl ProxyConfig {
    /// The zone of this proxy: `zone`, else `ALMOND_ZONE` (if not empty),
    /// without surrounding white space (`echo "eu-west-1a" >` a file the
    /// variable is read from leaves a newline, and zones match exactly).
    pub fn local_zone(&self) -> Option<String> {
        self.zone.clone().or_else(|| {
            std::env::var("ALMOND_ZONE")
                .ok()
                .map(|z| z.trim().to_owned())
                .filter(|z| !z.is_empty())
        })
    }
}

fn default_control_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4191))
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_listeners() -> Vec<Listener> {
    vec![Listener {
        bind: SocketAddr::from(([127, 0, 0, 1], 4140)),
        service: None,
        direction: Direction::Outbound,
        tls: false,
        allow: Vec::new(),
        trust_routing_headers: None,
    }]
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Send everything on this port to one service (the Nginx upstream
    /// replacement); omitted = route by `Host` / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Metric label for traffic on this listener.
    #[serde(default)]
    pub direction: Direction,
    /// Serve mTLS with the proxy-level `tls`: a client certificate signed
    /// by its `ca` is required.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tls: bool,
    /// Client identities (certificate URI SAN, DNS SAN or CN) allowed on a
    /// `tls` listener; others get 403. Empty = every verified client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Act on client-sent `x-almond-*` headers (the `x-almond-subset` pin).
    /// Omitted: trusted on outbound listeners bound to loopback (the local
    /// app), not elsewhere; untrusted ones are removed before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_routing_headers: Option<bool>,
}

impl Listener {
    /// Whether client-sent `x-almond-*` headers are acted on here.
    pub fn trusts_routing_headers(&self) -> bool {
        self.trust_routing_headers
            .unwrap_or(self.direction == Direction::Outbound && self.bind.ip().is_loopback())
    }
}

/// Which way traffic flows through a listener, as a metric label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The local app calling other services.
    #[default]
    Outbound,
    /// Other hosts calling this host's service.
    Inbound,
}

impl Direction {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Downstream HTTP limits, per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request head (request line and headers); larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head; also how long
    /// an idle HTTP/1.1 keep-alive connection is kept.
    #[serde(default = "default_header_timeout", with = "crate::duration")]
    pub header_timeout: Duration,
    /// Open client connections per listener; more are accepted and closed
    /// at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// HTTP/2 client connections: a PING after this long without frames;
    /// no answer within `keep_alive_timeout` closes the connection.
    #[serde(default = "default_keep_alive_interval", with = "crate::duration")]
    pub keep_alive_interval: Duration,
    /// Time an HTTP/2 PING has to be answered.
    #[serde(default = "default_keep_alive_timeout", with = "crate::duration")]
    pub keep_alive_timeout: Duration,
    /// A client that sends no byte of its request body for this long has
    /// the request ended (408 when no response has started).
    #[serde(default = "default_body_idle", with = "crate::duration")]
    pub body_idle: Duration,
    /// A client connection with no request in progress for this long is
    /// closed gracefully (HTTP/2: GOAWAY), whatever PINGs keep it alive.
    #[serde(default = "default_idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: default_max_header_bytes(),
            header_timeout: default_header_timeout(),
            max_connections: default_max_connections(),
            keep_alive_interval: default_keep_alive_interval(),
            keep_alive_timeout: default_keep_alive_timeout(),
            body_idle: default_body_idle(),
            idle_timeout: default_idle_timeout(),
        }
    }
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_body_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_keep_alive_interval() -> Duration {
    Duration::from_secs(20)
}
fn default_keep_alive_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A service: its endpoints and how traffic reaches them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Upstream protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Load-balancing algorithm within a subset.
    #[serde(default)]
    pub lb: Lb,
    /// The instances of the service.
    pub endpoints: Vec<Endpoint>,
    /// Percent of traffic per subset (summing to 100), and optionally
    /// `sticky_header`; omitted = all subsets together, by endpoint weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::Split>,
    /// Route rules, in order: the first whose `match` holds sends the
    /// request to its `to`; none matching = the split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::RouteRule>,
    /// Guards, in order: the first whose `match` holds denies the request
    /// or holds it to a rate (`almond block`, `almond limit`); checked
    /// before the route rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<crate::Guard>,
    /// Copy a share of the requests to a subset or another service
    /// (responses discarded); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<crate::Mirror>,
    /// Connect and request timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Admission limits and outlier ejection.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Retry policy.
    #[serde(default)]
    pub retries: Retries,
    /// Active health checks of every endpoint (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Who may call this service on an inbound listener (usually sent by
    /// the control plane, `almond authz`); absent = the listener's `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// Connect to the endpoints over mTLS with the proxy-level `tls`.
    #[serde(
        default,
        deserialize_with = "flag_or_upstream_tls",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls: Option<UpstreamTls>,
    /// How gRPC calls (`content-type: application/grpc*`) are classified:
    /// `failure_codes`. Left out of serialized snapshots when default.
    #[serde(default, skip_serializing_if = "crate::Grpc::is_default")]
    pub grpc: crate::Grpc,
}

/// Upstream protocol of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with a keep-alive pool.
    #[default]
    Http1,
    /// HTTP/2 (h2c, prior knowledge), multiplexed.
    Http2,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lb {
    /// Power of two choices over peak-EWMA latency x in-flight requests.
    #[default]
    P2cEwma,
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `IP:port` of the instance.
    pub addr: SocketAddr,
    /// Version label (e.g. `v1`), used by splits.
    #[serde(default = "default_subset")]
    pub subset: String,
    /// Relative share of traffic within its subset (1 or more).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The instance's zone (availability zone), for zone-aware balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn default_subset() -> String {
    DEFAULT_SUBSET.to_owned()
}
fn default_weight() -> u32 {
    1
}

/// Per-service timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to an endpoint.
    #[serde(default = "default_connect", with = "crate::duration")]
    pub connect: Duration,
    /// From the request's arrival to the upstream response's headers.
    #[serde(default = "default_request", with = "crate::duration")]
    pub request: Duration,
    /// An idle pooled HTTP/1.1 connection is closed after this long; keep
    /// it shorter than the upstream's own keep-alive timeout.
    /// (Left out of serialized snapshots when default, so proxies of the
    /// release before it still read them.)
    #[serde(
        default = "default_idle",
        with = "crate::duration",
        skip_serializing_if = "is_default_idle"
    )]
    pub idle: Duration,
    /// An upstream that sends no byte of its response body for this long
    /// has the response ended (a reset downstream, counted as a timeout).
    #[serde(
        default = "default_body_idle",
        with = "crate::duration",
        skip_serializing_if = "is_default_body_idle"
    )]
    pub body_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: default_connect(),
            request: default_request(),
            idle: default_idle(),
            body_idle: default_body_idle(),
        }
    }
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn is_default_body_idle(idle: &Duration) -> bool {
    *idle == default_body_idle()
}
fn is_default_idle(idle: &Duration) -> bool {
    *idle == default_idle()
}

/// Active health checks: every `interval`, each endpoint is sent a
/// `GET path` (2xx or 3xx is healthy), or only connected to without one.
/// `unhealthy` failures in a row eject it; `healthy` successes in a row
/// bring an ejected endpoint back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Time between two checks of one endpoint.
    #[serde(default = "default_hc_interval", with = "crate::duration")]
    pub interval: Duration,
    /// Time a check has to succeed.
    #[serde(default = "default_hc_timeout", with = "crate::duration")]
    pub timeout: Duration,
    /// HTTP path to `GET`; a TCP connect only when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Successes in a row that bring an ejected endpoint back.
    #[serde(default = "default_hc_healthy")]
    pub healthy: u32,
    /// Failures in a row that eject an endpoint.
    #[serde(default = "default_hc_unhealthy")]
    pub unhealthy: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: default_hc_interval(),
            timeout: default_hc_timeout(),
            path: None,
            healthy: default_hc_healthy(),
            unhealthy: default_hc_unhealthy(),
        }
    }
}
fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_hc_healthy() -> u32 {
    2
}
fn default_hc_unhealthy() -> u32 {
    3
}
fn default_connect() -> Duration {
    Duration::from_secs(1)
}
fn default_request() -> Duration {
    Duration::from_secs(10)
}

/// Admission limits and outlier ejection (defaults close to Envoy's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Failures in a row that eject an endpoint.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection multiplies it.
    #[serde(default = "default_base_ejection", with = "crate::duration")]
    pub base_ejection: Duration,
    /// Most of a subset that may be ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Longest an ejection may last, however often an endpoint fails.
    #[serde(default = "default_max_ejection", with = "crate::duration")]
    pub max_ejection: Duration,
    /// Outcomes that count as failures toward ejection.
    #[serde(default = "default_failure_on")]
    pub failure_on: Vec<Condition>,
    /// Below this percent of a pool's endpoints available, balance over
    /// all of them, ejected or not (Envoy's panic threshold).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
    /// Requests in flight per service; more get an immediate 503.
    #[serde(default = "default_max_requests")]
    pub max_requests: u32,
    /// Requests waiting for a new upstream connection per service; more get
    /// an immediate 503.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
            max_ejection: default_max_ejection(),
            failure_on: default_failure_on(),
            panic_threshold: default_panic_threshold(),
            max_requests: default_max_requests(),
            max_pending: default_max_pending(),
        }
    }
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(10)
}
fn default_max_ejection_percent() -> u32 {
    50
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_failure_on() -> Vec<Condition> {
    vec![
        Condition::Connect,
        Condition::Timeout,
        Condition::Reset,
        Condition::ServerError,
    ]
}
fn default_panic_threshold() -> u32 {
    50
}
fn default_max_requests() -> u32 {
    1024
}
fn default_max_pending() -> u32 {
    256
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Most retries per request (0 = none).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retries at most this percent of requests.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Which outcomes are retried. `connect` is retried for any method
    /// (nothing was sent); the others only for idempotent methods.
    #[serde(default = "default_retry_on")]
    pub on: Vec<Condition>,
    /// Time allowed to each try (default: what is left of the request's).
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Request bodies up to this size are kept for replay; larger ones are
    /// streamed and never retried.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Retries always allowed per second, on top of `budget_percent`.
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: default_attempts(),
            budget_percent: default_budget_percent(),
            on: default_retry_on(),
            per_try_timeout: None,
            max_body_bytes: default_max_body_bytes(),
            min_per_second: default_min_per_second(),
        }
    }
}
fn default_attempts() -> u32 {
    2
}
fn default_budget_percent() -> u32 {
    20
}
fn default_retry_on() -> Vec<Condition> {
    vec![Condition::Connect, Condition::Reset, Condition::Status(503)]
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_min_per_second() -> u32 {
    10
}

/// An outcome named in `retries.on` or `circuit_breaker.failure_on`:
/// `connect`, `reset`, `timeout`, `5xx`, one 5xx status like `"503"`, or
/// (`retries.on` only) a gRPC code like `grpc-unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The connection could not be made (the request was never sent).
    Connect,
    /// The connection was reset before a response.
    Reset,
    /// The try timed out.
    Timeout,
    /// Any 5xx status.
    ServerError,
    /// This one status.
    Status(u16),
    /// A gRPC call answered with this `grpc-status` (`grpc-unavailable`);
    /// `retries.on` only.
    Grpc(crate::GrpcCode),
}

impl Condition {
    /// Does a response status match?
    pub fn matches_status(self, status: u16) -> bool {
        match self {
            Condition::ServerError => (500..=599).contains(&status),
            Condition::Status(code) => code == status,
            _ => false,
        }
    }
}

impl Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Condition::Connect => s.serialize_str("connect"),
            Condition::Reset => s.serialize_str("reset"),
            Condition::Timeout => s.serialize_str("timeout"),
            Condition::ServerError => s.serialize_str("5xx"),
            Condition::Status(code) => s.serialize_str(&code.to_string()),
            Condition::Grpc(code) => s.serialize_str(&code.condition()),
        }
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "connect" => Ok(Condition::Connect),
            "reset" => Ok(Condition::Reset),
            "timeout" => Ok(Condition::Timeout),
            "5xx" => Ok(Condition::ServerError),
            other if other.starts_with("grpc-") => crate::GrpcCode::from_condition(other)
                .map(Condition::Grpc)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "invalid condition {other:?}; expected a gRPC code like grpc-unavailable or grpc-resource-exhausted"
                    ))
                }),
            other => match other.parse::<u16>() {
                Ok(code) if (500..=599).contains(&code) => Ok(Condition::Status(code)),
                _ => Err(serde::de::Error::custom(format!(
                    "invalid condition {other:?}; expected connect, reset, timeout, 5xx or a 5xx status like \"503\""
                ))),
            },
        }
    }
}
