//! End to end: who may talk to the control plane, and what it reads. A
//! configured token that is missing fails the start; changes need the
//! operator token and snapshot reads a credential once one is configured
//! (refusals counted); the watcher scrapes only proxies that authenticated,
//! at the address their connection came from; bodies read from Consul and
//! from the control plane are bounded. Real sockets, real binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use almond_consul_double::{Access, AclPolicy, ConsulDouble, ServiceDef};
use http::{Method, Request, StatusCode};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

const OPERATOR: &str = "operator-s3cret";
const PROXIES: &str = "proxy-s3cret";

/// A control config on `registry` with both tokens, from variables named
/// after `tag` (set here, so tests in this binary do not share them).
fn secured_yaml(registry: &Registry, tag: &str) -> String {
    let (op, px) = (format!("ALMOND_T_OP_{tag}"), format!("ALMOND_T_PX_{tag}"));
    std::env::set_var(&op, OPERATOR);
    std::env::set_var(&px, PROXIES);
    format!(
        "{}proxy_token_env: {px}\n",
        registry.control_yaml(Some(&op))
    )
}

/// `GET path` on `addr` with an optional bearer token.
async fn get_with(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let mut req = Request::builder()
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    H1::connect(addr)
        .await
        .request(req.body(empty()).unwrap())
        .await
}

#[tokio::test]
async fn a_configured_token_that_is_missing_or_empty_stops_the_start() {
    let registry = Registry::new();
    for (var, value) in [
        ("ALMOND_T_UNSET_TOKEN", None),
        ("ALMOND_T_EMPTY_TOKEN", Some("")),
    ] {
        let yaml = registry.control_yaml(Some(var));
        let config = write_temp(".yaml", &yaml);
        let mut cmd = almond();
        cmd.arg("control").arg("--config").arg(config.path());
        match value {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
        let out = within("almond control to exit", cmd.kill_on_drop(true).output())
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(var) && err.contains("token_env"), "{err}");
    }
    // The proxy side: `token_env` and `admin_token_env` the same way.
    for key in ["token_env", "admin_token_env"] {
        let yaml = format!(
            "admin: 127.0.0.1:0\ncontrol: http://127.0.0.1:9\n{key}: ALMOND_T_UNSET_PROXY_TOKEN\nlisteners:\n  - bind: 127.0.0.1:0\n"
        );
        let config = write_temp(".yaml", &yaml);
        let out = within(
            "almond proxy to exit",
            almond()
                .arg("proxy")
                .arg("--config")
                .arg(config.path())
                .env_remove("ALMOND_T_UNSET_PROXY_TOKEN")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}: {err}");
        assert!(err.contains("ALMOND_T_UNSET_PROXY_TOKEN"), "{err}");
    }
}

