//! End to end: resilience under fault injection. Real backends fail in the
//! ways production ones do (killed, answering 5xx, hanging, resetting,
//! slow) while a real client keeps sending; each test checks what a user
//! would notice -- statuses, what arrived at the backends, and the admin
//! `/metrics` and `/endpoints`.
//!
//! Times are short (ejections of 200 ms, per-try timeouts of 100 ms) and
//! conditions that need time to pass are polled with `eventually`; the
//! only timing assertions are "did not hang" and "came back far sooner
//! than the backend would have".

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The one subset every test service uses (`ServiceYaml::at`).
const SUBSET: &str = "v1";

/// The admin `/metrics` text.
async fn scrape(proxy: &TestProxy) -> String {
    proxy.admin_get("/metrics").await.text()
}

/// One metric of service `svc` (and subset `v1` where the metric has one),
/// summed over the series that match `extra`.
async fn svc_metric(proxy: &TestProxy, name: &str, svc: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("service", svc)];
    if name != "almond_retries_total" {
        labels.push(("subset", SUBSET));
    }
    labels.extend_from_slice(extra);
    metric(&scrape(proxy).await, name, &labels)
}

async fn ejections(proxy: &TestProxy, svc: &str) -> f64 {
    svc_metric(proxy, "almond_endpoint_ejections_total", svc, &[]).await
}

async fn endpoints_in(proxy: &TestProxy, svc: &str, state: &str) -> f64 {
    svc_metric(proxy, "almond_endpoints", svc, &[("state", state)]).await
}

async fn retries(proxy: &TestProxy, svc: &str) -> f64 {
    svc_metric(proxy, "almond_retries_total", svc, &[]).await
}

async fn upstream_errors(proxy: &TestProxy, svc: &str, kind: &str) -> f64 {
    svc_metric(
        proxy,
        "almond_upstream_errors_total",
        svc,
        &[("kind", kind)],
    )
    .await
}

/// An endpoint's `state` as the admin `/endpoints` page shows it.
async fn endpoint_state(proxy: &TestProxy, svc: &str, addr: SocketAddr) -> String {
    let page = proxy.admin_get("/endpoints").await.json();
    let subsets = page[svc]["subsets"].as_array().cloned().unwrap_or_default();
    subsets
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["addr"] == addr.to_string())
        .map(|e| e["state"].as_str().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("{addr} not in /endpoints of {svc}: {page}"))
}

/// What one request of [`load`] got.
struct Got {
    status: StatusCode,
    backend: String,
    error: Option<String>,
}

/// Steady load: `clients` concurrent keep-alive connections, each sending
/// `each` sequential `GET /` for `svc`.
async fn load(proxy: &TestProxy, svc: &str, clients: usize, each: usize) -> Vec<Got> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, svc) = (proxy.addr(), svc.to_owned());
            tokio::spawn(async move {
                let mut client = H1::connect(addr).await;
                let mut out = Vec::with_capacity(each);
                for _ in 0..each {
                    let reply = client.get(&svc, "/").await;
                    out.push(Got {
                        status: reply.status,
                        backend: reply.backend().to_owned(),
                        error: reply.header("x-almond-error").map(str::to_owned),
                    });
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within("load client", t).await.unwrap());
    }
    all
}

/// Asserts every request of a load got 200.
fn all_ok(got: &[Got], what: &str) {
    let failed: Vec<String> = got
        .iter()
        .filter(|g| g.status != StatusCode::OK)
        .map(|g| format!("{} {:?} from {}", g.status, g.error, g.backend))
        .collect();
    assert!(failed.is_empty(), "{what}: failed GETs: {failed:?}");
}

/// Counts at each backend, in order.
fn counts(backends: &[&Backend]) -> Vec<usize> {
    backends.iter().map(|b| b.count()).collect()
}

fn total(backends: &[&Backend]) -> usize {
    counts(backends).iter().sum()
}

// ---------------------------------------------------------------------------
// 1. An endpoint killed under load
// ---------------------------------------------------------------------------

