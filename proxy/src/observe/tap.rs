//! Tap: live request summaries for whoever watches (`GET /tap` on the admin
//! listener), filtered and capped here; a request costs one atomic load
//! while nobody watches.

use crate::observe::access_log::Observed;
pub use almond_config::tap::{Filter, Status, MAX_PER_SECOND};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method};
use prometheus::IntCounter;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Summaries waiting for a slow watcher, at most; more are dropped.
const QUEUE: usize = 256;

/// A watcher that sees no event gets an empty line this often: a client
/// that went away is noticed (the write fails) and its watcher removed.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A tap shows a header by name only, never by value, when its name
/// (lower case, as `HeaderName` keeps it) contains one of these: the
/// credentials of `authorization`, `proxy-authorization`, `cookie`,
/// `set-cookie`, `x-api-key`, `dpop`, the identity assertions of
/// access proxies (`cf-access-jwt-assertion`, `x-goog-iap-jwt-assertion`,
/// `x-amzn-oidc-data`), webhook signatures (`x-hub-signature-256`), and
/// the ones an application names itself (`x-auth-token`,
/// `x-amz-security-token`, `x-csrf-token`, `x-vault-token`,
/// `x-session-id`, `x-passwd`, ...). A few harmless ones go too.
const SECRET_WORDS: [&str; 17] = [
    "assertion",
    "auth",
    "cookie",
    "credential",
    "csrf",
    "dpop",
    "jwt",
    "key",
    "oidc",
    "pass",
    "private",
    "saml",
    "secret",
    "session",
    "sign",
    "token",
    "xsrf",
];

/// Bytes of header names and values one event shows, at most, and of one
/// value: an event stays a few KiB (well under the control plane's
/// 64 KiB line) however large the request's head; what is left out is
/// counted in the event's `headers_left_out`, and a cut value ends in
/// `...`.
const SHOWN_BYTES: usize = 8 * 1024;
const SHOWN_VALUE: usize = 1024;

/// Whether a tap hides the value of header `name` (lower case).
fn secret(name: &str) -> bool {
    SECRET_WORDS.iter().any(|word| name.contains(word))
}

/// Whether `s` passes `filter`.
fn passes(filter: &Filter, s: &Summary<'_>) -> bool {
    let service = s.observed.service.as_deref();
    let subset = s.observed.subset.as_deref();
    filter
        .service
        .as_deref()
        .is_none_or(|want| service == Some(want))
        && filter
            .subset
            .as_deref()
            .is_none_or(|want| subset == Some(want))
        && (filter.path_prefix.as_deref()).is_none_or(|p| s.path.starts_with(p))
        && filter.status.is_none_or(|st| st.matches(s.status))
}

/// One finished request, as the request path hands it to [`Taps::offer`].
pub struct Summary<'a> {
    /// Wall-clock arrival, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Request method.
    pub method: &'a Method,
    /// Request path (no query: it may carry secrets).
    pub path: &'a str,
    /// Response status (proxy-made answers included).
    pub status: u16,
    /// Route and endpoint.
    pub observed: &'a Observed,
    /// Time to the response's headers.
    pub latency: Duration,
    /// `x-request-id`.
    pub request_id: &'a [u8],
    /// The request's headers, when a watcher asked for them.
    pub headers: Option<&'a HeaderMap>,
}

/// A per-second budget in one word: the second (high 32 bits) and the
/// events spent in it (low 32 bits).
struct Budget(AtomicU64);

