//! Rollout benchmark (issue 23): the time to roll a bad canary back, and
//! how often a healthy one is promoted, at full scale on one machine: an
//! in-process control plane (file registry) and proxy, three real backends
//! (v1 twice, the canary v2 once), 200 requests a second through the proxy
//! (open loop), steps 10/50/100 %.
//!
//! 1. Bad: v2 answers 5 % of its requests with 500, v1 none; per run, the
//!    time from the rollout's start to the proxy's split back at 0 % for
//!    v2, and the 5xx the callers saw.
//! 2. Healthy: v2 and v1 both at 0.5 % errors; whether it is promoted.
//!
//! Figures are printed as Markdown on stdout (progress on stderr), never
//! asserted. Run in release mode:
//!
//! ```text
//! cargo bench --bench rollout
//! cargo bench --bench rollout -- --bad-runs 3 --healthy-runs 20 --interval 8 --healthy-interval 3
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{get_h1, start_following, Registry, TestControl, TestProxy};
use tokio::time::Instant;

struct Opts {
    bad_runs: usize,
    healthy_runs: usize,
    interval: f64,
    healthy_interval: f64,
    rate: u64,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            bad_runs: 3,
            healthy_runs: 20,
            interval: 8.0,
            healthy_interval: 3.0,
            rate: 200,
        };
        let args: Vec<String> = std::env::args().collect();
        let mut i = 1;
        while i < args.len() {
            let v = args.get(i + 1).cloned().unwrap_or_default();
            match args[i].as_str() {
                "--bad-runs" => o.bad_runs = v.parse().unwrap(),
                "--healthy-runs" => o.healthy_runs = v.parse().unwrap(),
                "--interval" => o.interval = v.parse().unwrap(),
                "--healthy-interval" => o.healthy_interval = v.parse().unwrap(),
                "--rate" => o.rate = v.parse().unwrap(),
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        o
    }
}

/// A backend answering 200, or 500 for `fail_per_mille` of requests.
async fn backend(fail_per_mille: u32) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let status = if fastrand::u32(..1000) < fail_per_mille {
                        500
                    } else {
                        200
                    };
                    http::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"ok\n")))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The proxy's weight for `subset` of service `s`.
async fn weight(proxy: &TestProxy, subset: &str) -> f64 {
    let text = proxy.admin_get("/metrics").await.text();
    support::metric(
        &text,
        "almond_split_weight",
        &[("service", "s"), ("subset", subset)],
    )
}

struct Run {
    /// Rollout start to v2 at 0 % in the proxy (bad) or to "succeeded".
    took: Duration,
    phase: String,
    failed: u64,
    sent: u64,
}

async fn one_run(v1_fail: u32, v2_fail: u32, interval: f64, rate: u64) -> Run {
    let registry = Registry::new();
    let (a, b, c) = (
        backend(v1_fail).await,
        backend(v1_fail).await,
        backend(v2_fail).await,
    );
    registry.service("s", &[(a, "v1"), (b, "v1"), (c, "v2")]);
    let control = TestControl::start(&registry.control_yaml(None)).await;
    let reply = control
        .put_split("s", &json!({ "weights": { "v1": 100, "v2": 0 } }), None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let proxy = start_following(&control.url(), None).await;
    let addr = proxy.addr();
    while get_h1(addr, "s", "/").await.status != 200 {}
    // Wait until the watcher can scrape the proxy.
    while control.get("/v1/proxies").await.json()["test-proxy"]["admin"].is_null() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Open-loop traffic: one request every 1/rate s, each on its own task.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let in_flight = Arc::new(AtomicU32::new(0));
    let load = {
        let (stop, sent, failed, in_flight) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if in_flight.load(Ordering::Relaxed) > 512 {
                    continue;
                }
                let (sent, failed, in_flight) = (sent.clone(), failed.clone(), in_flight.clone());
                in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let reply = get_h1(addr, "s", "/").await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if reply.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent0, failed0) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let spec = json!({
        "canary": "v2", "stable": "v1", "steps": [10, 50, 100],
        "interval_seconds": interval,
    });
    let started = Instant::now();
    let reply = control
        .send(http::Method::POST, "/v1/services/s/rollouts", &spec, None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let deadline = started + Duration::from_secs_f64(interval * 8.0 + 10.0);
    let mut canary_seen = false;
    let phase = loop {
        let r = control.get("/v1/services/s/rollouts").await.json();
        let phase = r["phase"].as_str().unwrap_or("").to_owned();
        let w = weight(&proxy, "v2").await;
        canary_seen |= w > 0.0;
        let done = match phase.as_str() {
            "succeeded" => true,
            "rolled_back" | "aborted" => canary_seen && w == 0.0,
            _ => false,
        };
        if done || Instant::now() > deadline {
            break phase;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = Run {
        took,
        phase,
        failed: failed.load(Ordering::Relaxed) - failed0,
        sent: sent.load(Ordering::Relaxed) - sent0,
    };
    control.shutdown().await;
    run
}

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "## Bad canary: 5 % errors (stable 0 %), {} rps, steps 10/50/100 of {} s\n",
            opts.rate, opts.interval
        );
        println!("| run | outcome | rollout start to v2 at 0 % | failed requests | requests |");
        println!("|---|---|---|---|---|");
        for i in 1..=opts.bad_runs {
            let r = one_run(0, 50, opts.interval, opts.rate).await;
            eprintln!(
                "bad run {i}: {} in {:?}, {} failed",
                r.phase, r.took, r.failed
            );
            println!(
                "| {i} | {} | {:.1} s | {} | {} |",
                r.phase,
                r.took.as_secs_f64(),
                r.failed,
                r.sent
            );
        }
        println!(
            "\n## Healthy canary: 0.5 % errors like stable, {} rps, steps 10/50/100 of {} s\n",
            opts.rate, opts.healthy_interval
        );
        let mut promoted = 0;
        let mut outcomes = Vec::new();
        for i in 1..=opts.healthy_runs {
            let r = one_run(5, 5, opts.healthy_interval, opts.rate).await;
            eprintln!("healthy run {i}: {} in {:?}", r.phase, r.took);
            if r.phase == "succeeded" {
                promoted += 1;
            }
            outcomes.push(format!("{} ({:.1} s)", r.phase, r.took.as_secs_f64()));
        }
        println!(
            "promoted in **{promoted} of {}** runs: {}",
            opts.healthy_runs,
            outcomes.join(", ")
        );
    });
}
