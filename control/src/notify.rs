//! Notify: rollout and guard events posted to webhooks (`notify` in the control
//! config), from a queue of their own, so the watcher and the API never
//! wait on a slow or dead receiver.

use crate::policy::Event;
use almond_net::Backoff;
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounter;
use serde_json::json;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Events waiting to be posted; more are dropped (and counted).
const QUEUE: usize = 1024;
/// Tries per event and webhook.
const TRIES: u32 = 3;
/// Pauses between tries: 1 s, doubling (with three tries: 1 s, then 2 s).
const RETRY: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(30));
/// Time one post may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a stopping control plane waits for the queued events to be
/// posted (a retry of a failed post included).
pub const DRAIN: Duration = Duration::from_secs(5);

/// Where events go: the sending halves of the webhooks' queues.
#[derive(Clone)]
pub struct Notifier {
    /// One queue per webhook: a slow or dead one delays only its own.
    txs: Vec<mpsc::Sender<(String, Event)>>,
    dropped: IntCounter,
    /// `true` once the control plane stops: the queues are emptied, and
    /// the task ends.
    closing: std::sync::Arc<watch::Sender<bool>>,
}

impl Notifier {
    /// The control plane is stopping: the task posts what is queued, then
    /// ends (the caller bounds the wait: [`DRAIN`]).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Queues `events` of `service` for every webhook; never waits (a full
    /// queue drops them, counted in `almond_control_notify_dropped_total`).
    pub fn send(&self, service: &str, events: &[Event]) {
        for e in events {
            for tx in &self.txs {
                if tx.try_send((service.to_owned(), e.clone())).is_err() {
                    self.dropped.inc();
                }
            }
        }
    }
}

/// A queue per webhook and the task that drains each into its webhook
/// (all of them at once: one that does not answer holds up only its own
/// events); the task is returned to be spawned.
pub fn start(
    targets: Vec<almond_config::Notify>,
    dropped: IntCounter,
    failed: IntCounter,
) -> (Notifier, impl std::future::Future<Output = ()>) {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..targets.len())
        .map(|_| mpsc::channel::<(String, Event)>(QUEUE))
        .unzip();
    let (closing, closed) = watch::channel(false);
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let task = async move {
        let tls = match tls {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!(error = %e, "notify: no TLS settings; webhooks off");
                return;
            }
        };
        let https: HttpsConnector<HttpConnector> = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let each = (targets.into_iter().zip(rxs).enumerate()).map(|(index, (target, mut rx))| {
            let (client, failed) = (client.clone(), failed.clone());
            let mut closed = closed.clone();
            async move {
                loop {
                    // Once closing, what is queued still goes, then no more.
                    let next = tokio::select! {
                        biased;
                        next = rx.recv() => next,
                        _ = closed.wait_for(|c| *c) => rx.try_recv().ok(),
                    };
                    let Some((service, event)) = next else {
                        break;
                    };
                    let body = match target.format {
                        almond_config::NotifyFormat::Json => {
                            json!({ "service": service, "event": event }).to_string()
                        }
                        almond_config::NotifyFormat::Slack => {
                            json!({ "text": text(&service, &event) }).to_string()
                        }
                    };
                    if !post(&client, index, &target.url, body).await {
                        failed.inc();
                        tracing::warn!(notify = index, to = %shown(&target.url), seq = event.seq, "notify: webhook failed {TRIES} times; event dropped for it");
                    }
                }
            }
        });
        futures_util::future::join_all(each).await;
    };
    let closing = std::sync::Arc::new(closing);
    (
        Notifier {
            txs,
            dropped,
            closing,
        },
        task,
    )
}

/// One event as a line for people.
pub fn text(service: &str, e: &Event) -> String {
    let detail = e
        .detail
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    let by =
        e.by.as_deref()
            .map(|b| format!(" (by {b})"))
            .unwrap_or_default();
    match e.percent {
        Some(percent) => format!(
            "{service}: {} {} at {percent}%{detail}{by}",
            e.kind, e.canary
        ),
        None => format!("{service}: {}{detail}{by}", e.kind),
    }
}

