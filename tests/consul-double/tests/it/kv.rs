//! KV: CAS semantics, 404s, recurse/keys/raw, flags, size limit.

use almond_consul_double::ConsulDouble;

use crate::common::*;

#[tokio::test]
async fn cas_semantics() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    // cas=0: create only
    let r = put(&format!("{u}/v1/kv/lock?cas=0"), b"one").await;
    assert_eq!((r.status, r.text().as_str()), (200, "true"));
    let r = put(&format!("{u}/v1/kv/lock?cas=0"), b"two").await;
    assert_eq!((r.status, r.text().as_str()), (200, "false"));
    let e = consul.kv_get("lock").unwrap();
    assert_eq!(e.value, b"one");
    // wrong index: 200 false, nothing written
    let r = put(
        &format!("{u}/v1/kv/lock?cas={}", e.modify_index + 100),
        b"x",
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "false"));
    // right index: written, ModifyIndex moves, CreateIndex kept
    let r = put(&format!("{u}/v1/kv/lock?cas={}", e.modify_index), b"three").await;
    assert_eq!(r.text(), "true");
    let e2 = consul.kv_get("lock").unwrap();
    assert_eq!(e2.value, b"three");
    assert!(e2.modify_index > e.modify_index);
    assert_eq!(e2.create_index, e.create_index);
    // stale index now fails
    let r = put(&format!("{u}/v1/kv/lock?cas={}", e.modify_index), b"four").await;
    assert_eq!(r.text(), "false");
    // cas=N on a missing key fails
    let r = put(&format!("{u}/v1/kv/missing?cas=5"), b"x").await;
    assert_eq!(r.text(), "false");
    assert!(consul.kv_get("missing").is_none());

    // DELETE with cas
    let r = call("DELETE", &format!("{u}/v1/kv/lock?cas=0"), &[], b"").await;
    assert_eq!(r.text(), "false");
    let r = call(
        "DELETE",
        &format!("{u}/v1/kv/lock?cas={}", e2.modify_index + 1),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.text(), "false");
    let r = call(
        "DELETE",
        &format!("{u}/v1/kv/lock?cas={}", e2.modify_index),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.text(), "true");
    assert!(consul.kv_get("lock").is_none());
    let r = call("DELETE", &format!("{u}/v1/kv/lock?cas=3"), &[], b"").await;
    assert_eq!(r.text(), "true", "CAS delete of a missing key answers true");
}

#[tokio::test]
async fn conflicting_flags_and_missing_key() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    let r = put(&format!("{u}/v1/kv/k?cas=0&acquire=s1"), b"x").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Conflicting flags: "), "{}", r.text());
    let r = call("DELETE", &format!("{u}/v1/kv/k?recurse&cas=1"), &[], b"").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Conflicting flags: "));
    let r = put(&format!("{u}/v1/kv/"), b"x").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
    let r = get(&format!("{u}/v1/kv/")).await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
}

#[tokio::test]
async fn value_size_limit_is_413() {
    let consul = ConsulDouble::start().await;
    let big = vec![b'a'; 512 * 1024 + 1];
    let r = put(&format!("{}/v1/kv/big", consul.url()), &big).await;
    assert_eq!(r.status, 413);
    assert!(
        r.text()
            .starts_with("Request body(524289 bytes) too large, max size: 524288 bytes."),
        "{}",
        r.text()
    );
    let ok = vec![b'a'; 512 * 1024];
    let r = put(&format!("{}/v1/kv/big", consul.url()), &ok).await;
    assert_eq!(r.text(), "true");
}

