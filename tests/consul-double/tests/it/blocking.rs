//! Blocking queries: index/wait parsing, waking on writes, timeouts, index
//! going backwards, idempotent writes, per-resource indexes.

use std::time::Duration;

use almond_consul_double::{CheckDef, ConsulDouble, ServiceDef, Status};
use tokio::time::Instant;

use crate::common::*;

async fn double() -> ConsulDouble {
    ConsulDouble::builder().jitter(false).start().await
}

fn spawn_get(url: String) -> tokio::task::JoinHandle<(Reply, Duration)> {
    tokio::spawn(async move {
        let t = Instant::now();
        let r = get(&url).await;
        (r, t.elapsed())
    })
}

#[tokio::test]
async fn blocks_then_wakes_on_a_write_to_the_service() {
    let consul = double().await;
    consul
        .register(ServiceDef::new("web").id("web-1").port(1))
        .unwrap();
    let first = get(&format!("{}/v1/health/service/web", consul.url())).await;
    let idx = first.index();
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    consul
        .register(ServiceDef::new("web").id("web-2").port(2))
        .unwrap();
    let (r, took) = h.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The client's parameters were recorded.
    let reqs = consul.requests();
    let last = reqs.last().unwrap();
    assert_eq!(last.query_param("index"), Some(idx.to_string()));
    assert_eq!(last.query_param("wait").as_deref(), Some("10s"));
}

#[tokio::test]
async fn timeout_answers_200_with_unchanged_index() {
    let consul = double().await;
    consul.register(ServiceDef::new("web")).unwrap();
    let idx = get(&format!("{}/v1/health/service/web", consul.url()))
        .await
        .index();
    let t = Instant::now();
    let r = get(&format!(
        "{}/v1/health/service/web?index={idx}&wait=200ms",
        consul.url()
    ))
    .await;
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.index(), idx);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn writes_to_other_resources_do_not_wake() {
    let consul = double().await;
    consul.register(ServiceDef::new("web")).unwrap();
    let idx = consul.service_index("web");
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={idx}&wait=300ms",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    consul.register(ServiceDef::new("db")).unwrap();
    consul.kv_put("k", "v");
    let (r, took) = h.await.unwrap();
    assert_eq!(r.index(), idx);
    assert!(took >= Duration::from_millis(300), "took {took:?}");
}

#[tokio::test]
async fn check_changes_move_the_service_index_not_the_services_table() {
    let consul = double().await;
    consul
        .register(ServiceDef::new("web").check(CheckDef::ttl(Duration::from_secs(60))))
        .unwrap();
    let svc = consul.service_index("web");
    let table = get(&format!("{}/v1/catalog/services", consul.url()))
        .await
        .index();
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={svc}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    assert!(consul.set_check("service:web", Status::Passing));
    let (r, _) = h.await.unwrap();
    assert!(r.index() > svc);
    assert_eq!(r.json()[0]["Checks"][1]["Status"], "passing");
    let after = get(&format!("{}/v1/catalog/services", consul.url()))
        .await
        .index();
    assert_eq!(after, table);
    // A node-level check touches every service on the node.
    let before = consul.service_index("web");
    assert!(consul.set_check("serfHealth", Status::Critical));
    assert!(consul.service_index("web") > before);
}

