//! End to end through the `almond` binary: `check-config` verdicts and
//! messages, `proxy` draining on SIGTERM, and `demo`.

mod support;

use http::StatusCode;
use std::time::Duration;
use support::*;

/// A valid config in the shape of CONTRACT.md (line numbers matter below).
const GOOD: &str = "\
admin: 127.0.0.1:4191
listeners:
  - bind: 127.0.0.1:4140
  - bind: 127.0.0.1:9001
    service: orders
services:
  orders:
    protocol: http2
    lb: p2c_ewma
    endpoints:
      - { addr: 127.0.0.1:8081, subset: v1, weight: 1 }
      - { addr: 127.0.0.1:8082, subset: v2 }
    split: { v1: 90, v2: 10 }
    timeouts: { connect: 1s, request: 10s }
";

/// Runs `almond check-config` on `text`.
async fn check(text: &str) -> (Option<i32>, String, String) {
    let file = write_temp(".yaml", text);
    let path = file.path().display().to_string();
    let (status, out, err) = run_almond(&["check-config", &path]).await;
    (status.code(), out, err)
}

#[tokio::test]
async fn check_config_accepts_a_good_file() {
    let (code, out, err) = check(GOOD).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ok"), "{out}");
}

#[tokio::test]
async fn check_config_names_an_unknown_key_and_its_line() {
    let (code, _, err) = check(&GOOD.replace("lb: p2c_ewma", "lbb: p2c_ewma")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("line 9: services.orders.lbb"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[tokio::test]
async fn check_config_names_a_bad_duration_and_its_line() {
    let (code, _, err) = check(&GOOD.replace("connect: 1s", "connect: soon")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 14: services.orders.timeouts.connect"),
        "{err}"
    );
}

#[tokio::test]
async fn check_config_refuses_empty_endpoints() {
    let text = "services:\n  orders:\n    endpoints: []\n";
    let (code, _, err) = check(text).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("line 3: services.orders.endpoints"), "{err}");
}

#[tokio::test]
async fn check_config_refuses_a_duplicate_listener() {
    let text = GOOD.replace("bind: 127.0.0.1:9001", "bind: 127.0.0.1:4140");
    let (code, _, err) = check(&text).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("line 4: listeners[1].bind"), "{err}");
    assert!(err.contains("127.0.0.1:4140"), "{err}");
}

/// A control config with a mistake is still checked as a control config:
/// the message names its real problem and line, not `listen: unknown field
/// ... expected one of admin, control ...`.
#[tokio::test]
async fn check_config_names_a_control_config_mistake_and_its_line() {
    let twice = "\
listen: 127.0.0.1:4180
source:
  file: ./registry
watcher:
  source: direct
  source: direct
";
    let (code, _, err) = check(twice).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 6: watcher: key \"source\" given twice (first on line 5)"),
        "{err}"
    );
    let (code, _, err) = check("listen: 127.0.0.1:4180\nsourse:\n  file: ./registry\n").await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("line 2: sourse: unknown field"), "{err}");
    assert!(err.contains("expected one of listen, source"), "{err}");
    let (code, out, err) = check("listen: 127.0.0.1:4180\nsource: { file: /tmp }\n").await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (control config)"), "{out}");
    // A registry directory that is not there (yet: a mount may come
    // later) is named, with its line.
    let (code, _, err) =
        check("listen: 127.0.0.1:4180\nsource: { file: /nonexistent/registry }\n").await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: line 2: source.file: /nonexistent/registry: No such file"),
        "{err}"
    );
    assert!(err.contains("the control plane stays unready"), "{err}");
}