#[tokio::test]
async fn killed_endpoint_under_load_fails_no_get_and_is_ejected() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut c = Backend::start("c").await;
    // Round robin keeps sending the dead endpoint its share until it is
    // ejected, so the failures in a row accrue at a known pace (P2C steers
    // away on its own: see the next test). The ejection outlasts the test,
    // so "afterwards" is observable; retries are the defaults.
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(a.addr)
                .at(b.addr)
                .at(c.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 5, base_ejection: 60s, max_ejection: 60s }",
                ),
        )
        .start()
        .await;

    // Warm up: everyone serves, and the proxy pools connections to c.
    let got = load(&proxy, "svc", 4, 15).await;
    all_ok(&got, "warm-up");
    assert!(c.count() > 0, "c served during warm-up");

    // Kill c (listener and pooled connections) while clients keep going.
    c.stop().await;
    let got = load(&proxy, "svc", 4, 30).await;
    all_ok(&got, "c killed");
    assert!(got.iter().all(|g| g.backend != "c"), "c is dead");

    // Retries kept every GET whole; c is ejected after its five failures.
    eventually("c ejected", || async {
        all_ok(&load(&proxy, "svc", 1, 1).await, "while ejecting");
        ejections(&proxy, "svc").await >= 1.0
    })
    .await;
    assert_eq!(endpoints_in(&proxy, "svc", "ejected").await, 1.0);
    assert_eq!(endpoints_in(&proxy, "svc", "healthy").await, 2.0);
    assert_eq!(endpoint_state(&proxy, "svc", c.addr).await, "ejected");
    assert_eq!(endpoint_state(&proxy, "svc", a.addr).await, "healthy");
    assert!(retries(&proxy, "svc").await > 0.0);
    assert_eq!(upstream_errors(&proxy, "svc", "connect").await, 0.0);

    // Afterwards nothing tries c: every request is one try at a or b.
    let retries_before = retries(&proxy, "svc").await;
    let live_before = total(&[&a, &b]);
    let got = load(&proxy, "svc", 4, 25).await;
    all_ok(&got, "after ejection");
    assert_eq!(retries(&proxy, "svc").await, retries_before, "no retries");
    assert_eq!(total(&[&a, &b]) - live_before, 100, "one try each");
    assert!(got.iter().any(|g| g.backend == "a") && got.iter().any(|g| g.backend == "b"));
    assert_eq!(ejections(&proxy, "svc").await, 1.0, "ejected once");
}

#[tokio::test]
async fn killed_endpoint_with_default_balancer_fails_no_get() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut c = Backend::start("c").await;
    // Everything default: P2C over peak EWMA, retries on connect/reset/503.
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("svc").at(a.addr).at(b.addr).at(c.addr))
        .start()
        .await;
    all_ok(&load(&proxy, "svc", 4, 15).await, "warm-up");
    c.stop().await;
    let got = load(&proxy, "svc", 4, 30).await;
    all_ok(&got, "c killed");
    assert!(got.iter().all(|g| g.backend != "c"));
    assert_eq!(upstream_errors(&proxy, "svc", "connect").await, 0.0);
    assert_eq!(upstream_errors(&proxy, "svc", "reset").await, 0.0);
}

#[tokio::test]
async fn killed_endpoint_restarted_is_probed_back_in() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut c = Backend::start("c").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(a.addr)
                .at(b.addr)
                .at(c.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 3, base_ejection: 200ms, max_ejection: 1s }",
                ),
        )
        .start()
        .await;
    all_ok(&load(&proxy, "svc", 2, 10).await, "warm-up");
    c.stop().await;
    eventually("c ejected", || async {
        all_ok(&load(&proxy, "svc", 1, 1).await, "while ejecting");
        ejections(&proxy, "svc").await >= 1.0
    })
    .await;

    // Back on the same port: the next probe after its ejection finds it.
    c.restart().await;
    let before = c.count();
    eventually("c back in service", || async {
        all_ok(&load(&proxy, "svc", 1, 1).await, "while probing");
        endpoints_in(&proxy, "svc", "healthy").await == 3.0
    })
    .await;
    let got = load(&proxy, "svc", 1, 30).await;
    all_ok(&got, "c restarted");
    assert!(
        c.count() - before >= 5,
        "c got {} of 30",
        c.count() - before
    );
}

// ---------------------------------------------------------------------------
// 2. An endpoint answering 500: ejected, probed, back
// ---------------------------------------------------------------------------