#[tokio::test]
async fn bad_index_and_wait_are_400() {
    let consul = double().await;
    for (q, body) in [
        ("index=1&wait=10", "Invalid wait time"),
        ("index=1&wait=abc", "Invalid wait time"),
        ("index=-1", "Invalid index"),
        ("index=abc&wait=1s", "Invalid index"),
    ] {
        let r = get(&format!("{}/v1/health/service/web?{q}", consul.url())).await;
        assert_eq!((r.status, r.text().as_str()), (400, body), "{q}");
        assert!(r.header("x-consul-index").is_none());
    }
    // wait without index: parsed, no blocking
    let t = Instant::now();
    let r = get(&format!("{}/v1/health/service/web?wait=5s", consul.url())).await;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn default_wait_and_clamp_follow_the_scale() {
    // × 0.002: 5 min default → 600 ms; 10 min clamp → 1.2 s; 1 h unclamped
    // would be 7.2 s.
    let consul = ConsulDouble::builder()
        .jitter(false)
        .wait_scale(0.002)
        .start()
        .await;
    let idx = consul.service_index("web");
    let url = format!("{}/v1/health/service/web?index={idx}", consul.url());
    let default = spawn_get(url.clone());
    let clamped = spawn_get(format!("{url}&wait=1h"));
    let zero = spawn_get(format!("{url}&wait=0s"));
    let (r, took) = default.await.unwrap();
    assert_eq!(r.index(), idx);
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1190),
        "default wait took {took:?}"
    );
    let (_, took) = zero.await.unwrap();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1190),
        "wait=0 took {took:?}"
    );
    let (_, took) = clamped.await.unwrap();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(5),
        "clamped wait took {took:?}"
    );
    // explicit wait, max_wait override
    consul.set_wait_scale(1.0);
    consul.set_max_wait(Some(Duration::from_millis(150)));
    let t = Instant::now();
    let _ = get(&format!("{url}&wait=5m")).await;
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn jitter_stays_below_a_sixteenth() {
    let consul = ConsulDouble::builder().jitter(true).start().await;
    let idx = consul.service_index("web");
    let t = Instant::now();
    let _ = get(&format!(
        "{}/v1/health/service/web?index={idx}&wait=320ms",
        consul.url()
    ))
    .await;
    let took = t.elapsed();
    // 320 ms + < 20 ms jitter (bounds checked exactly in the unit tests)
    assert!(
        took >= Duration::from_millis(320) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn reset_index_wakes_blocked_queries_with_a_lower_index() {
    let consul = double().await;
    for i in 0..5 {
        consul.kv_put(&format!("k{i}"), "v");
    }
    consul.register(ServiceDef::new("web")).unwrap();
    let idx = consul.service_index("web");
    assert!(idx > 3);
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    consul.reset_index(2);
    let (r, took) = h.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_secs(5));
    assert!(r.index() < idx, "{} !< {idx}", r.index());
    assert_eq!(r.json()[0]["Service"]["Service"], "web");
    // A client that keeps the old (higher) index hangs for the full wait
    // and gets the lower index back.
    let r = get(&format!(
        "{}/v1/health/service/web?index={idx}&wait=150ms",
        consul.url()
    ))
    .await;
    assert!(r.index() <= 2);
    // New writes continue from the lower index.
    consul.register(ServiceDef::new("web").port(9)).unwrap();
    assert!(consul.service_index("web") < idx);
    assert!(consul.index() < idx);
}

#[tokio::test]
async fn idempotent_write_bumps_index_with_identical_content() {
    let consul = double().await;
    consul.register(ServiceDef::new("web").port(80)).unwrap();
    let first = get(&format!("{}/v1/health/service/web", consul.url())).await;
    let idx = first.index();
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    let new = consul.bump_without_change("web");
    let (r, _) = h.await.unwrap();
    assert_eq!(r.index(), new);
    assert!(new > idx);
    assert_eq!(r.body, first.body);
}

#[tokio::test]
async fn release_blocked_returns_early_without_change() {
    let consul = double().await;
    let idx = consul.service_index("web");
    let h = spawn_get(format!(
        "{}/v1/health/service/web?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    consul.release_blocked();
    let (r, took) = h.await.unwrap();
    assert_eq!(r.index(), idx);
    assert!(took < Duration::from_secs(5));
}

#[tokio::test]
async fn index_is_never_zero_unless_forced() {
    let consul = ConsulDouble::builder().consul_service(false).start().await;
    for path in [
        "/v1/health/service/x",
        "/v1/catalog/service/x",
        "/v1/catalog/services",
        "/v1/kv/missing",
        "/v1/kv/?recurse",
    ] {
        let r = get(&format!("{}{path}", consul.url())).await;
        assert!(r.index() >= 1, "{path}");
    }
    consul.set_zero_index(true);
    let r = get(&format!("{}/v1/health/service/x", consul.url())).await;
    assert_eq!(r.index(), 0);
}

#[tokio::test]
async fn blocking_on_a_missing_key_returns_when_it_is_created() {
    let consul = double().await;
    let r = get(&format!("{}/v1/kv/cfg/app", consul.url())).await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    let idx = r.index();
    let h = spawn_get(format!(
        "{}/v1/kv/cfg/app?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    let m = consul.kv_put("cfg/app", "hello");
    let (r, _) = h.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.index(), m);
    assert_eq!(r.json()[0]["Value"], "aGVsbG8=");
}

#[tokio::test]
async fn prefix_index_includes_tombstones() {
    let consul = double().await;
    consul.kv_put("app/a", "1");
    let b = consul.kv_put("app/b", "2");
    consul.kv_put("other", "x");
    let r = get(&format!("{}/v1/kv/app/?recurse", consul.url())).await;
    assert_eq!(r.index(), b);
    assert!(consul.kv_delete("app/b"));
    let after_delete = get(&format!("{}/v1/kv/app/?recurse", consul.url()))
        .await
        .index();
    assert!(
        after_delete > b,
        "deleting the newest key must not lower the index"
    );
    consul.reap_tombstones();
    let reaped = get(&format!("{}/v1/kv/app/?recurse", consul.url()))
        .await
        .index();
    assert!(reaped < after_delete);
}

#[tokio::test]
async fn unknown_service_uses_extinction_index() {
    let consul = double().await;
    consul.register(ServiceDef::new("gone")).unwrap();
    let idx = consul.service_index("gone");
    let h = spawn_get(format!(
        "{}/v1/health/service/gone?index={idx}&wait=10s",
        consul.url()
    ));
    assert!(consul.wait_blocked(1).await);
    assert!(consul.deregister("gone"));
    let (r, _) = h.await.unwrap();
    assert_eq!(r.text(), "[]");
    assert!(r.index() > idx);
}

#[tokio::test]
async fn passing_filter_and_index_of_unfiltered_set() {
    let consul = double().await;
    for i in 1..=3 {
        consul
            .register(
                ServiceDef::new("web")
                    .id(&format!("web-{i}"))
                    .check(CheckDef::ttl(Duration::from_secs(60))),
            )
            .unwrap();
    }
    consul.set_check("service:web-2", Status::Passing);
    let r = get(&format!("{}/v1/health/service/web?passing", consul.url())).await;
    let ids: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["web-2"]);
    assert_eq!(r.index(), consul.service_index("web"));
    let r = get(&format!(
        "{}/v1/health/service/web?passing=false",
        consul.url()
    ))
    .await;
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let r = get(&format!(
        "{}/v1/health/service/web?passing=yes",
        consul.url()
    ))
    .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Invalid value for ?passing")
    );
}