/// Settings that expose the mesh pass the check (exit 0) but are named,
/// with their lines: an outbound listener off loopback (an open relay),
/// tokens sent over `http://` to another host. A config without them has
/// no warning.
#[tokio::test]
async fn check_config_warns_about_open_relays_and_cleartext_tokens() {
    let (code, out, err) = check(GOOD).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert!(out.contains("ok (proxy config)"), "{out}");

    let proxy = "\
admin: 127.0.0.1:4191
control: http://10.0.0.10:4180
token_env: ALMOND_PROXY_TOKEN
listeners:
  - bind: 127.0.0.1:4140
  - bind: 0.0.0.0:4141
    service: orders
  - bind: 0.0.0.0:4143
    service: orders
    direction: inbound
";
    let (code, out, err) = check(proxy).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (proxy config)"), "{out}");
    assert!(
        err.contains(
            "warning: line 6: listeners[1].bind: an outbound listener on 0.0.0.0 without `tls`"
        ),
        "{err}"
    );
    assert!(err.contains("call `orders` through this proxy"), "{err}");
    assert!(
        err.contains("warning: line 2: control: http:// to 10.0.0.10"),
        "{err}"
    );
    assert!(err.contains("its token (token_env)"), "{err}");
    assert_eq!(err.matches("warning").count(), 2, "{err}");
    let (_, _, err) = check(&proxy.replace("http://10.0.0.10", "https://10.0.0.10")).await;
    assert!(!err.contains("control"), "{err}");
    // An empty file is a proxy that answers 404 to everything.
    let (code, out, err) = check("").await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (proxy config)"), "{out}");
    assert!(
        err.contains("warning: services: none, and no `control` to send any"),
        "{err}"
    );

    let control = "\
listen: 0.0.0.0:4180
token_env: ALMOND_TOKEN
source:
  consul: { addr: http://consul.internal:8500 }
";
    let (code, out, err) = check(control).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (control config)"), "{out}");
    assert!(
        err.contains(
            "warning: line 1: listen: 0.0.0.0 without `tls`: operators' and proxies' tokens"
        ),
        "{err}"
    );
    assert!(
        err.contains("warning: line 4: source.consul.addr: http:// to consul.internal"),
        "{err}"
    );
    let (_, _, err) = check(&control.replace("token_env: ALMOND_TOKEN\n", "")).await;
    assert!(
        err.contains("warning: token_env: not set: anyone who reaches the API"),
        "{err}"
    );
}

/// Stderr lines of a running `almond proxy`.
type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Starts `almond proxy` on a config of one listener and the admin (both
/// on port 0, no services), logging at `info` with `env` set and `unset`
/// removed; its stderr, line by line (the config file lives as long as
/// the returned handle).
#[allow(clippy::unwrap_used)]
fn bare_proxy(
    env: &[(&str, &str)],
    unset: &[&str],
) -> (tokio::process::Child, LogLines, tempfile::NamedTempFile) {
    use tokio::io::AsyncBufReadExt;
    let config = write_temp(
        ".yaml",
        "admin: 127.0.0.1:0\nlisteners:\n  - bind: 127.0.0.1:0\n",
    );
    let mut cmd = almond();
    cmd.args(["proxy", "--config"]).arg(config.path());
    for name in unset {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut child = cmd
        .env("ALMOND_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines, config)
}

/// Text logs written to a pipe (a file, journald) carry no terminal
/// colour codes: one plain event per line.
#[tokio::test]
async fn text_logs_to_a_pipe_are_plain() {
    let (mut child, mut lines, _config) = bare_proxy(&[], &["ALMOND_LOG_FORMAT", "NO_COLOR"]);
    loop {
        let line = within("a log line", lines.next_line())
            .await
            .unwrap()
            .unwrap();
        assert!(!line.contains('\x1b'), "colour codes in {line:?}");
        if line.contains("listening") {
            assert!(line.contains(" INFO "), "{line:?}");
            break;
        }
    }
    child.kill().await.unwrap();
}

/// A guard's `--rate` and `--by` are checked by the CLI as the control
/// plane checks them: a usage error (exit 2) naming the flag, before any
/// request (the control plane here is not even reachable).
#[tokio::test]
async fn limit_flags_are_checked_before_any_request() {
    let base = [
        "limit",
        "orders",
        "--path",
        "/api",
        "--control",
        "http://127.0.0.1:1",
    ];
    for (extra, says) in [
        (&["--rate", "10"][..], "'10' for '--rate <RATE>'"),
        (&["--rate", "0/s"][..], "the count must be 1 or more"),
        (
            &["--rate", "10/s", "--by", "cookie"][..],
            "'cookie' for '--by <BY>'",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (status, _, err) = run_almond(&args).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Good flags get as far as the (unreachable) control plane.
    let args: Vec<&str> = base.iter().chain(&["--rate", "10/s"]).copied().collect();
    let (status, _, err) = run_almond(&args).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the control plane"), "{err}");
}

/// A `--control` address where something other than an almond control
/// plane answers (an empty 404) is named, with what to check: the
/// message was `almond:  (404 Not Found)`.
#[tokio::test]
async fn an_answer_from_something_else_names_the_address() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let (status, _, err) = run_almond(&["status", "--control", &url]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{url} answered 404 Not Found with no reason")),
        "{err}"
    );
    assert!(err.contains("is it an almond control plane"), "{err}");
}

/// The demo's rate and step are bounded: `--rate 0` ran at about one
/// request a second (the watcher never had enough to judge), and a rate
/// of a million ran the machine out of file descriptors.
#[tokio::test]
async fn the_demo_refuses_rates_it_cannot_run() {
    for args in [
        &["demo", "--rate", "0"][..],
        &["demo", "--rate", "1000000"][..],
        &["demo", "--step", "0"][..],
    ] {
        let (status, _, err) = run_almond(args).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("not in 1.."), "{args:?}: {err}");
    }
}

/// A control plane that refuses to start (a token variable that is not
/// set) says why, without first logging that it listens.
#[tokio::test]
async fn a_refused_control_start_logs_no_listening() {
    let config = write_temp(
        ".yaml",
        "listen: 127.0.0.1:0\nsource: { file: /tmp }\ntoken_env: ALMOND_T_UNSET_TOKEN_CLI\n",
    );
    let path = config.path().display().to_string();
    let (status, _, err) = run_almond(&["control", "--config", &path]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("ALMOND_T_UNSET_TOKEN_CLI"), "{err}");
    assert!(!err.contains("listening"), "{err}");
}

/// Nothing to show is said, not printed as nothing: `status` against a
/// control plane with no services, `events` of a service with none.
#[tokio::test]
async fn empty_answers_say_so() {
    let a1 = Backend::start("a1").await;
    let registry = Registry::new();
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let url = control.url();
    let (status, out, err) = run_almond(&["status", "--control", &url]).await;
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        out.contains(&format!(
            "no services: the control plane at {url} serves none"
        )),
        "{out}"
    );
    let (_, out, _) = run_almond(&["status", "--control", &url, "-o", "json"]).await;
    assert_eq!(out.trim(), "[]");
    registry.service("web", &[(a1.addr, "v1")]);
    eventually("web is served", || async {
        control.get("/v1/services").await.json()["services"]["web"].is_object()
    })
    .await;
    let (status, out, err) = run_almond(&["events", "web", "--control", &url]).await;
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(out.trim(), "no events for web");
}

/// The proxy says its zone at start, `ALMOND_ZONE` read without the
/// white space around it (a trailing newline made a zone no endpoint's
/// matched, and zone-aware balancing went off without a sign).
#[tokio::test]
async fn the_zone_is_trimmed_and_said_at_start() {
    let env = [
        ("ALMOND_ZONE", " eu-west-1a\n"),
        ("ALMOND_LOG_FORMAT", "json"),
    ];
    let (mut child, mut lines, _config) = bare_proxy(&env, &[]);
    loop {
        let line = within("the zone line", lines.next_line())
            .await
            .unwrap()
            .expect("the proxy said no zone");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("this proxy's zone"))
        {
            assert_eq!(v["zone"], "eu-west-1a", "{line}");
            break;
        }
    }
    child.kill().await.unwrap();
}

/// What a control plane would ignore or cannot do is refused by the
/// check, with the key and line: a misspelled watcher key, `store: consul`
/// beside a file source (whose policies live in `policy_file`).
#[tokio::test]
async fn check_config_refuses_control_keys_that_would_be_ignored() {
    let text = "\
listen: 127.0.0.1:4180
source: { file: /tmp }
watcher: { source: direct, promethues: \"http://127.0.0.1:9090\" }
store: consul
max_wait: 0s
";
    let (code, _, err) = check(text).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 3: watcher.promethues: unknown field `promethues`"),
        "{err}"
    );
    let (code, _, err) = check(&text.replace(", promethues: \"http://127.0.0.1:9090\"", "")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 4: store: consul needs a consul source"),
        "{err}"
    );
    assert!(
        err.contains("line 5: max_wait: must be more than 0"),
        "{err}"
    );
}

/// A service named so that no `Host` reaches it (the proxy looks `Host`
/// up in lower case) is refused with its line and the name to use.
#[tokio::test]
async fn check_config_refuses_a_service_name_no_host_reaches() {
    let (code, _, err) = check(&GOOD.replace("orders", "Orders")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 5: listeners[1].service: \"Orders\""),
        "{err}"
    );
    assert!(err.contains("line 7: services.Orders: \"Orders\""), "{err}");
    assert!(err.contains("so name it \"orders\""), "{err}");
    let (code, _, err) = check(&GOOD.replace("  orders:", "  \"my orders\":")).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 7: services.my orders: \"my orders\" is not a host name"),
        "{err}"
    );
}

