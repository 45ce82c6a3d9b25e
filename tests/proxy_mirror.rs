//! Traffic mirroring end to end over real sockets: copies reach the mirror
//! target marked `x-almond-mirror: 1` (bodies kept for retry included) and
//! are counted under `direction="mirror"`; a mirror target that hangs,
//! fails (500) or is down never changes the real responses nor holds them
//! up, and copies beyond `max_in_flight` (or with a body not kept) are
//! dropped and counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;

/// Service `web` on backend `real` (subset v1, split to it) with a
/// subset `shadow` at `shadow`, mirrored with `mirror` (a flow map);
/// `retries` a flow map for `retries`.
async fn mirrored(real: &Backend, shadow: SocketAddr, mirror: &str, retries: &str) -> TestProxy {
    ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .endpoint(real.addr, "v1", 1)
                .endpoint(shadow, "shadow", 1)
                .split(&[("v1", 100)])
                .set("mirror", mirror)
                .set("retries", retries)
                // A down mirror endpoint must not be ejected into the
                // real traffic's way: the split never sends there anyway.
                .timeouts("200ms", "5s"),
        )
        .start()
        .await
}

async fn mirror_metric(proxy: &TestProxy, labels: &[(&str, &str)]) -> f64 {
    let text = proxy.admin_get("/metrics").await.text();
    let mut all = vec![("direction", "mirror"), ("service", "web")];
    all.extend_from_slice(labels);
    metric(&text, "almond_requests_total", &all)
}

async fn dropped(proxy: &TestProxy, reason: &str) -> f64 {
    let text = proxy.admin_get("/metrics").await.text();
    metric(
        &text,
        "almond_mirror_dropped_total",
        &[("service", "web"), ("reason", reason)],
    )
}

/// Sends `n` requests one after another on one connection, all answered
/// within `within`'s limit (30 s). Every real answer must be 200 from
/// `real`.
async fn real_traffic(proxy: &TestProxy, n: usize) {
    let mut client = H1::connect(proxy.addr()).await;
    within("the real requests answered", async {
        for i in 0..n {
            let req = Request::post(format!("/orders/{i}"))
                .header("host", "web")
                .body(full(format!("order {i}")))
                .unwrap();
            let reply = client.request(req).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.backend(), "real");
        }
    })
    .await;
}

#[tokio::test]
async fn copies_arrive_marked_with_their_bodies_and_are_counted_as_mirror() {
    let real = Backend::start("real").await;
    let shadow = Backend::builder("shadow").keep_bodies().start().await;
    let proxy = mirrored(&real, shadow.addr, "{ subset: shadow, percent: 100 }", "{}").await;
    real_traffic(&proxy, 20).await;
    eventually("20 copies arrive", || async { shadow.bodies().len() == 20 }).await;
    let seen = shadow.seen();
    assert!(seen.iter().all(|s| s.headers["x-almond-mirror"] == "1"));
    assert!(real
        .seen()
        .iter()
        .all(|s| s.headers.get("x-almond-mirror").is_none()));
    let mut bodies: Vec<String> = (shadow.bodies().iter())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    bodies.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("order {i}")).collect();
    want.sort();
    assert_eq!(bodies, want);
    assert!(seen
        .iter()
        .all(|s| s.method == "POST" && s.path.starts_with("/orders/")));
    eventually("the copies are counted", || async {
        mirror_metric(&proxy, &[("subset", "shadow"), ("code_class", "2xx")]).await == 20.0
    })
    .await;
    // The real traffic is counted as before, under outbound, and only once.
    let text = proxy.admin_get("/metrics").await.text();
    let outbound = [("direction", "outbound"), ("service", "web")];
    assert_eq!(metric(&text, "almond_requests_total", &outbound), 20.0);
}

#[tokio::test]
async fn a_share_of_requests_is_copied() {
    let real = Backend::start("real").await;
    let shadow = Backend::start("shadow").await;
    let proxy = mirrored(&real, shadow.addr, "{ subset: shadow, percent: 25 }", "{}").await;
    const N: usize = 400;
    real_traffic(&proxy, N).await;
    // Binomial(400, 0.25): mean 100, sigma ~ 8.7; a 5-sigma band.
    eventually("copies settle", || async {
        mirror_metric(&proxy, &[]).await == shadow.count() as f64
    })
    .await;
    let copies = shadow.count() as f64;
    assert!(
        (copies - 100.0).abs() <= 5.0 * 8.66,
        "{copies} copies of {N}"
    );
}

