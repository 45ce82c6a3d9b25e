//! Zone-aware balancing end to end: a proxy in zone `a` in front of
//! endpoints in zones `a`, `b` and `c` sends everything to its own zone
//! while it is healthy, spills over in proportion when the local zone
//! loses endpoints, and a split's shares hold whatever the zones do.
//! Shares are checked within 3.7 binomial standard deviations.

mod support;

use http::StatusCode;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use support::*;

/// A proxy config with `zone: a` and service `s`: `endpoints` as
/// (address, subset, zone), and more service lines in `extra`.
fn zoned(endpoints: &[(SocketAddr, &str, &str)], extra: &str) -> String {
    let mut yaml = String::from(
        "admin: 127.0.0.1:0\nzone: a\nlisteners:\n  - bind: 127.0.0.1:0\n    service: s\nservices:\n  s:\n    lb: round_robin\n",
    );
    yaml.push_str(extra);
    yaml.push_str("    endpoints:\n");
    for (addr, subset, zone) in endpoints {
        yaml.push_str(&format!(
            "      - {{ addr: \"{addr}\", subset: {subset}, zone: {zone} }}\n"
        ));
    }
    yaml
}

/// Sends `n` requests; answers by backend name.
async fn spread(proxy: &TestProxy, n: usize) -> BTreeMap<String, u64> {
    let mut client = H1::connect(proxy.addr()).await;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let reply = client.get("s", "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        *out.entry(reply.backend().to_owned()).or_default() += 1;
    }
    out
}

/// Asserts `k` of `n` is `p` within 5 binomial standard deviations (a
/// false failure about once in 1.7 million runs).
fn share_within(what: &str, k: u64, n: u64, p: f64) {
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let expected = n as f64 * p;
    let got = k as f64;
    assert!(
        (got - expected).abs() <= 5.0 * sigma,
        "{what}: {k} of {n}, expected {expected:.0} +- {:.0} (5 sigma)",
        5.0 * sigma
    );
    eprintln!(
        "{what}: {k} of {n} = {:.3} (expected {p:.3}, {:+.2} sigma)",
        got / n as f64,
        (got - expected) / sigma
    );
}

