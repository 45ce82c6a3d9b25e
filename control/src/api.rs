//! API: the long-poll snapshots proxies follow, the service views
//! operators read, the changes they make, the live tap, the dashboard's
//! data and page (`/ui`, in [`crate::ui`]), `/metrics`, `/ready`, `/live`.

use crate::history::History;
use crate::policy::{
    check_mirror_request, check_routes, check_split, check_sticky, Policy, Refusal,
};
use crate::state::{State, PROXY_STALE};
use crate::store::{Store, StoreError};
use crate::tap::{self, TapStream};
use crate::watcher::apply_next;
use crate::watcher::rollout::{Next, Rollout, RolloutSpec};
use almond_config::{check_service, Secret, Service, Strictness, WatcherSource, Weights};
use almond_net::{now_ms, parse_query};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Connections the API serves at once: every proxy holds one for its
/// snapshot long-poll (up to `state::MAX_PROXIES`), plus operators,
/// dashboards, Prometheus and health probes (2,048 more); past it a new
/// one is closed at once.
pub const MAX_CONNECTIONS: usize = crate::state::MAX_PROXIES + 2048;

/// Of those, from one client address (a host's proxies share one).
pub const MAX_CONNECTIONS_PER_PEER: usize = 512;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Longest window `GET /v1/services/{svc}/live` waits for (direct source).
const MAX_LIVE_WINDOW: Duration = Duration::from_secs(10);
/// Longest window it asks Prometheus about (answered at once).
const MAX_PROMETHEUS_WINDOW: Duration = Duration::from_secs(3600);
/// The live window asked of Prometheus when none is given: two scrapes
/// at the usual 15-30 s interval.
const PROMETHEUS_WINDOW: Duration = Duration::from_secs(60);

/// What the API handlers share.
pub struct Api {
    /// The served state.
    pub state: Arc<State>,
    /// Where policies are written.
    pub store: Arc<Store>,
    /// Who may do what: the operator and proxy tokens, TLS clients.
    pub auth: Auth,
    /// Allow-lists come from Consul intentions (`almond authz` refused).
    pub intentions: bool,
    /// Longest long-poll.
    pub max_wait: Duration,
    /// Where live golden metrics come from (the watcher's source).
    pub metrics_source: WatcherSource,
    /// Live measurements that may run at once: each scrapes every proxy
    /// twice, and the endpoint needs no token.
    pub live_slots: tokio::sync::Semaphore,
    /// Taps open at once (`tap::TAPS_AT_ONCE`).
    pub tap_slots: Arc<tokio::sync::Semaphore>,
    /// The last minutes of live samples per service (the dashboard's chart).
    pub history: Arc<History>,
}

/// The credentials the API checks, read when the control plane starts.
#[derive(Debug, Default)]
pub struct Auth {
    /// The operator token (`token_env`): changes need it.
    pub operator: Option<Secret>,
    /// The proxies' token (`proxy_token_env`): snapshot reads take it (or
    /// the operator's, or a verified TLS client certificate).
    pub proxy: Option<Secret>,
    /// The listener verifies client certificates (`tls.ca`).
    pub tls_clients: bool,
    /// What the control plane presents to proxies' admin `/tap`
    /// (`proxy_admin_token_env`).
    pub proxy_admin: Option<Secret>,
}

impl Auth {
    /// Whether snapshot reads need a credential: as soon as any is
    /// configured (fail closed).
    fn snapshots_need_credential(&self) -> bool {
        self.operator.is_some() || self.proxy.is_some() || self.tls_clients
    }
}

/// One API connection: who is at the other end.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The address the connection came from.
    pub addr: SocketAddr,
    /// Its TLS client certificate chained to `tls.ca`.
    pub verified: bool,
    /// It reached a listener on a loopback address (local `Host` names
    /// only: see `browser_refusal`).
    pub loopback: bool,
}

/// One long poll in `almond_control_long_polls`, for as long as it lives.
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Waiting<'a> {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Time a client has to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Live measurements at once (`Api::live_slots`).
pub const LIVE_AT_ONCE: usize = 4;

/// How long a stopping control plane waits for the requests in hand to be
/// answered (a traffic change whose write is under way; long-polls return
/// at once).
const LAST_ANSWERS: Duration = Duration::from_secs(5);

/// Serves the API until `stop` changes; over TLS when `tls` is given.
/// Then answers the requests in hand, for up to `LAST_ANSWERS` (5 s): an
/// `almond shift` whose write had reached the store is answered, not cut
/// (the operator would see a failure for a change that was made).
pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ApiTls>>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = tokio_util::task::TaskTracker::new();
    accept(api, listener, tls, &mut stop, &connections).await;
    connections.close();
    if tokio::time::timeout(LAST_ANSWERS, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("control API: requests still in hand after {LAST_ANSWERS:?} are cut");
    }
}

/// The accept loop of [`serve`]; connections are tracked in `connections`.
async fn accept(
    api: Arc<Api>,
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ApiTls>>,
    stop: &mut watch::Receiver<bool>,
    connections: &tokio_util::task::TaskTracker,
) {
    let closing = stop.clone();
    // A loopback API answers local Host names only (`browser_refusal`).
    let loopback = listener
        .local_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    let slots = almond_net::Slots::new("control", MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    almond_net::accept_until("control", &listener, stop, |stream, addr| {
        let Some(slot) = slots.take(addr.ip()) else {
            return;
        };
        let api = api.clone();
        let stop = closing.clone();
        let closing = closing.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let peer = Peer {
                        addr,
                        verified: false,
                        loopback,
                    };
                    serve_conn(api, TokioIo::new(stream), peer, stop, closing).await;
                }
                Some(tls) => {
                    let handshake = tls.acceptor().accept(stream);
                    let stream = match tokio::time::timeout(HEADER_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::info!(peer = %addr, error = %e, "control API: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    // A certificate was presented, so it chained to `tls.ca`.
                    let verified = stream.get_ref().1.peer_certificates().is_some();
                    let peer = Peer {
                        addr,
                        verified,
                        loopback,
                    };
                    serve_conn(api, TokioIo::new(stream), peer, stop, closing).await;
                }
            }
        });
    })
    .await;
}

