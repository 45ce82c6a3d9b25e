//! End to end, traffic splits: the control plane (file registry, policy
//! file) and a proxy following it in-process, backends that say who they
//! are, and the `almond` binary's operator commands. A split set through
//! the API or the CLI shapes real traffic; pins override it; concurrent
//! shifts do not lose updates; refused shifts change nothing; the split
//! survives a control restart; rollback, promote and the audit trail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use support::*;

/// The token every mutation of these tests presents.
const TOKEN: &str = "s3cret-test-token";

/// A service `s` with subsets v1 (two endpoints) and v2 (one), the control
/// plane on it with a bearer token in env var `token_env` (unique per
/// test: tests share the process environment), and a proxy following it.
struct Canary {
    v1a: Backend,
    v1b: Backend,
    v2: Backend,
    registry: Registry,
    /// Its env var stays set: names are unique per test.
    token_env: String,
    control: TestControl,
    proxy: TestProxy,
}

impl Canary {
    async fn start(token_env: &str) -> Canary {
        let v1a = Backend::start("v1a").await;
        let v1b = Backend::start("v1b").await;
        let v2 = Backend::start("v2").await;
        let registry = Registry::new();
        // Round robin within a subset, so both v1 endpoints surely get
        // traffic; the split between subsets is what these tests measure.
        registry.service_lb(
            "s",
            "round_robin",
            &[(v1a.addr, "v1"), (v1b.addr, "v1"), (v2.addr, "v2")],
        );
        std::env::set_var(token_env, TOKEN);
        let control = TestControl::start(&registry.control_yaml(Some(token_env))).await;
        let proxy = start_following_token(&control.url(), token_env).await;
        eventually("the proxy routes s", || async {
            get_h1(proxy.addr(), "s", "/").await.status == StatusCode::OK
        })
        .await;
        Canary {
            v1a,
            v1b,
            v2,
            registry,
            token_env: token_env.to_owned(),
            control,
            proxy,
        }
    }

    /// Sets `weights` through the API with the right token; must be 200.
    async fn shift(&self, weights: Value) -> Value {
        let reply = self
            .control
            .put_split("s", &json!({ "weights": weights }), Some(TOKEN))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }

    /// `GET /v1/services/s` -> `policy`.
    async fn policy(&self) -> Value {
        self.control.service("s").await["policy"].clone()
    }

    /// Waits until the proxy's `almond_split_weight` gauges are `want`.
    async fn proxy_split(&self, want: &[(&str, f64)]) {
        eventually(
            &format!("the proxy's split gauge shows {want:?}"),
            || async {
                let text = self.proxy.admin_get("/metrics").await.text();
                want.iter().all(|(subset, w)| {
                    metric(
                        &text,
                        "almond_split_weight",
                        &[("service", "s"), ("subset", subset)],
                    ) == *w
                })
            },
        )
        .await;
    }

