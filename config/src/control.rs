//! The control-plane config model (`almond control --config FILE`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole control config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// API for proxies and operators, plus `/metrics`, `/ready`, `/live`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where endpoints come from.
    pub source: Source,
    /// `Service.Meta` key that names an endpoint's subset.
    #[serde(default = "default_subset_key")]
    pub subset_key: String,
    /// `Service.Meta` key (else `Node.Meta` key) that names an endpoint's
    /// zone, for zone-aware balancing.
    #[serde(default = "default_zone_key")]
    pub zone_key: String,
    /// Where splits and rollouts live.
    #[serde(default)]
    pub store: Store,
    /// The policy file of `store: file`.
    #[serde(default = "default_policy_file")]
    pub policy_file: PathBuf,
    /// How the watcher reads golden metrics: `{ source: direct }` (scrape
    /// the proxies, the default) or `{ prometheus: http://HOST:9090 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watcher: Option<Watcher>,
    /// Environment variable holding the operator bearer token (changes
    /// need it); set but unset or empty in the environment = the control
    /// plane refuses to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Environment variable holding the token proxies present to read
    /// snapshots (the operator token works too); same rule when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_token_env: Option<String>,
    /// Environment variable holding the token the control plane presents
    /// to proxies' admin `/tap` (their `admin_token_env`), needed for
    /// proxies whose admin listener is off loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_admin_token_env: Option<String>,
    /// Serve the API over TLS: `{ cert, key, ca }` (PEM files); a proxy
    /// whose client certificate chains to `ca` is authenticated by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::Tls>,
    /// Webhooks that get every rollout event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<Notify>,
    /// Largest body read from Consul, from a proxy's `/metrics` or from
    /// Prometheus.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Longest a snapshot long-poll is held.
    #[serde(default = "default_max_wait", with = "crate::duration")]
    pub max_wait: Duration,
}

fn default_max_body_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4180))
}
fn default_policy_file() -> PathBuf {
    PathBuf::from("almond-policy.json")
}
fn default_subset_key() -> String {
    "version".to_owned()
}
fn default_zone_key() -> String {
    "zone".to_owned()
}
fn default_max_wait() -> Duration {
    Duration::from_secs(60)
}

/// Where endpoint sets come from: Consul, or a watched directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
// Read once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// Consul's catalog and health (blocking queries).
    Consul(ConsulSource),
    /// A directory of YAML service definitions (the proxy's `services`
    /// shape, one or more services per file), watched for changes.
    File(PathBuf),
}

/// Consul connection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSource {
    /// Consul HTTP address, e.g. `http://127.0.0.1:8500`, or
    /// `https://consul.internal:8501` for TLS.
    #[serde(default = "default_consul_addr")]
    pub addr: String,
    /// With `https://`: PEM file of the CAs to trust for Consul's
    /// certificate; omitted = the system's trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With `https://`: PEM client certificate (chain), for a Consul that
    /// verifies clients (`verify_incoming`); needs `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// With `https://`: PEM private key of `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the ACL token.
    #[serde(default = "default_consul_token_env")]
    pub token_env: String,
    /// Services to watch; empty = every service but `consul`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Blocking-query wait.
    #[serde(default = "default_consul_wait", with = "crate::duration")]
    pub wait: Duration,
    /// Datacenter (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// Read from any server (`?stale`), for scale and leader loss.
    #[serde(default)]
    pub stale: bool,
    /// Take services' `authz` from Consul intentions: `{ trust_domain }`
    /// names the SPIFFE trust domain of the mesh's certificates, so that
    /// an intention's source `web` is `spiffe://TRUST_DOMAIN/service/web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intentions: Option<ConsulIntentions>,
    /// Per-service policy for the services read from Consul, by served
    /// name; `"*"` is for every service without an entry of its own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_defaults: BTreeMap<String, ServiceDefaults>,
}

/// The policy of services read from Consul, which Consul's catalog does
/// not carry (Consul's own `service-defaults`): the proxy's service keys
/// but those that come from Consul (`endpoints`) or from the policy store
/// (`split`, `routes`, `guards`, `mirror`, `authz`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDefaults {
    /// The upstream protocol; absent = the instances' `Meta.protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<crate::Protocol>,
    /// Load-balancing algorithm within a subset.
    #[serde(default)]
    pub lb: crate::Lb,
    /// Connect and request timeouts.
    #[serde(default)]
    pub timeouts: crate::Timeouts,
    /// Admission limits and outlier ejection.
    #[serde(default)]
    pub circuit_breaker: crate::CircuitBreaker,
    /// Retry policy.
    #[serde(default)]
    pub retries: crate::Retries,
    /// Active health checks of every endpoint (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::HealthCheck>,
    /// Connect to the endpoints over mTLS with each proxy's `tls`.
    #[serde(
        default,
        deserialize_with = "crate::proxy::flag_or_upstream_tls",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls: Option<crate::UpstreamTls>,
    /// How gRPC calls are classified.
    #[serde(default, skip_serializing_if = "crate::Grpc::is_default")]
    pub grpc: crate::Grpc,
}