#[tokio::test]
async fn endpoint_answering_500_is_ejected_then_probed_back_in() {
    let good1 = Backend::start("good1").await;
    let good2 = Backend::start("good2").await;
    let bad = Backend::builder("bad").status(500).start().await;
    // failure_on is the default (connect, timeout, reset, 5xx); a GET that
    // got a 500 is retried on another endpoint, so clients never see it.
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(good1.addr)
                .at(good2.addr)
                .at(bad.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 3, base_ejection: 200ms, max_ejection: 1s }",
                )
                .set("retries", "{ on: [connect, reset, \"500\"] }"),
        )
        .start()
        .await;

    // Under load, bad fails three times in a row and is ejected.
    all_ok(&load(&proxy, "svc", 3, 10).await, "bad answering 500");
    eventually("bad ejected", || async {
        all_ok(&load(&proxy, "svc", 1, 1).await, "while ejecting");
        ejections(&proxy, "svc").await >= 1.0
    })
    .await;
    assert!(bad.count() >= 3);
    assert!(retries(&proxy, "svc").await >= 3.0);

    // While out, bad sees only probes: one real request each time its
    // ejection is up, and each failed probe ejects it again (for longer).
    // Keep going until at least one probe has failed.
    let (bad_before, ejections_before) = (bad.count(), ejections(&proxy, "svc").await);
    let good_before = total(&[&good1, &good2]);
    let mut client = H1::connect(proxy.addr()).await;
    let sent = within("a failed probe", async {
        let mut sent = 0;
        while sent < 60 || ejections(&proxy, "svc").await == ejections_before {
            let reply = client.get("svc", "/").await;
            assert_eq!(reply.status, StatusCode::OK, "bad ejected");
            sent += 1;
        }
        sent
    })
    .await;
    let probes = bad.count() - bad_before;
    let reejections = (ejections(&proxy, "svc").await - ejections_before) as usize;
    assert!(probes >= 1);
    assert_eq!(probes, reejections, "every request bad saw was a probe");
    assert!(
        probes * 3 < sent,
        "bad got {probes} of {sent}: not its share"
    );
    assert_eq!(total(&[&good1, &good2]) - good_before, sent);

    // It recovers: once its ejection is up, a real request probes it back.
    // (Until one does, its ejection may be up, counted healthy in the
    // gauge, while `/endpoints` says `probing`.)
    bad.set_status(200);
    eventually("bad back in service", || async {
        all_ok(&load(&proxy, "svc", 1, 1).await, "while probing");
        endpoints_in(&proxy, "svc", "ejected").await == 0.0
            && endpoint_state(&proxy, "svc", bad.addr).await == "healthy"
    })
    .await;
    assert_eq!(endpoints_in(&proxy, "svc", "healthy").await, 3.0);
    assert_eq!(endpoint_state(&proxy, "svc", bad.addr).await, "healthy");
    // And it gets its share of traffic again.
    let bad_before = bad.count();
    let got = load(&proxy, "svc", 1, 30).await;
    all_ok(&got, "bad recovered");
    assert!(
        bad.count() - bad_before >= 5,
        "bad got {} of 30",
        bad.count() - bad_before
    );
    assert!(got.iter().any(|g| g.backend == "bad"));
}

/// A pinned `GET path` on a fresh connection.
async fn get_pinned(addr: SocketAddr, subset: &str, path: &str) -> Reply {
    let req = Request::get(path)
        .header("host", "svc")
        .header("x-almond-subset", subset)
        .body(empty())
        .unwrap();
    H1::connect(addr).await.request(req).await
}

/// An HTTP/1.1 upstream that answers `/status/500` with a 500 at once
/// and holds every other request until `release` gets a permit; it counts
/// the requests that reach it.
async fn gated_upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<tokio::sync::Semaphore>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (count, gate) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (count, gate) = (count.clone(), gate.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let answer: &[u8] = if head.starts_with(b"GET /status/500 ") {
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    let Ok(permit) = gate.acquire().await else {
                        return;
                    };
                    permit.forget();
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                };
                let _ = tcp.write_all(answer).await;
            });
        }
    });
    (addr, arrived, release)
}

#[tokio::test]
async fn a_success_sent_before_the_ejection_does_not_end_it() {
    // `flaky` answers `/status/500` with a 500 at once and holds every
    // other request until released. It is alone in subset v2, so a pinned
    // request always goes to it.
    let good1 = Backend::start("good1").await;
    let good2 = Backend::start("good2").await;
    let (flaky, arrived, release) = gated_upstream().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(good1.addr)
                .at(good2.addr)
                .endpoint(flaky, "v2", 1)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 3, base_ejection: 60s, max_ejection: 60s }",
                )
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;
    let addr = proxy.addr();
    // A request sent before the ejection, held at flaky: it will succeed
    // after it.
    let straggler = tokio::spawn(async move { get_pinned(addr, "v2", "/").await });
    eventually("the straggler at flaky", || async {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get_pinned(addr, "v2", "/status/500").await.status, 500);
    }
    let ejected_v2 = metric(
        &scrape(&proxy).await,
        "almond_endpoints",
        &[("service", "svc"), ("subset", "v2"), ("state", "ejected")],
    );
    assert_eq!(ejected_v2, 1.0, "three failures in a row eject flaky");
    release.add_permits(1);
    assert_eq!(within("straggler", straggler).await.unwrap().status, 200);

    // The straggler proves nothing about flaky now: it stays ejected for
    // its base_ejection, and unpinned traffic keeps away from it.
    assert_eq!(endpoint_state(&proxy, "svc", flaky).await, "ejected");
    let before = arrived.load(Ordering::SeqCst);
    let got = load(&proxy, "svc", 1, 30).await;
    all_ok(&got, "flaky ejected");
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        before,
        "flaky got traffic while ejected"
    );
}