#[tokio::test]
async fn a_hanging_mirror_never_holds_real_requests_and_excess_copies_are_dropped() {
    let real = Backend::start("real").await;
    // Answers after ten minutes: each copy ends at the service's request
    // timeout (5 s) instead.
    let shadow = Backend::builder("shadow")
        .delay(Duration::from_secs(600))
        .start()
        .await;
    let proxy = mirrored(
        &real,
        shadow.addr,
        "{ subset: shadow, percent: 100, max_in_flight: 5 }",
        "{}",
    )
    .await;
    // Real requests waiting on their copies (5 s each) would take 150 s.
    real_traffic(&proxy, 30).await;
    // 5 copies out, still waiting, the other 25 dropped and counted.
    assert_eq!(dropped(&proxy, "full").await, 25.0);
    eventually("the 5 copies arrive", || async { shadow.count() == 5 }).await;
    eventually("and are counted once timed out", || async {
        mirror_metric(&proxy, &[]).await == 5.0
    })
    .await;
    // Once they are over, copies flow again.
    real_traffic(&proxy, 1).await;
    eventually("a new copy", || async { shadow.count() == 6 }).await;
}

#[tokio::test]
async fn a_failing_or_down_mirror_changes_nothing_for_real_requests() {
    // Failing: every copy answered 500.
    let real = Backend::start("real").await;
    let failing = Backend::builder("shadow").status(500).start().await;
    let proxy = mirrored(
        &real,
        failing.addr,
        "{ subset: shadow, percent: 100 }",
        "{}",
    )
    .await;
    real_traffic(&proxy, 20).await;
    eventually("20 failed copies counted", || async {
        mirror_metric(&proxy, &[("code_class", "5xx")]).await == 20.0
    })
    .await;
    let text = proxy.admin_get("/metrics").await.text();
    let real_5xx = [("direction", "outbound"), ("code_class", "5xx")];
    assert_eq!(metric(&text, "almond_requests_total", &real_5xx), 0.0);
    drop(proxy);

    // Down: nothing listens.
    let down = closed_port().await;
    let proxy = mirrored(&real, down, "{ subset: shadow, percent: 100 }", "{}").await;
    real_traffic(&proxy, 20).await;
    eventually("20 copies counted as errors", || async {
        mirror_metric(&proxy, &[("code_class", "error")]).await == 20.0
    })
    .await;
}

#[tokio::test]
async fn bodies_not_kept_for_retry_are_not_copied_and_are_counted() {
    let real = Backend::start("real").await;
    let shadow = Backend::start("shadow").await;
    let proxy = mirrored(
        &real,
        shadow.addr,
        "{ subset: shadow, percent: 100 }",
        "{ max_body_bytes: 4 }",
    )
    .await;
    // "order N" is longer than 4 bytes: streamed, not kept, not copied.
    real_traffic(&proxy, 3).await;
    assert_eq!(dropped(&proxy, "body").await, 3.0);
    // A GET without a body is copied.
    let reply = get_h1(proxy.addr(), "web", "/").await;
    assert_eq!(reply.backend(), "real");
    eventually("the GET is copied", || async { shadow.count() == 1 }).await;
}

#[tokio::test]
async fn a_mirror_naming_nothing_is_refused() {
    let yaml = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .endpoint("127.0.0.1:1".parse().unwrap(), "v1", 1)
                .set("mirror", "{ service: nope, percent: 150 }"),
        )
        .build();
    let err = almond_config::load_proxy(&yaml, "t.yaml").unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"services.web.mirror.percent"), "{err}");
    assert!(paths.contains(&"services.web.mirror.service"), "{err}");
}

#[tokio::test]
async fn copies_can_go_to_another_service_counted_there() {
    let real = Backend::start("real").await;
    let other = Backend::start("other").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .at(real.addr)
                .set("mirror", "{ service: shadow-web, percent: 100 }"),
        )
        .service(ServiceYaml::new("shadow-web").endpoint(other.addr, "v9", 1))
        .start()
        .await;
    real_traffic(&proxy, 5).await;
    eventually("5 copies at the other service", || async {
        other.count() == 5
    })
    .await;
    assert_eq!(other.last().headers["x-almond-mirror"], "1");
    eventually("counted under the other service", || async {
        let text = proxy.admin_get("/metrics").await.text();
        let labels = [
            ("direction", "mirror"),
            ("service", "shadow-web"),
            ("subset", "v9"),
        ];
        metric(&text, "almond_requests_total", &labels) == 5.0
    })
    .await;
}

