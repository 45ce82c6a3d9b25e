//! `?filter=` (go-bexpr subset) and `?tag=` on health and catalog.

use std::time::Duration;

use almond_consul_double::{CheckDef, ConsulDouble, NodeDef, ServiceDef, Status};

use crate::common::*;

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

async fn cluster() -> ConsulDouble {
    let consul = ConsulDouble::start().await;
    consul.add_node(NodeDef::new("n1", "10.0.0.1").meta("zone", "a"));
    consul.add_node(NodeDef::new("n2", "10.0.0.2").meta("zone", "b"));
    let ttl = || CheckDef::ttl(Duration::from_secs(60));
    consul
        .register(
            ServiceDef::new("web")
                .id("v1-a")
                .node("n1")
                .tag("primary")
                .meta("version", "v1")
                .check(ttl()),
        )
        .unwrap();
    consul
        .register(
            ServiceDef::new("web")
                .id("v2-b")
                .node("n2")
                .tag("canary")
                .tag("primary")
                .meta("version", "v2")
                .check(ttl()),
        )
        .unwrap();
    consul
        .register(ServiceDef::new("web").id("bare").node("n2").check(ttl()))
        .unwrap();
    consul.set_check("service:v1-a", Status::Passing);
    consul.set_check("service:v2-b", Status::Warning);
    consul
}

async fn ids(consul: &ConsulDouble, filter: &str) -> Vec<String> {
    let r = get(&format!(
        "{}/v1/health/service/web?filter={}",
        consul.url(),
        enc(filter)
    ))
    .await;
    assert_eq!(r.status, 200, "{filter}: {}", r.text());
    let mut v: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn health_filter_expressions() {
    let consul = cluster().await;
    let cases: &[(&str, &[&str])] = &[
        (r#""canary" in Service.Tags"#, &["v2-b"]),
        (r#""canary" not in Service.Tags"#, &["bare", "v1-a"]),
        (r#"Service.Tags contains "primary""#, &["v1-a", "v2-b"]),
        (r#"Service.Meta.version == "v1""#, &["v1-a"]),
        (r#"Service.Meta["version"] != v1"#, &["bare", "v2-b"]),
        (r#"Service.Meta.version is empty"#, &["bare"]),
        (r#"Service.Tags is not empty"#, &["v1-a", "v2-b"]),
        (r#"Node.Meta.zone == b"#, &["bare", "v2-b"]),
        (r#"Checks.Status == warning"#, &["v2-b"]),
        (r#"Checks.Status != passing"#, &["bare", "v2-b"]),
        (
            r#"not Checks.Status == critical and not Checks.Status == warning"#,
            &["v1-a"],
        ),
        (
            r#"(Node.Meta.zone == a or "canary" in Service.Tags) and Service.Meta.version != v2"#,
            &["v1-a"],
        ),
        (
            r#"Node.Meta.zone == a or "canary" in Service.Tags and Service.Meta.version != v2"#,
            &["v1-a"],
        ),
        (r#"Service.ID == `bare`"#, &["bare"]),
    ];
    for (f, want) in cases {
        assert_eq!(ids(&consul, f).await, *want, "{f}");
    }
}

#[tokio::test]
async fn invalid_filters_are_500() {
    let consul = cluster().await;
    for f in ["Service.Nope == 1", "Service.Tags ==", "(Service.ID == a"] {
        let r = get(&format!(
            "{}/v1/health/service/web?filter={}",
            consul.url(),
            enc(f)
        ))
        .await;
        assert_eq!(r.status, 500, "{f}");
        assert!(
            r.text()
                .starts_with("Failed to create boolean expression evaluator"),
            "{}",
            r.text()
        );
    }
}

#[tokio::test]
async fn tag_parameter_is_and_of_tags() {
    let consul = cluster().await;
    let get_ids = |q: &'static str| {
        let url = format!("{}/v1/health/service/web?{q}", consul.url());
        async move {
            let mut v: Vec<String> = get(&url)
                .await
                .json()
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
                .collect();
            v.sort();
            v
        }
    };
    assert_eq!(get_ids("tag=primary").await, vec!["v1-a", "v2-b"]);
    assert_eq!(get_ids("tag=primary&tag=canary").await, vec!["v2-b"]);
    assert_eq!(get_ids("tag=PRIMARY").await, vec!["v1-a", "v2-b"]);
    assert_eq!(get_ids("node-meta=zone:a").await, vec!["v1-a"]);
}

#[tokio::test]
async fn catalog_filter_fixture_vector() {
    // filtering-catalog-service-{unfiltered,filtered}.json with
    // `NodeMeta.os == "linux"`.
    let unfiltered = fixture_json("filtering-catalog-service-unfiltered.json");
    let filtered = fixture_json("filtering-catalog-service-filtered.json");
    let consul = ConsulDouble::start().await;
    for e in unfiltered.as_array().unwrap() {
        let mut node = NodeDef::new(e["Node"].as_str().unwrap(), e["Address"].as_str().unwrap());
        for (k, v) in e["NodeMeta"].as_object().unwrap() {
            node = node.meta(k, v.as_str().unwrap());
        }
        consul.add_node(node);
        let mut svc = ServiceDef::new(e["ServiceName"].as_str().unwrap())
            .id(e["ServiceID"].as_str().unwrap())
            .node(e["Node"].as_str().unwrap())
            .port(e["ServicePort"].as_u64().unwrap() as u16);
        for t in e["ServiceTags"].as_array().unwrap() {
            svc = svc.tag(t.as_str().unwrap());
        }
        for (k, v) in e["ServiceMeta"].as_object().unwrap() {
            svc = svc.meta(k, v.as_str().unwrap());
        }
        consul.register(svc).unwrap();
    }
    let r = get(&format!(
        "{}/v1/catalog/service/api-internal?filter={}",
        consul.url(),
        enc(r#"NodeMeta.os == "linux""#)
    ))
    .await;
    let got: Vec<(String, serde_json::Value)> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["Node"].as_str().unwrap().to_string(),
                e["ServiceTags"].clone(),
            )
        })
        .collect();
    let want: Vec<(String, serde_json::Value)> = filtered
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["Node"].as_str().unwrap().to_string(),
                e["ServiceTags"].clone(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let all = get(&format!("{}/v1/catalog/service/api-internal", consul.url())).await;
    assert_eq!(all.json().as_array().unwrap().len(), 3);
    // catalog/services filters on ServiceNode records
    let r = get(&format!(
        "{}/v1/catalog/services?filter={}",
        consul.url(),
        enc(r#"ServiceMeta.environment == production"#)
    ))
    .await;
    assert_eq!(
        r.json(),
        serde_json::json!({"api-internal": ["test", "tag"]})
    );
}
