//! End to end: `almond block`, `almond limit`, `almond unblock` through the
//! control plane (file registry) to a following proxy, under load: the
//! blocked route is denied from some moment on and for good, other routes
//! never notice, `unblock` gives it back; a limit holds its route to its
//! rate; bad requests are refused with the reason and change nothing;
//! `almond status` lists the guards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::time::Instant;

async fn mesh() -> (Backend, TestControl, TestProxy, Registry) {
    let backend = Backend::start("b").await;
    let registry = Registry::new();
    registry.service("web", &[(backend.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    (backend, control, proxy, registry)
}

async fn status_of(client: &mut H1, method: &str, path: &str) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web")
        .body(empty())
        .unwrap();
    client.request(req).await.status
}

/// What one client saw, in order: (when, path, status).
type Seen = Arc<Mutex<Vec<(Instant, &'static str, StatusCode)>>>;

/// Sends POST /api/giveaway and GET /other in turn until `stop`.
fn load(proxy: &TestProxy, seen: Seen) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = proxy.addr();
    tokio::spawn(async move {
        let mut client = H1::connect(addr).await;
        loop {
            for (method, path) in [("POST", "/api/giveaway"), ("GET", "/other")] {
                let status = status_of(&mut client, method, path).await;
                seen.lock().unwrap().push((Instant::now(), path, status));
            }
            if stopped.try_recv().is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    stop
}

#[tokio::test]
async fn block_then_unblock_under_load() {
    let (_backend, control, proxy, _registry) = mesh().await;
    let seen: Seen = Arc::default();
    let stop = load(&proxy, seen.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let url = control.url();
    let (code, out, err) = run_ops(&[
        "block",
        "web",
        "--path",
        "/api/giveaway",
        "--method",
        "post",
        "--status",
        "503",
        "--body",
        "closed",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("POST /api/giveaway* denied 503"), "{out}");
    let blocked_at = Instant::now();
    let giveaways = |seen: &Seen| -> Vec<StatusCode> {
        let seen = seen.lock().unwrap();
        let on = seen.iter().filter(|(_, p, _)| *p == "/api/giveaway");
        on.map(|(_, _, s)| *s).collect()
    };
    eventually("the block reached the proxy", || async {
        giveaways(&seen).contains(&StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;

    let (code, out, err) = run_ops(&[
        "unblock",
        "web",
        "--path",
        "/api/giveaway",
        "--method",
        "POST",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("0 guard(s) in force"), "{out}");
    let unblocked_at = Instant::now();
    eventually("the unblock reached the proxy", || async {
        let statuses = giveaways(&seen);
        let denied = statuses
            .iter()
            .position(|s| *s == StatusCode::SERVICE_UNAVAILABLE);
        denied.is_some_and(|at| statuses[at..].contains(&StatusCode::OK))
    })
    .await;
    // A little more traffic: served for good.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let seen = seen.lock().unwrap().clone();
    // Other routes: always answered by the service.
    assert!(seen
        .iter()
        .filter(|(_, path, _)| *path == "/other")
        .all(|(_, _, status)| *status == StatusCode::OK));
    let giveaway: Vec<_> = seen
        .iter()
        .filter(|(_, p, _)| *p == "/api/giveaway")
        .collect();
    // Before the block: served. After it: from the first denial on, every
    // request denied until the unblock; after that, served again for good.
    let first_denied = giveaway
        .iter()
        .position(|(_, _, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .expect("the block reached the proxy");
    assert!(giveaway[..first_denied]
        .iter()
        .all(|(_, _, s)| *s == StatusCode::OK));
    let (denied_at, _, _) = *giveaway[first_denied];
    let first_served_again = first_denied
        + giveaway[first_denied..]
            .iter()
            .position(|(_, _, s)| *s == StatusCode::OK)
            .expect("the unblock reached the proxy");
    assert!(giveaway[first_denied..first_served_again]
        .iter()
        .all(|(_, _, s)| *s == StatusCode::SERVICE_UNAVAILABLE));
    assert!(giveaway[first_served_again..]
        .iter()
        .all(|(_, _, s)| *s == StatusCode::OK));
    let (served_at, _, _) = *giveaway[first_served_again];
    assert!(served_at > unblocked_at - Duration::from_millis(200));
    eprintln!(
        "block reached the proxy {:?} after the command returned; unblock {:?}",
        denied_at.saturating_duration_since(blocked_at),
        served_at.saturating_duration_since(unblocked_at)
    );
    let metrics = proxy.admin_get("/metrics").await.text();
    let denied = [("service", "web"), ("reason", "denied")];
    assert!(metric(&metrics, "almond_guarded_requests_total", &denied) >= 1.0);
}

#[tokio::test]
async fn a_limit_holds_a_route_and_status_lists_it() {
    let (_backend, control, proxy, _registry) = mesh().await;
    let url = control.url();
    let (code, out, err) = run_ops(&[
        "limit",
        "web",
        "--path",
        "/search",
        "--rate",
        "1/min",
        "--burst",
        "3",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("any method /search* limited to 1/min"),
        "{out}"
    );
    let mut client = H1::connect(proxy.addr()).await;
    eventually("the limit reaches the proxy", || async {
        let mut client = H1::connect(proxy.addr()).await;
        status_of(&mut client, "GET", "/search").await == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert_eq!(
        status_of(&mut client, "GET", "/search/x").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status_of(&mut client, "GET", "/other").await,
        StatusCode::OK
    );
    let (code, out, _) = run_ops(&["status", "web", "--control", &url]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("guard: any method /search* limited to 1/min"),
        "{out}"
    );
}

/// Runs an operator command against `url`; it must succeed. Its output.
async fn ops_out(url: &str, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend(["--control", url]);
    let (code, out, err) = run_ops(&args).await;
    assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    out
}

/// A limit's buckets are its own: blocking and unblocking another route
/// (a new guard goes first in the list, moving the limit) does not hand
/// the limited route a fresh burst; changing the limit's own rate does.
#[tokio::test]
async fn other_guards_coming_and_going_leave_a_limit_spent() {
    let (_backend, control, proxy, _registry) = mesh().await;
    let url = control.url();
    let search = "/api/search";
    ops_out(&url, &["limit", "web", "--path", search, "--rate", "1/min"]).await;
    eventually("the limit reaches the proxy and is spent", || async {
        let mut client = H1::connect(proxy.addr()).await;
        status_of(&mut client, "GET", search).await == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    for (args, other) in [
        (["block", "web"], StatusCode::SERVICE_UNAVAILABLE),
        (["unblock", "web"], StatusCode::OK),
    ] {
        ops_out(&url, &[args[0], args[1], "--path", "/other"]).await;
        eventually("the change reaches the proxy", || async {
            let mut client = H1::connect(proxy.addr()).await;
            status_of(&mut client, "GET", "/other").await == other
        })
        .await;
        assert_eq!(
            status_of(&mut H1::connect(proxy.addr()).await, "GET", search).await,
            StatusCode::TOO_MANY_REQUESTS,
            "after {}: the spent limit on {search} was reset",
            args[0]
        );
    }
    // A new rate is a new limit: it starts with its burst.
    ops_out(&url, &["limit", "web", "--path", search, "--rate", "2/min"]).await;
    eventually("the new rate reaches the proxy", || async {
        let config = proxy.admin_get("/config").await.json();
        config["services"]["web"]["guards"][0]["limit"]["rate"] == "2/min"
    })
    .await;
    let mut client = H1::connect(proxy.addr()).await;
    assert_eq!(status_of(&mut client, "GET", search).await, StatusCode::OK);
    assert_eq!(
        status_of(&mut client, "GET", search).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// `/api/giveaway/`, `/api/%67iveaway` and `/api/giveaway` are one path to
/// a guard: a `limit` replaces a `block` spelled otherwise, and one
/// `unblock` gives the route back.
#[tokio::test]
async fn a_path_spelled_otherwise_is_the_same_guard() {
    let (_backend, control, proxy, _registry) = mesh().await;
    let url = control.url();
    let out = ops_out(&url, &["block", "web", "--path", "/api/giveaway/"]).await;
    assert!(out.contains("1 guard(s) in force"), "{out}");
    assert!(
        out.contains("any method /api/giveaway* denied 503"),
        "{out}"
    );
    eventually("the block reaches the proxy", || async {
        let mut client = H1::connect(proxy.addr()).await;
        status_of(&mut client, "POST", "/api/giveaway").await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let out = ops_out(
        &url,
        &["limit", "web", "--path", "/api/giveaway", "--rate", "1/min"],
    )
    .await;
    assert!(out.contains("1 guard(s) in force"), "{out}");
    assert!(
        out.contains("any method /api/giveaway* limited to 1/min"),
        "{out}"
    );
    let out = ops_out(&url, &["block", "web", "--path", "/api/%67iveaway"]).await;
    assert!(out.contains("1 guard(s) in force"), "{out}");
    let out = ops_out(&url, &["unblock", "web", "--path", "/api/giveaway"]).await;
    assert!(out.contains("0 guard(s) in force"), "{out}");
    eventually("the route is given back", || async {
        let mut client = H1::connect(proxy.addr()).await;
        status_of(&mut client, "POST", "/api/giveaway/x").await == StatusCode::OK
    })
    .await;
    assert_eq!(
        status_of(
            &mut H1::connect(proxy.addr()).await,
            "POST",
            "/api/giveaway"
        )
        .await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_guard_changes_are_refused_and_change_nothing() {
    let (_backend, control, _proxy, _registry) = mesh().await;
    let url = control.url();
    let before = control.service("web").await["policy"]["version"].clone();
    // Refused by the control plane (1), or by the CLI before it asks (2).
    for (args, why, exit) in [
        (
            vec!["block", "web", "--path", "api"],
            "not an absolute path",
            1,
        ),
        (
            vec!["block", "web", "--path", "/a", "--status", "200"],
            "not an error status",
            1,
        ),
        (
            vec!["limit", "web", "--path", "/a", "--rate", "5/day"],
            "5/day",
            2,
        ),
        (
            vec!["unblock", "web", "--path", "/never-blocked"],
            "no guard matches",
            1,
        ),
        (vec!["block", "nosuch", "--path", "/a"], "nosuch", 1),
    ] {
        let mut args = args.clone();
        args.extend(["--control", &url]);
        let (code, out, err) = run_ops(&args).await;
        assert_eq!(code, Some(exit), "{args:?}: {out}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(control.service("web").await["policy"]["version"], before);
}

/// A change that leaves the service as proxies would refuse it (here a
/// guard past the 1,000 a service may have, on a service whose registry
/// entry has 1,000) is refused with the reason, and nothing changes:
/// proxies would have kept their last copy of the service, this change
/// and every later one unseen, while the command said it was applied.
#[tokio::test]
async fn a_change_proxies_would_refuse_is_refused() {
    let backend = Backend::start("b").await;
    let registry = Registry::new();
    let mut file = service_file("web", &[(backend.addr, "v1")]);
    file.push_str("  guards:\n");
    for i in 0..1000 {
        file.push_str(&format!(
            "    - {{ match: {{ path_prefix: /p{i} }}, deny: {{}} }}\n"
        ));
    }
    registry.write("web.yaml", &file);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let proxy = start_following(&control.url(), None).await;
    let addr = proxy.addr();
    let status = |path: &'static str| async move {
        status_of(&mut H1::connect(addr).await, "GET", path).await
    };
    eventually("the proxy has web's guards", || async {
        status("/p999").await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let before = control.service("web").await["policy"]["version"].clone();
    let url = control.url();
    let (code, out, err) =
        run_ops(&["block", "web", "--path", "/one-more", "--control", &url]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("at most 1000 guards"), "{err}");
    assert_eq!(control.service("web").await["policy"]["version"], before);
    // The service is still served, and can still be changed.
    assert_eq!(status("/one-more").await, StatusCode::OK);
    let (code, out, err) = run_ops(&["unblock", "web", "--path", "/p0", "--control", &url]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    eventually("/p0 is unblocked", || async {
        status("/p0").await == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn guard_changes_are_events() {
    let (_backend, control, _proxy, _registry) = mesh().await;
    let url = control.url();
    let who = std::env::var("USER").unwrap_or_else(|_| "anonymous".into());
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "{out}{err}");
    };
    ok(run_ops(&[
        "block",
        "web",
        "--path",
        "/api/giveaway",
        "--method",
        "POST",
        "--control",
        &url,
    ])
    .await);
    ok(run_ops(&[
        "limit",
        "web",
        "--path",
        "/search",
        "--rate",
        "10/s",
        "--burst",
        "20",
        "--control",
        &url,
    ])
    .await);
    ok(run_ops(&[
        "unblock",
        "web",
        "--path",
        "/api/giveaway",
        "--method",
        "POST",
        "--control",
        &url,
    ])
    .await);

    let events = control.get("/v1/services/web/events").await.json();
    let all = events["events"].as_array().unwrap();
    let got: Vec<(&str, &str)> = all
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["detail"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("blocked", "POST /api/giveaway* denied 503"),
            ("limited", "any method /search* limited to 10/s, burst 20"),
            ("unblocked", "POST /api/giveaway*"),
        ],
        "{events:#}"
    );
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{e}");
        assert_eq!(e["by"], who.as_str(), "{e}");
        // Rollout fields are left out, not null or empty.
        assert!(
            e.get("canary").is_none() && e.get("percent").is_none(),
            "{e}"
        );
    }
    let since = control.get("/v1/services/web/events?since=2").await.json();
    assert_eq!(since["events"][0]["kind"], "unblocked", "{since:#}");

    let (code, out, err) = run_ops(&["events", "web", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("#1 blocked: POST /api/giveaway* denied 503 (by {who})"),
            format!("#2 limited: any method /search* limited to 10/s, burst 20 (by {who})"),
            format!("#3 unblocked: POST /api/giveaway* (by {who})"),
        ],
        "{out}"
    );
}

/// A proxy following `control` as `id`.
async fn follower(control: &str, id: &str) -> TestProxy {
    let yaml = control_proxy_yaml(control, None)
        .replace("proxy_id: test-proxy", &format!("proxy_id: {id}"));
    start_following_with(&yaml).await
}

/// Sends `n` GETs of `path` back to back; (200s, 429s).
async fn burst_of(proxy: &TestProxy, path: &str, n: usize) -> (usize, usize) {
    let mut client = H1::connect(proxy.addr()).await;
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        match status_of(&mut client, "GET", path).await {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("{path}: {other}"),
        }
    }
    (ok, limited)
}

#[tokio::test]
async fn a_fleet_limit_is_shared_out_among_the_proxies() {
    let backend = Backend::start("b").await;
    let registry = Registry::new();
    registry.service("web", &[(backend.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let url = control.url();
    let proxies = [follower(&url, "p1").await, follower(&url, "p2").await];

    let (code, out, err) = run_ops(&[
        "limit",
        "web",
        "--path",
        "/x",
        "--rate",
        "20/min",
        "--burst",
        "10",
        "--fleet",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("any method /x* limited to 20/min fleet-wide"),
        "{out}"
    );
    // Each proxy gets half: 10/min, burst 5 (watched on /config, which
    // spends no tokens). Per minute: a token comes back every 6 s, so
    // the bursts below do not hang on how fast the machine sends them.
    for proxy in &proxies {
        eventually("the share reaches the proxy", || async {
            let config = proxy.admin_get("/config").await.json();
            let limit = &config["services"]["web"]["guards"][0]["limit"];
            limit["shared_by"] == 2 && limit["rate"] == "10/min" && limit["burst"] == 5
        })
        .await;
    }
    let mut total = 0;
    for proxy in &proxies {
        let (ok, limited) = burst_of(proxy, "/x", 20).await;
        eprintln!("a burst of 20 on one proxy: {ok} served, {limited} limited");
        // The burst (5), plus a token refilled if the 20 requests took
        // over 6 s.
        assert!((5..=6).contains(&ok), "{ok} served, {limited} limited");
        total += ok;
        // Other paths are not limited.
        assert_eq!(burst_of(proxy, "/other", 20).await, (20, 0));
    }
    // Fleet-wide, about the burst of 10 went through (per-proxy limits
    // would have let 20 through).
    assert!(total <= 12, "{total}");

    let (code, out, _) = run_ops(&["status", "web", "--control", &url]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains(
            "guard: any method /x* limited to 10/min per proxy, burst 5 (fleet-wide, shared by 2 proxies)"
        ),
        "{out}"
    );
    let (code, out, _) = run_ops(&["events", "web", "--control", &url]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("limited: any method /x* limited to 20/min, burst 10, fleet-wide"),
        "{out}"
    );
}

#[tokio::test]
async fn shared_by_is_the_control_planes_to_set() {
    let (_backend, control, _proxy, _registry) = mesh().await;
    let before = control.service("web").await["policy"]["version"].clone();
    let body = serde_json::json!({
        "match": { "path_prefix": "/x" },
        "limit": { "rate": "20/s", "scope": "fleet", "shared_by": 2 }
    });
    let resp = control
        .send(http::Method::PUT, "/v1/services/web/guards", &body, None)
        .await;
    assert!(resp.status.is_client_error(), "{}", resp.text());
    assert!(resp.text().contains("shared_by"), "{}", resp.text());
    let body = serde_json::json!({
        "match": { "path_prefix": "/x" },
        "limit": { "rate": "20/s", "scope": "everywhere" }
    });
    let resp = control
        .send(http::Method::PUT, "/v1/services/web/guards", &body, None)
        .await;
    assert!(resp.status.is_client_error(), "{}", resp.text());
    assert!(resp.text().contains("fleet"), "{}", resp.text());
    assert_eq!(control.service("web").await["policy"]["version"], before);
}

/// One registry entry this proxy cannot take (`tls` on a proxy with no
/// identity) stays out, and every other change still reaches the proxy:
/// a block set afterwards is applied. (The whole snapshot was refused,
/// every 10 s, for good.)
#[tokio::test]
async fn a_service_the_proxy_cannot_take_does_not_stop_the_others() {
    let (_backend, control, proxy, registry) = mesh().await;
    let other = Backend::start("other").await;
    registry.write(
        "other.yaml",
        &format!(
            "other:\n  tls: true\n  endpoints:\n    - {{ addr: \"{}\", subset: v1 }}\n",
            other.addr
        ),
    );
    eventually("the control plane serves other", || async {
        control.state.has_service("other")
    })
    .await;
    let (code, out, err) = run_ops(&[
        "block",
        "web",
        "--path",
        "/kill",
        "--status",
        "503",
        "--control",
        &control.url(),
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let addr = proxy.addr();
    eventually("the block is applied", || async move {
        let mut client = H1::connect(addr).await;
        status_of(&mut client, "GET", "/kill").await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let mut client = H1::connect(addr).await;
    assert_eq!(
        status_of(&mut client, "GET", "/other").await,
        StatusCode::OK
    );
    // The proxy is at the control plane's index: nothing is held back.
    let text = proxy.admin_get("/metrics").await.text();
    let index = metric(&text, "almond_config_index", &[]);
    assert_eq!(index, control.state.index() as f64);
    // The refusal shows in the metrics, not only in the log.
    let refused = metric(
        &text,
        "almond_config_refused_total",
        &[("reason", "service")],
    );
    assert!(refused >= 1.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "almond_config_refused_total",
            &[("reason", "snapshot")]
        ),
        0.0
    );
}