impl Budget {
    fn take(&self, second: u32, limit: u32) -> bool {
        let mut now = self.0.load(Ordering::Relaxed);
        loop {
            let (at, spent) = ((now >> 32) as u32, now as u32);
            let spent = if at == second { spent } else { 0 };
            if spent >= limit {
                return false;
            }
            let next = (u64::from(second) << 32) | u64::from(spent + 1);
            match self
                .0
                .compare_exchange_weak(now, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }
}

struct Watcher {
    filter: Filter,
    budget: Budget,
    tx: mpsc::Sender<Bytes>,
}

/// The proxy's watchers.
pub struct Taps {
    watchers: ArcSwap<Vec<Arc<Watcher>>>,
    /// How many watch: what the request path reads first.
    count: AtomicUsize,
    /// Whether any watcher wants headers.
    headers: AtomicUsize,
    /// The proxy-wide budget ([`MAX_PER_SECOND`]).
    budget: Budget,
    proxy: Arc<str>,
    dropped: IntCounter,
    sent: IntCounter,
}

impl Taps {
    /// No watchers yet; summaries name the proxy `proxy`.
    pub fn new(proxy: Arc<str>, sent: IntCounter, dropped: IntCounter) -> Taps {
        Taps {
            watchers: ArcSwap::from_pointee(Vec::new()),
            count: AtomicUsize::new(0),
            headers: AtomicUsize::new(0),
            budget: Budget(AtomicU64::new(0)),
            proxy,
            dropped,
            sent,
        }
    }

    /// Whether anyone watches: the one thing a request checks.
    #[inline]
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Whether a watcher wants request headers (kept only then).
    pub fn wants_headers(&self) -> bool {
        self.headers.load(Ordering::Relaxed) > 0
    }

    /// Offers one finished request to every watcher whose filter it
    /// passes, within the watcher's and the proxy's budgets; an event over
    /// a budget, or for a watcher that reads too slowly, is dropped and
    /// counted.
    pub fn offer(&self, summary: &Summary<'_>) {
        let second = (summary.time_ms / 1000) as u32;
        let mut line = None;
        for watcher in self.watchers.load().iter() {
            if !passes(&watcher.filter, summary) {
                continue;
            }
            // Room in the watcher's queue first: a watcher that reads too
            // slowly must not spend the proxy-wide budget the others share.
            let Ok(room) = watcher.tx.try_reserve() else {
                self.dropped.inc();
                continue;
            };
            if !watcher.budget.take(second, watcher.filter.per_second)
                || !self.budget.take(second, MAX_PER_SECOND)
            {
                self.dropped.inc();
                continue;
            }
            let bytes = match (&line, watcher.filter.headers) {
                (Some(bytes), false) => Bytes::clone(bytes),
                (_, false) => line.insert(self.render(summary, false)).clone(),
                (_, true) => self.render(summary, true),
            };
            room.send(bytes);
            self.sent.inc();
        }
    }

    /// Starts a watcher; it is removed when the returned body is dropped
    /// (the admin client went away).
    pub fn watch(self: &Arc<Taps>, filter: Filter) -> TapBody {
        let (tx, rx) = mpsc::channel(QUEUE);
        let headers = filter.headers;
        let watcher = Arc::new(Watcher {
            filter,
            budget: Budget(AtomicU64::new(0)),
            tx,
        });
        self.watchers.rcu(|all| {
            let mut all = Vec::clone(all);
            all.push(watcher.clone());
            all
        });
        self.count.fetch_add(1, Ordering::Relaxed);
        if headers {
            self.headers.fetch_add(1, Ordering::Relaxed);
        }
        let leave = Leave {
            taps: self.clone(),
            watcher,
        };
        almond_net::Lines::new(rx, HEARTBEAT, leave)
    }

    fn render(&self, s: &Summary<'_>, headers: bool) -> Bytes {
        let o = s.observed;
        let mut event = json!({
            "time_ms": s.time_ms,
            "proxy": &*self.proxy,
            "direction": o.direction.as_str(),
            "method": s.method.as_str(),
            "path": s.path,
            "status": s.status,
            "service": o.service.as_deref(),
            "subset": o.subset.as_deref(),
            "endpoint": o.endpoint.map(|a| a.to_string()),
            "latency_ms": (s.latency.as_secs_f64() * 1e6).round() / 1e3,
            "request_id": String::from_utf8_lossy(s.request_id),
        });
        if let (true, Some(map), Some(all)) = (headers, event.as_object_mut(), s.headers) {
            let (shown, left_out) = redacted(all);
            map.insert("headers".to_owned(), shown);
            if left_out > 0 {
                map.insert("headers_left_out".to_owned(), Value::from(left_out));
            }
        }
        let mut bytes = serde_json::to_vec(&event).unwrap_or_default();
        bytes.push(b'\n');
        Bytes::from(bytes)
    }
}

/// The request's headers as a JSON object, secrets by name only, a
/// repeated field's values joined with `, `; within [`SHOWN_BYTES`], and
/// how many fields did not fit.
fn redacted(headers: &HeaderMap) -> (Value, usize) {
    let mut out = Map::new();
    let mut budget = SHOWN_BYTES;
    let mut left_out = 0;
    for name in headers.keys() {
        let name = name.as_str();
        if name.len() >= budget {
            left_out += 1;
            continue;
        }
        budget -= name.len();
        let shown = if secret(name) {
            "<redacted>".to_owned()
        } else {
            let mut joined = Vec::new();
            for (i, value) in headers.get_all(name).iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(value.as_bytes());
            }
            let keep = joined.len().min(SHOWN_VALUE).min(budget);
            budget -= keep;
            let mut text = String::from_utf8_lossy(&joined[..keep]).into_owned();
            if keep < joined.len() {
                text.push_str("...");
            }
            text
        };
        out.insert(name.to_owned(), Value::String(shown));
    }
    (Value::Object(out), left_out)
}

/// Removes its watcher when dropped.
pub struct Leave {
    taps: Arc<Taps>,
    watcher: Arc<Watcher>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let gone = &self.watcher;
        self.taps.watchers.rcu(|all| {
            all.iter()
                .filter(|w| !Arc::ptr_eq(w, gone))
                .cloned()
                .collect::<Vec<_>>()
        });
        self.taps.count.fetch_sub(1, Ordering::Relaxed);
        if gone.filter.headers {
            self.taps.headers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A watcher's stream of summaries, one JSON object per line (and an
/// empty line after 5 s of silence), for as long as the admin
/// client reads it; the watcher leaves with it.
pub type TapBody = almond_net::Lines<Leave>;

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn taps() -> Arc<Taps> {
        Arc::new(Taps::new(
            "p1".into(),
            IntCounter::new("s", "s").unwrap(),
            IntCounter::new("d", "d").unwrap(),
        ))
    }

    #[test]
    fn a_budget_spends_per_second() {
        let b = Budget(AtomicU64::new(0));
        assert!((0..3).all(|_| b.take(7, 3)));
        assert!(!b.take(7, 3));
        assert!(b.take(8, 3));
    }

    #[tokio::test]
    async fn watchers_see_what_passes_their_filter_and_leave_when_dropped() {
        let taps = taps();
        assert!(!taps.active());
        let mut body = taps.watch(Filter::from_query(&query(&[("status", "5xx")])).unwrap());
        assert!(taps.active());
        let observed = Observed {
            service: Some("web".into()),
            ..Observed::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        for status in [200, 503] {
            taps.offer(&Summary {
                time_ms: 1_000,
                method: &Method::GET,
                path: "/x",
                status,
                observed: &observed,
                latency: Duration::from_micros(1500),
                request_id: b"r1",
                headers: Some(&headers),
            });
        }
        use http_body_util::BodyExt;
        let line = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["status"], 503);
        assert_eq!(event["latency_ms"], 1.5);
        assert!(event.get("headers").is_none());
        let next = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(next.is_err(), "the 200 was filtered out");
        drop(body);
        assert!(!taps.active());
    }

    #[tokio::test]
    async fn credential_headers_are_shown_by_name_only() {
        let taps = taps();
        let mut body = taps.watch(Filter::from_query(&query(&[("headers", "true")])).unwrap());
        let observed = Observed::default();
        let mut headers = HeaderMap::new();
        let secrets = [
            "authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "x-auth-token",
            "X-Amz-Security-Token",
            "x-csrf-token",
            "x-vault-token",
            "x-session-id",
            "x-client-secret",
            "x-db-password",
            "x-authz",
            "cf-access-jwt-assertion",
            "x-goog-iap-jwt-assertion",
            "x-amzn-oidc-data",
            "dpop",
            "x-hub-signature-256",
            "x-passwd",
            "x-xsrf",
        ];
        for name in secrets {
            let name: http::HeaderName = name.parse().unwrap();
            headers.insert(name, "s3cr3t".parse().unwrap());
        }
        headers.insert("accept", "text/html".parse().unwrap());
        headers.insert("user-agent", "curl/8".parse().unwrap());
        taps.offer(&Summary {
            time_ms: 1_000,
            method: &Method::GET,
            path: "/x",
            status: 200,
            observed: &observed,
            latency: Duration::from_micros(1500),
            request_id: b"r1",
            headers: Some(&headers),
        });
        use http_body_util::BodyExt;
        let line = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let text = String::from_utf8_lossy(&line);
        assert!(!text.contains("s3cr3t"), "{text}");
        let event: Value = serde_json::from_slice(&line).unwrap();
        for name in secrets {
            let name = name.to_ascii_lowercase();
            assert_eq!(event["headers"][&name], "<redacted>", "{name}: {text}");
        }
        assert_eq!(event["headers"]["accept"], "text/html", "{text}");
        assert_eq!(event["headers"]["user-agent"], "curl/8", "{text}");
    }

    fn summary<'a>(observed: &'a Observed, headers: Option<&'a HeaderMap>) -> Summary<'a> {
        Summary {
            time_ms: 1_000,
            method: &Method::GET,
            path: "/x",
            status: 200,
            observed,
            latency: Duration::from_micros(1500),
            request_id: b"r1",
            headers,
        }
    }

    /// A repeated field shows every value; a head far larger than a line
    /// may carry is cut to a few KiB, saying how much was left out.
    #[tokio::test]
    async fn repeated_fields_show_every_value_and_large_heads_are_cut() {
        let taps = taps();
        let mut body = taps.watch(Filter::from_query(&query(&[("headers", "true")])).unwrap());
        let observed = Observed::default();
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", "10.0.0.1".parse().unwrap());
        headers.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        // Quotes double in JSON: 60,000 of them would be a 120 KB line.
        headers.insert("x-pad", "\"".repeat(60_000).parse().unwrap());
        for i in 0..2_000 {
            let name: http::HeaderName = format!("x-field-{i}").parse().unwrap();
            headers.insert(name, "v".parse().unwrap());
        }
        taps.offer(&summary(&observed, Some(&headers)));
        use http_body_util::BodyExt;
        let line = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(line.len() < 32 * 1024, "a line of {} bytes", line.len());
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["headers"]["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
        let pad = event["headers"]["x-pad"].as_str().unwrap();
        assert_eq!(pad.len(), SHOWN_VALUE + 3, "cut, and says so");
        assert!(pad.ends_with("..."));
        let left_out = event["headers_left_out"].as_u64().unwrap();
        let shown = event["headers"].as_object().unwrap().len() as u64;
        assert_eq!(shown + left_out, 2_002, "every field shown or counted");
        assert!(left_out > 0);
    }

    /// A watcher whose queue is full drops its own events without
    /// spending the proxy-wide budget: another watcher still sees its own.
    #[tokio::test]
    async fn a_watcher_that_does_not_read_leaves_the_budget_to_others() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let taps = Arc::new(Taps::new(
            "p1".into(),
            IntCounter::new("s", "s").unwrap(),
            dropped.clone(),
        ));
        let all = || Filter::from_query(&query(&[("rate", "100")])).unwrap();
        let _stalled = taps.watch(all());
        let observed = Observed::default();
        // Fill the stalled watcher's queue, a second at a time.
        for second in 0..(QUEUE as u64).div_ceil(u64::from(MAX_PER_SECOND)) {
            for _ in 0..MAX_PER_SECOND {
                let mut s = summary(&observed, None);
                s.time_ms = second * 1000;
                taps.offer(&s);
            }
        }
        let mut reader = taps.watch(all());
        let later = 3_600_000;
        for _ in 0..MAX_PER_SECOND {
            let mut s = summary(&observed, None);
            s.time_ms = later;
            taps.offer(&s);
        }
        use http_body_util::BodyExt;
        for _ in 0..MAX_PER_SECOND {
            let line = tokio::time::timeout(Duration::from_secs(1), reader.frame())
                .await
                .expect("the reading watcher gets its events")
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap();
            let event: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(event["time_ms"], later);
        }
        assert!(
            dropped.get() >= u64::from(MAX_PER_SECOND),
            "the stalled watcher's events are counted dropped"
        );
    }
}
