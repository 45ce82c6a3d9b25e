//! Observability config: request IDs, trace context and span export
//! (`tracing`), and the access log (`access_log`). Read once at start;
//! reloads do not change them.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Largest queue (`access_log.queue`, `tracing.otlp.queue`): a million
/// entries is minutes of a busy proxy's lines; far more would not even be
/// allocated (the proxy would fail to start).
const MAX_QUEUE: usize = 1 << 20;

/// The bounds of the proxies' latency histogram
/// (`almond_request_duration_seconds`), in seconds: fine below 100 ms
/// where services live, coarse above (13 buckets; the watcher needs p50
/// and p99). A quantile beyond the last reads as that bound.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Trace context: how traces the proxy starts are sampled, and where the
/// spans of sampled requests go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Fraction (0 to 1) of the traces this proxy starts that are marked
    /// sampled; a request with a sampled `traceparent` stays sampled.
    #[serde(default = "default_trace_sample_rate")]
    pub sample_rate: f64,
    /// Export a span per sampled request over OTLP; omitted = no export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<Otlp>,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            sample_rate: default_trace_sample_rate(),
            otlp: None,
        }
    }
}
fn default_trace_sample_rate() -> f64 {
    0.01
}

/// OTLP span export (HTTP/protobuf), batched off the request path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// Spans that may wait for export; more are dropped and counted.
    #[serde(default = "default_otlp_queue")]
    pub queue: usize,
    /// Most spans per export request.
    #[serde(default = "default_otlp_batch")]
    pub batch: usize,
    /// Longest a span waits for a batch to fill before it is sent anyway.
    #[serde(default = "default_flush_interval", with = "crate::duration")]
    pub flush_interval: Duration,
    /// Longest one export request may take (retries included).
    #[serde(default = "default_export_timeout", with = "crate::duration")]
    pub timeout: Duration,
    /// The `service.name` resource attribute; omitted = the proxy ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

fn default_otlp_queue() -> usize {
    2048
}
fn default_otlp_batch() -> usize {
    512
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(5)
}

/// One line per request, written off the request path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Line format.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// File to append to; omitted = standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Fraction (0 to 1) of requests logged.
    #[serde(default = "default_log_sample_rate")]
    pub sample_rate: f64,
    /// Most lines per second; requests over it are not logged.
    #[serde(default = "default_max_per_second")]
    pub max_per_second: u32,
    /// Lines that may wait for the writer; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_log_sample_rate() -> f64 {
    1.0
}
fn default_max_per_second() -> u32 {
    1000
}
fn default_queue() -> usize {
    4096
}

/// Access log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, common-log-like.
    Text,
}

/// Range checks of the observability keys: (key path, message).
pub fn check(tracing: &Tracing, access_log: Option<&AccessLog>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rate_ok = |r: f64| (0.0..=1.0).contains(&r);
    if !rate_ok(tracing.sample_rate) {
        out.push(("tracing.sample_rate".into(), "must be 0 to 1".into()));
    }
    if let Some(otlp) = &tracing.otlp {
        out.extend(check_otlp(otlp));
    }
    if let Some(log) = access_log {
        if !rate_ok(log.sample_rate) {
            out.push(("access_log.sample_rate".into(), "must be 0 to 1".into()));
        }
        if log.queue == 0 {
            out.push(("access_log.queue".into(), "must be 1 or more".into()));
        } else if log.queue > MAX_QUEUE {
            out.push((
                "access_log.queue".into(),
                format!("must be {MAX_QUEUE} or less"),
            ));
        }
        // 0 would drop every line: `sample_rate: 0` says that.
        if log.max_per_second == 0 {
            out.push((
                "access_log.max_per_second".into(),
                "must be 1 or more (to log nothing, remove access_log)".into(),
            ));
        }
    }
    out
}

/// Range checks of `tracing.otlp`.
fn check_otlp(otlp: &Otlp) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut add =
        |key: &str, message: &str| out.push((format!("tracing.otlp.{key}"), message.into()));
    // Plain HTTP only: the exporter's client has no TLS (a local collector
    // or agent is the usual target).
    let host = otlp.endpoint.strip_prefix("http://").unwrap_or_default();
    if host.is_empty() || host.starts_with('/') || otlp.endpoint.contains(char::is_whitespace) {
        add(
            "endpoint",
            "must be an http:// URL, like http://127.0.0.1:4318/v1/traces",
        );
    }
    if otlp.queue == 0 {
        add("queue", "must be 1 or more");
    } else if otlp.queue > MAX_QUEUE {
        add("queue", &format!("must be {MAX_QUEUE} or less"));
    }
    if otlp.batch == 0 {
        add("batch", "must be 1 or more");
    } else if otlp.batch > otlp.queue {
        add(
            "batch",
            &format!(
                "{} must not exceed queue, {} (batch defaults to {}, queue to {})",
                otlp.batch,
                otlp.queue,
                default_otlp_batch(),
                default_otlp_queue()
            ),
        );
    }
    if otlp.flush_interval.is_zero() {
        add("flush_interval", "must be more than 0");
    }
    if otlp.timeout.is_zero() {
        add("timeout", "must be more than 0");
    }
    if otlp.service_name.as_deref() == Some("") {
        add("service_name", "must not be empty");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn otlp(endpoint: &str) -> Otlp {
        Otlp {
            endpoint: endpoint.into(),
            queue: default_otlp_queue(),
            batch: default_otlp_batch(),
            flush_interval: default_flush_interval(),
            timeout: default_export_timeout(),
            service_name: None,
        }
    }

    #[test]
    fn otlp_keys_are_checked_with_their_paths() {
        assert!(check_otlp(&otlp("http://127.0.0.1:4318/v1/traces")).is_empty());
        for bad in [
            "",
            "https://collector:4318",
            "127.0.0.1:4318",
            "http:///v1/traces",
        ] {
            let problems = check_otlp(&otlp(bad));
            assert_eq!(problems[0].0, "tracing.otlp.endpoint", "{bad:?}");
        }
        let mut o = otlp("http://collector:4318/v1/traces");
        o.queue = 8;
        o.batch = 16;
        o.timeout = Duration::ZERO;
        let keys: Vec<_> = check_otlp(&o).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["tracing.otlp.batch", "tracing.otlp.timeout"]);
    }
}