/// A webhook's URL as logs show it: its scheme and host (and port) only.
/// The rest often is the secret (Slack's `/services/T…/B…/SECRET`, a
/// `?token=`), and so may a `user:password@`.
pub fn shown(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("?");
            let host = uri.host().unwrap_or("?");
            match uri.port_u16() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            }
        }
        Err(_) => "(an unreadable URL)".to_owned(),
    }
}

/// Posts `body` to webhook number `index` (at `url`), up to `TRIES` times
/// (1 s, then 2 s apart); whether a 2xx came.
async fn post(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    index: usize,
    url: &str,
    body: String,
) -> bool {
    let to = shown(url);
    for attempt in 0..TRIES {
        if attempt > 0 {
            tokio::time::sleep(RETRY.pause(attempt)).await;
        }
        let Ok(req) = hyper::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())))
        else {
            return false;
        };
        match tokio::time::timeout(TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => return true,
            Ok(Ok(resp)) => {
                tracing::debug!(notify = index, %to, status = %resp.status(), "notify: refused")
            }
            Ok(Err(e)) => tracing::debug!(notify = index, %to, error = %e, "notify: not reached"),
            Err(_) => tracing::debug!(notify = index, %to, "notify: timed out"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A tracing writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    #[allow(clippy::unwrap_used)]
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logs_show_a_webhook_by_scheme_and_host_only() {
        let url = "https://hooks.example/services/T0/B0/SECRET";
        assert_eq!(shown(url), "https://hooks.example");
        assert_eq!(
            shown("http://user:SECRET@hooks.example:8080/x?token=SECRET"),
            "http://hooks.example:8080"
        );
        assert!(!shown("not a url SECRET").contains("SECRET"));
    }

    /// A webhook that cannot be reached: every line logged about it, at
    /// any level, leaves out its path (the secret).
    #[tokio::test(start_paused = true)]
    async fn a_failing_webhook_is_logged_without_its_secret() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Nothing listens on port 9 (discard) here: refused, or timed out.
        let target = almond_config::Notify {
            url: "http://127.0.0.1:9/services/T0/B0/SECRET".to_owned(),
            format: almond_config::NotifyFormat::Slack,
        };
        let (dropped, failed) = (
            IntCounter::new("d", "d").unwrap(),
            IntCounter::new("f", "f").unwrap(),
        );
        let (notifier, task) = start(vec![target], dropped, failed.clone());
        let event: Event = serde_json::from_value(json!({
            "seq": 1, "at": 0, "kind": "blocked", "detail": "GET /x denied 503"
        }))
        .unwrap();
        notifier.send("web", &[event]);
        drop(notifier);
        task.await;
        assert_eq!(failed.get(), 1);
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("webhook failed"), "{logs}");
        assert!(logs.contains("http://127.0.0.1:9"), "{logs}");
        assert!(!logs.contains("SECRET"), "{logs}");
    }

    /// A webhook that takes the connection and never answers holds up only
    /// its own events: another one gets every event at once (they went
    /// one webhook after the other, 18 s each behind the dead one).
    #[tokio::test]
    async fn a_dead_webhook_does_not_delay_the_others() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = dead.accept().await {
                held.push(conn);
            }
        });
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let posts = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = posts.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = live.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = (head.lines())
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + length {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + length);
                        counted.fetch_add(1, Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if conn.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let target = |addr: std::net::SocketAddr| almond_config::Notify {
            url: format!("http://{addr}/hook"),
            format: almond_config::NotifyFormat::Json,
        };
        let (dropped, failed) = (
            IntCounter::new("d", "d").unwrap(),
            IntCounter::new("f", "f").unwrap(),
        );
        let (notifier, task) = start(vec![target(dead_addr), target(live_addr)], dropped, failed);
        let task = tokio::spawn(task);
        for seq in 1..=3 {
            let event: Event = serde_json::from_value(json!({
                "seq": seq, "at": 0, "kind": "blocked", "detail": "GET /x denied 503"
            }))
            .unwrap();
            notifier.send("web", &[event]);
        }
        let all = async {
            while posts.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let got = tokio::time::timeout(Duration::from_secs(3), all).await;
        assert!(
            got.is_ok(),
            "{} of 3 events reached the live webhook",
            posts.load(Ordering::SeqCst)
        );
        task.abort();
    }
}
