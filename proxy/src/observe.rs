//! Observe: the proxy's observability settings, shared by every request
//! (`serve` reads them: sampling, access log, span export) and by the
//! admin listener (`PUT /log-level`).

use crate::access_log::AccessLog;
use crate::body::ResponseBody;
use crate::metrics::Metrics;
use crate::otlp::Spans;
use crate::Shared;
use almond_config::ProxyConfig;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::OnceLock;

/// Largest `PUT /log-level` body read.
const MAX_FILTER_BYTES: usize = 4096;

/// Observability state, fixed at start.
pub struct Observe {
    /// Head-sampling rate of the traces this proxy starts.
    pub sample_rate: f64,
    /// The access log, when configured.
    pub access_log: Option<AccessLog>,
    /// Span export (`tracing.otlp`), when configured.
    pub spans: Option<Spans>,
    /// The process's log filter, when the binary made it reloadable.
    pub log_level: OnceLock<LogLevel>,
}

/// Installs a log filter, or says why the text is not one.
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Reads and replaces the process's log filter (`tracing-subscriber`
/// `EnvFilter` syntax, e.g. `debug` or `info,almond_proxy=debug`). The
/// binary owns the subscriber, so it supplies these.
pub struct LogLevel {
    /// The filter in force.
    pub get: Box<dyn Fn() -> String + Send + Sync>,
    /// Installs a new filter, or says why it is not one.
    pub set: SetFilter,
}

impl Observe {
    /// Reads `config`; starts the access log writer and the span exporter
    /// when they are configured.
    pub fn new(config: &ProxyConfig, metrics: &Metrics) -> Observe {
        Observe {
            sample_rate: config.tracing.sample_rate,
            access_log: config
                .access_log
                .as_ref()
                .and_then(|c| AccessLog::start(c, metrics)),
            spans: config.tracing.otlp.as_ref().and_then(|otlp| {
                let name = (otlp.service_name.clone())
                    .or_else(|| config.proxy_id.clone())
                    .unwrap_or_else(crate::hostname);
                Spans::start(otlp, name, metrics)
            }),
            log_level: OnceLock::new(),
        }
    }
}

/// `GET /log-level`: the filter in force; `PUT /log-level` with a filter
/// as the body: replace it (400 when it does not parse).
pub async fn log_level(shared: &Shared, req: Request<Incoming>) -> Response<ResponseBody> {
    let Some(level) = shared.observe.log_level.get() else {
        return text(
            StatusCode::NOT_FOUND,
            "the log level cannot be changed in this process\n".into(),
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
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            let Ok(filter) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n".into());
            };
            let filter = filter.trim();
            if filter.is_empty() {
                return text(StatusCode::BAD_REQUEST, "empty filter\n".into());
            }
            match (level.set)(filter) {
                Ok(()) => {
                    tracing::info!(filter, "log level changed");
                    text(StatusCode::OK, format!("{}\n", (level.get)()))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid filter: {e}\n")),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp
}