/// One API connection, plain or TLS.
async fn serve_conn<I>(
    api: Arc<Api>,
    io: I,
    peer: Peer,
    stop: watch::Receiver<bool>,
    mut closing: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| route(api.clone(), req, stop.clone(), peer));
    // A client has HEADER_TIMEOUT to send a request head (and an idle
    // keep-alive connection is kept that long); a long-poll in progress is
    // not bounded by it.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    // On stop, answer the request in hand (a long-poll returns at once)
    // and close: a stopped control plane must not go on serving kept-alive
    // connections (its long-polls would return at once, forever, and
    // proxies would spin on them).
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// An API answer: whole, or a live tap stream.
type ApiBody = Either<Full<Bytes>, TapStream>;

/// `GET /v1/services/{svc}/tap` streams; every other request is answered
/// whole by `respond`.
async fn route(
    api: Arc<Api>,
    req: Request<Incoming>,
    stop: watch::Receiver<bool>,
    peer: Peer,
) -> Result<Response<ApiBody>, Infallible> {
    if let Some(refused) = browser_refusal(&req, peer) {
        return Ok(refused.map(Either::Left));
    }
    let path = req.uri().path().trim_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    if let (&Method::GET, ["v1", "services", name, "tap"]) = (req.method(), segments.as_slice()) {
        let name = (*name).to_owned();
        return Ok(start_tap(&api, &req, peer, &name));
    }
    Ok(respond(api, req, stop, peer).await?.map(Either::Left))
}

