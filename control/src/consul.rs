//! Consul source: blocking queries on `/v1/catalog/services` (which
//! services exist) and `/v1/health/service/{name}` (their instances), as
//! `shared/consul/API.md` section 2.4 prescribes: per-resource index, reset
//! when it goes backwards, never wait on 0, rate-limited loops, jittered
//! backoff on errors, a read timeout above wait x 17/16. Plain HTTP or
//! HTTPS (rustls; the system's roots or `ca_file`, and a client
//! certificate for a Consul that verifies clients).

use crate::state::State;
use almond_config::{ConsulSource, Endpoint, Protocol, Service, ServiceDefaults, DEFAULT_SUBSET};
use almond_net::{error_chain, percent_encode, Backoff};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Pauses after failed queries (API.md 2.4 rule 6, as Consul's own watch
/// loop: failures², here from 1 s to 60 s), with jitter of our own.
const BACKOFF: Backoff =
    Backoff::squared(Duration::from_secs(1), Duration::from_secs(60)).with_jitter(0.5);

/// The oldest a stale read may be (`source.consul.stale`): how long its
/// answering server may have been out of touch with the leader.
const MAX_STALE: Duration = Duration::from_secs(10);

/// An HTTP client for one Consul agent.
#[derive(Clone)]
pub struct ConsulClient {
    base: String,
    token: Option<String>,
    datacenter: Option<String>,
    stale: bool,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Longest answer read.
    max_body: usize,
}

/// Why the Consul client could not be built: a TLS file, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("source.consul.{key}: {path}: {reason}")]
pub struct TlsSetupError {
    key: &'static str,
    path: String,
    reason: String,
}

/// Why a Consul call failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// Could not reach Consul, or it did not answer in time.
    #[error("consul unreachable: {0}")]
    Transport(String),
    /// ACL refusal: not transient; fix the token.
    #[error("consul refused the token (403): {0}")]
    Forbidden(String),
    /// Any other non-2xx answer.
    #[error("consul answered {0}: {1}")]
    Status(StatusCode, String),
    /// A body that is not what the API documents.
    #[error("consul sent an unexpected body: {0}")]
    Decode(String),
    /// ACLs hid part of a list (`X-Consul-Results-Filtered-By-ACLs`): not
    /// the real state; the token needs the rights named.
    #[error("consul's ACLs hid part of the answer: the token needs {0}")]
    Filtered(&'static str),
}

impl ConsulError {
    /// Consul could not be reached, could not serve the query (no leader,
    /// overloaded), or refuses the token: the control plane gets nothing
    /// from it, `almond_control_consul_up` 0. An answer filtered by ACLs
    /// (part of the state) or unreadable came from a Consul that is up.
    fn cuts_off(&self) -> bool {
        match self {
            ConsulError::Transport(_) | ConsulError::Forbidden(_) => true,
            ConsulError::Status(status, _) => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            ConsulError::Decode(_) | ConsulError::Filtered(_) => false,
        }
    }
}

/// An answer: status, body and `X-Consul-Index` (absent on some paths).
pub struct Answer {
    /// The status (always 2xx from [`ConsulClient::get`]).
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
    /// `X-Consul-Index`, if sent.
    pub index: Option<u64>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not read
    /// everything the list holds, and Consul left that out.
    pub filtered: bool,
    /// A stale read's answer older than `MAX_STALE` (its server had not
    /// heard from the leader for longer): judged from
    /// `X-Consul-LastContact`, which streaming answers leave out (taken as
    /// fresh).
    pub too_old: bool,
}

impl ConsulClient {
    /// A client for `cfg`; the ACL token is read from `cfg.token_env`.
    /// Fails when a TLS file cannot be read or used.
    pub fn new(cfg: &ConsulSource) -> Result<ConsulClient, TlsSetupError> {
        let token = std::env::var(&cfg.token_env).ok().filter(|t| !t.is_empty());
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(ConsulClient {
            base: cfg.addr.trim_end_matches('/').to_owned(),
            token,
            datacenter: cfg.datacenter.clone(),
            stale: cfg.stale,
            http: Client::builder(TokioExecutor::new()).build(connector),
            max_body: 64 * 1024 * 1024,
        })
    }

    /// This client, reading answers of at most `bytes` (`max_body_bytes`);
    /// a longer one is an error.
    pub fn with_max_body(mut self, bytes: usize) -> ConsulClient {
        self.max_body = bytes;
        self
    }

    /// GET `path` as a blocking query at `index` (0: answer at once);
    /// any non-2xx is an error.
    pub async fn get(&self, path: &str, index: u64, wait: Duration) -> Result<Answer, ConsulError> {
        let answer = self
            .call(http::Method::GET, path, "", index, wait, Bytes::new())
            .await?;
        check(answer)
    }

    /// One call. `query`: extra parameters (`recurse`, `cas=3`, ...).
    /// Returns every status; transport failures and time-outs are errors.
    /// A GET may be answered by any server when `consul.stale` is on.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        query: &str,
        index: u64,
        wait: Duration,
        body: Bytes,
    ) -> Result<Answer, ConsulError> {
        let stale = self.stale && method == http::Method::GET;
        let answer = (self.send(
            method.clone(),
            path,
            query,
            (index, wait),
            stale,
            body.clone(),
        ))
        .await?;
        if !answer.too_old {
            return Ok(answer);
        }
        // `max_stale` has Consul ask the leader again for catalog and
        // health reads only (API.md 4: `RETRY_ONCE`); a KV read comes
        // back from a server cut off from the leader as it is, frozen.
        // Its headers tell: asked again of the leader, once, as Consul
        // would.
        self.send(method, path, query, (index, wait), false, body)
            .await
    }

    /// GET `path` from the leader, whatever `consul.stale` says: a read
    /// whose `ModifyIndex` a check-and-set write presents must not come
    /// from a follower that lags (the write would fail for no writer).
    pub async fn read_for_write(&self, path: &str, query: &str) -> Result<Answer, ConsulError> {
        let (get, zero) = (http::Method::GET, (0, Duration::ZERO));
        self.send(get, path, query, zero, false, Bytes::new()).await
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        query: &str,
        (index, wait): (u64, Duration),
        stale: bool,
        body: Bytes,
    ) -> Result<Answer, ConsulError> {
        let mut params: Vec<String> = Vec::new();
        if !query.is_empty() {
            params.push(query.to_owned());
        }
        if index > 0 {
            // Whole milliseconds, as the official client sends them.
            params.push(format!("index={index}&wait={}ms", wait.as_millis().max(1)));
        }
        if let Some(dc) = &self.datacenter {
            params.push(format!("dc={dc}"));
        }
        if stale {
            // Any server may answer, unless it has not heard from the
            // leader for `MAX_STALE`: then Consul asks the leader (a
            // follower cut off would serve its frozen state forever) for
            // catalog and health reads, and `call` does for the rest.
            params.push(format!("max_stale={}s", MAX_STALE.as_secs()));
        }
        let mut uri = format!("{}{path}", self.base);
        if !params.is_empty() {
            uri.push('?');
            uri.push_str(&params.join("&"));
        }
        let mut req = hyper::Request::builder().method(method).uri(uri);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ConsulError::Transport(e.to_string()))?;
        // Consul may hold up to wait + wait/16; allow that plus slack.
        let limit = if index > 0 {
            wait + wait / 16 + Duration::from_secs(5)
        } else {
            Duration::from_secs(15)
        };
        let work = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| ConsulError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let filtered = resp
                .headers()
                .get("x-consul-results-filtered-by-acls")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            // As Consul's own `max_stale` judges: by the time since the
            // answering server heard from the leader, not by whether it
            // knows one now (during an election none does, and asking the
            // leader would fail every read that `stale` is there to keep).
            let too_old = stale
                && (resp.headers().get("x-consul-lastcontact"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|ms| u128::from(ms) > MAX_STALE.as_millis());
            let body = Limited::new(resp.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    ConsulError::Transport(format!(
                        "reading the answer: {e} (max_body_bytes: {})",
                        self.max_body
                    ))
                })?
                .to_bytes();
            Ok(Answer {
                status,
                body,
                index,
                filtered,
                too_old,
            })
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| ConsulError::Transport("read timed out".into()))?
    }
}