#[tokio::test]
async fn proxy_refuses_to_start_on_a_bad_config() {
    let file = write_temp(".yaml", "services:\n  orders:\n    endpoints: []\n");
    let path = file.path().display().to_string();
    let (status, _, err) = run_almond(&["proxy", "--config", &path]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("services.orders.endpoints"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let slow = Backend::builder("slow")
        .delay(Duration::from_millis(1500))
        .start()
        .await;
    let yaml = ProxyYaml::new()
        .by_host()
        .service(ServiceYaml::new("slow").at(slow.addr))
        .build();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let addr = proxy.addr();

    // A slow request is in flight (it has reached the backend) ...
    let in_flight = tokio::spawn(async move { get_h1(addr, "slow", "/slow").await });
    eventually("the slow request reaches the backend", || async {
        slow.count() == 1
    })
    .await;

    // ... when SIGTERM arrives.
    proxy.terminate().await;

    // New connections are refused once the proxy stops accepting.
    eventually("new connections are refused after SIGTERM", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;

    // The in-flight request still completes.
    let reply = within("the in-flight request", in_flight).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), "slow");
    assert_eq!(reply.json()["path"], "/slow");

    let status = proxy.wait().await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
    assert!(proxy.logs().contains("shutting down"), "{}", proxy.logs());
}

#[tokio::test]
async fn demo_runs_and_reports_both_versions() {
    let (status, out, err) = run_almond(&["demo", "--duration", "3"]).await;
    assert_eq!(status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    // The dashboard's address first; the components log warnings only.
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.starts_with("almond demo: dashboard at http://") && first.contains("/ui"),
        "{out}"
    );
    assert!(!err.contains(" INFO "), "{err}");
    assert!(out.lines().any(|l| l.contains("v1")), "{out}");
    assert!(out.lines().any(|l| l.contains("v2")), "{out}");
    // The per-second summaries show traffic reaching v1.
    assert!(
        out.lines()
            .any(|l| l.starts_with("t=") && l.contains("v1:")),
        "{out}"
    );
    // With v2 at 10 %, the control plane's live view (the `almond status`
    // table): weights, endpoints healthy/total, live figures per subset.
    assert!(out.contains("almond status demo"), "{out}");
    let row = |subset: &str| out.lines().find(|l| l.trim_start().starts_with(subset));
    assert!(
        row("SUBSET").is_some_and(|l| l.contains("RPS") && l.contains("P99")),
        "{out}"
    );
    assert!(
        row("v2").is_some_and(|l| l.contains("10%") && l.contains("1/1")),
        "{out}"
    );
}

/// The demo stops on SIGTERM and on Ctrl-C (SIGINT), whenever it comes
/// (one during a status table was lost), and removes its scratch
/// directory (SIGTERM left it behind).
#[tokio::test]
async fn demo_stops_on_a_signal_and_cleans_up() {
    use tokio::io::AsyncBufReadExt;
    for sig in ["-TERM", "-INT"] {
        let mut child = almond()
            .args(["demo", "--duration", "60"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let dir = std::env::temp_dir().join(format!("almond-demo-{pid}"));
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // Until the control plane's table is being printed.
        within("the demo's first status table", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("almond status demo") {
                    break;
                }
            }
        })
        .await;
        assert!(dir.exists(), "no scratch directory at {}", dir.display());
        let sent = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        // Drain what it prints while it stops.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running 10 s after kill {sig}"))
            .unwrap();
        assert!(status.success(), "{sig}: {status}");
        assert!(!dir.exists(), "{sig}: {} left behind", dir.display());
    }
}

/// The access log of a proxy told to stop: the line of every request it
/// answered during the drain, and of every request the drain's end cut
/// off (status 503, the proxy's), is in the file when the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_keeps_every_line_through_a_stop() {
    let quick = Backend::builder("quick")
        .delay(Duration::from_millis(400))
        .start()
        .await;
    let stuck = Backend::builder("stuck")
        .delay(Duration::from_secs(30))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = ProxyYaml::new()
        .by_host()
        .top("drain_timeout: 1500ms")
        .top(&format!(
            "access_log: {{ format: json, path: \"{}\" }}",
            log.display()
        ))
        .service(ServiceYaml::new("quick").at(quick.addr))
        .service(ServiceYaml::new("stuck").at(stuck.addr))
        .build();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let addr = proxy.addr();

    // Requests in flight when SIGTERM comes: twenty answered during the
    // drain, one that outlasts it.
    let answered: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { get_h1(addr, "quick", &format!("/q/{i}")).await }))
        .collect();
    let cut = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /stuck HTTP/1.1\r\nhost: stuck\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got).await;
        got
    });
    eventually("every request reaches its backend", || async {
        quick.count() == 20 && stuck.count() == 1
    })
    .await;
    proxy.terminate().await;
    for reply in answered {
        assert_eq!(
            within("an answer", reply).await.unwrap().status,
            StatusCode::OK
        );
    }
    let got = within("the cut request", cut).await.unwrap();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    let status = proxy.wait().await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let quick_lines = lines.iter().filter(|l| l["service"] == "quick").count();
    assert_eq!(quick_lines, 20, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l["service"] != "quick" || l["status"] == 200),
        "{text}"
    );
    let stuck_lines: Vec<_> = lines.iter().filter(|l| l["service"] == "stuck").collect();
    assert_eq!(stuck_lines.len(), 1, "{text}");
    assert_eq!(stuck_lines[0]["status"], 503, "{text}");
    assert_eq!(stuck_lines[0]["code_class"], "error", "{text}");
    assert_eq!(stuck_lines[0]["path"], "/stuck", "{text}");
}