/// Opens the proxies' tap streams for `name`, filtered as the query asks;
/// needs the operator token when one is configured (summaries show paths).
fn start_tap(api: &Api, req: &Request<Incoming>, peer: Peer, name: &str) -> Response<ApiBody> {
    if let Some(refused) = operator_refusal(api, req, peer, "tap") {
        return refused.map(Either::Left);
    }
    if !api.state.has_service(name) {
        let why = format!("no service {name:?}\n");
        return text(StatusCode::NOT_FOUND, &why).map(Either::Left);
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let query = match tap::proxy_query(name, &query) {
        Ok(query) => query,
        Err(why) => return text(StatusCode::BAD_REQUEST, &format!("{why}\n")).map(Either::Left),
    };
    let admins = api.state.proxy_admins(PROXY_STALE);
    if admins.is_empty() {
        let why = "no proxy has followed this control plane lately: nothing to tap\n";
        return text(StatusCode::SERVICE_UNAVAILABLE, why).map(Either::Left);
    }
    let Ok(slot) = api.tap_slots.clone().try_acquire_owned() else {
        let why = format!(
            "{} taps are open on this control plane (each holds a connection to every proxy): try again when one ends\n",
            tap::TAPS_AT_ONCE
        );
        return text(StatusCode::TOO_MANY_REQUESTS, &why).map(Either::Left);
    };
    let proxies = HeaderValue::from(admins.len());
    let token = api.auth.proxy_admin.as_ref().map(Secret::expose);
    let mut resp = Response::new(Either::Right(tap::merge(admins, query, token, slot)));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert("x-almond-proxies", proxies);
    resp
}

/// What a browser could be made to send, refused with 403: a request from
/// another site's page (an `Origin` that is not this `Host`), and, on a
/// loopback listener, one for a `Host` that is not local (a page whose own
/// name was rebound to 127.0.0.1: DNS rebinding). Without an operator token
/// nothing else would stop them. `/metrics`, `/ready` and `/live` stay
/// open (read only, for scrapers and health checks).
fn browser_refusal<B>(req: &Request<B>, peer: Peer) -> Option<Response<Full<Bytes>>> {
    if matches!(req.uri().path(), "/metrics" | "/ready" | "/live") {
        return None;
    }
    let host = req.headers().get(http::header::HOST);
    let why = match req.headers().get(http::header::ORIGIN) {
        Some(origin) if !same_origin(origin.as_bytes(), host.map(HeaderValue::as_bytes)) => {
            "cross-origin requests are refused: Origin does not match Host\n"
        }
        _ => match host {
            Some(h) if peer.loopback && !almond_net::local_host(h.as_bytes()) => {
                "the loopback control API answers requests for localhost or a loopback address only\n"
            }
            _ => return None,
        },
    };
    tracing::warn!(peer = %peer.addr, host = ?host, origin = ?req.headers().get(http::header::ORIGIN), "refused: {}", why.trim());
    Some(text(StatusCode::FORBIDDEN, why))
}

/// Does `origin` (`scheme://host[:port]`) name `host` (a `Host` header)?
/// Case aside, and with the scheme's default port written or not.
fn same_origin(origin: &[u8], host: Option<&[u8]>) -> bool {
    let (Ok(origin), Some(Ok(host))) = (std::str::from_utf8(origin), host.map(std::str::from_utf8))
    else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default = if scheme.eq_ignore_ascii_case("http") {
        ":80"
    } else if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else {
        return false;
    };
    let bare = |a: &str| a.strip_suffix(default).unwrap_or(a).to_ascii_lowercase();
    !authority.is_empty() && bare(authority) == bare(host)
}

/// Does a change carry a JSON body type? Anything else (a form, plain
/// text) is what a page on another site may send without asking first
/// (no CORS preflight), so changes must say `application/json`.
fn json_content<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// `None` when no operator token is configured or `req` carries it; else
/// the refusal (401 without one, 403 with a wrong one), counted and logged.
fn operator_refusal<B>(
    api: &Api,
    req: &Request<B>,
    peer: Peer,
    request: &'static str,
) -> Option<Response<Full<Bytes>>> {
    let (status, why) = operator_refused(api, req)?;
    Some(refuse(api, peer, request, status, why))
}

async fn respond(
    api: Arc<Api>,
    req: Request<Incoming>,
    stop: watch::Receiver<bool>,
    peer: Peer,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let state = &api.state;
    let query = parse_query(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // HEAD is answered as GET (hyper leaves the body out).
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(match (req.method().clone(), segments.as_slice()) {
            (Method::PUT, ["v1", "services", name, "split"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Split).await
            }
            (Method::PUT, ["v1", "services", name, "guards"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Guard).await
            }
            (Method::PUT, ["v1", "services", name, "routes"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Routes).await
            }
            (Method::DELETE, ["v1", "services", name, "routes"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::ClearRoutes).await
            }
            (Method::PUT, ["v1", "services", name, "mirror"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Mirror).await
            }
            (Method::DELETE, ["v1", "services", name, "mirror"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::ClearMirror).await
            }
            (Method::PUT, ["v1", "services", name, "authz"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Authz).await
            }
            (Method::POST, ["v1", "services", name, "rollback"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Rollback).await
            }
            (Method::POST, ["v1", "services", name, "rollouts"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::StartRollout).await
            }
            (Method::POST, ["v1", "services", name, "rollouts", "approve"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Approve).await
            }
            (Method::DELETE, ["v1", "services", name, "rollouts"]) => {
                let name = (*name).to_owned();
                mutate(&api, req, peer, &name, Mutation::Abort).await
            }
            (_, path) => not_here(path),
        });
    }
    let max_wait = api.max_wait;
    Ok(match segments.as_slice() {
        ["v1", "snapshot"] if !proxy_authenticated(&api.auth, &req, peer) => refuse(
            &api,
            peer,
            "snapshot",
            StatusCode::UNAUTHORIZED,
            "a proxy token (token_env in the proxy config) or a client certificate is required\n",
        ),
        ["v1", "snapshot"] => snapshot(state, &query, max_wait, stop, peer).await,
        ["v1", "services"] => json_ok(&services_view(state)),
        // The dashboard's reads need the operator token once one is
        // configured (the older reads above stay open, as documented).
        ["v1", "dashboard"] | ["v1", "services", _, "history"]
            if operator_refused(&api, &req).is_some() =>
        {
            let (status, why) = operator_refused(&api, &req)
                .unwrap_or((StatusCode::UNAUTHORIZED, "token required\n"));
            let mut resp = refuse(&api, peer, "read", status, why);
            crate::ui::secure(resp.headers_mut());
            resp
        }
        ["v1", "dashboard"] => {
            let since = query.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut resp = json_ok(&dashboard_view(&api, since));
            crate::ui::secure(resp.headers_mut());
            resp
        }
        ["v1", "services", name, "history"] if state.has_service(name) => {
            let since: u64 = query.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
            json_ok(&json!({
                "service": name,
                "interval_seconds": crate::history::INTERVAL.as_secs_f64(),
                "capacity": crate::history::CAPACITY,
                "samples": api.history.since(name, since),
            }))
        }
        ["v1", "services", name, "history"] => text(
            StatusCode::NOT_FOUND,
            &format!("unknown service {name:?}\n"),
        ),
        ["ui"] => crate::ui::asset(""),
        ["ui", rest @ ..] => crate::ui::asset(&rest.join("/")),
        ["v1", "services", name] => match state.service(name) {
            Some(svc) => json_ok(&json!({
                "name": name,
                "index": state.index(),
                "service": svc,
                "policy": state.policy(name).unwrap_or_default(),
                "subsets": subset_counts(state, name),
            })),
            None => text(
                StatusCode::NOT_FOUND,
                &format!("unknown service {name:?}\n"),
            ),
        },
        ["v1", "services", name, "live"] if state.has_service(name) => {
            match api.live_slots.try_acquire() {
                Ok(_slot) => live(state, &api.metrics_source, name, &query).await,
                Err(_) => text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many live measurements at once; try again in a moment\n",
                ),
            }
        }
        ["v1", "services", name, "live"] => text(
            StatusCode::NOT_FOUND,
            &format!("unknown service {name:?}\n"),
        ),
        ["v1", "services", name, "events"] => {
            let since: u64 = query.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
            match state.policy(name) {
                Some(p) => json_ok(&json!({
                    "service": name,
                    "events": p.events.iter().filter(|e| e.seq > since).collect::<Vec<_>>(),
                })),
                None if state.has_service(name) => {
                    json_ok(&json!({ "service": name, "events": [] }))
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    &format!("unknown service {name:?}\n"),
                ),
            }
        }
        ["v1", "services", name, "routes"] => match state.service(name) {
            Some(svc) => {
                let policy = state.policy(name).unwrap_or_default();
                json_ok(&json!({
                    "service": name,
                    "version": policy.version,
                    "from": if policy.routes.is_some() { "policy" } else { "source" },
                    "rules": svc.routes,
                }))
            }
            None => text(
                StatusCode::NOT_FOUND,
                &format!("unknown service {name:?}\n"),
            ),
        },
        ["v1", "services", name, "mirror"] => match state.service(name) {
            Some(svc) => {
                let policy = state.policy(name).unwrap_or_default();
                json_ok(&json!({
                    "service": name,
                    "version": policy.version,
                    "from": if policy.mirror.is_some() { "policy" } else { "source" },
                    "mirror": svc.mirror,
                }))
            }
            None => text(
                StatusCode::NOT_FOUND,
                &format!("unknown service {name:?}\n"),
            ),
        },
        ["v1", "services", name, "rollouts"] => match state.policy(name).and_then(|p| p.rollout) {
            Some(r) => json_ok(&r),
            None => text(StatusCode::NOT_FOUND, &format!("no rollout for {name:?}\n")),
        },
        ["v1", "proxies"] => {
            let mut proxies: serde_json::Map<String, serde_json::Value> = state
                .proxies()
                .into_iter()
                .map(|(id, p)| {
                    (
                        id,
                        match &p.shared_with {
                            None => json!({ "admin": p.admin, "index": p.index,
                                            "seen_seconds_ago": p.seen.elapsed().as_secs() }),
                            Some(other) => json!({ "admin": p.admin, "index": p.index,
                                            "seen_seconds_ago": p.seen.elapsed().as_secs(),
                                            "shared_with": other }),
                        },
                    )
                })
                .collect();
            // The proxies following other replicas (their rosters): the
            // same fleet from whichever replica is asked.
            for (id, p) in state.peer_proxies() {
                if !proxies.contains_key(&id) {
                    proxies.insert(id, json!({ "admin": p.admin, "replica": p.replica }));
                }
            }
            json_ok(&proxies)
        }
        ["metrics"] => {
            let mut out = Vec::new();
            let encoder = prometheus::TextEncoder::new();
            if let Err(e) =
                prometheus::Encoder::encode(&encoder, &state.metrics.registry.gather(), &mut out)
            {
                tracing::warn!(error = %e, "metrics encoding failed");
            }
            let mut resp = Response::new(Full::new(Bytes::from(out)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        ["ready"] if state.is_ready() => text(StatusCode::OK, "ready\n"),
        ["ready"] => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first sync not done\n",
        ),
        ["live"] => text(StatusCode::OK, "live\n"),
        path => not_here(path),
    })
}

/// The methods a path of the API takes, if it is one.
fn allowed(path: &[&str]) -> Option<&'static str> {
    Some(match path {
        ["v1", "services", _, "split" | "guards" | "authz"] => "PUT",
        ["v1", "services", _, "routes" | "mirror"] => "GET, HEAD, PUT, DELETE",
        ["v1", "services", _, "rollback"] | ["v1", "services", _, "rollouts", "approve"] => "POST",
        ["v1", "services", _, "rollouts"] => "GET, HEAD, POST, DELETE",
        ["v1", "services", _, "tap"] => "GET",
        ["v1", "services", _, "history" | "live" | "events"]
        | ["v1", "services", _]
        | ["v1", "snapshot" | "services" | "dashboard" | "proxies"]
        | ["metrics" | "ready" | "live" | "ui"]
        | ["ui", ..] => "GET, HEAD",
        _ => return None,
    })
}

/// A path the API has, asked with a method it does not take: 405 with
/// `Allow`; any other path: 404.
fn not_here(path: &[&str]) -> Response<Full<Bytes>> {
    match allowed(path) {
        Some(methods) => {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here\n");
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(methods));
            resp
        }
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Times a change is made again after losing its check-and-set write to
/// another writer.
const CAS_RETRIES: u32 = 3;

/// An operator change to a service's policy.
#[derive(Clone, Copy)]
enum Mutation {
    Split,
    Rollback,
    StartRollout,
    Approve,
    Abort,
    Authz,
    Guard,
    Routes,
    ClearRoutes,
    Mirror,
    ClearMirror,
}

/// Body of `PUT /v1/services/{svc}/guards`: a guard to set (`almond
/// block`: `deny`; `almond limit`: `limit`), or, with `remove`, the match
/// whose guards go (`almond unblock`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardRequest {
    #[serde(rename = "match", default)]
    when: almond_config::Match,
    #[serde(default)]
    deny: Option<almond_config::Deny>,
    #[serde(default)]
    limit: Option<almond_config::Limit>,
    #[serde(default)]
    remove: bool,
}

/// Body of `PUT /v1/services/{svc}/mirror`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorRequest {
    /// A subset of the service to copy to.
    #[serde(default)]
    subset: Option<String>,
    /// Or another service.
    #[serde(default)]
    service: Option<String>,
    /// Percent of requests copied.
    percent: f64,
    /// Copies in flight at once (default 100).
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// The policy version the caller based this on; stale -> 409.
    #[serde(default)]
    version: Option<u64>,
}