#[tokio::test]
async fn ejection_and_return_are_logged_by_the_binary() {
    // The same story through `almond proxy`: what an operator reads.
    let good = Backend::start("good").await;
    let bad = Backend::builder("bad").status(500).start().await;
    let yaml = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(good.addr)
                .at(bad.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 2, base_ejection: 200ms, max_ejection: 1s }",
                )
                .set("retries", "{ on: [connect, reset, \"500\"] }"),
        )
        .build();
    let proxy = ProxyProcess::start(&yaml).await;
    let mut client = H1::connect(proxy.addr()).await;
    let gauge = |text: &str, state: &str| {
        metric(
            text,
            "almond_endpoints",
            &[("service", "svc"), ("subset", SUBSET), ("state", state)],
        )
    };
    let mut sent = 0;
    while !proxy.logs().contains("endpoint ejected") {
        assert_eq!(client.get("svc", "/").await.status, StatusCode::OK);
        sent += 1;
        assert!(sent < 200, "never ejected; logs:\n{}", proxy.logs());
    }
    bad.set_status(200);
    while !proxy.logs().contains("endpoint returned to service") {
        assert_eq!(client.get("svc", "/").await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent += 1;
        assert!(sent < 1000, "never returned; logs:\n{}", proxy.logs());
    }
    let text = admin_get(proxy.admin, "/metrics").await.text();
    assert_eq!(gauge(&text, "healthy"), 2.0, "{text}");
    assert_eq!(gauge(&text, "ejected"), 0.0);
    let logs = proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("endpoint ejected"))
        .unwrap();
    assert!(line.contains(&bad.addr.to_string()), "{line}");
    assert!(line.contains("WARN"), "{line}");
}

#[tokio::test]
async fn a_lone_endpoint_comes_back_after_its_ejection() {
    // A pool of one never skips its endpoint (nothing else to send to), so
    // no probe is ever claimed: its first success after the ejection is up
    // must bring it back, or it would show as ejected forever.
    let solo = Backend::builder("solo").status(500).start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .at(solo.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 2, base_ejection: 200ms, max_ejection: 200ms }",
                )
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    for _ in 0..2 {
        assert_eq!(client.get("svc", "/").await.status, 500);
    }
    assert_eq!(endpoints_in(&proxy, "svc", "ejected").await, 1.0);
    solo.set_status(200);
    // A success during the ejection does not end it; one after it does
    // (until then the endpoint is "probing", counted healthy).
    eventually("solo back in service", || async {
        get_h1(proxy.addr(), "svc", "/").await.status == StatusCode::OK
            && endpoint_state(&proxy, "svc", solo.addr).await == "healthy"
    })
    .await;
    assert_eq!(endpoints_in(&proxy, "svc", "healthy").await, 1.0);
    assert_eq!(endpoints_in(&proxy, "svc", "ejected").await, 0.0);
}

// ---------------------------------------------------------------------------
// 3. A hanging endpoint
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hanging_endpoint_costs_one_per_try_timeout_then_is_ejected() {
    let good1 = Backend::start("good1").await;
    let good2 = Backend::start("good2").await;
    let hang = Backend::builder("hang").hang().start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(good1.addr)
                .at(good2.addr)
                .at(hang.addr)
                .timeouts("1s", "20s")
                .set(
                    "retries",
                    "{ per_try_timeout: 100ms, on: [connect, reset, timeout, \"503\"] }",
                )
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 3, base_ejection: 60s, max_ejection: 60s }",
                ),
        )
        .start()
        .await;

    // Each GET that lands on the hanging endpoint gives up on it after the
    // per-try timeout and succeeds elsewhere: far inside the 20 s request
    // timeout the hang would otherwise cost.
    let bound = Duration::from_secs(5);
    let mut client = H1::connect(proxy.addr()).await;
    let mut sent = 0;
    while ejections(&proxy, "svc").await < 1.0 {
        let reply = tokio::time::timeout(bound, client.get("svc", "/"))
            .await
            .expect("a GET came back within a few per-try timeouts");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_ne!(reply.backend(), "hang");
        sent += 1;
        assert!(sent < 200, "hang never ejected");
    }
    eventually("the hanging endpoint saw its three tries", || async {
        hang.count() >= 3
    })
    .await;
    assert!(retries(&proxy, "svc").await >= 3.0);
    assert_eq!(endpoints_in(&proxy, "svc", "ejected").await, 1.0);
    assert_eq!(upstream_errors(&proxy, "svc", "timeout").await, 0.0);

    // Ejected: no more tries there, no more retries.
    let (hang_before, retries_before) = (hang.count(), retries(&proxy, "svc").await);
    for _ in 0..20 {
        let reply = tokio::time::timeout(bound, client.get("svc", "/"))
            .await
            .expect("no hang once ejected");
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(hang.count(), hang_before);
    assert_eq!(retries(&proxy, "svc").await, retries_before);
}

