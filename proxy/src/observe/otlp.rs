//! OTLP: one span per sampled request, exported off the request path.
//!
//! `serve::handle` hands a [`Finished`] record (IDs, route, outcome,
//! timings; a few hundred bytes, no formatting) to [`Spans::record`], which
//! `try_send`s it to a bounded channel and counts a drop when the channel
//! is full: a slow or dead collector never slows a request. An export task
//! batches records (`batch` spans, or `flush_interval` after the first),
//! turns them into OpenTelemetry [`SpanData`] and sends them with
//! `opentelemetry-otlp`'s HTTP/protobuf exporter (hyper client) within
//! `timeout`. While an export is in flight new records wait in the channel,
//! and overflow is dropped. On shutdown what is queued is flushed, within
//! `timeout`.
//!
//! The span's IDs are those of [`trace::Context`](crate::observe::trace::Context):
//! its span ID is the parent the upstream sees in `traceparent`, its
//! parent is the client's span, so the trace joins up across hops.

use crate::observe::access_log::Observed;
use crate::observe::metrics::Metrics;
use crate::observe::trace::RequestId;
use almond_config::{Direction, Otlp};
use http::{HeaderValue, Method};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the request path knows of one finished sampled request.
pub struct Finished {
    /// W3C trace ID.
    pub trace_id: u128,
    /// This hop's span ID (the upstream's parent).
    pub span_id: u64,
    /// The client's span, when it sent a valid `traceparent`.
    pub parent_id: Option<u64>,
    /// `x-request-id`.
    pub request_id: RequestId,
    /// Wall-clock arrival.
    pub start: SystemTime,
    /// Wall-clock time of the response's headers.
    pub end: SystemTime,
    /// Request method.
    pub method: Method,
    /// Request path (no query: it may carry secrets).
    pub path: Box<str>,
    /// Status returned to the client.
    pub status: u16,
    /// `x-almond-error` of a proxy-made answer.
    pub error: Option<HeaderValue>,
    /// Route, endpoint, retries and stage timings.
    pub observed: Observed,
    /// Declared response body size.
    pub response_bytes: Option<u64>,
}

/// The request path's handle on span export.
pub struct Spans {
    tx: mpsc::Sender<Finished>,
    queue_full: IntCounter,
    stop: watch::Sender<bool>,
    /// The export task; taken once, at shutdown (never on the request path).
    task: Mutex<Option<JoinHandle<()>>>,
    flush_limit: Duration,
}

/// The export task's settings and counters.
struct Exporter {
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    batch: usize,
    flush_interval: Duration,
    timeout: Duration,
    exported: IntCounter,
    errors: IntCounter,
    failed: IntCounter,
}

impl Spans {
    /// Builds the exporter and starts its task on the current runtime;
    /// `None` without a runtime or when the exporter cannot be built.
    pub fn start(config: &Otlp, service_name: String, metrics: &Metrics) -> Option<Spans> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let built = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .build();
        let mut exporter = match built {
            Ok(exporter) => exporter,
            Err(e) => {
                tracing::error!(endpoint = %config.endpoint, error = %e, "span export disabled: cannot build the OTLP exporter");
                return None;
            }
        };
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(service_name)
                .build(),
        );
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let task = Exporter {
            exporter,
            scope: InstrumentationScope::builder("almond-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            batch: config.batch.max(1),
            flush_interval: config.flush_interval,
            timeout: config.timeout,
            exported: metrics.trace_spans_exported.clone(),
            errors: metrics.trace_export_errors.clone(),
            failed: metrics.trace_spans_dropped("export_failed"),
        };
        let task = runtime.spawn(task.run(rx, stop_rx));
        Some(Spans {
            tx,
            queue_full: metrics.trace_spans_dropped("queue_full"),
            stop,
            task: Mutex::new(Some(task)),
            flush_limit: config.timeout,
        })
    }

    /// Queues a finished request's span, or drops and counts it.
    pub fn record(&self, span: Finished) {
        if self.tx.try_send(span).is_err() {
            self.queue_full.inc();
        }
    }

    /// Flushes what is queued and stops the export task, within the
    /// export `timeout`; spans still queued then are lost.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task {
            if tokio::time::timeout(self.flush_limit, &mut task)
                .await
                .is_err()
            {
                task.abort();
                tracing::warn!("span flush timed out: queued spans dropped");
            }
        }
    }
}

