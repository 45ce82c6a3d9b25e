//! Agent API: registration defaults, deregistration, TTL checks and
//! expiry, maintenance mode, anti-entropy delay.

use std::time::Duration;

use almond_consul_double::{CheckDef, ConsulDouble, ServiceDef, Status};
use serde_json::json;

use crate::common::*;

async fn health(consul: &ConsulDouble, name: &str) -> serde_json::Value {
    get(&format!("{}/v1/health/service/{name}", consul.url()))
        .await
        .json()
}

#[tokio::test]
async fn register_defaults() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    let r = put(
        &format!("{u}/v1/agent/service/register"),
        br#"{"name":"web","port":8080,"address":"10.0.0.5","tagged_addresses":{"lan":{"address":"10.0.0.5","port":8080}},"checks":[{"ttl":"30s"},{"TTL":"30s","status":"passing"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty());
    let h = health(&consul, "web").await;
    let svc = &h[0]["Service"];
    assert_eq!(svc["ID"], "web");
    assert_eq!(svc["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(svc["Tags"], json!([]));
    assert_eq!(
        svc["TaggedAddresses"],
        json!({
            "lan": {"Address": "10.0.0.5", "Port": 8080},
            "lan_ipv4": {"Address": "10.0.0.5", "Port": 8080},
            "wan_ipv4": {"Address": "10.0.0.5", "Port": 8080}
        })
    );
    let checks = h[0]["Checks"].as_array().unwrap();
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[1]["CheckID"], "service:web:1");
    assert_eq!(checks[1]["Status"], "critical");
    assert_eq!(checks[1]["Name"], "Service 'web' check");
    assert_eq!(checks[2]["CheckID"], "service:web:2");
    assert_eq!(checks[2]["Status"], "passing");

    // Re-registration keeps check statuses.
    let r = put(
        &format!("{u}/v1/agent/service/register"),
        br#"{"Name":"web","Port":8081,"Check":{"TTL":"30s"}}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    consul.set_check("service:web", Status::Passing);
    put(
        &format!("{u}/v1/agent/service/register"),
        br#"{"Name":"web","Port":8082,"Check":{"TTL":"30s"}}"#,
    )
    .await;
    let h = health(&consul, "web").await;
    assert_eq!(h[0]["Service"]["Port"], 8082);
    let st: Vec<(String, String)> = h[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["CheckID"].as_str().unwrap().to_string(),
                c["Status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        st.contains(&("service:web".into(), "passing".into())),
        "{st:?}"
    );
    // replace-existing-checks drops the others
    put(
        &format!("{u}/v1/agent/service/register?replace-existing-checks"),
        br#"{"Name":"web","Port":8082,"Check":{"TTL":"30s"}}"#,
    )
    .await;
    let h = health(&consul, "web").await;
    assert_eq!(h[0]["Checks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn register_validation_errors() {
    let consul = ConsulDouble::start().await;
    let url = format!("{}/v1/agent/service/register", consul.url());
    for (body, want) in [
        (r#"{"Port":1}"#, "Missing service name"),
        (
            r#"{"Name":"a","Address":"0.0.0.0"}"#,
            "Invalid service address",
        ),
        (
            r#"{"Name":"a","Weights":{"Passing":0,"Warning":1}}"#,
            "Invalid Weights: Passing must be greater than 0",
        ),
        (
            r#"{"Name":"a","Check":{"TTL":"10s","Status":"ok"}}"#,
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
    ] {
        let r = put(&url, body.as_bytes()).await;
        assert_eq!((r.status, r.text().as_str()), (400, want), "{body}");
    }
    let r = put(&url, br#"{"Name":"a","Meta":{"consul-x":"1"}}"#).await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("Invalid Service Meta: "),
        "{}",
        r.text()
    );
    let r = put(&url, b"{not json").await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("Request decode failed: "),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn deregister() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    consul.register(ServiceDef::new("web").id("web-1")).unwrap();
    let r = put(&format!("{u}/v1/agent/service/deregister/web-1"), b"").await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(health(&consul, "web").await, json!([]));
    let r = put(&format!("{u}/v1/agent/service/deregister/web-1"), b"").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            404,
            "Unknown service ID \"web-1\". Ensure that the service ID is passed, not the service name."
        )
    );
}

#[tokio::test]
async fn ttl_checks_pass_warn_fail_update_and_errors() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    consul
        .register(
            ServiceDef::new("web")
                .check(CheckDef::ttl(Duration::from_secs(60)))
                .check(CheckDef::with_status(Status::Passing).id("http-check")),
        )
        .unwrap();
    // Several checks without IDs: `service:<id>:<n>`, 1-based by position.
    let status = |h: &serde_json::Value| {
        h[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["CheckID"] == "service:web:1")
            .map(|c| (c["Status"].clone(), c["Output"].clone()))
            .unwrap()
    };
    for (verb, want) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        let r = put(
            &format!("{u}/v1/agent/check/{verb}/service:web:1?note=n-{verb}"),
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let h = health(&consul, "web").await;
        assert_eq!(status(&h), (json!(want), json!(format!("n-{verb}"))));
    }
    let r = put(
        &format!("{u}/v1/agent/check/update/service:web:1"),
        br#"{"Status":"passing","Output":"ok"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        status(&health(&consul, "web").await),
        (json!("passing"), json!("ok"))
    );
    let r = put(
        &format!("{u}/v1/agent/check/update/service:web:1"),
        br#"{"Status":"bad"}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Invalid check status: 'bad'")
    );
    let r = put(&format!("{u}/v1/agent/check/pass/nope"), b"").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            404,
            "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name."
        )
    );
    let r = put(&format!("{u}/v1/agent/check/pass/http-check"), b"").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "CheckID \"http-check\" does not have associated TTL")
    );
}