/// Writes `yaml` as `proxy`'s config file and sends SIGHUP; returns the
/// log line that says `said`, once it is logged.
#[allow(clippy::unwrap_used)]
async fn reload(proxy: &ProxyProcess, yaml: &str, said: &str) -> String {
    std::fs::write(proxy.config_path(), yaml).unwrap();
    proxy.signal("HUP").await;
    eventually(said, || async { proxy.logs().contains(said) }).await;
    let logs = proxy.logs();
    logs.lines()
        .find(|l| l.contains(said))
        .unwrap_or("")
        .to_owned()
}

/// SIGHUP reads the config file again, as `nginx -s reload` does: changed
/// services are in force without a restart (the process and its
/// connections stay); a file with a problem is refused, named by key and
/// line, and the running configuration stays; a change that needs a
/// restart is named. SIGHUP used to end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_services_and_refuses_a_broken_file() {
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;
    let file = |backend: std::net::SocketAddr, top: &str| {
        ProxyYaml::new()
            .by_host()
            .top(top)
            .service(ServiceYaml::new("web").at(backend))
            .build()
    };
    let proxy = ProxyProcess::start(&file(one.addr, "drain_timeout: 30s")).await;
    let mut client = H1::connect(proxy.addr()).await;
    assert_eq!(client.get("web", "/").await.backend(), "one");
    let metrics = || async { admin_get(proxy.admin, "/metrics").await.text() };
    let applied = |text: &str| metric(text, "almond_config_applied_timestamp_seconds", &[]);
    let started = applied(&metrics().await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!((now.as_secs_f64() - started).abs() < 60.0, "{started}");
    tokio::time::sleep(Duration::from_millis(20)).await;

    std::fs::write(proxy.config_path(), file(two.addr, "drain_timeout: 30s")).unwrap();
    proxy.signal("HUP").await;
    eventually("the reloaded service answers", || async {
        H1::connect(proxy.addr())
            .await
            .get("web", "/")
            .await
            .backend()
            == "two"
    })
    .await;
    // The same connection goes on, to the new endpoint.
    assert_eq!(client.get("web", "/").await.backend(), "two");
    let reloaded = applied(&metrics().await);
    assert!(reloaded > started, "{reloaded} after {started}");

    // A broken file: refused, named, nothing changed.
    let refusal = reload(&proxy, &file(one.addr, "workers: many"), "reload refused").await;
    assert!(refusal.contains("workers"), "{refusal}");
    assert!(refusal.contains("line"), "{refusal}");
    assert_eq!(client.get("web", "/").await.backend(), "two");
    let text = metrics().await;
    assert_eq!(
        metric(
            &text,
            "almond_config_refused_total",
            &[("reason", "reload")]
        ),
        1.0
    );
    assert_eq!(applied(&text), reloaded, "a refused reload applied nothing");

    // A key that needs a restart is named; the services still apply.
    let file_text = file(one.addr, "drain_timeout: 5s");
    let named = reload(&proxy, &file_text, "take effect on a restart").await;
    assert!(named.contains("drain_timeout"), "{named}");
    eventually("the services of that file apply", || async {
        H1::connect(proxy.addr())
            .await
            .get("web", "/")
            .await
            .backend()
            == "one"
    })
    .await;
    assert_eq!(admin_get(proxy.admin, "/live").await.status, StatusCode::OK);
}

