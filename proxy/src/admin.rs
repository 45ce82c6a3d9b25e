//! Admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/endpoints`.

use crate::body::ResponseBody;
use crate::Shared;
use http::header::CONTENT_TYPE;
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

/// Serves admin requests until `stop` changes.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    almond_net::accept_until("admin", &listener, &mut stop, |stream, _| {
        let shared = shared.clone();
        tokio::spawn(async move {
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

async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.uri().path() == "/log-level" {
        return Ok(crate::observe::log_level(&shared, req).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
    }
    let resp = match req.uri().path() {
        "/metrics" => {
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
            "not found; try /metrics, /ready, /live, /config, /endpoints\n",
        ),
    };
    Ok(resp)
}

/// Every service's subsets and endpoints with what the balancer sees.
fn endpoints(shared: &Shared) -> serde_json::Value {
    let table = shared.table.load();
    let now = Instant::now();
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
                            "state": if m.state.health.is_out() { "ejected" } else { "healthy" },
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
            json!({ "protocol": svc.protocol, "lb": svc.lb(), "subsets": subsets }),
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
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.to_owned()));
    *resp.status_mut() = status;
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