/// Copies waiting for a connection to a mirror that cannot be reached
/// hold the mirror's own places, not the service's `max_pending`: real
/// requests beside them, which need new connections too, are all
/// answered (5 of 6 got a 503 when the copies took the service's places).
#[tokio::test]
async fn copies_waiting_on_an_unreachable_mirror_take_no_place_of_real_requests() {
    let (dead, _queued, _listener) = unreachable().await;
    let real = Backend::start("v1").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .endpoint(real.addr, "v1", 1)
                .endpoint(dead, "shadow", 1)
                .split(&[("v1", 100)])
                .set("mirror", "{ subset: shadow, percent: 100 }")
                .set("circuit_breaker", "{ max_pending: 3 }")
                .timeouts("3s", "5s"),
        )
        .start()
        .await;
    // Four copies now wait on the unreachable mirror for 3 s.
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..4 {
        assert_eq!(client.get("web", "/").await.status, StatusCode::OK);
    }
    // Real requests two at a time: one of each pair needs a new
    // connection to v1, and a place to wait for it.
    let addr = proxy.addr();
    for _ in 0..3 {
        let replies = futures_util::future::join_all(
            (0..2).map(|_| async move { H1::connect(addr).await.get("web", "/").await }),
        )
        .await;
        for reply in replies {
            let why = reply.header("x-almond-error").map(str::to_owned);
            assert_eq!(reply.status, StatusCode::OK, "{why:?}");
        }
    }
}

/// A copy's mark reaches a shadow service behind its own almond sidecar
/// (an inbound listener, which removes client-sent `x-almond-*` headers):
/// the service can tell a copy from a real request there too. The real
/// request carries none.
#[tokio::test]
async fn the_mark_reaches_a_shadow_behind_an_inbound_listener() {
    let real = Backend::start("real").await;
    let shadow = Backend::start("shadow").await;
    let sidecar = ProxyYaml::new()
        .listener("{ bind: \"127.0.0.1:0\", service: web, direction: inbound }")
        .service(ServiceYaml::new("web").at(shadow.addr))
        .start()
        .await;
    let proxy = mirrored(
        &real,
        sidecar.addr(),
        "{ subset: shadow, percent: 100 }",
        "{}",
    )
    .await;
    real_traffic(&proxy, 3).await;
    eventually("3 copies arrive", || async { shadow.count() == 3 }).await;
    assert!(shadow
        .seen()
        .iter()
        .all(|s| s.headers.get("x-almond-mirror").is_some_and(|v| v == "1")));
    assert!(real
        .seen()
        .iter()
        .all(|s| s.headers.get("x-almond-mirror").is_none()));
}

/// A mirrored server-streaming gRPC call whose answer keeps flowing for
/// longer than `body_idle` (a message every 200 ms for 1.6 s, idle 1 s)
/// is drained to its end and counted by its status, OK: `body_idle` is
/// the most a copy's answer may stay idle, as for the real call, not its
/// whole length (it was counted `grpc_status="INTERNAL"`, a failed shadow).
#[tokio::test]
async fn a_long_streaming_copy_is_judged_by_its_status() {
    let stream = |_req: http::Request<h2::RecvStream>,
                  mut respond: h2::server::SendResponse<bytes::Bytes>| async move {
        let head = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let Ok(mut send) = respond.send_response(head, false) else {
            return;
        };
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if send
                .send_data(bytes::Bytes::from_static(b"\0\0\0\0\x01m"), false)
                .is_err()
            {
                return;
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    };
    let real = h2_upstream(stream).await;
    let shadow = h2_upstream(stream).await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .http2()
                .set("timeouts", "{ body_idle: 1s }")
                .endpoint(real, "v1", 1)
                .endpoint(shadow, "shadow", 1)
                .split(&[("v1", 100)])
                .set("mirror", "{ subset: shadow, percent: 100 }"),
        )
        .start()
        .await;
    let mut client = H2::connect(proxy.addr()).await;
    let req = Request::post("http://web/pkg.Svc/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\0\0\0\0\0"[..]))
        .unwrap();
    let reply = client.request(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    let grpc = |status: &'static str| {
        let proxy = &proxy;
        async move {
            let text = proxy.admin_get("/metrics").await.text();
            metric(
                &text,
                "almond_grpc_responses_total",
                &[
                    ("direction", "mirror"),
                    ("service", "web"),
                    ("grpc_status", status),
                ],
            )
        }
    };
    eventually("the copy is counted OK", || async {
        grpc("OK").await == 1.0
    })
    .await;
    assert_eq!(grpc("INTERNAL").await, 0.0);
}