#[tokio::test]
async fn changes_and_snapshots_need_their_credentials_and_refusals_are_counted() {
    let registry = Registry::new();
    let backend = Backend::start("v1").await;
    registry.service("s", &[(backend.addr, "v1")]);
    let control = TestControl::start(&secured_yaml(&registry, "A")).await;
    let split = json!({ "weights": { "v1": 100 } });

    // Changes: none, the proxies' token, a near miss: refused; nothing changed.
    assert_eq!(
        control.put_split("s", &split, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    for wrong in [PROXIES, "operator-s3cre", "operator-s3cretX"] {
        let reply = control.put_split("s", &split, Some(wrong)).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{wrong}: {}",
            reply.text()
        );
    }
    assert!(
        !registry.policy_file.exists(),
        "no refused change was written"
    );
    let reply = control.put_split("s", &split, Some(OPERATOR)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Snapshots: no token or a wrong one is refused; the proxies' token
    // and the operator's both read.
    let path = "/v1/snapshot?proxy=p1&admin=4191&wait=0s";
    assert_eq!(
        get_with(control.addr, path, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get_with(control.addr, path, Some("nope")).await.status,
        StatusCode::UNAUTHORIZED
    );
    for token in [PROXIES, OPERATOR] {
        let reply = get_with(control.addr, path, Some(token)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(reply.json()["services"]["s"].is_object());
    }

    let metrics = control.get("/metrics").await.text();
    let refused = |request| {
        metric(
            &metrics,
            "almond_control_refused_total",
            &[("request", request)],
        )
    };
    assert_eq!(refused("change"), 4.0);
    assert_eq!(refused("snapshot"), 2.0);
}

/// `METHOD path` on `control` with `headers` (a `Host` of the control
/// plane's address unless given) and `body`.
async fn send_with(
    control: &TestControl,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", control.addr.to_string());
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(full(body.to_owned())).unwrap();
    H1::connect(control.addr).await.request(req).await
}

/// With no operator token (as `almond demo` runs), a page in a browser is
/// the attacker: a form post from another site, a fetch with its Origin,
/// or a page whose name was rebound to 127.0.0.1. None changes anything;
/// the CLI and the dashboard's own page still do.
#[tokio::test]
async fn without_a_token_browsers_cannot_change_traffic() {
    let (v1, v2) = (closed_port().await, closed_port().await);
    let registry = Registry::new();
    registry.service("web", &[(v1, "v1"), (v2, "v2")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let url = control.url();
    // Two splits, so a rollback has something to go back to.
    for pairs in [["v1=50", "v2=50"], ["v1=100", "v2=0"]] {
        let args = ["shift", "web", pairs[0], pairs[1], "--control", &url];
        let (code, out, err) = run_ops(&args).await;
        assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    }
    let version = || async { control.service("web").await["policy"]["version"].clone() };
    let before = version().await;
    let split = r#"{"weights": {"v1": 0, "v2": 100}}"#;
    let json_type = ("content-type", "application/json");
    let (rollback, split_path) = ("/v1/services/web/rollback", "/v1/services/web/split");

    // A form posted from another site: no preflight, so refused by type.
    let form = ("content-type", "application/x-www-form-urlencoded");
    let reply = send_with(&control, Method::POST, rollback, &[form], "").await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    let plain = ("content-type", "text/plain");
    let reply = send_with(&control, Method::PUT, split_path, &[plain], split).await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    let reply = send_with(&control, Method::POST, rollback, &[], "").await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );

    // DNS rebinding: the right address, another site's name.
    let evil = ("host", "evil.example:4180");
    let reply = send_with(&control, Method::PUT, split_path, &[evil, json_type], split).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = send_with(&control, Method::GET, "/v1/services/web", &[evil], "").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // Health checks and scrapes stay open.
    let reply = send_with(&control, Method::GET, "/ready", &[evil], "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Another site's page, by its Origin.
    let origin = ("origin", "http://evil.example");
    let reply = send_with(&control, Method::POST, rollback, &[origin, json_type], "{}").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        version().await,
        before,
        "a refused request changed the policy"
    );

    // The dashboard's own page: its Origin is the control plane's.
    let own = format!("http://{}", control.addr);
    let headers = [("origin", own.as_str()), json_type];
    let reply = send_with(&control, Method::PUT, split_path, &headers, split).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // And the CLI, a body-less POST included.
    let (code, out, err) = run_ops(&["rollback", "web", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let (code, out, err) = run_ops(&["status", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
}

/// The SSRF of the issue: with a token configured and a rollout running,
/// an unauthenticated reader that names an admin address is refused and
/// never scraped; an authenticated proxy that names another host is
/// scraped at the address its connection came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_scrapes_only_authenticated_proxies_at_their_own_address() {
    let registry = Registry::new();
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    registry.service("s", &[(v1.addr, "v1"), (v2.addr, "v2")]);
    let control = TestControl::start(&secured_yaml(&registry, "B")).await;

    // The target the attacker names: counts every connection.
    let bait = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bait_addr = bait.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = bait.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });

    let split = json!({ "weights": { "v1": 100, "v2": 0 } });
    assert_eq!(
        control.put_split("s", &split, Some(OPERATOR)).await.status,
        StatusCode::OK
    );
    let spec = json!({
        "canary": "v2", "stable": "v1", "steps": [10, 100], "interval_seconds": 0.3,
        "thresholds": { "min_requests": 1000000, "max_error_rate": 0.05 },
    });
    let reply = control
        .send(
            Method::POST,
            "/v1/services/s/rollouts",
            &spec,
            Some(OPERATOR),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let evil = format!("/v1/snapshot?proxy=evil&admin={bait_addr}&wait=0s");
    assert_eq!(
        get_with(control.addr, &evil, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // An authenticated proxy naming a far host: recorded at its own (the
    // connection's) host, with the port it named.
    let named = format!(
        "/v1/snapshot?proxy=good&admin=203.0.113.9:{}&wait=0s",
        bait_addr.port()
    );
    assert_eq!(
        get_with(control.addr, &named, Some(PROXIES)).await.status,
        StatusCode::OK
    );
    let proxies = control.get("/v1/proxies").await.json();
    assert!(proxies.get("evil").is_none(), "{proxies:#}");
    assert_eq!(
        proxies["good"]["admin"],
        json!(bait_addr.to_string()),
        "{proxies:#}"
    );

    // The watcher ticks (0.3 s interval) for a while: it scrapes "good"
    // at 127.0.0.1 (the bait, here), and nothing for "evil". Seen at most
    // as many connections as from "good" alone: compare with a second run
    // where only the refused reader asked.
    eventually("the watcher scrapes the authenticated proxy", || async {
        hits.load(Ordering::SeqCst) > 0
    })
    .await;

    // Second control plane: only the unauthenticated reader; nothing at all.
    let registry2 = Registry::new();
    registry2.service("s", &[(v1.addr, "v1"), (v2.addr, "v2")]);
    let control2 = TestControl::start(&secured_yaml(&registry2, "C")).await;
    assert_eq!(
        control2.put_split("s", &split, Some(OPERATOR)).await.status,
        StatusCode::OK
    );
    let reply = control2
        .send(
            Method::POST,
            "/v1/services/s/rollouts",
            &spec,
            Some(OPERATOR),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let bait2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bait2_addr = bait2.local_addr().unwrap();
    let evil = format!("/v1/snapshot?proxy=evil&admin={bait2_addr}&wait=0s");
    for _ in 0..3 {
        assert_eq!(
            get_with(control2.addr, &evil, None).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let accepted = tokio::time::timeout(Duration::from_secs(2), bait2.accept()).await;
    assert!(
        accepted.is_err(),
        "the watcher connected to the address an unauthenticated reader named"
    );
    assert!(control2
        .get("/v1/proxies")
        .await
        .json()
        .get("evil")
        .is_none());
}

#[tokio::test]
async fn a_proxy_with_its_token_follows_a_secured_control_plane_and_one_without_does_not() {
    let registry = Registry::new();
    let backend = Backend::start("v1").await;
    registry.service("s", &[(backend.addr, "v1")]);
    let control = TestControl::start(&secured_yaml(&registry, "D")).await;

    std::env::set_var("ALMOND_T_PROXY_TOKEN_D", PROXIES);
    let yaml = format!(
        "{}token_env: ALMOND_T_PROXY_TOKEN_D\n",
        control_proxy_yaml(&control.url(), None)
    );
    let proxy = TestProxy::start(&yaml).await;
    eventually("the proxy with the token is ready", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
    let mut client = H1::connect(proxy.addr()).await;
    assert_eq!(client.get("s", "/").await.status, StatusCode::OK);

    let without = TestProxy::start(&control_proxy_yaml(&control.url(), None)).await;
    assert!(
        !becomes_ready(&without).await,
        "a proxy without the token got no snapshot"
    );
    assert_eq!(
        proxy_metric(&without, "almond_control_connected", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn oversized_answers_are_refused_not_read_whole() {
    // A snapshot bigger than the proxy's `control_max_bytes`: not applied.
    let registry = Registry::new();
    let backend = Backend::start("v1").await;
    registry.service("s", &[(backend.addr, "v1")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let yaml = format!(
        "{}control_max_bytes: 64\n",
        control_proxy_yaml(&control.url(), None)
    );
    let small = TestProxy::start(&yaml).await;
    assert!(!becomes_ready(&small).await, "a snapshot over the limit");

    // A Consul answer bigger than the control plane's `max_body_bytes`:
    // a failed query (counted), never a sync.
    let consul = ConsulDouble::start().await;
    for i in 0..3 {
        let def = ServiceDef::new("web")
            .id(&format!("web-{i}"))
            .address("127.0.0.1")
            .port(backend.addr.port())
            .meta("version", "v1");
        consul.register(def).unwrap();
    }
    let yaml = format!(
        "{}max_body_bytes: 64\n",
        consul_control_yaml(&consul.url(), "1s", "ALMOND_T_NO_CONSUL_TOKEN")
    );
    let control = TestControl::launch_unready(&yaml).await;
    eventually("the oversized Consul answers are counted", || async {
        let metrics = control.get("/metrics").await.text();
        metric(&metrics, "almond_control_consul_errors_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// PEM files of one identity (and its CA) in a scratch directory.
struct Files {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn files(
    registry: &Registry,
    tag: &str,
    ca: &support::pki::Ca,
    leaf: &support::pki::Leaf,
) -> Files {
    let at = |name: &str, text: &str| {
        let path = registry.scratch(&format!("{tag}-{name}.pem"));
        std::fs::write(&path, text).unwrap();
        path
    };
    Files {
        cert: at("cert", &leaf.cert),
        key: at("key", &leaf.key),
        ca: at("ca", &ca.pem),
    }
}

/// A control plane serving TLS on `localhost`, with a proxy token.
async fn tls_control(
    registry: &Registry,
    ca: &support::pki::Ca,
    tag: &str,
    expired: bool,
) -> TestControl {
    let backend = Backend::start("v1").await;
    registry.service("s", &[(backend.addr, "v1")]);
    let server = files(
        registry,
        &format!("{tag}-server"),
        ca,
        &ca.leaf_with("localhost", expired),
    );
    let yaml = format!(
        "{}tls: {{ cert: \"{}\", key: \"{}\", ca: \"{}\" }}\n",
        secured_yaml(registry, tag),
        server.cert.display(),
        server.key.display(),
        server.ca.display()
    );
    std::mem::forget(backend);
    TestControl::launch_unready(&yaml).await
}

/// A proxy following `https://localhost:PORT` of `control`, with `extra`
/// config lines.
async fn https_follower(control: &TestControl, extra: &str) -> TestProxy {
    let url = format!("https://localhost:{}", control.addr.port());
    TestProxy::start(&format!("{}{extra}", control_proxy_yaml(&url, None))).await
}

/// Whether `proxy` follows the control plane: true once it is ready;
/// false once a snapshot read has failed (`almond_control_failures_total`)
/// with the proxy still unready, so a refusal is told from a slow start.
async fn becomes_ready(proxy: &TestProxy) -> bool {
    let answer = std::cell::Cell::new(None);
    eventually("the proxy ready, or a snapshot read failed", || async {
        if proxy.admin_get("/ready").await.status == StatusCode::OK {
            answer.set(Some(true));
        } else if proxy_metric(proxy, "almond_control_failures_total", &[]).await >= 1.0 {
            answer.set(Some(
                proxy.admin_get("/ready").await.status == StatusCode::OK,
            ));
        }
        answer.get().is_some()
    })
    .await;
    answer.get() == Some(true)
}

/// TLS on the control listener: a proxy that trusts its CA follows it
/// (with its token, or with a client certificate of that CA instead);
/// a wrong CA, an expired server certificate, or no credential: no
/// snapshot.
#[tokio::test]
async fn proxies_follow_a_tls_control_plane_and_refuse_a_wrong_one() {
    let registry = Registry::new();
    let ca = support::pki::Ca::new("almond test ca");
    let control = tls_control(&registry, &ca, "E", false).await;
    let ca_file = registry.scratch("E-trust.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();

    // Trusted CA and the proxy token.
    std::env::set_var("ALMOND_T_PROXY_TOKEN_E", PROXIES);
    let with_token = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntoken_env: ALMOND_T_PROXY_TOKEN_E\n",
            ca_file.display()
        ),
    )
    .await;
    assert!(
        becomes_ready(&with_token).await,
        "followed over https with the token"
    );

    // Trusted CA, no token, but a client certificate of the CA (the
    // proxy's `tls` identity): authenticated by it.
    let client = files(&registry, "E-client", &ca, &ca.leaf("web"));
    let with_cert = https_follower(
        &control,
        &format!(
            "tls: {{ cert: \"{}\", key: \"{}\", ca: \"{}\" }}\n",
            client.cert.display(),
            client.key.display(),
            client.ca.display()
        ),
    )
    .await;
    assert!(
        becomes_ready(&with_cert).await,
        "authenticated by its client certificate"
    );

    // Trusted CA, no credential at all: refused.
    let bare = https_follower(
        &control,
        &format!("control_ca: \"{}\"\n", ca_file.display()),
    )
    .await;
    assert!(!becomes_ready(&bare).await, "no credential, no snapshot");

    // A CA that did not sign the control plane's certificate.
    let other = support::pki::Ca::new("someone else");
    let wrong_ca = registry.scratch("E-wrong.pem");
    std::fs::write(&wrong_ca, &other.pem).unwrap();
    let wrong = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntoken_env: ALMOND_T_PROXY_TOKEN_E\n",
            wrong_ca.display()
        ),
    )
    .await;
    assert!(
        !becomes_ready(&wrong).await,
        "a control plane of another CA is not followed"
    );

    // A client certificate of another CA: the handshake fails.
    let stranger = files(&registry, "E-stranger", &other, &other.leaf("web"));
    let foreign = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntls: {{ cert: \"{}\", key: \"{}\", ca: \"{}\" }}\n",
            ca_file.display(),
            stranger.cert.display(),
            stranger.key.display(),
            stranger.ca.display()
        ),
    )
    .await;
    assert!(
        !becomes_ready(&foreign).await,
        "a client certificate of another CA is refused"
    );

    // The operator CLI over https: with the CA it reads and changes; without
    // it (the system's roots do not know this CA) it fails, exit 1.
    let url = format!("https://localhost:{}", control.addr.port());
    let ca_arg = ca_file.display().to_string();
    let (code, out, err) =
        run_ops(&["status", "s", "--control", &url, "--control-ca", &ca_arg]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = run_ops(&[
        "shift",
        "s",
        "v1=100",
        "--control",
        &url,
        "--control-ca",
        &ca_arg,
        "--token",
        OPERATOR,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run_ops(&["status", "s", "--control", &url]).await;
    assert_eq!(code, Some(1), "{err}");

    // An expired server certificate.
    let registry2 = Registry::new();
    let expired = tls_control(&registry2, &ca, "F", true).await;
    std::env::set_var("ALMOND_T_PROXY_TOKEN_F", PROXIES);
    let late = https_follower(
        &expired,
        &format!(
            "control_ca: \"{}\"\ntoken_env: ALMOND_T_PROXY_TOKEN_F\n",
            ca_file.display()
        ),
    )
    .await;
    assert!(
        !becomes_ready(&late).await,
        "an expired control plane certificate is refused"
    );
}

/// The proxy presents its identity as rotated, towards the control plane
/// too: one that starts with a certificate the control plane refuses (of
/// another CA) follows it once its files hold one of the control plane's
/// CA, without a restart (it kept the certificate it started with: an
/// expired one, after a routine rotation, cut it off for good).
#[tokio::test]
async fn a_rotated_certificate_is_presented_to_the_control_plane() {
    let registry = Registry::new();
    let ca = support::pki::Ca::new("almond test ca");
    let control = tls_control(&registry, &ca, "R", false).await;
    let ca_file = registry.scratch("R-trust.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let other = support::pki::Ca::new("someone else");
    let mine = files(&registry, "R-client", &ca, &other.leaf("web"));
    let proxy = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntls: {{ cert: \"{}\", key: \"{}\", ca: \"{}\" }}\n",
            ca_file.display(),
            mine.cert.display(),
            mine.key.display(),
            mine.ca.display()
        ),
    )
    .await;
    assert!(!becomes_ready(&proxy).await, "a certificate of another CA");

    // Rotated: a certificate of the control plane's CA.
    let renewed = ca.leaf("web");
    std::fs::write(&mine.key, &renewed.key).unwrap();
    std::fs::write(&mine.cert, &renewed.cert).unwrap();
    eventually("the proxy follows with its new certificate", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
}

/// `control_ca` is read again when it changes: a proxy whose file holds
/// another CA than the control plane's follows it once the file is
/// rotated to the right one, without a restart.
#[tokio::test]
async fn a_rotated_control_ca_is_trusted_without_a_restart() {
    let registry = Registry::new();
    let ca = support::pki::Ca::new("almond test ca");
    let control = tls_control(&registry, &ca, "C", false).await;
    let ca_file = registry.scratch("C-trust.pem");
    let other = support::pki::Ca::new("someone else");
    std::fs::write(&ca_file, &other.pem).unwrap();
    std::env::set_var("ALMOND_T_PROXY_TOKEN_C", PROXIES);
    let proxy = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntoken_env: ALMOND_T_PROXY_TOKEN_C\n",
            ca_file.display()
        ),
    )
    .await;
    assert!(
        !becomes_ready(&proxy).await,
        "the control plane's CA is not trusted yet"
    );

    // Rotated: the file now holds the control plane's CA.
    std::fs::write(&ca_file, &ca.pem).unwrap();
    eventually("the proxy follows with the new CA", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
}

/// The control plane's own certificate is read again when its files
/// change: one that expired is replaced under the running control plane,
/// and proxies follow it again without a restart of either.
#[tokio::test]
async fn a_renewed_control_certificate_is_served_without_a_restart() {
    let registry = Registry::new();
    let ca = support::pki::Ca::new("almond test ca");
    let control = tls_control(&registry, &ca, "R", true).await;
    let ca_file = registry.scratch("R-trust.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    std::env::set_var("ALMOND_T_PROXY_TOKEN_R", PROXIES);
    let proxy = https_follower(
        &control,
        &format!(
            "control_ca: \"{}\"\ntoken_env: ALMOND_T_PROXY_TOKEN_R\n",
            ca_file.display()
        ),
    )
    .await;
    assert!(
        !becomes_ready(&proxy).await,
        "followed a control plane whose certificate expired"
    );

    // Renewed in place: the key first, then the certificate, as a tool
    // writing them one at a time would (the key alone does not match).
    let renewed = ca.leaf("localhost");
    std::fs::write(registry.scratch("R-server-key.pem"), &renewed.key).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(registry.scratch("R-server-cert.pem"), &renewed.cert).unwrap();
    eventually("the proxy follows the renewed certificate", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
}

/// `source.consul.intentions`: Consul intentions are the allow-lists
/// proxies get (as SPIFFE IDs of the trust domain), followed as they
/// change; `almond authz` is refused then (Consul is the source). With
/// ACLs on (default policy deny), no intention admits nobody. An
/// intention for a cluster peer's source admits none of this cluster's
/// callers (a peer's `web` is not our `web`, a peer's `*` not everyone).
#[tokio::test]
async fn consul_intentions_become_the_services_allow_lists() {
    const ENV: &str = "ALMOND_T_CONSUL_TOKEN_INTENTIONS_LIST";
    const TOKEN: &str = "5d1c7a2e-intentions-management";
    std::env::set_var(ENV, TOKEN);
    let backend = Backend::start("v1").await;
    let consul = ConsulDouble::builder().acl_token(Some(TOKEN)).start().await;
    let def = ServiceDef::new("orders")
        .id("orders-1")
        .address("127.0.0.1")
        .port(backend.addr.port())
        .meta("version", "v1");
    consul.register(def).unwrap();
    consul.set_intention("web", "orders", "allow");
    consul.set_intention("ads", "orders", "deny");
    consul.set_peer_intention("dc2", "api", "orders", "allow");
    consul.set_peer_intention("dc2", "*", "orders", "allow");
    let yaml = consul_control_yaml(&consul.url(), "1s", ENV).replace(
        &format!("token_env: {ENV} }}"),
        &format!("token_env: {ENV}, intentions: {{ trust_domain: almond.test }} }}"),
    );
    let control = TestControl::start(&yaml).await;
    let authz = || async {
        let snapshot = control.get("/v1/snapshot?wait=0s").await.json();
        snapshot["services"]["orders"]["authz"].clone()
    };
    let web = "spiffe://almond.test/service/web";
    eventually("the intentions are the allow-list", || async {
        authz().await == json!({ "allow": [web] })
    })
    .await;

    // A change in Consul reaches the snapshot.
    consul.set_intention("billing", "orders", "allow");
    eventually("billing is added", || async {
        authz().await == json!({ "allow": [web, "spiffe://almond.test/service/billing"] })
    })
    .await;
    // A peer's deny of `web` does not shadow the local `web`'s allow
    // (the list read after it names the `api` allowed with it).
    consul.set_peer_intention("dc2", "web", "orders", "deny");
    consul.set_intention("api", "orders", "allow");
    let api = "spiffe://almond.test/service/api";
    eventually("api is added, web kept", || async {
        authz().await == json!({ "allow": [web, "spiffe://almond.test/service/billing", api] })
    })
    .await;
    consul.delete_intention("api", "orders");
    // `*` allow with no deny: every verified client, so no list.
    consul.delete_intention("ads", "orders");
    consul.set_intention("*", "orders", "allow");
    eventually("a wildcard allow lifts the list", || async {
        authz().await.is_null()
    })
    .await;

    // Every local intention deleted (the last one revoked; the peer's
    // stay): nobody, not the whole mesh.
    consul.delete_intention("*", "orders");
    consul.delete_intention("web", "orders");
    consul.delete_intention("billing", "orders");
    eventually("no intention admits nobody", || async {
        authz().await == json!({ "allow": [] })
    })
    .await;

    // The CLI path is refused: Consul is the source.
    let reply = control
        .send(
            Method::PUT,
            "/v1/services/orders/authz",
            &json!({ "action": "allow", "identity": web }),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert!(reply.text().contains("intentions"), "{}", reply.text());
}

/// `intentions.default: allow` (a Consul that admits sources no
/// intention names): a service with no intention, or allows only, is open
/// to every verified client (no list; Consul's match answer is `null`);
/// a deny among them cannot be said as an allow-list, so only the
/// explicit allows are admitted (fail closed). Without it, a Consul whose
/// ACLs are off (it sends `X-Consul-Default-ACL-Policy: allow`) still
/// gets nobody: its `default_intention_policy` may deny, and the header
/// does not say it.
#[tokio::test]
async fn intentions_default_allow_is_said_in_the_config() {
    let backend = Backend::start("v1").await;
    let consul = ConsulDouble::start().await;
    let def = ServiceDef::new("orders")
        .id("orders-1")
        .address("127.0.0.1")
        .port(backend.addr.port())
        .meta("version", "v1");
    consul.register(def).unwrap();
    let yaml = |default: &str| {
        consul_control_yaml(&consul.url(), "1s", "ALMOND_T_NO_CONSUL_TOKEN_I").replace(
            "token_env: ALMOND_T_NO_CONSUL_TOKEN_I }",
            &format!(
                "token_env: ALMOND_T_NO_CONSUL_TOKEN_I, intentions: {{ trust_domain: almond.test{default} }} }}"
            ),
        )
    };
    async fn authz(control: &TestControl) -> serde_json::Value {
        let snapshot = control.get("/v1/snapshot?wait=0s").await.json();
        snapshot["services"]["orders"]["authz"].clone()
    }
    let closed = TestControl::start(&yaml("")).await;
    assert_eq!(authz(&closed).await, json!({ "allow": [] }));
    let control = TestControl::start(&yaml(", default: allow")).await;
    assert!(authz(&control).await.is_null(), "{}", authz(&control).await);
    consul.set_intention("web", "orders", "allow");
    consul.set_intention("ads", "orders", "deny");
    eventually("a deny closes to the explicit allows", || async {
        authz(&control).await == json!({ "allow": ["spiffe://almond.test/service/web"] })
    })
    .await;
    consul.delete_intention("ads", "orders");
    eventually("allows alone leave the default", || async {
        authz(&control).await.is_null()
    })
    .await;
}

/// Intentions that cannot be read are not an open door: until a
/// service's intentions are first read the control plane is not ready,
/// and a service whose intentions it may not read is served admitting
/// nobody, not everyone. A failing read backs off (no hot loop on 403).
#[tokio::test]
async fn unreadable_intentions_admit_nobody() {
    const ENV: &str = "ALMOND_T_CONSUL_TOKEN_INTENTIONS";
    const TOKEN: &str = "3e6b1f0a-no-intentions";
    std::env::set_var(ENV, TOKEN);
    let backend = Backend::start("v1").await;
    let consul = ConsulDouble::builder()
        .acl_token(Some("management-token-not-ours"))
        .start()
        .await;
    let rights = AclPolicy::read_all().key_prefix("almond/", Access::Write);
    consul.add_acl_token(TOKEN, rights.clone().intentions("orders", Access::Deny));
    let def = |id: &str, name: &str| {
        ServiceDef::new(name)
            .id(id)
            .address("127.0.0.1")
            .port(backend.addr.port())
            .meta("version", "v1")
    };
    consul.register(def("orders-1", "orders")).unwrap();
    consul.set_intention("web", "orders", "allow");
    consul.set_intention("web", "billing", "allow");
    consul.set_intention("ads", "orders", "deny");
    let yaml = consul_control_yaml(&consul.url(), "1s", ENV).replace(
        &format!("token_env: {ENV} }}"),
        &format!("token_env: {ENV}, intentions: {{ trust_domain: almond.test }} }}"),
    );
    let control = TestControl::launch_unready(&yaml).await;
    let reads = || {
        consul
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/connect/intentions/match")
            .count()
    };
    eventually("the intentions are read", || async { reads() >= 1 }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(reads() <= 3, "{} intention reads in 3 s of 403s", reads());
    assert_eq!(
        control.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ready without the intentions"
    );
    // Consul answers the catalog and health (only the intentions are
    // refused): up, the refusals counted.
    let text = control.get("/metrics").await.text();
    assert_eq!(metric(&text, "almond_control_consul_up", &[]), 1.0);
    assert!(metric(&text, "almond_control_consul_errors_total", &[]) >= 1.0);

    // Granted: ready, with the list the intentions give.
    consul.add_acl_token(TOKEN, rights.clone().intentions("billing", Access::Deny));
    eventually("ready once the intentions are read", || async {
        control.get("/ready").await.status == StatusCode::OK
    })
    .await;
    let authz = |name: &'static str| {
        let control = &control;
        async move {
            let snapshot = control.get("/v1/snapshot?wait=0s").await.json();
            snapshot["services"][name]["authz"].clone()
        }
    };
    let web = "spiffe://almond.test/service/web";
    assert_eq!(authz("orders").await, json!({ "allow": [web] }));

    // A service that comes later, whose intentions may not be read: it
    // is served, admitting nobody.
    consul.register(def("billing-1", "billing")).unwrap();
    eventually("billing is served", || async {
        !authz("billing").await.is_null()
    })
    .await;
    assert_eq!(authz("billing").await, json!({ "allow": [] }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        authz("billing").await,
        json!({ "allow": [] }),
        "still nobody"
    );
}
