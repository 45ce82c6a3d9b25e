//! Admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/endpoints`,
//! `/log-level` and the live `/tap`.

use crate::body::ResponseBody;
use crate::observe::tap::{Filter, TapBody};
use crate::upstream::eject::Health;
use crate::Shared;
use http::header::CONTENT_TYPE;
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// Time an admin client has to send a request head (and an idle
/// keep-alive connection is kept).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections the admin listener serves at once (scrapers, health checks,
/// operators and their live `/tap`s); past it a new one is closed at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Of those, from one client address: a flood from one host leaves room
/// for the health checks and scrapes of the others.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// Serves admin requests until `stop` changes.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let slots = almond_net::Slots::new("admin", MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    almond_net::accept_until("admin", &listener, &mut stop, |stream, peer| {
        let Some(slot) = slots.take(peer.ip()) else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| respond(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    })
    .await;
}

/// An admin answer: whole, or the live `/tap` stream.
type AdminBody = Either<ResponseBody, TapBody>;

async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<AdminBody>, Infallible> {
    let authorization = req.headers().get(http::header::AUTHORIZATION);
    let host = req.headers().get(http::header::HOST);
    if let Some(refused) = guard(&shared, req.uri().path(), authorization, host) {
        return Ok(refused.map(Either::Left));
    }
    if req.uri().path() == "/tap" {
        if req.method() != Method::GET {
            // A stream: nothing to say to HEAD but its headers, and the
            // watcher those would start.
            return Ok(not_allowed("GET").map(Either::Left));
        }
        return Ok(tap(&shared, &req));
    }
    Ok(respond_whole(shared, req).await.map(Either::Left))
}