/// The TLS settings for an `https://` Consul (unused for `http://`): the
/// CAs of `ca_file` or the system's roots, and the client certificate.
fn tls_config(cfg: &ConsulSource) -> Result<rustls::ClientConfig, TlsSetupError> {
    let fail = |key: &'static str, path: &Path, reason: String| TlsSetupError {
        key,
        path: path.display().to_string(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| fail("ca_file", path, e.to_string()))?;
            if certs.is_empty() {
                return Err(fail("ca_file", path, "no certificate in the file".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| fail("ca_file", path, e.to_string()))?;
            }
        }
        None if cfg.addr.starts_with("https://") => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's trusted roots");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("no trusted roots found on this system: set source.consul.ca_file");
            }
        }
        None => {}
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("addr", Path::new(&cfg.addr), e.to_string()))?
        .with_root_certificates(roots);
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| fail("cert_file", cert, e.to_string()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| fail("key_file", key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| fail("key_file", key, e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Turns a non-2xx answer into the matching error.
pub fn check(answer: Answer) -> Result<Answer, ConsulError> {
    let text = || String::from_utf8_lossy(&answer.body).trim().to_owned();
    match answer.status {
        s if s.is_success() => Ok(answer),
        StatusCode::FORBIDDEN => Err(ConsulError::Forbidden(text())),
        s => Err(ConsulError::Status(s, text())),
    }
}

/// One blocking-query loop's bookkeeping (API.md 2.4): the index to
/// block on, a rate limit, and the back-off after errors.
pub(crate) struct Blocking {
    pub(crate) index: u64,
    failures: u32,
    /// Token bucket: a couple of quick deliveries, then at most one a second.
    tokens: f64,
    refilled: Instant,
}

impl Blocking {
    pub(crate) fn new() -> Blocking {
        Blocking {
            index: 0,
            failures: 0,
            tokens: 2.0,
            refilled: Instant::now(),
        }
    }

    /// Waits for a token before the next request.
    pub(crate) async fn pace(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64()).min(2.0);
        self.refilled = now;
        if self.tokens < 1.0 {
            let wait = Duration::from_secs_f64(1.0 - self.tokens);
            tokio::time::sleep(wait).await;
            self.tokens = 1.0;
            self.refilled = Instant::now();
        }
        self.tokens -= 1.0;
    }

    /// Takes the index of a successful answer; `true` when it moved
    /// forward (content may have changed).
    pub(crate) fn advance(&mut self, returned: Option<u64>) -> bool {
        self.failures = 0;
        let returned = returned.unwrap_or(0);
        let moved = returned != self.index;
        self.index = if returned < self.index {
            // Went backwards (restore, other cluster): start over with a
            // non-blocking read next time.
            0
        } else {
            // Never block on 0 (a busy loop): 1 is always safe.
            returned.max(1)
        };
        moved
    }

    /// After an error: forget the index and wait, longer each time.
    pub(crate) async fn back_off(&mut self, what: &str, error: &ConsulError, state: &State) {
        self.failures += 1;
        self.index = 0;
        state.metrics.consul_errors.inc();
        state.metrics.consul_up.set(i64::from(!error.cuts_off()));
        let pause = BACKOFF.pause(self.failures);
        tracing::warn!(watch = what, %error, failures = self.failures, retry_in = ?pause, "consul query failed; keeping the last state");
        tokio::time::sleep(pause).await;
    }
}

/// Watches the catalog and every wanted service until the task is dropped.
pub async fn run(
    cfg: ConsulSource,
    client: ConsulClient,
    subset_key: String,
    zone_key: String,
    state: Arc<State>,
) {
    // Served name -> (its Consul name, its watch).
    let mut watches: HashMap<String, (String, JoinHandle<()>)> = HashMap::new();
    // Names left out, each logged once.
    let mut refused: HashSet<String> = HashSet::new();
    let mut blocking = Blocking::new();
    // Whether the last list was filtered by ACLs.
    let mut hidden = false;
    // Whether the connection warning was given.
    let mut warned = false;
    loop {
        blocking.pace().await;
        let answer = match client
            .get("/v1/catalog/services", blocking.index, cfg.wait)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                blocking.back_off("catalog", &e, &state).await;
                continue;
            }
        };
        // Consul answers (an unchanged index included): whichever watch
        // failed last, it is up again.
        state.metrics.consul_up.set(1);
        let index = answer.index.unwrap_or(0);
        if !blocking.advance(answer.index) && !watches.is_empty() {
            continue;
        }
        let names: BTreeMap<String, serde_json::Value> = match serde_json::from_slice(&answer.body)
        {
            Ok(n) => n,
            Err(e) => {
                blocking
                    .back_off("catalog", &ConsulError::Decode(e.to_string()), &state)
                    .await;
                continue;
            }
        };
        let wanted = served(names.into_keys(), &cfg.services, &mut refused);
        // A list the token's ACLs filtered leaves out what it may not read,
        // not what is gone: then a service missing from it stays, its own
        // health watch keeping its last state (API.md 9).
        if answer.filtered != hidden {
            hidden = answer.filtered;
            if hidden {
                tracing::warn!("the catalog's list is filtered by the token's ACLs (service:read); services missing from it are kept");
            }
        }
        // Stop watching services that are gone (or now come from another
        // Consul name), and drop them.
        let stopped: Vec<String> = watches
            .iter()
            .filter(|(name, (consul, _))| match wanted.get(*name) {
                Some(c) => c != consul,
                None => !hidden,
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopped {
            if let Some((_, task)) = watches.remove(&name) {
                task.abort();
                // Removed once the watch has stopped: one answering on
                // another thread as it was aborted would set the service
                // again after its removal, for good.
                let _ = task.await;
                state.remove_service(&name, index);
            }
        }
        // Start watching new ones.
        for (name, consul) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = watches.entry(name) {
                let name = slot.key().clone();
                state.expect_service(&name);
                let health = watch_service(
                    client.clone(),
                    Names {
                        served: name.clone(),
                        consul: consul.clone(),
                    },
                    (subset_key.clone(), zone_key.clone()),
                    cfg.defaults_for(&name).cloned(),
                    cfg.wait,
                    state.clone(),
                );
                let intentions = cfg.intentions.as_ref().map(|i| {
                    state.expect_intentions(&name);
                    let names = Names {
                        served: name,
                        consul: consul.clone(),
                    };
                    let default_allow = i.default == almond_config::IntentionDefault::Allow;
                    let domain = i.trust_domain.clone();
                    watch_intentions(
                        client.clone(),
                        names,
                        (domain, default_allow),
                        state.clone(),
                    )
                });
                let task = tokio::spawn(async move {
                    match intentions {
                        Some(intentions) => drop(tokio::join!(health, intentions)),
                        None => health.await,
                    }
                });
                slot.insert((consul, task));
            }
        }
        state.metrics.consul_watches.set(watches.len() as i64);
        if watches.len() > WATCHES_WARNED && !warned {
            warned = true;
            tracing::warn!(
                watches = watches.len(),
                "one blocking query (one connection) per followed service: Consul's agent allows {CONSUL_DEFAULT_CONNS} connections per client address by default (limits.http_max_conns_per_client); raise it, or list the services to follow in source.consul.services"
            );
        }
        state.catalog_synced();
    }
}

/// Followed services past which the agent's connection limit is near:
/// a warning says so, once.
const WATCHES_WARNED: usize = 150;
/// Consul's default `limits.http_max_conns_per_client`.
const CONSUL_DEFAULT_CONNS: usize = 200;

/// A served service's two names: the one proxies know it by (what
/// clients send in `Host`, in lower case) and the one Consul has.
struct Names {
    served: String,
    consul: String,
}

/// The Consul services to serve (those `only` lists, when it lists any),
/// by the name proxies know them by: Consul's name in lower case, as
/// clients' `Host` is matched (host names are case-insensitive, and so is
/// Consul's DNS interface: `Orders` is served as `orders`). Left out, each
/// with its reason logged once: a name no `Host` can be (`my orders`),
/// and one that differs from another only in case (`Orders` when `orders`
/// exists too: the name already in lower case wins, else the first in
/// Consul's order).
fn served(
    names: impl Iterator<Item = String>,
    only: &[String],
    refused: &mut HashSet<String>,
) -> BTreeMap<String, String> {
    let mut refuse = |name: &str, why: &str| {
        if refused.insert(name.to_owned()) {
            tracing::warn!(service = %name, reason = %why, "Consul service not served");
        }
    };
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for consul in names.filter(|n| n != "consul") {
        let served = consul.to_ascii_lowercase();
        if !only.is_empty() && !only.contains(&served) {
            continue;
        }
        if let Err(why) = almond_config::check_service_name(&served) {
            refuse(&consul, &why);
            continue;
        }
        match out.get(&served) {
            Some(other) if *other == served || consul != served => {
                let why = format!("{other:?} is served as {served:?} already");
                refuse(&consul, &why);
                continue;
            }
            Some(other) => {
                let why = format!("{consul:?} is served as {served:?} instead");
                refuse(&other.clone(), &why);
            }
            None => {}
        }
        out.insert(served, consul);
    }
    out
}

/// One service's health watch; `defaults`: its `service_defaults`.
async fn watch_service(
    client: ConsulClient,
    Names {
        served: name,
        consul,
    }: Names,
    (subset_key, zone_key): (String, String),
    defaults: Option<ServiceDefaults>,
    wait: Duration,
    state: Arc<State>,
) {
    let path = format!("/v1/health/service/{}", percent_encode(&consul));
    let mut blocking = Blocking::new();
    // The state served came from an answer filtered by ACLs.
    let mut partial = false;
    loop {
        blocking.pace().await;
        let answer = match client.get(&path, blocking.index, wait).await {
            Ok(a) => a,
            Err(e) => {
                blocking.back_off(&name, &e, &state).await;
                continue;
            }
        };
        state.metrics.consul_up.set(1);
        // Instances the token may not see are not gone: keep the last
        // state rather than serve the service without them. With no state
        // yet (a start), the instances it can see are served: the control
        // plane must get ready, and serve every other service, meanwhile.
        // Served from a filtered answer already (the token never saw them
        // all), later filtered answers keep the visible instances current.
        if answer.filtered {
            let hidden = ConsulError::Filtered("node:read and service:read on every instance");
            if state.has_service(&name) && !partial {
                blocking.back_off(&name, &hidden, &state).await;
                continue;
            }
            if !partial {
                tracing::warn!(service = %name, error = %hidden, "serving the instances the token can see, until it sees them all");
            }
        }
        let index = answer.index.unwrap_or(0);
        if !blocking.advance(answer.index) && state.has_service(&name) {
            continue;
        }
        match serde_json::from_slice::<Vec<Instance>>(&answer.body) {
            Ok(mut instances) => {
                // Connect's sidecar proxies and mesh-side gateways
                // (registered as services of their own, such as
                // `web-sidecar-proxy`) speak mTLS on their ports: no
                // endpoint of a plain HTTP service. Ingress and API
                // gateways serve plain HTTP, and stay.
                //
                // Consul looks service names up regardless of case: the
                // answer for `billing` holds `Billing`'s instances too,
                // and those are another service (`served` chose one).
                instances.retain(|i| {
                    !matches!(
                        i.service.kind.as_deref(),
                        Some("connect-proxy" | "mesh-gateway" | "terminating-gateway")
                    ) && (i.service.service.is_empty() || i.service.service == consul)
                });
                let resolved = resolve_hosts(&name, &instances).await;
                let keys = (subset_key.as_str(), zone_key.as_str());
                let mut service = to_service_resolved(&name, &instances, keys, &resolved);
                if let Some(defaults) = &defaults {
                    defaults.apply(&mut service);
                }
                state.set_registered(&name, registered(&instances, &subset_key));
                state.set_service(&name, service, index);
                partial = answer.filtered;
            }
            Err(e) => {
                blocking
                    .back_off(&name, &ConsulError::Decode(e.to_string()), &state)
                    .await;
            }
        }
    }
}

/// How often a service's intentions are read again (the match endpoint
/// does not block).
const INTENTIONS_EVERY: Duration = Duration::from_secs(2);

/// One service's intentions, polled: the allow-list they give it.
async fn watch_intentions(
    client: ConsulClient,
    Names {
        served: name,
        consul,
    }: Names,
    (trust_domain, default_allow): (String, bool),
    state: Arc<State>,
) {
    let query = format!("by=destination&name={}", percent_encode(&consul));
    let path = "/v1/connect/intentions/match";
    let mut failures = 0;
    loop {
        let answer = client
            .call(
                http::Method::GET,
                path,
                &query,
                0,
                Duration::ZERO,
                Bytes::new(),
            )
            .await
            .and_then(check);
        // A name no intention applies to may come as `null` (a Go nil
        // slice), not `[]`: none, not an error.
        let read = answer.and_then(|a| {
            serde_json::from_slice::<BTreeMap<String, Option<Vec<Intention>>>>(&a.body)
                .map_err(|e| ConsulError::Decode(e.to_string()))
        });
        // A failed read keeps the last list (before the first: nobody), and
        // the next waits longer each time (API.md 2.4: no hot loop on 403,
        // back off on 429 and 5xx).
        let pause = match read {
            Ok(mut all) => {
                failures = 0;
                state.metrics.consul_up.set(1);
                let list = all.remove(&consul).flatten().unwrap_or_default();
                let allow = allow_list(&list, &trust_domain, default_allow);
                state.set_intentions(&name, allow);
                INTENTIONS_EVERY
            }
            Err(e) => {
                // Counted, but `consul_up` is the blocking queries' to
                // set: a token without `intentions:read` whose catalog
                // and health reads work is not cut off from Consul.
                failures += 1;
                state.metrics.consul_errors.inc();
                let pause = BACKOFF.pause(failures).max(INTENTIONS_EVERY);
                tracing::warn!(service = %name, error = %e, failures, retry_in = ?pause, "intentions query failed; keeping the last allow-list");
                pause
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// One element of `/v1/connect/intentions/match` (the fields we use).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Intention {
    /// The calling service, or `*`.
    pub source_name: String,
    /// `allow` or `deny` (absent for L7 intentions with permissions).
    #[serde(default)]
    pub action: Option<String>,
    /// The cluster peer the source is in; empty = this cluster.
    #[serde(default)]
    pub source_peer: Option<String>,
    /// The source's namespace (Enterprise): `default`, `*` or empty here.
    #[serde(default, rename = "SourceNS")]
    pub source_ns: Option<String>,
    /// The source's admin partition (Enterprise): `default` or empty here.
    #[serde(default)]
    pub source_partition: Option<String>,
    /// A sameness group of sources (Enterprise), which may span peers.
    #[serde(default)]
    pub source_sameness_group: Option<String>,
}

/// Which of this cluster's callers an intention's source names, as
/// Consul's `IntentionMatch` decides it for a caller of the default
/// namespace and partition (the only ones mesh certificates name).
enum Reach {
    /// Callers of this cluster (named, or every one for `*`).
    Local,
    /// A peer's, another namespace's or partition's: none of ours.
    Foreign,
    /// A sameness group: which clusters it spans is not in the answer.
    Unknown,
}

impl Intention {
    fn reach(&self) -> Reach {
        let empty_or = |v: &Option<String>, ok: &[&str]| {
            v.as_deref().is_none_or(|v| v.is_empty() || ok.contains(&v))
        };
        if !empty_or(&self.source_sameness_group, &[]) {
            Reach::Unknown
        } else if empty_or(&self.source_peer, &[])
            && empty_or(&self.source_ns, &["default", "*"])
            && empty_or(&self.source_partition, &["default"])
        {
            Reach::Local
        } else {
            Reach::Foreign
        }
    }
}

/// The allow-list intentions give a destination, as Consul orders them
/// (most precise first): each source with `allow` before any `deny` for
/// it, as `spiffe://TRUST_DOMAIN/service/SOURCE`. Intentions for sources
/// in a cluster peer, another namespace or partition name none of this
/// cluster's callers and are skipped (a peer's `web` is not our `web`); a
/// sameness group's deny counts as a deny of its name, its allow is
/// skipped (fail closed). A source no intention names gets the
/// configured default (`default_allow`, `intentions.default`, as the
/// Consul's own is): with `deny` (its production setting) no intentions
/// at all admit nobody, so deleting the last intention revokes; with
/// `allow`, no deny means every verified client (no list). A `*`
/// allow with no deny before it: every verified client. A `*` allow after
/// a deny, or a default allow beside denies, cannot be said as an
/// allow-list: only the explicit allows (fail closed), warned. L7
/// intentions (no `Action`) count as deny.
pub fn allow_list(
    intentions: &[Intention],
    trust_domain: &str,
    default_allow: bool,
) -> Option<almond_config::Authz> {
    let mut allow = Vec::new();
    let mut denied = Vec::new();
    let mut wildcard = false;
    for i in intentions {
        let allows = match i.reach() {
            Reach::Local => i.action.as_deref() == Some("allow"),
            // A group's allow may name no caller of ours: skipped; its
            // deny may: kept (fail closed).
            Reach::Unknown if i.action.as_deref() == Some("allow") => continue,
            Reach::Unknown => false,
            Reach::Foreign => continue,
        };
        if i.source_name == "*" {
            if allows && denied.is_empty() {
                return None;
            }
            if allows {
                tracing::warn!(
                    denied = ?denied,
                    "a * allow intention after denies: only the explicit allows are admitted"
                );
            }
            wildcard = true;
            break;
        }
        let id = format!("spiffe://{trust_domain}/service/{}", i.source_name);
        if allow.contains(&id) || denied.contains(&id) {
            continue;
        }
        if allows {
            allow.push(id);
        } else {
            denied.push(id);
        }
    }
    if default_allow && !wildcard {
        if denied.is_empty() {
            return None;
        }
        tracing::warn!(
            denied = ?denied,
            "deny intentions under intentions.default allow: only the explicit allows are admitted"
        );
    }
    Some(almond_config::Authz { allow })
}

/// One element of `/v1/health/service/{name}` (the fields we use).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    /// The node the instance runs on.
    pub node: Node,
    /// The instance.
    pub service: InstanceService,
    /// Node-level and instance checks.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// The node of an instance.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// The node's address (used when the service has none).
    #[serde(default)]
    pub address: String,
    /// Node metadata (the zone, by `zone_key`, when the service's has none).
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
}

/// An instance's service record.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceService {
    /// Instance ID.
    #[serde(default, rename = "ID")]
    pub id: String,
    /// The service's name, as registered.
    #[serde(default)]
    pub service: String,
    /// `connect-proxy`, `mesh-gateway`, ...: Consul Connect's proxies
    /// and gateways; empty (or absent) for the service itself.
    #[serde(default)]
    pub kind: Option<String>,
    /// Address; empty means the node's.
    #[serde(default)]
    pub address: String,
    /// Port.
    #[serde(default)]
    pub port: u16,
    /// Metadata (`version`, `protocol`, ...).
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// DNS-style weights.
    #[serde(default)]
    pub weights: Option<Weights>,
}

/// `Weights` of an instance.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    /// Weight while every check passes.
    #[serde(default = "one")]
    pub passing: u32,
    /// Weight while a check warns (0 drains).
    #[serde(default = "one")]
    pub warning: u32,
}

fn one() -> u32 {
    1
}

/// A health check.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check {
    /// Check ID (maintenance checks have reserved IDs).
    #[serde(default, rename = "CheckID")]
    pub check_id: String,
    /// `passing`, `warning` or `critical`.
    #[serde(default)]
    pub status: String,
}

