//! Observability config: request IDs and trace context (`tracing`), and the
//! access log (`access_log`). Read once at start; reloads do not change them.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Trace context: how traces the proxy starts are sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Fraction (0 to 1) of the traces this proxy starts that are marked
    /// sampled; a request with a sampled `traceparent` stays sampled.
    #[serde(default = "default_trace_sample_rate")]
    pub sample_rate: f64,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            sample_rate: default_trace_sample_rate(),
        }
    }
}
fn default_trace_sample_rate() -> f64 {
    0.01
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
    if let Some(log) = access_log {
        if !rate_ok(log.sample_rate) {
            out.push(("access_log.sample_rate".into(), "must be 0 to 1".into()));
        }
        if log.queue == 0 {
            out.push(("access_log.queue".into(), "must be 1 or more".into()));
        }
    }
    out
}
