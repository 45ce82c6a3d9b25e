//! API: the long-poll snapshots proxies follow, the service views
//! operators read, `/metrics`, `/ready`, `/live`.

use crate::state::State;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves the API until `stop` changes.
pub async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    max_wait: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(state.clone(), req, max_wait, stop.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(
    state: Arc<State>,
    req: Request<Incoming>,
    max_wait: Duration,
    stop: watch::Receiver<bool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let query = parse_query(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_owned();
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Ok(match segments.as_slice() {
        ["v1", "snapshot"] => snapshot(&state, &query, max_wait, stop).await,
        ["v1", "services"] => json_ok(&services_view(&state)),
        ["v1", "services", name] => match state.service(name) {
            Some(svc) => json_ok(&json!({ "name": name, "index": state.index(), "service": svc })),
            None => text(StatusCode::NOT_FOUND, &format!("unknown service {name:?}\n")),
        },
        ["v1", "proxies"] => {
            let proxies: serde_json::Map<String, serde_json::Value> = state
                .proxies()
                .into_iter()
                .map(|(id, p)| {
                    (
                        id,
                        json!({ "admin": p.admin, "index": p.index,
                                "seen_seconds_ago": p.seen.elapsed().as_secs() }),
                    )
                })
                .collect();
            json_ok(&proxies)
        }
        ["metrics"] => {
            let mut out = Vec::new();
            let encoder = prometheus::TextEncoder::new();
            if let Err(e) = prometheus::Encoder::encode(
                &encoder,
                &state.metrics.registry.gather(),
                &mut out,
            ) {
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
        ["ready"] => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: first sync not done\n"),
        ["live"] => text(StatusCode::OK, "live\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// `GET /v1/snapshot?proxy=ID&index=N&wait=30s`: answers as soon as the
/// index is above N, or after `wait` with the same index.
async fn snapshot(
    state: &State,
    query: &HashMap<String, String>,
    max_wait: Duration,
    mut stop: watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let since: u64 = match query.get("index").map(|v| v.parse()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "invalid index\n"),
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
    state.saw_proxy(proxy, query.get("admin").map_or("", |s| s.as_str()), since);
    let mut changes = state.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    state.metrics.long_polls.inc();
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
    state.metrics.long_polls.dec();
    let snap = state.snapshot_since(since);
    let index = snap.index;
    state.metrics.snapshots_sent.inc();
    let mut resp = json_ok(&snap);
    if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
        resp.headers_mut().insert("x-almond-index", v);
    }
    resp
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

/// `30s`, `500ms`, `1m`; a bare number is seconds.
fn parse_wait(text: &str) -> Option<Duration> {
    let (num, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
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
        let q = parse_query("proxy=web%2D1&index=7&admin=127.0.0.1%3A4191");
        assert_eq!(q["proxy"], "web-1");
        assert_eq!(q["admin"], "127.0.0.1:4191");
    }
}