/// Consul's rules (API.md section 12): maintenance or any critical check
/// -> out; any warning -> `Weights.Warning` (0 -> out); else
/// `Weights.Passing`. Returns the weight, or `None` for no traffic.
pub fn instance_weight(instance: &Instance) -> Option<u32> {
    let checks = &instance.checks;
    let maintenance = checks.iter().any(|c| {
        c.check_id == "_node_maintenance" || c.check_id.starts_with("_service_maintenance:")
    });
    if maintenance || checks.iter().any(|c| c.status == "critical") {
        return None;
    }
    let (passing, warning) = instance
        .service
        .weights
        .as_ref()
        .map_or((1, 1), |w| (w.passing, w.warning));
    let weight = if checks.iter().any(|c| c.status == "warning") {
        warning
    } else {
        passing
    };
    (weight >= 1).then_some(weight.min(10_000))
}

/// Turns a health answer into the service a proxy gets: healthy instances
/// with their weights, subset from `Meta[subset_key]`, protocol from
/// `Meta.protocol`. Instances whose address is a host name are skipped:
/// see [`to_service_resolved`].
pub fn to_service(name: &str, instances: &[Instance], subset_key: &str) -> Service {
    to_service_resolved(name, instances, (subset_key, "zone"), &HashMap::new())
}