/// Body of `PUT /v1/services/{svc}/routes`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesRequest {
    /// The rules, in order (they replace those in force).
    rules: Vec<almond_config::RouteRule>,
    /// The policy version the caller based this on; stale -> 409.
    #[serde(default)]
    version: Option<u64>,
}

/// Body of `PUT /v1/services/{svc}/authz`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzRequest {
    /// `allow` or `deny`.
    action: String,
    /// A typed identity: `spiffe://…`, `dns:NAME` or `cn:NAME`.
    identity: String,
}

/// Body of `PUT /v1/services/{svc}/split`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitRequest {
    weights: Weights,
    /// The policy version the caller based this on; stale -> 409.
    #[serde(default)]
    version: Option<u64>,
    /// Subsets that may have no endpoints yet.
    #[serde(default)]
    allow_empty: Vec<String>,
    /// `shift` (default), `promote`, ...
    #[serde(default)]
    action: Option<String>,
    /// Header that keeps a user on one side: a name sets it, `""` turns
    /// stickiness off, absent (or null) keeps what is in force.
    #[serde(default)]
    sticky_header: Option<String>,
}

/// A change's JSON body as `T`, or the 400 that says why it is not one.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response<Full<Bytes>>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            &format!("bad request body: {e}\n"),
        ))
    })
}