/// `GET /tap?service=&path=&subset=&status=&headers=&rate=`: one JSON line
/// per finished request that passes the filter, for as long as the client
/// reads (`observe::tap`).
fn tap(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    let query = almond_net::parse_query(req.uri().query().unwrap_or(""));
    match Filter::from_query(&query) {
        Ok(filter) => {
            let mut resp = Response::new(Either::Right(shared.observe.taps.watch(filter)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ndjson"),
            );
            resp
        }
        Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")).map(Either::Left),
    }
}

async fn respond_whole(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.uri().path() == "/log-level" {
        return log_level(&shared, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return not_allowed("GET, HEAD");
    }
    let resp = match req.uri().path() {
        "/metrics" => {
            let now_ns = crate::clock::nanos_since_epoch(Instant::now());
            shared.table.load().refresh_endpoint_gauges(now_ns);
            let mut resp = Response::new(ResponseBody::full(shared.metrics.encode()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/config" => {
            let table = shared.table.load();
            json_response(&redacted(&table.config))
        }
        "/endpoints" => json_response(&endpoints(&shared)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /live, /config, /endpoints, /tap\n",
        ),
    };
    resp
}

/// The admin listener's two halves: `/metrics`, `/ready` and `/live` are
/// open (the watcher and Prometheus scrape them); `/config`, `/endpoints`,
/// `/tap` and `/log-level` (the one change) show or alter more, so off loopback
/// they need `Authorization: Bearer` with the `admin_token_env` token, and
/// without one configured they are not served off loopback at all.
fn guard(
    shared: &Shared,
    path: &str,
    given: Option<&http::HeaderValue>,
    host: Option<&http::HeaderValue>,
) -> Option<Response<ResponseBody>> {
    if matches!(path, "/metrics" | "/ready" | "/live") {
        return None;
    }
    if shared.table.load().config.admin.ip().is_loopback() {
        // Local, so trusted; but only when asked by a local name: a page in
        // a browser on this host whose own name was rebound to 127.0.0.1
        // (DNS rebinding) sends that name.
        return match host {
            Some(h) if !almond_net::local_host(h.as_bytes()) => Some(text(
                StatusCode::FORBIDDEN,
                "the loopback admin answers requests for localhost or a loopback address only\n",
            )),
            _ => None,
        };
    }
    match &shared.admin_token {
        Some(token) if token.matches_bearer(given.map(|v| v.as_bytes())) => None,
        Some(_) if given.is_none() => {
            let mut refused = text(
                StatusCode::UNAUTHORIZED,
                "this admin endpoint needs Authorization: Bearer <admin token>\n",
            );
            // A 401 names its scheme (RFC 9110 §11.6.1).
            refused.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Some(refused)
        }
        Some(_) => Some(text(StatusCode::FORBIDDEN, "admin token refused\n")),
        None => Some(text(
            StatusCode::FORBIDDEN,
            "not served off loopback without admin_token_env; use /metrics, /ready, /live\n",
        )),
    }
}

/// An endpoint's `state` in `/endpoints`: `ejected`; `probing` once its
/// ejection is up, until a request probes it back (counted `healthy` in
/// `almond_endpoints`); else `healthy`.
fn endpoint_state(health: &Health, now_ns: u64) -> &'static str {
    if health.counts_out(now_ns) {
        "ejected"
    } else if health.is_out() {
        "probing"
    } else {
        "healthy"
    }
}

/// Every service's subsets and endpoints with what the balancer sees.
fn endpoints(shared: &Shared) -> serde_json::Value {
    let table = shared.table.load();
    let now = Instant::now();
    let now_ns = crate::clock::nanos_since_epoch(now);
    let mut services = serde_json::Map::new();
    for svc in table.services() {
        let subsets: Vec<_> = svc
            .subsets
            .iter()
            .map(|s| {
                let eps: Vec<_> = s
                    .pool
                    .members()
                    .iter()
                    .map(|m| {
                        json!({
                            "addr": m.state.addr.to_string(),
                            "weight": m.weight,
                            "state": endpoint_state(&m.state.health, now_ns),
                            "in_flight": m.state.in_flight(),
                            "connections": m.state.connections(),
                            "rtt_ewma_ms": m.state.rtt_estimate(now) / 1e6,
                        })
                    })
                    .collect();
                json!({ "subset": &*s.name, "endpoints": eps })
            })
            .collect();
        services.insert(
            svc.name.to_string(),
            json!({ "protocol": svc.target.protocol, "lb": svc.lb(), "subsets": subsets }),
        );
    }
    serde_json::Value::Object(services)
}

fn json_response<T: serde::Serialize>(value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut resp = Response::new(ResponseBody::full(bytes));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// What `/config` shows instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// The config as JSON with its secrets replaced by [`REDACTED`]: the TLS
/// key's path (where the private key lives is for the host's operator,
/// not for whoever can reach the admin port).
fn redacted(config: &almond_config::ProxyConfig) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
    if let Some(key) = value.pointer_mut("/tls/key") {
        *key = serde_json::Value::String(REDACTED.to_owned());
    }
    value
}

/// Largest `PUT /log-level` body read.
const MAX_FILTER_BYTES: usize = 4096;

/// `GET /log-level`: the filter in force; `PUT /log-level` with a filter
/// as the body: replace it (400 when it does not parse).
async fn log_level(shared: &Shared, req: Request<Incoming>) -> Response<ResponseBody> {
    let Some(level) = shared.observe.log_level.get() else {
        return text(
            StatusCode::NOT_FOUND,
            "the log level cannot be changed in this process\n",
        );
    };
    match *req.method() {
        Method::GET | Method::HEAD => text(StatusCode::OK, format!("{}\n", (level.get)())),
        Method::PUT => {
            let body = match Limited::new(req.into_body(), MAX_FILTER_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("a filter is at most {MAX_FILTER_BYTES} bytes\n"),
                    )
                }
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            let Ok(filter) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n");
            };
            let filter = filter.trim();
            if filter.is_empty() {
                return text(StatusCode::BAD_REQUEST, "empty filter\n");
            }
            match (level.set)(filter) {
                Ok(()) => {
                    tracing::info!(filter, "log level changed");
                    text(StatusCode::OK, format!("{}\n", (level.get)()))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid filter: {e}\n")),
            }
        }
        _ => not_allowed("GET, HEAD, PUT"),
    }
}

/// 405 with the methods the path takes in `Allow` (RFC 9110 §15.5.6: a
/// server MUST send it).
fn not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}\n"));
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The shared state of a proxy whose admin listener is on `admin`
    /// (not bound: tests listen on loopback only), with admin token `token`.
    fn shared(admin: &str, token: Option<&str>) -> Arc<Shared> {
        let mut yaml = format!("admin: {admin}\nlisteners:\n  - bind: 127.0.0.1:0\n");
        if let Some(token) = token {
            let var = format!("ALMOND_T_ADMIN_{}", admin.replace(['.', ':'], "_"));
            std::env::set_var(&var, token);
            yaml.push_str(&format!("admin_token_env: {var}\n"));
        }
        let config = almond_config::load_proxy(&yaml, "test").unwrap();
        crate::Proxy::new(config).unwrap().shared().clone()
    }

    fn status(shared: &Shared, path: &str, auth: Option<&str>) -> Option<StatusCode> {
        let value = auth.map(|a| http::HeaderValue::from_str(a).unwrap());
        guard(shared, path, value.as_ref(), None).map(|r| r.status())
    }

    /// On loopback, the admin answers local names only: a browser page
    /// whose name was rebound to 127.0.0.1 sends its own.
    #[test]
    fn the_loopback_admin_answers_local_names_only() {
        let local = shared("127.0.0.1:4191", None);
        let asked = |host: Option<&str>| {
            let host = host.map(|h| http::HeaderValue::from_str(h).unwrap());
            guard(&local, "/tap", None, host.as_ref()).map(|r| r.status())
        };
        for host in [
            None,
            Some("127.0.0.1:4191"),
            Some("localhost"),
            Some("LOCALHOST:4191"),
            Some("[::1]:4191"),
        ] {
            assert_eq!(asked(host), None, "{host:?}");
        }
        for host in [
            "evil.example:4191",
            "evil.example",
            "10.0.0.1:4191",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert_eq!(asked(Some(host)), Some(StatusCode::FORBIDDEN), "{host}");
        }
        // The open half stays open.
        let metrics = guard(
            &local,
            "/metrics",
            None,
            Some(&http::HeaderValue::from_static("evil.example")),
        );
        assert!(metrics.is_none());
    }

    #[test]
    fn off_loopback_only_the_read_only_half_is_open() {
        let open = shared("10.0.0.1:4191", None);
        for path in ["/metrics", "/ready", "/live"] {
            assert_eq!(status(&open, path, None), None, "{path}");
        }
        for path in ["/config", "/endpoints", "/log-level"] {
            assert_eq!(
                status(&open, path, None),
                Some(StatusCode::FORBIDDEN),
                "{path}"
            );
        }
        let guarded = shared("10.0.0.2:4191", Some("adm1n"));
        for path in ["/config", "/endpoints", "/log-level"] {
            assert_eq!(status(&guarded, path, None), Some(StatusCode::UNAUTHORIZED));
            let refused = guard(&guarded, path, None, None).unwrap();
            assert_eq!(refused.headers()["www-authenticate"], "Bearer");
            assert_eq!(
                status(&guarded, path, Some("Bearer wrong")),
                Some(StatusCode::FORBIDDEN)
            );
            assert_eq!(status(&guarded, path, Some("Bearer adm1n")), None);
        }
        assert_eq!(status(&guarded, "/metrics", None), None);
    }

    #[test]
    fn on_loopback_everything_is_served() {
        let local = shared("127.0.0.1:4191", None);
        for path in ["/metrics", "/config", "/endpoints", "/log-level"] {
            assert_eq!(status(&local, path, None), None, "{path}");
        }
    }
}