/// SIGUSR1 reopens the access log's file, as Nginx's does: after
/// logrotate renamed it away, new lines go to a new file at the path, and
/// none is lost. SIGUSR1 used to end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_after_rotation() {
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let yaml = ProxyYaml::new()
        .by_host()
        .top(&format!(
            "access_log: {{ format: json, path: \"{}\" }}",
            log.display()
        ))
        .service(ServiceYaml::new("web").at(backend.addr))
        .build();
    let proxy = ProxyProcess::start(&yaml).await;
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        get_h1(proxy.addr(), "web", "/before").await.status,
        StatusCode::OK
    );
    eventually("the first line", || async { lines(&log).len() == 1 }).await;
    std::fs::rename(&log, &rotated).unwrap();
    proxy.signal("USR1").await;
    eventually("the log is reopened", || async {
        proxy.logs().contains("access log reopened")
    })
    .await;
    assert_eq!(
        get_h1(proxy.addr(), "web", "/after").await.status,
        StatusCode::OK
    );
    eventually("the new file's line", || async { lines(&log).len() == 1 }).await;
    assert!(lines(&rotated)[0].contains("/before"));
    assert!(lines(&log)[0].contains("/after"));
    assert_eq!(admin_get(proxy.admin, "/live").await.status, StatusCode::OK);
}

