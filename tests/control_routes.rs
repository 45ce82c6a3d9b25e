//! End to end, route rules through the control plane: rules set with the
//! `almond route` CLI (and the API) reach a following proxy and route its
//! real traffic; invalid rules (unknown subset or service, bad match) and
//! a stale version are refused with the reason and change nothing; every
//! change is in the audit trail; `clear` goes back to the split.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "s3cret-routes-token";

struct Setup {
    _backends: Vec<Backend>,
    _registry: Registry,
    control: TestControl,
    proxy: TestProxy,
}

/// Service `s` (v1 and v2) and `assets`, a control plane with a token in
/// `token_env`, a proxy following it; the split sends all of `s` to v1.
async fn setup(token_env: &str) -> Setup {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let assets = Backend::start("assets").await;
    let registry = Registry::new();
    registry.service("s", &[(v1.addr, "v1"), (v2.addr, "v2")]);
    registry.service("assets", &[(assets.addr, "v1")]);
    std::env::set_var(token_env, TOKEN);
    let control = TestControl::start(&registry.control_yaml(Some(token_env))).await;
    let proxy = start_following_token(&control.url(), token_env).await;
    let reply = control
        .put_split(
            "s",
            &json!({ "weights": { "v1": 100, "v2": 0 } }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually("the proxy serves s and assets", || async {
        get_h1(proxy.addr(), "s", "/x").await.backend() == "v1"
            && get_h1(proxy.addr(), "assets", "/").await.status == StatusCode::OK
    })
    .await;
    Setup {
        _backends: vec![v1, v2, assets],
        _registry: registry,
        control,
        proxy,
    }
}

impl Setup {
    fn ops<'a>(&'a self, url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(["--control", url, "--token", TOKEN]);
        all
    }

    async fn put_routes(&self, body: &Value, token: Option<&str>) -> Reply {
        let path = "/v1/services/s/routes";
        self.control.send(Method::PUT, path, body, token).await
    }

    async fn policy(&self) -> Value {
        self.control.service("s").await["policy"].clone()
    }

    /// Waits until `path` on host `s` is answered by `backend`.
    async fn routes_to(&self, path: &str, backend: &str) {
        eventually(&format!("{path} goes to {backend}"), || async {
            get_h1(self.proxy.addr(), "s", path).await.backend() == backend
        })
        .await;
    }
}

#[tokio::test]
async fn rules_set_by_the_cli_route_a_following_proxy_and_clear_goes_back_to_the_split() {
    let c = setup("ALMOND_TEST_TOKEN_ROUTES_CLI").await;
    let url = c.control.url();
    let file = write_temp(
        ".yaml",
        "- match: { path_prefix: /beta }\n  to: { subset: v2 }\n\
         - match: { path_prefix: /static, method: GET }\n  to: { service: assets }\n",
    );
    let path = file.path().to_str().unwrap();
    let (code, out, err) = run_ops(&c.ops(&url, &["route", "set", "s", path])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("2 route rule(s)"), "{out}");
    c.routes_to("/beta/x", "v2").await;
    c.routes_to("/static/app.js", "assets").await;
    c.routes_to("/other", "v1").await;

    let (code, out, _) = run_ops(&c.ops(&url, &["route", "list", "s"])).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("1. path_prefix=/beta -> subset v2"), "{out}");
    let (code, out, _) = run_ops(&c.ops(&url, &["route", "list", "s", "-o", "json"])).await;
    assert_eq!(code, Some(0));
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["rules"][1]["to"]["service"], "assets");

    let (code, out, err) = run_ops(&c.ops(&url, &["route", "clear", "s"])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    c.routes_to("/beta/x", "v1").await;
    c.routes_to("/static/app.js", "v1").await;

    // The audit trail: who, what, in order.
    let history = c.policy().await["history"].clone();
    let actions: Vec<&str> = (history.as_array().unwrap().iter())
        .filter_map(|h| h["action"].as_str())
        .collect();
    assert_eq!(actions, ["shift", "routes set", "routes clear"]);
    assert_eq!(history[1]["routes"][0]["match"]["path_prefix"], "/beta");
    assert!(history[2].get("routes").is_none());
}