impl ServiceDefaults {
    /// Writes this policy into `svc` (its endpoints and the policy
    /// store's keys untouched).
    pub fn apply(&self, svc: &mut crate::Service) {
        if let Some(protocol) = self.protocol {
            svc.protocol = protocol;
        }
        svc.lb = self.lb;
        svc.timeouts = self.timeouts.clone();
        svc.circuit_breaker = self.circuit_breaker.clone();
        svc.retries = self.retries.clone();
        svc.health_check = self.health_check.clone();
        svc.tls = self.tls.clone();
        svc.grpc = self.grpc.clone();
    }
}

impl ConsulSource {
    /// The policy for the service served as `name`: its own entry in
    /// `service_defaults`, else `"*"`'s.
    pub fn defaults_for(&self, name: &str) -> Option<&ServiceDefaults> {
        let d = &self.service_defaults;
        d.get(name).or_else(|| d.get("*"))
    }
}

/// A webhook for rollout events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// The body: `json` (`{"service", "event"}`) or `slack` (`{"text"}`).
    #[serde(default)]
    pub format: NotifyFormat,
}

/// A webhook's body format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// `{"service": NAME, "event": EVENT}`.
    #[default]
    Json,
    /// `{"text": "NAME: KIND CANARY at P%: DETAIL"}` (Slack incoming webhooks).
    Slack,
}

/// Reading Consul intentions as the services' allow-lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulIntentions {
    /// The trust domain of the certificates' URI SANs (`example.org`).
    pub trust_domain: String,
    /// What a source no intention names gets: `deny` (the default, as
    /// a Consul with ACLs' `default_policy` or `default_intention_policy`
    /// `deny`), or `allow` (a Consul that admits them). Said here, not
    /// read from Consul: its `X-Consul-Default-ACL-Policy` does not say
    /// `default_intention_policy`, which can deny where ACLs allow.
    #[serde(default)]
    pub default: IntentionDefault,
}

/// [`ConsulIntentions::default`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentionDefault {
    /// Nobody: no intention at all admits no one.
    #[default]
    Deny,
    /// Every verified client, but those a deny names.
    Allow,
}

fn default_consul_addr() -> String {
    "http://127.0.0.1:8500".to_owned()
}
fn default_consul_token_env() -> String {
    "CONSUL_HTTP_TOKEN".to_owned()
}
fn default_consul_wait() -> Duration {
    Duration::from_secs(300)
}

/// Where splits and rollouts are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Store {
    /// Consul KV with check-and-set.
    Consul,
    /// A local file (file mode).
    #[default]
    File,
}

/// The `watcher` key as written: one of its two keys. Typed (not any
/// map) so that a misspelled key is refused with its line rather than
/// ignored; [`ControlConfig::watcher_source`] checks that exactly one is
/// given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watcher {
    /// `direct`: scrape every proxy's admin `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<WatcherScrape>,
    /// A Prometheus server's base URL (`http://HOST:9090`), asked with
    /// PromQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
}

/// The value of `watcher.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatcherScrape {
    /// Scrape every proxy's admin `/metrics`.
    Direct,
}

/// Where the watcher reads golden metrics from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatcherSource {
    /// Scrape every proxy's admin `/metrics`.
    Direct,
    /// Ask a Prometheus server (base URL) with PromQL.
    Prometheus(String),
}

impl ControlConfig {
    /// The watcher's source, or the key of `watcher` that is wrong and why.
    pub fn watcher_source(&self) -> Result<WatcherSource, (&'static str, String)> {
        let Some(w) = &self.watcher else {
            return Ok(WatcherSource::Direct);
        };
        match (&w.source, &w.prometheus) {
            (Some(WatcherScrape::Direct), None) => Ok(WatcherSource::Direct),
            (None, Some(url)) if url.starts_with("http://") && url.len() > "http://".len() => Ok(
                WatcherSource::Prometheus(url.trim_end_matches('/').to_owned()),
            ),
            (None, Some(_)) => Err((
                "prometheus",
                "an http:// URL, e.g. http://127.0.0.1:9090".into(),
            )),
            (Some(_), Some(_)) => Err((
                "prometheus",
                "give either source: direct or prometheus: URL, not both".into(),
            )),
            (None, None) => Err((
                "",
                "expected { source: direct } or { prometheus: URL }".into(),
            )),
        }
    }
}
