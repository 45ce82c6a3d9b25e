//! Observe: measuring every request -- golden metrics, trace context,
//! span export, the access log and the live tap -- and the settings they share
//! ([`Observe`], read by `serve`; the log filter, by `admin`). Imports
//! only the leaves (`outcome`, `body`, `clock`).

pub mod access_log;
pub mod metrics;
pub mod otlp;
pub mod tap;
pub mod trace;

use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::observe::otlp::Spans;
use crate::observe::tap::Taps;
use almond_config::ProxyConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Observability state, fixed at start.
pub struct Observe {
    /// Head-sampling rate of the traces this proxy starts.
    pub sample_rate: f64,
    /// The access log, when configured.
    pub access_log: Option<AccessLog>,
    /// Span export (`tracing.otlp`), when configured.
    pub spans: Option<Spans>,
    /// Live request summaries for admin `/tap` watchers.
    pub taps: Arc<Taps>,
    /// The process's log filter, when the binary made it reloadable.
    pub log_level: OnceLock<LogLevel>,
    /// The proxy is closing the connections its drain left: a request
    /// dropped unanswered now was cut by the proxy, not left by its
    /// client (its access log line and its span say so).
    cutting: AtomicBool,
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
        let name = || (config.proxy_id.clone()).unwrap_or_else(crate::proxy_hostname);
        Observe {
            sample_rate: config.tracing.sample_rate,
            access_log: config
                .access_log
                .as_ref()
                .and_then(|c| AccessLog::start(c, metrics)),
            spans: config.tracing.otlp.as_ref().and_then(|otlp| {
                let name = (otlp.service_name.clone()).unwrap_or_else(name);
                Spans::start(otlp, name, metrics)
            }),
            taps: Arc::new(Taps::new(
                name().into(),
                metrics.tap_events.clone(),
                metrics.tap_dropped.clone(),
            )),
            log_level: OnceLock::new(),
            cutting: AtomicBool::new(false),
        }
    }

    /// Marks the requests dropped unanswered from now on as cut by the
    /// proxy (its drain's time is up), not left by their clients.
    pub fn cut(&self) {
        self.cutting.store(true, Ordering::Relaxed);
    }

    /// Was a request dropped unanswered now cut by the proxy?
    pub fn cutting(&self) -> bool {
        self.cutting.load(Ordering::Relaxed)
    }
}