#[tokio::test]
async fn ttl_expires_to_critical() {
    let consul = ConsulDouble::start().await;
    consul
        .register(ServiceDef::new("web").check(CheckDef::ttl(Duration::from_millis(400))))
        .unwrap();
    let u = consul.url();
    put(
        &format!("{u}/v1/agent/check/pass/service:web?note=alive"),
        b"",
    )
    .await;
    let h = health(&consul, "web").await;
    assert_eq!(h[0]["Checks"][1]["Status"], "passing");
    let idx = consul.service_index("web");
    // Block until the expiry changes the service.
    let r = get(&format!("{u}/v1/health/service/web?index={idx}&wait=5s")).await;
    assert!(r.index() > idx);
    let c = &r.json()[0]["Checks"][1];
    assert_eq!(c["Status"], "critical");
    assert_eq!(
        c["Output"],
        "TTL expired (last output before timeout follows): alive"
    );
    // hook
    consul.set_check("service:web", Status::Passing);
    assert!(consul.expire_ttl("service:web"));
    assert_eq!(
        health(&consul, "web").await[0]["Checks"][1]["Status"],
        "critical"
    );
}

#[tokio::test]
async fn maintenance_mode() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    consul
        .register(ServiceDef::new("web").id("web-1").tag("v1"))
        .unwrap();
    let r = put(
        &format!("{u}/v1/agent/service/maintenance/web-1?enable=true&reason=deploying"),
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = health(&consul, "web").await;
    let m = h[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "_service_maintenance:web-1")
        .cloned()
        .unwrap();
    assert_eq!(m["Status"], "critical");
    assert_eq!(m["Name"], "Service Maintenance Mode");
    assert_eq!(m["Notes"], "deploying");
    assert_eq!(m["ServiceID"], "web-1");
    assert_eq!(m["ServiceTags"], json!(["v1"]));
    let r = get(&format!("{u}/v1/health/service/web?passing")).await;
    assert_eq!(r.text(), "[]");
    put(
        &format!("{u}/v1/agent/service/maintenance/web-1?enable=false"),
        b"",
    )
    .await;
    assert_eq!(
        health(&consul, "web").await[0]["Checks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // hook
    assert!(consul.maintenance("web-1", true));
    assert_eq!(
        health(&consul, "web").await[0]["Checks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!consul.maintenance("nope", true));
    // errors
    let r = put(&format!("{u}/v1/agent/service/maintenance/web-1"), b"").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Missing value for enable")
    );
    let r = put(
        &format!("{u}/v1/agent/service/maintenance/zzz?enable=true"),
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "No service registered with ID \"zzz\"")
    );
    // node maintenance applies to every instance on the node
    put(&format!("{u}/v1/agent/maintenance?enable=true"), b"").await;
    let ids: Vec<String> = health(&consul, "web").await[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids[..2],
        ["_node_maintenance".to_string(), "serfHealth".to_string()]
    );
}

#[tokio::test]
async fn anti_entropy_delay() {
    let consul = ConsulDouble::start().await;
    // Long enough that the read right after the register comes first on
    // any machine.
    consul.set_sync_delay(Duration::from_secs(2));
    let registered = tokio::time::Instant::now();
    let r = put(
        &format!("{}/v1/agent/service/register", consul.url()),
        br#"{"Name":"late"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(health(&consul, "late").await, json!([]));
    // Then it shows, once synced (polled: no fixed sleep to race).
    loop {
        if health(&consul, "late").await.as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(30),
            "never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registered.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test]
async fn multiple_nodes_and_node_checks() {
    let consul = ConsulDouble::start().await;
    consul
        .register(
            ServiceDef::new("web")
                .id("a")
                .node("n1")
                .address("10.0.0.1"),
        )
        .unwrap();
    consul
        .register(
            ServiceDef::new("web")
                .id("b")
                .node("n2")
                .address("10.0.0.2"),
        )
        .unwrap();
    assert!(consul.set_node_check("n2", "serfHealth", Status::Critical));
    let h = health(&consul, "web").await;
    let by_node: Vec<(String, String)> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["Node"]["Node"].as_str().unwrap().to_string(),
                e["Checks"][0]["Status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        by_node,
        vec![
            ("n1".to_string(), "passing".to_string()),
            ("n2".to_string(), "critical".to_string())
        ]
    );
    let r = get(&format!("{}/v1/health/service/web?passing=1", consul.url())).await;
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert!(consul.remove_node("n2"));
    assert_eq!(health(&consul, "web").await.as_array().unwrap().len(), 1);
}