#[tokio::test]
async fn reads_single_recurse_keys_raw() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    put(&format!("{u}/v1/kv/app/a?flags=42"), b"A").await;
    put(&format!("{u}/v1/kv/app/b"), b"").await;
    put(&format!("{u}/v1/kv/apple"), b"x").await;
    // single
    let r = get(&format!("{u}/v1/kv/app/a")).await;
    let b = r.json();
    assert_eq!(b[0]["Flags"], 42);
    assert_eq!(b[0]["Value"], "QQ==");
    assert_eq!(r.index(), b[0]["ModifyIndex"].as_u64().unwrap());
    // empty value → null
    let r = get(&format!("{u}/v1/kv/app/b")).await;
    assert!(r.json()[0]["Value"].is_null());
    assert!(r.text().contains(r#""Value":null"#));
    // recurse: plain string prefix (not segment aware)
    let r = get(&format!("{u}/v1/kv/app?recurse")).await;
    let keys: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, vec!["app/a", "app/b", "apple"]);
    // recurse with no match → 404 with index
    let r = get(&format!("{u}/v1/kv/nothing/?recurse")).await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert!(r.index() >= 1);
    // keys
    let r = get(&format!("{u}/v1/kv/app/?keys")).await;
    assert_eq!(r.json(), serde_json::json!(["app/a", "app/b"]));
    let r = get(&format!("{u}/v1/kv/?keys&separator=/")).await;
    assert_eq!(r.json(), serde_json::json!(["app/", "apple"]));
    let r = get(&format!("{u}/v1/kv/zzz?keys")).await;
    assert_eq!(r.status, 404);
    // raw
    let r = get(&format!("{u}/v1/kv/app/a?raw")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"A");
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        r.header("content-security-policy").as_deref(),
        Some("sandbox")
    );
    // missing single key: 404, empty body, index headers
    let r = get(&format!("{u}/v1/kv/nope")).await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert!(r.header("x-consul-knownleader").is_some());
    assert!(r.index() >= 1);
}

#[tokio::test]
async fn delete_recurse_and_identical_writes() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    let i1 = consul.kv_put("svc/a", "1");
    consul.kv_put("svc/b", "2");
    // identical write keeps ModifyIndex (current state store)
    let r = put(&format!("{u}/v1/kv/svc/a"), b"1").await;
    assert_eq!(r.text(), "true");
    assert_eq!(consul.kv_get("svc/a").unwrap().modify_index, i1);
    // ... unless the hook forces an idempotent bump
    let bumped = consul.kv_bump_without_change("svc/a").unwrap();
    assert!(bumped > i1);
    assert_eq!(consul.kv_get("svc/a").unwrap().value, b"1");
    // delete missing key: no-op, true
    assert_eq!(delete(&format!("{u}/v1/kv/svc/zzz")).await.text(), "true");
    let before = consul.kv_prefix_index("svc/");
    let r = delete(&format!("{u}/v1/kv/svc/?recurse")).await;
    assert_eq!(r.text(), "true");
    assert!(consul.kv_get("svc/a").is_none() && consul.kv_get("svc/b").is_none());
    let r = get(&format!("{u}/v1/kv/svc/?recurse")).await;
    assert_eq!(r.status, 404);
    assert!(
        r.index() > before,
        "tombstones keep the prefix index moving forward"
    );
}

#[tokio::test]
async fn lock_acquire_and_release() {
    let consul = ConsulDouble::start().await;
    let u = consul.url();
    assert_eq!(
        put(&format!("{u}/v1/kv/l?acquire=s1"), b"x").await.text(),
        "true"
    );
    assert_eq!(
        put(&format!("{u}/v1/kv/l?acquire=s2"), b"x").await.text(),
        "false"
    );
    assert_eq!(
        put(&format!("{u}/v1/kv/l?release=s2"), b"x").await.text(),
        "false"
    );
    assert_eq!(
        put(&format!("{u}/v1/kv/l?release=s1"), b"x").await.text(),
        "true"
    );
    let e = consul.kv_get("l").unwrap();
    assert_eq!(e.session, None);
    assert_eq!(e.lock_index, 1);
    assert_eq!(
        put(&format!("{u}/v1/kv/l?acquire=s2"), b"x").await.text(),
        "true"
    );
    assert_eq!(consul.kv_get("l").unwrap().lock_index, 2);
}
