//! End to end on Consul: the control plane in-process on the Consul double
//! (`tests/consul-double`), a proxy following it, backends that say who
//! they are -- all on real sockets. What Consul says about health reaches
//! traffic; Consul going away keeps the last state; indexes going backwards
//! lose nothing; our client follows `shared/consul/API.md` 2.4 (index and
//! wait, token, no hot loop on 403, rate-limited churn); splits live in
//! Consul KV with check-and-set; readiness waits for the first full sync;
//! HTTPS to Consul, with a client certificate, through a real TLS front.
//! Last, contract tests feed the API fixtures through our parser.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use almond_config::{Endpoint, Protocol, DEFAULT_SUBSET};
use almond_consul_double::{
    Access, AclPolicy, CheckDef, ConsulDouble, RecordedRequest, ServiceDef, Status,
};
use almond_control::consul::{instance_weight, to_service, to_service_resolved, Instance};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::pki::{Ca, Leaf};
use support::*;
use tokio::net::TcpListener;

/// The KV key of web's policy.
const WEB_POLICY: &str = "almond/policy/web";

/// A TTL check that starts passing (its TTL outlives any test).
fn passing() -> CheckDef {
    CheckDef::ttl(Duration::from_secs(3600)).status(Status::Passing)
}

/// Instance `id` of `web` on `backend`'s port, subset `version`, with one
/// passing TTL check (`service:<id>`).
fn web(id: &str, backend: &Backend, version: &str) -> ServiceDef {
    ServiceDef::new("web")
        .id(id)
        .address("127.0.0.1")
        .port(backend.addr.port())
        .meta("version", version)
        .check(passing())
}

/// The control config on `consul` with 1 s blocking waits; `token_env`
/// names an environment variable unique to the test.
fn yaml(consul: &ConsulDouble, token_env: &str) -> String {
    consul_control_yaml(&consul.url(), "1s", token_env)
}

/// Sends `n` requests for `svc` over one connection; counts the answers by
/// backend. Every answer must be a 200.
async fn spread(proxy: &TestProxy, svc: &str, n: usize) -> BTreeMap<String, usize> {
    let mut client = H1::connect(proxy.addr()).await;
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let reply = client.get(svc, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{svc}: {}", reply.text());
        *seen.entry(reply.backend().to_owned()).or_insert(0) += 1;
    }
    seen
}

/// One request for `web` pinned to `subset` (`x-almond-subset`); the
/// backend that answered, or `None` when the proxy could not route it.
async fn pinned(proxy: &TestProxy, subset: &str) -> Option<String> {
    let req = http::Request::get("/")
        .header("host", "web")
        .header("x-almond-subset", subset)
        .body(empty())
        .unwrap_or_else(|e| panic!("request: {e}"));
    let reply = H1::connect(proxy.addr()).await.request(req).await;
    (reply.status == StatusCode::OK).then(|| reply.backend().to_owned())
}

/// Waits until `name`, the one instance of `subset`, is in the proxy's
/// table: a request pinned to its subset reaches it. (Pinned, so that the
/// balancer's preference for the endpoint it already knows to be fast
/// does not decide the outcome.)
async fn reaches(proxy: &TestProxy, name: &str, subset: &str) {
    eventually(
        &format!("traffic for web/{subset} reaches {name}"),
        || async { pinned(proxy, subset).await.as_deref() == Some(name) },
    )
    .await;
}

/// Waits until `subset` has left the proxy's table (a request pinned to it
/// is refused), then checks that it stays out.
async fn out(proxy: &TestProxy, subset: &str) {
    eventually(&format!("web/{subset} leaves the proxy"), || async {
        pinned(proxy, subset).await.is_none()
    })
    .await;
    for _ in 0..5 {
        let answer = pinned(proxy, subset).await;
        assert_eq!(answer, None, "web/{subset} came back");
    }
}

/// Waits until only `names` answer for `web` (20 requests in a row), then
/// checks that it holds for 30 more.
async fn only(proxy: &TestProxy, names: &[&str]) {
    let within_names =
        |seen: &BTreeMap<String, usize>| seen.keys().all(|b| names.contains(&b.as_str()));
    eventually(
        &format!("traffic for web reaches only {names:?}"),
        || async { within_names(&spread(proxy, "web", 20).await) },
    )
    .await;
    let seen = spread(proxy, "web", 30).await;
    assert!(within_names(&seen), "expected only {names:?}, got {seen:?}");
}

async fn consul_up(control: &TestControl) -> f64 {
    control_metric(control, "almond_control_consul_up", &[]).await
}

async fn consul_errors(control: &TestControl) -> f64 {
    control_metric(control, "almond_control_consul_errors_total", &[]).await
}

/// Requests the double received on `path` (exact), in order.
fn requests_to(consul: &ConsulDouble, path: &str) -> Vec<RecordedRequest> {
    consul
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Consul's health reaches traffic
// ---------------------------------------------------------------------------

#[tokio::test]
async fn consul_health_reaches_traffic() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    // web-2 drains while warning.
    let web2 = || web("web-2", &b2, "v2").weights(1, 0);
    consul.register(web2()).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_HEALTH")).await;
    let proxy = start_following(&control.url(), None).await;

    reaches(&proxy, "b1", "v1").await;
    reaches(&proxy, "b2", "v2").await;
    // Unpinned, both subsets serve (by endpoint weight).
    eventually("unpinned traffic reaches both instances", || async {
        spread(&proxy, "web", 20).await.len() == 2
    })
    .await;

    // Deregistered: no more traffic. Registered again: back.
    assert!(consul.deregister("web-2"));
    out(&proxy, "v2").await;
    only(&proxy, &["b1"]).await;
    consul.register(web2()).unwrap();
    reaches(&proxy, "b2", "v2").await;

    // A critical check takes it out; passing brings it back.
    assert!(consul.set_check("service:web-2", Status::Critical));
    out(&proxy, "v2").await;
    assert!(consul.set_check("service:web-2", Status::Passing));
    reaches(&proxy, "b2", "v2").await;

    // Warning with `Weights: {Passing: 1, Warning: 0}` drains it ...
    assert!(consul.set_check("service:web-2", Status::Warning));
    out(&proxy, "v2").await;
    // ... while a warning instance with the default `Warning: 1` keeps
    // its traffic.
    assert!(consul.set_check("service:web-1", Status::Warning));
    assert!(consul.set_check("service:web-2", Status::Passing));
    reaches(&proxy, "b2", "v2").await;
    reaches(&proxy, "b1", "v1").await;
    assert!(consul.set_check("service:web-1", Status::Passing));

    // Maintenance mode takes it out, whatever its checks say; leaving
    // maintenance brings it back.
    assert!(consul.maintenance("web-2", true));
    out(&proxy, "v2").await;
    reaches(&proxy, "b1", "v1").await;
    assert!(consul.maintenance("web-2", false));
    reaches(&proxy, "b2", "v2").await;

    // A critical node-level check (serfHealth) takes out every instance on
    // the node: with nothing healthy, the proxy has no endpoint for web.
    let node = consul.agent_node();
    assert!(consul.set_node_check(&node, "serfHealth", Status::Critical));
    eventually("web has no healthy endpoint left", || async {
        get_h1(proxy.addr(), "web", "/").await.status != StatusCode::OK
    })
    .await;
    assert!(consul.set_node_check(&node, "serfHealth", Status::Passing));
    reaches(&proxy, "b1", "v1").await;
    reaches(&proxy, "b2", "v2").await;
}

/// Consul's catalog carries no policy: `source.consul.service_defaults`
/// gives it, by served name, with `"*"` for the others. web's 300 ms
/// request timeout answers a 2 s backend with a 504 well before it
/// answers; api, under `"*"`, waits for its backend.
#[tokio::test]
async fn service_defaults_give_consul_services_their_policy() {
    let consul = ConsulDouble::start().await;
    let slow = Backend::builder("slow")
        .delay(Duration::from_millis(1500))
        .start()
        .await;
    consul.register(web("web-1", &slow, "v1")).unwrap();
    consul
        .register(
            ServiceDef::new("api")
                .id("api-1")
                .address("127.0.0.1")
                .port(slow.addr.port())
                .check(passing()),
        )
        .unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nstore: consul\nsource:\n  consul:\n    addr: \"{}\"\n    wait: 1s\n    \
         token_env: ALMOND_TEST_CC_TOKEN_DEFAULTS\n    service_defaults:\n      \
         web: {{ lb: least_request, timeouts: {{ request: 300ms }}, retries: {{ attempts: 0 }} }}\n      \
         \"*\": {{ timeouts: {{ request: 5s }} }}\n",
        consul.url()
    );
    let control = TestControl::start(&yaml).await;
    let web_policy = control.service("web").await["service"].clone();
    assert_eq!(web_policy["lb"], "least_request", "{web_policy}");
    assert_eq!(web_policy["timeouts"]["request"], "300ms", "{web_policy}");
    assert_eq!(web_policy["retries"]["attempts"], 0, "{web_policy}");
    let api_policy = control.service("api").await["service"].clone();
    assert_eq!(api_policy["timeouts"]["request"], "5s", "{api_policy}");

    let proxy = start_following(&control.url(), None).await;
    eventually("the proxy has web and api", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
    let started = tokio::time::Instant::now();
    let answer = get_h1(proxy.addr(), "web", "/").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "web's 300 ms timeout did not apply: {:?}",
        started.elapsed()
    );
    assert_eq!(
        get_h1(proxy.addr(), "api", "/").await.status,
        StatusCode::OK
    );
}

/// A `service_defaults` entry the proxies would refuse is refused when
/// the control plane's config is read, with its key and line.
#[test]
fn invalid_service_defaults_are_named_with_their_lines() {
    let yaml = "source:\n  consul:\n    service_defaults:\n      Web: {}\n      api:\n        circuit_breaker: { base_ejection: 10m }\n";
    let err = almond_config::load_control(yaml, "control.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 4: source.consul.service_defaults.Web:"),
        "{err}"
    );
    assert!(
        err.contains("line 6: source.consul.service_defaults.api.circuit_breaker"),
        "{err}"
    );
}

