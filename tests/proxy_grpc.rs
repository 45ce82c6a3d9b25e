//! gRPC through the proxy, with a real gRPC client and server (Python
//! `grpcio`, tests/grpc/): calls are counted by `grpc-status` (trailers-only
//! answers and trailers after a body), failures reach the watcher's error
//! rate (a canary failing with UNAVAILABLE is rolled back), and
//! `retries.on: [grpc-unavailable]` sends a failed call to another endpoint.
//!
//! Needs `python3` with `grpcio`; without it these tests say so and pass,
//! unless `ALMOND_REQUIRE_GRPC=1` (CI), where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The scripts' directory.
fn scripts() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc")
}

/// Is `grpcio` importable? Without it: false (the test returns), or a
/// failure when `ALMOND_REQUIRE_GRPC=1`.
async fn grpc_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("ALMOND_REQUIRE_GRPC").as_deref() != Ok("1"),
            "ALMOND_REQUIRE_GRPC=1 but python3 cannot import grpc (pip install grpcio)"
        );
        eprintln!("skipped: python3 cannot import grpc (pip install grpcio)");
    }
    ok
}

/// A gRPC server process (tests/grpc/server.py); killed when dropped.
struct GrpcServer {
    addr: SocketAddr,
    _child: Child,
}

impl GrpcServer {
    /// Server `name`; `fail`: the status of every call (`UNAVAILABLE`).
    async fn start(name: &str, fail: Option<&str>) -> GrpcServer {
        match fail {
            Some(code) => GrpcServer::spawn(name, &["--fail", code]).await,
            None => GrpcServer::spawn(name, &[]).await,
        }
    }

    /// Server `name` with more of server.py's options.
    async fn spawn(name: &str, options: &[&str]) -> GrpcServer {
        let mut cmd = Command::new("python3");
        cmd.arg(scripts().join("server.py")).arg(name).args(options);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        within(
            "the gRPC server's port",
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("server.py said {line:?}"));
        GrpcServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
        }
    }
}

