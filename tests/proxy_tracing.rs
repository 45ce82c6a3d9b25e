//! Span export end to end: a real OTLP/HTTP receiver runs in the test,
//! decodes what the proxy posts (`ExportTraceServiceRequest`, protobuf) and
//! the tests check the spans' IDs against the `traceparent`s on the wire,
//! their attributes against what happened; a hanging or absent collector
//! must not slow requests, and its drops are counted.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode as Code, Span};
use prost::Message;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One span as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Got {
    service_name: String,
    scope: String,
    span: Span,
}

impl Got {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// An attribute as text (ints and doubles formatted), if present.
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    /// A numeric attribute.
    fn num(&self, key: &str) -> f64 {
        let text = self
            .attr(key)
            .unwrap_or_else(|| panic!("no {key} in {self:?}"));
        text.parse()
            .unwrap_or_else(|_| panic!("{key}={text} is not a number"))
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let value = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A real OTLP/HTTP traces receiver on `127.0.0.1:0`: `POST /v1/traces`
/// with a protobuf body, decoded and kept; anything else is kept as a
/// problem (and answered 400).
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    problems: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (spans.clone(), problems.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| receive(req, s.clone(), p.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            problems,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        let problems = self.problems.lock().unwrap().clone();
        assert!(problems.is_empty(), "bad export requests: {problems:?}");
        self.spans.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Got> {
        eventually(&format!("{n} spans at the collector"), || async {
            self.spans().len() >= n
        })
        .await;
        self.spans()
    }
}

async fn receive(
    req: Request<Incoming>,
    spans: Arc<Mutex<Vec<Got>>>,
    problems: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Body>, Infallible> {
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let ok = req.method() == "POST" && req.uri().path() == "/v1/traces";
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let decoded = body
        .map_err(|e| e.to_string())
        .and_then(|b| ExportTraceServiceRequest::decode(b).map_err(|e| e.to_string()));
    match decoded {
        Ok(export) if ok && content_type == "application/x-protobuf" => {
            let mut out = spans.lock().unwrap();
            for rs in export.resource_spans {
                let resource = rs.resource.unwrap_or_default();
                let service_name = attr(&resource.attributes, "service.name").unwrap_or_default();
                for ss in rs.scope_spans {
                    let scope = ss.scope.map(|s| s.name).unwrap_or_default();
                    for span in ss.spans {
                        out.push(Got {
                            service_name: service_name.clone(),
                            scope: scope.clone(),
                            span,
                        });
                    }
                }
            }
            let mut resp = Response::new(empty());
            resp.headers_mut()
                .insert("content-type", "application/x-protobuf".parse().unwrap());
            Ok(resp)
        }
        other => {
            problems
                .lock()
                .unwrap()
                .push(format!("{content_type:?} ok={ok} {:?}", other.err()));
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            Ok(resp)
        }
    }
}

/// The `tracing:` line of a proxy config exporting to `endpoint`.
fn tracing_yaml(sample_rate: f64, endpoint: &str, extra: &str) -> String {
    format!(
        "tracing: {{ sample_rate: {sample_rate}, otlp: {{ endpoint: \"{endpoint}\", flush_interval: 20ms{extra} }} }}"
    )
}

fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(if body.is_empty() {
        empty()
    } else {
        full(body.to_owned())
    })
    .unwrap()
}

#[tokio::test]
async fn sampled_requests_become_spans_at_a_real_otlp_receiver() {
    let collector = Collector::start().await;
    let backend = Backend::start("api").await;
    let failing = Backend::builder("flaky").status(503).start().await;
    let dead = closed_port().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .top("proxy_id: edge-1")
        .top(&tracing_yaml(
            1.0,
            &collector.endpoint(),
            ", service_name: edge",
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .service(ServiceYaml::new("flaky").at(failing.addr))
        .service(ServiceYaml::new("dead").at(dead))
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;

    // A client's sampled trace, with a body.
    let sent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let ok = c
        .request(request(
            "POST",
            "api",
            "/orders?secret=1",
            &[("traceparent", &sent)],
            "hello",
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let upstream_tp = backend.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let upstream_parent = upstream_tp.split('-').nth(2).unwrap().to_owned();

    // An upstream 503 (retried), and no upstream at all (connect refused).
    let flaky = c.request(request("GET", "flaky", "/x", &[], "")).await;
    assert_eq!(flaky.status, StatusCode::SERVICE_UNAVAILABLE);
    let down = c.request(request("GET", "dead", "/y", &[], "")).await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);

    // One span per request, no more.
    let spans = collector.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(collector.spans().len(), 3, "{spans:#?}");
    let by_service = |svc: &str| {
        spans
            .iter()
            .find(|g| g.attr("almond.service").as_deref() == Some(svc))
            .unwrap_or_else(|| panic!("no span of {svc}: {spans:#?}"))
            .clone()
    };

    // The client's trace: same trace ID, the client's span as parent, and
    // the span ID the upstream saw as its parent.
    let span = by_service("api");
    assert_eq!(span.trace_id(), TRACE_ID);
    assert_eq!(hex(&span.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&span.span.span_id), upstream_parent);
    assert_eq!(span.span.name, "POST api");
    assert_eq!(span.span.kind, SpanKind::Client as i32);
    assert_eq!(span.service_name, "edge");
    assert_eq!(span.scope, "almond-proxy");
    let status = span.span.status.clone().unwrap_or_default();
    assert_eq!(status.code, Code::Unset as i32);
    for (key, want) in [
        ("http.request.method", "POST".to_owned()),
        ("url.path", "/orders".to_owned()),
        ("http.response.status_code", "200".to_owned()),
        ("almond.service", "api".to_owned()),
        ("almond.subset", "v1".to_owned()),
        ("almond.direction", "outbound".to_owned()),
        ("almond.retries", "0".to_owned()),
        ("server.address", "127.0.0.1".to_owned()),
        ("server.port", backend.addr.port().to_string()),
        ("http.request.body.size", "5".to_owned()),
        ("http.response.body.size", ok.body.len().to_string()),
        (
            "almond.request_id",
            ok.header("x-request-id").unwrap().to_owned(),
        ),
    ] {
        assert_eq!(span.attr(key).as_deref(), Some(want.as_str()), "{key}");
    }
    // Timings: present, ordered, sane.
    let (queue, connect, upstream, total) = (
        span.num("almond.queue_ms"),
        span.num("almond.connect_ms"),
        span.num("almond.upstream_ms"),
        span.num("almond.total_ms"),
    );
    assert!(
        queue >= 0.0 && connect > 0.0,
        "a first request connects: {connect}"
    );
    assert!(
        upstream >= connect && total >= upstream && total >= queue,
        "{span:#?}"
    );
    assert!(total < 10_000.0);
    let (start, end) = (span.span.start_time_unix_nano, span.span.end_time_unix_nano);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(start > 0 && start <= end && end <= now);
    assert!(((end - start) as f64 / 1e6 - total).abs() < 1.0);

    // A 5xx from the upstream: an error span, with its retries counted.
    let span = by_service("flaky");
    assert_eq!(
        span.span.status.clone().unwrap_or_default().code,
        Code::Error as i32
    );
    assert_eq!(
        span.attr("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(span.attr("error.type").as_deref(), Some("503"));
    assert_ne!(span.trace_id(), TRACE_ID, "a new trace");
    assert_eq!(span.span.parent_span_id, Vec::<u8>::new(), "a root span");
    let metrics = proxy.admin_get("/metrics").await.text();
    let retried = metric(&metrics, "almond_retries_total", &[("service", "flaky")]);
    assert!(retried >= 1.0);
    assert_eq!(span.num("almond.retries"), retried);

    // No upstream: an error span naming why.
    let span = by_service("dead");
    assert_eq!(
        span.span.status.clone().unwrap_or_default().code,
        Code::Error as i32
    );
    assert_eq!(span.attr("error.type").as_deref(), Some("connect"));
    assert_eq!(
        span.attr("http.response.status_code").as_deref(),
        Some("502")
    );
    assert_eq!(span.attr("server.port"), Some(dead.port().to_string()));

    eventually("exported spans counted", || async {
        let m = proxy.admin_get("/metrics").await.text();
        metric(&m, "almond_trace_spans_exported_total", &[]) == 3.0
    })
    .await;
}

/// Sends `n` requests one after another, each answered 200 (the test
/// fails if they take longer than `within`'s limit all together).
async fn answered_requests(proxy: SocketAddr, n: usize) {
    let mut c = H1::connect(proxy).await;
    within("the requests answered", async {
        for _ in 0..n {
            let reply = c.get("api", "/").await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    })
    .await;
}

#[tokio::test]
async fn a_hanging_collector_never_slows_requests_and_drops_are_counted() {
    // Accepts the export's connection and never answers.
    let collector = Backend::builder("otlp").hang().start().await;
    let backend = Backend::start("api").await;
    let endpoint = format!("http://{}/v1/traces", collector.addr);
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&tracing_yaml(
            1.0,
            &endpoint,
            ", queue: 8, batch: 4, timeout: 10m",
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;

    // An export hangs for ten minutes: a request that waited on one would
    // not be answered within `within`'s limit.
    answered_requests(proxy.addr(), 60).await;
    eventually("an export was attempted", || async {
        collector.count() >= 1
    })
    .await;

    // At most one batch in flight and a full queue: the rest are dropped.
    let metrics = proxy.admin_get("/metrics").await.text();
    let full = metric(
        &metrics,
        "almond_trace_spans_dropped_total",
        &[("reason", "queue_full")],
    );
    assert!(full >= (60 - 8 - 4) as f64, "queue_full drops: {full}");
    assert_eq!(
        metric(&metrics, "almond_trace_spans_exported_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn a_collector_that_is_down_gets_every_span_counted_as_dropped() {
    let down = closed_port().await;
    let backend = Backend::start("api").await;
    let endpoint = format!("http://{down}/v1/traces");
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&tracing_yaml(
            1.0,
            &endpoint,
            ", queue: 8, batch: 4, timeout: 200ms",
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;

    answered_requests(proxy.addr(), 60).await;

    // Every span ends up dropped: queue full, or its export failed.
    eventually("every span counted as dropped", || async {
        let m = proxy.admin_get("/metrics").await.text();
        metric(&m, "almond_trace_spans_dropped_total", &[]) == 60.0
    })
    .await;
    let metrics = proxy.admin_get("/metrics").await.text();
    assert!(metric(&metrics, "almond_trace_export_errors_total", &[]) >= 1.0);
    assert_eq!(
        metric(&metrics, "almond_trace_spans_exported_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn unsampled_requests_export_nothing() {
    let collector = Collector::start().await;
    let backend = Backend::start("api").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&tracing_yaml(0.0, &collector.endpoint(), ""))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;

    // No parent, and a parent that is not sampled: no span.
    let unsampled = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    for i in 0..20 {
        let tp: &[(&str, &str)] = if i % 2 == 0 {
            &[]
        } else {
            &[("traceparent", &unsampled)]
        };
        let reply = c.request(request("GET", "api", "/", tp, "")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // A sampled parent is exported even at rate 0; spans leave in order,
    // so once it arrives nothing else is on its way.
    let sampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let sampled = format!("00-{sampled_trace}-{CLIENT_SPAN}-01");
    c.request(request("GET", "api", "/", &[("traceparent", &sampled)], ""))
        .await;
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].trace_id(), sampled_trace);
}

/// A sampled request whose client leaves before the answer still makes
/// its span: the upstream already has it as its parent. Its status is
/// 499 and its error says why.
#[tokio::test]
async fn a_request_whose_client_left_still_makes_its_span() {
    let collector = Collector::start().await;
    let backend = Backend::builder("slow").hang().start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&tracing_yaml(1.0, &collector.endpoint(), ""))
        .service(ServiceYaml::new("slow").at(backend.addr))
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        c.request(request("GET", "slow", "/wait", &[], "")),
    )
    .await;
    assert!(gone.is_err(), "the backend answered");
    drop(c);
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(
        spans[0].attr("http.response.status_code").as_deref(),
        Some("499")
    );
    assert_eq!(spans[0].attr("error.type").as_deref(), Some("client-left"));
    assert_eq!(backend.count(), 1);
}

/// A GET to service `slow` on `addr`, sent in a task of its own and
/// returned once `backend` (one that never answers) has it.
async fn hung_request(
    addr: std::net::SocketAddr,
    backend: &Backend,
) -> tokio::task::JoinHandle<Result<Reply, tokio::time::error::Elapsed>> {
    let pending = tokio::spawn(async move {
        let mut c = H1::connect(addr).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            c.request(request("GET", "slow", "/wait", &[], "")),
        )
        .await
    });
    eventually("the request reaches the backend", || async {
        backend.count() == 1
    })
    .await;
    pending
}

/// A sampled request the proxy cuts when its drain's time is up is the
/// proxy's doing, whether an access log is kept or not: its span says 503
/// `proxy-cut` (it said 499 `client-left` without an access log).
#[tokio::test]
async fn a_request_cut_by_the_drain_says_so_in_its_span() {
    let collector = Collector::start().await;
    let backend = Backend::builder("slow").hang().start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .top("drain_timeout: 300ms")
        .top(&tracing_yaml(1.0, &collector.endpoint(), ""))
        .service(ServiceYaml::new("slow").at(backend.addr))
        .start()
        .await;
    let addr = proxy.addr();
    let pending = hung_request(addr, &backend).await;
    within("the drain", proxy.shutdown()).await;
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(
        spans[0].attr("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(spans[0].attr("error.type").as_deref(), Some("proxy-cut"));
    pending.abort();
}

/// A request the drain cuts is counted in the golden metrics as the
/// proxy's 5xx, as its span and log line say 503: it was counted as the
/// client's 4xx (a client that left), hiding what a restart cost.
#[tokio::test]
async fn a_request_cut_by_the_drain_is_a_5xx_in_the_metrics() {
    let backend = Backend::builder("slow").hang().start().await;
    let yaml = ProxyYaml::new()
        .by_host()
        .top("drain_timeout: 300ms")
        .service(ServiceYaml::new("slow").at(backend.addr))
        .build();
    let config = almond_config::load_proxy(&yaml, "test").unwrap();
    let bound = almond_proxy::Bound::bind(&config).unwrap();
    let addr = bound.listener_addrs()[0];
    let proxy = almond_proxy::Proxy::new(config).unwrap();
    let shared = proxy.shared().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(bound, async {
        let _ = stopped.await;
    }));
    let pending = hung_request(addr, &backend).await;
    let _ = stop.send(());
    within("the drain", running).await.unwrap();
    let text = String::from_utf8(shared.metrics.encode()).unwrap();
    let count = |class: &str| {
        metric(
            &text,
            "almond_requests_total",
            &[("service", "slow"), ("code_class", class)],
        )
    };
    assert_eq!(count("5xx"), 1.0, "{text}");
    assert_eq!(count("4xx"), 0.0, "{text}");
    pending.abort();
}

#[tokio::test]
async fn queued_spans_are_flushed_on_shutdown() {
    let collector = Collector::start().await;
    let backend = Backend::start("api").await;
    // Batches would wait a minute: only the shutdown flush sends them.
    let yaml = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "tracing: {{ sample_rate: 1.0, otlp: {{ endpoint: \"{}\", flush_interval: 1m }} }}",
            collector.endpoint()
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .build();
    let proxy = TestProxy::start(&yaml).await;
    let mut c = H1::connect(proxy.addr()).await;
    for _ in 0..3 {
        assert_eq!(c.get("api", "/").await.status, StatusCode::OK);
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        collector.spans().is_empty(),
        "nothing sent before the flush"
    );
    proxy.shutdown().await;
    assert_eq!(collector.spans().len(), 3);
}
