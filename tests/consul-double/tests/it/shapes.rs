//! JSON bodies have exactly the keys (and key order) of the fixtures.

use std::time::Duration;

use almond_consul_double::{CheckDef, ConsulDouble, NodeDef, ServiceDef, Status};

use crate::common::*;

/// The cluster of health-service.json: node `foobar`, service `redis`.
async fn redis_cluster() -> ConsulDouble {
    let consul = ConsulDouble::start().await;
    consul.add_node(
        NodeDef::new("foobar", "10.1.10.12")
            .id("40e4a748-2192-161a-0510-9bf59fe950b5")
            .tagged_address("lan", "10.1.10.12")
            .tagged_address("wan", "10.1.10.12")
            .meta("instance_type", "t2.medium"),
    );
    consul
        .register(
            ServiceDef::new("redis")
                .node("foobar")
                .address("10.1.10.12")
                .port(8000)
                .tag("primary")
                .meta("redis_version", "4.0")
                .tagged_address("lan", "10.1.10.12", 8000)
                .tagged_address("wan", "198.18.1.2", 80)
                .weights(10, 1)
                .check(CheckDef::ttl(Duration::from_secs(60)).status(Status::Passing)),
        )
        .unwrap();
    consul
}

#[tokio::test]
async fn health_service_has_fixture_shape() {
    let consul = redis_cluster().await;
    let r = get(&format!("{}/v1/health/service/redis", consul.url())).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let fixture = parse_j(fixture_text("health-service.json").as_bytes());
    assert_same_shape(&fixture, &parse_j(&r.body), false);

    // Same check set as the fixture; node-level checks first (SOURCES.md §4).
    let body = r.json();
    let ids: Vec<&str> = body[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["serfHealth", "service:redis"]);
    let fx = fixture_json("health-service.json");
    let mut fx_ids: Vec<&str> = fx[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    fx_ids.sort();
    assert_eq!(fx_ids, vec!["serfHealth", "service:redis"]);
    // Same values where the state mirrors the fixture.
    assert_eq!(body[0]["Node"], fx[0]["Node"]);
    assert_eq!(body[0]["Service"]["Weights"], fx[0]["Service"]["Weights"]);
    assert_eq!(body[0]["Service"]["Meta"], fx[0]["Service"]["Meta"]);
    assert_eq!(body[0]["Service"]["Tags"], fx[0]["Service"]["Tags"]);
    // Tagged addresses are emitted capitalised, like a real server.
    assert_eq!(
        body[0]["Service"]["TaggedAddresses"]["wan"],
        serde_json::json!({"Address": "198.18.1.2", "Port": 80})
    );
    assert!(r
        .text()
        .contains(r#""lan_ipv4":{"Address":"10.1.10.12","Port":8000}"#));
}

#[tokio::test]
async fn catalog_services_has_fixture_shape() {
    let consul = ConsulDouble::start().await;
    consul.register(ServiceDef::new("redis")).unwrap();
    consul
        .register(ServiceDef::new("postgresql").id("pg1").tag("primary"))
        .unwrap();
    consul
        .register(ServiceDef::new("postgresql").id("pg2").tag("secondary"))
        .unwrap();
    let r = get(&format!("{}/v1/catalog/services", consul.url())).await;
    assert_eq!(r.status, 200);
    let fixture = parse_j(fixture_text("catalog-services.json").as_bytes());
    assert_same_shape(&fixture, &parse_j(&r.body), true);
    // The fixture's data, exactly (tag order is not guaranteed by Consul).
    let mut body = r.json();
    body["postgresql"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(body, fixture_json("catalog-services.json"));
}

#[tokio::test]
async fn catalog_service_has_fixture_shape() {
    let consul = ConsulDouble::start().await;
    consul.add_node(
        NodeDef::new("t2.320", "192.168.10.10")
            .tagged_address("lan", "192.168.10.10")
            .tagged_address("wan", "10.0.10.10")
            .meta("somekey", "somevalue"),
    );
    consul
        .register(
            ServiceDef::new("web")
                .id("32a2a47f7992:nodea:5000")
                .node("t2.320")
                .address("172.17.0.3")
                .port(5000)
                .tag("prod")
                .meta("web_meta_value", "baz")
                .tagged_address("lan", "172.17.0.3", 5000)
                .tagged_address("wan", "198.18.0.1", 512),
        )
        .unwrap();
    let r = get(&format!("{}/v1/catalog/service/web", consul.url())).await;
    assert_eq!(r.status, 200);
    let fixture = parse_j(fixture_text("catalog-service.json").as_bytes());
    assert_same_shape(&fixture, &parse_j(&r.body), false);
    let body = r.json();
    let fx = fixture_json("catalog-service.json");
    for k in [
        "Node",
        "Address",
        "Datacenter",
        "TaggedAddresses",
        "NodeMeta",
        "ServiceAddress",
        "ServiceID",
        "ServiceName",
        "ServicePort",
        "ServiceMeta",
        "ServiceTags",
        "ServiceProxy",
        "ServiceConnect",
        "Namespace",
    ] {
        assert_eq!(body[0][k], fx[0][k], "{k}");
    }
    assert!(body[0]["CreateIndex"].as_u64().unwrap() >= 1);
    assert_eq!(body[0]["CreateIndex"], body[0]["ModifyIndex"]);
}

#[tokio::test]
async fn kv_get_has_fixture_shape() {
    let consul = ConsulDouble::start().await;
    // A locked key carries `Session`, like the fixture.
    let r = put(
        &format!(
            "{}/v1/kv/zip?acquire=adf4238a-882b-9ddc-4a9d-5b6758e4159e",
            consul.url()
        ),
        b"test",
    )
    .await;
    assert_eq!(r.text(), "true");
    let r = get(&format!("{}/v1/kv/zip", consul.url())).await;
    assert_eq!(r.status, 200);
    let fixture = parse_j(fixture_text("kv-get.json").as_bytes());
    assert_same_shape(&fixture, &parse_j(&r.body), false);
    let body = r.json();
    let fx = fixture_json("kv-get.json");
    for k in ["Key", "Flags", "Value", "Session"] {
        assert_eq!(body[0][k], fx[0][k], "{k}");
    }
    assert_eq!(body[0]["LockIndex"], 1);

    // Unlocked: `Session` omitted, all other keys in fixture order.
    consul.kv_put("plain", "test");
    let r = get(&format!("{}/v1/kv/plain", consul.url())).await;
    let J::Arr(items) = parse_j(&r.body) else {
        panic!("not an array")
    };
    let mut want = keys_at(&parse_j(fixture_text("kv-get.json").as_bytes()).arr0());
    want.retain(|k| k != "Session");
    assert_eq!(keys_at(&items[0]), want);
}

trait First {
    fn arr0(self) -> J;
}
impl First for J {
    fn arr0(self) -> J {
        match self {
            J::Arr(mut a) => a.remove(0),
            other => panic!("not an array: {other}"),
        }
    }
}

#[tokio::test]
async fn kv_keys_matches_fixture() {
    let consul = ConsulDouble::start().await;
    for k in ["/web/bar", "/web/foo", "/web/subdir/a", "/web/subdir/b"] {
        consul.kv_put(k, "x");
    }
    consul.kv_put("/other", "x");
    // `/v1/kv/` + key `/web/`
    let r = get(&format!("{}/v1/kv//web/?keys&separator=/", consul.url())).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), fixture_json("kv-keys.json"));
    // the historic misspelling works too
    let r = get(&format!("{}/v1/kv//web/?keys&seperator=/", consul.url())).await;
    assert_eq!(r.json(), fixture_json("kv-keys.json"));
}

#[tokio::test]
async fn kv_put_response_matches_fixture() {
    let consul = ConsulDouble::start().await;
    let r = put(&format!("{}/v1/kv/a", consul.url()), b"v").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), fixture_json("kv-put-response.json"));
    let r = delete(&format!("{}/v1/kv/a", consul.url())).await;
    assert_eq!(r.json(), fixture_json("kv-put-response.json"));
}

