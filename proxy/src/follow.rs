//! Control: follow the control plane's snapshots (long-poll), apply them
//! through the one table swap, and keep a cache file for starts while the
//! control plane is away.

use crate::identity::tls::{CurrentIdentity, CurrentRoots, Tls, TlsError};
use crate::Proxy;
use almond_config::{validate_proxy, Problem, ProxyConfig, Secret, Snapshot};
use almond_net::{error_chain, percent_encode, Backoff};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long the control plane may hold a long-poll.
const WAIT: Duration = Duration::from_secs(30);
/// Slack on top of `WAIT` before the poll counts as failed.
const SLACK: Duration = Duration::from_secs(10);
/// The header with which a control plane says how far it has read its
/// policy store (the Consul index of its last read of every policy).
const POLICY_STAMP: &str = "x-almond-policy-index";
/// Longest a proxy keeps its state rather than take a replica's that is
/// behind the one it followed; past it the replica's is taken all the
/// same (after a Consul snapshot restore, every index is lower).
const BEHIND_LIMIT: Duration = Duration::from_secs(30);
/// Longest pause between failed polls.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Pauses after failed polls: 500 ms doubling to `MAX_BACKOFF`, each
/// keeping at least half its step.
const BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(500), MAX_BACKOFF).with_jitter(0.5);

/// Where a proxy is in the control plane's history: the epoch (numbering)
/// and the index within it of the state it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The control plane's epoch; 0 = unknown.
    pub epoch: u64,
    /// The index applied; 0 = nothing yet.
    pub index: u64,
}

impl Position {
    /// Whether `snapshot` is news: a higher index of the same epoch, or
    /// anything of another epoch (always a full snapshot).
    pub fn takes(&self, snapshot: &Snapshot) -> bool {
        if snapshot.epoch != self.epoch && snapshot.epoch != 0 {
            return true;
        }
        snapshot.index > self.index
    }
}

/// Loads the cache file into `config`'s services; returns the cached
/// position. A missing or bad cache is reported and ignored.
pub fn load_cache(config: &mut ProxyConfig) -> Option<Position> {
    let path = config.cache.clone()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            tracing::info!(cache = %path.display(), error = %e, "no snapshot cache");
            return None;
        }
    };
    let snapshot: Snapshot = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cache = %path.display(), error = %e, "snapshot cache unreadable; ignored");
            return None;
        }
    };
    let mut candidate = config.clone();
    let index = snapshot.index;
    let position = Position {
        epoch: snapshot.epoch,
        index,
    };
    candidate.services = snapshot.apply_to(&config.services);
    // As a snapshot is applied: a service this start cannot take (a `tls`
    // one, the proxy's identity since removed) stays out, and the rest
    // is served, rather than no service at all until the control plane
    // is back.
    let problems = validate_proxy(&candidate);
    let kept = keep_previous(&config.services, &mut candidate.services, problems).and_then(|_| {
        match validate_proxy(&candidate).into_iter().next() {
            Some(problem) => Err(problem.to_string()),
            None => Ok(()),
        }
    });
    if let Err(problem) = kept {
        tracing::warn!(cache = %path.display(), %problem, "snapshot cache invalid; ignored");
        return None;
    }
    *config = candidate;
    tracing::info!(cache = %path.display(), index, "serving from the snapshot cache");
    Some(position)
}

/// How this proxy reaches the control plane: the client (`http://` or
/// `https://`, trusting `control_ca`, else `tls.ca`, else the system's
/// roots, and presenting the proxy's own certificate when it has one), the
/// bearer token of `token_env`, and the largest snapshot it reads.
pub struct Link {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    token: Option<Secret>,
    max_bytes: usize,
}

/// Why the proxy cannot reach the control plane as configured.
#[derive(Debug, thiserror::Error)]
#[error("{key} ({path}): {reason}")]
pub struct LinkError {
    key: &'static str,
    path: String,
    reason: String,
}

impl Link {
    /// Builds the link for `config` (which has `control` set), presenting
    /// `identity` (the proxy's `tls`, as reloaded) when it has one. A
    /// configured token missing from the environment is an error, as is a
    /// CA file that cannot be used.
    pub fn new(config: &ProxyConfig, identity: Option<&Arc<Tls>>) -> Result<Link, LinkError> {
        let token =
            Secret::from_config("token_env", config.token_env.as_deref()).map_err(|reason| {
                LinkError {
                    key: "token_env",
                    path: config.token_env.clone().unwrap_or_default(),
                    reason,
                }
            })?;
        let tls = client_tls(config, identity)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Link {
            client,
            token,
            max_bytes: config.control_max_bytes,
        })
    }
}

