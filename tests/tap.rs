//! End to end: `almond tap`. The control plane on a file registry, a proxy
//! following it, backends, and the built `almond tap` command reading the
//! merged stream: filters (path, status, subset), header redaction, the
//! per-second cap with its drops counted, and refusals with a reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::process::Stdio;
use std::time::Duration;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// A control plane serving `web` (v1 answers 200, v2 answers 503) and a
/// proxy following it, once the control plane knows the proxy's admin.
async fn mesh() -> (Backend, Backend, TestControl, TestProxy, Registry) {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::builder("v2").status(503).start().await;
    let registry = Registry::new();
    registry.service("web", &[(v1.addr, "v1"), (v2.addr, "v2")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    eventually("the control plane knows the proxy's admin", || async {
        let proxies = control.get("/v1/proxies").await.json();
        proxies
            .as_object()
            .is_some_and(|all| all.values().any(|p| p["admin"] == proxy.admin.to_string()))
    })
    .await;
    (v1, v2, control, proxy, registry)
}

/// `GET path` for `web`, pinned to `subset`, with secrets in its headers.
fn request(path: &str, subset: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("host", "web")
        .header("x-almond-subset", subset)
        .header("authorization", "Bearer s3cret-token")
        .header("cookie", "session=s3cret-cookie")
        .header("x-shown", "plain")
        .header("cf-access-jwt-assertion", "eyJs3cret-jwt")
        .header("x-multi", "a")
        .header("x-multi", "b")
        // Its quotes double in JSON: a 100 KB line, were it shown whole.
        .header("x-pad", "\"".repeat(50_000))
        .body(empty())
        .unwrap()
}

/// Starts `almond tap ARGS` against `control`, output piped.
fn tap(control: &TestControl, args: &[&str]) -> tokio::process::Child {
    almond()
        .arg("tap")
        .args(args)
        .args(["--control", &control.url()])
        .env_remove("ALMOND_TOKEN")
        .env_remove("ALMOND_CONTROL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn tap_shows_only_what_the_filter_passes_with_secrets_redacted() {
    let (_v1, _v2, control, proxy, _registry) = mesh().await;
    let mut child = tap(
        &control,
        &[
            "web",
            "--path",
            "/api",
            "--status",
            "5xx",
            "--headers",
            "--count",
            "3",
            "-o",
            "json",
        ],
    );
    // Traffic until the tap has seen three events: matching requests (v2,
    // 503, /api), and others that each fail one filter.
    let mut client = H1::connect(proxy.addr()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        assert_eq!(client.request(request("/api/a", "v2")).await.status, 503);
        assert_eq!(client.request(request("/api/b", "v1")).await.status, 200);
        assert_eq!(client.request(request("/other", "v2")).await.status, 503);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tap saw fewer than 3 events in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert!(status.success(), "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    for e in &events {
        assert_eq!(e["path"], "/api/a", "{e}");
        assert_eq!(e["status"], 503, "{e}");
        assert_eq!(e["method"], "GET");
        assert_eq!(e["service"], "web");
        assert_eq!(e["subset"], "v2");
        assert_eq!(e["endpoint"], _v2.addr.to_string());
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0, "{e}");
        assert!(!e["request_id"].as_str().unwrap().is_empty());
        assert!(!e["proxy"].as_str().unwrap().is_empty());
        let headers = &e["headers"];
        assert_eq!(headers["authorization"], "<redacted>", "{e}");
        assert_eq!(headers["cookie"], "<redacted>", "{e}");
        assert_eq!(headers["x-shown"], "plain", "{e}");
        assert_eq!(headers["cf-access-jwt-assertion"], "<redacted>", "{e}");
        assert_eq!(headers["x-multi"], "a, b", "{e}");
        let pad = headers["x-pad"].as_str().unwrap();
        assert!(pad.len() < 2048 && pad.ends_with("..."), "{pad}");
        assert_eq!(e["direction"], "outbound", "{e}");
        // As the upstream gets them: with the proxy's request ID and trace.
        assert_eq!(headers["x-request-id"], e["request_id"], "{e}");
        assert_eq!(
            headers["traceparent"].as_str().map(str::len),
            Some(55),
            "{e}"
        );
    }
    assert!(!out.contains("s3cret"), "{out}");
    let sent = proxy_metric(&proxy, "almond_tap_events_total", &[]).await;
    assert!(sent >= 3.0, "almond_tap_events_total {sent}");

    // The tap's client is gone: the proxy drops its watcher (after at most
    // one heartbeat) and requests are no longer summarized.
    // Neither sent nor dropped: a watcher still there whose queue is full
    // counts its summaries as dropped.
    let offered = || async {
        let sent = proxy_metric(&proxy, "almond_tap_events_total", &[]).await;
        let dropped = proxy_metric(&proxy, "almond_tap_events_dropped_total", &[]).await;
        sent + dropped
    };
    eventually("the proxy stops summarizing", || async {
        let before = offered().await;
        let mut client = H1::connect(proxy.addr()).await;
        for _ in 0..3 {
            client.request(request("/api/a", "v2")).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        offered().await == before
    })
    .await;
}

#[tokio::test]
async fn tap_is_capped_per_second_and_drops_are_counted() {
    let (_v1, _v2, control, proxy, _registry) = mesh().await;
    let mut child = tap(&control, &["web", "--rate", "2", "-o", "json"]);
    let mut client = H1::connect(proxy.addr()).await;
    // Wait for the watcher: the first summaries arrive.
    eventually("the tap sees requests", || async {
        let mut client = H1::connect(proxy.addr()).await;
        client.request(request("/warm", "v1")).await;
        proxy_metric(&proxy, "almond_tap_events_total", &[]).await > 0.0
    })
    .await;
    let start = Instant::now();
    let sent_before = proxy_metric(&proxy, "almond_tap_events_total", &[]).await;
    let dropped_before = proxy_metric(&proxy, "almond_tap_events_dropped_total", &[]).await;
    for _ in 0..100 {
        assert_eq!(client.request(request("/burst", "v1")).await.status, 200);
    }
    let elapsed = start.elapsed();
    let sent = proxy_metric(&proxy, "almond_tap_events_total", &[]).await - sent_before;
    let dropped =
        proxy_metric(&proxy, "almond_tap_events_dropped_total", &[]).await - dropped_before;
    // Two a second: the 100 requests spanned at most this many seconds.
    let seconds = elapsed.as_secs_f64().ceil() + 1.0;
    assert!(sent <= 2.0 * seconds, "{sent} sent in {elapsed:?}");
    assert_eq!(sent + dropped, 100.0, "sent {sent}, dropped {dropped}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn bad_taps_are_refused_with_the_reason() {
    let (_v1, _v2, control, _proxy, _registry) = mesh().await;
    let (code, _, err) =
        run_ops(&["tap", "web", "--status", "7xx", "--control", &control.url()]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("status \"7xx\""), "{err}");
    let (code, _, err) = run_ops(&["tap", "nosuch", "--control", &control.url()]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no service \"nosuch\"") && err.contains("404"),
        "{err}"
    );
    let reply = control.get("/v1/services/web/tap?colour=red").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.text().contains("unknown tap filter"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn a_tap_with_no_proxy_left_says_why_and_exits() {
    let (_v1, _v2, control, proxy, _registry) = mesh().await;
    let admin = proxy.admin;
    drop(proxy);
    eventually("the proxy's admin is closed", || async {
        tokio::net::TcpStream::connect(admin).await.is_err()
    })
    .await;
    // The control plane still lists the proxy (seen in the last 90 s): the
    // tap is opened, the proxy's stream cannot be, and the user is told.
    let (code, _, err) = run_ops(&["tap", "web", "--control", &control.url()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("proxy {admin}:")) && err.contains("onnect"),
        "{err}"
    );
    assert!(err.contains("no proxy's tap stream is open"), "{err}");
}

/// Taps open at once on one control plane are capped (each holds a
/// connection to every proxy: twenty taps on a large fleet would use up
/// the control plane's file descriptors): past the cap a new one gets 429
/// with the reason, and one that ends gives its place back.
#[tokio::test]
async fn taps_at_once_are_capped() {
    let (_v1, _v2, control, _proxy, _registry) = mesh().await;
    let open = || async {
        let req = Request::get("/v1/services/web/tap")
            .header("host", control.addr.to_string())
            .body(empty())
            .unwrap();
        H1::connect(control.addr).await.send(req).await
    };
    let mut taps = Vec::new();
    for _ in 0..8 {
        let tap = open().await;
        assert_eq!(tap.status(), StatusCode::OK);
        taps.push(tap);
    }
    let refused = open().await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let why = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&why).contains("8 taps are open"));
    drop(taps.pop());
    eventually("an ended tap gives its place back", || async {
        open().await.status() == StatusCode::OK
    })
    .await;
}