// ---------------------------------------------------------------------------
// 4. Every endpoint failing: retries stay within the budget
// ---------------------------------------------------------------------------

#[tokio::test]
async fn all_endpoints_failing_retries_stay_within_the_budget() {
    let bad: Vec<Backend> = vec![
        Backend::builder("bad1").status(503).start().await,
        Backend::builder("bad2").status(503).start().await,
        Backend::builder("bad3").status(503).start().await,
    ];
    let mut svc = ServiceYaml::new("svc").set(
        "retries",
        "{ attempts: 3, budget_percent: 20, min_per_second: 1, on: [\"503\"] }",
    );
    for b in &bad {
        svc = svc.at(b.addr);
    }
    let proxy = ProxyYaml::new().by_host().service(svc).start().await;
    let refs: Vec<&Backend> = bad.iter().collect();

    let start = Instant::now();
    let got = load(&proxy, "svc", 4, 50).await;
    let elapsed = start.elapsed();
    assert_eq!(got.len(), 200);
    for g in &got {
        // The backends' own 503, passed through, not one the proxy made.
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(g.error, None);
        assert!(g.backend.starts_with("bad"), "{}", g.backend);
    }

    // Without a budget, 3 retries each could send 800 requests. With it:
    // 20 % of 200 requests, plus the floor of 1/s over the 10 s window (a
    // further window's floor for every 10 s the load took).
    let arrived = total(&refs);
    let windows = elapsed.as_secs() / 10 + 1;
    let cap = 200 + 200 * 20 / 100 + 10 * windows as usize;
    assert!(
        arrived <= cap,
        "{arrived} requests reached the backends, cap {cap}"
    );
    assert!(
        arrived >= 210,
        "the floor alone allows 10 retries: {arrived}"
    );
    assert_eq!(retries(&proxy, "svc").await as usize, arrived - 200);
}

// ---------------------------------------------------------------------------
// 5. Concurrency limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn concurrency_limit_sheds_a_burst_fast_and_stays_responsive() {
    // A place frees only once the backend answers, 2 s on: a shed answer
    // sooner than that did not wait for one, however slow the machine.
    const DELAY: Duration = Duration::from_secs(2);
    let slow = Backend::builder("slow").delay(DELAY).start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("svc").at(slow.addr).max_requests(5))
        .start()
        .await;

    // Fifty clients, connected first, then all sending at once.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(H1::connect(proxy.addr()).await);
    }
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                let start = Instant::now();
                let reply = client.get("svc", "/").await;
                (reply, start.elapsed())
            })
        })
        .collect();
    let (mut served, mut shed) = (0, 0);
    for t in tasks {
        let (reply, took) = within("burst", t).await.unwrap();
        match reply.status {
            StatusCode::OK => served += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.header("x-almond-overloaded"), Some("true"));
                assert_eq!(reply.header("x-almond-error"), Some("overloaded"));
                // Shed at once, not after waiting for a place.
                assert!(took < DELAY, "a shed request took {took:?}");
                shed += 1;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!(served + shed, 50);
    assert!(served >= 5, "the five places were used: {served}");
    assert!(shed >= 1, "some were shed: {served} served");
    assert!(slow.peak_in_flight() <= 5, "{}", slow.peak_in_flight());
    assert_eq!(slow.count(), served, "shed requests never reached it");
    assert_eq!(
        upstream_errors(&proxy, "svc", "overloaded").await as usize,
        shed
    );

    // After the burst the service answers normally.
    let got = load(&proxy, "svc", 2, 1).await;
    all_ok(&got, "after the burst");
}

// ---------------------------------------------------------------------------
// 6. Panic threshold
// ---------------------------------------------------------------------------