/// Runs tests/grpc/client.py against `proxy` with `:authority` `service`;
/// returns its tally `{"codes": {..}, "backends": {..}}`.
async fn calls(proxy: SocketAddr, service: &str, specs: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(scripts().join("client.py"))
        .arg(proxy.to_string())
        .arg(service)
        .args(specs)
        .kill_on_drop(true)
        .output();
    let out = within("the gRPC client", out).await.unwrap();
    assert!(
        out.status.success(),
        "client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `n` of `code` in a client tally (0 when absent).
fn n(tally: &Value, code: &str) -> u64 {
    tally["codes"][code].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_counted_by_status_and_failures_as_failures() {
    if !grpc_available().await {
        return;
    }
    let server = GrpcServer::start("a", None).await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("g")
                .http2()
                .set("grpc", "{ failure_codes: [UNAVAILABLE, INTERNAL] }")
                .at(server.addr),
        )
        .start()
        .await;
    let tally = calls(
        proxy.addr(),
        "g",
        &[
            "Unary:OK:5",
            "Unary:UNAVAILABLE:3",
            "Unary:NOT_FOUND:2",
            "Stream:OK:2",
            "Stream:INTERNAL:4",
        ],
    )
    .await;
    assert_eq!(
        tally["codes"],
        json!({ "OK": 7, "UNAVAILABLE": 3, "NOT_FOUND": 2, "INTERNAL": 4 }),
        "the client sees the server's statuses"
    );
    let text = proxy.admin_get("/metrics").await.text();
    let grpc = |code: &str| {
        metric(
            &text,
            "almond_grpc_responses_total",
            &[("service", "g"), ("subset", "v1"), ("grpc_status", code)],
        )
    };
    // Trailers-only answers (Unary) and statuses in trailers after a
    // message (Stream) alike.
    assert_eq!(grpc("OK"), 7.0);
    assert_eq!(grpc("UNAVAILABLE"), 3.0);
    assert_eq!(grpc("NOT_FOUND"), 2.0);
    assert_eq!(grpc("INTERNAL"), 4.0);
    assert_eq!(grpc("UNKNOWN"), 0.0);
    let requests = |outcome: &str| {
        metric(
            &text,
            "almond_requests_total",
            &[
                ("service", "g"),
                ("code_class", "2xx"),
                ("outcome", outcome),
            ],
        )
    };
    // NOT_FOUND is not in this service's failure_codes: a success.
    assert_eq!(requests("failure"), 7.0, "UNAVAILABLE and INTERNAL");
    assert_eq!(requests("success"), 9.0, "OK and NOT_FOUND");
    // An HTTP/1.1 service has no gRPC series.
    assert!(!text.contains("grpc_status=\"OK\",service=\"h\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_on_another_endpoint() {
    if !grpc_available().await {
        return;
    }
    let down = GrpcServer::start("down", Some("UNAVAILABLE")).await;
    let up = GrpcServer::start("up", None).await;
    let service = |name: &str, on: &str| {
        ServiceYaml::new(name)
            .http2()
            .lb("round_robin")
            .set("retries", &format!("{{ attempts: 2, on: [{on}] }}"))
            // Keep both endpoints in: this test is about retries.
            .set("circuit_breaker", "{ consecutive_failures: 1000 }")
            .endpoint(down.addr, "v1", 1)
            .endpoint(up.addr, "v1", 1)
    };
    let proxy = ProxyYaml::new()
        .by_host()
        .service(service("retried", "connect, grpc-unavailable"))
        .service(service("plain", "connect, \"503\""))
        .start()
        .await;

    // Round robin sends every other call to `down` first: retried, each
    // one ends on `up`.
    let tally = calls(proxy.addr(), "retried", &["Unary:OK:20"]).await;
    assert_eq!(tally["codes"], json!({ "OK": 20 }), "{tally}");
    assert_eq!(tally["backends"], json!({ "up": 20 }), "{tally}");
    let retries = proxy_metric(&proxy, "almond_retries_total", &[("service", "retried")]).await;
    assert!((8.0..=12.0).contains(&retries), "retries: {retries}");
    eprintln!("grpc-unavailable: 20 calls, {retries} retried, all OK");

    // A status in trailers after a message cannot be retried (the client
    // has the message): the client sees it.
    let tally = calls(proxy.addr(), "retried", &["Stream:OK:4"]).await;
    assert_eq!(n(&tally, "UNAVAILABLE") + n(&tally, "OK"), 4, "{tally}");
    assert!(n(&tally, "UNAVAILABLE") >= 1, "{tally}");

    // Without the condition, the failures reach the client.
    let tally = calls(proxy.addr(), "plain", &["Unary:OK:10"]).await;
    assert_eq!(n(&tally, "UNAVAILABLE"), 5, "{tally}");
    assert_eq!(n(&tally, "OK"), 5, "{tally}");
    let failures = proxy_metric(
        &proxy,
        "almond_requests_total",
        &[("service", "plain"), ("outcome", "failure")],
    )
    .await;
    assert_eq!(failures, 5.0);
}

/// An endpoint answering every call with a trailers-only `UNAVAILABLE`
/// is ejected as one answering 503 would be (gRPC's status table, as
/// Envoy's outlier detection reads it): it was a fast "success" that ended
/// no run of failures and drew latency-aware traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_every_call_with_unavailable_is_ejected() {
    if !grpc_available().await {
        return;
    }
    let down = GrpcServer::start("down", Some("UNAVAILABLE")).await;
    let up = GrpcServer::start("up", None).await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("g")
                .http2()
                .lb("round_robin")
                .set("retries", "{ attempts: 0 }")
                .set(
                    "circuit_breaker",
                    "{ consecutive_failures: 3, base_ejection: 1m }",
                )
                .endpoint(down.addr, "v1", 1)
                .endpoint(up.addr, "v1", 1),
        )
        .start()
        .await;
    let tally = calls(proxy.addr(), "g", &["Unary:OK:30"]).await;
    // Round robin: `down` fails three times in a row and is out.
    assert_eq!(n(&tally, "UNAVAILABLE"), 3, "{tally}");
    assert_eq!(n(&tally, "OK"), 27, "{tally}");
    let ejections = proxy_metric(
        &proxy,
        "almond_endpoint_ejections_total",
        &[("service", "g")],
    )
    .await;
    assert_eq!(ejections, 1.0);
}

/// The proxy's own answers to a gRPC call are gRPC answers (trailers-only,
/// `grpc-status` and `grpc-message`), as Envoy's and Linkerd's are: a
/// call that ran out of time is `DEADLINE_EXCEEDED` with the reason (a
/// bare 504 read as `UNAVAILABLE`, which a client's retry policy sends
/// again), one with nowhere to go `UNAVAILABLE`; and they are counted in
/// `almond_grpc_responses_total` by that status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_s_own_answers_to_grpc_calls_carry_a_grpc_status() {
    if !grpc_available().await {
        return;
    }
    let slow = GrpcServer::spawn("slow", &["--delay", "2"]).await;
    let dead = closed_port().await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("slow")
                .http2()
                .set("timeouts", "{ request: 300ms }")
                .set("retries", "{ attempts: 0 }")
                .at(slow.addr),
        )
        .service(ServiceYaml::new("gone").http2().at(dead))
        .start()
        .await;
    let tally = calls(proxy.addr(), "slow", &["Unary:OK:2"]).await;
    assert_eq!(tally["codes"], json!({ "DEADLINE_EXCEEDED": 2 }), "{tally}");
    let details = tally["details"]["DEADLINE_EXCEEDED"].as_str().unwrap_or("");
    assert_eq!(details, "almond: slow did not answer in time", "{tally}");
    let counted = proxy_metric(
        &proxy,
        "almond_grpc_responses_total",
        &[("service", "slow"), ("grpc_status", "DEADLINE_EXCEEDED")],
    )
    .await;
    assert_eq!(counted, 2.0);

    let tally = calls(proxy.addr(), "gone", &["Unary:OK:1"]).await;
    assert_eq!(tally["codes"], json!({ "UNAVAILABLE": 1 }), "{tally}");
    let details = tally["details"]["UNAVAILABLE"].as_str().unwrap_or("");
    assert!(
        details.starts_with("almond: cannot connect to gone"),
        "{tally}"
    );

    // Over HTTP/2 by hand: a trailers-only answer, the reason kept in
    // `x-almond-error`.
    let req = http::Request::post("http://gone/almond.Test/Unary")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\0\0\0\0\0"[..]))
        .unwrap();
    let reply = H2::connect(proxy.addr()).await.request(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("grpc-status"), Some("14"));
    assert_eq!(reply.header("content-type"), Some("application/grpc"));
    assert_eq!(reply.header("x-almond-error"), Some("connect"));
    assert!(reply.body.is_empty());
}

