//! The rollout dashboard (`/ui`) in a real headless Chromium: during a
//! rollout held at a gate, the page shows the service, both subsets, their
//! weights and a uPlot chart; with an operator token configured the page
//! asks for it, refuses a wrong one, and an action sent with a wrong token
//! is refused by the control plane and changes nothing, while the right one
//! passes the gate; the "Live requests" panel shows the tap, filtered.
//!
//! Needs the Debian package `chromium`. Without it these tests skip with a
//! message, unless `ALMOND_REQUIRE_CHROMIUM` is set (CI sets it): then
//! they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long the page may take to show something (a loaded 2-core machine
/// starting a browser).
const PAGE_DEADLINE: Duration = Duration::from_secs(60);

/// Whether Chromium can run here; `false` (skip) when it is missing,
/// unless `ALMOND_REQUIRE_CHROMIUM` is set.
fn have_chromium() -> bool {
    let found = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("ALMOND_REQUIRE_CHROMIUM").is_none(),
            "chromium must be on PATH (apt-get install -y --no-install-recommends chromium)"
        );
        eprintln!("skipped: install chromium (Debian package) to run the dashboard tests");
    }
    found
}

/// Chromium's flags for this machine, with a fresh profile in `profile`.
fn chromium(profile: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(std::process::Stdio::null());
    cmd
}

/// Service `s` (v1 on two backends, v2 the canary on one), the control
/// plane on a file registry, a proxy following it, steady traffic, and a
/// rollout of v2 held at its 50 % gate.
struct Rig {
    _backends: Vec<Backend>,
    _registry: Registry,
    control: TestControl,
    _proxy: TestProxy,
    stop: Arc<AtomicBool>,
    traffic: JoinHandle<()>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.traffic.abort();
    }
}

impl Rig {
    async fn start(token: Option<(&str, &str)>) -> Rig {
        let backends = vec![
            Backend::start("v1a").await,
            Backend::start("v1b").await,
            Backend::start("v2").await,
        ];
        let registry = Registry::new();
        registry.service(
            "s",
            &[
                (backends[0].addr, "v1"),
                (backends[1].addr, "v1"),
                (backends[2].addr, "v2"),
            ],
        );
        if let Some((var, value)) = token {
            std::env::set_var(var, value);
        }
        let control = TestControl::start(&registry.control_yaml(token.map(|t| t.0))).await;
        let proxy = match token {
            // The proxy reads its snapshots with the operator's token.
            Some((var, _)) => start_following_token(&control.url(), var).await,
            None => start_following(&control.url(), None).await,
        };
        let token = token.map(|t| t.1);
        let reply = control
            .put_split("s", &json!({ "weights": { "v1": 100, "v2": 0 } }), token)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        eventually("the control plane knows the proxy", || async {
            control.get("/v1/proxies").await.json()["test-proxy"]["admin"]
                == proxy.admin.to_string().as_str()
        })
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (stop, addr) = (stop.clone(), proxy.addr());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let _ = get_h1(addr, "s", "/").await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let spec = json!({
            "canary": "v2", "stable": "v1", "steps": [10, 50, 100], "pause_at": [50],
            "interval_seconds": 1.0,
            "thresholds": { "min_requests": 10, "max_error_rate": 0.05 },
        });
        let reply = control
            .send(Method::POST, "/v1/services/s/rollouts", &spec, token)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let rig = Rig {
            _backends: backends,
            _registry: registry,
            control,
            _proxy: proxy,
            stop,
            traffic,
        };
        rig.wait_phase("paused").await;
        rig
    }

    async fn rollout(&self) -> Value {
        self.control.get("/v1/services/s/rollouts").await.json()
    }