#[tokio::test]
async fn health_checks_has_fixture_shape() {
    let consul = redis_cluster().await;
    let r = get(&format!("{}/v1/health/checks/redis", consul.url())).await;
    assert_eq!(r.status, 200);
    let fixture = parse_j(fixture_text("health-checks-service.json").as_bytes());
    assert_same_shape(&fixture, &parse_j(&r.body), false);
    assert_eq!(
        r.json()[0]["CheckID"],
        fixture_json("health-checks-service.json")[0]["CheckID"]
    );
}

#[tokio::test]
async fn fixture_request_bodies_are_accepted() {
    let consul = ConsulDouble::start().await;
    let body = fixture_text("agent-service-register.json");
    let r = put(
        &format!("{}/v1/agent/service/register", consul.url()),
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty());
    let h = get(&format!("{}/v1/health/service/redis", consul.url())).await;
    let body = h.json();
    assert_eq!(body[0]["Service"]["ID"], "redis1");
    assert_eq!(
        body[0]["Service"]["Weights"],
        serde_json::json!({"Passing": 10, "Warning": 1})
    );
    let check = &body[0]["Checks"][1];
    assert_eq!(check["CheckID"], "service:redis1");
    assert_eq!(check["Name"], "Service 'redis' check");
    assert_eq!(check["Status"], "critical");

    // agent-check-update.json against a TTL check
    consul
        .register(ServiceDef::new("api").check(CheckDef::ttl(Duration::from_secs(60))))
        .unwrap();
    let r = put(
        &format!("{}/v1/agent/check/update/service:api", consul.url()),
        fixture_text("agent-check-update.json").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = get(&format!("{}/v1/health/checks/api", consul.url())).await;
    assert_eq!(h.json()[0]["Status"], "passing");
    assert_eq!(
        h.json()[0]["Output"],
        fixture_json("agent-check-update.json")["Output"]
    );
}

#[tokio::test]
async fn empty_lists_are_not_null_and_pretty_is_go_like() {
    let consul = ConsulDouble::builder().consul_service(false).start().await;
    let r = get(&format!("{}/v1/health/service/nope", consul.url())).await;
    assert_eq!((r.status, r.text().as_str()), (200, "[]"));
    assert!(r.index() >= 1);
    let r = get(&format!("{}/v1/catalog/services", consul.url())).await;
    assert_eq!(r.text(), "{}");
    let r = get(&format!("{}/v1/catalog/service/nope", consul.url())).await;
    assert_eq!(r.text(), "[]");
    consul.register(ServiceDef::new("web")).unwrap();
    let r = get(&format!("{}/v1/health/service/web", consul.url())).await;
    let b = r.json();
    assert_eq!(b[0]["Service"]["Tags"], serde_json::json!([]));
    assert_eq!(b[0]["Service"]["Meta"], serde_json::json!({}));
    assert_eq!(b[0]["Checks"][0]["ServiceTags"], serde_json::json!([]));
    let r = get(&format!("{}/v1/catalog/services?pretty", consul.url())).await;
    assert_eq!(r.text(), "{\n    \"web\": []\n}\n");
}

#[tokio::test]
async fn header_names_use_go_canonical_spelling_on_the_wire() {
    let consul = ConsulDouble::start().await;
    let raw = raw_request(
        consul.addr(),
        "GET /v1/health/service/consul HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    for h in [
        "X-Consul-Index: ",
        "X-Consul-Knownleader: true",
        "X-Consul-Lastcontact: 0",
        "X-Consul-Effective-Consistency: leader",
        "X-Consul-Default-Acl-Policy: allow",
        "X-Consul-Query-Backend: blocking-query",
        "Content-Type: application/json",
    ] {
        assert!(raw.contains(&format!("\r\n{h}")), "missing {h:?} in\n{raw}");
    }
}