/// Checks the token, validates, writes the store with check-and-set, and
/// serves the result at once. Nothing changes unless everything passes.
async fn mutate(
    api: &Api,
    req: Request<Incoming>,
    peer: Peer,
    name: &str,
    what: Mutation,
) -> Response<Full<Bytes>> {
    if let Some(refused) = operator_refusal(api, &req, peer, "change") {
        return refused;
    }
    if !json_content(&req) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "changes need Content-Type: application/json\n",
        );
    }
    let by = req
        .headers()
        .get("x-almond-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}\n")),
    };
    let Some(service) = api.state.source_service(name) else {
        return refusal(Refusal::UnknownService(name.to_owned()));
    };
    // Written with check-and-set; when another write came between the
    // read and this one (most often the rollout watcher renewing its
    // lease, which changes nothing an operator sees), the change is made
    // again on what is stored now, checked again, a few times: an
    // emergency `abort` or `block` is not refused for it.
    let mut lost = 0;
    let (current, next, token) = loop {
        let (current, token) = match api.store.get(name).await {
            Ok(p) => p,
            Err(e) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("store unavailable: {e}\n"),
                )
            }
        };
        let now = now_ms() / 1000;
        let mut next = match what {
            Mutation::Split => {
                let request: SplitRequest = match json_body(&body) {
                    Ok(r) => r,
                    Err(refused) => return *refused,
                };
                let in_force = current.split.as_ref();
                if let Err(r) = check_split(&request.weights, &service, &request.allow_empty, in_force)
                    .and_then(|()| check_sticky(request.sticky_header.as_deref()))
                {
                    return refusal(r);
                }
                if let Some(v) = request.version.filter(|v| *v != current.version) {
                    return refusal(Refusal::Conflict(format!(
                        "the split changed since version {v} (now {}); read it again",
                        current.version
                    )));
                }
                let action = request.action.as_deref().unwrap_or("shift");
                // The watcher would overwrite it at its next verdict.
                if let Some(r) = current.rollout.as_ref().filter(|r| r.active()) {
                    return refusal(Refusal::Conflict(format!(
                        "a rollout of {name} is running (canary {} at {} %): `almond rollout {name} --abort` or `almond rollback {name}` first",
                        r.spec.canary,
                        r.percent()
                    )));
                }
                current
                    .clone()
                    .with_sticky_header(request.sticky_header)
                    .with_split(request.weights, &by, action, now)
            }
            Mutation::Authz if api.intentions => {
                return refusal(Refusal::Conflict(format!(
                    "who may call {name} comes from Consul intentions (source.consul.intentions): change them in Consul"
                )))
            }
            Mutation::Authz => {
                let request: AuthzRequest = match json_body(&body) {
                    Ok(r) => r,
                    Err(refused) => return *refused,
                };
                let allow = match request.action.as_str() {
                    "allow" => true,
                    "deny" => false,
                    other => {
                        return refusal(Refusal::Invalid(format!(
                            "action {other:?}: use allow or deny"
                        )))
                    }
                };
                let source = service.authz.as_ref();
                match current.with_authz(source, allow, &request.identity, &by, now) {
                    Ok(p) => p,
                    Err(r) => return refusal(r),
                }
            }
            Mutation::Guard => {
                let request: GuardRequest = match json_body(&body) {
                    Ok(r) => r,
                    Err(refused) => return *refused,
                };
                if request.remove && (request.deny.is_some() || request.limit.is_some()) {
                    return refusal(Refusal::Invalid(
                        "remove takes a match only, no deny or limit".into(),
                    ));
                }
                let guard = almond_config::Guard {
                    when: request.when,
                    deny: request.deny,
                    limit: request.limit,
                };
                if !request.remove && guard.deny.is_none() && guard.limit.is_none() {
                    return refusal(Refusal::Invalid("give deny or limit (or remove)".into()));
                }
                match current.with_guard(&service.guards, guard, &by, now_ms()) {
                    Ok(p) => p,
                    Err(r) => return refusal(r),
                }
            }
            Mutation::Routes => {
                let request: RoutesRequest = match json_body(&body) {
                    Ok(r) => r,
                    Err(refused) => return *refused,
                };
                let counts = api.state.endpoint_counts(name);
                let subsets: Vec<&str> = counts.keys().map(String::as_str).collect();
                if let Err(r) = check_routes(&request.rules, &subsets, |s| api.state.has_service(s)) {
                    return refusal(r);
                }
                if let Some(v) = request.version.filter(|v| *v != current.version) {
                    return refusal(Refusal::Conflict(format!(
                        "the policy changed since version {v} (now {}); read it again",
                        current.version
                    )));
                }
                current.with_routes(Some(request.rules), &by, now)
            }
            Mutation::ClearRoutes => current.with_routes(None, &by, now),
            Mutation::Mirror => {
                let request: MirrorRequest = match json_body(&body) {
                    Ok(r) => r,
                    Err(refused) => return *refused,
                };
                if current.rollout.as_ref().is_some_and(Rollout::shadowing_now) {
                    return refusal(Refusal::Conflict(
                        "a rollout's shadow stage mirrors to its canary now; set the mirror after the stage, or abort the rollout".into(),
                    ));
                }
                let mirror = almond_config::Mirror {
                    subset: request.subset,
                    service: request.service,
                    percent: request.percent,
                    max_in_flight: request.max_in_flight.unwrap_or(100),
                };
                let counts = api.state.endpoint_counts(name);
                let subsets: Vec<&str> = counts.keys().map(String::as_str).collect();
                let exists = |s: &str| api.state.has_service(s);
                if let Err(r) = check_mirror_request(&mirror, &subsets, exists) {
                    return refusal(r);
                }
                if let Some(v) = request.version.filter(|v| *v != current.version) {
                    return refusal(Refusal::Conflict(format!(
                        "the policy changed since version {v} (now {}); read it again",
                        current.version
                    )));
                }
                current.with_mirror(Some(mirror), &by, now)
            }
            Mutation::ClearMirror if current.rollout.as_ref().is_some_and(Rollout::shadowing_now) => {
                return refusal(Refusal::Conflict(
                    "a rollout's shadow stage mirrors to its canary now; clear the mirror after the stage, or abort the rollout".into(),
                ));
            }
            Mutation::ClearMirror => current.with_mirror(None, &by, now),
            // A rollback during a rollout ends it, back to the split before
            // its canary (the watcher would otherwise go on with its steps).
            Mutation::Rollback => match current.rollout.clone().filter(Rollout::active) {
                Some(mut rollout) => match rollout.abort(&by) {
                    Ok(next) => apply_next(&current, rollout, next, &by, "rollback", now_ms()),
                    Err(e) => return refusal(Refusal::Conflict(e)),
                },
                // Already rolled back (a double click, a second on-call, a
                // command run again after a timeout): a second rollback would
                // undo the first, and put the release just rolled back in
                // force again. It changes nothing.
                None if current.just_rolled_back() => {
                    tracing::info!(service = name, by = %by, split = ?current.split, "rollback: already rolled back, nothing changed");
                    return json_ok(&json!({
                        "service": name,
                        "policy": current,
                        "index": api.state.index(),
                        "unchanged": true,
                    }));
                }
                None => match current.rolled_back(&by, now) {
                    Ok(p) => p,
                    Err(r) => return refusal(r),
                },
            },
            Mutation::StartRollout => {
                let spec: RolloutSpec = match serde_json::from_slice(&body) {
                    Ok(s) => s,
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("bad rollout: {e}\n")),
                };
                // The Prometheus source does not query the copies yet: a
                // shadow stage would only ever be inconclusive, then rolled
                // back, minutes later. Said now.
                if spec.shadow.is_some() && matches!(api.metrics_source, WatcherSource::Prometheus(_)) {
                    return refusal(Refusal::Invalid(
                        "a shadow stage needs the watcher's direct source (watcher: { source: direct }): the prometheus source does not read the mirror's copies".into(),
                    ));
                }
                match start_rollout(&current, &service, spec, &by) {
                    Ok(p) => p,
                    Err(r) => return refusal(r),
                }
            }
            Mutation::Approve | Mutation::Abort => {
                let Some(mut rollout) = current.rollout.clone() else {
                    return refusal(Refusal::Conflict(format!("{name} has no rollout")));
                };
                let step = match what {
                    Mutation::Approve => rollout.approve(now_ms()),
                    _ => rollout.abort(&by),
                };
                match step {
                    Ok(next) => {
                        let action = if matches!(what, Mutation::Approve) {
                            "rollout approve"
                        } else {
                            "rollout abort"
                        };
                        apply_next(&current, rollout, next, &by, action, now_ms())
                    }
                    Err(e) => return refusal(Refusal::Conflict(e)),
                }
            }
        };
        // The service as every proxy will check it: one they would refuse
        // (keeping their last copy, this change and every later one unseen)
        // is refused here, with the reason, and nothing is written.
        let served = next.apply(service.clone());
        let problems = check_service(&served, Strictness::Snapshot);
        if !problems.is_empty() {
            let why: Vec<String> = problems
                .iter()
                .map(|(path, why)| format!("{}: {why}", path.trim_start_matches('.')))
                .collect();
            return refusal(Refusal::Invalid(format!(
                "proxies would refuse {name} with this change ({}); nothing changed",
                why.join("; ")
            )));
        }
        next.record_events(&current, now_ms());
        let events = next.events_after(current.events.last().map_or(0, |e| e.seq));
        match api.store.put(name, &mut next, token).await {
            Ok(true) => {
                if let Some(notify) = &api.state.notify {
                    notify.send(name, &events);
                }
                break (current, next, token);
            }
            Ok(false) if lost < CAS_RETRIES => {
                lost += 1;
                continue;
            }
            Ok(false) => {
                return refusal(Refusal::Conflict(
                    "another change was written first; read the split again".into(),
                ))
            }
            Err(e @ StoreError::TooLarge { .. }) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "{e}: remove guards, route rules or a mirror first; nothing changed\n"
                    ),
                )
            }
            Err(e) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("store unavailable: {e}\n"),
                )
            }
        }
    };
    tracing::info!(service = name, by = %by, from = ?current.split, to = ?next.split, sticky = ?next.sticky_header, authz = ?next.authz, version = next.version, "policy changed");
    if let Some(step) = next.rollout_step() {
        api.state.metrics.rollout_step(name, step);
    }
    api.store.stamp_write(name, &api.state).await;
    api.state.set_written_policy(name, next.clone(), token);
    json_ok(&json!({ "service": name, "policy": next, "index": api.state.index() }))
}

