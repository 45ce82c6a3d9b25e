//! Route rules end to end over real sockets: each matcher (path prefix,
//! exact path, method, header value and presence, cookie), first-match
//! order, fall-through to the split, `to: service` fanning one host out by
//! path, and a pinned subset still winning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use support::*;

/// Service `web`: subsets v1 (backend `v1`), v2 (`v2`), v3 (`v3`), split
/// all to v1, with `rules`; service `assets` (backend `assets`).
async fn routed(rules: &str) -> (Vec<Backend>, TestProxy) {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let v3 = Backend::start("v3").await;
    let assets = Backend::start("assets").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .endpoint(v1.addr, "v1", 1)
                .endpoint(v2.addr, "v2", 1)
                .endpoint(v3.addr, "v3", 1)
                .split(&[("v1", 100)])
                .set("routes", rules),
        )
        .service(ServiceYaml::new("assets").at(assets.addr))
        .start()
        .await;
    (vec![v1, v2, v3, assets], proxy)
}

/// Which backend answers `method path` with `headers` (Host: web).
async fn who(proxy: &TestProxy, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let reply = H1::connect(proxy.addr())
        .await
        .request(req.body(empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{method} {path} {headers:?}");
    reply.backend().to_owned()
}

#[tokio::test]
async fn each_matcher_sends_to_its_subset_and_the_rest_falls_through_to_the_split() {
    let (_backends, proxy) = routed(
        "[ { match: { path_prefix: /api/v2 }, to: { subset: v2 } },
           { match: { path_exact: /exact }, to: { subset: v2 } },
           { match: { method: DELETE }, to: { subset: v2 } },
           { match: { headers: { x-beta: \"1\" } }, to: { subset: v2 } },
           { match: { headers: { x-debug: { present: true } } }, to: { subset: v3 } },
           { match: { cookie: { canary: always } }, to: { subset: v3 } } ]",
    )
    .await;
    let p = &proxy;
    // path_prefix: whole segments, query ignored.
    assert_eq!(who(p, "GET", "/api/v2", &[]).await, "v2");
    assert_eq!(who(p, "GET", "/api/v2/orders?x=1", &[]).await, "v2");
    assert_eq!(who(p, "GET", "/api/v20", &[]).await, "v1");
    assert_eq!(who(p, "GET", "/api", &[]).await, "v1");
    // path_exact.
    assert_eq!(who(p, "GET", "/exact?q=1", &[]).await, "v2");
    assert_eq!(who(p, "GET", "/exact/more", &[]).await, "v1");
    // method.
    assert_eq!(who(p, "DELETE", "/x", &[]).await, "v2");
    assert_eq!(who(p, "GET", "/x", &[]).await, "v1");
    // header value, exact.
    assert_eq!(who(p, "GET", "/x", &[("x-beta", "1")]).await, "v2");
    assert_eq!(who(p, "GET", "/x", &[("x-beta", "10")]).await, "v1");
    // header presence, any value, name case-insensitive.
    assert_eq!(who(p, "GET", "/x", &[("X-Debug", "")]).await, "v3");
    // cookie, among others.
    let cookie = [("cookie", "session=abc; canary=always")];
    assert_eq!(who(p, "GET", "/x", &cookie).await, "v3");
    assert_eq!(
        who(p, "GET", "/x", &[("cookie", "canary=never")]).await,
        "v1"
    );
}

#[tokio::test]
async fn the_first_matching_rule_wins_whatever_its_kind() {
    let (_backends, proxy) = routed(
        "[ { match: { path_prefix: /api, method: POST }, to: { subset: v3 } },
           { match: { path_exact: /api/items }, to: { subset: v2 } },
           { match: { path_prefix: /api/items }, to: { subset: v3 } },
           { match: { path_prefix: / }, to: { subset: v2 } } ]",
    )
    .await;
    let p = &proxy;
    assert_eq!(who(p, "POST", "/api/items", &[]).await, "v3", "rule 0");
    assert_eq!(who(p, "GET", "/api/items", &[]).await, "v2", "rule 1");
    assert_eq!(who(p, "GET", "/api/items/7", &[]).await, "v3", "rule 2");
    assert_eq!(who(p, "GET", "/other", &[]).await, "v2", "rule 3");
}

#[tokio::test]
async fn to_service_fans_one_host_out_by_path_and_counts_it_there() {
    let (backends, proxy) = routed(
        "[ { match: { path_prefix: /static }, to: { service: assets } },
           { match: { path_prefix: /beta }, to: { subset: v2 } } ]",
    )
    .await;
    let p = &proxy;
    assert_eq!(who(p, "GET", "/static/app.js", &[]).await, "assets");
    assert_eq!(who(p, "GET", "/beta/x", &[]).await, "v2");
    assert_eq!(who(p, "GET", "/", &[]).await, "v1");
    // The request keeps its Host: the upstream sees what the client sent.
    let seen = backends[3].last();
    assert_eq!(seen.path, "/static/app.js");
    assert_eq!(seen.authority.as_deref(), Some("web"));
    // Golden metrics count it under the service that served it.
    let text = proxy.admin_get("/metrics").await.text();
    let labels = [("service", "assets"), ("direction", "outbound")];
    assert_eq!(metric(&text, "almond_requests_total", &labels), 1.0);
}

#[tokio::test]
async fn a_pinned_subset_still_wins_over_a_rule() {
    let (_backends, proxy) = routed("[ { match: { path_prefix: / }, to: { subset: v2 } } ]").await;
    let pinned = [("x-almond-subset", "v3")];
    assert_eq!(who(&proxy, "GET", "/x", &pinned).await, "v3");
    assert_eq!(who(&proxy, "GET", "/x", &[]).await, "v2");
}

#[tokio::test]
async fn rules_naming_nothing_are_refused_with_key_and_line() {
    let yaml = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("web")
                .endpoint("127.0.0.1:1".parse().unwrap(), "v1", 1)
                .set(
                    "routes",
                    "[ { match: { path_prefix: /a }, to: { subset: v9 } }, \
                     { match: { method: get }, to: { service: nope } } ]",
                ),
        )
        .build();
    let err = almond_config::load_proxy(&yaml, "t.yaml").unwrap_err();
    let got: Vec<(&str, Option<usize>)> = err
        .problems
        .iter()
        .map(|p| (p.path.as_str(), p.line))
        .collect();
    assert_eq!(
        got,
        [
            ("services.web.routes[0].to.subset", Some(6)),
            ("services.web.routes[1].match.method", Some(6)),
            ("services.web.routes[1].to.service", Some(6)),
        ],
        "{err}"
    );
    assert!(
        err.to_string().contains("no endpoint has subset \"v9\""),
        "{err}"
    );
    assert!(
        err.to_string().contains("no service named \"nope\""),
        "{err}"
    );
}
