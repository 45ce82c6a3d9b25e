//! Observability end to end over real sockets: request IDs generated and
//! preserved, W3C trace context continued across two proxies, access log
//! lines and their rate limit, and the runtime log level.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A `GET` to `host` with extra headers.
fn get_with(host: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = h1_get(host, path);
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// The parts of a `traceparent`: (version, trace ID, parent ID, flags).
fn traceparent(value: &str) -> (String, String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    assert_eq!(value.len(), 55, "traceparent {value:?}");
    (
        parts[0].into(),
        parts[1].into(),
        parts[2].into(),
        parts[3].into(),
    )
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn request_ids_are_generated_kept_and_returned_even_on_errors() {
    let backend = Backend::start("api").await;
    let dead = closed_port().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("api").at(backend.addr))
        .service(ServiceYaml::new("dead").at(dead))
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;

    // Absent: generated (128 random bits in hex), sent up, returned.
    let a = c.get("api", "/").await;
    assert_eq!(a.status, StatusCode::OK);
    let id_a = a.header("x-request-id").unwrap().to_owned();
    assert!(is_hex(&id_a, 32), "generated id {id_a:?}");
    assert_eq!(backend.last().headers["x-request-id"], id_a.as_str());
    let b = c.get("api", "/").await;
    assert_ne!(b.header("x-request-id").unwrap(), id_a, "ids are unique");

    // Present: kept as is, both ways.
    let kept = c
        .request(get_with(
            "api",
            "/",
            &[("x-request-id", "client-chosen-42")],
        ))
        .await;
    assert_eq!(kept.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(backend.last().headers["x-request-id"], "client-chosen-42");

    // Proxy-made answers carry it too: no endpoint answers, unknown service.
    let failed = c
        .request(get_with("dead", "/", &[("x-request-id", "failing-1")]))
        .await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(failed.header("x-request-id"), Some("failing-1"));
    let unknown = c.get("nosuch", "/").await;
    assert!(unknown.status.is_client_error() || unknown.status.is_server_error());
    assert!(is_hex(unknown.header("x-request-id").unwrap(), 32));
}

#[tokio::test]
async fn trace_context_is_continued_across_two_proxies() {
    let backend = Backend::start("api").await;
    // B: in front of the backend; A: in front of B.
    let b = ProxyYaml::new()
        .bound_to("api")
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    let a = ProxyYaml::new()
        .bound_to("api")
        .service(ServiceYaml::new("api").at(b.addr()))
        .start()
        .await;

    let sent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let reply = H1::connect(a.addr())
        .await
        .request(get_with(
            "api",
            "/traced",
            &[
                ("traceparent", &sent),
                ("tracestate", "vendor=opaque"),
                ("x-request-id", "end-to-end-1"),
            ],
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-request-id"), Some("end-to-end-1"));

    let seen = backend.last();
    let got = seen.headers["traceparent"].to_str().unwrap();
    let (version, trace, parent, flags) = traceparent(got);
    assert_eq!(version, "00");
    assert_eq!(trace, TRACE_ID, "the client's trace goes on");
    assert!(is_hex(&parent, 16) && parent != CLIENT_SPAN && parent != "0".repeat(16));
    assert_eq!(flags, "01", "sampled stays sampled");
    assert_eq!(seen.headers["tracestate"], "vendor=opaque");
    assert_eq!(seen.headers["x-request-id"], "end-to-end-1");

    // Two requests, two different hops: the span ID is new each time.
    H1::connect(a.addr())
        .await
        .request(get_with("api", "/traced", &[("traceparent", &sent)]))
        .await;
    let again = backend.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(traceparent(&again).2, parent);
}

#[tokio::test]
async fn traces_are_started_and_head_sampled_when_there_is_no_valid_parent() {
    let backend = Backend::start("api").await;
    let never = ProxyYaml::new()
        .bound_to("api")
        .top("tracing: { sample_rate: 0.0 }")
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    let always = ProxyYaml::new()
        .bound_to("api")
        .top("tracing: { sample_rate: 1.0 }")
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;

    // No parent: a new trace, sampled by the rate.
    get_h1(never.addr(), "api", "/").await;
    let (_, trace_a, _, flags) =
        traceparent(backend.last().headers["traceparent"].to_str().unwrap());
    assert!(is_hex(&trace_a, 32) && trace_a != "0".repeat(32));
    assert_eq!(flags, "00");
    get_h1(always.addr(), "api", "/").await;
    let (_, trace_b, _, flags) =
        traceparent(backend.last().headers["traceparent"].to_str().unwrap());
    assert_eq!(flags, "01");
    assert_ne!(trace_a, trace_b);

    // A sampled parent stays sampled whatever the rate; an unsampled one
    // stays unsampled.
    for flags in ["01", "00"] {
        let sent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-{flags}");
        H1::connect(never.addr())
            .await
            .request(get_with("api", "/", &[("traceparent", &sent)]))
            .await;
        let got = backend.last().headers["traceparent"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(traceparent(&got).1, TRACE_ID);
        assert_eq!(traceparent(&got).3, flags);
    }

    // An invalid parent starts a new trace, and its tracestate is dropped.
    H1::connect(always.addr())
        .await
        .request(get_with(
            "api",
            "/",
            &[
                ("traceparent", "00-not-a-valid-header"),
                ("tracestate", "vendor=stale"),
            ],
        ))
        .await;
    let seen = backend.last();
    let (_, trace, _, _) = traceparent(seen.headers["traceparent"].to_str().unwrap());
    assert!(is_hex(&trace, 32));
    assert!(seen.headers.get("tracestate").is_none());
}

/// Reads the JSON lines of an access log file.
fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn access_log_lines_are_json_with_the_documented_fields() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ format: json, path: \"{}\" }}",
            path.display()
        ))
        .service(ServiceYaml::new("api").endpoint(backend.addr, "v2", 1))
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;
    let sent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let ok = c
        .request(get_with(
            "api",
            "/orders/7?x=1",
            &[("x-request-id", "logged-1"), ("traceparent", &sent)],
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let missing = c.get("nosuch", "/x").await;

    eventually("two access log lines", || async {
        log_lines(&path).len() == 2
    })
    .await;
    let lines = log_lines(&path);
    let line = &lines[0];
    // Every documented field, in the documented order, `time` first.
    let documented = [
        "time",
        "request_id",
        "trace_id",
        "sampled",
        "direction",
        "method",
        "service",
        "path",
        "subset",
        "endpoint",
        "status",
        "code_class",
        "duration_ms",
        "retries",
        "bytes",
    ];
    for field in documented {
        assert!(line.get(field).is_some(), "no {field} in {line}");
    }
    let raw = std::fs::read_to_string(&path).unwrap();
    let first = raw.lines().next().unwrap();
    let keys: Vec<&str> = first
        .trim_matches(['{', '}'])
        .split(",\"")
        .filter_map(|kv| kv.trim_start_matches('"').split_once("\":").map(|(k, _)| k))
        .collect();
    assert_eq!(keys, documented, "{first}");
    assert_eq!(line["request_id"], "logged-1");
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(line["sampled"], true);
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["service"], "api");
    assert_eq!(line["path"], "/orders/7");
    assert_eq!(line["subset"], "v2");
    assert_eq!(line["endpoint"], backend.addr.to_string());
    assert_eq!(line["status"], 200);
    assert_eq!(line["code_class"], "2xx");
    assert_eq!(line["retries"], 0);
    // The upstream's Content-Length, read also when its head was passed
    // through to the client without a map.
    assert_eq!(line["bytes"], ok.body.len());
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    let time = line["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T');

    // An unroutable request is logged too, without a service.
    let other = &lines[1];
    assert_eq!(other["status"], missing.status.as_u16());
    assert_eq!(other["request_id"], missing.header("x-request-id").unwrap());
    assert_eq!(
        other["code_class"], "4xx",
        "the proxy's 404: the client's doing"
    );
    assert!(other.get("service").is_none());
    // The proxy's own answer has its length logged, as it went out.
    assert_eq!(other["bytes"], missing.body.len(), "{other}");
    assert!(!missing.body.is_empty());
}

/// A request answered before routing (here a `CONNECT`, 501) is logged
/// with its listener's direction: an inbound listener's said `outbound`.
#[tokio::test]
async fn answers_before_routing_carry_their_listener_s_direction() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = ProxyYaml::new()
        .listener("{ bind: 127.0.0.1:0, service: api, direction: inbound }")
        .top(&format!(
            "access_log: {{ format: json, path: \"{}\" }}",
            path.display()
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    let answer = raw(
        proxy.listeners[0],
        b"CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    eventually("one access log line", || async {
        log_lines(&path).len() == 1
    })
    .await;
    let line = &log_lines(&path)[0];
    assert_eq!(line["status"], 501, "{line}");
    assert_eq!(line["direction"], "inbound", "{line}");
}

#[tokio::test]
async fn access_log_text_format_is_key_value() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ format: text, path: \"{}\" }}",
            path.display()
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    get_h1(proxy.addr(), "api", "/a").await;
    eventually("a text line", || async {
        std::fs::read_to_string(&path).is_ok_and(|t| t.ends_with('\n'))
    })
    .await;
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().next().unwrap();
    assert!(line.starts_with("time="), "{line}");
    for part in [
        "method=GET",
        "service=api",
        "path=/a",
        "status=200",
        "subset=v1",
    ] {
        assert!(line.split(' ').any(|p| p == part), "no {part} in {line}");
    }
}

#[tokio::test]
async fn access_log_rate_limit_is_respected_and_counted() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ path: \"{}\", max_per_second: 5 }}",
            path.display()
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    let started = tokio::time::Instant::now();
    let mut c = H1::connect(proxy.addr()).await;
    const N: usize = 40;
    for _ in 0..N {
        assert_eq!(c.get("api", "/").await.status, StatusCode::OK);
    }
    let seconds = started.elapsed().as_secs() as usize;
    let limited = || async {
        let text = proxy.admin_get("/metrics").await.text();
        metric(
            &text,
            "almond_access_log_dropped_total",
            &[("reason", "rate_limit")],
        ) as usize
    };
    let dropped = limited().await;
    eventually("every admitted line written", || async {
        log_lines(&path).len() + dropped == N
    })
    .await;
    let written = log_lines(&path).len();
    assert!(written >= 5, "at least one second's worth: {written}");
    assert!(
        written <= 5 * (seconds + 2),
        "{written} lines in {seconds}s at 5/s"
    );
    let queue_full = metric(
        &proxy.admin_get("/metrics").await.text(),
        "almond_access_log_dropped_total",
        &[("reason", "queue_full")],
    );
    assert_eq!(queue_full, 0.0);
}

#[tokio::test]
async fn the_log_level_changes_at_runtime_through_the_admin_listener() {
    let dead = closed_port().await;
    let yaml = ProxyYaml::new()
        .bound_to("dead")
        .service(ServiceYaml::new("dead").at(dead))
        .build();
    let proxy = ProxyProcess::start(&yaml).await;
    let put = |body: String| async move {
        let req = Request::put("/log-level")
            .header("host", proxy.admin.to_string())
            .body(full(body))
            .unwrap();
        H1::connect(proxy.admin).await.request(req).await
    };

    assert_eq!(
        admin_get(proxy.admin, "/log-level").await.text().trim(),
        "info"
    );
    // At info, a failed request logs nothing.
    get_h1(proxy.addr(), "dead", "/").await;
    assert!(!proxy.logs().contains("request failed"));

    let bad = put("almond_proxy=verbose".into()).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    assert_eq!(
        admin_get(proxy.admin, "/log-level").await.text().trim(),
        "info"
    );

    // Over the body's limit: 413, said as text, nothing changed.
    let huge = put(format!("info,{}=debug", "a".repeat(5000))).await;
    assert_eq!(
        huge.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        huge.text()
    );
    assert_eq!(
        huge.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        admin_get(proxy.admin, "/log-level").await.text().trim(),
        "info"
    );

    let ok = put("info,almond_proxy=debug".into()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let now = admin_get(proxy.admin, "/log-level").await.text();
    assert!(now.contains("almond_proxy=debug"), "{now}");
    let failed = get_h1(proxy.addr(), "dead", "/").await;
    eventually("a debug line after the change", || async {
        proxy.logs().contains("request failed")
    })
    .await;
    // The line carries the request's ID, to tie it to its access log line.
    let id = failed.header("x-request-id").unwrap();
    let logs = proxy.logs();
    let line = logs.lines().find(|l| l.contains("request failed")).unwrap();
    assert!(line.contains(id), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_access_log_drops_lines_and_never_slows_requests() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    // A pipe nobody reads: once its buffer (64 KiB) is full, the writer
    // is stuck in a write for good.
    let fifo = dir.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let _held = std::fs::File::open(fifo).unwrap();
            let _ = stop_rx.recv();
        })
    };
    let proxy = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ path: \"{}\", queue: 4, max_per_second: 1000000 }}",
            fifo.display()
        ))
        .service(ServiceYaml::new("api").at(backend.addr))
        .start()
        .await;
    // Long paths make long lines, so the pipe fills after a few dozen.
    let path = format!("/{}", "p".repeat(4000));
    let mut c = H1::connect(proxy.addr()).await;
    for _ in 0..300 {
        assert_eq!(c.get("api", &path).await.status, StatusCode::OK);
    }
    let text = proxy.admin_get("/metrics").await.text();
    let dropped = metric(
        &text,
        "almond_access_log_dropped_total",
        &[("reason", "queue_full")],
    );
    assert!(dropped > 0.0, "a stuck writer drops lines: {dropped}");
    let _ = stop_tx.send(());
    reader.join().unwrap();
}