/// A second SIGTERM during the drain ends the process at once (exit 1),
/// as a second Ctrl-C means: the operator does not want to wait out
/// `drain_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let stuck = Backend::builder("stuck")
        .delay(Duration::from_secs(60))
        .start()
        .await;
    let yaml = ProxyYaml::new()
        .by_host()
        .top("drain_timeout: 60s")
        .service(ServiceYaml::new("stuck").at(stuck.addr))
        .build();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let addr = proxy.addr();
    let _in_flight = tokio::spawn(async move { get_h1(addr, "stuck", "/").await });
    eventually("the request reaches its backend", || async {
        stuck.count() == 1
    })
    .await;
    proxy.terminate().await;
    eventually("the drain starts", || async {
        proxy.logs().contains("shutting down")
    })
    .await;
    proxy.terminate().await;
    let status = proxy.wait().await;
    assert_eq!(status.code(), Some(1), "logs:\n{}", proxy.logs());
    assert!(
        proxy.logs().contains("second stop signal"),
        "{}",
        proxy.logs()
    );
}

/// The control plane has no reload: SIGHUP says so and the process goes
/// on (it used to end it, as the signal's default does).
#[tokio::test]
async fn sighup_leaves_the_control_plane_running() {
    use tokio::io::AsyncBufReadExt;
    let registry = Registry::new();
    let config = write_temp(".yaml", &registry.control_yaml(None));
    let mut child = almond()
        .arg("control")
        .arg("--config")
        .arg(config.path())
        .env("ALMOND_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = async |text: &str| {
        within(text, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(text) {
                    return;
                }
            }
            panic!("almond control ended before logging {text:?}");
        })
        .await;
    };
    wait_for("control API listening").await;
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    wait_for("has no reload").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the control plane ended"
    );
}

/// A second proxy started on the same ports (by mistake, or an old one
/// left running) binds them too (`SO_REUSEPORT`, for overlapping
/// upgrades), and the kernel divides the connections: it says so at
/// start.
#[tokio::test]
async fn a_second_proxy_on_the_same_ports_says_it_shares_them() {
    let backend = Backend::start("web").await;
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (listen, admin) = (free(), free());
    let yaml = format!(
        "admin: {admin}\nlisteners:\n  - bind: {listen}\nservices:\n  web:\n    endpoints:\n      - {{ addr: \"{}\" }}\n",
        backend.addr
    );
    let first = ProxyProcess::start(&yaml).await;
    assert!(!first.logs().contains("another process already listens"));
    let second = ProxyProcess::start(&yaml).await;
    let logs = second.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("another process already listens"))
        .collect();
    assert_eq!(warnings.len(), 2, "{logs}");
    assert!(
        warnings.iter().any(|l| l.contains(&listen.to_string())),
        "{logs}"
    );
    assert!(
        warnings.iter().any(|l| l.contains(&admin.to_string())),
        "{logs}"
    );
}