async fn both_failing_stay_in_traffic(lb: &str) {
    let a = Backend::builder("a").status(500).start().await;
    let b = Backend::builder("b").status(500).start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb(lb)
                .at(a.addr)
                .at(b.addr)
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 2, base_ejection: 60s, max_ejection: 60s, \
                     max_ejection_percent: 100, panic_threshold: 50 }",
                )
                .set("retries", "{ attempts: 0 }"),
        )
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    let mut sent = 0;
    while endpoints_in(&proxy, "svc", "ejected").await < 2.0 {
        let reply = client.get("svc", "/").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{lb}");
        sent += 1;
        assert!(sent < 200, "{lb}: both never ejected");
    }
    assert_eq!(endpoints_in(&proxy, "svc", "healthy").await, 0.0);

    // No endpoint is available: the balancer panics and uses them all
    // rather than answer `no-endpoints`.
    let before = counts(&[&a, &b]);
    for _ in 0..40 {
        let reply = client.get("svc", "/").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{lb}");
        assert_eq!(reply.header("x-almond-error"), None, "{lb}");
    }
    let after = counts(&[&a, &b]);
    assert_eq!(after[0] + after[1] - before[0] - before[1], 40, "{lb}");
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{lb}: {before:?} -> {after:?}"
    );
    assert_eq!(upstream_errors(&proxy, "svc", "no_endpoints").await, 0.0);
}

#[tokio::test]
async fn panic_threshold_keeps_both_failing_endpoints_in_traffic() {
    both_failing_stay_in_traffic("round_robin").await;
    both_failing_stay_in_traffic("p2c_ewma").await;
}

/// `panic_threshold: 0` turns panic off for a pool of one too: its
/// ejected endpoint gets no request (a lone endpoint got every request,
/// ejected or not, while pools of two or more answered `no-endpoints`, as
/// Envoy does with panic off). Restarted, the endpoint is not even
/// connected to until its ejection is up.
#[tokio::test]
async fn panic_off_keeps_requests_from_a_lone_ejected_endpoint() {
    let mut solo = Backend::start("solo").await;
    solo.stop().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("svc").at(solo.addr).set(
            "circuit_breaker",
            "{ panic_threshold: 0, base_ejection: 60s, max_ejection: 60s }",
        ))
        .start()
        .await;
    let mut client = H1::connect(proxy.addr()).await;
    // Its refused connection ejects it.
    assert_ne!(client.get("svc", "/").await.status, StatusCode::OK);
    assert_eq!(endpoints_in(&proxy, "svc", "ejected").await, 1.0);
    solo.restart().await;
    let before = solo.connections();
    for _ in 0..5 {
        let reply = client.get("svc", "/").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("x-almond-error"), Some("no-endpoints"));
    }
    assert_eq!(solo.connections(), before, "the ejected endpoint was tried");
    assert_eq!(upstream_errors(&proxy, "svc", "no_endpoints").await, 5.0);
}

// ---------------------------------------------------------------------------
// 7. Bodies that cannot be replayed
// ---------------------------------------------------------------------------

/// A body over the 64 KiB `max_body_bytes` limit.
const BIG: usize = 100 * 1024;

/// Sends `method` with a `len`-byte body on a fresh connection; a broken
/// connection is an answer too (the proxy may close before reading the
/// whole upload), given as `Err`.
async fn send_body(
    addr: SocketAddr,
    method: Method,
    len: usize,
    chunked: bool,
) -> Result<Reply, String> {
    let body = if chunked {
        stream_of(len as u64)
    } else {
        full(vec![b'p'; len])
    };
    let req = Request::builder()
        .method(method)
        .uri("/upload")
        .header("host", "svc")
        .body(body)
        .unwrap();
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    within("upload answer", async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?;
        Ok(Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: body.to_bytes(),
            trailers: None,
        })
    })
    .await
}