/// The TLS client settings towards an `https://` control plane.
fn client_tls(
    config: &ProxyConfig,
    identity: Option<&Arc<Tls>>,
) -> Result<rustls::ClientConfig, LinkError> {
    let fail = |key: &'static str, path: &Path, reason: String| LinkError {
        key,
        path: path.display().to_string(),
        reason,
    };
    let ca = match (&config.control_ca, &config.tls) {
        (Some(ca), _) => Some(("control_ca", ca)),
        (None, Some(tls)) => Some(("tls.ca", &tls.ca)),
        (None, None) => None,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("control", Path::new(""), e.to_string()))?;
    let builder = match ca {
        // The CA file as it is at each handshake: rotated without a restart.
        Some((key, path)) => {
            let roots = CurrentRoots::load(key, path).map_err(|e| match e {
                TlsError::File { reason, .. } => fail(key, path, reason),
                other => fail(key, path, other.to_string()),
            })?;
            (builder.dangerous()).with_custom_certificate_verifier(Arc::new(roots))
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0
                && config
                    .control
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://"))
            {
                tracing::warn!("no trusted roots found on this system: set control_ca");
            }
            builder.with_root_certificates(roots)
        }
    };
    match identity {
        // The proxy's identity doubles as its credential towards a control
        // plane that verifies client certificates: the one in force at
        // each handshake, as its files are rotated.
        Some(tls) => Ok(builder.with_client_cert_resolver(Arc::new(CurrentIdentity(tls.clone())))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Follows the control plane at `url` until the task is dropped.
/// `at`: the position already applied (from the cache), default if none.
pub async fn follow(
    proxy: Proxy,
    link: Arc<Link>,
    url: String,
    proxy_id: String,
    admin: String,
    mut at: Position,
) {
    let shared = proxy.shared().clone();
    let mut failures = 0u32;
    // The first answer is the whole state, taken whatever its index: the
    // cache holds what this proxy took last time, which leaves out any
    // service it could not take then (a `tls` it had no identity for), and
    // a delta from the cache's index would never bring that back.
    let mut whole = true;
    // The policy stamp of the state taken last, and since when the
    // replica answering has been behind it.
    let mut stamp = 0u64;
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        let uri = format!(
            "{}/v1/snapshot?proxy={}&epoch={}&index={}&wait={}s&admin={}",
            url.trim_end_matches('/'),
            percent_encode(&proxy_id),
            if whole { 0 } else { at.epoch },
            if whole { 0 } else { at.index },
            WAIT.as_secs(),
            percent_encode(&admin),
        );
        let asked = tokio::time::Instant::now();
        match poll(&link, &uri).await {
            Ok((snapshot, unread, theirs)) => {
                failures = 0;
                shared.metrics.control_connected.set(1);
                let taken = (whole && snapshot.full) || at.takes(&snapshot);
                // Another replica (or this one restarted) whose read of
                // the policy store is older than the state this proxy
                // has: taken, it would put back a split or a guard that
                // a newer write replaced (a rollback undone). Not taken
                // until it catches up, for `BEHIND_LIMIT` at most.
                let other = snapshot.epoch != at.epoch && at.index != 0;
                let behind = taken
                    && !whole
                    && other
                    && theirs > 0
                    && theirs < stamp
                    && policies_differ(&shared.table.load().config.services, &snapshot);
                if !behind {
                    behind_since = None;
                } else {
                    let since = *behind_since.get_or_insert_with(|| {
                        tracing::warn!(ours = stamp, theirs, "control plane replica behind the state this proxy has (its policy store read is older): keeping ours until it catches up");
                        asked
                    });
                    if since.elapsed() < BEHIND_LIMIT {
                        // Asked again in a second, however long the
                        // answer took (its full snapshot comes at once).
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    tracing::warn!(ours = stamp, theirs, waited = ?BEHIND_LIMIT, "control plane replica still behind: taking its state");
                }
                if !taken {
                    // Wait timed out, or an older replica answered: keep ours.
                    // A replica that answers at once with nothing new (one
                    // still starting, say) must not make this loop spin.
                    if asked.elapsed() < Duration::from_millis(100) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                let epoch = snapshot.epoch;
                let new_epoch = epoch != at.epoch && at.index != 0;
                match apply(&proxy, snapshot, unread).await {
                    Ok(applied) => {
                        whole = false;
                        stamp = theirs;
                        behind_since = None;
                        if new_epoch {
                            tracing::info!(
                                from = at.epoch,
                                to = epoch,
                                index = applied,
                                "control plane restarted or replaced: took its full state"
                            );
                        }
                        at = Position {
                            epoch,
                            index: applied,
                        };
                        shared.metrics.config_index.set(applied as i64);
                        shared.ready.store(true, Ordering::Release);
                        // Two replicas of different epochs answering in
                        // turn would hand over full snapshots back to back:
                        // pace epoch changes to one a second.
                        if new_epoch && asked.elapsed() < Duration::from_millis(100) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    Err(problem) => {
                        shared.metrics.config_refused("snapshot");
                        tracing::error!(%problem, "snapshot refused; the previous config stays");
                        tokio::time::sleep(MAX_BACKOFF).await;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                shared.metrics.control_connected.set(0);
                shared.metrics.control_failures.inc();
                let pause = BACKOFF.pause(failures);
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(control = %url, error = %e, failures, retry_in = ?pause, "control plane unreachable; serving the last config");
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Would `snapshot` (a full one) change what the policy store decides of
/// a service both have (its split, routes, guards, mirror, allow-list,
/// ...), not only endpoints or which services exist? Taking a replica's
/// state that is behind is harmless otherwise (after a Consul snapshot
/// restore every index is lower, and nothing is behind).
fn policies_differ(ours: &BTreeMap<String, almond_config::Service>, snapshot: &Snapshot) -> bool {
    let without_endpoints = |s: &almond_config::Service| almond_config::Service {
        endpoints: Vec::new(),
        ..s.clone()
    };
    snapshot.services.iter().any(|(name, theirs)| {
        ours.get(name)
            .is_some_and(|mine| without_endpoints(mine) != without_endpoints(theirs))
    })
}

/// One long-poll; a body over `control_max_bytes` fails it. Also returns
/// the replica's policy stamp (0 when it sends none).
async fn poll(link: &Link, uri: &str) -> Result<(Snapshot, Unread, u64), String> {
    let mut req = hyper::Request::get(uri);
    if let Some(token) = &link.token {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token.expose());
        let mut value = http::HeaderValue::from_bytes(&value).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, value);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(WAIT + SLACK, link.client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| error_chain(&e))?;
    let status = resp.status();
    let stamp = (resp.headers().get(POLICY_STAMP))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let body = Limited::new(resp.into_body(), link.max_bytes);
    let body = tokio::time::timeout(SLACK, body.collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| {
            format!(
                "reading the snapshot: {e} (control_max_bytes: {})",
                link.max_bytes
            )
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let (snapshot, unread) = Snapshot::decode(&body).map_err(|e| format!("bad snapshot: {e}"))?;
    Ok((snapshot, unread, stamp))
}

/// Validates a snapshot merged into the running config and swaps it in;
/// writes the cache. Returns the applied index. A service this proxy
/// cannot take (a `tls` it has no identity for, say) keeps its previous
/// config, or stays out if it is new; the rest is applied, so one bad
/// registry entry does not stop every other change (a block, a shift).
async fn apply(proxy: &Proxy, mut snapshot: Snapshot, unread: Unread) -> Result<u64, String> {
    let current = proxy.shared().table.load().config.clone();
    let index = snapshot.index;
    let snapshot_epoch = snapshot.epoch;
    // A service this proxy could not read keeps the copy it has (or
    // stays out, if new), as one that fails validation does.
    for (name, why) in unread {
        proxy.shared().metrics.config_refused("service");
        let kept = current.services.get(&name).cloned();
        tracing::error!(service = %name, problem = %why, kept_previous = kept.is_some(), "service from the control plane unreadable; the rest of the snapshot is applied");
        if let Some(previous) = kept {
            snapshot.services.insert(name, previous);
        }
    }
    let mut next = (*current).clone();
    next.services = snapshot.apply_to(&current.services);
    let problems = validate_proxy(&next);
    let refused = keep_previous(&current.services, &mut next.services, problems)?;
    for _ in 0..refused {
        proxy.shared().metrics.config_refused("service");
    }
    // What was kept was valid with the rest once; anything left is refused whole.
    if let Some(problem) = validate_proxy(&next).into_iter().next() {
        return Err(problem.to_string());
    }
    let cache = next.cache.clone();
    let services = next.services.clone();
    let epoch = snapshot_epoch;
    proxy.update(next);
    tracing::info!(index, services = services.len(), "snapshot applied");
    if let Some(path) = cache {
        let full = Snapshot {
            epoch,
            index,
            full: true,
            names: services.keys().cloned().collect(),
            services,
        };
        // Serialized and fsynced off the runtime's threads (a proxy with
        // one worker would hold every request meanwhile); the next
        // snapshot waits for it, so the cache is never older than one
        // written before.
        let written = tokio::task::spawn_blocking(move || {
            let result = write_cache(&path, &full);
            (path, result)
        })
        .await;
        if let Ok((path, Err(e))) = written {
            tracing::warn!(cache = %path.display(), error = %e, "cannot write the snapshot cache");
        }
    }
    Ok(index)
}

/// Services of a snapshot that could not be decoded, with why.
type Unread = Vec<(String, String)>;

/// Puts back (or leaves out, if new) each service of `next` that a
/// problem names, as `current` has it. The services are all named first,
/// in `next` as the control plane sent it: a service with two problems is
/// one refusal, and a name is never looked up in a map already changed.
/// `Err`: a problem outside any service (the snapshot is refused whole);
/// else how many services were refused.
fn keep_previous<V: Clone>(
    current: &BTreeMap<String, V>,
    next: &mut BTreeMap<String, V>,
    problems: Vec<Problem>,
) -> Result<usize, String> {
    let mut refused: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
    for problem in problems {
        let Some(name) = service_of(&problem.path, next) else {
            return Err(problem.to_string());
        };
        refused.entry(name).or_default().push(problem);
    }
    let count = refused.len();
    for (name, problems) in refused {
        let kept = current.get(&name).cloned();
        for problem in &problems {
            tracing::error!(service = %name, %problem, kept_previous = kept.is_some(), "service from the control plane refused; the rest of the snapshot is applied");
        }
        match kept {
            Some(previous) => next.insert(name, previous),
            None => next.remove(&name),
        };
    }
    Ok(count)
}

/// The service a problem's key path (`services.NAME...`) is in.
fn service_of<V>(path: &str, services: &BTreeMap<String, V>) -> Option<String> {
    let rest = path.strip_prefix("services.")?;
    services
        .keys()
        .filter(|name| {
            rest.strip_prefix(name.as_str())
                .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
        })
        .max_by_key(|name| name.len())
        .cloned()
}

/// Writes the cache atomically and durably (`write_atomic`).
fn write_cache(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
    almond_config::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(path: &str) -> Problem {
        Problem {
            path: path.to_owned(),
            line: None,
            message: "refused".to_owned(),
        }
    }

    /// A new service with two problems is left out once, and the rest
    /// applies (the second problem's lookup found nothing in the map the
    /// first had changed: the whole snapshot was refused, every poll); a
    /// service whose name another's starts with keeps its own change.
    #[test]
    fn a_service_with_several_problems_is_refused_once() {
        let current: BTreeMap<String, u32> = [("a".to_owned(), 1)].into();
        let mut next: BTreeMap<String, u32> = [
            ("a".to_owned(), 2),
            ("a.b".to_owned(), 3),
            ("new".to_owned(), 4),
        ]
        .into();
        let problems = vec![
            problem("services.new.tls"),
            problem("services.new.tls.server_name"),
            problem("services.a.b.tls"),
            problem("services.a.b.endpoints[0].addr"),
        ];
        assert_eq!(keep_previous(&current, &mut next, problems), Ok(2));
        assert_eq!(next, [("a".to_owned(), 2)].into());
        // A problem outside any service refuses the snapshot.
        let mut next = current.clone();
        let outside = keep_previous(&current, &mut next, vec![problem("listeners[0].bind")]);
        assert!(outside.is_err());
    }

    fn snap(epoch: u64, index: u64) -> Snapshot {
        Snapshot {
            epoch,
            index,
            full: true,
            services: Default::default(),
            names: Vec::new(),
        }
    }

    #[test]
    fn takes_newer_indexes_and_any_other_epoch() {
        let at = Position {
            epoch: 7,
            index: 100,
        };
        assert!(at.takes(&snap(7, 101)));
        assert!(!at.takes(&snap(7, 100)), "nothing new");
        assert!(!at.takes(&snap(7, 40)), "an older state of the same epoch");
        assert!(
            at.takes(&snap(8, 40)),
            "another epoch, even with a lower index"
        );
        // A control plane from before epochs: indexes alone decide.
        assert!(!at.takes(&snap(0, 40)));
        assert!(at.takes(&snap(0, 101)));
    }
}