/// The address an instance is reached at: the service's, else its node's.
fn address_of(inst: &Instance) -> &str {
    if inst.service.address.is_empty() {
        &inst.node.address
    } else {
        &inst.service.address
    }
}

/// Longest one host name's lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Resolves the instance addresses that are host names (Consul allows them
/// in `Service.Address`): each to its first IPv4 address, else its first
/// address. A name that does not resolve in time is left out (and its
/// instances with it), with a warning.
pub async fn resolve_hosts(name: &str, instances: &[Instance]) -> HashMap<String, IpAddr> {
    let mut out = HashMap::new();
    for inst in instances {
        let host = address_of(inst);
        if host.is_empty() || host.parse::<IpAddr>().is_ok() || out.contains_key(host) {
            continue;
        }
        let lookup = tokio::net::lookup_host((host, inst.service.port));
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                let pick = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first());
                if let Some(addr) = pick {
                    out.insert(host.to_owned(), addr.ip());
                    continue;
                }
                tracing::warn!(service = name, address = %host, "instance host name has no address; skipped");
            }
            Ok(Err(e)) => {
                tracing::warn!(service = name, address = %host, error = %e, "instance host name does not resolve; skipped")
            }
            Err(_) => {
                tracing::warn!(service = name, address = %host, "instance host name lookup timed out; skipped")
            }
        }
    }
    out
}