/// A mirrored gRPC call is counted by its `grpc-status`, as the calls
/// themselves are: a shadow subset that answers every copy `UNAVAILABLE`
/// (HTTP 200) shows as failures under `direction="mirror"`, while the
/// clients only ever see the stable subset's answers. Copied whether the
/// call's body comes with a `content-length` (kept whole before the try)
/// or streams without one, as grpcio's client sends it (kept as it goes,
/// and copied once the client has sent it all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_grpc_calls_are_counted_by_their_status() {
    if !grpc_available().await {
        return;
    }
    let stable = GrpcServer::start("stable", None).await;
    let shadow = GrpcServer::start("shadow", Some("UNAVAILABLE")).await;
    let proxy = ProxyYaml::new()
        .by_host()
        .service(
            ServiceYaml::new("g")
                .http2()
                // Bodies are kept for retry, so copies can carry them.
                .set("retries", "{ attempts: 2, on: [grpc-unavailable] }")
                .set("split", "{ v1: 100 }")
                .set("mirror", "{ subset: v2, percent: 100 }")
                .endpoint(stable.addr, "v1", 1)
                .endpoint(shadow.addr, "v2", 1),
        )
        .start()
        .await;
    let mut h2 = H2::connect(proxy.addr()).await;
    for i in 0..10 {
        // One length-prefixed message, b"OK": the status asked for.
        let message = [0u8, 0, 0, 0, 2, b'O', b'K'];
        let req = http::Request::post("http://g/almond.Test/Unary")
            .version(http::Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("content-length", message.len())
            .body(full(message.to_vec()))
            .unwrap();
        let resp = h2.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK, "call {i}");
        let body = within("the call's answer", resp.into_body().collect())
            .await
            .unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(field("grpc-status").as_deref(), Some("0"), "call {i}");
        assert_eq!(field("x-backend").as_deref(), Some("stable"), "call {i}");
    }
    let mirrored = |text: &str, name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("direction", "mirror"), ("service", "g"), ("subset", "v2")];
        all.extend_from_slice(labels);
        metric(text, name, &all)
    };
    // Ten more from grpcio, bodies streamed without a length.
    let tally = calls(proxy.addr(), "g", &["Unary:OK:10"]).await;
    assert_eq!(n(&tally, "OK"), 10, "{tally}");
    assert_eq!(tally["backends"]["stable"], 10, "{tally}");
    // The copies finish in tasks of their own.
    eventually("the twenty copies are counted", || async {
        let text = proxy.admin_get("/metrics").await.text();
        mirrored(&text, "almond_grpc_responses_total", &[]) == 20.0
    })
    .await;
    let text = proxy.admin_get("/metrics").await.text();
    let code = |c: &str| mirrored(&text, "almond_grpc_responses_total", &[("grpc_status", c)]);
    assert_eq!(code("UNAVAILABLE"), 20.0);
    assert_eq!(code("OK"), 0.0);
    let dropped = metric(&text, "almond_mirror_dropped_total", &[("reason", "body")]);
    assert_eq!(dropped, 0.0, "no copy dropped for its body");
    let outcome = |o: &str| {
        mirrored(
            &text,
            "almond_requests_total",
            &[("code_class", "2xx"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("failure"), 20.0, "UNAVAILABLE is a failure code");
    assert_eq!(outcome("success"), 0.0);
    // The shadow's endpoint is judged by the copies' status too: five
    // trailers-only UNAVAILABLEs in a row eject it.
    let ejected = metric(
        &text,
        "almond_endpoint_ejections_total",
        &[("service", "g"), ("subset", "v2")],
    );
    assert!(ejected >= 1.0, "the failing shadow was never ejected");
    // The calls themselves: twenty successes on v1.
    let real = metric(
        &text,
        "almond_requests_total",
        &[
            ("direction", "outbound"),
            ("service", "g"),
            ("subset", "v1"),
            ("outcome", "success"),
        ],
    );
    assert_eq!(real, 20.0);
}

/// Waits until the rollout of service `s` satisfies `cond`.
async fn wait_rollout(control: &TestControl, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        let reply = control.get("/v1/services/s/rollouts").await;
        if reply.status == StatusCode::OK {
            let r = reply.json();
            if cond(&r) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "never happened: {what}; the rollout is now:\n{r:#}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_failing_with_unavailable_is_rolled_back() {
    if !grpc_available().await {
        return;
    }
    let stable = GrpcServer::start("v1", None).await;
    let canary = GrpcServer::start("v2", Some("UNAVAILABLE")).await;
    let registry = Registry::new();
    registry.write(
        "s.yaml",
        &format!(
            "s:\n  protocol: http2\n  lb: round_robin\n  endpoints:\n    \
             - {{ addr: \"{}\", subset: v1 }}\n    - {{ addr: \"{}\", subset: v2 }}\n",
            stable.addr, canary.addr
        ),
    );
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let reply = control
        .put_split("s", &json!({ "weights": { "v1": 100, "v2": 0 } }), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let proxy = start_following(&control.url(), None).await;
    let admin = proxy.admin.to_string();
    eventually("the control plane knows the proxy", || async {
        control.get("/v1/proxies").await.json()["test-proxy"]["admin"] == admin.as_str()
    })
    .await;
    eventually("the proxy has the 100/0 split", || async {
        proxy_metric(
            &proxy,
            "almond_split_weight",
            &[("service", "s"), ("subset", "v1")],
        )
        .await
            == 100.0
    })
    .await;

    // Steady gRPC traffic: every call answers HTTP 200.
    let _traffic = Command::new("python3")
        .arg(scripts().join("client.py"))
        .args([&proxy.addr().to_string(), "s", "Unary:OK:1", "--forever"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let spec = json!({
        "canary": "v2",
        "stable": "v1",
        "steps": [10, 50, 100],
        "interval_seconds": 1.0,
        "thresholds": { "min_requests": 10, "max_error_rate": 0.05 },
    });
    let reply = control
        .send(Method::POST, "/v1/services/s/rollouts", &spec, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let r = wait_rollout(&control, "the rollout is rolled back", |r| {
        r["phase"] != "running" && r["phase"] != "paused"
    })
    .await;
    assert_eq!(r["phase"], "rolled_back", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("error rate"), "{reason}");
    assert_eq!(r["step"], 0, "rolled back at the first step: {r:#}");
    let text = proxy.admin_get("/metrics").await.text();
    let on_canary = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("service", "s"), ("subset", "v2")];
        all.extend_from_slice(labels);
        metric(&text, name, &all)
    };
    let unavailable = on_canary(
        "almond_grpc_responses_total",
        &[("grpc_status", "UNAVAILABLE")],
    );
    assert!(unavailable >= 10.0, "{unavailable}");
    assert_eq!(
        on_canary("almond_requests_total", &[("outcome", "failure")]),
        unavailable,
        "every canary call failed, all with HTTP 200"
    );
    assert_eq!(
        on_canary("almond_requests_total", &[("code_class", "5xx")]),
        0.0
    );
    eprintln!("grpc canary: rolled back ({reason}); {unavailable} UNAVAILABLE calls on v2");
}
