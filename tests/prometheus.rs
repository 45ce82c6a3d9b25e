//! The golden metrics as a real Prometheus sees them.
//!
//! Starts the proxy in-process on port 0 in front of two tiny backends
//! (subsets v1 and v2) and one refused endpoint, sends a known number of
//! requests, then lets the real `prometheus` binary scrape the admin
//! `/metrics` and asks its HTTP API for what it stored: the numbers must be
//! exactly what was sent. `promtool check metrics` must pass on the output
//! with no lint warning.
//!
//! Needs `prometheus` and `promtool` on `PATH` (Debian: `apt-get install
//! prometheus`); without them the test is skipped, unless
//! `ALMOND_REQUIRE_PROMETHEUS` or `CI` is set, when it fails.
//!
//! Self-contained on purpose: it shares no helpers with the other tests.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Requests pinned to each subset of `web`, and sent to the refused `gone`.
const TO_V1: u64 = 30;
const TO_V2: u64 = 10;
const TO_GONE: u64 = 5;
/// Retries per request to `gone` (a refused connect is always safe to retry).
const GONE_RETRIES: u64 = 2;

/// How long Prometheus may take to start, scrape and answer.
const DEADLINE: Duration = Duration::from_secs(60);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stores_exactly_what_the_proxy_counted() {
    let Some(tools) = Tools::find() else {
        return;
    };

    // Two backends that say who they are, and an address that refuses.
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let refused = refused_addr();

    // The proxy, in-process, on port 0.
    let yaml = format!(
        "admin: 127.0.0.1:0
listeners:
  - bind: 127.0.0.1:0
services:
  web:
    endpoints:
      - {{ addr: \"{v1}\", subset: v1 }}
      - {{ addr: \"{v2}\", subset: v2 }}
  gone:
    endpoints:
      - {{ addr: \"{refused}\" }}
    retries: {{ attempts: {GONE_RETRIES}, on: [connect] }}
"
    );
    let config = almond_config::load_proxy(&yaml, "prometheus test").expect("valid config");
    let bound = almond_proxy::Bound::bind(&config).expect("bind port 0");
    let admin = bound.admin_addr().expect("admin address");
    let listener = bound.listener_addrs()[0];
    let proxy = almond_proxy::Proxy::new(config).expect("proxy");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(bound, async {
        let _ = stopped.await;
    }));

    // Known traffic: pinned to v1, pinned to v2, and to the refused service.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..TO_V1 {
        let (status, body) = get(&client, listener, "web", Some("v1")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v1"));
    }
    for _ in 0..TO_V2 {
        let (status, body) = get(&client, listener, "web", Some("v2")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v2"));
    }
    for _ in 0..TO_GONE {
        let (status, _) = get(&client, listener, "gone", None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    // The exposition passes promtool's parser and linter.
    let (status, metrics) = fetch(&client, &format!("http://{admin}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    tools.check_metrics(&metrics);

    // A real Prometheus scrapes the admin listener and answers queries.
    let prometheus = tools.start_prometheus(admin);
    let requests = prometheus
        .query_until(
            &client,
            r#"sum by (subset) (almond_requests_total{service="web",code_class="2xx"})"#,
            &["subset"],
            2,
        )
        .await;
    assert_eq!(
        requests,
        BTreeMap::from([
            ("v1".to_owned(), TO_V1 as f64),
            ("v2".to_owned(), TO_V2 as f64)
        ]),
        "2xx requests by subset"
    );

    let errors = prometheus
        .query_until(
            &client,
            r#"almond_upstream_errors_total{kind="connect"}"#,
            &["service", "subset"],
            3,
        )
        .await;
    assert_eq!(
        errors,
        BTreeMap::from([
            ("gone/default".to_owned(), TO_GONE as f64),
            ("web/v1".to_owned(), 0.0),
            ("web/v2".to_owned(), 0.0),
        ]),
        "connect errors by service and subset"
    );

    // Retries are counted per try; errors and requests once per request.
    let retries = prometheus
        .query_until(&client, "almond_retries_total", &["service"], 2)
        .await;
    assert_eq!(
        retries,
        BTreeMap::from([
            ("gone".to_owned(), (TO_GONE * GONE_RETRIES) as f64),
            ("web".to_owned(), 0.0),
        ]),
        "retries by service"
    );

    let durations = prometheus
        .query_until(
            &client,
            r#"sum by (service, subset) (almond_request_duration_seconds_count{direction="outbound"})"#,
            &["service", "subset"],
            3,
        )
        .await;
    assert_eq!(
        durations,
        BTreeMap::from([
            ("gone/default".to_owned(), TO_GONE as f64),
            ("web/v1".to_owned(), TO_V1 as f64),
            ("web/v2".to_owned(), TO_V2 as f64),
        ]),
        "request durations observed by service and subset"
    );

    drop(prometheus);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("proxy drains within 10 s")
        .expect("proxy task");
}

/// The Prometheus binaries, found on `PATH`.
struct Tools {
    prometheus: PathBuf,
    promtool: PathBuf,
}

impl Tools {
    /// Both binaries, or `None` (skip) when they are missing and neither
    /// `ALMOND_REQUIRE_PROMETHEUS` nor `CI` asks for them.
    fn find() -> Option<Tools> {
        match (on_path("prometheus"), on_path("promtool")) {
            (Some(prometheus), Some(promtool)) => Some(Tools {
                prometheus,
                promtool,
            }),
            _ => {
                let required = ["ALMOND_REQUIRE_PROMETHEUS", "CI"]
                    .iter()
                    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
                assert!(
                    !required,
                    "prometheus and promtool must be on PATH (ALMOND_REQUIRE_PROMETHEUS or CI is \
                     set); on Debian: apt-get install prometheus"
                );
                eprintln!(
                    "skipped: install prometheus (Debian: apt-get install prometheus) to run \
                     the real-Prometheus test"
                );
                None
            }
        }
    }

    /// `promtool check metrics` on `text`: exit 0 and nothing printed.
    fn check_metrics(&self, text: &str) {
        let mut child = Command::new(&self.promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start promtool");
        child
            .stdin
            .take()
            .expect("promtool stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool output");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && printed.trim().is_empty(),
            "promtool check metrics: {}\n{printed}\n--- the metrics ---\n{text}",
            out.status
        );
    }

    /// Starts Prometheus scraping `target` every second, in a temporary
    /// directory, on a free port (tried again if the port was taken).
    fn start_prometheus(&self, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: almond
    static_configs:
      - targets: [\"{target}\"]
"
            ),
        )
        .expect("write prometheus.yml");
        let mut last_log = String::new();
        for _ in 0..3 {
            let addr = free_addr();
            let log_path = dir.path().join("prometheus.log");
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let child = Command::new(&self.prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut prometheus = Prometheus {
                child,
                addr,
                log: log_path,
                started: Instant::now(),
                _dir: None,
            };
            // A taken port makes Prometheus exit at once; anything else it
            // reports in its log later.
            std::thread::sleep(Duration::from_millis(500));
            if prometheus.exited() {
                last_log = prometheus.log_tail();
                continue;
            }
            prometheus._dir = Some(dir);
            return prometheus;
        }
        panic!("prometheus did not start; its log:\n{last_log}");
    }
}

/// A running Prometheus; killed when dropped, also when a test panics.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    started: Instant,
    /// Config and data; removed after the child is gone.
    _dir: Option<tempfile::TempDir>,
}

impl Prometheus {
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Polls an instant query until it returns `series` results, then
    /// gives each value keyed by its `labels` joined with `/`.
    async fn query_until(
        &self,
        client: &HttpClient,
        query: &str,
        labels: &[&str],
        series: usize,
    ) -> BTreeMap<String, f64> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(query)
        );
        let mut last = String::from("(no answer yet)");
        loop {
            if let Ok(Ok((StatusCode::OK, body))) =
                tokio::time::timeout(Duration::from_secs(5), try_fetch(client, &url)).await
            {
                let got = parse_vector(&body, labels);
                if got.len() >= series {
                    return got;
                }
                last = body;
            }
            assert!(
                self.started.elapsed() < DEADLINE,
                "prometheus gave no {series} series for `{query}` within {DEADLINE:?}; \
                 last answer: {last}\n--- prometheus log ---\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instant vector from the query API, keyed by the `labels` values.
fn parse_vector(body: &str, labels: &[&str]) -> BTreeMap<String, f64> {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let mut out = BTreeMap::new();
    for item in json["data"]["result"].as_array().into_iter().flatten() {
        let key = labels
            .iter()
            .map(|l| item["metric"][*l].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("/");
        let value = item["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        out.insert(key, value);
    }
    out
}

/// A GET through the proxy for `host`, optionally pinned to a subset.
async fn get(
    client: &HttpClient,
    proxy: SocketAddr,
    host: &str,
    subset: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::get(format!("http://{proxy}/")).header("host", host);
    if let Some(subset) = subset {
        req = req.header("x-almond-subset", subset);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("proxy answers within 10 s")
        .expect("proxy answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A GET of `url`: status and body; panics on a transport error.
async fn fetch(client: &HttpClient, url: &str) -> (StatusCode, String) {
    tokio::time::timeout(Duration::from_secs(10), try_fetch(client, url))
        .await
        .expect("answer within 10 s")
        .expect("GET")
}

async fn try_fetch(
    client: &HttpClient,
    url: &str,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A backend on 127.0.0.1:0 whose every answer is its own `name`.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on: bound, then closed.
fn refused_addr() -> SocketAddr {
    free_addr()
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// `name` in a `PATH` directory, if it is an executable file there.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