#[tokio::test]
async fn bodies_that_may_have_been_sent_are_never_sent_twice() {
    let rst = Backend::builder("rst").reset().start().await;
    let good = Backend::start("good").await;
    // Round robin over two: requests alternate, and nothing retried means
    // nothing moves the cursor twice. Ejection is kept out of the way.
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(rst.addr)
                .at(good.addr)
                .set(
                    "retries",
                    "{ max_body_bytes: 65536, on: [connect, reset, \"503\"] }",
                )
                .set("circuit_breaker", "{ consecutive_failures: 1000 }"),
        )
        .start()
        .await;

    // Over the limit (with a length, and chunked), whatever the method; and
    // a small POST (not idempotent): each reaches one endpoint, once.
    let cases = [
        (Method::POST, BIG, false),
        (Method::PUT, BIG, false),
        (Method::PUT, BIG, true),
        (Method::POST, 100, false),
    ];
    let mut sent = 0;
    for (method, len, chunked) in cases {
        for _ in 0..2 {
            let (rst_before, good_before) = (rst.count(), good.count());
            let answer = send_body(proxy.addr(), method.clone(), len, chunked).await;
            sent += 1;
            let what = format!("{method} {len} bytes chunked={chunked}");
            eventually("the try arrived", || async {
                rst.count() + good.count() > rst_before + good_before
            })
            .await;
            if good.count() > good_before {
                let reply = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(reply.status, StatusCode::OK, "{what}");
                assert_eq!(good.last().body_len, len as u64, "{what}");
            } else if let Ok(reply) = answer {
                assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{what}");
                assert_eq!(reply.header("x-almond-error"), Some("reset"), "{what}");
            }
            assert_eq!(rst.count() + good.count(), sent, "{what}: sent once");
        }
    }
    assert!(rst.count() >= 4, "the resetting endpoint got its share");
    assert_eq!(retries(&proxy, "svc").await, 0.0);

    // A small PUT is kept whole, so the same reset IS retried: the control.
    let before = (rst.count(), good.count());
    for _ in 0..2 {
        let reply = send_body(proxy.addr(), Method::PUT, 100, false)
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    }
    let after = (rst.count(), good.count());
    assert_eq!(after.1 - before.1, 2);
    assert_eq!(after.0 - before.0, retries(&proxy, "svc").await as usize);
    assert!(after.0 > before.0, "one of the two PUTs met the reset");
}

#[tokio::test]
async fn bodies_never_sent_are_retried_on_a_refused_connection() {
    let dead = closed_port().await;
    let good = Backend::start("good").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(dead)
                .at(good.addr),
        )
        .start()
        .await;
    // Nothing of a request reaches a refused endpoint, so even a POST --
    // and one over max_body_bytes -- moves on to the next endpoint.
    for (len, chunked) in [(100, false), (100, false), (BIG, false), (BIG, true)] {
        let reply = send_body(proxy.addr(), Method::POST, len, chunked)
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.backend(), "good");
        assert_eq!(good.last().body_len, len as u64);
        assert_eq!(good.last().method, Method::POST);
    }
    assert_eq!(good.count(), 4);
    assert!(retries(&proxy, "svc").await >= 1.0);
}

// ---------------------------------------------------------------------------
// 8. Replayed bodies arrive whole
// ---------------------------------------------------------------------------

/// A distinct body: `n` repeated through 8 KiB.
fn payload(n: u8) -> Bytes {
    (0..8 * 1024u32)
        .map(|i| n.wrapping_mul(31).wrapping_add(i as u8))
        .collect::<Vec<u8>>()
        .into()
}

/// `body` as a stream of two frames: no length up front (chunked over
/// HTTP/1.1, no `content-length` over HTTP/2).
fn streamed(body: &Bytes) -> Body {
    let (a, b) = (body.slice(..body.len() / 2), body.slice(body.len() / 2..));
    let frames = [a, b].map(|d| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(d)));
    BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

async fn replayed_bodies_arrive_whole(http2: bool, chunked: bool) {
    let (bad, good) = bad_and_good().await;
    let mut svc = ServiceYaml::new("svc")
        .lb("round_robin")
        .at(bad.addr)
        .at(good.addr)
        .set("circuit_breaker", "{ consecutive_failures: 1000 }");
    if http2 {
        svc = svc.http2();
    }
    let proxy = ProxyYaml::new().by_host().service(svc).start().await;
    let proto = match (http2, chunked) {
        (false, false) => "h1",
        (false, true) => "h1 chunked",
        (true, false) => "h2",
        (true, true) => "h2 without a length",
    };

    let mut h1 = H1::connect(proxy.addr()).await;
    let mut h2 = H2::connect(proxy.addr()).await;
    let mut sent = Vec::new();
    for n in 0..8u8 {
        let body = payload(n);
        let method = if n % 4 == 3 { Method::GET } else { Method::PUT };
        let sent_body = if chunked {
            streamed(&body)
        } else {
            full(body.clone())
        };
        let reply = if http2 {
            let req = Request::builder()
                .method(method)
                .uri("http://svc/put")
                .version(Version::HTTP_2)
                .body(sent_body)
                .unwrap();
            h2.request(req).await
        } else {
            let mut req = Request::builder()
                .method(method)
                .uri("/put")
                .header("host", "svc")
                .body(sent_body)
                .unwrap();
            if chunked {
                // hyper's client sends a GET's body of unknown length only
                // when asked for chunks.
                let chunks = http::HeaderValue::from_static("chunked");
                req.headers_mut().insert("transfer-encoding", chunks);
            }
            h1.request(req).await
        };
        assert_eq!(reply.status, StatusCode::OK, "{proto}: {}", reply.text());
        assert_eq!(reply.backend(), "good", "{proto}");
        sent.push(body);
    }

    // good got every body once, byte for byte; bad got some first, and
    // each of those reached good after it, unchanged.
    let lens = |v: &[Bytes]| {
        v.iter()
            .map(|b| (b.len(), b.first().copied()))
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(&good.bodies()), lens(&sent), "{proto}");
    assert_eq!(good.bodies(), sent, "{proto}");
    let at_bad = bad.bodies();
    assert!(!at_bad.is_empty(), "{proto}: round robin sent some to bad");
    for b in &at_bad {
        assert!(sent.contains(b), "{proto}: bad got a body never sent");
    }
    assert_eq!(
        retries(&proxy, "svc").await as usize,
        at_bad.len(),
        "{proto}"
    );
}

