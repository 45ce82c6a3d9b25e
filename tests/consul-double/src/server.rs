//! The HTTP side: hyper server, routing, request parsing, blocking queries,
//! metadata headers and the JSON shapes of the fixtures.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::acl::{Access, Authz, Resource};
use crate::filter::{self, Expr, Selectable, Val};
use crate::state::{self, CatalogRow, Check, HealthRow, Instance, KvMode, Node, State, TtlArm};
use crate::util::{
    go_json, parse_go_bool, parse_go_duration, parse_go_uint, parse_query, percent_decode,
    query_escape,
};
use crate::{lock, CheckDef, RecordedRequest, ServiceDef, Shared, Status, TaggedAddress, Weights};

type Resp = Response<Full<Bytes>>;

const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

pub(crate) async fn serve(listener: TcpListener, shared: Weak<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let weak = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let weak = weak.clone();
                        async move { Ok::<_, Infallible>(entry(weak, req).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    // Go canonicalises header names (X-Consul-Knownleader).
                    builder.title_case_headers(true);
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

// ---- response helpers ---------------------------------------------------

fn hname(s: &'static str) -> HeaderName {
    HeaderName::from_static(s)
}

fn hval(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn respond(code: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status_code(code);
    r
}

/// A plain-text error, as Consul's `handleErr` writes it.
fn text(code: u16, msg: &str) -> Resp {
    let mut r = respond(code, msg.to_string());
    if !msg.is_empty() {
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}

/// A plain-text error on its way out (kept small; see `text`).
struct Fail(u16, String);

impl Fail {
    fn into_resp(self) -> Resp {
        text(self.0, &self.1)
    }
}

fn fail(code: u16, msg: &str) -> Fail {
    Fail(code, msg.to_string())
}

fn empty_ok() -> Resp {
    respond(200, Bytes::new())
}

fn json_resp<T: Serialize>(value: &T, pretty: bool) -> Resp {
    let mut r = respond(200, go_json(value, pretty));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// ---- request context ----------------------------------------------------

struct Ctx<'a> {
    sh: &'a Shared,
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Ctx<'_> {
    fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn has(&self, name: &str) -> bool {
        self.query.iter().any(|(k, _)| k == name)
    }
    fn q_all(&self, name: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn pretty(&self) -> bool {
        self.has("pretty")
    }
    fn token(&self) -> String {
        token_from(&self.query, &self.headers)
    }
    fn authz(&self) -> Result<Authz, Fail> {
        lock(&self.sh.acl)
            .resolve(&self.token())
            .map_err(|e| fail(403, &e))
    }
    fn dc_ok(&self) -> Result<(), Fail> {
        match self.q("dc") {
            Some(dc) if !dc.is_empty() && dc != self.sh.cfg.datacenter => {
                Err(fail(500, "No path to datacenter"))
            }
            _ => Ok(()),
        }
    }
}

/// Token: `?token=`, then `X-Consul-Token`, then `Authorization: Bearer`.
fn token_from(query: &[(String, String)], headers: &HeaderMap) -> String {
    if let Some((_, t)) = query.iter().find(|(k, v)| k == "token" && !v.is_empty()) {
        return t.clone();
    }
    if let Some(t) = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    {
        return t.to_string();
    }
    if let Some(auth) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = auth.trim().splitn(2, ' ');
        if let (Some(scheme), Some(tok)) = (parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") && !tok.trim().is_empty() {
                return tok.trim().to_string();
            }
        }
    }
    String::new()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Consistency {
    Leader,
    Stale,
    Consistent,
}

impl Consistency {
    fn as_str(self) -> &'static str {
        match self {
            Consistency::Leader => "leader",
            Consistency::Stale => "stale",
            Consistency::Consistent => "consistent",
        }
    }
}

/// Parsed options of a read (blocking-capable) endpoint.
struct ReadOpts {
    min_index: u64,
    wait: Duration,
    consistency: Consistency,
    authz: Authz,
}

/// Consistency, wait/index, dc, leader, token — in Consul's order.
fn read_opts(ctx: &Ctx<'_>) -> Result<ReadOpts, Fail> {
    let stale = ctx.has("stale") || ctx.has("max_stale");
    let consistent = ctx.has("consistent");
    if stale && consistent {
        return Err(fail(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    if ctx.has("cached") && consistent {
        return Err(fail(
            400,
            "Cannot specify ?cached with ?consistent, conflicting semantics.",
        ));
    }
    let consistency = if stale {
        Consistency::Stale
    } else if consistent {
        Consistency::Consistent
    } else {
        Consistency::Leader
    };
    let mut requested = None;
    if let Some(w) = ctx.q("wait").filter(|w| !w.is_empty()) {
        match parse_go_duration(w) {
            Ok(d) => requested = d,
            Err(()) => return Err(fail(400, "Invalid wait time")),
        }
    }
    let mut min_index = 0;
    if let Some(i) = ctx.q("index").filter(|i| !i.is_empty()) {
        match parse_go_uint(i) {
            Some(i) => min_index = i,
            None => return Err(fail(400, "Invalid index")),
        }
    }
    ctx.dc_ok()?;
    let mut consistency = consistency;
    {
        let rt = lock(&ctx.sh.rt);
        // `max_stale`: a server whose last contact with the leader is
        // older retries once in default mode (API.md 4): the catalog's
        // and health's endpoints do (`RETRY_ONCE`); KV reads do not, and
        // answer from the server as it is (their headers say how old).
        let retries_once =
            ctx.path.starts_with("/v1/catalog") || ctx.path.starts_with("/v1/health");
        if let Some(bound) = ctx.q("max_stale").filter(|b| !b.is_empty()) {
            let bound = parse_go_duration(bound)
                .map_err(|()| fail(400, "Invalid max_stale"))?
                .unwrap_or_default();
            let lost = (rt.leader_lost_at)
                .filter(|_| !rt.leader)
                .map_or(Duration::ZERO, |t| t.elapsed());
            if rt.last_contact + lost > bound && retries_once {
                consistency = Consistency::Leader;
            }
        }
        if !rt.leader && consistency != Consistency::Stale {
            return Err(fail(500, "No cluster leader"));
        }
    }
    let authz = ctx.authz()?;
    let wait = effective_wait(ctx.sh, requested);
    Ok(ReadOpts {
        min_index,
        wait,
        consistency,
        authz,
    })
}

/// Default 5 min, clamp 10 min, jitter < wait/16, then the test knobs.
fn effective_wait(sh: &Shared, requested: Option<Duration>) -> Duration {
    let rt = lock(&sh.rt);
    let jitter = if rt.jitter { fastrand::f64() } else { 0.0 };
    compute_wait(requested, jitter, rt.wait_scale, rt.max_wait)
}

/// rpc.go `RPCQueryTimeout`: `requested` (None/zero → 5 min) clamped to
/// 10 min, plus `jitter` (in `[0, 1)`) × wait/16; then scaled and capped.
fn compute_wait(
    requested: Option<Duration>,
    jitter: f64,
    scale: f64,
    max_wait: Option<Duration>,
) -> Duration {
    let mut w = match requested {
        None => DEFAULT_WAIT,
        Some(d) if d.is_zero() => DEFAULT_WAIT,
        Some(d) => d.min(MAX_WAIT),
    };
    w += (w / 16).mul_f64(jitter.clamp(0.0, 1.0));
    if scale.is_finite() && scale >= 0.0 && scale != 1.0 {
        w = w.mul_f64(scale);
    }
    if let Some(m) = max_wait {
        w = w.min(m);
    }
    w
}

/// Decrements the blocked-query counter when a wait ends (or is dropped).
struct BlockedGuard<'a>(&'a Shared);

impl Drop for BlockedGuard<'_> {
    fn drop(&mut self) {
        self.0.blocked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `compute` until its index exceeds `min_index`, the wait expires,
/// or a reset/release hook fires (Consul's blockingquery.Query).
async fn blocking<T>(
    sh: &Shared,
    opts: &ReadOpts,
    compute: impl Fn(&State) -> (u64, T),
) -> (u64, T) {
    let mut rx = sh.changes.subscribe();
    let gen = sh.wake_gen.load(Ordering::SeqCst);
    let deadline = Instant::now() + opts.wait;
    let mut guard = None;
    loop {
        rx.borrow_and_update();
        let (idx, v) = {
            let st = lock(&sh.state);
            compute(&st)
        };
        if opts.min_index == 0
            || idx > opts.min_index
            || sh.wake_gen.load(Ordering::SeqCst) != gen
            || Instant::now() >= deadline
        {
            return (idx, v);
        }
        if guard.is_none() {
            sh.blocked.fetch_add(1, Ordering::SeqCst);
            guard = Some(BlockedGuard(sh));
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// §3 metadata headers.
fn set_meta(
    sh: &Shared,
    r: &mut Resp,
    index: u64,
    opts: &ReadOpts,
    filtered_by_acls: bool,
    streaming: bool,
) {
    let rt = lock(&sh.rt);
    let h = r.headers_mut();
    let index = if rt.zero_index { 0 } else { index.max(1) };
    h.insert(hname("x-consul-index"), hval(&index.to_string()));
    if !streaming {
        let known = rt.leader || opts.consistency != Consistency::Stale;
        let last = if opts.consistency == Consistency::Stale {
            let lost = rt
                .leader_lost_at
                .filter(|_| !rt.leader)
                .map_or(Duration::ZERO, |t| t.elapsed());
            rt.last_contact + lost
        } else {
            Duration::ZERO
        };
        h.insert(
            hname("x-consul-knownleader"),
            HeaderValue::from_static(if known { "true" } else { "false" }),
        );
        h.insert(
            hname("x-consul-lastcontact"),
            hval(&last.as_millis().to_string()),
        );
    }
    h.insert(
        hname("x-consul-effective-consistency"),
        HeaderValue::from_static(opts.consistency.as_str()),
    );
    h.insert(
        hname("x-consul-query-backend"),
        HeaderValue::from_static(if streaming {
            "streaming"
        } else {
            "blocking-query"
        }),
    );
    if filtered_by_acls {
        h.insert(
            hname("x-consul-results-filtered-by-acls"),
            HeaderValue::from_static("true"),
        );
    }
}

// ---- entry and routing --------------------------------------------------

async fn entry(weak: Weak<Shared>, req: Request<Incoming>) -> Resp {
    let Some(sh) = weak.upgrade() else {
        return text(503, "consul double stopped");
    };
    let mut r = handle(&sh, req).await;
    let policy = if lock(&sh.acl).enabled {
        "deny"
    } else {
        "allow"
    };
    r.headers_mut().insert(
        hname("x-consul-default-acl-policy"),
        HeaderValue::from_static(policy),
    );
    r
}

async fn handle(sh: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let raw_path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    lock(&sh.requests).push(RecordedRequest {
        method: parts.method.clone(),
        path: raw_path.clone(),
        query: raw_query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        at: Instant::now(),
    });
    let (delay, failure) = {
        let mut rt = lock(&sh.rt);
        (rt.delay, rt.failures.pop_front())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some((code, msg)) = failure {
        return text(code, &msg);
    }
    let Some(path) = percent_decode(&raw_path, false) else {
        return text(400, "Invalid URL path: bad percent-encoding");
    };
    if path.contains('\n') {
        return text(400, "Invalid URL path: encoded linefeed is not allowed");
    }
    let ctx = Ctx {
        sh,
        method: parts.method,
        path,
        query: parse_query(&raw_query),
        headers: parts.headers,
        body,
    };
    route(&ctx).await
}

#[derive(Clone, Copy)]
enum Route {
    HealthService,
    HealthChecks,
    CatalogServices,
    CatalogService,
    CatalogDatacenters,
    AgentRegister,
    AgentDeregister,
    AgentServiceMaint,
    AgentNodeMaint,
    CheckPass,
    CheckWarn,
    CheckFail,
    CheckUpdate,
    Kv,
    StatusLeader,
    IntentionsMatch,
}

const GET: &[Method] = &[Method::GET];
const PUT: &[Method] = &[Method::PUT];
const KV: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];

/// (pattern, is-prefix, methods, route) — Go ServeMux style.
const ROUTES: &[(&str, bool, &[Method], Route)] = &[
    (
        "/v1/connect/intentions/match",
        false,
        GET,
        Route::IntentionsMatch,
    ),
    ("/v1/health/service/", true, GET, Route::HealthService),
    ("/v1/health/checks/", true, GET, Route::HealthChecks),
    ("/v1/catalog/services", false, GET, Route::CatalogServices),
    ("/v1/catalog/service/", true, GET, Route::CatalogService),
    (
        "/v1/catalog/datacenters",
        false,
        GET,
        Route::CatalogDatacenters,
    ),
    (
        "/v1/agent/service/register",
        false,
        PUT,
        Route::AgentRegister,
    ),
    (
        "/v1/agent/service/deregister/",
        true,
        PUT,
        Route::AgentDeregister,
    ),
    (
        "/v1/agent/service/maintenance/",
        true,
        PUT,
        Route::AgentServiceMaint,
    ),
    ("/v1/agent/maintenance", false, PUT, Route::AgentNodeMaint),
    ("/v1/agent/check/pass/", true, PUT, Route::CheckPass),
    ("/v1/agent/check/warn/", true, PUT, Route::CheckWarn),
    ("/v1/agent/check/fail/", true, PUT, Route::CheckFail),
    ("/v1/agent/check/update/", true, PUT, Route::CheckUpdate),
    ("/v1/kv/", true, KV, Route::Kv),
    ("/v1/status/leader", false, GET, Route::StatusLeader),
];

async fn route(ctx: &Ctx<'_>) -> Resp {
    let found = ROUTES.iter().find(|(pat, prefix, _, _)| {
        if *prefix {
            ctx.path.starts_with(pat)
        } else {
            ctx.path == *pat
        }
    });
    let Some((pat, prefix, methods, route)) = found else {
        return text(404, "Invalid URL path: not a recognized HTTP API endpoint");
    };
    let allow = std::iter::once("OPTIONS")
        .chain(methods.iter().map(Method::as_str))
        .collect::<Vec<_>>()
        .join(",");
    if ctx.method == Method::OPTIONS {
        let mut r = empty_ok();
        r.headers_mut().insert(ALLOW, hval(&allow));
        return r;
    }
    if !methods.contains(&ctx.method) {
        let mut r = text(405, &format!("method {} not allowed", ctx.method));
        r.headers_mut().insert(ALLOW, hval(&allow));
        return r;
    }
    let rest = if *prefix {
        ctx.path[pat.len()..].to_string()
    } else {
        String::new()
    };
    let result = match route {
        Route::HealthService => health_service(ctx, &rest).await,
        Route::HealthChecks => health_checks(ctx, &rest).await,
        Route::CatalogServices => catalog_services(ctx).await,
        Route::CatalogService => catalog_service(ctx, &rest).await,
        Route::CatalogDatacenters => Ok(json_resp(&[&ctx.sh.cfg.datacenter], ctx.pretty())),
        Route::AgentRegister => agent_register(ctx),
        Route::AgentDeregister => agent_deregister(ctx, &rest),
        Route::AgentServiceMaint => agent_service_maintenance(ctx, &rest),
        Route::AgentNodeMaint => agent_node_maintenance(ctx),
        Route::CheckPass => check_ttl(ctx, &rest, Some(Status::Passing)),
        Route::CheckWarn => check_ttl(ctx, &rest, Some(Status::Warning)),
        Route::CheckFail => check_ttl(ctx, &rest, Some(Status::Critical)),
        Route::CheckUpdate => check_ttl(ctx, &rest, None),
        Route::Kv => match ctx.method {
            Method::GET => kv_get(ctx, &rest).await,
            Method::PUT => kv_put(ctx, &rest),
            _ => kv_delete(ctx, &rest),
        },
        Route::IntentionsMatch => intentions_match(ctx),
        Route::StatusLeader => {
            let leader = if lock(&ctx.sh.rt).leader {
                "127.0.0.1:8300"
            } else {
                ""
            };
            Ok(json_resp(&leader, ctx.pretty()))
        }
    };
    result.unwrap_or_else(Fail::into_resp)
}

/// `GET /v1/connect/intentions/match?by=destination&name=N`: for each
/// `name`, the intentions that apply to it, most precise first (an exact
/// source outranks `*`: Consul's precedence 9 and 8 in the default
/// namespace).
fn intentions_match(ctx: &Ctx<'_>) -> Result<Resp, Fail> {
    if ctx.q("by") != Some("destination") {
        return Ok(text(400, "Request decode failed: by must be destination"));
    }
    let names: Vec<&str> = ctx
        .query
        .iter()
        .filter(|(k, _)| k == "name")
        .map(|(_, v)| v.as_str())
        .collect();
    if names.is_empty() {
        return Ok(text(400, "required query parameter 'name' not set"));
    }
    let opts = read_opts(ctx)?;
    for name in &names {
        if let Err(denied) = opts.authz.require(Resource::Intention, name, Access::Read) {
            return Ok(text(403, &denied));
        }
    }
    let all = lock(&ctx.sh.intentions).clone();
    let mut out = Map::new();
    for name in names {
        let mut matched: Vec<(u32, usize, Value)> = all
            .iter()
            .enumerate()
            .filter(|(_, (_, _, d, _))| d == name || d == "*")
            .map(|(i, (p, s, d, a))| {
                // Consul's precedence does not look at the peer.
                let precedence = match (s == "*", d == "*") {
                    (false, false) => 9,
                    (true, false) => 8,
                    (false, true) => 6,
                    (true, true) => 5,
                };
                let mut json = serde_json::json!({
                    "ID": format!("00000000-0000-0000-0000-{:012}", i + 1),
                    "Description": "",
                    "SourceNS": "default",
                    "SourceName": s,
                    "DestinationNS": "default",
                    "DestinationName": d,
                    "SourceType": "consul",
                    "Action": a,
                    "Precedence": precedence,
                    "CreateIndex": i + 10,
                    "ModifyIndex": i + 10,
                });
                if !p.is_empty() {
                    json["SourcePeer"] = Value::String(p.clone());
                }
                (precedence, i, json)
            })
            .collect();
        matched.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        // No match: the state's nil slice, which Go writes as `null`.
        let list = if matched.is_empty() {
            Value::Null
        } else {
            Value::Array(matched.into_iter().map(|m| m.2).collect())
        };
        out.insert(name.to_owned(), list);
    }
    Ok(json_resp(&Value::Object(out), ctx.pretty()))
}

// ---- JSON shapes (field names and order of the fixtures) ----------------

#[derive(Serialize)]
struct TaggedOut {
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Port")]
    port: u16,
}

fn tagged_out(m: &BTreeMap<String, TaggedAddress>) -> BTreeMap<String, TaggedOut> {
    m.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                TaggedOut {
                    address: v.address.clone(),
                    port: v.port,
                },
            )
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsOut {
    passing: u32,
    warning: u32,
}

impl From<Weights> for WeightsOut {
    fn from(w: Weights) -> Self {
        WeightsOut {
            passing: w.passing,
            warning: w.warning,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeOut {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
}

impl From<&Node> for NodeOut {
    fn from(n: &Node) -> Self {
        NodeOut {
            id: n.id.clone(),
            node: n.name.clone(),
            address: n.address.clone(),
            datacenter: n.datacenter.clone(),
            tagged_addresses: n.tagged_addresses.clone(),
            meta: n.meta.clone(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceOut {
    #[serde(skip_serializing_if = "String::is_empty")]
    kind: String,
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<String, TaggedOut>,
    meta: BTreeMap<String, String>,
    port: u16,
    weights: WeightsOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

fn service_out(i: &Instance, ns: &Option<String>) -> ServiceOut {
    ServiceOut {
        kind: i.kind.clone(),
        id: i.id.clone(),
        service: i.name.clone(),
        tags: i.tags.clone(),
        address: i.address.clone(),
        tagged_addresses: tagged_out(&i.tagged_addresses),
        meta: i.meta.clone(),
        port: i.port,
        weights: i.weights.into(),
        namespace: ns.clone(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckOut {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

fn check_out(c: &Check, ns: &Option<String>) -> CheckOut {
    CheckOut {
        node: c.node.clone(),
        check_id: c.check_id.clone(),
        name: c.name.clone(),
        status: c.status.as_str(),
        notes: c.notes.clone(),
        output: c.output.clone(),
        service_id: c.service_id.clone(),
        service_name: c.service_name.clone(),
        service_tags: c.service_tags.clone(),
        namespace: ns.clone(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthOut {
    node: NodeOut,
    service: ServiceOut,
    checks: Vec<CheckOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProxyOut {
    destination_service_name: String,
    #[serde(rename = "DestinationServiceID")]
    destination_service_id: String,
    local_service_address: String,
    local_service_port: u16,
    config: Option<()>,
    upstreams: Option<()>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ConnectOut {
    native: bool,
    proxy: Option<()>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogOut {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    node_meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
    service_address: String,
    service_enable_tag_override: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    service_kind: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_port: u16,
    service_meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    service_tagged_addresses: BTreeMap<String, TaggedOut>,
    service_tags: Vec<String>,
    service_proxy: ProxyOut,
    service_connect: ConnectOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

fn catalog_out(r: &CatalogRow, ns: &Option<String>) -> CatalogOut {
    CatalogOut {
        id: r.node.id.clone(),
        node: r.node.name.clone(),
        address: r.node.address.clone(),
        datacenter: r.node.datacenter.clone(),
        tagged_addresses: r.node.tagged_addresses.clone(),
        node_meta: r.node.meta.clone(),
        create_index: r.inst.create_index,
        modify_index: r.inst.modify_index,
        service_address: r.inst.address.clone(),
        service_enable_tag_override: r.inst.enable_tag_override,
        service_kind: r.inst.kind.clone(),
        service_id: r.inst.id.clone(),
        service_name: r.inst.name.clone(),
        service_port: r.inst.port,
        service_meta: r.inst.meta.clone(),
        service_tagged_addresses: tagged_out(&r.inst.tagged_addresses),
        service_tags: r.inst.tags.clone(),
        service_proxy: ProxyOut {
            destination_service_name: String::new(),
            destination_service_id: String::new(),
            local_service_address: String::new(),
            local_service_port: 0,
            config: None,
            upstreams: None,
        },
        service_connect: ConnectOut {
            native: false,
            proxy: None,
        },
        namespace: ns.clone(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvOut {
    create_index: u64,
    modify_index: u64,
    lock_index: u64,
    key: String,
    flags: u64,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

fn kv_out(e: &crate::KvEntry) -> KvOut {
    KvOut {
        create_index: e.create_index,
        modify_index: e.modify_index,
        lock_index: e.lock_index,
        key: e.key.clone(),
        flags: e.flags,
        value: if e.value.is_empty() {
            None
        } else {
            Some(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        session: e.session.clone(),
    }
}

// ---- filter selectors ---------------------------------------------------

fn one(s: impl ToString) -> Result<Vec<Val>, String> {
    Ok(vec![Val::Str(s.to_string())])
}

fn bad_selector(path: &[String]) -> String {
    format!("Selector {:?} is not valid", path.join("."))
}

fn select_tagged(
    m: &BTreeMap<String, TaggedAddress>,
    path: &[String],
    full: &[String],
) -> Result<Vec<Val>, String> {
    match path {
        [] => Ok(vec![Val::List(m.keys().cloned().collect())]),
        [k] => Ok(vec![Val::Str(
            m.get(k).map(|t| t.address.clone()).unwrap_or_default(),
        )]),
        [k, f] if f == "Address" => one(m.get(k).map(|t| t.address.clone()).unwrap_or_default()),
        [k, f] if f == "Port" => one(m.get(k).map_or(0, |t| t.port)),
        _ => Err(bad_selector(full)),
    }
}

fn select_node(n: &Node, path: &[String], full: &[String]) -> Result<Vec<Val>, String> {
    let first = path.first().map(String::as_str);
    match (first, &path[path.len().min(1)..]) {
        (Some("ID"), []) => one(&n.id),
        (Some("Node"), []) => one(&n.name),
        (Some("Address"), []) => one(&n.address),
        (Some("Datacenter"), []) => one(&n.datacenter),
        (Some("Partition" | "PeerName"), []) => one(""),
        (Some("TaggedAddresses"), rest) => {
            filter::select_map(&n.tagged_addresses, rest, &full.join("."))
        }
        (Some("Meta"), rest) => filter::select_map(&n.meta, rest, &full.join(".")),
        _ => Err(bad_selector(full)),
    }
}

fn select_service(i: &Instance, path: &[String], full: &[String]) -> Result<Vec<Val>, String> {
    let first = path.first().map(String::as_str);
    let rest = &path[path.len().min(1)..];
    match (first, rest) {
        (Some("Kind"), []) => one(&i.kind),
        (Some("ID"), []) => one(&i.id),
        (Some("Service"), []) => one(&i.name),
        (Some("Tags"), []) => Ok(vec![Val::List(i.tags.clone())]),
        (Some("Address"), []) => one(&i.address),
        (Some("Port"), []) => one(i.port),
        (Some("EnableTagOverride"), []) => one(i.enable_tag_override),
        (Some("Namespace" | "Partition" | "PeerName" | "SocketPath"), []) => one(""),
        (Some("Meta"), rest) => filter::select_map(&i.meta, rest, &full.join(".")),
        (Some("TaggedAddresses"), rest) => select_tagged(&i.tagged_addresses, rest, full),
        (Some("Weights"), [w]) if w == "Passing" => one(i.weights.passing),
        (Some("Weights"), [w]) if w == "Warning" => one(i.weights.warning),
        (Some("Connect"), [f]) if f == "Native" => one(false),
        _ => Err(bad_selector(full)),
    }
}

fn select_check(c: &Check, path: &[String], full: &[String]) -> Result<Vec<Val>, String> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["Node"] => one(&c.node),
        ["CheckID"] => one(&c.check_id),
        ["Name"] => one(&c.name),
        ["Status"] => one(c.status.as_str()),
        ["Notes"] => one(&c.notes),
        ["Output"] => one(&c.output),
        ["ServiceID"] => one(&c.service_id),
        ["ServiceName"] => one(&c.service_name),
        ["ServiceTags"] => Ok(vec![Val::List(c.service_tags.clone())]),
        ["Type"] => one(if c.ttl.is_some() { "ttl" } else { "" }),
        ["Namespace" | "Partition" | "PeerName"] => one(""),
        _ => Err(bad_selector(full)),
    }
}

impl Selectable for HealthRow {
    fn select(&self, path: &[String]) -> Result<Vec<Val>, String> {
        match path.first().map(String::as_str) {
            Some("Node") => select_node(&self.node, &path[1..], path),
            Some("Service") => select_service(&self.inst, &path[1..], path),
            Some("Checks") if path.len() == 1 => Ok(vec![Val::List(
                self.checks.iter().map(|c| c.check_id.clone()).collect(),
            )]),
            Some("Checks") => {
                // validate even when there are no checks
                select_check(&Check::default(), &path[1..], path)?;
                let mut out = Vec::new();
                for c in &self.checks {
                    out.extend(select_check(c, &path[1..], path)?);
                }
                Ok(out)
            }
            _ => Err(bad_selector(path)),
        }
    }
}

impl Selectable for CatalogRow {
    fn select(&self, path: &[String]) -> Result<Vec<Val>, String> {
        let first = path.first().map(String::as_str).unwrap_or("");
        let rest = &path[path.len().min(1)..];
        let (n, i) = (&self.node, &self.inst);
        match (first, rest) {
            ("ID", []) => one(&n.id),
            ("Node", []) => one(&n.name),
            ("Address", []) => one(&n.address),
            ("Datacenter", []) => one(&n.datacenter),
            ("TaggedAddresses", rest) => {
                filter::select_map(&n.tagged_addresses, rest, &path.join("."))
            }
            ("NodeMeta", rest) => filter::select_map(&n.meta, rest, &path.join(".")),
            ("ServiceKind", []) => one(&i.kind),
            ("ServiceID", []) => one(&i.id),
            ("ServiceName", []) => one(&i.name),
            ("ServiceTags", []) => Ok(vec![Val::List(i.tags.clone())]),
            ("ServiceAddress", []) => one(&i.address),
            ("ServicePort", []) => one(i.port),
            ("ServiceEnableTagOverride", []) => one(i.enable_tag_override),
            ("ServiceMeta", rest) => filter::select_map(&i.meta, rest, &path.join(".")),
            ("ServiceTaggedAddresses", rest) => select_tagged(&i.tagged_addresses, rest, path),
            ("ServiceWeights", [w]) if w == "Passing" => one(i.weights.passing),
            ("ServiceWeights", [w]) if w == "Warning" => one(i.weights.warning),
            ("ServiceConnect", [f]) if f == "Native" => one(false),
            _ => Err(bad_selector(path)),
        }
    }
}

impl Selectable for Check {
    fn select(&self, path: &[String]) -> Result<Vec<Val>, String> {
        select_check(self, path, path)
    }
}

/// Parses `?filter=` and validates its selectors against `probe`.
fn parse_filter(ctx: &Ctx<'_>, probe: &dyn Selectable) -> Result<Option<Expr>, Fail> {
    match ctx.q("filter").filter(|f| !f.trim().is_empty()) {
        None => Ok(None),
        Some(f) => {
            let e = filter::parse(f).map_err(|e| fail(500, &e))?;
            filter::validate(&e, probe).map_err(|e| fail(500, &e))?;
            Ok(Some(e))
        }
    }
}

fn apply_filter<T: Selectable>(rows: Vec<T>, f: &Option<Expr>) -> Result<Vec<T>, Fail> {
    let Some(e) = f else { return Ok(rows) };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if filter::eval(e, &r).map_err(|e| fail(500, &e))? {
            out.push(r);
        }
    }
    Ok(out)
}

/// `node-meta=key:value` pairs.
fn node_meta(ctx: &Ctx<'_>) -> Vec<(String, String)> {
    ctx.q_all("node-meta")
        .into_iter()
        .map(|kv| match kv.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect()
}

fn probe_health() -> HealthRow {
    HealthRow {
        node: Node::default(),
        inst: Instance::default(),
        checks: Vec::new(),
    }
}

fn probe_catalog() -> CatalogRow {
    CatalogRow {
        node: Node::default(),
        inst: Instance::default(),
    }
}

// ---- health / catalog ---------------------------------------------------

async fn health_service(ctx: &Ctx<'_>, name: &str) -> Result<Resp, Fail> {
    if name.is_empty() {
        return Err(fail(400, "Missing service name"));
    }
    let opts = read_opts(ctx)?;
    let passing = match ctx.q("passing") {
        None => false,
        Some("") => true,
        Some(v) => parse_go_bool(v).ok_or_else(|| fail(400, "Invalid value for ?passing"))?,
    };
    let expr = parse_filter(ctx, &probe_health())?;
    let tags = ctx.q_all("tag");
    let nm = node_meta(ctx);
    let streaming =
        lock(&ctx.sh.rt).streaming && (opts.min_index > 0 || ctx.has("cached")) && !ctx.has("near");
    let (index, rows) = blocking(ctx.sh, &opts, |st| {
        (st.service_index(name), st.health_rows(name, &tags, &nm))
    })
    .await;
    let rows = apply_filter(rows, &expr)?;
    let before = rows.len();
    let mut rows: Vec<HealthRow> = rows
        .into_iter()
        .filter(|r| {
            opts.authz
                .allows(Resource::Service, &r.inst.name, Access::Read)
                && opts
                    .authz
                    .allows(Resource::Node, &r.node.name, Access::Read)
        })
        .collect();
    let filtered = opts.authz.explicit && rows.len() != before;
    if passing {
        // health_endpoint.go filterNonPassing: swap-remove, order not kept
        let mut n = rows.len();
        let mut i = 0;
        while i < n {
            if rows[i].checks.iter().any(|c| c.status != Status::Passing) {
                rows.swap(i, n - 1);
                n -= 1;
            } else {
                i += 1;
            }
        }
        rows.truncate(n);
    }
    let ns = &ctx.sh.cfg.namespace;
    let out: Vec<HealthOut> = rows
        .iter()
        .map(|r| HealthOut {
            node: (&r.node).into(),
            service: service_out(&r.inst, ns),
            checks: r.checks.iter().map(|c| check_out(c, ns)).collect(),
        })
        .collect();
    let mut r = json_resp(&out, ctx.pretty());
    set_meta(ctx.sh, &mut r, index, &opts, filtered, streaming);
    if ctx.has("cached") {
        r.headers_mut()
            .insert(hname("x-cache"), HeaderValue::from_static("MISS"));
    }
    Ok(r)
}

async fn health_checks(ctx: &Ctx<'_>, name: &str) -> Result<Resp, Fail> {
    if name.is_empty() {
        return Err(fail(400, "Missing service name"));
    }
    let opts = read_opts(ctx)?;
    let expr = parse_filter(ctx, &Check::default())?;
    let (index, checks) = blocking(ctx.sh, &opts, |st| {
        (st.service_index(name), st.service_checks(name))
    })
    .await;
    let checks = apply_filter(checks, &expr)?;
    let before = checks.len();
    let checks: Vec<Check> = checks
        .into_iter()
        .filter(|c| {
            opts.authz
                .allows(Resource::Service, &c.service_name, Access::Read)
                && opts.authz.allows(Resource::Node, &c.node, Access::Read)
        })
        .collect();
    let filtered = opts.authz.explicit && checks.len() != before;
    let ns = &ctx.sh.cfg.namespace;
    let out: Vec<CheckOut> = checks.iter().map(|c| check_out(c, ns)).collect();
    let mut r = json_resp(&out, ctx.pretty());
    set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
    Ok(r)
}

async fn catalog_services(ctx: &Ctx<'_>) -> Result<Resp, Fail> {
    let opts = read_opts(ctx)?;
    let expr = parse_filter(ctx, &probe_catalog())?;
    let nm = node_meta(ctx);
    let (index, rows) = blocking(ctx.sh, &opts, |st| {
        (st.services_index.max(1), st.all_catalog_rows(&nm))
    })
    .await;
    let rows = apply_filter(rows, &expr)?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut filtered = false;
    for r in &rows {
        if !opts
            .authz
            .allows(Resource::Service, &r.inst.name, Access::Read)
        {
            filtered = true;
            continue;
        }
        let tags = out.entry(r.inst.name.clone()).or_default();
        for t in &r.inst.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
    }
    let mut r = json_resp(&out, ctx.pretty());
    set_meta(
        ctx.sh,
        &mut r,
        index,
        &opts,
        filtered && opts.authz.explicit,
        false,
    );
    Ok(r)
}

async fn catalog_service(ctx: &Ctx<'_>, name: &str) -> Result<Resp, Fail> {
    if name.is_empty() {
        return Err(fail(400, "Missing service name"));
    }
    let opts = read_opts(ctx)?;
    let expr = parse_filter(ctx, &probe_catalog())?;
    let tags = ctx.q_all("tag");
    let nm = node_meta(ctx);
    let (index, rows) = blocking(ctx.sh, &opts, |st| {
        (st.service_index(name), st.catalog_rows(name, &tags, &nm))
    })
    .await;
    let rows = apply_filter(rows, &expr)?;
    let before = rows.len();
    let rows: Vec<CatalogRow> = rows
        .into_iter()
        .filter(|r| {
            opts.authz
                .allows(Resource::Service, &r.inst.name, Access::Read)
                && opts
                    .authz
                    .allows(Resource::Node, &r.node.name, Access::Read)
        })
        .collect();
    let filtered = opts.authz.explicit && rows.len() != before;
    let ns = &ctx.sh.cfg.namespace;
    let out: Vec<CatalogOut> = rows.iter().map(|r| catalog_out(r, ns)).collect();
    let mut r = json_resp(&out, ctx.pretty());
    set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
    Ok(r)
}

// ---- agent ----------------------------------------------------------------

/// Applies an agent write now, or after the anti-entropy delay.
fn agent_apply(ctx: &Ctx<'_>, f: impl FnOnce(&mut State) -> Vec<TtlArm> + Send + 'static) {
    let delay = lock(&ctx.sh.rt).sync_delay;
    if delay.is_zero() {
        ctx.sh.write(|st| ((), f(st)));
        return;
    }
    let weak = ctx.sh.me.clone();
    ctx.sh.runtime.spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(sh) = weak.upgrade() {
            sh.write(|st| ((), f(st)));
        }
    });
}

fn norm_key(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Case-insensitive, snake_case-tolerant field lookup (Go's decoder +
/// Consul's snake_case translation).
fn field<'a>(obj: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    for name in names {
        let n = norm_key(name);
        if let Some((_, v)) = obj.iter().find(|(k, v)| norm_key(k) == n && !v.is_null()) {
            return Some(v);
        }
    }
    None
}

fn decode_err(msg: &str) -> Fail {
    fail(400, &format!("Request decode failed: {msg}"))
}

fn f_str(obj: &Map<String, Value>, names: &[&str]) -> Result<String, Fail> {
    match field(obj, names) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go struct field {} of type string",
            json_kind(other),
            names[0]
        ))),
    }
}

fn f_int(obj: &Map<String, Value>, names: &[&str]) -> Result<i64, Fail> {
    match field(obj, names) {
        None => Ok(0),
        Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64().unwrap_or(0)),
        Some(other) => Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go struct field {} of type int",
            json_kind(other),
            names[0]
        ))),
    }
}

fn f_bool(obj: &Map<String, Value>, names: &[&str]) -> Result<bool, Fail> {
    match field(obj, names) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go struct field {} of type bool",
            json_kind(other),
            names[0]
        ))),
    }
}

fn f_str_list(obj: &Map<String, Value>, names: &[&str]) -> Result<Vec<String>, Fail> {
    match field(obj, names) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(decode_err(&format!(
                    "json: cannot unmarshal {} into Go struct field {} of type string",
                    json_kind(other),
                    names[0]
                ))),
            })
            .collect(),
        Some(other) => Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go struct field {} of type []string",
            json_kind(other),
            names[0]
        ))),
    }
}

fn f_str_map(obj: &Map<String, Value>, names: &[&str]) -> Result<BTreeMap<String, String>, Fail> {
    match field(obj, names) {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(decode_err(&format!(
                    "json: cannot unmarshal {} into Go struct field {} of type string",
                    json_kind(other),
                    names[0]
                ))),
            })
            .collect(),
        Some(other) => Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go struct field {} of type map[string]string",
            json_kind(other),
            names[0]
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn port_of(v: i64) -> Result<u16, Fail> {
    u16::try_from(v).map_err(|_| decode_err(&format!("json: port {v} out of range")))
}

const CHECK_TYPE_KEYS: &[&str] = &[
    "HTTP",
    "TCP",
    "UDP",
    "GRPC",
    "H2PING",
    "Args",
    "ScriptArgs",
    "DockerContainerID",
    "AliasService",
    "AliasNode",
    "OSService",
];

fn decode_check(v: &Value) -> Result<Option<CheckDef>, Fail> {
    let Value::Object(obj) = v else {
        return Err(decode_err(
            "json: cannot unmarshal check: expected an object",
        ));
    };
    if obj.values().all(Value::is_null) {
        return Ok(None);
    }
    let ttl_s = f_str(obj, &["TTL"])?;
    let ttl = if ttl_s.is_empty() {
        None
    } else {
        match parse_go_duration(&ttl_s) {
            Ok(Some(d)) if !d.is_zero() => Some(d),
            _ => {
                return Err(decode_err(&format!("time: invalid duration \"{ttl_s}\"")));
            }
        }
    };
    let has_type = CHECK_TYPE_KEYS.iter().any(|k| field(obj, &[k]).is_some());
    if ttl.is_none() && !has_type {
        return Err(fail(400, "Invalid check: TTL must be > 0 for TTL checks"));
    }
    if ttl.is_none() {
        let interval = f_str(obj, &["Interval"])?;
        let ok = !interval.is_empty()
            && matches!(parse_go_duration(&interval), Ok(Some(d)) if !d.is_zero());
        let alias = field(obj, &["AliasService"]).is_some() || field(obj, &["AliasNode"]).is_some();
        if !ok && !alias {
            return Err(fail(
                400,
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks",
            ));
        }
    }
    let status = f_str(obj, &["Status"])?;
    let status = if status.is_empty() {
        None
    } else {
        Some(Status::parse(&status).ok_or_else(|| {
            fail(
                400,
                "Status for checks must 'passing', 'warning', 'critical'",
            )
        })?)
    };
    let id = f_str(obj, &["CheckID", "ID"])?;
    let name = f_str(obj, &["Name"])?;
    Ok(Some(CheckDef {
        id: (!id.is_empty()).then_some(id),
        name: (!name.is_empty()).then_some(name),
        status,
        ttl,
        notes: f_str(obj, &["Notes"])?,
        output: String::new(),
    }))
}

fn decode_service(body: &[u8]) -> Result<ServiceDef, Fail> {
    let v: Value = serde_json::from_slice(body).map_err(|e| decode_err(&e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(decode_err(&format!(
            "json: cannot unmarshal {} into Go value of type structs.ServiceDefinition",
            json_kind(&v)
        )));
    };
    let mut def = ServiceDef {
        id: f_str(&obj, &["ID"])?,
        name: f_str(&obj, &["Name"])?,
        address: f_str(&obj, &["Address"])?,
        port: port_of(f_int(&obj, &["Port"])?)?,
        tags: f_str_list(&obj, &["Tags"])?,
        meta: f_str_map(&obj, &["Meta"])?,
        kind: f_str(&obj, &["Kind"])?,
        enable_tag_override: f_bool(&obj, &["EnableTagOverride"])?,
        ..ServiceDef::default()
    };
    if let Some(ta) = field(&obj, &["TaggedAddresses"]) {
        let Value::Object(m) = ta else {
            return Err(decode_err("json: cannot unmarshal TaggedAddresses"));
        };
        for (k, v) in m {
            let Value::Object(a) = v else {
                return Err(decode_err("json: cannot unmarshal TaggedAddresses entry"));
            };
            def.tagged_addresses.insert(
                k.clone(),
                TaggedAddress {
                    address: f_str(a, &["Address"])?,
                    port: port_of(f_int(a, &["Port"])?)?,
                },
            );
        }
    }
    if let Some(w) = field(&obj, &["Weights"]) {
        let Value::Object(w) = w else {
            return Err(decode_err("json: cannot unmarshal Weights"));
        };
        let (p, wa) = (f_int(w, &["Passing"])?, f_int(w, &["Warning"])?);
        state::validate_weights(p, wa).map_err(|e| fail(400, &e.0))?;
        def.weights = Some(Weights {
            passing: u32::try_from(p).unwrap_or(1),
            warning: u32::try_from(wa).unwrap_or(0),
        });
    }
    if let Some(c) = field(&obj, &["Check"]) {
        if let Some(c) = decode_check(c)? {
            def.checks.push(c);
        }
    }
    if let Some(cs) = field(&obj, &["Checks"]) {
        let Value::Array(cs) = cs else {
            return Err(decode_err("json: cannot unmarshal Checks"));
        };
        for c in cs {
            if let Some(c) = decode_check(c)? {
                def.checks.push(c);
            }
        }
    }
    Ok(def)
}

fn agent_register(ctx: &Ctx<'_>) -> Result<Resp, Fail> {
    let authz = ctx.authz()?;
    let def = decode_service(&ctx.body)?;
    state::validate_def(&def).map_err(|e| fail(400, &e.0))?;
    authz
        .require(Resource::Service, &def.name, Access::Write)
        .map_err(|e| fail(403, &e))?;
    let replace = match ctx.q("replace-existing-checks") {
        None => false,
        Some("") => true,
        Some(v) => parse_go_bool(v).unwrap_or(false),
    };
    agent_apply(ctx, move |st| match st.register(def, replace) {
        Ok((_, arms)) => arms,
        Err(_) => Vec::new(),
    });
    Ok(empty_ok())
}

fn agent_deregister(ctx: &Ctx<'_>, id: &str) -> Result<Resp, Fail> {
    let authz = ctx.authz()?;
    let name = {
        let st = lock(&ctx.sh.state);
        st.find_instance(id)
            .and_then(|k| st.instances.get(&k).map(|i| i.name.clone()))
    };
    let Some(name) = name else {
        return Err(fail(
            404,
            &format!(
                "Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."
            ),
        ));
    };
    authz
        .require(Resource::Service, &name, Access::Write)
        .map_err(|e| fail(403, &e))?;
    let id = id.to_string();
    agent_apply(ctx, move |st| {
        st.deregister(&id);
        Vec::new()
    });
    Ok(empty_ok())
}

fn parse_enable(ctx: &Ctx<'_>) -> Result<bool, Fail> {
    match ctx.q("enable") {
        None | Some("") => Err(fail(400, "Missing value for enable")),
        Some(v) => parse_go_bool(v).ok_or_else(|| fail(400, "Invalid value for enable")),
    }
}

fn agent_service_maintenance(ctx: &Ctx<'_>, id: &str) -> Result<Resp, Fail> {
    if id.is_empty() {
        return Err(fail(400, "Missing service ID"));
    }
    let enable = parse_enable(ctx)?;
    let authz = ctx.authz()?;
    let name = {
        let st = lock(&ctx.sh.state);
        st.find_instance(id)
            .and_then(|k| st.instances.get(&k).map(|i| i.name.clone()))
    };
    let Some(name) = name else {
        return Err(fail(
            404,
            &format!("No service registered with ID \"{id}\""),
        ));
    };
    authz
        .require(Resource::Service, &name, Access::Write)
        .map_err(|e| fail(403, &e))?;
    let reason = ctx.q("reason").unwrap_or("").to_string();
    let id = id.to_string();
    agent_apply(ctx, move |st| {
        st.service_maintenance(&id, enable, &reason);
        Vec::new()
    });
    Ok(empty_ok())
}

fn agent_node_maintenance(ctx: &Ctx<'_>) -> Result<Resp, Fail> {
    let enable = parse_enable(ctx)?;
    let authz = ctx.authz()?;
    let node = lock(&ctx.sh.state).agent_node.clone();
    authz
        .require(Resource::Node, &node, Access::Write)
        .map_err(|e| fail(403, &e))?;
    let reason = ctx.q("reason").unwrap_or("").to_string();
    agent_apply(ctx, move |st| {
        st.node_maintenance(enable, &reason);
        Vec::new()
    });
    Ok(empty_ok())
}

fn check_ttl(ctx: &Ctx<'_>, check_id: &str, status: Option<Status>) -> Result<Resp, Fail> {
    let authz = ctx.authz()?;
    let (status, output) = match status {
        Some(s) => (s, ctx.q("note").unwrap_or("").to_string()),
        None => {
            let v: Value =
                serde_json::from_slice(&ctx.body).map_err(|e| decode_err(&e.to_string()))?;
            let Value::Object(obj) = v else {
                return Err(decode_err("json: cannot unmarshal into checkUpdate"));
            };
            let s = f_str(&obj, &["Status"])?;
            let status = Status::parse(&s)
                .ok_or_else(|| fail(400, &format!("Invalid check status: '{s}'")))?;
            (status, f_str(&obj, &["Output"])?)
        }
    };
    let target = {
        let st = lock(&ctx.sh.state);
        let agent_key = (st.agent_node.clone(), check_id.to_string());
        let c = st
            .checks
            .get(&agent_key)
            .or_else(|| st.checks.values().find(|c| c.check_id == check_id));
        c.map(|c| (c.node.clone(), c.service_name.clone()))
    };
    let Some((node, service)) = target else {
        return Err(fail(
            404,
            &format!(
                "Unknown check ID \"{check_id}\". Ensure that the check ID is passed, not the check name."
            ),
        ));
    };
    if service.is_empty() {
        authz
            .require(Resource::Node, &node, Access::Write)
            .map_err(|e| fail(403, &e))?;
    } else {
        authz
            .require(Resource::Service, &service, Access::Write)
            .map_err(|e| fail(403, &e))?;
    }
    // Non-TTL check → 500 right away (agent-local, no sync delay).
    {
        let st = lock(&ctx.sh.state);
        let is_ttl = st
            .checks
            .get(&(node.clone(), check_id.to_string()))
            .is_some_and(|c| c.ttl.is_some());
        if !is_ttl {
            return Err(fail(
                500,
                &format!("CheckID \"{check_id}\" does not have associated TTL"),
            ));
        }
    }
    let check_id = check_id.to_string();
    agent_apply(ctx, move |st| {
        match st.ttl_update(&check_id, status, &output) {
            Ok(arm) => arm.into_iter().collect(),
            Err(_) => Vec::new(),
        }
    });
    Ok(empty_ok())
}

// ---- KV -----------------------------------------------------------------

async fn kv_get(ctx: &Ctx<'_>, key: &str) -> Result<Resp, Fail> {
    let keys_mode = ctx.has("keys");
    let recurse = ctx.has("recurse") || keys_mode;
    if key.is_empty() && !recurse {
        return Err(fail(400, "Missing key name"));
    }
    let opts = read_opts(ctx)?;
    if !recurse {
        opts.authz
            .require(Resource::Key, key, Access::Read)
            .map_err(|e| fail(403, &e))?;
        let (index, entry) =
            blocking(ctx.sh, &opts, |st| (st.kv_key_index(key), st.kv_entry(key))).await;
        let Some(entry) = entry else {
            let mut r = respond(404, Bytes::new());
            set_meta(ctx.sh, &mut r, index, &opts, false, false);
            return Ok(r);
        };
        if ctx.has("raw") {
            let len = entry.value.len();
            let mut r = respond(200, entry.value);
            let h = r.headers_mut();
            h.insert(CONTENT_LENGTH, hval(&len.to_string()));
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(
                hname("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            );
            h.insert(
                hname("content-security-policy"),
                HeaderValue::from_static("sandbox"),
            );
            set_meta(ctx.sh, &mut r, index, &opts, false, false);
            return Ok(r);
        }
        let mut r = json_resp(&[kv_out(&entry)], ctx.pretty());
        set_meta(ctx.sh, &mut r, index, &opts, false, false);
        return Ok(r);
    }
    let (index, entries) = blocking(ctx.sh, &opts, |st| {
        (st.kv_prefix_index(key), st.kv_list(key))
    })
    .await;
    let before = entries.len();
    let entries: Vec<crate::KvEntry> = entries
        .into_iter()
        .filter(|e| opts.authz.allows(Resource::Key, &e.key, Access::Read))
        .collect();
    let filtered = opts.authz.explicit && entries.len() != before;
    if keys_mode {
        let sep = ctx
            .q("separator")
            .or_else(|| ctx.q("seperator"))
            .unwrap_or("")
            .to_string();
        let mut keys: Vec<String> = Vec::new();
        for e in &entries {
            let mut k = e.key.clone();
            if !sep.is_empty() {
                if let Some(i) = e.key[key.len()..].find(&sep) {
                    k = e.key[..key.len() + i + sep.len()].to_string();
                }
            }
            if keys.last() != Some(&k) {
                keys.push(k);
            }
        }
        if keys.is_empty() && !key.is_empty() {
            let mut r = respond(404, Bytes::new());
            set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
            return Ok(r);
        }
        let mut r = json_resp(&keys, ctx.pretty());
        set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
        return Ok(r);
    }
    if entries.is_empty() {
        let mut r = respond(404, Bytes::new());
        set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
        return Ok(r);
    }
    let out: Vec<KvOut> = entries.iter().map(kv_out).collect();
    let mut r = json_resp(&out, ctx.pretty());
    set_meta(ctx.sh, &mut r, index, &opts, filtered, false);
    Ok(r)
}

/// `Conflicting flags: <url.Values.Encode()>`
fn conflicting(ctx: &Ctx<'_>) -> Fail {
    let mut pairs: Vec<(String, String)> = ctx.query.clone();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let enc = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect::<Vec<_>>()
        .join("&");
    fail(400, &format!("Conflicting flags: {enc}"))
}

fn uint_param(ctx: &Ctx<'_>, name: &str) -> Result<Option<u64>, Fail> {
    match ctx.q(name) {
        None => Ok(None),
        Some(v) => parse_go_uint(v).map(Some).ok_or_else(|| {
            fail(
                500,
                &format!("strconv.ParseUint: parsing \"{v}\": invalid syntax"),
            )
        }),
    }
}

fn write_preamble(ctx: &Ctx<'_>, key: &str) -> Result<Authz, Fail> {
    ctx.dc_ok()?;
    let authz = ctx.authz()?;
    if !lock(&ctx.sh.rt).leader {
        return Err(fail(500, "No cluster leader"));
    }
    authz
        .require(Resource::Key, key, Access::Write)
        .map_err(|e| fail(403, &e))?;
    Ok(authz)
}

fn kv_put(ctx: &Ctx<'_>, key: &str) -> Result<Resp, Fail> {
    if key.is_empty() {
        return Err(fail(400, "Missing key name"));
    }
    let n_flags = ["cas", "acquire", "release"]
        .iter()
        .filter(|f| ctx.has(f))
        .count();
    if n_flags > 1 {
        return Err(conflicting(ctx));
    }
    let max = ctx.sh.cfg.kv_max_value_size;
    if ctx.body.len() > max {
        return Err(fail(
            413,
            &format!(
                "Request body({} bytes) too large, max size: {} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
                ctx.body.len(),
                max
            ),
        ));
    }
    let flags = uint_param(ctx, "flags")?.unwrap_or(0);
    let mode = if let Some(cas) = uint_param(ctx, "cas")? {
        KvMode::Cas(cas)
    } else if let Some(s) = ctx.q("acquire") {
        KvMode::Acquire(s.to_string())
    } else if let Some(s) = ctx.q("release") {
        KvMode::Release(s.to_string())
    } else {
        KvMode::Plain
    };
    write_preamble(ctx, key)?;
    let value = ctx.body.to_vec();
    let ok = ctx
        .sh
        .write(|st| (st.kv_set(key, value, flags, mode), Vec::new()));
    Ok(json_resp(&ok, ctx.pretty()))
}

fn kv_delete(ctx: &Ctx<'_>, key: &str) -> Result<Resp, Fail> {
    let recurse = ctx.has("recurse");
    if recurse && ctx.has("cas") {
        return Err(conflicting(ctx));
    }
    if !recurse && key.is_empty() {
        return Err(fail(400, "Missing key name"));
    }
    let cas = uint_param(ctx, "cas")?;
    write_preamble(ctx, key)?;
    let ok = ctx
        .sh
        .write(|st| (st.kv_delete(key, recurse, cas), Vec::new()));
    Ok(json_resp(&ok, ctx.pretty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_defaults_clamp_and_jitter() {
        let s = |secs| Duration::from_secs(secs);
        assert_eq!(compute_wait(None, 0.0, 1.0, None), s(300));
        assert_eq!(compute_wait(Some(Duration::ZERO), 0.0, 1.0, None), s(300));
        assert_eq!(compute_wait(Some(s(3600)), 0.0, 1.0, None), s(600));
        assert_eq!(compute_wait(Some(s(10)), 0.0, 1.0, None), s(10));
        // jitter < wait/16: 10 min → < 10 min 37.5 s
        for _ in 0..1000 {
            let w = compute_wait(Some(s(3600)), fastrand::f64(), 1.0, None);
            assert!(w >= s(600) && w < Duration::from_millis(637_500), "{w:?}");
        }
        assert_eq!(
            compute_wait(Some(s(16)), 0.5, 1.0, None),
            Duration::from_millis(16_500)
        );
        assert_eq!(
            compute_wait(None, 0.0, 0.001, None),
            Duration::from_millis(300)
        );
        assert_eq!(
            compute_wait(None, 0.0, 1.0, Some(Duration::from_millis(5))),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn token_sources_in_consul_order() {
        let mk = |q: &str, h: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (k, v) in h {
                headers.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            (parse_query(q), headers)
        };
        let cases = [
            (
                mk(
                    "token=q",
                    &[("x-consul-token", "h"), ("authorization", "Bearer b")],
                ),
                "q",
            ),
            (
                mk(
                    "",
                    &[("x-consul-token", "h"), ("authorization", "Bearer b")],
                ),
                "h",
            ),
            (mk("", &[("authorization", "bearer b")]), "b"),
            (mk("token=", &[("authorization", "Basic zzz")]), ""),
        ];
        for ((query, headers), want) in cases {
            assert_eq!(token_from(&query, &headers), want);
        }
    }
}