/// [`to_service`] with the zone from `Service.Meta[zone_key]`, else
/// `Node.Meta[zone_key]`, and host names looked up in `resolved` (from
/// [`resolve_hosts`]).
pub fn to_service_resolved(
    name: &str,
    instances: &[Instance],
    (subset_key, zone_key): (&str, &str),
    resolved: &HashMap<String, IpAddr>,
) -> Service {
    let mut endpoints = Vec::new();
    let mut protocol = Protocol::Http1;
    for inst in instances {
        let meta = inst.service.meta.as_ref();
        if let Some(p) = meta.and_then(|m| m.get("protocol")) {
            match p.as_str() {
                "http2" | "grpc" | "h2" | "h2c" => protocol = Protocol::Http2,
                "http" | "http1" => protocol = Protocol::Http1,
                other => tracing::debug!(
                    service = name,
                    protocol = other,
                    "unknown protocol meta; using http1"
                ),
            }
        }
        let Some(weight) = instance_weight(inst) else {
            continue;
        };
        let host = address_of(inst);
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => match resolved.get(host) {
                Some(ip) => *ip,
                None => {
                    tracing::warn!(service = name, instance = %inst.service.id, address = %host, "instance address is not an IP and was not resolved; skipped");
                    continue;
                }
            },
        };
        let subset = meta
            .and_then(|m| m.get(subset_key))
            .filter(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_SUBSET.to_owned());
        endpoints.push(Endpoint {
            addr: SocketAddr::new(ip, inst.service.port),
            subset,
            weight,
            zone: zone_of(inst, zone_key),
        });
    }
    // Stable order, so an unchanged set compares equal.
    endpoints.sort_by(|a, b| (&a.subset, a.addr).cmp(&(&b.subset, b.addr)));
    // One endpoint an address, whichever subsets list it (an instance
    // registered again with a new version before the old one is gone):
    // proxies refuse a service listing an address twice.
    let mut seen = std::collections::HashSet::new();
    endpoints.retain(|e| {
        let first = seen.insert(e.addr);
        if !first {
            tracing::debug!(service = name, addr = %e.addr, subset = %e.subset, "address registered twice: kept once");
        }
        first
    });
    Service {
        protocol,
        lb: Default::default(),
        endpoints,
        split: None,
        routes: Vec::new(),
        guards: Vec::new(),
        mirror: None,
        timeouts: Default::default(),
        circuit_breaker: Default::default(),
        retries: Default::default(),
        health_check: None,
        authz: None,
        tls: None,
        grpc: Default::default(),
    }
}

