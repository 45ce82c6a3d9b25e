//! ACL mode: token sources, 403 bodies, silent list filtering.

use almond_consul_double::{Access, AclPolicy, ConsulDouble, ServiceDef};

use crate::common::*;

async fn secured() -> ConsulDouble {
    let consul = ConsulDouble::builder()
        .acl_token(Some("secret"))
        .token(
            "web-reader",
            AclPolicy::deny_all()
                .service("web", Access::Read)
                .node_prefix("", Access::Read)
                .key_prefix("app/", Access::Read),
        )
        .start()
        .await;
    consul.register(ServiceDef::new("web")).unwrap();
    consul.register(ServiceDef::new("db")).unwrap();
    consul.kv_put("app/x", "1");
    consul.kv_put("secret/y", "2");
    consul
}

#[tokio::test]
async fn unknown_token_is_403_acl_not_found_from_every_source() {
    let consul = secured().await;
    let u = consul.url();
    let url = format!("{u}/v1/health/service/web");
    for r in [
        get_with(&url, &[("X-Consul-Token", "bogus")]).await,
        get_with(&url, &[("Authorization", "Bearer bogus")]).await,
        get(&format!("{url}?token=bogus")).await,
        put(&format!("{u}/v1/kv/app/x?token=bogus"), b"v").await,
        put(
            &format!("{u}/v1/agent/service/register?token=bogus"),
            br#"{"Name":"x"}"#,
        )
        .await,
    ] {
        assert_eq!((r.status, r.text().as_str()), (403, "ACL not found"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("text/plain; charset=utf-8")
        );
    }
    // The client's token is visible to tests.
    let reqs = consul.requests();
    assert_eq!(reqs[0].header("x-consul-token").as_deref(), Some("bogus"));
    // A deleted token stops working.
    let ok = get_with(&url, &[("X-Consul-Token", "web-reader")]).await;
    assert_eq!(ok.status, 200);
    assert!(consul.remove_acl_token("web-reader"));
    let r = get_with(&url, &[("X-Consul-Token", "web-reader")]).await;
    assert_eq!((r.status, r.text().as_str()), (403, "ACL not found"));
}

#[tokio::test]
async fn lists_are_filtered_silently() {
    let consul = secured().await;
    let u = consul.url();
    // management token: everything
    let all = get_with(
        &format!("{u}/v1/catalog/services"),
        &[("X-Consul-Token", "secret")],
    )
    .await;
    let all = all.json();
    assert!(all.get("web").is_some() && all.get("db").is_some() && all.get("consul").is_some());
    // limited token: only web, flagged as filtered
    let r = get_with(
        &format!("{u}/v1/catalog/services"),
        &[("Authorization", "Bearer web-reader")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"web": []}));
    assert_eq!(
        r.header("x-consul-results-filtered-by-acls").as_deref(),
        Some("true")
    );
    assert_eq!(
        r.header("x-consul-default-acl-policy").as_deref(),
        Some("deny")
    );
    let r = get(&format!("{u}/v1/health/service/db?token=web-reader")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "[]"));
    let r = get(&format!("{u}/v1/health/service/web?token=web-reader")).await;
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert!(r.header("x-consul-results-filtered-by-acls").is_none());
    // anonymous: empty lists, no filtered header (no token given)
    let r = get(&format!("{u}/v1/catalog/services")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));
    assert!(r.header("x-consul-results-filtered-by-acls").is_none());
    // KV list filtered; single key denied with 403
    let r = get(&format!("{u}/v1/kv/?recurse&token=web-reader")).await;
    let keys: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, vec!["app/x"]);
    let r = get(&format!("{u}/v1/kv/secret/y?token=web-reader")).await;
    assert_eq!(r.status, 403);
    assert!(
        r.text()
            .starts_with("Permission denied: token with AccessorID '")
            && r.text()
                .ends_with("lacks permission 'key:read' on \"secret/y\""),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn writes_need_write_permission() {
    let consul = secured().await;
    let u = consul.url();
    let r = put(
        &format!("{u}/v1/agent/service/register?token=web-reader"),
        br#"{"Name":"web"}"#,
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r
        .text()
        .contains("lacks permission 'service:write' on \"web\""));
    let r = put(&format!("{u}/v1/kv/app/x?token=web-reader"), b"v").await;
    assert_eq!(r.status, 403);
    assert!(r.text().starts_with("Permission denied"));
    let r = call(
        "PUT",
        &format!("{u}/v1/agent/service/register"),
        &[("X-Consul-Token", "secret")],
        br#"{"Name":"api"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let id = consul.add_acl_token("ops", AclPolicy::management());
    assert!(!id.is_empty());
    let r = put(
        &format!("{u}/v1/agent/service/deregister/api?token=ops"),
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn acl_disabled_accepts_any_token() {
    let consul = ConsulDouble::start().await;
    let r = get_with(
        &format!("{}/v1/catalog/services", consul.url()),
        &[("X-Consul-Token", "whatever")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-consul-default-acl-policy").as_deref(),
        Some("allow")
    );
}
