//! Access log: one structured line per request, written off the request
//! path. `serve` fills an [`Observed`] as the request walks its stages and
//! hands a finished [`Entry`] to [`AccessLog::record`], which samples,
//! rate-limits (one atomic word per second) and `try_send`s it to a bounded
//! channel; a writer task formats and writes lines in batches. When the
//! channel is full the line is dropped and counted, never waited for. A
//! stopping proxy flushes it ([`AccessLog::flush`]) before it exits.

use crate::observe::metrics::Metrics;
use almond_config::{AccessLogFormat, Direction};
use http::Method;
use prometheus::IntCounter;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Lines the writer formats and writes per system call, at most.
const BATCH: usize = 256;

/// What the request path learned of one request, stage by stage (read by
/// the access log and by span export).
#[derive(Default, Clone)]
pub struct Observed {
    /// The service, once routed.
    pub service: Option<Arc<str>>,
    /// The subset of the endpoint tried last.
    pub subset: Option<Arc<str>>,
    /// The endpoint tried last.
    pub endpoint: Option<SocketAddr>,
    /// Retries sent.
    pub retries: u32,
    /// The listener's direction.
    pub direction: Direction,
    /// Whether the response came from an endpoint (not from the proxy).
    pub upstream_answered: bool,
    /// Arrival to the first try: routing, admission, reading a replayable
    /// body.
    pub queue: Duration,
    /// Opening the upstream connection on the last try; `None`: pooled.
    pub connect: Option<Duration>,
    /// The last try, from its send to the response's headers (its
    /// connect included).
    pub upstream: Duration,
    /// Request body size of the last try, when declared.
    pub request_bytes: Option<u64>,
}

/// One access log line, before formatting.
pub struct Entry {
    /// Wall-clock arrival, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `x-request-id`. Entries own copies, not views into the request's
    /// read buffer, so a full queue cannot pin connection buffers.
    pub request_id: Box<str>,
    /// W3C trace ID.
    pub trace_id: u128,
    /// Whether the trace is sampled.
    pub sampled: bool,
    /// Request method.
    pub method: Method,
    /// Request path (no query: it may carry secrets).
    pub path: Box<str>,
    /// Route and endpoint.
    pub observed: Observed,
    /// Response status (proxy-made answers included).
    pub status: u16,
    /// Time to the response's headers, in milliseconds.
    pub duration_ms: f64,
    /// Response body size when the response declares it.
    pub bytes: Option<u64>,
}

/// What the writer task is sent. Lines unboxed (an allocation a line
/// to spare the one flush of a stopping proxy would be the wrong trade).
#[allow(clippy::large_enum_variant)]
enum Message {
    Line(Entry),
    /// Answered once every line sent before it is written.
    Flush(oneshot::Sender<()>),
    /// Open the file again (it was rotated away): lines after go to the
    /// file now at the path.
    Reopen,
}

/// The request path's handle on the access log.
pub struct AccessLog {
    tx: mpsc::Sender<Message>,
    sample_rate: f64,
    max_per_second: u32,
    /// Second (since `base`) in the high 32 bits, lines in it in the low.
    window: AtomicU64,
    base: Instant,
    queue_full: IntCounter,
    rate_limited: IntCounter,
}

impl AccessLog {
    /// Starts the writer task (on the current runtime) and returns the
    /// handle; `None` without a runtime or when the file cannot be opened.
    pub fn start(config: &almond_config::AccessLog, metrics: &Metrics) -> Option<AccessLog> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let out: Box<dyn AsyncWrite + Unpin + Send> = match &config.path {
            None => Box::new(tokio::io::stdout()),
            Some(path) => match open(path) {
                Ok(file) => file,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "access log disabled: cannot open its file");
                    return None;
                }
            },
        };
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        runtime.spawn(write_lines(rx, (out, config.path.clone()), config.format));
        Some(AccessLog {
            tx,
            sample_rate: config.sample_rate,
            max_per_second: config.max_per_second,
            window: AtomicU64::new(0),
            base: Instant::now(),
            queue_full: metrics.access_log_dropped("queue_full"),
            rate_limited: metrics.access_log_dropped("rate_limit"),
        })
    }

    /// Should the request arriving at `now` be logged? Sampling, then
    /// the per-second limit (counted when it refuses).
    pub fn admits(&self, now: Instant) -> bool {
        if self.sample_rate < 1.0 && fastrand::f64() >= self.sample_rate {
            return false;
        }
        let second = now.saturating_duration_since(self.base).as_secs() & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let next = if current >> 32 == second {
                if current & 0xffff_ffff >= u64::from(self.max_per_second) {
                    self.rate_limited.inc();
                    return false;
                }
                current + 1
            } else {
                second << 32 | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Queues a line for the writer, or drops and counts it.
    pub fn record(&self, entry: Entry) {
        if self.tx.try_send(Message::Line(entry)).is_err() {
            self.queue_full.inc();
        }
    }

    /// Opens the log's file again, after the lines queued before the
    /// call (SIGUSR1, as Nginx's: logrotate renamed it away, and the lines
    /// after go to a new file at the path). Nothing for stdout.
    pub async fn reopen(&self) {
        let _ = self.tx.send(Message::Reopen).await;
    }

    /// Resolves once every line queued before the call is written (or
    /// the writer is gone): the last lines of a stopping proxy are not
    /// lost with its runtime.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// The log's file at `path`, opened to append (made if missing).
fn open(path: &Path) -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(tokio::fs::File::from_std(file)))
}