/// Why a request that needs the operator token is refused, if it is:
/// none configured lets everyone through; 401 without a token, 403 with
/// a wrong one.
fn operator_refused<B>(api: &Api, req: &Request<B>) -> Option<(StatusCode, &'static str)> {
    let expected = api.auth.operator.as_ref()?;
    let given = req.headers().get(http::header::AUTHORIZATION);
    if expected.matches_bearer(given.map(|v| v.as_bytes())) {
        return None;
    }
    Some(match given {
        None => (
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (--token or ALMOND_TOKEN)\n",
        ),
        Some(_) => (StatusCode::FORBIDDEN, "token refused\n"),
    })
}

/// Rollout events per service on the dashboard (the newest).
const DASHBOARD_EVENTS: usize = 50;

/// `GET /v1/dashboard?since=MS`: everything the dashboard shows, in one
/// answer: per service its subsets (weight in force, endpoints
/// healthy/total), the newest live sample, the rollout and its newest
/// events, and the history samples taken after `since`.
fn dashboard_view(api: &Api, since: u64) -> serde_json::Value {
    let state = &api.state;
    let mut out = serde_json::Map::new();
    for (name, svc) in state.services() {
        let policy = state.policy(&name).unwrap_or_default();
        let counts = state.endpoint_counts(&name);
        let mut subsets = serde_json::Map::new();
        for e in &svc.endpoints {
            let (healthy, total) = counts.get(&e.subset).copied().unwrap_or((0, 0));
            let weight = svc
                .split
                .as_ref()
                .map(|w| w.weights.get(&e.subset).copied().unwrap_or(0));
            subsets.insert(
                e.subset.clone(),
                json!({ "weight": weight, "healthy": healthy, "total": total }),
            );
        }
        // Subsets whose instances are all unhealthy (none served).
        for (subset, (healthy, total)) in &counts {
            if !subsets.contains_key(subset) {
                let weight = svc
                    .split
                    .as_ref()
                    .map(|w| w.weights.get(subset).copied().unwrap_or(0));
                subsets.insert(
                    subset.clone(),
                    json!({ "weight": weight, "healthy": healthy, "total": total }),
                );
            }
        }
        if let Some(split) = &svc.split {
            for (subset, weight) in &split.weights {
                if !subsets.contains_key(subset) {
                    subsets.insert(
                        subset.clone(),
                        json!({ "weight": weight, "healthy": 0, "total": 0 }),
                    );
                }
            }
        }
        let skip = policy.events.len().saturating_sub(DASHBOARD_EVENTS);
        let live = api
            .history
            .last(&name)
            .map(|s| s.subsets)
            .unwrap_or_default();
        out.insert(
            name.clone(),
            json!({
                "protocol": svc.protocol,
                "version": policy.version,
                "subsets": subsets,
                "live": live,
                "rollout": policy.rollout,
                "events": &policy.events[skip..],
                "samples": api.history.since(&name, since),
            }),
        );
    }
    json!({
        "index": state.index(),
        "now": now_ms(),
        "token_required": api.auth.operator.is_some(),
        "interval_seconds": crate::history::INTERVAL.as_secs_f64(),
        "services": out,
    })
}