#[tokio::test]
async fn a_small_body_retried_after_503_arrives_whole() {
    replayed_bodies_arrive_whole(false, false).await;
    replayed_bodies_arrive_whole(true, false).await;
}

/// A small body of unknown length (chunked, or HTTP/2 without
/// `content-length`) is kept as it streams and retried as a known one is.
#[tokio::test]
async fn a_small_body_of_unknown_length_retried_after_503_arrives_whole() {
    replayed_bodies_arrive_whole(false, true).await;
    replayed_bodies_arrive_whole(true, true).await;
}

/// An HTTP/2 service with an unreachable endpoint beside a good one: a
/// burst of requests that all find no connection to it fail over together
/// after one connect timeout (each waiting for the one opener does not
/// try again in turn, a connect timeout each), and every request is
/// answered by the good endpoint within the request timeout.
#[tokio::test]
async fn requests_waiting_on_an_unreachable_h2_endpoint_fail_over_together() {
    let (dead, _queued, _listener) = unreachable().await;
    let good = Backend::start("good").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .http2()
                .lb("round_robin")
                .endpoint(dead, "default", 1)
                .endpoint(good.addr, "default", 1)
                .timeouts("300ms", "2s"),
        )
        .start()
        .await;
    // In turn, the twelve first tries at the unreachable endpoint would
    // end one connect timeout apart: the last ones past the request's 2 s.
    let got = load(&proxy, "web", 24, 1).await;
    all_ok(&got, "a burst beside an unreachable endpoint");
    assert_eq!(good.count(), 24);
}

/// A retry avoids every endpoint the request failed on, not just the
/// last (Envoy's `previous_hosts`): with two of three endpoints failing
/// and two retries, every request reaches the third.
#[tokio::test]
async fn a_second_retry_avoids_both_endpoints_that_failed() {
    let bad1 = Backend::builder("bad1").status(503).start().await;
    let bad2 = Backend::builder("bad2").status(503).start().await;
    let good = Backend::start("good").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(bad1.addr)
                .at(bad2.addr)
                .at(good.addr)
                .set("circuit_breaker", "{ consecutive_failures: 1000 }")
                .set(
                    "retries",
                    "{ attempts: 2, on: [\"503\"], budget_percent: 100, min_per_second: 1000 }",
                ),
        )
        .start()
        .await;
    // Avoiding only the last failure, a request whose first two tries
    // failed went back to the first endpoint half the time: 1 in 6 of
    // these 40 would fail.
    let got = load(&proxy, "svc", 1, 40).await;
    all_ok(&got, "two of three endpoints answering 503");
    assert!(got.iter().all(|g| g.backend == "good"));
    assert_eq!(good.count(), 40);
}

/// With every endpoint failing, retries go round them in turn: two
/// endpoints and three retries make A, B, A, B (the endpoint that failed
/// longest ago is tried again, not the first one to fail).
#[tokio::test]
async fn retries_over_failing_endpoints_take_turns() {
    let a = Backend::builder("a").status(503).start().await;
    let b = Backend::builder("b").status(503).start().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("svc")
                .lb("round_robin")
                .at(a.addr)
                .at(b.addr)
                .set("circuit_breaker", "{ consecutive_failures: 1000 }")
                .set(
                    "retries",
                    "{ attempts: 3, budget_percent: 100, min_per_second: 1000 }",
                ),
        )
        .start()
        .await;
    let got = load(&proxy, "svc", 1, 1).await;
    assert_eq!(got[0].status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counts(&[&a, &b]), [2, 2]);
}