    /// The `almond` CLI arguments that reach this control plane.
    fn ops<'a>(&'a self, url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(["--control", url, "--token", TOKEN]);
        all
    }

    /// Requests through the proxy on four connections; returns v2's count.
    async fn v2_share(&self, n: usize) -> usize {
        let v2_before = self.v2.count();
        let total_before = self.v1a.count() + self.v1b.count() + self.v2.count();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let addr = self.proxy.addr();
            tasks.push(tokio::spawn(async move {
                let mut c = H1::connect(addr).await;
                for _ in 0..n / 4 {
                    let reply = c.get("s", "/").await;
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let total = self.v1a.count() + self.v1b.count() + self.v2.count();
        assert_eq!(total - total_before, n / 4 * 4);
        self.v2.count() - v2_before
    }
}

/// The split as JSON (`{"v1": 90, "v2": 10}`).
fn split(v1: u32, v2: u32) -> Value {
    json!({ "v1": v1, "v2": v2 })
}

#[tokio::test]
async fn a_90_10_split_set_by_the_cli_shapes_real_traffic() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_CLI").await;
    let url = c.control.url();
    let (code, out, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=90", "v2=10"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("v1=90") && out.contains("v2=10"), "{out}");
    assert_eq!(c.policy().await["split"], split(90, 10));
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;

    const N: usize = 2000;
    let v2 = c.v2_share(N).await as f64;
    // Each request picks v2 with p = 0.1 independently, so v2's count is
    // Binomial(2000, 0.1): mean 200, sigma = sqrt(2000 * 0.1 * 0.9) ~ 13.4.
    // A 5-sigma band (+-67) fails by chance about once in 1.7 million runs,
    // yet catches a split off by a third (e.g. endpoint weighting, which
    // would give v2 a third of the traffic, or a 80/20 split).
    assert!((v2 - 200.0).abs() <= 5.0 * 13.42, "v2 got {v2} of {N}");
    // v1's share is balanced over both of its endpoints.
    assert!(c.v1a.count() > 0 && c.v1b.count() > 0);
}

/// A split of v1=100, v2=0 whose v1 has lost every endpoint (all its
/// instances gone): the requests have nowhere to go (503 `no-endpoints`),
/// and v2, at 0 %, gets none of them. Once v1 is back, it gets them all.
#[tokio::test]
async fn a_subset_at_zero_gets_nothing_when_the_split_s_subsets_are_empty() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_EMPTY").await;
    c.shift(split(100, 0)).await;
    c.proxy_split(&[("v1", 100.0), ("v2", 0.0)]).await;
    c.registry
        .service_lb("s", "round_robin", &[(c.v2.addr, "v2")]);
    eventually("the proxy has no v1 endpoint left", || async {
        get_h1(c.proxy.addr(), "s", "/").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let v2_before = c.v2.count();
    let mut client = H1::connect(c.proxy.addr()).await;
    for _ in 0..20 {
        let reply = client.get("s", "/").await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.header("x-almond-error"), Some("no-endpoints"));
    }
    assert_eq!(c.v2.count(), v2_before, "v2, at 0 %, got requests");
    // Counted under the subset they were meant for, where the service's
    // error rate sees them (they were counted as unroutable alone).
    let no_endpoints = [("service", "s"), ("subset", "v1"), ("kind", "no_endpoints")];
    let counted = proxy_metric(&c.proxy, "almond_upstream_errors_total", &no_endpoints).await;
    assert!(counted >= 20.0, "counted: {counted}");
    let failed = [("service", "s"), ("subset", "v1"), ("outcome", "failure")];
    let failed = proxy_metric(&c.proxy, "almond_requests_total", &failed).await;
    assert!(failed >= 20.0, "counted: {failed}");
    c.registry
        .service_lb("s", "round_robin", &[(c.v1a.addr, "v1"), (c.v2.addr, "v2")]);
    eventually("v1 is back", || async {
        get_h1(c.proxy.addr(), "s", "/").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(c.v2.count(), v2_before);
}

#[tokio::test]
async fn a_pinned_subset_overrides_the_split() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_PIN").await;
    c.shift(split(100, 0)).await;
    c.proxy_split(&[("v1", 100.0), ("v2", 0.0)]).await;
    // (Start-up's first request, before any split, may have reached v2.)
    let v2_before = c.v2.count();

    let mut client = H1::connect(c.proxy.addr()).await;
    for _ in 0..30 {
        let req = Request::get("/")
            .header("host", "s")
            .header("x-almond-subset", "v2")
            .body(empty())
            .unwrap();
        let reply = client.request(req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.backend(), "v2");
    }
    // Unpinned, the split (100 % v1) decides.
    for _ in 0..30 {
        assert!(client.get("s", "/").await.backend().starts_with("v1"));
    }
    assert_eq!(c.v2.count() - v2_before, 30);
    assert!(c
        .v2
        .seen()
        .iter()
        .all(|s| s.headers.get("x-almond-subset").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shifts_on_one_version_one_wins_none_is_lost() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_RACE").await;
    c.shift(split(90, 10)).await;
    for round in 0..10u32 {
        let before = c.policy().await;
        let version = before["version"].as_u64().unwrap();
        let a = split(50 + round, 50 - round);
        let b = split(20 + round, 80 - round);
        let put = |weights: &Value| {
            let body = json!({ "weights": weights, "version": version });
            let control = &c.control;
            async move { control.put_split("s", &body, Some(TOKEN)).await }
        };
        let (ra, rb) = tokio::join!(put(&a), put(&b));
        let mut codes = [ra.status, rb.status];
        codes.sort();
        assert_eq!(
            codes,
            [StatusCode::OK, StatusCode::CONFLICT],
            "round {round}: {} / {}",
            ra.text(),
            rb.text()
        );
        let (winner, loser) = if ra.status == StatusCode::OK {
            (&a, &rb)
        } else {
            (&b, &ra)
        };
        assert!(loser.text().contains("read"), "{}", loser.text());

        // The stored split is the winner's, one version on, with one
        // history entry from the split before.
        let after = c.policy().await;
        assert_eq!(&after["split"], winner, "round {round}");
        assert_eq!(after["version"].as_u64(), Some(version + 1));
        let history = after["history"].as_array().unwrap();
        let last = history.last().unwrap();
        assert_eq!(&last["to"], winner);
        assert_eq!(last["from"], before["split"]);
        assert_eq!(
            history.len(),
            before["history"].as_array().unwrap().len() + 1
        );
        let file: Value =
            serde_json::from_slice(&std::fs::read(&c.registry.policy_file).unwrap()).unwrap();
        assert_eq!(&file["s"]["split"], winner);
        assert_eq!(file["s"]["version"].as_u64(), Some(version + 1));
    }
    let last = c.policy().await["split"].clone();
    let (v1, v2) = (last["v1"].as_f64().unwrap(), last["v2"].as_f64().unwrap());
    c.proxy_split(&[("v1", v1), ("v2", v2)]).await;
}

#[tokio::test]
async fn invalid_shifts_are_refused_and_change_nothing() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_INVALID").await;
    c.shift(split(90, 10)).await;
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;
    let good = c.policy().await;
    let proxy_index = || async {
        let text = c.proxy.admin_get("/metrics").await.text();
        metric(&text, "almond_config_index", &[])
    };
    // The proxy has everything the control plane serves.
    eventually("the proxy is at the control plane's index", || async {
        proxy_index().await == c.control.state.index() as f64
    })
    .await;
    let index = proxy_index().await;

    let valid = json!({ "weights": split(50, 50) });
    let cases: [(&str, Value, Option<&str>, StatusCode, &str); 6] = [
        (
            // The flat shape would read it back as the sticky header, and
            // every proxy would refuse the snapshot.
            "a subset named sticky_header",
            json!({ "weights": { "v1": 100, "sticky_header": 0 }, "allow_empty": ["sticky_header"] }),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "rename the subset",
        ),
        (
            "bad sum",
            json!({ "weights": split(90, 20) }),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "sum",
        ),
        (
            "unknown subset",
            json!({ "weights": { "v1": 90, "v3": 10 } }),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "v3",
        ),
        (
            "not a split",
            json!({ "weights": split(90, 10), "colour": "blue" }),
            Some(TOKEN),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            "missing token",
            valid.clone(),
            None,
            StatusCode::UNAUTHORIZED,
            "token",
        ),
        (
            "wrong token",
            valid.clone(),
            Some("not-the-token"),
            StatusCode::FORBIDDEN,
            "token",
        ),
    ];
    for (what, body, token, status, says) in cases {
        let reply = c.control.put_split("s", &body, token).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert!(reply.text().contains(says), "{what}: {}", reply.text());
        assert_eq!(c.policy().await, good, "{what} changed the policy");
        let served = c.control.state.service("s").unwrap();
        assert_eq!(
            serde_json::to_value(served.split).unwrap(),
            split(90, 10),
            "{what} changed the served split"
        );
    }
    // A rollback without the token is refused too.
    let reply = c
        .control
        .send(Method::POST, "/v1/services/s/rollback", &json!({}), None)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(c.policy().await, good);

    // The proxy got nothing new, and its traffic is still 90/10.
    assert_eq!(proxy_index().await, index);
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;
    const N: usize = 1000;
    let v2 = c.v2_share(N).await as f64;
    // Binomial(1000, 0.1): mean 100, sigma = sqrt(1000 * 0.1 * 0.9) ~ 9.5;
    // 5 sigma (+-47) fails by chance about once in 1.7 million runs and
    // still tells 90/10 from the 50/50 the refused shifts asked for.
    assert!((v2 - 100.0).abs() <= 5.0 * 9.49, "v2 got {v2} of {N}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_survives_a_control_restart() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_RESTART").await;
    c.shift(split(80, 20)).await;
    c.shift(split(90, 10)).await;
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;
    let before = c.policy().await;

    // Stop the control plane; start a new one on the same registry and
    // policy file.
    let Canary {
        control,
        registry,
        token_env,
        ..
    } = c;
    control.shutdown().await;
    let yaml = registry.control_yaml(Some(&token_env));
    let restarted = TestControl::start(&yaml).await;

    // The first snapshot it serves already carries the split.
    let first = restarted
        .send(Method::GET, "/v1/snapshot?index=0", &json!({}), Some(TOKEN))
        .await
        .json();
    assert_eq!(first["services"]["s"]["split"], split(90, 10), "{first}");
    let after = restarted.service("s").await["policy"].clone();
    assert_eq!(after, before);

    // A proxy following it routes 90/10.
    let proxy = start_following_token(&restarted.url(), &token_env).await;
    eventually("the new proxy's split gauge shows 90/10", || async {
        let text = proxy.admin_get("/metrics").await.text();
        metric(
            &text,
            "almond_split_weight",
            &[("service", "s"), ("subset", "v1")],
        ) == 90.0
            && metric(
                &text,
                "almond_split_weight",
                &[("service", "s"), ("subset", "v2")],
            ) == 10.0
    })
    .await;
    // And rollback still knows the split before (from the file).
    let reply = restarted
        .send(
            Method::POST,
            "/v1/services/s/rollback",
            &json!({}),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["policy"]["split"], split(80, 20));
}

/// A reader that goes away (`almond status | head -1`, a tap piped to a
/// pager that quits) ends the command quietly: exit 0, no panic.
#[tokio::test]
async fn cli_output_to_a_closed_pipe_ends_quietly() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_PIPE").await;
    let url = c.control.url();
    for args in [vec!["status", "s"], vec!["status", "s", "-o", "json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = within(
            "almond to exit",
            almond()
                .args(c.ops(&url, &args))
                .env_remove("ALMOND_TOKEN")
                .env_remove("ALMOND_CONTROL")
                .stdin(std::process::Stdio::null())
                .stdout(writer)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// The first shift of a service rolls back to no split at all: every
/// subset by endpoint weight again, as before the shift (it was refused:
/// "no previous split").
#[tokio::test]
async fn the_first_shift_of_a_service_can_be_rolled_back() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_FIRST").await;
    let url = c.control.url();
    let (code, _, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=0", "v2=100"])).await;
    assert_eq!(code, Some(0), "{err}");
    c.proxy_split(&[("v1", 0.0), ("v2", 100.0)]).await;

    let (code, out, err) = run_ops(&c.ops(&url, &["rollback", "s"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("all subsets by endpoint weight"), "{out}");
    assert_eq!(c.policy().await["split"], Value::Null);
    let v1 = || c.v1a.count() + c.v1b.count();
    let before = v1();
    eventually("v1 gets traffic again", || async {
        let mut client = H1::connect(c.proxy.addr()).await;
        for _ in 0..10 {
            assert_eq!(client.get("s", "/").await.status, StatusCode::OK);
        }
        v1() > before
    })
    .await;
}

/// A rollback run twice (a double click, two on-call engineers, a command
/// run again after a timeout) is one rollback: the second changes
/// nothing. (It undid the first: after a promotion, it put the release
/// just rolled back in force again.)
#[tokio::test]
async fn a_second_rollback_changes_nothing() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_TWICE").await;
    let url = c.control.url();
    let (code, _, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=90", "v2=10"])).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run_ops(&c.ops(&url, &["promote", "s", "v2"])).await;
    assert_eq!(code, Some(0), "{err}");
    c.proxy_split(&[("v1", 0.0), ("v2", 100.0)]).await;

    let (code, out, err) = run_ops(&c.ops(&url, &["rollback", "s"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("s: rolled back"), "{out}");
    assert_eq!(c.policy().await["split"], split(90, 10));
    let version = c.policy().await["version"].clone();

    let (code, out, err) = run_ops(&c.ops(&url, &["rollback", "s"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("already rolled back"), "{out}");
    assert!(out.contains("v1=90") && out.contains("v2=10"), "{out}");
    let policy = c.policy().await;
    assert_eq!(policy["split"], split(90, 10));
    assert_eq!(policy["version"], version, "nothing was written");
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;
}

#[tokio::test]
async fn cli_rollback_promote_exit_codes_and_json() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_OPS").await;
    let url = c.control.url();

    // Nothing to roll back to yet: refused, exit 1, one line on stderr.
    let (code, out, err) = run_ops(&c.ops(&url, &["rollback", "s"])).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no previous split"), "{err}");
    assert!(out.is_empty(), "{out}");

    // Shift twice, roll back to the first.
    let (code, _, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=90", "v2=10"])).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) =
        run_ops(&c.ops(&url, &["shift", "s", "v1=50", "v2=50", "-o", "json"])).await;
    assert_eq!(code, Some(0), "{err}");
    let shifted: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(shifted["policy"]["split"], split(50, 50));
    c.proxy_split(&[("v1", 50.0), ("v2", 50.0)]).await;

    let (code, out, err) = run_ops(&c.ops(&url, &["rollback", "s"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("v1=90") && out.contains("v2=10"), "{out}");
    assert_eq!(c.policy().await["split"], split(90, 10));
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;

    // Promote: everything to v2.
    let (code, out, err) = run_ops(&c.ops(&url, &["promote", "s", "v2", "-o", "json"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let promoted: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(promoted["policy"]["split"], split(0, 100));
    assert_eq!(c.policy().await["split"], split(0, 100));
    c.proxy_split(&[("v1", 0.0), ("v2", 100.0)]).await;
    let before = (c.v1a.count() + c.v1b.count(), c.v2.count());
    let mut client = H1::connect(c.proxy.addr()).await;
    for _ in 0..20 {
        assert_eq!(client.get("s", "/").await.backend(), "v2");
    }
    assert_eq!(c.v1a.count() + c.v1b.count(), before.0);
    assert_eq!(c.v2.count(), before.1 + 20);

    // Refused by the API (bad sum, 400): exit 1, one line, state unchanged.
    let (code, out, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=90", "v2=20"])).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("110"), "{err}");
    // Wrong token: exit 1.
    let (code, _, err) = run_ops(&[
        "shift",
        "s",
        "v1=50",
        "v2=50",
        "--control",
        &url,
        "--token",
        "nope",
    ])
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("403"), "{err}");
    assert_eq!(c.policy().await["split"], split(0, 100));

    // Usage errors: exit 2.
    for args in [
        vec!["shift", "s"],
        vec!["shift"],
        vec!["promote", "s"],
        vec!["rollback"],
    ] {
        let args = c.ops(&url, &args);
        let (code, out, err) = run_ops(&args).await;
        assert_eq!(code, Some(2), "{args:?}: stdout: {out}\nstderr: {err}");
    }
    // Argument-shaped mistakes are usage errors too (exit 2), refused
    // before any request: nothing reaches the control plane.
    for args in [
        vec!["shift", "s", "v1:90"],
        vec!["shift", "s", "v1=ninety"],
        vec!["shift", "s", "v1=50", "v1=50"],
        vec![
            "shift",
            "s",
            "v1=100",
            "--sticky-header",
            "x",
            "--no-sticky",
        ],
        vec!["rollout", "s", "--canary", "v2", "--interval", "soon"],
        vec!["rollout", "s", "--canary", "v2", "--max-error-rate", "150%"],
        vec!["status", "s", "-o", "yaml"],
        vec!["status", "s", "--window", "2h"],
    ] {
        let args = c.ops(&url, &args);
        let (code, out, err) = run_ops(&args).await;
        assert_eq!(code, Some(2), "{args:?}: stdout: {out}\nstderr: {err}");
        assert!(err.contains("error:"), "{err}");
    }
    assert_eq!(c.policy().await["split"], split(0, 100));
    assert!(c.policy().await["rollout"].is_null());
    // So is a control URL that is not one.
    let (code, _, err) = run_ops(&["status", "s", "--control", "127.0.0.1:4180"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a URL"), "{err}");
    // An unknown service is a refusal (404): exit 1, one line.
    let (code, _, err) = run_ops(&c.ops(&url, &["status", "nope"])).await;
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // `status -o json` parses.
    let (code, out, err) = run_ops(&c.ops(&url, &["status", "s", "-o", "json"])).await;
    assert_eq!(code, Some(0), "{err}");
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(status[0]["policy"]["split"], split(0, 100));
}

#[tokio::test]
async fn the_audit_trail_lists_every_change_in_order() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_AUDIT").await;
    c.shift(split(90, 10)).await;
    c.shift(split(75, 25)).await;
    let reply = c
        .control
        .put_split(
            "s",
            &json!({ "weights": split(0, 100), "action": "promote" }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = c
        .control
        .send(
            Method::POST,
            "/v1/services/s/rollback",
            &json!({}),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let policy = c.policy().await;
    let history = policy["history"].as_array().unwrap();
    let trail: Vec<(Value, Value, &str)> = history
        .iter()
        .map(|h| {
            (
                h["from"].clone(),
                h["to"].clone(),
                h["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        trail,
        vec![
            (Value::Null, split(90, 10), "shift"),
            (split(90, 10), split(75, 25), "shift"),
            (split(75, 25), split(0, 100), "promote"),
            (split(0, 100), split(75, 25), "rollback"),
        ],
        "{policy}"
    );
    assert_eq!(policy["version"].as_u64(), Some(4));
    assert_eq!(policy["split"], split(75, 25));
    let times: Vec<u64> = history.iter().map(|h| h["at"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(history.iter().all(|h| h["by"].is_string()));
}

// ---------------------------------------------------------------------------
// Sticky splits
// ---------------------------------------------------------------------------

/// Users in these tests: `user-0` .. `user-199`.
const USERS: usize = 200;

/// Sends `rounds` requests per user (header `x-user-id: user-N`, on four
/// connections) and returns the subset each user landed on, asserting
/// that every request of a user landed on the same one.
async fn sticky_round(proxy: std::net::SocketAddr, host: &str, rounds: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for part in 0..4 {
        let host = host.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(proxy).await;
            let mut out = Vec::new();
            for user in (part..USERS).step_by(4) {
                let mut seen = Vec::new();
                for _ in 0..rounds {
                    let mut req = h1_get(&host, "/");
                    req.headers_mut()
                        .insert("x-user-id", format!("user-{user}").parse().unwrap());
                    let reply = c.request(req).await;
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                    // v1a and v1b are both subset v1.
                    seen.push(reply.backend().trim_end_matches(['a', 'b']).to_owned());
                }
                seen.dedup();
                assert_eq!(seen.len(), 1, "user-{user} moved within a split: {seen:?}");
                out.push((user, seen.remove(0)));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all.into_iter().map(|(_, subset)| subset).collect()
}

/// Users on v2 must be a binomial share of `USERS` at `percent`: within
/// five standard deviations (a user's side is a fixed hash of its ID, so
/// the count is deterministic; the bound says the hash spreads them).
fn assert_binomial(on_v2: usize, percent: f64) {
    let p = percent / 100.0;
    let mean = USERS as f64 * p;
    let sigma = (USERS as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (on_v2 as f64 - mean).abs() <= 5.0 * sigma,
        "{on_v2} of {USERS} users on v2 at {percent}% (mean {mean}, sigma {sigma:.1})"
    );
}

#[tokio::test]
async fn stickiness_keeps_users_on_one_side_through_the_control_plane() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_STICKY").await;
    let url = c.control.url();

    // 90/10, sticky on x-user-id, through the API.
    let reply = c
        .control
        .put_split(
            "s",
            &json!({ "weights": split(90, 10), "sticky_header": "x-user-id" }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["policy"]["sticky_header"], "x-user-id");
    c.proxy_split(&[("v1", 90.0), ("v2", 10.0)]).await;
    eventually("the proxy's config is sticky", || async {
        c.proxy
            .admin_get("/config")
            .await
            .text()
            .contains("x-user-id")
    })
    .await;

    let at_10 = sticky_round(c.proxy.addr(), "s", 5).await;
    let on_v2: Vec<usize> = (0..USERS).filter(|u| at_10[*u] == "v2").collect();
    assert!(!on_v2.is_empty(), "some users are on the canary");
    assert_binomial(on_v2.len(), 10.0);
    // The header is the application's: it reached the backend unchanged.
    let last = c.v2.last();
    let id = last.headers.get("x-user-id").and_then(|v| v.to_str().ok());
    assert!(id.is_some_and(|id| id.starts_with("user-")), "{last:?}");
    // Every proxy agrees: the side is a fixed hash of the value, which
    // this process computes the same way.
    for (user, subset) in at_10.iter().enumerate() {
        let h = almond_proxy::pipeline::split::hash(format!("user-{user}").as_bytes());
        let point = ((u128::from(h) * 100) >> 64) as u32;
        assert_eq!(subset, if point < 90 { "v1" } else { "v2" }, "user-{user}");
    }
    // A pin still wins over the sticky header.
    let mut req = h1_get("s", "/");
    req.headers_mut()
        .insert("x-user-id", format!("user-{}", on_v2[0]).parse().unwrap());
    req.headers_mut()
        .insert("x-almond-subset", "v1".parse().unwrap());
    assert!(H1::connect(c.proxy.addr())
        .await
        .request(req)
        .await
        .backend()
        .starts_with("v1"));

    // 50/50 by the CLI, without --sticky-header: stickiness is kept, and
    // every user who was on v2 is still there (users only move to v2).
    let (code, out, err) = run_ops(&c.ops(&url, &["shift", "s", "v1=50", "v2=50"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("sticky on x-user-id"), "{out}");
    c.proxy_split(&[("v1", 50.0), ("v2", 50.0)]).await;
    let at_50 = sticky_round(c.proxy.addr(), "s", 5).await;
    for u in &on_v2 {
        assert_eq!(at_50[*u], "v2", "user-{u} went back to v1 as v2 grew");
    }
    let now_v2 = at_50.iter().filter(|s| *s == "v2").count();
    assert!(now_v2 > on_v2.len(), "more users on v2 at 50%");
    assert_binomial(now_v2, 50.0);

    // --no-sticky turns it off; the policy shows it.
    let (code, out, err) =
        run_ops(&c.ops(&url, &["shift", "s", "v1=50", "v2=50", "--no-sticky"])).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(c.policy().await["sticky_header"].is_null());
    // --sticky-header sets it (here with new weights in the same change).
    let (code, out, err) = run_ops(&c.ops(
        &url,
        &[
            "shift",
            "s",
            "v1=70",
            "v2=30",
            "--sticky-header",
            "x-session",
        ],
    ))
    .await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("sticky on x-session"), "{out}");
    assert_eq!(c.policy().await["sticky_header"], "x-session");
    // A bad header name: refused by the API (400, nothing changed), and by
    // the CLI before any request (a usage error, exit 2).
    let reply = c
        .control
        .put_split(
            "s",
            &json!({ "weights": split(90, 10), "sticky_header": "x-almond-subset" }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("routing header"), "{}", reply.text());
    let (code, _, err) = run_ops(&c.ops(
        &url,
        &["shift", "s", "v1=90", "v2=10", "--sticky-header", "x user"],
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not an HTTP header name"), "{err}");
    assert_eq!(c.policy().await["split"], split(70, 30));
    assert_eq!(c.policy().await["sticky_header"], "x-session");
}

#[tokio::test]
async fn stickiness_from_a_static_config() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("s")
                .endpoint(v1.addr, "v1", 1)
                .endpoint(v2.addr, "v2", 1)
                .set("split", "{ v1: 90, v2: 10, sticky_header: x-user-id }"),
        )
        .start()
        .await;
    let sides = sticky_round(proxy.addr(), "s", 5).await;
    let on_v2 = sides.iter().filter(|s| *s == "v2").count();
    assert!(on_v2 > 0);
    assert_binomial(on_v2, 10.0);
    assert!(v2.last().headers.contains_key("x-user-id"));
    // A second round (new connections) lands everyone on the same side.
    let again = sticky_round(proxy.addr(), "s", 1).await;
    assert_eq!(sides, again);
}

/// Promoting off a subset that is gone (retired, or all of it unhealthy):
/// the dashboard and `almond promote` send 0 for every subset they knew,
/// and the gone one at 0 is no reason to refuse (it was a 400, so traffic
/// could not be moved off a dead subset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_off_a_gone_subset_is_taken() {
    let c = Canary::start("ALMOND_TEST_TOKEN_SPLIT_GONE").await;
    c.shift(split(50, 50)).await;
    // v1 leaves the registry.
    c.registry
        .service_lb("s", "round_robin", &[(c.v2.addr, "v2")]);
    eventually("v1 is gone from the control plane", || async {
        c.control
            .state
            .service("s")
            .is_some_and(|s| s.endpoints.iter().all(|e| e.subset == "v2"))
    })
    .await;
    let body = json!({ "weights": { "v1": 0, "v2": 100 }, "action": "promote" });
    let reply = c.control.put_split("s", &body, Some(TOKEN)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    c.proxy_split(&[("v2", 100.0)]).await;
    assert_eq!(c.v2_share(40).await, 40);
}
