//! `almond demo`: demo services in versions, the control plane on its file
//! registry, a proxy following it, a steady trickle of traffic and a live
//! one-line-per-second summary; a good release (v2) rolled out in steps the
//! watcher judges, with the `almond status` table (live, from the proxy's
//! metrics) printed at 10 % and after promotion, so the traffic move shows;
//! then a bad release (v3) that the watcher rolls back. The dashboard's
//! URL (`/ui` on the control plane) is printed first.

use almond_config::ProxyConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// Per-subset tallies for the current second (the demo's own client side).
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u64>,
}

/// Runs the demo for `duration`, or until Ctrl-C.
pub async fn run(duration: Option<Duration>, rate: u32, step_secs: u64) -> anyhow::Result<()> {
    // Two versions of a service: v1 on two instances, v2 (the canary) on
    // one, all as fast (the judge compares latency distributions: a canary
    // slower in most request pairs fails, as it should).
    let mut endpoints = Vec::new();
    for (subset, delay_ms) in [("v1", 3), ("v1", 3), ("v2", 3)] {
        let addr = backend(subset, delay_ms, 0).await?;
        endpoints.push(format!("    - {{ addr: \"{addr}\", subset: {subset} }}"));
    }

    // The control plane on its file registry (no Consul).
    let dir = std::env::temp_dir().join(format!("almond-demo-{}", std::process::id()));
    // Ctrl-C and SIGTERM are listened for from here on, so one that comes
    // while a table prints is not lost (it ends the demo at the next tick).
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let registry = dir.join("registry");
    std::fs::create_dir_all(&registry)?;
    // Removed however the demo ends: a stop, an error, a signal.
    let _scratch = Scratch(dir.clone());
    std::fs::write(
        registry.join("demo.yaml"),
        format!("demo:\n  endpoints:\n{}\n", endpoints.join("\n")),
    )?;
    // The usual ports when they are free, else any: bound at once, kept
    // (a port seen free and bound later may be taken meanwhile, by a
    // second demo say).
    let control_listener = match TcpListener::bind("127.0.0.1:4180").await {
        Ok(l) => l,
        Err(_) => TcpListener::bind("127.0.0.1:0").await?,
    };
    let control_addr = control_listener.local_addr()?;
    let control_yaml = format!(
        "listen: \"{control_addr}\"\nsource:\n  file: \"{}\"\npolicy_file: \"{}\"\n",
        registry.display(),
        dir.join("policy.json").display()
    );
    let control_cfg = almond_config::load_control(&control_yaml, "demo control config")?;
    let control_url = format!("http://{}", control_listener.local_addr()?);
    // The dashboard first: the rest of the demo is easier watched there.
    println!("almond demo: dashboard at {control_url}/ui (open it in a browser)");
    let control = almond_control::Control::new(control_cfg)?;
    let (control_stop, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control_task = tokio::spawn(control.run(control_listener, async {
        let _ = control_stopped.await;
    }));

    // The proxy, following the control plane.
    let proxy_config = |listen: &str, admin: &str| {
        let yaml = format!(
            "admin: \"{admin}\"\ncontrol: {control_url}\nproxy_id: demo\ncache: \"{}\"\nlisteners:\n  - bind: \"{listen}\"\n",
            dir.join("snapshot.json").display()
        );
        almond_config::load_proxy(&yaml, "demo proxy config")
    };
    // The proxy's listeners take a port another socket shares
    // (`SO_REUSEPORT`): its usual ports only if no one holds them, which a
    // plain bind tells (a second demo's proxy would get half of the
    // traffic); any if taken even so.
    let listen = free_or_any("127.0.0.1:4140").await;
    let admin = free_or_any("127.0.0.1:4191").await;
    let config: ProxyConfig = proxy_config(&listen, &admin)?;
    let (config, bound) = match almond_proxy::Bound::bind(&config) {
        Ok(bound) => (config, bound),
        Err(_) => {
            let config = proxy_config("127.0.0.1:0", "127.0.0.1:0")?;
            let bound = almond_proxy::Bound::bind(&config)?;
            (config, bound)
        }
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let proxy_addr = bound.listener_addrs().first().copied().unwrap_or(any);
    let admin_addr = bound.admin_addr().unwrap_or(any);
    let proxy = almond_proxy::Proxy::new(config)?;
    let shared = proxy.shared().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.run(bound, async {
        let _ = stop_rx.await;
    }));
    let ready_by = Instant::now() + Duration::from_secs(10);
    while !shared.ready.load(std::sync::atomic::Ordering::Acquire) {
        if Instant::now() > ready_by {
            anyhow::bail!("the demo proxy did not get its first snapshot in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("almond demo: service `demo`, v1 on 2 endpoints, v2 (the canary) on 1");
    println!("  proxy:   curl -H 'Host: demo' http://{proxy_addr}/");
    println!("  metrics: curl http://{admin_addr}/metrics");
    println!("  control: almond status --control {control_url}");
    println!("  dashboard: {control_url}/ui");
    println!("  Ctrl-C to stop\n");
    let ops = crate::ops::Target {
        control: control_url.clone(),
        control_ca: None,
        token: None,
        json: false,
    };
    // Act 1: a good release, v2, rolled out in steps the watcher judges.
    println!(
        "demo: rolling out v2 (10% -> 50% -> 100%, {step_secs}s a step, judged by the watcher)"
    );
    crate::ops::rollout(&ops, "demo", rollout_spec("v2", "v1", step_secs)).await?;
    let mut act = 1;
    let mut last_seen = String::new();

    let tallies: Arc<Mutex<BTreeMap<String, Tally>>> = Arc::default();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let traffic = {
        let tallies = tallies.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            loop {
                tick.tick().await;
                let client = client.clone();
                let tallies = tallies.clone();
                tokio::spawn(async move { one_request(&client, proxy_addr, &tallies).await });
            }
        })
    };

    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    let mut shown_canary = false;
    let mut last_summary = Instant::now();
    loop {
        tokio::select! {
            _ = every.tick() => {
                print_summary(started.elapsed(), last_summary.elapsed(), &tallies);
                last_summary = Instant::now();
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        // Follow the rollout; print each verdict as it lands.
        let (phase, seen) = rollout_progress(&ops).await;
        if seen != last_seen && !seen.is_empty() {
            println!("demo: {seen}");
            last_seen = seen;
        }
        // The control plane's live view (what `almond status` prints):
        // once with v2 at 10 %, once after it is promoted.
        if act == 1 && !shown_canary && phase == "running" {
            shown_canary = true;
            print_status(&ops, "v2 at 10%").await;
        }
        if act == 1 && phase == "succeeded" {
            print_status(&ops, "v2 promoted to 100%").await;
            // Act 2: a bad release, v3 (30% of its answers are 500s).
            act = 2;
            let addr = backend("v3", 3, 30).await?;
            endpoints.push(format!("    - {{ addr: \"{addr}\", subset: v3 }}"));
            std::fs::write(
                registry.join("demo.yaml"),
                format!("demo:\n  endpoints:\n{}\n", endpoints.join("\n")),
            )?;
            // The control plane reads the file once it has held still for
            // a poll: wait until it serves v3, on a slow machine too.
            wait_for_subset(&ops, "demo", "v3").await?;
            println!(
                "demo: rolling out v3, a bad build; the watcher should roll it back by itself"
            );
            crate::ops::rollout(&ops, "demo", rollout_spec("v3", "v2", step_secs)).await?;
        } else if act == 2 && phase == "rolled_back" {
            act = 3;
            println!("demo: v3 was rolled back by the watcher; all traffic is on v2 again");
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    traffic.abort();
    let _ = stop_tx.send(());
    let _ = proxy_task.await;
    let _ = control_stop.send(());
    let _ = control_task.await;
    println!("demo stopped");
    Ok(())
}

/// The demo's scratch directory, removed when the demo ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn one_request(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    tallies: &Mutex<BTreeMap<String, Tally>>,
) {
    let req = Request::get(format!("http://{proxy}/"))
        .header("host", "demo")
        .body(Full::new(Bytes::new()));
    let Ok(req) = req else { return };
    let start = Instant::now();
    let result = client.request(req).await;
    let (subset, ok) = match result {
        Ok(resp) => {
            let subset = resp
                .headers()
                .get("x-demo-subset")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            (subset, ok)
        }
        Err(_) => ("?".to_owned(), false),
    };
    let us = start.elapsed().as_micros() as u64;
    if let Ok(mut t) = tallies.lock() {
        let t = t.entry(subset).or_default();
        if ok {
            t.ok += 1;
        } else {
            t.failed += 1;
        }
        t.latencies_us.push(us);
    }
}

/// Prints `almond status demo` as measured over the next second.
async fn print_status(ops: &crate::ops::Target, when: &str) {
    let names = ["demo".to_owned()];
    match crate::ops::views(ops, &names, Some(Duration::from_secs(1))).await {
        Ok(views) => {
            let tables: Vec<String> = views.iter().map(crate::ops::table).collect();
            println!(
                "demo: {when}; almond status demo (live, from the proxy's metrics):\n{}",
                tables.join("\n").trim_end()
            );
        }
        Err(e) => println!("demo: {when}; almond status failed: {e:#}"),
    }
}

/// One line: per subset, requests per second since the last line
/// (`since`), success rate and p99 as the demo's client saw them.
fn print_summary(elapsed: Duration, since: Duration, tallies: &Mutex<BTreeMap<String, Tally>>) {
    let seconds = since.as_secs_f64().max(0.001);
    let taken = match tallies.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(_) => return,
    };
    let mut line = format!("t={:>3}s", elapsed.as_secs());
    for (subset, mut t) in taken {
        let total = t.ok + t.failed;
        t.latencies_us.sort_unstable();
        let p99 = t
            .latencies_us
            .get((t.latencies_us.len() * 99 / 100).min(t.latencies_us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        let success = if total > 0 {
            100.0 * t.ok as f64 / total as f64
        } else {
            0.0
        };
        line.push_str(&format!(
            "  | {subset}: {:>4.0} rps  {success:>5.1}% ok  p99 {:>6.2} ms",
            total as f64 / seconds,
            p99 as f64 / 1000.0
        ));
    }
    println!("{line}");
}

/// The demo's rollout: three steps, lenient enough for its small traffic.
fn rollout_spec(canary: &str, stable: &str, step_secs: u64) -> crate::ops::RolloutAction {
    crate::ops::RolloutAction::Start(serde_json::json!({
        "canary": canary,
        "stable": stable,
        "steps": [10, 50, 100],
        "interval_seconds": step_secs,
        "thresholds": { "min_requests": 20, "max_error_rate": 0.05, "max_p99_ratio": 3.0 },
    }))
}

/// Waits until the control plane serves `subset` of `service` (at most
/// 10 s: the file source reads a change once it has held still for a
/// poll); a rollout to a subset it does not know yet would be refused.
async fn wait_for_subset(
    ops: &crate::ops::Target,
    service: &str,
    subset: &str,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let path = format!("/v1/services/{service}");
    loop {
        let known = (ops.get(&path).await)
            .is_ok_and(|v| v["subsets"][subset]["healthy"].as_u64().unwrap_or(0) > 0);
        if known {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            anyhow::bail!("the control plane did not pick up subset {subset} of {service} in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rollout's phase, and a line about its latest verdict.
async fn rollout_progress(ops: &crate::ops::Target) -> (String, String) {
    let quiet = crate::ops::Target {
        control: ops.control.clone(),
        control_ca: None,
        token: None,
        json: true,
    };
    let Ok(r) = quiet.get("/v1/services/demo/rollouts").await else {
        return (String::new(), String::new());
    };
    let phase = r["phase"].as_str().unwrap_or("").to_owned();
    let line = match r["history"].as_array().and_then(|h| h.last()) {
        // "v2 at 10%: pass — errors 0/120 vs 1/1080, p = 1.00; p99 5.7ms vs 4.9ms"
        Some(j) => format!(
            "{} at {}%: {} — {}{} -> {}",
            r["spec"]["canary"].as_str().unwrap_or("?"),
            j["percent"],
            j["verdict"]["verdict"].as_str().unwrap_or("?"),
            j["figures"].as_str().map_or_else(
                || format!("canary {} requests", j["canary_requests"]),
                str::to_owned
            ),
            j["verdict"]["reason"]
                .as_str()
                .map(|r| format!("; {r}"))
                .unwrap_or_default(),
            phase,
        ),
        None => String::new(),
    };
    (phase, line)
}

/// A demo service instance that says which version it is; `error_percent`
/// of its answers are 500s.
async fn backend(
    subset: &'static str,
    delay_ms: u64,
    error_percent: u32,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let body = format!("hello from demo {subset} at {addr}\n");
                    let status = if fastrand::u32(..100) < error_percent {
                        500
                    } else {
                        200
                    };
                    Response::builder()
                        .status(status)
                        .header("x-demo-subset", subset)
                        .body(Full::new(Bytes::from(body)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `preferred` if no socket holds it now, else `127.0.0.1:0` (any).
async fn free_or_any(preferred: &str) -> String {
    match TcpListener::bind(preferred).await {
        Ok(_) => preferred.to_owned(),
        Err(_) => "127.0.0.1:0".to_owned(),
    }
}
