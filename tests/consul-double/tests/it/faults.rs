//! Fault hooks and protocol edges: leader loss, injected failures, delays,
//! streaming headers, unknown datacenter, wrong methods, unknown routes.

use std::time::Duration;

use almond_consul_double::{ConsulDouble, ServiceDef};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn leader_loss_fails_default_and_consistent_but_stale_answers() {
    let consul = ConsulDouble::start().await;
    consul.register(ServiceDef::new("web")).unwrap();
    consul.kv_put("k", "v");
    let u = consul.url();
    consul.set_leader(false);
    for path in [
        "/v1/health/service/web",
        "/v1/health/service/web?consistent",
        "/v1/catalog/services",
        "/v1/kv/k",
    ] {
        let r = get(&format!("{u}{path}")).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (500, "No cluster leader"),
            "{path}"
        );
        assert!(r.header("x-consul-index").is_none());
    }
    let r = put(&format!("{u}/v1/kv/k"), b"w").await;
    assert_eq!((r.status, r.text().as_str()), (500, "No cluster leader"));

    consul.set_last_contact(Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = get(&format!("{u}/v1/health/service/web?stale")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert_eq!(r.header("x-consul-knownleader").as_deref(), Some("false"));
    assert_eq!(
        r.header("x-consul-effective-consistency").as_deref(),
        Some("stale")
    );
    let last: u64 = r.header("x-consul-lastcontact").unwrap().parse().unwrap();
    assert!(last >= 60, "last contact {last}");
    assert!(r.index() >= 1);

    consul.set_leader(true);
    let r = get(&format!("{u}/v1/health/service/web?consistent")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-consul-knownleader").as_deref(), Some("true"));
    assert_eq!(r.header("x-consul-lastcontact").as_deref(), Some("0"));
    assert_eq!(
        r.header("x-consul-effective-consistency").as_deref(),
        Some("consistent")
    );
    let r = get(&format!("{u}/v1/health/service/web?stale&consistent")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics."
        )
    );
}

#[tokio::test]
async fn fail_next_then_recover() {
    let consul = ConsulDouble::start().await;
    consul.fail_next(2, 429, "rate limit exceeded");
    let url = format!("{}/v1/catalog/services", consul.url());
    for _ in 0..2 {
        let r = get(&url).await;
        assert_eq!((r.status, r.text().as_str()), (429, "rate limit exceeded"));
    }
    assert_eq!(get(&url).await.status, 200);
    consul.fail_next(1, 500, "rpc error: EOF");
    assert_eq!(get(&url).await.status, 500);
    assert_eq!(consul.requests().len(), 4);
}

#[tokio::test]
async fn delay_slows_responses() {
    let consul = ConsulDouble::start().await;
    consul.set_delay(Duration::from_millis(150));
    let t = Instant::now();
    let r = get(&format!("{}/v1/catalog/services", consul.url())).await;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn streaming_backend_omits_leader_headers() {
    let consul = ConsulDouble::builder().jitter(false).start().await;
    consul.register(ServiceDef::new("web")).unwrap();
    consul.set_streaming(true);
    let u = consul.url();
    let idx = consul.service_index("web");
    let r = get(&format!("{u}/v1/health/service/web?index={idx}&wait=50ms")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.index(), idx);
    assert!(r.header("x-consul-knownleader").is_none());
    assert!(r.header("x-consul-lastcontact").is_none());
    assert_eq!(
        r.header("x-consul-query-backend").as_deref(),
        Some("streaming")
    );
    // no index → classic path
    let r = get(&format!("{u}/v1/health/service/web")).await;
    assert!(r.header("x-consul-knownleader").is_some());
    assert_eq!(
        r.header("x-consul-query-backend").as_deref(),
        Some("blocking-query")
    );
    // near forces the classic path
    let r = get(&format!(
        "{u}/v1/health/service/web?index={idx}&wait=10ms&near=_agent"
    ))
    .await;
    assert!(r.header("x-consul-knownleader").is_some());
}

#[tokio::test]
async fn unknown_datacenter_is_500() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    let r = get(&format!("{u}/v1/health/service/web?dc=dc9")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "No path to datacenter")
    );
    let r = get(&format!("{u}/v1/health/service/web?dc=dc1")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn wrong_method_unknown_route_and_options() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    let r = call("POST", &format!("{u}/v1/health/service/web"), &[], b"").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (405, "method POST not allowed")
    );
    assert_eq!(r.header("allow").as_deref(), Some("OPTIONS,GET"));
    let r = get(&format!("{u}/v1/agent/service/register")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("OPTIONS,PUT"));
    let r = call("OPTIONS", &format!("{u}/v1/kv/x"), &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("allow").as_deref(), Some("OPTIONS,GET,PUT,DELETE"));
    let r = get(&format!("{u}/v1/nope")).await;
    assert_eq!(r.status, 404);
    let r = get(&format!("{u}/v1/health/service/")).await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing service name"));
}

#[tokio::test]
async fn status_leader_and_percent_encoded_names() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    assert_eq!(
        get(&format!("{u}/v1/status/leader")).await.text(),
        "\"127.0.0.1:8300\""
    );
    consul.set_leader(false);
    assert_eq!(get(&format!("{u}/v1/status/leader")).await.text(), "\"\"");
    consul.set_leader(true);
    consul.register(ServiceDef::new("my svc")).unwrap();
    let r = get(&format!("{u}/v1/health/service/my%20svc")).await;
    assert_eq!(r.json()[0]["Service"]["Service"], "my svc");
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    use tokio::io::AsyncReadExt;
    let consul = ConsulDouble::start().await;
    // An open connection (and a blocked query on another) end with the
    // handle; checking a fresh connect would race with port reuse.
    let mut idle = tokio::net::TcpStream::connect(consul.addr()).await.unwrap();
    let idx = consul.service_index("web");
    let url = format!("{}/v1/health/service/web?index={idx}&wait=1m", consul.url());
    let blocked = tokio::spawn(async move {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        client.get(url.parse().unwrap()).await
    });
    assert!(consul.wait_blocked(1).await);
    drop(consul);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, idle.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "idle connection still open");
    assert!(buf.is_empty());
    let res = tokio::time::timeout(DEADLINE, blocked)
        .await
        .unwrap()
        .unwrap();
    assert!(
        res.is_err(),
        "blocked query should fail when the double stops"
    );
}