/// A new rollout at its first step; refused while another is active.
fn start_rollout(
    current: &Policy,
    service: &Service,
    spec: RolloutSpec,
    by: &str,
) -> Result<Policy, Refusal> {
    spec.check().map_err(Refusal::Invalid)?;
    if current.rollout.as_ref().is_some_and(Rollout::active) {
        return Err(Refusal::Conflict(
            "a rollout is already running; approve, abort or wait for it".into(),
        ));
    }
    let has = |s: &str| service.endpoints.iter().any(|e| e.subset == s);
    if !has(&spec.canary) {
        return Err(Refusal::Invalid(format!(
            "canary subset {:?} has no endpoints",
            spec.canary
        )));
    }
    let stable = match &spec.stable {
        Some(s) if has(s) => s.clone(),
        Some(s) => {
            return Err(Refusal::Invalid(format!(
                "stable subset {s:?} has no endpoints"
            )))
        }
        None => pick_stable(current, service, &spec.canary)
            .ok_or_else(|| Refusal::Invalid("no stable subset besides the canary".into()))?,
    };
    for subset in [&spec.canary, &stable] {
        almond_config::check_split_subset(subset).map_err(Refusal::Invalid)?;
    }
    let now = now_ms();
    let mut rollout = Rollout::start(spec, stable, current.split.clone(), now);
    // A shadow stage takes the mirror for its copies; the operator's comes
    // back when the stage is over.
    if rollout.spec.shadow.is_some() {
        rollout.kept_mirror = current.mirror.clone();
    }
    let first = rollout.split();
    Ok(apply_next(
        current,
        rollout,
        Next::Shift(first),
        by,
        "rollout start",
        now,
    ))
}

/// The other subset with the most traffic now (split weight, else
/// endpoint count).
fn pick_stable(current: &Policy, service: &Service, canary: &str) -> Option<String> {
    let mut subsets: Vec<(u32, usize, String)> = Vec::new();
    for e in &service.endpoints {
        if e.subset == canary {
            continue;
        }
        match subsets.iter_mut().find(|s| s.2 == e.subset) {
            Some(s) => s.1 += 1,
            None => {
                let weight = current
                    .split
                    .as_ref()
                    .and_then(|w| w.get(&e.subset).copied())
                    .unwrap_or(0);
                subsets.push((weight, 1, e.subset.clone()));
            }
        }
    }
    subsets.into_iter().max().map(|s| s.2)
}

fn refusal(r: Refusal) -> Response<Full<Bytes>> {
    let status = match r {
        Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
        Refusal::UnknownService(_) => StatusCode::NOT_FOUND,
        Refusal::Conflict(_) => StatusCode::CONFLICT,
    };
    text(status, &format!("{r}\n"))
}

/// `GET /v1/snapshot?proxy=ID&epoch=E&index=N&wait=30s`: answers as soon
/// as the index is above N, or after `wait` with the same index; at once
/// (when ready) with a full snapshot when E is not this control plane's
/// epoch. Without `epoch`, N is taken to be of this epoch.
async fn snapshot(
    state: &Arc<State>,
    query: &HashMap<String, String>,
    max_wait: Duration,
    mut stop: watch::Receiver<bool>,
    peer: Peer,
) -> Response<Full<Bytes>> {
    let mut since: u64 = match query.get("index").map(|v| v.parse()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "invalid index\n"),
    };
    let epoch = match query.get("epoch").map(|v| v.parse::<u64>()) {
        None => state.epoch(),
        Some(Ok(e)) => e,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "invalid epoch\n"),
    };
    let wait = match query.get("wait").map(|w| parse_wait(w)) {
        None => Duration::from_secs(30),
        Some(Some(w)) => w.min(max_wait),
        Some(None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "invalid wait; use a duration like 30s or 500ms\n",
            )
        }
    };
    let proxy = query.get("proxy").map(String::as_str).unwrap_or("unknown");
    let admin = scrape_addr(peer, query.get("admin").map(String::as_str));
    state.saw_proxy(proxy, &admin, since);
    if epoch != state.epoch() {
        // Another numbering: nothing it holds can be compared with ours.
        since = 0;
    }
    let mut changes = state.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    // Counted while it waits, and uncounted however it ends: a client
    // that goes away mid-wait drops this future here.
    let waiting = Waiting::new(&state.metrics.long_polls);
    // Wait only while not ready (nothing to give) or nothing is new.
    while !(state.is_ready() && *changes.borrow_and_update() > since) {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stop.changed() => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    drop(waiting);
    if !state.is_ready() {
        // Nothing whole to give (Consul not read yet, or the policy store
        // not): a partial catalog would drop the proxy's services or its
        // splits. It keeps its last config and asks again.
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first sync with the catalog and the policy store is not done\n",
        );
    }
    let (index, json) = match state.snapshot_json(epoch, since).await {
        Ok(snap) => snap,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a snapshot");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialize the snapshot\n",
            );
        }
    };
    state.metrics.snapshots_sent.inc();
    let mut resp = Response::new(Full::new(json));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
        resp.headers_mut().insert("x-almond-index", v);
    }
    // How far this replica has read the policy store: a proxy that comes
    // from a replica further on does not take this one's state until it
    // catches up (see `almond_proxy::follow`). Sent, not cached with the
    // snapshot: it moves without the catalog (a lease renewal).
    let stamp = state.policy_stamp();
    if stamp > 0 {
        resp.headers_mut()
            .insert(POLICY_STAMP_HEADER, HeaderValue::from(stamp));
    }
    resp
}

/// The header of a snapshot answer that carries the replica's
/// [`State::policy_stamp`].
pub const POLICY_STAMP_HEADER: &str = "x-almond-policy-index";