/// Consul services are served by their names in lower case, as clients'
/// `Host` is matched (`Orders` is reached as `orders`, `ORDERS` or
/// `Orders:4140`); of two that differ only in case, the one already in
/// lower case is served (`billing`, not `Billing`); a name no `Host` can
/// be (`my orders`) is left out; the others are served.
#[tokio::test]
async fn consul_services_are_served_by_their_names_in_lower_case() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let orders = Backend::start("orders-backend").await;
    let billing = Backend::start("billing-backend").await;
    let upper_billing = Backend::start("upper-billing-backend").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    for (id, name, backend) in [
        ("orders-1", "Orders", &orders),
        ("mine-1", "my orders", &b1),
        ("billing-1", "Billing", &upper_billing),
        ("billing-2", "billing", &billing),
    ] {
        let def = ServiceDef::new(name)
            .id(id)
            .address("127.0.0.1")
            .port(backend.addr.port())
            .check(passing());
        consul.register(def).unwrap();
    }
    // Ready: the catalog and every service it lists have been read.
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_NAMES")).await;
    let served: Vec<String> = control.state.services().into_keys().collect();
    assert_eq!(served, ["billing", "orders", "web"]);
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    for (host, backend) in [
        ("WEB", "b1"),
        ("Web:4140", "b1"),
        ("orders", "orders-backend"),
        ("ORDERS", "orders-backend"),
        ("Orders:4140", "orders-backend"),
        ("billing", "billing-backend"),
        ("Billing", "billing-backend"),
    ] {
        // Several: Consul's answer for `billing` holds `Billing`'s
        // instance too (it looks names up regardless of case), and none
        // of these may reach it.
        for _ in 0..6 {
            let reply = get_h1(proxy.addr(), host, "/").await;
            assert_eq!(reply.status, StatusCode::OK, "{host}: {}", reply.text());
            assert_eq!(reply.backend(), backend, "{host}");
        }
    }
    // `billing` gone, `Billing` is served in its place.
    assert!(consul.deregister("billing-2"));
    eventually("Billing is served as billing", || async {
        get_h1(proxy.addr(), "billing", "/").await.backend() == "upper-billing-backend"
    })
    .await;
}

/// web's two instances (v1, v2) on a Consul that takes KV values of
/// `max_value` bytes at most, and a control plane on it.
async fn kv_limited(
    max_value: usize,
    token_env: &str,
) -> (ConsulDouble, TestControl, [Backend; 2]) {
    let consul = ConsulDouble::builder()
        .kv_max_value_size(max_value)
        .start()
        .await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let control = TestControl::start(&yaml(&consul, token_env)).await;
    (consul, control, [b1, b2])
}