fn count(spread: &BTreeMap<String, u64>, names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| spread.get(*n).copied().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_zone_gets_everything_then_spills_over_in_proportion() {
    let a1 = Backend::start("a1").await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let c1 = Backend::start("c1").await;
    let c2 = Backend::start("c2").await;
    let a2 = Backend::start("a2").await;
    let dead = closed_port().await;

    // Three zones of two endpoints, all up: zone a only.
    let all_up = [
        (a1.addr, "v1", "a"),
        (a2.addr, "v1", "a"),
        (b1.addr, "v1", "b"),
        (b2.addr, "v1", "b"),
        (c1.addr, "v1", "c"),
        (c2.addr, "v1", "c"),
    ];
    let proxy = TestProxy::start(&zoned(&all_up, "")).await;
    let got = spread(&proxy, 300).await;
    assert_eq!(count(&got, &["a1", "a2"]), 300, "{got:?}");
    let zone = |z| zone_requests(&proxy, z);
    assert_eq!(zone("local").await, 300.0);
    assert_eq!(zone("remote").await, 0.0);

    // Zone a's second endpoint is dead: once it is ejected, 1 of zone a's 2
    // endpoints (50 % < zone_min_healthy 70 %) is available; zone a has 1
    // of the 5 available (20 %) for its 2 of 6 (33 %): it keeps 60 % of the
    // traffic and 40 % spills over to b and c alike.
    let one_down = [
        (a1.addr, "v1", "a"),
        (dead, "v1", "a"),
        (b1.addr, "v1", "b"),
        (b2.addr, "v1", "b"),
        (c1.addr, "v1", "c"),
        (c2.addr, "v1", "c"),
    ];
    let extra = "    circuit_breaker: { consecutive_failures: 1, base_ejection: 60s, max_ejection_percent: 50 }\n    retries: { attempts: 2, on: [connect] }\n";
    let proxy = TestProxy::start(&zoned(&one_down, extra)).await;
    eventually("the dead endpoint is ejected", || async {
        let _ = spread(&proxy, 5).await;
        proxy_metric(
            &proxy,
            "almond_endpoint_ejections_total",
            &[("service", "s")],
        )
        .await
            >= 1.0
    })
    .await;
    let n = 1500;
    let got = spread(&proxy, n).await;
    let local = count(&got, &["a1"]);
    share_within("spill-over: local zone a", local, n as u64, 0.6);
    let (b, c) = (count(&got, &["b1", "b2"]), count(&got, &["c1", "c2"]));
    assert_eq!(local + b + c, n as u64);
    share_within("spill-over: zone b of the remote", b, b + c, 0.5);
}

/// `almond_zone_requests_total{service="s", zone}`.
async fn zone_requests(proxy: &TestProxy, zone: &str) -> f64 {
    proxy_metric(
        proxy,
        "almond_zone_requests_total",
        &[("service", "s"), ("zone", zone)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_share_holds_across_zones() {
    // Stable v1 in every zone, the canary v2 only in zones b and c: the
    // split picks the subset first, then zones within it, so v2 keeps its
    // 20 % and v1's 80 % stays in zone a.
    let v1a = Backend::start("v1a").await;
    let v1b = Backend::start("v1b").await;
    let v1c = Backend::start("v1c").await;
    let v2b = Backend::start("v2b").await;
    let v2c = Backend::start("v2c").await;
    let endpoints = [
        (v1a.addr, "v1", "a"),
        (v1b.addr, "v1", "b"),
        (v1c.addr, "v1", "c"),
        (v2b.addr, "v2", "b"),
        (v2c.addr, "v2", "c"),
    ];
    let proxy = TestProxy::start(&zoned(&endpoints, "    split: { v1: 80, v2: 20 }\n")).await;
    let n = 2000;
    let got = spread(&proxy, n).await;
    let canary = count(&got, &["v2b", "v2c"]);
    share_within("split across zones: canary v2", canary, n as u64, 0.2);
    assert_eq!(
        count(&got, &["v1b", "v1c"]),
        0,
        "v1 is all in zone a: {got:?}"
    );
    assert_eq!(count(&got, &["v1a"]) + canary, n as u64);
}

/// A mirror's copies are not the service's requests: with a zone-aware
/// mirrored subset, `almond_zone_requests_total` still counts each real
/// request once (it counted 28 for 14).
#[tokio::test]
async fn mirror_copies_are_not_counted_as_zone_requests() {
    let v1a = Backend::start("v1a").await;
    let v1b = Backend::start("v1b").await;
    let v2a = Backend::start("v2a").await;
    let v2b = Backend::start("v2b").await;
    let endpoints = [
        (v1a.addr, "v1", "a"),
        (v1b.addr, "v1", "b"),
        (v2a.addr, "v2", "a"),
        (v2b.addr, "v2", "b"),
    ];
    let extra = "    split: { v1: 100 }\n    mirror: { subset: v2, percent: 100 }\n";
    let proxy = TestProxy::start(&zoned(&endpoints, extra)).await;
    spread(&proxy, 14).await;
    eventually("the 14 copies arrived", || async {
        v2a.count() + v2b.count() == 14
    })
    .await;
    let counted = zone_requests(&proxy, "local").await + zone_requests(&proxy, "remote").await;
    assert_eq!(counted, 14.0);
}

/// A remote endpoint's ejection ends while every first try stays in the
/// local zone: the next first try is its probe, wherever it is. R (zone
/// b) was ejected by a retry while down, then restarted; its ejection
/// stayed in force for good (first tries only looked in zone a), filling
/// `max_ejection_percent`, so when L (zone a) then answered 500 to
/// everything, L was never ejected and 64 of 64 requests got 500. Now R
/// is probed back by the first request after its ejection, L is ejected
/// by its failures, and the requests after that get 200 from R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_endpoint_is_probed_back_when_its_ejection_ends() {
    let l = Backend::start("l").await;
    let mut r = Backend::start("r").await;
    r.stop().await;
    let endpoints = [(l.addr, "v1", "a"), (r.addr, "v1", "b")];
    let extra = "    circuit_breaker: { consecutive_failures: 3, base_ejection: 1s, max_ejection: 1s }\n    retries: { attempts: 1, on: [connect, \"503\"] }\n";
    let proxy = TestProxy::start(&zoned(&endpoints, extra)).await;
    let ejections = || {
        proxy_metric(
            &proxy,
            "almond_endpoint_ejections_total",
            &[("service", "s")],
        )
    };
    // L answers a 503; its retry goes to R, down: R is ejected.
    l.set_status(503);
    let mut client = H1::connect(proxy.addr()).await;
    let _ = client.get("s", "/").await;
    l.set_status(0);
    assert_eq!(ejections().await, 1.0, "R ejected by the retry");
    r.restart().await;
    // R's ejection (1 s at most) ends with no request on the way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = spread(&proxy, 20).await;
    assert_eq!(r.count(), 1, "R probed once, then local again: {got:?}");
    assert_eq!(count(&got, &["l"]), 19, "{got:?}");

    // L fails everything: ejected within its 3 failures (R back leaves
    // room), and R answers from then on.
    l.set_status(500);
    let mut codes = Vec::new();
    for _ in 0..20 {
        let reply = client.get("s", "/").await;
        codes.push((reply.status.as_u16(), reply.backend().to_owned()));
    }
    let failed = codes.iter().filter(|(s, _)| *s == 500).count();
    assert!(failed <= 3, "L never ejected: {codes:?}");
    assert!(
        codes[3..].iter().all(|(s, b)| *s == 200 && b == "r"),
        "{codes:?}"
    );
    assert_eq!(ejections().await, 2.0);
}