#[tokio::test]
async fn invalid_rules_and_stale_versions_are_refused_and_change_nothing() {
    let c = setup("ALMOND_TEST_TOKEN_ROUTES_INVALID").await;
    let good =
        json!({ "rules": [ { "match": { "path_prefix": "/beta" }, "to": { "subset": "v2" } } ] });
    let reply = c.put_routes(&good, Some(TOKEN)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let version = reply.json()["policy"]["version"].as_u64().unwrap();
    c.routes_to("/beta", "v2").await;
    let before = c.policy().await;

    let rule = |m: Value, to: Value| json!({ "rules": [ { "match": m, "to": to } ] });
    let cases: [(&str, Value, Option<&str>, StatusCode, &str); 6] = [
        (
            "unknown subset",
            rule(json!({}), json!({ "subset": "v9" })),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "no endpoint has subset \"v9\" (known subsets: v1, v2)",
        ),
        (
            "unknown service",
            rule(json!({}), json!({ "service": "nope" })),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "routes[0].to.service: no service named \"nope\"",
        ),
        (
            "bad match",
            rule(json!({ "path_prefix": "beta" }), json!({ "subset": "v2" })),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "routes[0].match.path_prefix",
        ),
        (
            "unknown key",
            rule(json!({ "path_regex": ".*" }), json!({ "subset": "v2" })),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "path_regex",
        ),
        (
            "stale version",
            json!({ "rules": [], "version": version - 1 }),
            Some(TOKEN),
            StatusCode::CONFLICT,
            "changed since version",
        ),
        (
            "no token",
            good.clone(),
            None,
            StatusCode::UNAUTHORIZED,
            "token",
        ),
    ];
    for (what, body, token, status, says) in cases {
        let reply = c.put_routes(&body, token).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert!(reply.text().contains(says), "{what}: {}", reply.text());
        assert_eq!(c.policy().await, before, "{what} changed the policy");
    }
    let reply = c
        .control
        .send(Method::DELETE, "/v1/services/s/routes", &json!({}), None)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(c.policy().await, before);
    c.routes_to("/beta", "v2").await;

    // The CLI checks a file before sending it, naming the line.
    let url = c.control.url();
    let file = write_temp(".yaml", "- match: { method: get }\n  to: { subset: v2 }\n");
    let path = file.path().to_str().unwrap();
    let (code, _, err) = run_ops(&c.ops(&url, &["route", "set", "s", path])).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("[0].match.method") && err.contains("line 1"),
        "{err}"
    );
    assert_eq!(c.policy().await, before);
}

#[tokio::test]
async fn a_mirror_set_by_the_cli_copies_traffic_and_invalid_ones_change_nothing() {
    let c = setup("ALMOND_TEST_TOKEN_MIRROR_CLI").await;
    let url = c.control.url();
    // Refused: unknown subset, unknown service, a percent out of range.
    let before = c.policy().await;
    for (args, says) in [
        (
            vec!["--subset", "v9", "--percent", "10"],
            "known subsets: v1, v2",
        ),
        (
            vec!["--service", "nope", "--percent", "10"],
            "no service named \"nope\"",
        ),
        (
            vec!["--subset", "v2", "--percent", "101"],
            "between 0 and 100",
        ),
    ] {
        let mut all = vec!["mirror", "set", "s"];
        all.extend(args);
        let (code, _, err) = run_ops(&c.ops(&url, &all)).await;
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(c.policy().await, before);
    }

    let args = ["mirror", "set", "s", "--subset", "v2", "--percent", "100"];
    let (code, out, err) = run_ops(&c.ops(&url, &args)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("100% of requests copied to subset v2"),
        "{out}"
    );
    let v2 = &c._backends[1];
    eventually("copies reach v2", || async {
        let before = v2.count();
        let reply = get_h1(c.proxy.addr(), "s", "/x").await;
        assert_eq!(reply.backend(), "v1");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        v2.count() > before
    })
    .await;
    assert_eq!(v2.last().headers["x-almond-mirror"], "1");
    let (code, out, _) = run_ops(&c.ops(&url, &["mirror", "list", "s"])).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("subset v2"), "{out}");

    let (code, _, err) = run_ops(&c.ops(&url, &["mirror", "clear", "s"])).await;
    assert_eq!(code, Some(0), "{err}");
    let history = c.policy().await["history"].clone();
    let actions: Vec<&str> = (history.as_array().unwrap().iter())
        .filter_map(|h| h["action"].as_str())
        .collect();
    assert_eq!(actions, ["shift", "mirror set", "mirror clear"]);
    eventually("copies stop", || async {
        let before = v2.count();
        get_h1(c.proxy.addr(), "s", "/x").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        v2.count() == before
    })
    .await;
}