/// The writer task: lines in batches, one write and flush per batch, to
/// `out` (the file at `path`, if it is one).
async fn write_lines(
    mut rx: mpsc::Receiver<Message>,
    (mut out, path): (Box<dyn AsyncWrite + Unpin + Send>, Option<PathBuf>),
    format: AccessLogFormat,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut text = String::with_capacity(64 * 1024);
    let mut flushed = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        text.clear();
        for message in batch.drain(..) {
            match message {
                Message::Line(entry) => match format {
                    AccessLogFormat::Json => json_line(&entry, &mut text),
                    AccessLogFormat::Text => text_line(&entry, &mut text),
                },
                Message::Flush(done) => flushed.push(done),
                Message::Reopen => {
                    let Some(path) = &path else { continue };
                    // What came before goes to the old file.
                    write_out(&mut out, &mut text).await;
                    match open(path) {
                        Ok(file) => {
                            out = file;
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "access log not reopened: lines go on to the file open before");
                        }
                    }
                }
            }
        }
        write_out(&mut out, &mut text).await;
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes and flushes `text` to `out`, and empties it.
async fn write_out(out: &mut Box<dyn AsyncWrite + Unpin + Send>, text: &mut String) {
    if !text.is_empty() {
        if let Err(e) = out.write_all(text.as_bytes()).await {
            tracing::warn!(error = %e, "access log write failed");
        }
        let _ = out.flush().await;
        text.clear();
    }
}

/// The fields of a line, in order, as (name, value) text; `None` = absent.
fn fields(e: &Entry) -> [(&'static str, Option<String>); 15] {
    let o = &e.observed;
    let class = match e.status {
        // The proxy's own 4xx (400, 403, 404, 408, 429, 499) is the
        // client's doing, as in the metrics.
        500.. if !o.upstream_answered => "error",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    [
        ("time", Some(rfc3339(e.time_ms))),
        ("request_id", Some(e.request_id.to_string())),
        (
            "trace_id",
            Some(String::from_utf8_lossy(&crate::observe::trace::hex128(e.trace_id)).into_owned()),
        ),
        ("sampled", Some(e.sampled.to_string())),
        ("direction", Some(o.direction.as_str().to_owned())),
        ("method", Some(e.method.as_str().to_owned())),
        ("service", o.service.as_deref().map(str::to_owned)),
        ("path", Some(e.path.to_string())),
        ("subset", o.subset.as_deref().map(str::to_owned)),
        ("endpoint", o.endpoint.map(|a| a.to_string())),
        ("status", Some(e.status.to_string())),
        ("code_class", Some(class.to_owned())),
        ("duration_ms", Some(format!("{:.3}", e.duration_ms))),
        ("retries", Some(o.retries.to_string())),
        ("bytes", e.bytes.map(|b| b.to_string())),
    ]
}

/// Fields written as JSON numbers or booleans rather than strings.
fn is_number(name: &str) -> bool {
    matches!(
        name,
        "sampled" | "status" | "duration_ms" | "retries" | "bytes"
    )
}

/// One JSON object, its fields in the documented order (a
/// `serde_json::Map` would sort them).
fn json_line(e: &Entry, out: &mut String) {
    out.push('{');
    let mut first = true;
    for (name, value) in fields(e) {
        let Some(value) = value else { continue };
        if !first {
            out.push(',');
        }
        first = false;
        let v = if is_number(name) {
            serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value))
        } else {
            serde_json::Value::String(value)
        };
        let _ = write!(out, "\"{name}\":{v}");
    }
    out.push_str("}\n");
}

fn text_line(e: &Entry, out: &mut String) {
    let mut first = true;
    for (name, value) in fields(e) {
        let value = value.unwrap_or_else(|| "-".to_owned());
        if !first {
            out.push(' ');
        }
        first = false;
        // Values with spaces or quotes are quoted, as JSON strings.
        if value.is_empty() || value.contains([' ', '"', '=']) {
            let _ = write!(out, "{name}={}", serde_json::Value::String(value));
        } else {
            let _ = write!(out, "{name}={value}");
        }
    }
    out.push('\n');
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch (UTC).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_600_000_123), "2026-11-25T09:46:40.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