    async fn wait_phase(&self, phase: &str) -> Value {
        let until = tokio::time::Instant::now() + Duration::from_secs(150);
        loop {
            let r = self.rollout().await;
            if r["phase"] == phase {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the rollout never became {phase}: {r:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The split in force at the control plane.
    async fn split(&self) -> Value {
        self.control.service("s").await["policy"]["split"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_rollouts_subsets_weights_and_chart() {
    if !have_chromium() {
        return;
    }
    let rig = Rig::start(None).await;
    // The chart has something to draw: a few samples of the rollout.
    eventually("the history has samples of both subsets", || async {
        let h = rig.control.get("/v1/services/s/history").await.json();
        h["samples"]
            .as_array()
            .is_some_and(|s| s.iter().filter(|x| x["subsets"]["v2"].is_object()).count() >= 2)
    })
    .await;

    // The page and its assets: same origin, strict CSP, no sniffing.
    let page = rig.control.get("/ui").await;
    assert_eq!(page.status, StatusCode::OK);
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let script = rig.control.get("/ui/vendor/uplot/uPlot.iife.min.js").await;
    assert_eq!(script.status, StatusCode::OK);
    assert!(script
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/javascript"));
    assert_eq!(
        rig.control.get("/ui/nope.js").await.status,
        StatusCode::NOT_FOUND
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/ui", rig.control.url());
    let out = tokio::task::spawn_blocking({
        let mut cmd = chromium(profile.path());
        cmd.args([
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--dump-dom",
            &url,
        ]);
        move || cmd.output().unwrap()
    });
    let out = tokio::time::timeout(PAGE_DEADLINE, out)
        .await
        .expect("chromium --dump-dom finished")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The page ran under its CSP without a violation or a script error.
    let log = String::from_utf8_lossy(&out.stderr);
    for bad in ["Content Security Policy", "Uncaught", "Refused to"] {
        assert!(!log.contains(bad), "{bad} in the browser's log:\n{log}");
    }
    // The service, its rollout held at the gate, both subsets at 50 %.
    assert!(
        dom.contains(r#"<section class="service" data-service="s">"#),
        "{dom}"
    );
    assert!(dom.contains(r#"data-phase="paused""#), "{dom}");
    for subset in ["v1", "v2"] {
        let row = dom
            .split(&format!(r#"<tr data-subset="{subset}">"#))
            .nth(1)
            .unwrap_or_else(|| panic!("no row for {subset}: {dom}"));
        let row = row.split("</tr>").next().unwrap_or("");
        assert!(row.contains(r#"data-weight="50""#), "{subset}: {row}");
        assert!(row.contains("50%"), "{subset}: {row}");
    }
    assert!(
        dom.contains("v2 (canary)") && dom.contains("v1 (stable)"),
        "{dom}"
    );
    // A uPlot chart, drawn on a canvas, with both subsets in its legend.
    let chart = dom
        .split(r#"<div class="chart" data-service="s">"#)
        .nth(1)
        .expect("a chart element");
    assert!(chart.starts_with(r#"<div class="uplot"#), "{chart}");
    assert!(chart.contains("<canvas"), "{chart}");
    assert!(
        chart.contains("v2 success %") && chart.contains("v1 p99 ms"),
        "{chart}"
    );
    // The events: the start and the passed steps.
    assert!(dom.contains(r#"<li class="started">"#), "{dom}");
    assert!(dom.contains(r#"<li class="step_passed">"#), "{dom}");
}

/// A page driven over the DevTools protocol: one tab's WebSocket.
struct Tab {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    next_id: u64,
}

impl Tab {
    /// Evaluates `expr` in the page; its value (JSON).
    async fn eval(&mut self, expr: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({ "id": id, "method": "Runtime.evaluate",
            "params": { "expression": expr, "returnByValue": true } });
        self.ws.send(Message::text(call.to_string())).await.unwrap();
        loop {
            let msg = within("a DevTools answer", self.ws.next())
                .await
                .expect("DevTools connection open")
                .unwrap();
            let Ok(text) = msg.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == id {
                assert!(v["result"]["exceptionDetails"].is_null(), "{expr}: {v:#}");
                return v["result"]["result"]["value"].clone();
            }
        }
    }

    /// Waits until `expr` is true in the page.
    async fn until(&mut self, what: &str, expr: &str) {
        let until = tokio::time::Instant::now() + PAGE_DEADLINE;
        loop {
            // Before the page has loaded, its elements are not there yet.
            let guarded =
                format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return false; }} }})()");
            if self.eval(&guarded).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() > until {
                let body = self.eval("document.body.innerText").await;
                panic!("the page never showed: {what}; it shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Chromium with the DevTools protocol on a free port, showing `url`.
struct Browser {
    child: std::process::Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = chromium(profile.path())
            .args(["--remote-debugging-port=0", url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID";
        // the rest of stderr is drained so Chromium never blocks on it.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                    let port = rest
                        .split('/')
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .map(|a| a.port());
                    if let (Some(tx), Some(port)) = (tx.take(), port) {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port = tokio::time::timeout(PAGE_DEADLINE, rx)
            .await
            .expect("chromium printed its DevTools address")
            .unwrap();
        Browser {
            child,
            port,
            _profile: profile,
        }
    }

    /// The tab showing a URL that contains `part`.
    async fn tab(&self, part: &str) -> Tab {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = tokio::time::Instant::now() + PAGE_DEADLINE;
        let ws_url = loop {
            let list = get_h1(addr, &format!("127.0.0.1:{}", self.port), "/json/list").await;
            let found = list.json().as_array().and_then(|tabs| {
                tabs.iter()
                    .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").contains(part))
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(url) = found {
                break url;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "chromium never listed a tab at {part}: {}",
                list.text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(ws_url.as_str(), stream)
            .await
            .unwrap();
        Tab { ws, next_id: 0 }
    }
}

const OPERATOR: &str = "dashboard-operator-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_a_wrong_one_is_refused() {
    if !have_chromium() {
        return;
    }
    let rig = Rig::start(Some(("ALMOND_T_DASHBOARD_TOKEN", OPERATOR))).await;
    // The dashboard's reads need the token like changes do.
    let path = "/v1/dashboard";
    assert_eq!(rig.control.get(path).await.status, StatusCode::UNAUTHORIZED);
    let history = rig.control.get("/v1/services/s/history").await;
    assert_eq!(history.status, StatusCode::UNAUTHORIZED);
    let bearer = |t: &str| format!("Bearer {t}");
    for (token, status) in [("wrong", StatusCode::FORBIDDEN), (OPERATOR, StatusCode::OK)] {
        let req = http::Request::get(path)
            .header("host", rig.control.addr.to_string())
            .header("authorization", bearer(token))
            .body(empty())
            .unwrap();
        let reply = H1::connect(rig.control.addr).await.request(req).await;
        assert_eq!(reply.status, status, "{token}: {}", reply.text());
    }
    // The page itself holds no data: served without a token.
    assert_eq!(rig.control.get("/ui").await.status, StatusCode::OK);

    let browser = Browser::open(&format!("{}/ui", rig.control.url())).await;
    let mut tab = browser.tab("/ui").await;
    // No token yet: a login prompt, and no service data.
    tab.until(
        "the login prompt",
        "!document.getElementById('login').hidden && document.querySelectorAll('section.service').length === 0",
    )
    .await;
    // A wrong token: refused, still no data.
    tab.eval("document.getElementById('token').value = 'wrong'; document.getElementById('login').requestSubmit(); true").await;
    tab.until(
        "the token refused",
        "document.getElementById('login-why').textContent.includes('refused') && document.querySelectorAll('section.service').length === 0",
    )
    .await;
    // The right one: the service, its subsets at 50 %, the gate.
    tab.eval(&format!("document.getElementById('token').value = '{OPERATOR}'; document.getElementById('login').requestSubmit(); true")).await;
    tab.until(
        "the service at its gate",
        "document.querySelector('section[data-service=\"s\"] [data-phase=\"paused\"]') !== null && document.querySelectorAll('tr[data-subset] td.weight[data-weight=\"50\"]').length === 2 && document.querySelector('.chart .uplot canvas') !== null",
    )
    .await;

    // An action with a wrong token: refused like the CLI, nothing changes.
    let before = rig.split().await;
    tab.eval("sessionStorage.setItem('almond-token', 'wrong'); document.querySelector('button[data-action=\"rollback\"][data-service=\"s\"]').click(); true").await;
    tab.until(
        "the refusal",
        "document.getElementById('message').textContent.includes('rollback refused (403): token refused')",
    )
    .await;
    assert_eq!(rig.rollout().await["phase"], "paused");
    assert_eq!(rig.split().await, before);
    assert_eq!(before, json!({ "v1": 50, "v2": 50 }));
    let refused = control_metric(
        &rig.control,
        "almond_control_refused_total",
        &[("request", "change")],
    )
    .await;
    assert_eq!(refused, 1.0);

    // The same click path with the right token passes the gate.
    tab.eval(&format!("sessionStorage.setItem('almond-token', '{OPERATOR}'); document.querySelector('button[data-action=\"approve\"][data-service=\"s\"]').click(); true")).await;
    tab.until(
        "the approval",
        "document.getElementById('message').textContent.includes('approve done')",
    )
    .await;
    let r = rig.wait_phase("succeeded").await;
    assert_eq!(r["spec"]["canary"], "v2");
    assert_eq!(rig.split().await, json!({ "v1": 0, "v2": 100 }));
}

/// The "Live requests" panel: with the operator token configured (the
/// page sends the one it holds), it streams the service's requests newest
/// first, with the right path and status; a path or status filter hides
/// the others; closing the panel ends the tap at the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_requests_panel_shows_the_tap_and_filters_it() {
    if !have_chromium() {
        return;
    }
    let ok = Backend::start("v1").await;
    let missing = Backend::builder("v2").status(404).start().await;
    let registry = Registry::new();
    registry.service("s", &[(ok.addr, "v1"), (missing.addr, "v2")]);
    let var = "ALMOND_T_DASHBOARD_TAP_TOKEN";
    std::env::set_var(var, OPERATOR);
    let control = TestControl::start(&registry.control_yaml(Some(var))).await;
    let proxy = start_following_token(&control.url(), var).await;
    eventually("the control plane knows the proxy", || async {
        !control
            .state
            .proxy_admins(almond_control::state::PROXY_STALE)
            .is_empty()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, addr) = (stop.clone(), proxy.addr());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for path in ["/a", "/b/x"] {
                    let _ = get_h1(addr, "s", path).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let browser = Browser::open(&format!("{}/ui", control.url())).await;
    let mut tab = browser.tab("/ui").await;
    tab.until(
        "the login prompt",
        "!document.getElementById('login').hidden",
    )
    .await;
    tab.eval(&format!("document.getElementById('token').value = '{OPERATOR}'; document.getElementById('login').requestSubmit(); true")).await;
    tab.until(
        "the service",
        "document.querySelector('button[data-action=\"tap\"][data-service=\"s\"]') !== null",
    )
    .await;
    tab.eval(
        "document.querySelector('button[data-action=\"tap\"][data-service=\"s\"]').click(); true",
    )
    .await;
    let rows = "Array.from(document.querySelectorAll('.tap[data-service=\"s\"] tbody tr'))";
    // Both paths, each with its status and subset; no headers column.
    tab.until(
        "rows of both paths, the newest 200 at most",
        &format!(
            "{rows}.some(r => r.dataset.path === '/a' && r.dataset.status === '200' && r.dataset.subset === 'v1') && \
             {rows}.some(r => r.dataset.path === '/b/x' && r.dataset.status === '404' && r.dataset.subset === 'v2')"
        ),
    )
    .await;
    let cells = tab
        .eval(&format!("{rows}.every(r => r.cells.length === 9 && {rows}.length <= 200 && r.cells[3].textContent === r.dataset.path && r.cells[4].textContent === r.dataset.status)"))
        .await;
    assert_eq!(cells, json!(true));
    let state = tab
        .eval("document.querySelector('.tap[data-service=\"s\"] .tap-state').textContent")
        .await;
    assert_eq!(state, json!("live from 1 proxies"));
    // Newest first.
    let newest_first = tab
        .eval(&format!("(() => {{ const t = {rows}.map(r => r.cells[0].textContent); return t.length >= 2 && t[0] >= t[t.length - 1]; }})()"))
        .await;
    assert_eq!(newest_first, json!(true));

    // A path filter: only /b rows.
    let filter = |key: &str, value: &str| {
        format!("(() => {{ const p = document.querySelector('.tap[data-service=\"s\"]'); p.querySelectorAll('input[type=text]').forEach(i => i.value = ''); p.querySelector('input[data-tap=\"{key}\"]').value = '{value}'; p.querySelector('form').requestSubmit(); return true; }})()")
    };
    tab.eval(&filter("path", "/b")).await;
    tab.until(
        "only /b rows",
        &format!("{rows}.length >= 3 && {rows}.every(r => r.dataset.path === '/b/x')"),
    )
    .await;
    // A status filter: only the 4xx.
    tab.eval(&filter("status", "4xx")).await;
    tab.until(
        "only 404 rows",
        &format!("{rows}.length >= 3 && {rows}.every(r => r.dataset.status === '404')"),
    )
    .await;
    // A subset filter: only v1 (the paths go to either subset).
    tab.eval(&filter("subset", "v1")).await;
    tab.until(
        "only v1 rows",
        &format!("{rows}.length >= 3 && {rows}.every(r => r.dataset.subset === 'v1' && r.dataset.status === '200')"),
    )
    .await;

    // Headers only when asked for.
    tab.eval("(() => { const p = document.querySelector('.tap[data-service=\"s\"]'); p.querySelector('input[data-tap=\"headers\"]').checked = true; p.querySelector('form').requestSubmit(); return true; })()").await;
    tab.until(
        "rows with their headers",
        &format!("{rows}.length >= 1 && {rows}.every(r => r.cells.length === 10 && r.cells[9].textContent.includes('host: s'))"),
    )
    .await;

    // Closing the panel ends the tap: the proxy stops sending summaries.
    tab.eval(
        "document.querySelector('button[data-action=\"tap\"][data-service=\"s\"]').click(); true",
    )
    .await;
    eventually("the proxy's tap goes quiet", || async {
        let before = proxy_metric(&proxy, "almond_tap_events_total", &[]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy_metric(&proxy, "almond_tap_events_total", &[]).await == before
    })
    .await;
    let hidden = tab
        .eval("document.querySelector('.tap[data-service=\"s\"]').hidden")
        .await;
    assert_eq!(hidden, json!(true));
    stop.store(true, Ordering::SeqCst);
    traffic.abort();
}

/// The shift inputs follow the weights in force when the operator is not
/// typing in them: after the rollout moves on (approved at its gate,
/// promoted), they show the new weights, not the 50/50 they were filled
/// with (a "shift weights" click would have sent those back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shift_inputs_follow_the_weights_in_force() {
    if !have_chromium() {
        return;
    }
    let rig = Rig::start(None).await;
    let browser = Browser::open(&format!("{}/ui", rig.control.url())).await;
    let mut tab = browser.tab("/ui").await;
    let inputs = "[...document.querySelectorAll('section[data-service=\"s\"] input[data-subset]')].map(i => i.dataset.subset + '=' + i.value).join(',')";
    tab.until(
        "the shift inputs at 50/50",
        &format!("{inputs} === 'v1=50,v2=50'"),
    )
    .await;
    let reply = rig
        .control
        .send(
            Method::POST,
            "/v1/services/s/rollouts/approve",
            &json!({}),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    rig.wait_phase("succeeded").await;
    tab.until(
        "the shift inputs at the promoted weights",
        &format!("{inputs} === 'v1=0,v2=100'"),
    )
    .await;
    tab.until(
        "the rollout line says where the canary is",
        "document.querySelector('section[data-service=\"s\"]').textContent.includes('(100% canary;')",
    )
    .await;

    // Two shifts in a row from the button, which keeps the focus after a
    // click as in a real browser: the page takes up the version the first
    // made, and the second is sent with it, not refused as stale.
    let shift_to = |v1: u32, v2: u32| {
        format!(
            "(() => {{ for (const i of document.querySelectorAll('section[data-service=\"s\"] input[data-subset]')) \
               i.value = i.dataset.subset === 'v1' ? '{v1}' : '{v2}'; \
             const b = document.querySelector('button[data-action=\"shift\"][data-service=\"s\"]'); \
             b.focus(); b.click(); return document.activeElement === b; }})()"
        )
    };
    for (v1, v2) in [(70, 30), (40, 60)] {
        // The version the page will send is the one in force (the
        // rollout's end may have written the policy once more).
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let version = rig.control.service("s").await["policy"]["version"].to_string();
            let shown = tab
                .eval(
                    "document.querySelector('section[data-service=\"s\"] .shift').dataset.version",
                )
                .await;
            if shown == json!(version) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the page shows version {shown}, the policy is at {version}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(tab.eval(&shift_to(v1, v2)).await, json!(true));
        eventually("the shift is in force", || async {
            rig.split().await == json!({ "v1": v1, "v2": v2 })
        })
        .await;
        tab.until(
            "the page says the shift was done",
            "document.getElementById('message').textContent.endsWith(' done')",
        )
        .await;
    }
}