#[tokio::test]
async fn an_http2_upstream_gets_the_request_id_and_trace_context_once() {
    let backend = Backend::start("api").await;
    let proxy = ProxyYaml::new()
        .bound_to("api")
        .service(ServiceYaml::new("api").at(backend.addr).http2())
        .start()
        .await;
    let mut c = H1::connect(proxy.addr()).await;

    // Made here: the ID and a new trace, in the HTTP/2 head, once each.
    let made = c.get("api", "/").await;
    assert_eq!(made.status, StatusCode::OK);
    let id = made.header("x-request-id").unwrap().to_owned();
    assert!(is_hex(&id, 32), "generated id {id:?}");
    let seen = backend.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    let ids: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, [id.as_str()]);
    let parents: Vec<_> = seen.headers.get_all("traceparent").iter().collect();
    assert_eq!(parents.len(), 1, "{parents:?}");
    let (version, trace, parent, _) = traceparent(parents[0].to_str().unwrap());
    assert_eq!(version, "00");
    assert!(is_hex(&trace, 32) && is_hex(&parent, 16));

    // The client's: its ID kept, its trace continued, neither twice.
    let sent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let kept = c
        .request(get_with(
            "api",
            "/",
            &[("x-request-id", "client-chosen-7"), ("traceparent", &sent)],
        ))
        .await;
    assert_eq!(kept.header("x-request-id"), Some("client-chosen-7"));
    let seen = backend.last();
    let ids: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["client-chosen-7"]);
    let parents: Vec<_> = seen.headers.get_all("traceparent").iter().collect();
    assert_eq!(parents.len(), 1, "{parents:?}");
    let (_, trace, parent, flags) = traceparent(parents[0].to_str().unwrap());
    assert_eq!(trace, TRACE_ID);
    assert!(parent != CLIENT_SPAN);
    assert_eq!(flags, "01");
}