impl Exporter {
    /// Batches and exports until stopped (then flushes) or until every
    /// sender is gone.
    async fn run(self, mut rx: mpsc::Receiver<Finished>, mut stop: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(self.batch);
        let mut stopping = false;
        while !stopping {
            // The first span of a batch, or the stop signal.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                n = rx.recv_many(&mut batch, self.batch) => if n == 0 { break },
            }
            // More, until the batch is full or `flush_interval` has passed.
            let due = Instant::now() + self.flush_interval;
            while batch.len() < self.batch {
                let room = self.batch - batch.len();
                tokio::select! {
                    biased;
                    _ = stop.changed() => { stopping = true; break }
                    _ = tokio::time::sleep_until(due) => break,
                    n = rx.recv_many(&mut batch, room) => if n == 0 { stopping = true; break },
                }
            }
            self.export(&mut batch).await;
        }
        // Flush: what is queued now, in batches (the caller bounds the time).
        rx.close();
        while let Some(span) = rx.recv().await {
            batch.push(span);
            if batch.len() == self.batch {
                self.export(&mut batch).await;
            }
        }
        self.export(&mut batch).await;
        let _ = self.exporter.shutdown();
    }

    /// Sends one batch within `timeout`, counting the outcome.
    async fn export(&self, batch: &mut Vec<Finished>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = batch.drain(..).map(|f| self.span(f)).collect();
        match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => self.exported.inc_by(n),
            Ok(Err(e)) => {
                self.errors.inc();
                self.failed.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed");
            }
            Err(_) => {
                self.errors.inc();
                self.failed.inc_by(n);
                tracing::debug!(spans = n, "span export timed out");
            }
        }
    }

    /// The OpenTelemetry span of a finished request.
    fn span(&self, f: Finished) -> SpanData {
        let o = &f.observed;
        let name = match &o.service {
            Some(svc) => format!("{} {svc}", f.method),
            None => f.method.to_string(),
        };
        let status = if f.status >= 500 || f.error.is_some() {
            let reason = f.error.as_ref().and_then(|v| v.to_str().ok());
            Status::error(reason.map_or_else(|| f.status.to_string(), str::to_owned))
        } else {
            Status::Unset
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(f.trace_id),
                SpanId::from(f.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: f.parent_id.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: f.parent_id.is_some(),
            span_kind: match o.direction {
                Direction::Outbound => SpanKind::Client,
                Direction::Inbound => SpanKind::Server,
            },
            name: Cow::Owned(name),
            start_time: f.start,
            end_time: f.end,
            attributes: attributes(&f),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// Semantic-convention names where they exist, `almond.*` for the rest.
fn attributes(f: &Finished) -> Vec<KeyValue> {
    let o = &f.observed;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut out = Vec::with_capacity(18);
    out.push(KeyValue::new("http.request.method", f.method.to_string()));
    out.push(KeyValue::new("url.path", f.path.to_string()));
    out.push(KeyValue::new(
        "http.response.status_code",
        i64::from(f.status),
    ));
    if let Ok(id) = std::str::from_utf8(f.request_id.as_bytes()) {
        out.push(KeyValue::new("almond.request_id", id.to_owned()));
    }
    out.push(KeyValue::new("almond.direction", o.direction.as_str()));
    if let Some(svc) = &o.service {
        out.push(KeyValue::new("almond.service", svc.clone()));
    }
    if let Some(subset) = &o.subset {
        out.push(KeyValue::new("almond.subset", subset.clone()));
    }
    if let Some(addr) = o.endpoint {
        out.push(KeyValue::new("server.address", addr.ip().to_string()));
        out.push(KeyValue::new("server.port", i64::from(addr.port())));
    }
    if let Some(reason) = f.error.as_ref().and_then(|v| v.to_str().ok()) {
        out.push(KeyValue::new("error.type", reason.to_owned()));
    } else if f.status >= 500 {
        out.push(KeyValue::new("error.type", f.status.to_string()));
    }
    out.push(KeyValue::new("almond.retries", i64::from(o.retries)));
    if let Some(n) = o.request_bytes {
        out.push(KeyValue::new("http.request.body.size", n as i64));
    }
    if let Some(n) = f.response_bytes {
        out.push(KeyValue::new("http.response.body.size", n as i64));
    }
    if o.endpoint.is_some() {
        out.push(KeyValue::new("almond.queue_ms", ms(o.queue)));
        out.push(KeyValue::new(
            "almond.connect_ms",
            o.connect.map_or(0.0, ms),
        ));
        out.push(KeyValue::new("almond.upstream_ms", ms(o.upstream)));
    }
    let total = f.end.duration_since(f.start).unwrap_or_default();
    out.push(KeyValue::new("almond.total_ms", ms(total)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn queued_records_stay_small() {
        // The queue's memory at its bound is about this times `queue`
        // (plus each record's path); a SpanData is built only in a batch.
        let (record, span) = (size_of::<Finished>(), size_of::<SpanData>());
        println!("Finished: {record} bytes, SpanData: {span} bytes");
        assert!(record <= 384, "{record}");
    }

    #[test]
    fn a_failed_request_is_an_error_span_with_its_reason() {
        let f = Finished {
            trace_id: 7,
            span_id: 9,
            parent_id: Some(3),
            request_id: RequestId::Client(HeaderValue::from_static("r-1")),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(12),
            method: Method::GET,
            path: "/x".into(),
            status: 502,
            error: Some(HeaderValue::from_static("connect")),
            observed: Observed::default(),
            response_bytes: None,
        };
        let attrs = attributes(&f);
        let get = |k: &str| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(get("error.type").as_deref(), Some("connect"));
        assert_eq!(get("http.response.status_code").as_deref(), Some("502"));
        assert_eq!(get("almond.total_ms").as_deref(), Some("12"));
        assert_eq!(
            get("almond.queue_ms"),
            None,
            "no endpoint, no stage timings"
        );
    }
}