/// `GET /v1/services/{svc}/live?window=1s`: per subset, requests, rps,
/// success rate and p99 over the window, from the watcher's source.
async fn live(
    state: &State,
    source: &WatcherSource,
    name: &str,
    query: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    // Prometheus needs two scrapes in the window for an `increase`.
    let (max, default) = match source {
        WatcherSource::Direct => (MAX_LIVE_WINDOW, Duration::from_secs(1)),
        WatcherSource::Prometheus(_) => (MAX_PROMETHEUS_WINDOW, PROMETHEUS_WINDOW),
    };
    let window = match query.get("window").map(|w| parse_wait(w)) {
        None => default,
        Some(Some(w)) if !w.is_zero() && w <= max => w,
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "invalid window; use a duration from 1ms to {}s, like 2s\n",
                    max.as_secs()
                ),
            )
        }
    };
    let (source, proxies, subsets) = match source {
        WatcherSource::Direct => {
            let admins = state.proxy_admins(PROXY_STALE);
            let subsets = crate::live::measure(&admins, name, window, state.max_body).await;
            ("direct", Some(admins.len()), subsets)
        }
        WatcherSource::Prometheus(url) => {
            let subsets = crate::live::from_prometheus(url, name, window, state.max_body).await;
            ("prometheus", None, subsets)
        }
    };
    json_ok(&json!({
        "service": name,
        "source": source,
        "window_seconds": window.as_secs_f64(),
        "proxies": proxies,
        "subsets": subsets,
    }))
}

/// Per subset: `{"healthy": N, "total": M}` endpoints.
fn subset_counts(state: &State, name: &str) -> serde_json::Value {
    state
        .endpoint_counts(name)
        .into_iter()
        .map(|(subset, (healthy, total))| (subset, json!({ "healthy": healthy, "total": total })))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Per service: subsets with healthy endpoint counts, and the split.
fn services_view(state: &State) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, svc) in state.services() {
        let mut subsets: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in &svc.endpoints {
            *subsets.entry(e.subset.as_str()).or_default() += 1;
        }
        out.insert(
            name,
            json!({ "protocol": svc.protocol, "subsets": subsets, "split": svc.split }),
        );
    }
    json!({ "index": state.index(), "services": out })
}

/// `30s`, `500ms`, `1m`, `1h` (as config durations are written); a bare
/// number is seconds.
fn parse_wait(text: &str) -> Option<Duration> {
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn json_ok<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut resp = Response::new(Full::new(Bytes::from(bytes)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// Whether a snapshot reader may read (and be scraped by the watcher):
/// anyone when no credential is configured; else a verified client
/// certificate, the proxy token or the operator token.
fn proxy_authenticated(auth: &Auth, req: &Request<Incoming>, peer: Peer) -> bool {
    if !auth.snapshots_need_credential() || peer.verified {
        return true;
    }
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    [&auth.proxy, &auth.operator]
        .into_iter()
        .flatten()
        .any(|token| token.matches_bearer(given))
}

/// A request refused for its credentials: logged with who sent it,
/// counted in `almond_control_refused_total{request}`.
fn refuse(
    api: &Api,
    peer: Peer,
    request: &'static str,
    status: StatusCode,
    why: &str,
) -> Response<Full<Bytes>> {
    api.state
        .metrics
        .refused
        .with_label_values(&[request])
        .inc();
    tracing::warn!(peer = %peer.addr, request, %status, "refused: {}", why.trim());
    text(status, why)
}

/// Where the watcher scrapes a proxy: the host the connection came from,
/// never one the proxy names (that would let anyone aim the watcher at any
/// address), and the port of `admin` (`PORT` or `HOST:PORT`, whose host is
/// ignored); nothing when `admin` names no port.
fn scrape_addr(peer: Peer, admin: Option<&str>) -> String {
    let port = admin.and_then(|a| match a.parse::<u16>() {
        Ok(port) => Some(port),
        Err(_) => a.parse::<SocketAddr>().ok().map(|s| s.port()),
    });
    match port {
        Some(port) if port > 0 => SocketAddr::new(peer.addr.ip(), port).to_string(),
        _ => String::new(),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_queries_parse() {
        assert_eq!(parse_wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("x"), None);
        assert_eq!(parse_wait("1h"), Some(Duration::from_secs(3600)));
        // Too large to be a duration: refused, not a panic.
        assert_eq!(parse_wait("18446744073709551615m"), None);
        let q = parse_query("proxy=web%2D1&index=7&admin=127.0.0.1%3A4191");
        assert_eq!(q["proxy"], "web-1");
        assert_eq!(q["admin"], "127.0.0.1:4191");
    }

    #[test]
    fn origins_match_their_host_only() {
        let same = |o: &str, h: &str| same_origin(o.as_bytes(), Some(h.as_bytes()));
        assert!(same("http://127.0.0.1:4180", "127.0.0.1:4180"));
        assert!(same("http://LocalHost:4180", "localhost:4180"));
        assert!(same("http://control.example", "control.example:80"));
        assert!(same("https://control.example:443", "control.example"));
        assert!(same("http://[::1]:4180", "[::1]:4180"));
        assert!(!same("http://evil.example", "127.0.0.1:4180"));
        assert!(!same("http://127.0.0.1:4181", "127.0.0.1:4180"));
        assert!(!same("https://control.example", "control.example:80"));
        assert!(!same("null", "127.0.0.1:4180"));
        assert!(!same("file://", ""));
        assert!(!same_origin(b"http://127.0.0.1:4180", None));
    }

    #[test]
    fn changes_need_a_json_content_type() {
        let with = |ct: Option<&str>| {
            let mut req = Request::post("/v1/services/web/rollback");
            if let Some(ct) = ct {
                req = req.header(CONTENT_TYPE, ct);
            }
            json_content(&req.body(()).unwrap())
        };
        assert!(with(Some("application/json")));
        assert!(with(Some("Application/JSON; charset=utf-8")));
        assert!(!with(None));
        assert!(!with(Some("application/x-www-form-urlencoded")));
        assert!(!with(Some("text/plain")));
        assert!(!with(Some("multipart/form-data; boundary=x")));
        assert!(!with(Some("application/jsonx")));
    }
}