/// An instance's zone: `Service.Meta[zone_key]`, else `Node.Meta[zone_key]`.
fn zone_of(inst: &Instance, zone_key: &str) -> Option<String> {
    [inst.service.meta.as_ref(), inst.node.meta.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|m| m.get(zone_key).filter(|z| !z.is_empty()).cloned())
}

/// Instances per subset, healthy or not (for `almond status`'s total).
pub fn registered(instances: &[Instance], subset_key: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for inst in instances {
        let subset = inst
            .service
            .meta
            .as_ref()
            .and_then(|m| m.get(subset_key))
            .filter(|s| !s.is_empty())
            .map_or(DEFAULT_SUBSET, String::as_str);
        *out.entry(subset.to_owned()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `almond_control_consul_up` drops for a Consul that cannot be
    /// reached, cannot serve or refuses the token, not for one whose
    /// answer is partial or unreadable.
    #[test]
    fn only_a_consul_that_gives_nothing_is_down() {
        let down = [
            ConsulError::Transport("connection refused".into()),
            ConsulError::Status(StatusCode::INTERNAL_SERVER_ERROR, "No leader".into()),
            ConsulError::Status(StatusCode::TOO_MANY_REQUESTS, String::new()),
            ConsulError::Forbidden("ACL not found".into()),
        ];
        assert!(down.iter().all(ConsulError::cuts_off));
        let up = [
            ConsulError::Status(StatusCode::NOT_FOUND, String::new()),
            ConsulError::Decode("expected a list".into()),
            ConsulError::Filtered("service:read"),
        ];
        assert!(!up.iter().any(ConsulError::cuts_off));
    }

    fn instance(json: serde_json::Value) -> Instance {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn intentions_make_an_allow_list_most_precise_first() {
        let i = |s: &str, a: Option<&str>| Intention {
            source_name: s.to_owned(),
            action: a.map(str::to_owned),
            ..Intention::default()
        };
        let id = |s: &str| format!("spiffe://td/service/{s}");
        // None at all: nobody (Consul with its ACL default policy deny).
        assert_eq!(
            allow_list(&[], "td", false).map(|a| a.allow),
            Some(Vec::new())
        );
        let list = allow_list(
            &[
                i("web", Some("allow")),
                i("ads", Some("deny")),
                i("*", Some("deny")),
            ],
            "td",
            false,
        );
        assert_eq!(list.unwrap().allow, vec![id("web")]);
        // A wildcard allow with nothing denied before it: no list.
        assert_eq!(
            allow_list(
                &[i("web", Some("allow")), i("*", Some("allow"))],
                "td",
                false
            ),
            None
        );
        // After a deny, it cannot be said: the explicit allows only.
        let list = allow_list(
            &[i("ads", Some("deny")), i("*", Some("allow"))],
            "td",
            false,
        )
        .unwrap();
        assert!(list.allow.is_empty());
        // L7 intentions (permissions, no action) count as deny.
        let list = allow_list(&[i("web", None)], "td", false).unwrap();
        assert!(list.allow.is_empty());
    }

    /// Consul's default decides for sources no intention names: under
    /// `allow` (ACLs off), no intention or only allows admit everyone; a
    /// `*` deny still closes; denies beside the default allow cannot be
    /// said as an allow-list, so only the explicit allows (fail closed).
    #[test]
    fn intentions_under_a_default_allow() {
        let i = |s: &str, a: &str| Intention {
            source_name: s.to_owned(),
            action: Some(a.to_owned()),
            ..Intention::default()
        };
        let id = |s: &str| format!("spiffe://td/service/{s}");
        assert_eq!(allow_list(&[], "td", true), None);
        assert_eq!(allow_list(&[i("web", "allow")], "td", true), None);
        let list = allow_list(&[i("web", "allow"), i("*", "deny")], "td", true);
        assert_eq!(list.unwrap().allow, vec![id("web")]);
        let list = allow_list(&[i("web", "allow"), i("ads", "deny")], "td", true);
        assert_eq!(list.unwrap().allow, vec![id("web")]);
    }

    /// An intention for a cluster peer's, another namespace's or another
    /// partition's source names none of this cluster's callers: a peer's
    /// `web` (or a peer's `*`) admits neither the local `web` nor everyone,
    /// and a peer's deny does not shadow the local `web`'s allow. A
    /// sameness group's allow is skipped, its deny kept (fail closed).
    #[test]
    fn intentions_for_other_clusters_name_no_local_caller() {
        let decode =
            |json: serde_json::Value| -> Vec<Intention> { serde_json::from_value(json).unwrap() };
        let id = |s: &str| format!("spiffe://td/service/{s}");
        let peer_web = decode(serde_json::json!([
            {"SourcePeer": "dc2", "SourceName": "web", "SourceNS": "default", "Action": "allow"},
        ]));
        assert_eq!(
            allow_list(&peer_web, "td", false).unwrap().allow,
            Vec::<String>::new()
        );
        let peer_any = decode(serde_json::json!([
            {"SourcePeer": "dc2", "SourceName": "*", "Action": "allow"},
        ]));
        assert_eq!(
            allow_list(&peer_any, "td", false).unwrap().allow,
            Vec::<String>::new()
        );
        let shadowed = decode(serde_json::json!([
            {"SourcePeer": "dc2", "SourceName": "web", "Action": "deny"},
            {"SourceName": "web", "SourceNS": "default", "SourcePartition": "default", "Action": "allow"},
            {"SourceName": "ads", "SourceNS": "team-a", "Action": "allow"},
            {"SourceName": "pay", "SourcePartition": "eu", "Action": "allow"},
            {"SourceName": "api", "SourceNS": "*", "Action": "allow"},
        ]));
        let list = allow_list(&shadowed, "td", false).unwrap().allow;
        assert_eq!(list, vec![id("web"), id("api")]);
        let group = decode(serde_json::json!([
            {"SourceSamenessGroup": "g", "SourceName": "web", "Action": "allow"},
            {"SourceSamenessGroup": "g", "SourceName": "ads", "Action": "deny"},
            {"SourceSamenessGroup": "g", "SourceName": "*", "Action": "allow"},
            {"SourceName": "web", "Action": "allow"},
            {"SourceName": "ads", "Action": "allow"},
        ]));
        let list = allow_list(&group, "td", false).unwrap().allow;
        assert_eq!(list, vec![id("web")]);
    }

    /// A destination with no intention may be answered `null` (Go's nil
    /// slice): no intentions, not a decoding error.
    #[test]
    fn a_null_intention_list_is_none() {
        let all: BTreeMap<String, Option<Vec<Intention>>> =
            serde_json::from_str(r#"{"orders": null}"#).unwrap();
        assert!(all["orders"].is_none());
    }

    #[test]
    fn health_rules_follow_consul() {
        let base = |checks: serde_json::Value, weights: serde_json::Value| {
            instance(serde_json::json!({
                "Node": {"Address": "10.0.0.1"},
                "Service": {"ID": "w1", "Address": "", "Port": 80, "Weights": weights},
                "Checks": checks,
            }))
        };
        let w = serde_json::json!({"Passing": 3, "Warning": 1});
        assert_eq!(
            instance_weight(&base(serde_json::json!([]), w.clone())),
            Some(3)
        );
        let warn = serde_json::json!([{"CheckID": "a", "Status": "warning"}]);
        assert_eq!(instance_weight(&base(warn, w.clone())), Some(1));
        let crit = serde_json::json!([{"CheckID": "a", "Status": "critical"}]);
        assert_eq!(instance_weight(&base(crit, w.clone())), None);
        let maint =
            serde_json::json!([{"CheckID": "_service_maintenance:w1", "Status": "critical"}]);
        assert_eq!(instance_weight(&base(maint, w)), None);
        let drain = serde_json::json!([{"CheckID": "a", "Status": "warning"}]);
        let w0 = serde_json::json!({"Passing": 1, "Warning": 0});
        assert_eq!(instance_weight(&base(drain, w0)), None);
    }

    #[test]
    fn an_address_registered_twice_is_one_endpoint() {
        let at = |id: &str, port: u16, version: &str| {
            instance(serde_json::json!({
                "Node": {"Address": "10.0.0.1"},
                "Service": {"ID": id, "Address": "", "Port": port, "Meta": {"version": version}},
                "Checks": [],
            }))
        };
        // 10.0.0.1:80 in v1 and in v2, with another address between them
        // in the sorted order.
        let all = [at("a", 80, "v1"), at("b", 81, "v1"), at("c", 80, "v2")];
        let svc = to_service("web", &all, "version");
        let addrs: Vec<String> = svc.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.1:81"]);
    }

    #[test]
    fn blocking_index_rules() {
        let mut b = Blocking::new();
        assert!(b.advance(Some(10)));
        assert!(!b.advance(Some(10)), "same index: nothing changed");
        assert!(b.advance(Some(4)));
        assert_eq!(b.index, 0, "backwards: reset to a non-blocking read");
        b.advance(Some(0));
        assert_eq!(b.index, 1, "a 0 index is never waited on");
        let mut b = Blocking::new();
        b.index = 5;
        b.advance(None);
        assert_eq!(b.index, 0);
    }
}