/// A change that would make a service's policy larger than Consul takes in
/// one KV value (`kv_max_value_size`) is refused 413 with the reason; the
/// policy in force stays, in Consul and in what proxies get.
#[tokio::test]
async fn a_policy_larger_than_consul_takes_is_refused_and_the_old_stays() {
    let (consul, control, _backends) = kv_limited(4096, "ALMOND_TEST_CC_TOKEN_KV_SIZE").await;
    let split = json!({ "weights": { "v1": 90, "v2": 10 } });
    let reply = control.put_split("web", &split, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let before = consul
        .kv_get(WEB_POLICY)
        .expect("the split is stored")
        .value;
    // A guard whose deny body alone is nearly Consul's limit here.
    let guard = json!({
        "match": { "path_prefix": "/giveaway" },
        "deny": { "status": 503, "body": "x".repeat(4000) },
    });
    let reply = control
        .send(Method::PUT, "/v1/services/web/guards", &guard, None)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    let reason = reply.text();
    assert!(reason.contains("kv_max_value_size"), "{reason}");
    assert!(reason.contains("nothing changed"), "{reason}");
    assert_eq!(
        consul.kv_get(WEB_POLICY).expect("still stored").value,
        before
    );
    // A small guard still goes in.
    let guard = json!({ "match": { "path_prefix": "/giveaway" }, "deny": { "status": 503 } });
    let reply = control
        .send(Method::PUT, "/v1/services/web/guards", &guard, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// The audit trail gives way before a change does: route sets whose
/// copies in the policy's history would pass Consul's value limit drop
/// the oldest history entries, and a shift after them is written (it got
/// 413 once the trail's copies of the rules had filled the value, so a
/// failing canary could no longer be rolled back).
#[tokio::test]
async fn the_history_gives_way_before_a_change_does() {
    let (consul, control, _backends) = kv_limited(16384, "ALMOND_TEST_CC_TOKEN_KV_TRAIL").await;
    // About 4.5 KiB of rules: the policy holds them once, and the trail
    // once for each set.
    let rules: Vec<Value> = (0..60)
        .map(|i| json!({ "match": { "path_prefix": format!("/section-{i:03}/page") }, "to": { "subset": "v2" } }))
        .collect();
    for round in 0..5 {
        let reply = control
            .send(
                Method::PUT,
                "/v1/services/web/routes",
                &json!({ "rules": rules }),
                None,
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "round {round}: {}",
            reply.text()
        );
    }
    let stored = stored_policy(&consul);
    let kept = stored["history"].as_array().map_or(0, Vec::len);
    assert!((1..5).contains(&kept), "{kept} history entries kept");
    let reply = control
        .put_split("web", &json!({ "weights": { "v1": 100, "v2": 0 } }), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        stored_policy(&consul)["split"],
        json!({ "v1": 100, "v2": 0 })
    );
}

// ---------------------------------------------------------------------------
// 1b. `almond status`: endpoints healthy/total and live golden metrics
// ---------------------------------------------------------------------------

/// Sends `GET web` through `proxy` at most `rate` per second (no bursts)
/// until `stop` is set, or `limit` requests; returns how many it sent.
fn traffic(
    proxy: SocketAddr,
    rate: u64,
    limit: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut client = H1::connect(proxy).await;
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0;
        while sent < limit && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            client.get("web", "/").await;
            sent += 1;
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_endpoints_and_live_golden_metrics() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    // The canary fails every request.
    let b3 = Backend::builder("b3").status(500).start().await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v1")).unwrap();
    consul.register(web("web-3", &b3, "v2")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_STATUS")).await;
    let proxy = start_following(&control.url(), None).await;
    let reply = control
        .put_split("web", &json!({ "weights": { "v1": 80, "v2": 20 } }), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually(
        "the proxy has the 80/20 split and all three endpoints",
        || async {
            let text = proxy.admin_get("/metrics").await.text();
            let healthy = |subset| {
                metric(
                    &text,
                    "almond_endpoints",
                    &[("service", "web"), ("subset", subset), ("state", "healthy")],
                )
            };
            metric(
                &text,
                "almond_split_weight",
                &[("service", "web"), ("subset", "v2")],
            ) == 20.0
                && healthy("v1") == 2.0
                && healthy("v2") == 1.0
        },
    )
    .await;

    // About 100 requests a second while status measures over 2 s.
    let url = control.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = traffic(proxy.addr(), 100, 2000, stop.clone());
    let (code, out, err) = run_ops(&[
        "status",
        "web",
        "--window",
        "2s",
        "-o",
        "json",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let view = &status[0];
    assert_eq!(
        view["subsets"]["v1"],
        json!({ "healthy": 2, "total": 2 }),
        "{view:#}"
    );
    assert_eq!(
        view["subsets"]["v2"],
        json!({ "healthy": 1, "total": 1 }),
        "{view:#}"
    );
    let live = &view["live"]["subsets"];
    let (v1, v2) = (&live["v1"], &live["v2"]);
    assert_eq!(view["live"]["proxies"], 1, "{view:#}");
    assert!(v2["requests"].as_u64() > Some(0), "{live:#}");
    assert_eq!(v1["success_rate"].as_f64(), Some(1.0), "{live:#}");
    assert!(
        v2["success_rate"].as_f64() < Some(0.5),
        "v2 fails: {live:#}"
    );
    assert!(v1["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{live:#}");
    // Rates: v1 has 80 % of the traffic; together no more than was sent
    // (a client that never bursts above 100/s; loose, not a timing).
    let (r1, r2) = (
        v1["rps"].as_f64().unwrap_or(0.0),
        v2["rps"].as_f64().unwrap_or(0.0),
    );
    assert!(r1 > r2 && r2 > 0.0, "{live:#}");
    assert!(r1 + r2 <= 150.0, "{live:#}");

    // The table shows the same, one line per subset.
    let (code, out, err) = run_ops(&["status", "web", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        line_of(&out, "v1").contains("80%")
            && line_of(&out, "v1").contains("2/2")
            && line_of(&out, "v1").contains("100.00%"),
        "{out}"
    );
    assert!(
        line_of(&out, "v2").contains("20%")
            && line_of(&out, "v2").contains("1/1")
            && line_of(&out, "v2").contains("0.00%"),
        "{out}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();

    // One v1 instance goes critical: 1 of 2 healthy.
    assert!(consul.set_check("service:web-2", Status::Critical));
    eventually("status counts web-2 as unhealthy", || async {
        control.service("web").await["subsets"]["v1"] == json!({ "healthy": 1, "total": 2 })
    })
    .await;
    // No traffic now: "-", not 0 % or NaN.
    let (code, out, err) = run_ops(&["status", "web", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(line_of(&out, "v1").contains("1/2"), "{out}");
    // Scraping the proxies, the control plane waits 10 s at most: a longer
    // window is refused (exit 1, the reason on one line).
    let (code, _, err) = run_ops(&["status", "web", "--window", "30s", "--control", &url]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid window"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(line_of(&out, "v1").ends_with(" -"), "{out}");
    assert!(!out.contains("NaN"), "{out}");
}

/// The line of `text` that starts with `subset`.
fn line_of(text: &str, subset: &str) -> String {
    text.lines()
        .find(|l| l.trim_start().starts_with(subset))
        .unwrap_or_else(|| panic!("no {subset} line: {text}"))
        .to_owned()
}

// ---------------------------------------------------------------------------
// 2. Consul down: the last state stays; changes apply when it is back
// ---------------------------------------------------------------------------

#[tokio::test]
async fn consul_down_keeps_the_last_state_and_changes_apply_when_back() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_DOWN")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    reaches(&proxy, "b2", "v2").await;
    assert_eq!(consul_up(&control).await, 1.0);
    let errors_before = consul_errors(&control).await;

    // No leader: every (default-consistency) read answers 500.
    consul.set_leader(false);
    let from = consul.requests().len();
    eventually("the web health watch has failed", || async {
        consul.requests()[from..]
            .iter()
            .any(|r| r.path == "/v1/health/service/web")
    })
    .await;
    eventually("the control plane reports consul down", || async {
        consul_up(&control).await == 0.0 && consul_errors(&control).await > errors_before
    })
    .await;

    // A change made meanwhile cannot be seen; the control plane keeps the
    // last state it had, and so does the proxy: both backends keep
    // getting traffic.
    assert!(consul.deregister("web-2"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    reaches(&proxy, "b2", "v2").await;
    reaches(&proxy, "b1", "v1").await;
    assert_eq!(consul_up(&control).await, 0.0, "consul is still down");
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::OK,
        "a control plane that has synced once stays ready while consul is down"
    );

    // Consul is back: the change made while it was down applies, and so
    // do new ones.
    consul.set_leader(true);
    out(&proxy, "v2").await;
    only(&proxy, &["b1"]).await;
    eventually("the control plane reports consul up", || async {
        consul_up(&control).await == 1.0
    })
    .await;
    consul.register(web("web-3", &b3, "v3")).unwrap();
    reaches(&proxy, "b3", "v3").await;
}

#[tokio::test]
async fn one_failed_health_query_does_not_leave_consul_marked_down() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_BLIP")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    // The catalog watch, web's health watch and the policy watch block.
    assert!(consul.wait_blocked(3).await, "three blocking queries");
    let errors_before = consul_errors(&control).await;

    // One failure, taken by web's health watch (woken by an idempotent
    // write while the catalog watch stays blocked).
    consul.fail_next(1, 500, "No cluster leader");
    consul.bump_without_change("web");
    eventually("the failure is counted", || async {
        consul_errors(&control).await > errors_before
    })
    .await;
    // Consul answers again: the control plane says so, although the
    // service catalog itself did not change.
    eventually("almond_control_consul_up returns to 1", || async {
        consul_up(&control).await == 1.0
    })
    .await;
    consul.register(web("web-2", &b2, "v2")).unwrap();
    reaches(&proxy, "b2", "v2").await;
}

// ---------------------------------------------------------------------------
// 3. Indexes going backwards lose nothing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_index_going_backwards_loses_no_update() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    // Push the indexes up, so that the reset goes well below them.
    for _ in 0..20 {
        consul.bump_without_change("web");
    }
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_RESET")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    let high = consul.service_index("web");

    // Snapshot restore: every index drops; then a registration, at an
    // index far below what the control plane has seen.
    consul.reset_index(2);
    consul.register(web("web-2", &b2, "v2")).unwrap();
    assert!(consul.service_index("web") < high);
    reaches(&proxy, "b2", "v2").await;

    // Later changes still arrive: a deregistration ...
    assert!(consul.deregister("web-1"));
    out(&proxy, "v1").await;
    only(&proxy, &["b2"]).await;
    // ... and a service that did not exist before (the catalog watch).
    consul
        .register(
            ServiceDef::new("api")
                .id("api-1")
                .address("127.0.0.1")
                .port(b3.addr.port())
                .check(passing()),
        )
        .unwrap();
    eventually("traffic for api reaches b3", || async {
        let reply = get_h1(proxy.addr(), "api", "/").await;
        reply.status == StatusCode::OK && reply.backend() == "b3"
    })
    .await;

    // A second reset, below the first: the next change still arrives.
    consul.reset_index(1);
    consul.register(web("web-1", &b1, "v1")).unwrap();
    reaches(&proxy, "b1", "v1").await;
}

// ---------------------------------------------------------------------------
// 4. Our client follows API.md 2.4
// ---------------------------------------------------------------------------

/// Paths of the Consul reads the control plane makes.
fn is_watch(r: &RecordedRequest) -> bool {
    r.path == "/v1/catalog/services"
        || r.path.starts_with("/v1/health/service/")
        || r.path.starts_with("/v1/kv/")
}

#[tokio::test]
async fn blocking_queries_send_index_wait_and_the_token() {
    const ENV: &str = "ALMOND_TEST_CC_TOKEN_PROTOCOL";
    const TOKEN: &str = "3f1c6a8e-protocol-test-token";
    std::env::set_var(ENV, TOKEN);
    let consul = ConsulDouble::builder().acl_token(Some(TOKEN)).start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let control = TestControl::start(&yaml(&consul, ENV)).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    // Let a few blocking rounds go by (1 s each).
    eventually("web's health watch has blocked three times", || async {
        requests_to(&consul, "/v1/health/service/web")
            .iter()
            .filter(|r| r.query_param("index").is_some())
            .count()
            >= 3
    })
    .await;

    let requests = consul.requests();
    let watches: Vec<&RecordedRequest> = requests.iter().filter(|r| is_watch(r)).collect();
    assert!(!watches.is_empty());
    for r in &watches {
        let what = format!("{} {}?{}", r.method, r.path, r.query);
        assert_eq!(
            r.header("x-consul-token").as_deref(),
            Some(TOKEN),
            "{what}: X-Consul-Token from the environment variable"
        );
        let index = r.query_param("index");
        let wait = r.query_param("wait");
        if let Some(wait) = &wait {
            let index: u64 = index
                .as_deref()
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("{what}: a wait without an index"));
            assert!(index > 0, "{what}: never index=0 with a wait");
            assert!(
                wait.ends_with("ms") || wait.ends_with('s') || wait.ends_with('m'),
                "{what}: wait is a Go duration with a unit"
            );
        }
        if index.is_some() {
            assert!(wait.is_some(), "{what}: a blocking call states its wait");
        }
    }

    for path in ["/v1/catalog/services", "/v1/health/service/web"] {
        let calls = requests_to(&consul, path);
        // First a non-blocking read ...
        let first = &calls[0];
        assert!(
            first.query_param("index").is_none_or(|i| i == "0")
                && first.query_param("wait").is_none(),
            "{path}: the first read does not block: {}",
            first.query
        );
        // ... then blocking ones, on the configured wait, at an index
        // Consul gave.
        let blocking: Vec<&RecordedRequest> = calls
            .iter()
            .filter(|r| r.query_param("index").is_some())
            .collect();
        assert!(!blocking.is_empty(), "{path}: no blocking query");
        for r in &blocking {
            assert_eq!(r.query_param("wait").as_deref(), Some("1000ms"), "{path}");
        }
    }
    let web_index: u64 = requests_to(&consul, "/v1/health/service/web")
        .last()
        .and_then(|r| r.query_param("index"))
        .and_then(|i| i.parse().ok())
        .unwrap();
    assert_eq!(
        web_index,
        consul.service_index("web"),
        "the index sent is the one Consul last gave"
    );
}

#[tokio::test]
async fn churn_is_rate_limited_and_identical_content_is_not_republished() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_CHURN")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    let control_index = control_metric(&control, "almond_control_snapshot_index", &[]).await;
    let proxy_index = proxy_metric(&proxy, "almond_config_index", &[]).await;
    assert!(control_index > 0.0);

    // Idempotent writes every 10 ms for 2 s: each wakes the watch with a
    // new index and the same content.
    let before = requests_to(&consul, "/v1/health/service/web").len();
    let start = tokio::time::Instant::now();
    let mut bumps = 0;
    while start.elapsed() < Duration::from_secs(2) {
        consul.bump_without_change("web");
        bumps += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = requests_to(&consul, "/v1/health/service/web").len() - before;
    // A burst of 2, then about one a second.
    assert!(
        calls <= 6,
        "{calls} health queries for {bumps} index moves in 2 s: the loop is not rate-limited"
    );
    assert!(calls >= 1, "the watch kept following");
    assert_eq!(
        control_metric(&control, "almond_control_snapshot_index", &[]).await,
        control_index,
        "identical content is not re-published"
    );
    assert_eq!(
        proxy_metric(&proxy, "almond_config_index", &[]).await,
        proxy_index
    );
    reaches(&proxy, "b1", "v1").await;
}

#[tokio::test]
async fn an_acl_refusal_is_reported_without_a_hot_loop() {
    const ENV: &str = "ALMOND_TEST_CC_TOKEN_ACL";
    const TOKEN: &str = "d2b0e7c4-unknown-token";
    std::env::set_var(ENV, TOKEN);
    let consul = ConsulDouble::builder()
        .acl_token(Some("management-token-not-ours"))
        .start()
        .await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let control = TestControl::launch_unready(&yaml(&consul, ENV)).await;

    eventually("the 403 is counted as a consul error", || async {
        consul_errors(&control).await >= 1.0
    })
    .await;
    assert_eq!(consul_up(&control).await, 0.0);
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let refused = requests_to(&consul, "/v1/catalog/services");
    assert!(refused
        .iter()
        .all(|r| r.header("x-consul-token").as_deref() == Some(TOKEN)));

    // Over a second, only a handful of requests: backing off, not
    // hammering a server that will keep saying no.
    let from = consul.requests().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = consul.requests().len() - from;
    assert!(during <= 5, "{during} requests in 1 s after a 403");

    // The operator grants the token: the control plane syncs (after its
    // back-off) without a restart.
    consul.add_acl_token(TOKEN, AclPolicy::read_all());
    eventually("the control plane becomes ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
}

/// A Consul with ACLs on, and `token` (in environment variable `env`)
/// allowed to read everything and write under `almond/`: the rights the
/// control plane needs; returns them too, to take some away.
async fn consul_with_writer(env: &str, token: &str) -> (ConsulDouble, AclPolicy) {
    std::env::set_var(env, token);
    let consul = ConsulDouble::builder()
        .acl_token(Some("management-token-not-ours"))
        .start()
        .await;
    let writer = AclPolicy::read_all().key_prefix("almond/", Access::Write);
    consul.add_acl_token(token, writer.clone());
    (consul, writer)
}

/// A token that loses `service:read` on a service gets a catalog list
/// without it (`X-Consul-Results-Filtered-By-ACLs`): the service is hidden,
/// not deregistered. It stays served, from its last state; a service
/// really deregistered meanwhile still leaves.
#[tokio::test]
async fn services_hidden_from_the_catalog_by_acls_stay_served() {
    const ENV: &str = "ALMOND_TEST_CC_TOKEN_HIDDEN_CATALOG";
    const TOKEN: &str = "7a0c9d2e-hidden-catalog";
    let (consul, writer) = consul_with_writer(ENV, TOKEN).await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let other = |id: &str, name: &str| {
        ServiceDef::new(name)
            .id(id)
            .address("127.0.0.1")
            .port(b1.addr.port())
            .check(passing())
    };
    consul.register(other("gone-1", "gone")).unwrap();
    let control = TestControl::start(&yaml(&consul, ENV)).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    assert!(control.get("/v1/services/gone").await.status == StatusCode::OK);

    // The token loses the read of web. The catalog's watch is blocked
    // with the old rights: the next change answers it, and the list after
    // that is read with the new ones, without web, and without the one
    // deregistered meanwhile.
    consul.add_acl_token(TOKEN, writer.service("web", Access::Deny));
    let served = |name: &'static str| {
        let control = &control;
        async move { control.get(&format!("/v1/services/{name}")).await.status == StatusCode::OK }
    };
    consul.register(other("new-1", "new")).unwrap();
    eventually("new is served", || served("new")).await;
    assert!(consul.deregister("gone-1"));
    consul.register(other("newer-1", "newer")).unwrap();
    eventually("newer is served", || served("newer")).await;
    eventually("the deregistered one has no endpoint left", || async {
        let reply = control.get("/v1/services/gone").await;
        reply.status == StatusCode::NOT_FOUND
            || reply.json()["subsets"]
                .as_object()
                .is_none_or(|s| s.values().all(|v| v["healthy"] == 0))
    })
    .await;
    assert_eq!(control.get("/v1/services/web").await.status, StatusCode::OK);
    for _ in 0..5 {
        reaches(&proxy, "b1", "v1").await;
    }
}

/// A token without `node:read` on the node of one of a service's
/// instances gets that service's health answers filtered
/// (`X-Consul-Results-Filtered-By-ACLs`). At start, with no last state to
/// keep, the instances it can see are served: the control plane gets
/// ready, and serves every service.
#[tokio::test]
async fn a_filtered_health_answer_at_start_does_not_keep_the_control_plane_unready() {
    const ENV: &str = "ALMOND_TEST_CC_TOKEN_FILTERED_HEALTH";
    const TOKEN: &str = "5d1e7f3a-filtered-health";
    let (consul, writer) = consul_with_writer(ENV, TOKEN).await;
    consul.add_acl_token(TOKEN, writer.node("hidden-node", Access::Deny));
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul
        .register(web("web-2", &b2, "v1").node("hidden-node"))
        .unwrap();
    let control = TestControl::start(&yaml(&consul, ENV)).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    assert_eq!(control.get("/ready").await.status, StatusCode::OK);
    let seen = spread(&proxy, "web", 20).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b1"], "{seen:?}");
    // Served from filtered answers, it follows them: an instance the
    // token can see, added later, is served too.
    let b3 = Backend::start("b3").await;
    consul.register(web("web-3", &b3, "v1")).unwrap();
    eventually("a visible instance added later is served", || async {
        spread(&proxy, "web", 20).await.contains_key("b3")
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. Splits in Consul KV
// ---------------------------------------------------------------------------

/// A token that loses `key:read` on a service's policy gets a list with
/// that key left out (`X-Consul-Results-Filtered-By-ACLs`): that is not a
/// deleted policy. The split stays, the error is counted.
#[tokio::test]
async fn policies_hidden_by_acls_are_kept_not_dropped() {
    const ENV: &str = "ALMOND_TEST_CC_TOKEN_HIDDEN";
    const TOKEN: &str = "5f1c3a7e-hidden-policies";
    let (consul, _) = consul_with_writer(ENV, TOKEN).await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let control = TestControl::start(&yaml(&consul, ENV)).await;
    let all_v2 = json!({ "weights": { "v1": 0, "v2": 100 } });
    let reply = control.put_split("web", &all_v2, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let split = || async { control.service("web").await["policy"]["split"].clone() };
    let want = json!({ "v1": 0, "v2": 100 });
    eventually("the split is followed", || async { split().await == want }).await;

    // The token loses the read of web's policy; another policy changes,
    // so the watch reads the list again, without web's.
    let hidden = AclPolicy::read_all().key(WEB_POLICY, Access::Deny);
    consul.add_acl_token(TOKEN, hidden);
    let errors = consul_errors(&control).await;
    consul.kv_put("almond/policy/other", "{}");
    eventually("the hidden list is counted as an error", || async {
        consul_errors(&control).await > errors
    })
    .await;
    assert_eq!(split().await, want, "the split a hidden key held stays");
}

/// A change whose check-and-set write loses to another writer (here a
/// rewrite of the stored policy that changes nothing, as the rollout
/// watcher's lease renewals are) is made again on what is stored now,
/// not refused: an operator's `abort` or `block` in an incident is not
/// answered 409 for a write they could not see. (It was.)
#[tokio::test]
async fn a_change_that_loses_its_write_to_a_renewal_is_made_again() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_CAS")).await;
    let reply = (control.put_split("web", &json!({ "weights": { "v1": 100 } }), None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let writes = || {
        requests_to(&consul, &format!("/v1/kv/{WEB_POLICY}"))
            .into_iter()
            .filter(|r| r.method == http::Method::PUT)
            .count()
    };
    let before = writes();
    // Every Consul answer now comes 1 s late: the change's write is
    // seen arriving before Consul acts on it.
    consul.set_delay(Duration::from_secs(1));
    let body = json!({ "weights": { "v1": 100 }, "sticky_header": "x-user" });
    let change = control.put_split("web", &body, None);
    let renewal = async {
        eventually("the change's write on its way", || async {
            writes() > before
        })
        .await;
        assert!(consul.kv_bump_without_change(WEB_POLICY).is_some());
    };
    let (reply, ()) = within("the change", async { tokio::join!(change, renewal) }).await;
    consul.set_delay(Duration::ZERO);
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(writes(), before + 2, "written again after the lost write");
    let stored = consul.kv_get(WEB_POLICY).unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
    assert_eq!(stored["sticky_header"], "x-user", "{stored}");
}

/// A TCP balancer on 127.0.0.1 in front of control plane replicas: it
/// forwards each connection to the target of the moment; a switch closes
/// the connections open to the old one (as a balancer that drains a
/// backend).
async fn balancer(first: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (switch, target) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut target = target.clone();
            tokio::spawn(async move {
                let to = *target.borrow_and_update();
                let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    _ = target.changed() => {}
                }
            });
        }
    });
    (addr, switch)
}

/// A proxy behind a balancer that moves it from one replica to another
/// whose read of the policy store is behind (here its token lost the read
/// of the service's policy; a replica cut off from Consul, or one a
/// second late, is the same) keeps the newer state it has rather than go
/// back in time, until the replica catches up. (It took the replica's
/// state at once: the canary its split had taken out got traffic again.)
#[tokio::test]
async fn a_proxy_moved_to_a_replica_behind_keeps_the_newer_state() {
    const A_ENV: &str = "ALMOND_TEST_CC_TOKEN_REPLICA_A";
    const A_TOKEN: &str = "0b7e41d2-replica-a";
    const B_ENV: &str = "ALMOND_TEST_CC_TOKEN_REPLICA_B";
    const B_TOKEN: &str = "0b7e41d2-replica-b";
    let (consul, writer) = consul_with_writer(A_ENV, A_TOKEN).await;
    std::env::set_var(B_ENV, B_TOKEN);
    consul.add_acl_token(B_TOKEN, writer.clone());
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let a = TestControl::start(&yaml(&consul, A_ENV)).await;
    let b = TestControl::start(&yaml(&consul, B_ENV)).await;
    let canary = json!({ "weights": { "v1": 50, "v2": 50 } });
    let reply = a.put_split("web", &canary, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let split = |c: &TestControl| {
        let c = c.addr;
        async move {
            let reply = get_h1(c, &c.to_string(), "/v1/services/web").await;
            reply.json()["policy"]["split"].clone()
        }
    };
    eventually("B follows the canary split", || async {
        split(&b).await == canary["weights"]
    })
    .await;
    let (lb, switch) = balancer(a.addr).await;
    let proxy = ProxyProcess::start(&control_proxy_yaml(&format!("http://{lb}"), None)).await;
    let backends = |n: usize| {
        let addr = proxy.addr();
        async move {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let reply = get_h1(addr, "web", "/").await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                *seen.entry(reply.backend().to_owned()).or_insert(0) += 1;
            }
            seen
        }
    };
    eventually("the proxy has the canary", || async {
        backends(20).await.contains_key("b2")
    })
    .await;

    // B stops reading web's policy; A takes the canary out.
    let errors = consul_errors(&b).await;
    consul.add_acl_token(B_TOKEN, writer.clone().key(WEB_POLICY, Access::Deny));
    let stable = json!({ "weights": { "v1": 100, "v2": 0 } });
    let reply = a.put_split("web", &stable, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually("B's read of the store fails", || async {
        consul_errors(&b).await > errors
    })
    .await;
    assert_eq!(split(&b).await, canary["weights"], "B is behind");
    eventually("the proxy takes the canary out", || async {
        backends(20).await.keys().collect::<Vec<_>>() == ["b1"]
    })
    .await;

    // The balancer moves the proxy to B: it keeps the state it has.
    switch.send(b.addr).unwrap();
    eventually("the proxy sees B behind", || async {
        proxy.logs().contains("control plane replica behind")
    })
    .await;
    let seen = backends(40).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b1"], "{seen:?}");

    // B reads the store again and catches up: the proxy takes its state.
    consul.add_acl_token(B_TOKEN, writer);
    eventually("B catches up", || async {
        split(&b).await == stable["weights"]
    })
    .await;
    eventually("the proxy takes B's state", || async {
        proxy.logs().contains("took its full state")
    })
    .await;
    let seen = backends(40).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b1"], "{seen:?}");
}

/// `consul.stale` spreads the watches over the servers, but the read a
/// check-and-set write presents goes to the leader: a lagging follower's
/// `ModifyIndex` would fail the write for no other writer.
#[tokio::test]
async fn check_and_set_reads_are_never_stale() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_STALE").replace(
        "token_env: ALMOND_TEST_CC_TOKEN_STALE }",
        "token_env: ALMOND_TEST_CC_TOKEN_STALE, stale: true }",
    );
    let control = TestControl::start(&config).await;
    let reply = (control.put_split("web", &json!({ "weights": { "v1": 100 } }), None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let watches = requests_to(&consul, "/v1/health/service/web");
    assert!(
        watches.iter().any(|r| r.query.contains("stale")),
        "the watches are stale reads"
    );
    let reads: Vec<_> = requests_to(&consul, &format!("/v1/kv/{WEB_POLICY}"))
        .into_iter()
        .filter(|r| r.method == http::Method::GET)
        .collect();
    assert!(!reads.is_empty(), "the write read the policy first");
    for r in reads {
        assert!(!r.query.contains("stale"), "a stale CAS read: ?{}", r.query);
    }
}

/// `consul.stale` reads are bounded: they ask with `max_stale`, so a
/// server out of touch with the leader for longer does not answer from
/// its frozen state. With no leader and the last contact long gone, the
/// watches fail (counted) and the last state stays.
#[tokio::test]
async fn stale_reads_are_bounded_by_max_stale() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_MAXSTALE").replace(
        "token_env: ALMOND_TEST_CC_TOKEN_MAXSTALE }",
        "token_env: ALMOND_TEST_CC_TOKEN_MAXSTALE, stale: true }",
    );
    let control = TestControl::start(&config).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    let watches = requests_to(&consul, "/v1/health/service/web");
    assert!(
        watches.iter().all(|r| r.query.contains("max_stale=10s")),
        "{:?}",
        watches.iter().map(|r| &r.query).collect::<Vec<_>>()
    );
    // An election: no server knows a leader, the one answering heard
    // from it a moment ago. Stale reads go on (what `stale` is for).
    let errors = consul_errors(&control).await;
    consul.set_leader(false);
    let b3 = Backend::start("b3").await;
    consul.register(web("web-3", &b3, "v3")).unwrap();
    reaches(&proxy, "b3", "v3").await;
    assert_eq!(consul_errors(&control).await, errors, "no read failed");
    consul.set_leader(true);

    // The servers lose the leader; the one answering last heard from it a
    // minute ago.
    let errors = consul_errors(&control).await;
    let kv_reads = |consul: &ConsulDouble| {
        consul
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/v1/kv/") && r.method == http::Method::GET)
            .collect::<Vec<_>>()
    };
    let kv_before = kv_reads(&consul).len();
    // The policy watch's blocking reads come back within a second.
    consul.set_max_wait(Some(Duration::from_secs(1)));
    consul.set_leader(false);
    consul.set_last_contact(Duration::from_secs(60));
    let b2 = Backend::start("b2").await;
    consul.register(web("web-2", &b2, "v2")).unwrap();
    eventually("the stale answers are refused, and counted", || async {
        consul_errors(&control).await > errors
    })
    .await;
    assert_eq!(consul_up(&control).await, 0.0);
    reaches(&proxy, "b1", "v1").await;
    // Consul does not ask the leader again for KV reads, whatever
    // `max_stale` says: their answers come from the server as it is, and
    // their headers say how old. The policy watch asks the leader itself.
    eventually("a stale KV answer asked again of the leader", || async {
        kv_reads(&consul)[kv_before..]
            .iter()
            .any(|r| !r.query.contains("stale"))
    })
    .await;
}

/// The policy watch is rate-limited like the health watches: an index of
/// 0 from Consul does not turn it into a busy loop (API.md 2.4).
#[tokio::test]
async fn the_policy_watch_is_rate_limited_on_a_zero_index() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.kv_put("almond/policy/other", "{}");
    let _control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_ZERO")).await;
    consul.set_zero_index(true);
    // A change wakes the blocked watch: its answer says index 0.
    consul.kv_put("almond/policy/other", "{ }");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kv = |consul: &ConsulDouble| requests_to(consul, "/v1/kv/almond/policy/").len();
    let before = kv(&consul);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = kv(&consul) - before;
    assert!(during <= 6, "{during} policy reads in 2 s on a zero index");
    // Paced, not stopped: an index of 0 says to read again from the start.
    assert!(during >= 1, "no policy read in 2 s on a zero index");
}

/// A control plane starting on a policy it cannot read (written by hand,
/// or by a newer release) stays unready rather than serve the service
/// without it (proxies would drop its split, guards and allow-list);
/// once the key is fixed it gets ready, with the policy.
#[tokio::test]
async fn an_unreadable_policy_at_start_keeps_the_control_plane_unready() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    consul.kv_put(WEB_POLICY, r#"{"split": {"v1": "#);
    // A folder and an empty value (Consul's `null`): no policy, not an
    // unreadable one.
    consul.kv_put("almond/policy/", "");
    consul.kv_put("almond/policy/other", "");
    let control = TestControl::launch_unready(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_BADKV")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ready on an unreadable policy"
    );
    consul.kv_put(
        WEB_POLICY,
        r#"{"version": 1, "split": {"v1": 0, "v2": 100}}"#,
    );
    eventually("the control plane becomes ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    let policy = control.service("web").await["policy"].clone();
    assert_eq!(policy["split"], json!({ "v1": 0, "v2": 100 }), "{policy}");
}

/// Consul Connect's sidecar proxies (services of their own, kind
/// `connect-proxy`, mTLS on their ports) are no endpoints: almond served
/// `web-sidecar-proxy` as a plain HTTP service, and its requests failed
/// on the TLS port.
#[tokio::test]
async fn connect_sidecar_proxies_are_no_endpoints() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let sidecar = ServiceDef::new("web-sidecar-proxy")
        .id("web-1-sidecar-proxy")
        .kind("connect-proxy")
        .address("127.0.0.1")
        .port(21000)
        .check(passing());
    consul.register(sidecar).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_SIDECAR")).await;
    let snapshot = control.get("/v1/snapshot?wait=0s").await.json();
    let web = &snapshot["services"]["web"]["endpoints"];
    assert_eq!(web.as_array().map(Vec::len), Some(1), "{snapshot}");
    let proxies = &snapshot["services"]["web-sidecar-proxy"]["endpoints"];
    assert!(
        proxies.as_array().is_none_or(|e| e.is_empty()),
        "{snapshot}"
    );
}

/// A service whose policy key holds an empty value (made by hand, in
/// Consul's UI) has no policy, and a change writes one over it: it used
/// to fail every split, rollback and rollout write (the empty value was
/// read as broken JSON) until the key was deleted.
#[tokio::test]
async fn an_empty_policy_value_is_written_over() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    consul.kv_put(WEB_POLICY, "");
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_EMPTYKV")).await;
    let all_v2 = json!({ "weights": { "v1": 0, "v2": 100 } });
    let reply = control.put_split("web", &all_v2, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        stored_policy(&consul)["split"],
        json!({ "v1": 0, "v2": 100 })
    );
}

/// The policy stored in the double's KV.
fn stored_policy(consul: &ConsulDouble) -> Value {
    let entry = consul
        .kv_get(WEB_POLICY)
        .unwrap_or_else(|| panic!("no {WEB_POLICY} in Consul KV"));
    serde_json::from_slice(&entry.value).unwrap_or_else(|e| {
        panic!(
            "{WEB_POLICY} is not JSON ({e}): {}",
            String::from_utf8_lossy(&entry.value)
        )
    })
}

#[tokio::test]
async fn splits_live_in_consul_kv() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_KV");
    let control = TestControl::start(&config).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    reaches(&proxy, "b2", "v2").await;
    assert!(consul.kv_get(WEB_POLICY).is_none());

    // A split is written to almond/policy/web and reaches traffic.
    let all_v2 = json!({ "weights": { "v1": 0, "v2": 100 } });
    let reply = control.put_split("web", &all_v2, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let stored = stored_policy(&consul);
    assert_eq!(stored["split"], json!({ "v1": 0, "v2": 100 }));
    assert_eq!(stored["version"], json!(1));
    eventually("the proxy has the 0/100 split", || async {
        let labels = [("service", "web"), ("subset", "v2")];
        proxy_metric(&proxy, "almond_split_weight", &labels).await == 100.0
    })
    .await;
    only(&proxy, &["b2"]).await;

    // Two shifts naming the same version at once: one wins, one is told
    // to read again; the winner is what is stored and served.
    let version = stored["version"].as_u64().unwrap();
    let a = json!({ "weights": { "v1": 100, "v2": 0 }, "version": version });
    let b = json!({ "weights": { "v1": 90, "v2": 10 }, "version": version });
    let (ra, rb) = tokio::join!(
        control.put_split("web", &a, None),
        control.put_split("web", &b, None)
    );
    let mut statuses = [ra.status.as_u16(), rb.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 409],
        "a: {} {}; b: {} {}",
        ra.status,
        ra.text(),
        rb.status,
        rb.text()
    );
    let winner = if ra.status == StatusCode::OK { &a } else { &b };
    let stored = stored_policy(&consul);
    assert_eq!(stored["split"], winner["weights"]);
    assert_eq!(stored["version"], json!(version + 1), "one write, not two");
    let v1_weight = winner["weights"]["v1"].as_f64().unwrap();
    eventually("the proxy serves the winning split", || async {
        proxy_metric(
            &proxy,
            "almond_split_weight",
            &[("service", "web"), ("subset", "v1")],
        )
        .await
            == v1_weight
    })
    .await;

    // Back to all-v2, then restart the control plane on the same port:
    // the new one reads the split from Consul.
    let reply = control.put_split("web", &all_v2, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    only(&proxy, &["b2"]).await;
    let addr = control.addr;
    control.shutdown().await;
    // The proxy rides out the restart on its last state.
    only(&proxy, &["b2"]).await;
    let control = TestControl::start_on(&config, addr).await;
    assert_eq!(
        control.service("web").await["service"]["split"],
        json!({ "v1": 0, "v2": 100 }),
        "a restarted control plane serves the stored split once ready"
    );
    // A new instance (subset v3, outside the split) reaches the proxy
    // through the new control plane, and the split still holds.
    consul.register(web("web-3", &b3, "v3")).unwrap();
    reaches(&proxy, "b3", "v3").await;
    only(&proxy, &["b2"]).await;
    // A proxy that starts now gets the split with its first snapshot.
    let fresh = start_following(&control.url(), None).await;
    let first = spread(&fresh, "web", 30).await;
    assert_eq!(first.keys().collect::<Vec<_>>(), ["b2"], "{first:?}");

    // Another replica (here: a KV write behind the control plane's back)
    // changes the split: it is picked up.
    let mut next = stored_policy(&consul);
    next["version"] = json!(next["version"].as_u64().unwrap() + 1);
    next["previous"] = next["split"].clone();
    next["split"] = json!({ "v1": 100, "v2": 0 });
    consul.kv_put(WEB_POLICY, serde_json::to_vec(&next).unwrap());
    only(&proxy, &["b1"]).await;
    only(&fresh, &["b1"]).await;
    assert_eq!(
        control.service("web").await["policy"]["version"],
        next["version"]
    );

    // A value it cannot read (a newer replica's fields, a hand edit): the
    // last policy read stays, split and all, and so does the traffic.
    let index = consul.kv_put(WEB_POLICY, b"{\"split\": {\"v1\": ".to_vec());
    eventually("the control plane has read the bad value", || async {
        consul.kv_prefix_index("almond/policy/") >= index
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        control.service("web").await["policy"]["split"],
        json!({ "v1": 100, "v2": 0 })
    );
    only(&proxy, &["b1"]).await;
}

// ---------------------------------------------------------------------------
// 6. Ready only after the first full sync
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ready_only_after_the_first_full_sync() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    // Consul answers slowly: the first answers are 2 s away.
    consul.set_delay(Duration::from_secs(2));
    let control = TestControl::launch_unready(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_READY")).await;
    let proxy = TestProxy::start(&control_proxy_yaml(&control.url(), None)).await;
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ready before Consul answered"
    );
    assert_eq!(
        proxy.admin_get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the proxy has no snapshot yet"
    );
    consul.set_delay(Duration::ZERO);

    eventually("the control plane becomes ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    // Ready means synced: web is there with both instances.
    let endpoints = control.service("web").await["service"]["endpoints"].clone();
    assert_eq!(endpoints.as_array().map(Vec::len), Some(2), "{endpoints}");
    eventually("the proxy becomes ready", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
    reaches(&proxy, "b1", "v1").await;
    reaches(&proxy, "b2", "v2").await;
}

#[tokio::test]
async fn not_ready_while_consul_fails_before_the_first_sync() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.set_leader(false);
    let control =
        TestControl::launch_unready(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_NOLEADER")).await;
    let proxy = TestProxy::start(&control_proxy_yaml(&control.url(), None)).await;
    eventually("the failure is counted", || async {
        consul_errors(&control).await >= 1.0
    })
    .await;
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        proxy.admin_get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A long-poll that runs out before the first sync gets no snapshot: an
    // empty catalog would take every service from a proxy that had them.
    let reply = control
        .get("/v1/snapshot?proxy=p&epoch=0&index=0&wait=200ms")
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );

    consul.set_leader(true);
    eventually("the proxy becomes ready", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(control.get("/ready").await.status, StatusCode::OK);
    reaches(&proxy, "b1", "v1").await;
}

#[tokio::test]
async fn a_proxy_waiting_on_a_starting_control_plane_is_served_once_it_is_ready() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    // The first request fails: the policy watch's, which starts first, so
    // the policies arrive (about 1 s later) after the services.
    consul.fail_next(1, 500, "No cluster leader");
    let control =
        TestControl::launch_unready(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_LATEPOLICY")).await;
    let proxy = TestProxy::start(&control_proxy_yaml(&control.url(), None)).await;
    eventually("the control plane becomes ready", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    // The proxy's long-poll (30 s) began before: it must answer now.
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        while proxy.admin_get("/ready").await.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let first = consul.requests()[0].path.clone();
    assert!(
        served.is_ok(),
        "the proxy got no snapshot within 10 s of the control plane being ready \
         (the first, failed, request was {first})"
    );
    reaches(&proxy, "b1", "v1").await;
}

// ---------------------------------------------------------------------------
// 7. Contract: the API's own payloads through our parser
// ---------------------------------------------------------------------------

/// `shared/consul/fixtures`, found by walking up from the workspace.
fn fixtures() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .map(|dir| dir.join("shared/consul/fixtures"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| {
            panic!(
                "no shared/consul/fixtures in {} or above: the Consul API fixtures are missing",
                start.display()
            )
        })
}

fn fixture(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn instances(body: &Value) -> Vec<Instance> {
    serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("a health answer our parser refuses: {e}\n{body:#}"))
}

/// The fixture `health-service.json` with `edit` applied to its one
/// instance.
fn redis(edit: impl FnOnce(&mut Value)) -> Vec<Instance> {
    let mut body = fixture("health-service.json");
    edit(&mut body[0]);
    instances(&body)
}

fn endpoint(addr: &str, subset: &str, weight: u32) -> Endpoint {
    Endpoint {
        addr: addr
            .parse()
            .unwrap_or_else(|e| panic!("address {addr}: {e}")),
        subset: subset.to_owned(),
        weight,
        zone: None,
    }
}

/// Sets the status of the check `id` of an instance.
fn set_status(instance: &mut Value, id: &str, status: &str) {
    let Some(checks) = instance["Checks"].as_array_mut() else {
        panic!("no Checks array")
    };
    let check = checks
        .iter_mut()
        .find(|c| c["CheckID"] == id)
        .unwrap_or_else(|| panic!("no check {id}"));
    check["Status"] = json!(status);
}

#[test]
fn the_health_fixture_becomes_a_weighted_endpoint() {
    let body = fixture("health-service.json");
    let parsed = instances(&body);
    assert_eq!(parsed.len(), 1);
    // Both checks pass: Weights.Passing.
    assert_eq!(instance_weight(&parsed[0]), Some(10));
    let svc = to_service("redis", &parsed, "version");
    assert_eq!(
        svc.endpoints,
        vec![endpoint("10.1.10.12:8000", DEFAULT_SUBSET, 10)]
    );
    assert_eq!(svc.protocol, Protocol::Http1);
    assert_eq!(svc.split, None);
    // The subset comes from the configured Meta key.
    let svc = to_service("redis", &parsed, "redis_version");
    assert_eq!(svc.endpoints, vec![endpoint("10.1.10.12:8000", "4.0", 10)]);
}

#[test]
fn the_zone_comes_from_service_meta_else_node_meta() {
    let zone = |edit: fn(&mut Value), key: &str| {
        let svc = to_service_resolved("redis", &redis(edit), ("version", key), &Default::default());
        svc.endpoints[0].zone.clone()
    };
    assert_eq!(zone(|_| {}, "zone"), None);
    assert_eq!(
        zone(|i| i["Node"]["Meta"] = json!({ "zone": "eu-1a" }), "zone"),
        Some("eu-1a".to_owned())
    );
    assert_eq!(
        zone(
            |i| {
                i["Node"]["Meta"] = json!({ "zone": "eu-1a" });
                i["Service"]["Meta"]["zone"] = json!("eu-1b");
            },
            "zone"
        ),
        Some("eu-1b".to_owned()),
        "the service's meta wins"
    );
    assert_eq!(
        zone(|i| i["Node"]["Meta"] = json!({ "az": "eu-1c" }), "az"),
        Some("eu-1c".to_owned()),
        "zone_key names the key"
    );
    assert_eq!(
        zone(|i| i["Node"]["Meta"] = json!({ "az": "eu-1c" }), "zone"),
        None
    );
}

#[test]
fn the_health_fixture_follows_consuls_health_rules() {
    let weight = |edit: fn(&mut Value)| instance_weight(&redis(edit)[0]);
    // Warning: Weights.Warning (1 in the fixture).
    assert_eq!(
        weight(|i| set_status(i, "service:redis", "warning")),
        Some(1)
    );
    // Warning with Warning: 0 drains.
    assert_eq!(
        weight(|i| {
            set_status(i, "service:redis", "warning");
            i["Service"]["Weights"]["Warning"] = json!(0);
        }),
        None
    );
    // Critical: out; a node-level check counts too.
    assert_eq!(weight(|i| set_status(i, "service:redis", "critical")), None);
    assert_eq!(weight(|i| set_status(i, "serfHealth", "critical")), None);
    assert_eq!(weight(|i| set_status(i, "serfHealth", "warning")), Some(1));
    // Maintenance, service or node: out, whatever the status says.
    for id in ["_service_maintenance:redis", "_node_maintenance"] {
        let mut body = fixture("health-service.json");
        body[0]["Checks"].as_array_mut().unwrap().push(json!({
            "Node": "foobar", "CheckID": id, "Name": "Maintenance Mode",
            "Status": "critical", "Notes": "", "Output": "",
            "ServiceID": if id == "_node_maintenance" { "" } else { "redis" },
            "ServiceName": "", "ServiceTags": []
        }));
        assert_eq!(instance_weight(&instances(&body)[0]), None, "{id}");
        assert!(to_service("redis", &instances(&body), "version")
            .endpoints
            .is_empty());
    }
    // No Weights: Consul's default {1, 1}.
    assert_eq!(
        weight(|i| {
            i["Service"].as_object_mut().unwrap().remove("Weights");
        }),
        Some(1)
    );
    // No checks at all: passing.
    assert_eq!(weight(|i| i["Checks"] = json!([])), Some(10));
}

#[test]
fn the_health_fixture_gives_addresses_subsets_and_protocols() {
    // An empty Service.Address means the node's.
    let parsed = redis(|i| {
        i["Service"]["Address"] = json!("");
        i["Node"]["Address"] = json!("10.1.10.99");
    });
    assert_eq!(
        to_service("redis", &parsed, "version").endpoints,
        vec![endpoint("10.1.10.99:8000", DEFAULT_SUBSET, 10)]
    );
    // Meta.version names the subset; Meta.protocol the upstream protocol.
    let parsed = redis(|i| {
        i["Service"]["Meta"]["version"] = json!("v2");
        i["Service"]["Meta"]["protocol"] = json!("grpc");
    });
    let svc = to_service("redis", &parsed, "version");
    assert_eq!(svc.endpoints, vec![endpoint("10.1.10.12:8000", "v2", 10)]);
    assert_eq!(svc.protocol, Protocol::Http2);
    // A hostname is not an address we can dial: skipped, not fatal.
    let parsed = redis(|i| i["Service"]["Address"] = json!("redis.service.consul"));
    assert!(to_service("redis", &parsed, "version").endpoints.is_empty());
    // Null Meta (older agents) is accepted.
    let parsed = redis(|i| i["Service"]["Meta"] = Value::Null);
    assert_eq!(
        to_service("redis", &parsed, "version").endpoints,
        vec![endpoint("10.1.10.12:8000", DEFAULT_SUBSET, 10)]
    );
    // The catalog list parses as name -> tags.
    let names: BTreeMap<String, Vec<String>> =
        serde_json::from_value(fixture("catalog-services.json")).unwrap();
    assert!(names.contains_key("redis") && names.contains_key("consul"));
}

#[tokio::test]
async fn the_double_and_our_parser_agree() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul
        .register(web("web-1", &b1, "v1").weights(3, 1))
        .unwrap();
    consul
        .register(web("web-2", &b2, "v2").weights(5, 2))
        .unwrap();
    consul.set_check("service:web-2", Status::Warning);
    let reply = get_h1(consul.addr(), "consul", "/v1/health/service/web").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    // The double's answer has the fixture's shape.
    let sample = fixture("health-service.json");
    for key in ["Node", "Service", "Checks"] {
        assert!(
            sample[0].get(key).is_some() && body[0].get(key).is_some(),
            "{key}"
        );
    }
    let svc = to_service("web", &instances(&body), "version");
    let addr = |b: &Backend| SocketAddr::from(([127, 0, 0, 1], b.addr.port())).to_string();
    assert_eq!(
        svc.endpoints,
        vec![endpoint(&addr(&b1), "v1", 3), endpoint(&addr(&b2), "v2", 2)]
    );
}

/// After a Consul restore (indexes going backwards) the control plane keeps
/// its own index monotonic, above Consul's; a control plane restarted then
/// numbers from Consul's low indexes. The proxy still takes its state: the
/// new process has another epoch, so the proxy gets a full snapshot.
#[tokio::test]
async fn a_restart_after_a_consul_restore_still_reaches_proxies() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    for _ in 0..50 {
        consul.bump_without_change("web");
    }
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_RESTORE_RESTART");
    let control = TestControl::start(&config).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    consul.reset_index(2);
    let addr = control.addr;
    control.shutdown().await;
    let _control = TestControl::start_on(&config, addr).await;
    consul.register(web("web-2", &b2, "v2")).unwrap();
    reaches(&proxy, "b2", "v2").await;
}

/// A change made while the control plane is down reaches the proxies once
/// it is back, whatever order Consul's answers arrive in at its start (the
/// order decides a restarted control plane's indexes, so a delta cut by
/// the new numbering from the proxy's old index could miss it).
#[tokio::test]
async fn a_change_made_while_control_was_down_reaches_proxies() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v1")).unwrap();
    // Other services, registered in turn, so that start-up order matters.
    for i in 0..10 {
        let other = ServiceDef::new(&format!("other-{i}"))
            .id(&format!("other-{i}"))
            .address("127.0.0.1")
            .port(10_000 + i)
            .check(passing());
        consul.register(other).unwrap();
    }
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_DOWN_CHANGE");
    let control = TestControl::start(&config).await;
    let proxy = start_following(&control.url(), None).await;
    eventually("both web instances serve", || async {
        spread(&proxy, "web", 20).await.len() == 2
    })
    .await;
    let addr = control.addr;
    control.shutdown().await;
    assert!(consul.deregister("web-2"));
    let _control = TestControl::start_on(&config, addr).await;
    // Waits on the proxy's table, not on traffic: P2C may well send 20
    // requests in a row to b1 while b2 is still listed.
    eventually("web-2 leaves the proxy's table", || async {
        !lists(&proxy, "web", b2.addr.port()).await
    })
    .await;
    assert!(lists(&proxy, "web", b1.addr.port()).await);
    only(&proxy, &["b1"]).await;
}

/// Whether the proxy's admin `/endpoints` lists an endpoint of `svc` on
/// `port`.
async fn lists(proxy: &TestProxy, svc: &str, port: u16) -> bool {
    let page = proxy.admin_get("/endpoints").await.json();
    let subsets = page[svc]["subsets"].as_array().cloned().unwrap_or_default();
    subsets
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .any(|e| {
            e["addr"]
                .as_str()
                .is_some_and(|a| a.ends_with(&format!(":{port}")))
        })
}

/// A TLS front for the Consul double, as a Consul agent with `https` and
/// `verify_incoming` would be: a certificate from `ca` for 127.0.0.1, and
/// (with `clients`) client certificates signed by that CA required.
async fn tls_front(consul: SocketAddr, server: &Leaf, clients: Option<&Ca>) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_slice(server.cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    }
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // refused handshake: the client sees the alert
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(consul).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    addr
}

/// PEM files in a temp dir.
fn pem_files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// The control config for an `https://` Consul at `front` with the TLS
/// keys `tls` (`ca_file: ..., cert_file: ...`).
fn https_yaml(front: SocketAddr, tls: &str, token_env: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nsource:\n  consul: {{ addr: \"https://{front}\", wait: 1s, token_env: {token_env}, {tls} }}\nstore: consul\nsubset_key: version\n"
    )
}

/// Consul behind HTTPS that requires client certificates: with the CA and
/// a client certificate, endpoints and the policy store (KV) work as over
/// plain HTTP.
#[tokio::test]
async fn consul_over_https_with_a_client_certificate() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let ca = Ca::new("consul-ca");
    let front = tls_front(consul.addr(), &ca.leaf("127.0.0.1"), Some(&ca)).await;
    let client = ca.leaf("almond-control");
    let dir = pem_files(&[
        ("ca.pem", &ca.pem),
        ("cert.pem", &client.cert),
        ("key.pem", &client.key),
    ]);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let tls = format!(
        "ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\"",
        p("ca.pem"),
        p("cert.pem"),
        p("key.pem")
    );
    let control = TestControl::start(&https_yaml(front, &tls, "ALMOND_TEST_CC_TOKEN_HTTPS")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    assert_eq!(consul_up(&control).await, 1.0);
    // The policy store writes through the same client.
    let b2 = Backend::start("b2").await;
    consul.register(web("web-2", &b2, "v2")).unwrap();
    reaches(&proxy, "b2", "v2").await;
    let all_v2 = json!({ "weights": { "v1": 0, "v2": 100 } });
    let shift = control.put_split("web", &all_v2, None).await;
    assert_eq!(shift.status, StatusCode::OK, "{}", shift.text());
    assert_eq!(
        stored_policy(&consul)["split"],
        json!({ "v1": 0, "v2": 100 })
    );
    eventually("the proxy has the 0/100 split", || async {
        let labels = [("service", "web"), ("subset", "v2")];
        proxy_metric(&proxy, "almond_split_weight", &labels).await == 100.0
    })
    .await;
    only(&proxy, &["b2"]).await;
}

/// A Consul certificate from a CA the control plane does not trust is
/// refused: Consul counts as down, errors are counted, nothing is served.
#[tokio::test]
async fn a_consul_certificate_from_another_ca_is_refused() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let real = Ca::new("consul-ca");
    let other = Ca::new("someone-else");
    let front = tls_front(consul.addr(), &real.leaf("127.0.0.1"), None).await;
    let dir = pem_files(&[("ca.pem", &other.pem)]);
    let tls = format!("ca_file: \"{}\"", dir.path().join("ca.pem").display());
    let control =
        TestControl::launch_unready(&https_yaml(front, &tls, "ALMOND_TEST_CC_TOKEN_HTTPS_BADCA"))
            .await;
    eventually("the refusals are counted", || async {
        consul_errors(&control).await >= 1.0
    })
    .await;
    assert_eq!(consul_up(&control).await, 0.0);
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(consul.requests().is_empty(), "nothing reached Consul");
}

/// TLS files that cannot be used stop the control plane at start with the
/// key and the file named; TLS keys without https are config errors.
#[test]
fn consul_tls_settings_are_checked() {
    let missing = "listen: 127.0.0.1:0\nsource:\n  consul: { addr: \"https://127.0.0.1:8501\", ca_file: /nonexistent/ca.pem }\n";
    let config = almond_config::load_control(missing, "test").unwrap();
    let err = almond_control::Control::new(config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("source.consul.ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let plain = "listen: 127.0.0.1:0\nsource:\n  consul:\n    addr: \"http://127.0.0.1:8500\"\n    cert_file: /etc/c.pem\n";
    let err = almond_config::load_control(plain, "test")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("source.consul.cert_file") && err.contains("line 5") && err.contains("https"),
        "{err}"
    );
}

/// Consul allows a host name as `Service.Address`: the control plane looks
/// it up and serves the address (here `localhost`, whose IPv4 address the
/// backend listens on); a name that does not resolve leaves that instance
/// out and keeps the others.
#[tokio::test]
async fn instance_host_names_are_resolved() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul
        .register(web("web-1", &b1, "v1").address("localhost"))
        .unwrap();
    consul
        .register(web("web-2", &b2, "v2").address("no-such-host.invalid"))
        .unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_HOSTNAME")).await;
    let proxy = start_following(&control.url(), None).await;
    reaches(&proxy, "b1", "v1").await;
    assert!(lists(&proxy, "web", b1.addr.port()).await);
    assert!(!lists(&proxy, "web", b2.addr.port()).await);
    let served = control.service("web").await;
    let addrs: Vec<&str> = served["service"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["addr"].as_str())
        .collect();
    assert_eq!(addrs, vec![format!("127.0.0.1:{}", b1.addr.port())]);
}

/// The proxies `control`'s live view of `web` scraped.
async fn counted(control: &TestControl) -> Value {
    let live = control.get("/v1/services/web/live?window=1ms").await;
    live.json()["proxies"].clone()
}

/// Control-plane replicas on one Consul share the proxies they see
/// (`almond/proxies/<replica>` in KV): each one's live view, which is what
/// its watcher scrapes, counts the proxies following the other, and a
/// fleet-wide limit is divided by the whole fleet. A replica that stops
/// takes its roster with it.
#[tokio::test]
async fn replicas_count_each_others_proxies() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let config = yaml(&consul, "ALMOND_TEST_CC_TOKEN_ROSTER");
    let a = TestControl::start(&config).await;
    let b = TestControl::start(&config).await;
    let follower = |control: &TestControl, id: &str| {
        control_proxy_yaml(&control.url(), None)
            .replace("proxy_id: test-proxy", &format!("proxy_id: {id}"))
    };
    let pa = start_following_with(&follower(&a, "pa")).await;
    let pb = start_following_with(&follower(&b, "pb")).await;
    reaches(&pa, "b1", "v1").await;
    reaches(&pb, "b1", "v1").await;

    for control in [&a, &b] {
        eventually("each replica counts both proxies", || async {
            counted(control).await == 2
        })
        .await;
    }
    // Either replica lists the whole fleet: its own follower as it saw
    // it, the other's with the replica it follows.
    for (control, own, other) in [(&a, "pa", "pb"), (&b, "pb", "pa")] {
        let proxies = control.get("/v1/proxies").await.json();
        assert!(proxies[own]["index"].is_u64(), "{proxies:#}");
        assert!(proxies[own].get("replica").is_none(), "{proxies:#}");
        let replica = proxies[other]["replica"].as_str().unwrap_or_default();
        assert!(!replica.is_empty(), "{proxies:#}");
        assert!(proxies[other]["admin"].is_string(), "{proxies:#}");
    }
    let roster = consul.requests();
    assert!(
        roster
            .iter()
            .any(|r| r.method == Method::PUT && r.path.starts_with("/v1/kv/almond/proxies/")),
        "no roster written"
    );

    // A fleet-wide limit set through one replica: each proxy gets half.
    let (code, out, err) = run_ops(&[
        "limit",
        "web",
        "--path",
        "/x",
        "--rate",
        "20/s",
        "--fleet",
        "--control",
        &a.url(),
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    for proxy in [&pa, &pb] {
        eventually("the half share reaches the proxy", || async {
            let config = proxy.admin_get("/config").await.json();
            let limit = &config["services"]["web"]["guards"][0]["limit"];
            limit["shared_by"] == 2 && limit["rate"] == "10/s"
        })
        .await;
    }

    // b stops: a counts its own proxy alone, and gives it the whole rate.
    b.shutdown().await;
    eventually(
        "the stopped replica's proxies are no longer counted",
        || async { counted(&a).await == 1 },
    )
    .await;
    eventually("the whole rate goes back to the one proxy", || async {
        let config = pa.admin_get("/config").await.json();
        let limit = &config["services"]["web"]["guards"][0]["limit"];
        limit["shared_by"].is_null() && limit["rate"] == "20/s"
    })
    .await;
}

/// Every replica exports where a rollout is (`almond_rollout_step`), not
/// only the one that drives it: here another replica holds the rollout's
/// lease (in KV), and its writes (a step, then a rollback) reach this one
/// through the store.
#[tokio::test]
async fn a_replica_that_does_not_drive_a_rollout_exports_its_step() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    consul.register(web("web-2", &b2, "v2")).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_STEP")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let policy = |version: u64, phase: &str, split: Value| {
        json!({
            "version": version,
            "split": split,
            "rollout": {
                "spec": {
                    "canary": "v2", "stable": "v1", "steps": [10, 50, 100],
                    "interval_seconds": 3600.0
                },
                "stable": "v1",
                "step": 0,
                "phase": phase,
                "step_started": now,
                "inconclusive": 0,
                "history": [],
                "lease": ["another-replica", now + 3_600_000]
            }
        })
    };
    let step = || control_metric(&control, "almond_rollout_step", &[("service", "web")]);
    let running = policy(1, "running", json!({ "v1": 90, "v2": 10 }));
    consul.kv_put(WEB_POLICY, serde_json::to_vec(&running).unwrap());
    eventually("the step another replica drives is exported", || async {
        step().await == 10.0
    })
    .await;
    let rolled_back = policy(2, "rolled_back", json!({ "v1": 100, "v2": 0 }));
    consul.kv_put(WEB_POLICY, serde_json::to_vec(&rolled_back).unwrap());
    eventually("its rollback is exported", || async { step().await == 0.0 }).await;
    assert_eq!(
        stored_policy(&consul)["rollout"]["lease"][0],
        "another-replica",
        "this replica did not take the lease"
    );
}

/// A control plane told to stop while a traffic change is in hand (its
/// write to Consul under way) answers it before it exits: the operator
/// sees the change it made, not a connection cut for a change that was
/// nevertheless written. (The API's connections are waited for, up to
/// 5 s; before, only the roster's delete on the same Consul connection
/// happened to hold the process until the write came back.) And the
/// control plane logs the address it bound, not the `:0` it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_hand_is_answered_through_a_stop() {
    use tokio::io::AsyncBufReadExt;
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let token_env = "ALMOND_TEST_CC_TOKEN_STOP";
    let config = write_temp(".yaml", &yaml(&consul, token_env));
    let mut child = almond()
        .arg("control")
        .arg("--config")
        .arg(config.path())
        .env(token_env, "root")
        .env("ALMOND_LOG", "info")
        .env("ALMOND_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = within("the control API's address", async {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "control API listening" {
                return v["addr"].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("almond control ended before listening");
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    eventually("the control plane is ready", || async {
        admin_get(addr, "/ready").await.status == StatusCode::OK
    })
    .await;
    // Every Consul answer now takes a second: the change is in hand when
    // the stop comes.
    consul.set_delay(Duration::from_secs(1));
    let change = tokio::spawn(async move {
        let body = serde_json::json!({ "weights": { "v1": 100 } });
        let req = http::Request::put("/v1/services/web/split")
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap();
        H1::connect(addr).await.request(req).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The change's write waits in the double; the stop's own calls to
    // Consul (the roster's delete) are quick: only the change can keep
    // the process.
    consul.set_delay(Duration::ZERO);
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let reply = within("the change's answer", change).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    within("almond control to exit", child.wait())
        .await
        .unwrap();
    consul.set_delay(Duration::ZERO);
    assert!(consul.kv_get("almond/policy/web").is_some());
}

/// The control plane counts its health watches (one blocking query, and
/// so one connection to the agent, per followed service): Consul's agent
/// allows 200 connections per client address by default, and a large
/// catalog runs into it.
#[tokio::test]
async fn the_consul_watches_are_counted() {
    let consul = ConsulDouble::start().await;
    let b1 = Backend::start("b1").await;
    consul.register(web("web-1", &b1, "v1")).unwrap();
    let api = ServiceDef::new("api")
        .id("api-1")
        .address("127.0.0.1")
        .port(b1.addr.port())
        .check(passing());
    consul.register(api).unwrap();
    let control = TestControl::start(&yaml(&consul, "ALMOND_TEST_CC_TOKEN_WATCHES")).await;
    let watches = || async { control_metric(&control, "almond_control_consul_watches", &[]).await };
    eventually("two watches", || async { watches().await == 2.0 }).await;
    assert!(consul.deregister("api-1"));
    eventually("one watch", || async { watches().await == 1.0 }).await;
}
