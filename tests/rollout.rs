//! End to end, staged rollouts: the control plane (file registry, policy
//! file) with its watcher, a proxy following it in-process, stable
//! backends, a canary backend that can be told to fail a share of its
//! requests or to answer slowly, and steady background traffic through the
//! proxy. The watcher scrapes the proxy's `/metrics`, judges each step and
//! moves the split; these tests watch the split at the proxy, the traffic
//! at the backends, the rollout's record and the control plane's metrics.
//!
//! Nothing here asserts a duration: every wait is "until it happens", with
//! a generous deadline for a loaded two-core machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a whole rollout may take before a test fails: each step needs
/// an interval, a tick of the watcher and a long-poll, and may be judged
/// inconclusive a few times when a loaded machine sends little traffic.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(150);

// ---------------------------------------------------------------------------
// The canary backend: fails a share of its requests, or answers slowly
// ---------------------------------------------------------------------------

#[derive(Default)]
struct CanaryState {
    requests: AtomicU64,
    failures: AtomicU64,
    /// Percent of requests answered 500, spread evenly (never a run of
    /// failures long enough to trip the proxy's circuit breaker).
    fail_percent: AtomicU32,
    /// Added before every answer.
    delay_ms: AtomicU64,
    /// When it sent its first 500.
    first_failure: Mutex<Option<(Instant, SystemTime)>>,
}

/// The new version's backend (`x-backend: v2`).
struct CanaryBackend {
    addr: SocketAddr,
    state: Arc<CanaryState>,
    task: JoinHandle<()>,
}

impl CanaryBackend {
    async fn start(name: &'static str) -> CanaryBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(CanaryState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let state = state.clone();
                        async move { canary_answer(name, &state).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        CanaryBackend { addr, state, task }
    }

    /// From now on `percent` of its answers are 500s.
    fn fail_percent(&self, percent: u32) {
        self.state.fail_percent.store(percent, Ordering::SeqCst);
    }

    /// From now on every answer waits `delay` first.
    fn delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests that reached it.
    fn count(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// When it sent its first 500 (monotonic and wall clock).
    fn first_failure(&self) -> Option<(Instant, SystemTime)> {
        *self.state.first_failure.lock().unwrap()
    }
}

impl Drop for CanaryBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn canary_answer(
    name: &'static str,
    state: &CanaryState,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let p = u64::from(state.fail_percent.load(Ordering::SeqCst));
    // Request n fails when the running count of failures owed goes up:
    // exactly p % over any long run, evenly spread.
    let fail = (n + 1) * p / 100 > n * p / 100;
    let status = if fail {
        state.failures.fetch_add(1, Ordering::SeqCst);
        let mut first = state.first_failure.lock().unwrap();
        first.get_or_insert_with(|| (Instant::now(), SystemTime::now()));
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    Ok(Response::builder()
        .status(status)
        .header("x-backend", name)
        .body(Full::new(Bytes::from(format!("{name} says {status}\n"))))
        .unwrap())
}

// ---------------------------------------------------------------------------
// Background traffic through the proxy
// ---------------------------------------------------------------------------

/// Concurrent clients, each with a pause between requests.
const TRAFFIC_WORKERS: usize = 3;
const TRAFFIC_PAUSE: Duration = Duration::from_millis(10);
/// Bounds: no test sends traffic longer or more than this.
const TRAFFIC_MAX_TIME: Duration = Duration::from_secs(240);
const TRAFFIC_MAX_REQUESTS: u64 = 200_000;

/// Steady traffic to service `s` through a proxy, tallied by the backend
/// that answered (`x-backend`); stops when dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    by_backend: Arc<Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(proxy: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let by_backend: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let started = Instant::now();
        let tasks = (0..TRAFFIC_WORKERS)
            .map(|_| {
                let (stop, answered, failed, by_backend) = (
                    stop.clone(),
                    answered.clone(),
                    failed.clone(),
                    by_backend.clone(),
                );
                tokio::spawn(async move {
                    let client: Client<HttpConnector, Empty<Bytes>> =
                        Client::builder(TokioExecutor::new()).build_http();
                    while !stop.load(Ordering::SeqCst)
                        && started.elapsed() < TRAFFIC_MAX_TIME
                        && answered.load(Ordering::SeqCst) < TRAFFIC_MAX_REQUESTS
                    {
                        let req = Request::get(format!("http://{proxy}/"))
                            .header("host", "s")
                            .body(Empty::new())
                            .unwrap();
                        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                            let resp = client.request(req).await.ok()?;
                            let backend = resp
                                .headers()
                                .get("x-backend")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("(none)")
                                .to_owned();
                            let ok = resp.status().is_success();
                            resp.into_body().collect().await.ok()?;
                            Some((backend, ok))
                        })
                        .await;
                        let (backend, ok) = match outcome {
                            Ok(Some(answer)) => answer,
                            _ => ("(error)".to_owned(), false),
                        };
                        if !ok {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        *by_backend.lock().unwrap().entry(backend).or_default() += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(TRAFFIC_PAUSE).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            answered,
            failed,
            by_backend,
            tasks,
        }
    }

    /// Requests answered so far (any status).
    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Answers by backend so far.
    fn by_backend(&self) -> BTreeMap<String, u64> {
        self.by_backend.lock().unwrap().clone()
    }

    /// Waits until `n` more requests have been answered.
    async fn after(&self, n: u64) {
        let target = self.answered() + n;
        wait_until(
            &format!("{n} more requests through the proxy"),
            ROLLOUT_DEADLINE,
            || async { (self.answered() >= target).then_some(()) },
        )
        .await;
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Answers by backend between two tallies: (v1 share..., canary share).
fn canary_share(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (u64, f64) {
    let diff = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let canary = diff("v2");
    let stable = diff("v1a") + diff("v1b");
    let total = canary + stable;
    let share = if total == 0 {
        0.0
    } else {
        canary as f64 / total as f64
    };
    (total, share)
}

// ---------------------------------------------------------------------------
// The rig: backends, registry, control plane, proxy
// ---------------------------------------------------------------------------

/// Service `s`: stable subset v1 on two backends with all the traffic, and
/// canary subset v2 on one (0 % until a rollout moves it); the control
/// plane on a file registry and policy file; a proxy following it that the
/// control plane knows (so its watcher scrapes it).
struct Rig {
    v1a: Backend,
    v1b: Backend,
    v2: CanaryBackend,
    registry: Registry,
    control: TestControl,
    proxy: TestProxy,
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with("").await
    }

    /// `extra`: more control-plane config (e.g. the watcher's source).
    async fn start_with(extra: &str) -> Rig {
        let v1a = Backend::start("v1a").await;
        let v1b = Backend::start("v1b").await;
        let v2 = CanaryBackend::start("v2").await;
        let registry = Registry::new();
        registry.service("s", &[(v1a.addr, "v1"), (v1b.addr, "v1"), (v2.addr, "v2")]);
        let yaml = format!("{}{extra}", registry.control_yaml(None));
        let control = TestControl::start(&yaml).await;
        // Before the release all traffic is on stable.
        let reply = control
            .put_split("s", &json!({ "weights": { "v1": 100, "v2": 0 } }), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let proxy = start_following(&control.url(), None).await;
        eventually("the proxy has the 100/0 split", || async {
            weight(&proxy, "v1").await == 100.0 && weight(&proxy, "v2").await == 0.0
        })
        .await;
        let admin = proxy.admin.to_string();
        eventually(
            "the control plane knows the proxy's admin address",
            || async {
                control.get("/v1/proxies").await.json()["test-proxy"]["admin"] == admin.as_str()
            },
        )
        .await;
        let reply = get_h1(proxy.addr(), "s", "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.backend().starts_with("v1"), "{}", reply.backend());
        assert_eq!(v2.count(), 0, "no traffic on the canary before the rollout");
        Rig {
            v1a,
            v1b,
            v2,
            registry,
            control,
            proxy,
        }
    }

    fn traffic(&self) -> Traffic {
        Traffic::start(self.proxy.addr())
    }

    async fn post_rollout(&self, spec: &Value) -> Reply {
        self.control
            .send(Method::POST, "/v1/services/s/rollouts", spec, None)
            .await
    }

    /// Starts a rollout; it must be accepted.
    async fn start_rollout(&self, spec: &Value) -> Value {
        let reply = self.post_rollout(spec).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }
}

/// The rollout spec of these tests: v2 over v1, lenient thresholds for
/// test-sized traffic.
fn spec(steps: &[u32], interval_seconds: f64) -> Value {
    json!({
        "canary": "v2",
        "stable": "v1",
        "steps": steps,
        "interval_seconds": interval_seconds,
        "thresholds": { "min_requests": 10, "max_error_rate": 0.05 },
    })
}

/// Polls `f` every 10 ms until it gives a value; fails after `deadline`.
/// The kinds of a `GET .../events` answer, inconclusive steps left out
/// (how many there are depends on timing).
fn event_kinds(events: &Value) -> Vec<String> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .filter(|k| k != "step_inconclusive")
        .collect()
}

async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET /v1/services/s/rollouts` (it must exist).
async fn rollout(control: &TestControl) -> Value {
    let reply = control.get("/v1/services/s/rollouts").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// Waits until the rollout satisfies `cond`; the failure shows the last
/// rollout seen.
async fn wait_rollout(control: &TestControl, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + ROLLOUT_DEADLINE;
    loop {
        let reply = control.get("/v1/services/s/rollouts").await;
        if reply.status == StatusCode::OK {
            let r = reply.json();
            if cond(&r) {
                return r;
            }
            assert!(
                Instant::now() < until,
                "never happened: {what}; the rollout is now:\n{r:#}"
            );
        } else {
            assert!(Instant::now() < until, "never happened: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_phase(control: &TestControl, phase: &str) -> Value {
    wait_rollout(control, &format!("the rollout is {phase}"), |r| {
        r["phase"] == phase
    })
    .await
}

/// The proxy's `almond_split_weight` of subset `subset` of `s`.
async fn weight(proxy: &TestProxy, subset: &str) -> f64 {
    proxy_metric(
        proxy,
        "almond_split_weight",
        &[("service", "s"), ("subset", subset)],
    )
    .await
}

/// Waits until the proxy routes `percent` % to the canary (and the rest to
/// stable); returns when that was first seen.
async fn wait_canary_percent(proxy: &TestProxy, percent: u32) -> Instant {
    wait_until(
        &format!("the proxy's split is {percent}% canary"),
        ROLLOUT_DEADLINE,
        || async {
            let text = proxy.admin_get("/metrics").await.text();
            let seen = Instant::now();
            let w = |subset| {
                metric(
                    &text,
                    "almond_split_weight",
                    &[("service", "s"), ("subset", subset)],
                )
            };
            (w("v2") == f64::from(percent) && w("v1") == f64::from(100 - percent)).then_some(seen)
        },
    )
    .await
}

/// A sample of the control plane's `/metrics` for service `s`.
async fn control_metric(control: &TestControl, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = control.get("/metrics").await.text();
    let mut all = vec![("service", "s")];
    all.extend_from_slice(labels);
    metric(&text, name, &all)
}

/// The verdicts of a rollout's history: (percent, verdict, reason).
fn verdicts(r: &Value) -> Vec<(u64, String, String)> {
    r["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {r:#}"))
        .iter()
        .map(|j| {
            (
                j["percent"].as_u64().unwrap(),
                j["verdict"]["verdict"].as_str().unwrap().to_owned(),
                j["verdict"]["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Percents of the steps that passed, in order.
fn passes(r: &Value) -> Vec<u64> {
    verdicts(r)
        .into_iter()
        .filter(|v| v.1 == "pass")
        .map(|v| v.0)
        .collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------------------
// 1. A good canary
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_canary_goes_10_50_100_and_succeeds() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    let started = rig.start_rollout(&spec(&[10, 50, 100], 2.0)).await;
    assert_eq!(
        started["policy"]["rollout"]["phase"], "running",
        "{started}"
    );
    assert_eq!(started["policy"]["split"], json!({ "v1": 90, "v2": 10 }));

    // The proxy's split follows each step; the backends see the share.
    for (i, step) in [10u32, 50, 100].into_iter().enumerate() {
        wait_canary_percent(&rig.proxy, step).await;
        let before = traffic.by_backend();
        let last = i == 2;
        // The step lasts until the split moves on (or the rollout ends).
        wait_until(
            &format!("the {step}% step ends"),
            ROLLOUT_DEADLINE,
            || async {
                let moved = weight(&rig.proxy, "v2").await != f64::from(step);
                let done = last && rollout(&rig.control).await["phase"] == "succeeded";
                (moved || done).then_some(())
            },
        )
        .await;
        let (total, share) = canary_share(&before, &traffic.by_backend());
        eprintln!(
            "step {step}%: {total} requests, {:.1}% at the canary",
            share * 100.0
        );
        // A step lasts its 2 s interval at least: hundreds of requests.
        assert!(total >= 50, "step {step}%: only {total} requests");
        // Five standard deviations of the binomial share, plus a few
        // requests at each edge from the neighbouring splits.
        let expected = f64::from(step) / 100.0;
        let sigma = (expected * (1.0 - expected) / total as f64).sqrt();
        let band = 5.0 * sigma + 5.0 / total as f64;
        assert!(
            (share - expected).abs() <= band,
            "step {step}%: canary share {share:.3} of {total} (band {band:.3})"
        );
    }

    let r = wait_phase(&rig.control, "succeeded").await;
    assert_eq!(r["reason"], "every step passed");
    assert_eq!(passes(&r), vec![10, 50, 100], "one pass per step: {r:#}");
    let v = verdicts(&r);
    assert!(v.iter().all(|v| v.1 != "fail"), "{r:#}");
    let inconclusive = v.iter().filter(|v| v.1 == "inconclusive").count() as f64;
    assert_eq!(
        control_metric(
            &rig.control,
            "almond_rollout_verdicts_total",
            &[("verdict", "pass")]
        )
        .await,
        3.0
    );
    assert_eq!(
        control_metric(
            &rig.control,
            "almond_rollout_verdicts_total",
            &[("verdict", "inconclusive")]
        )
        .await,
        inconclusive
    );
    assert_eq!(
        control_metric(&rig.control, "almond_rollbacks_total", &[]).await,
        0.0
    );
    assert_eq!(
        control_metric(&rig.control, "almond_rollout_step", &[]).await,
        100.0
    );
    // All traffic on the canary, and the audit trail shows every step.
    assert_eq!(weight(&rig.proxy, "v2").await, 100.0);
    assert_eq!(weight(&rig.proxy, "v1").await, 0.0);
    let policy = rig.control.service("s").await["policy"].clone();
    let actions: Vec<&str> = policy["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.ends_with(&["rollout start", "rollout step", "rollout step"]),
        "{actions:?}"
    );
    assert!(rig.v2.count() > 0);
    assert!(rig.v1a.count() + rig.v1b.count() > 0);
    eprintln!(
        "traffic: {:?}, {} failed",
        traffic.by_backend(),
        traffic.failed.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------
// 1b. Steps that stop short of 100 %
// ---------------------------------------------------------------------------

/// `--steps 10,50`: once the 50 % step passes, the canary is promoted to
/// 100 % (as Flagger and Argo Rollouts end), not left at 50/50 with the
/// rollout "succeeded".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_that_stop_short_end_promoted_to_100() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    rig.start_rollout(&spec(&[10, 50], 1.0)).await;

    let r = wait_phase(&rig.control, "succeeded").await;
    assert_eq!(passes(&r), vec![10, 50], "{r:#}");
    wait_canary_percent(&rig.proxy, 100).await;
    assert_eq!(
        rig.control.service("s").await["policy"]["split"],
        json!({ "v1": 0, "v2": 100 })
    );
    let before = traffic.by_backend();
    traffic.after(100).await;
    let (total, share) = canary_share(&before, &traffic.by_backend());
    assert!(total > 0);
    assert_eq!(share, 1.0, "all traffic on the canary");

    let events = rig.control.get("/v1/services/s/events").await.json();
    assert_eq!(
        event_kinds(&events),
        vec!["started", "step_passed", "step_passed", "promoted"],
        "{events:#}"
    );
    let promoted = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(promoted["percent"], 100, "{promoted}");
    let policy = rig.control.service("s").await["policy"].clone();
    let actions: Vec<&str> = policy["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.ends_with(&["rollout start", "rollout step", "rollout promote"]),
        "{actions:?}"
    );
    eventually("the rollout step metric shows 100 %", || async {
        control_metric(&rig.control, "almond_rollout_step", &[]).await == 100.0
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. A bad canary
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_is_rolled_back_at_the_first_step() {
    let rig = Rig::start().await;
    rig.v2.fail_percent(30);
    let traffic = rig.traffic();
    traffic.after(30).await;
    let posted = Instant::now();
    rig.start_rollout(&spec(&[10, 50, 100], 1.0)).await;
    wait_canary_percent(&rig.proxy, 10).await;

    let back_in_proxy = wait_canary_percent(&rig.proxy, 0).await;
    let (first_failure, first_failure_wall) = rig
        .v2
        .first_failure()
        .expect("the canary failed some requests");
    let r = wait_phase(&rig.control, "rolled_back").await;
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("error rate"), "{reason}");
    assert_eq!(r["step"], 0, "rolled back at the first step: {r:#}");
    let v = verdicts(&r);
    assert_eq!(v.last().unwrap().1, "fail", "{r:#}");
    assert!(v.iter().all(|v| v.0 == 10 && v.1 != "pass"), "{r:#}");
    // Counted once the watcher's write returns, which may be a moment after
    // the store's file watcher has shown the new phase.
    eventually("the rollback is counted", || async {
        control_metric(&rig.control, "almond_rollbacks_total", &[]).await == 1.0
    })
    .await;
    assert_eq!(
        control_metric(
            &rig.control,
            "almond_rollout_verdicts_total",
            &[("verdict", "fail")]
        )
        .await,
        1.0
    );
    assert_eq!(weight(&rig.proxy, "v1").await, 100.0);
    assert_eq!(
        rig.control.service("s").await["policy"]["split"],
        json!({ "v1": 100, "v2": 0 })
    );

    let judged_at = r["history"].as_array().unwrap().last().unwrap()["at"]
        .as_u64()
        .unwrap();
    eprintln!(
        "bad canary: first failing request -> rollback applied in the proxy: {:?} \
         (judged {} ms after the first failure; {:?} after the rollout was posted; \
         reason: {reason})",
        back_in_proxy.duration_since(first_failure),
        judged_at.saturating_sub(unix_ms(first_failure_wall)),
        back_in_proxy.duration_since(posted),
    );

    eprintln!(
        "bad canary: almond_rollout_step after the rollback = {}",
        control_metric(&rig.control, "almond_rollout_step", &[]).await
    );

    let events = rig.control.get("/v1/services/s/events").await.json();
    assert_eq!(
        event_kinds(&events),
        vec!["started", "step_failed", "rolled_back"],
        "{events:#}"
    );
    let failed = &events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "step_failed")
        .unwrap()["detail"];
    assert!(
        failed.as_str().unwrap().contains("errors "),
        "the figures: {failed}"
    );

    // Traffic at the canary stops (once requests already on their way
    // there have landed) while traffic goes on.
    traffic.after(100).await;
    let settled = rig.v2.count();
    traffic.after(200).await;
    assert_eq!(rig.v2.count(), settled, "the canary still gets traffic");
    let before = traffic.by_backend();
    traffic.after(100).await;
    let (total, share) = canary_share(&before, &traffic.by_backend());
    assert!(total > 0);
    assert_eq!(share, 0.0);
}

// ---------------------------------------------------------------------------
// 3. A slow canary
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_fails_on_latency() {
    let rig = Rig::start().await;
    rig.v2.delay(Duration::from_millis(100));
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mut s = spec(&[10, 50, 100], 1.0);
    s["thresholds"]["max_p99_ratio"] = json!(1.5);
    rig.start_rollout(&s).await;

    let r = wait_phase(&rig.control, "rolled_back").await;
    let reason = r["reason"].as_str().unwrap();
    eprintln!("slow canary: {reason}");
    // The rank test (Mann-Whitney) sees it first, with the p99s.
    assert!(
        reason.contains("p99") && reason.contains("slower than stable"),
        "{reason}"
    );
    assert_eq!(r["step"], 0, "{r:#}");
    wait_canary_percent(&rig.proxy, 0).await;
    eventually("the rollback is counted", || async {
        control_metric(&rig.control, "almond_rollbacks_total", &[]).await == 1.0
    })
    .await;
    // Slow, not failing: every answer was a success.
    assert_eq!(rig.v2.state.failures.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------
// 4. No traffic
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traffic_is_inconclusive_held_then_rolled_back() {
    let rig = Rig::start().await;
    let mut s = spec(&[10, 50, 100], 1.0);
    s["max_inconclusive"] = json!(3);
    rig.start_rollout(&s).await;
    wait_canary_percent(&rig.proxy, 10).await;

    // Held: inconclusive verdicts, still running at the first step.
    let held = wait_rollout(&rig.control, "an inconclusive verdict", |r| {
        !verdicts(r).is_empty()
    })
    .await;
    assert_eq!(held["phase"], "running", "{held:#}");
    assert_eq!(held["step"], 0, "{held:#}");
    assert!(verdicts(&held).iter().all(|v| v.1 == "inconclusive"));

    // ... and given up on after max_inconclusive: no data is not healthy.
    let r = wait_phase(&rig.control, "rolled_back").await;
    let v = verdicts(&r);
    assert_eq!(v.len(), 4, "{r:#}");
    assert!(
        v.iter()
            .all(|v| v.0 == 10 && v.1 == "inconclusive" && v.2.contains("no data")),
        "{r:#}"
    );
    assert!(r["history"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["canary_requests"] == 0));
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("inconclusive 4 times in a row"), "{reason}");
    wait_canary_percent(&rig.proxy, 0).await;
    let policy = rig.control.service("s").await["policy"].clone();
    let actions: Vec<&str> = policy["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.ends_with(&["rollout start", "rollout rollback"]),
        "never moved past the first step: {actions:?}"
    );
    assert_eq!(
        control_metric(
            &rig.control,
            "almond_rollout_verdicts_total",
            &[("verdict", "inconclusive")]
        )
        .await,
        4.0
    );
    assert_eq!(
        control_metric(
            &rig.control,
            "almond_rollout_verdicts_total",
            &[("verdict", "pass")]
        )
        .await,
        0.0
    );
    eventually("the rollback is counted", || async {
        control_metric(&rig.control, "almond_rollbacks_total", &[]).await == 1.0
    })
    .await;
    assert_eq!(rig.v2.count(), 0);
}

/// A step held far longer than the record keeps (no traffic, a large
/// `max_inconclusive`): the rollout keeps its newest verdicts and counts
/// them all, every verdict is still an event, and the CLI shows it and
/// aborts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_held_step_keeps_its_newest_verdicts() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    let mut s = spec(&[10, 100], 0.1);
    s["max_inconclusive"] = json!(10_000);
    rig.start_rollout(&s).await;

    wait_rollout(&rig.control, "more verdicts than are kept", |r| {
        r["verdicts"].as_u64().unwrap_or(0) > 55
    })
    .await;
    // The rollout and its events as stored together (the watcher goes on).
    let policy = rig.control.service("s").await["policy"].clone();
    let r = &policy["rollout"];
    let kept = verdicts(r);
    assert_eq!(kept.len(), 50, "{r:#}");
    assert!(kept.iter().all(|v| v.1 == "inconclusive"), "{r:#}");
    let events = policy["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds[1..].iter().all(|k| *k == "step_inconclusive"),
        "one start, then verdicts: {kinds:?}"
    );
    // One event per verdict, up to the newest: `started` was #1.
    assert_eq!(
        events.last().unwrap()["seq"].as_u64().unwrap(),
        r["verdicts"].as_u64().unwrap() + 1,
        "{kinds:?}"
    );

    let (code, out, err) = run_ops(&["rollout", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("earlier verdicts not kept"), "{out}");
    let (code, out, err) = run_ops(&["rollout", "s", "--abort", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    wait_phase(&rig.control, "aborted").await;
}

// ---------------------------------------------------------------------------
// 4b. Little traffic: windows add up; a broken canary fails at once
// ---------------------------------------------------------------------------

/// A quiet service: no window alone has the `min_requests` the canary
/// needs (200 at 10 % of at most ~300 rps over windows of under a second),
/// but the windows add up to a verdict, and the healthy canary is
/// promoted instead of rolled back as "inconclusive N times in a row".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_too_small_alone_add_up_to_a_pass() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mut s = spec(&[10, 100], 0.5);
    s["thresholds"]["min_requests"] = json!(200);
    s["max_inconclusive"] = json!(200);
    rig.start_rollout(&s).await;

    let r = wait_phase(&rig.control, "succeeded").await;
    assert_eq!(passes(&r), vec![10, 100], "{r:#}");
    let judged: Vec<(u64, String, u64)> = r["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["percent"].as_u64().unwrap(),
                j["verdict"]["verdict"].as_str().unwrap().to_owned(),
                j["canary_requests"].as_u64().unwrap(),
            )
        })
        .collect();
    let at_10: Vec<&(u64, String, u64)> = judged.iter().filter(|j| j.0 == 10).collect();
    let (pass, waited) = at_10.split_last().unwrap();
    assert!(
        pass.2 >= 200,
        "the pass judged 200 requests or more: {judged:?}"
    );
    assert!(
        !waited.is_empty(),
        "one window alone was too small: {judged:?}"
    );
    // Each inconclusive window was carried into the next judgement.
    assert!(
        at_10.windows(2).all(|w| w[0].2 <= w[1].2),
        "the judged window grows: {judged:?}"
    );
    let reasons = verdicts(&r);
    assert!(
        reasons
            .iter()
            .filter(|v| v.1 == "inconclusive")
            .all(|v| v.2.contains("too little canary traffic")),
        "{r:#}"
    );
    assert_eq!(weight(&rig.proxy, "v2").await, 100.0);
}

/// A canary failing every request fails its first window, long before
/// it has `min_requests` requests: its failures alone are conclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_every_request_fails_before_min_requests() {
    let rig = Rig::start().await;
    rig.v2.fail_percent(100);
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mut s = spec(&[10, 50, 100], 1.0);
    s["thresholds"]["min_requests"] = json!(100_000);
    s["max_inconclusive"] = json!(3);
    rig.start_rollout(&s).await;

    let r = wait_phase(&rig.control, "rolled_back").await;
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("error rate"), "{reason}");
    let v = verdicts(&r);
    assert_eq!(v.last().unwrap().1, "fail", "{r:#}");
    assert!(v.iter().all(|v| v.0 == 10 && v.1 != "pass"), "{r:#}");
    wait_canary_percent(&rig.proxy, 0).await;
}

// ---------------------------------------------------------------------------
// 5. Manual gates: approve and abort through the CLI
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_pauses_at_50_and_the_cli_approves_it() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mut s = spec(&[10, 50, 100], 1.0);
    s["pause_at"] = json!([50]);
    rig.start_rollout(&s).await;

    let paused = wait_phase(&rig.control, "paused").await;
    assert_eq!(paused["step"], 1, "{paused:#}");
    assert_eq!(passes(&paused), vec![10, 50]);
    wait_canary_percent(&rig.proxy, 50).await;
    // A paused rollout waits: more than two intervals later, nothing moved.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = rollout(&rig.control).await;
    assert_eq!(still["phase"], "paused");
    assert_eq!(still["history"], paused["history"]);
    assert_eq!(weight(&rig.proxy, "v2").await, 50.0);

    let (code, out, err) = run_ops(&["rollout", "s", "--approve", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("rollout of v2 over v1"), "{out}");
    wait_canary_percent(&rig.proxy, 100).await;
    let r = wait_phase(&rig.control, "succeeded").await;
    assert_eq!(passes(&r), vec![10, 50, 100], "{r:#}");

    // Nothing left to approve: refused, exit 1 with the reason.
    let (code, _, err) = run_ops(&["rollout", "s", "--approve", "--control", &url]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not paused"), "{err}");
}

/// A gate on the last step (`--steps 10,50 --pause-at 50`): the approval
/// is an event of its own, and promotes the canary to 100 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_a_gate_on_the_last_step_is_recorded_and_promotes() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mut s = spec(&[10, 50], 1.0);
    s["pause_at"] = json!([50]);
    rig.start_rollout(&s).await;
    wait_phase(&rig.control, "paused").await;

    let (code, out, err) = run_ops(&["rollout", "s", "--approve", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let r = wait_phase(&rig.control, "succeeded").await;
    assert_eq!(passes(&r), vec![10, 50], "{r:#}");
    wait_canary_percent(&rig.proxy, 100).await;
    let (code, out, err) = run_ops(&["events", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    let kinds: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .filter(|k| *k != "step_inconclusive")
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step_passed",
            "step_passed",
            "paused",
            "approved",
            "promoted"
        ],
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_aborts_a_rollout_back_to_stable() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    // Long steps: it is still at its first when the operator aborts.
    rig.start_rollout(&spec(&[10, 50, 100], 60.0)).await;
    wait_canary_percent(&rig.proxy, 10).await;

    let (code, out, err) = run_ops(&["rollout", "s", "--abort", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("aborted"), "{out}");
    let r = rollout(&rig.control).await;
    assert_eq!(r["phase"], "aborted", "{r:#}");
    assert!(
        r["reason"].as_str().unwrap().starts_with("aborted by"),
        "{r:#}"
    );
    wait_canary_percent(&rig.proxy, 0).await;
    assert_eq!(
        rig.control.service("s").await["policy"]["split"],
        json!({ "v1": 100, "v2": 0 })
    );
    // Stays aborted: the watcher leaves a finished rollout alone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rollout(&rig.control).await["phase"], "aborted");
    assert_eq!(weight(&rig.proxy, "v2").await, 0.0);

    let (code, _, err) = run_ops(&["rollout", "s", "--abort", "--control", &url]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already"), "{err}");

    // Started again with the same arguments: a new rollout, with its own
    // `started` event (it was taken for the aborted one).
    rig.start_rollout(&spec(&[10, 50, 100], 60.0)).await;
    wait_canary_percent(&rig.proxy, 10).await;
    let (code, out, err) = run_ops(&["events", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    let kinds: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["started", "aborted", "started"], "{out}");
}

/// During a rollout, `almond shift` is refused (the watcher would undo it
/// at its next verdict) and `almond rollback` ends the rollout, back to the
/// split before its canary, for good. After a rollout that succeeded,
/// `rollback` goes back to the split before the canary, not to the step
/// before the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_a_rollout_ends_it_and_a_shift_waits_for_it() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    rig.start_rollout(&spec(&[10, 50, 100], 60.0)).await;
    wait_canary_percent(&rig.proxy, 10).await;

    let (code, _, err) = run_ops(&["shift", "s", "v1=50", "v2=50", "--control", &url]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rollout") && err.contains("--abort"), "{err}");
    assert_eq!(rollout(&rig.control).await["phase"], "running");

    let (code, out, err) = run_ops(&["rollback", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    wait_canary_percent(&rig.proxy, 0).await;
    let r = rollout(&rig.control).await;
    assert_eq!(r["phase"], "aborted", "{r:#}");
    assert_eq!(
        rig.control.service("s").await["policy"]["split"],
        json!({ "v1": 100, "v2": 0 })
    );

    // A rollout that goes all the way: `rollback` then restores 100/0.
    let traffic = rig.traffic();
    traffic.after(30).await;
    rig.start_rollout(&spec(&[50, 100], 1.0)).await;
    wait_phase(&rig.control, "succeeded").await;
    wait_canary_percent(&rig.proxy, 100).await;
    let (code, out, err) = run_ops(&["rollback", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        rig.control.service("s").await["policy"]["split"],
        json!({ "v1": 100, "v2": 0 })
    );
    wait_canary_percent(&rig.proxy, 0).await;
    // The rollout's gauge says the canary's percent in force: 0, not the
    // succeeded rollout's 100 (at once, and at the watcher's next ticks).
    for _ in 0..3 {
        assert_eq!(
            control_metric(&rig.control, "almond_rollout_step", &[]).await,
            0.0
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------
// 6. Conflicts and invalid specs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_and_one_rollout_runs_at_a_time() {
    let rig = Rig::start().await;
    let version = rig.control.service("s").await["policy"]["version"].clone();

    let descending = spec(&[50, 10], 1.0);
    let mut no_endpoints = spec(&[10, 100], 1.0);
    no_endpoints["canary"] = json!("v9");
    let mut same = spec(&[10, 100], 1.0);
    same["stable"] = json!("v2");
    let mut endless = spec(&[10, 100], 1.0);
    endless["interval_seconds"] = json!(1e300);
    let mut negative_p99 = spec(&[10, 100], 1.0);
    negative_p99["thresholds"]["max_p99"] = json!(-1.0);
    let mut unknown = spec(&[10, 100], 1.0);
    unknown["stpes"] = json!([1]);
    let cases = [
        (descending, "steps: must go up"),
        (no_endpoints, "canary subset \"v9\" has no endpoints"),
        (same, "stable: must be another subset than the canary"),
        (endless, "interval: at most 30 days"),
        (negative_p99, "-1 seconds is not a valid duration"),
        (unknown, "stpes"),
    ];
    for (body, why) in &cases {
        let reply = rig.post_rollout(body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.text()
        );
        assert!(reply.text().contains(why), "{body}: {}", reply.text());
        // Nothing changed.
        let reply = rig.control.get("/v1/services/s/rollouts").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
        assert_eq!(rig.control.service("s").await["policy"]["version"], version);
    }

    // One at a time.
    let first = rig.start_rollout(&spec(&[10, 100], 60.0)).await;
    let running = first["policy"]["rollout"].clone();
    let mut other = spec(&[20, 100], 1.0);
    other["stable"] = Value::Null;
    let reply = rig.post_rollout(&other).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert!(reply.text().contains("already running"), "{}", reply.text());
    let now = rollout(&rig.control).await;
    assert_eq!(now["spec"], running["spec"]);
    assert_eq!(now["phase"], "running");
    // Approving a rollout that is not at a gate is a conflict too.
    let reply = rig
        .control
        .send(
            Method::POST,
            "/v1/services/s/rollouts/approve",
            &json!({}),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    // Once it has ended, the next one may start.
    let reply = rig
        .control
        .send(Method::DELETE, "/v1/services/s/rollouts", &json!({}), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let second = rig.start_rollout(&other).await;
    assert_eq!(second["policy"]["rollout"]["stable"], "v1");
    assert_eq!(second["policy"]["split"], json!({ "v1": 80, "v2": 20 }));

    // The watcher is alive and well after all that: a valid rollout with
    // no traffic gets judged (inconclusive).
    wait_rollout(&rig.control, "the watcher judges the rollout", |r| {
        !verdicts(r).is_empty()
    })
    .await;
    assert_eq!(rig.v1a.count() + rig.v1b.count(), 1);
}

// ---------------------------------------------------------------------------
// 7. A control-plane restart in the middle of a rollout
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumes_after_a_control_restart() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    rig.start_rollout(&spec(&[10, 50, 100], 2.0)).await;
    wait_canary_percent(&rig.proxy, 50).await;

    let Rig {
        control,
        registry,
        proxy,
        v2,
        ..
    } = rig;
    let addr = control.addr;
    control.shutdown().await;

    // The rollout is in the policy file, mid-way.
    let file: Value =
        serde_json::from_slice(&std::fs::read(&registry.policy_file).unwrap()).unwrap();
    let stored = &file["s"]["rollout"];
    eprintln!(
        "restart: stopped at step {} ({}), history {:?}",
        stored["step"],
        stored["phase"],
        verdicts(stored)
    );
    assert!(
        stored["phase"] == "running" && stored["step"].as_u64() >= Some(1),
        "{stored:#}"
    );
    // The proxy serves on without its control plane.
    traffic.after(50).await;
    assert_eq!(weight(&proxy, "v2").await, 50.0);

    let control = TestControl::start_on(&registry.control_yaml(None), addr).await;
    let r = wait_phase(&control, "succeeded").await;
    assert_eq!(passes(&r), vec![10, 50, 100], "{r:#}");
    wait_canary_percent(&proxy, 100).await;
    let (total, share) = {
        let before = traffic.by_backend();
        traffic.after(100).await;
        canary_share(&before, &traffic.by_backend())
    };
    assert!(total > 0);
    assert_eq!(share, 1.0);
    assert!(v2.count() > 0);
}

// ---------------------------------------------------------------------------
// 8. The CLI starts and shows a rollout
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_and_shows_a_rollout() {
    let rig = Rig::start().await;
    let url = rig.control.url();
    let traffic = rig.traffic();
    traffic.after(30).await;

    let (code, out, err) = run_ops(&[
        "rollout",
        "s",
        "--canary",
        "v2",
        "--steps",
        "10,100",
        "--interval",
        "1s",
        "--max-error-rate",
        "5%",
        "--min-requests",
        "5",
        "--control",
        &url,
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let started: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(started["spec"]["canary"], "v2");
    assert_eq!(started["spec"]["steps"], json!([10, 100]));
    assert_eq!(started["spec"]["interval_seconds"], 1.0);
    assert_eq!(started["spec"]["thresholds"]["max_error_rate"], 0.05);
    assert_eq!(started["spec"]["thresholds"]["min_requests"], 5);
    assert_eq!(started["stable"], "v1");
    assert_eq!(started["phase"], "running");

    let (code, out, err) = run_ops(&["rollout", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("s: rollout of v2 over v1 is "), "{out}");
    assert!(out.contains("/2"), "{out}");

    wait_phase(&rig.control, "succeeded").await;
    wait_canary_percent(&rig.proxy, 100).await;
    // The events, numbered, through the API and the CLI.
    let events = rig.control.get("/v1/services/s/events").await.json();
    let kinds = event_kinds(&events);
    assert_eq!(
        kinds,
        vec!["started", "step_passed", "step_passed", "promoted"],
        "{events:#}"
    );
    let all = events["events"].as_array().unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    let since = rig
        .control
        .get("/v1/services/s/events?since=1")
        .await
        .json();
    assert_eq!(since["events"].as_array().unwrap().len(), all.len() - 1);
    let (code, out, err) = run_ops(&["events", "s", "--control", &url]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("#1 started v2 at 10%"), "{out}");
    assert!(
        lines.last().unwrap().contains("promoted v2 at 100%"),
        "{out}"
    );
    assert!(
        out.contains("step_passed v2 at 10%: errors 0/"),
        "the figures: {out}"
    );
    let (code, out, err) = run_ops(&["rollout", "s", "--control", &url, "-o", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["phase"], "succeeded");
    assert_eq!(passes(&shown), vec![10, 100]);
    let (code, out, _) = run_ops(&["rollout", "s", "--control", &url]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("succeeded") && out.contains("pass"),
        "the text shows the phase and each verdict: {out}"
    );

    // Usage errors exit 2.
    let (code, _, err) = run_ops(&[
        "rollout",
        "s",
        "--canary",
        "v2",
        "--approve",
        "--control",
        &url,
    ])
    .await;
    assert_eq!(code, Some(2), "{err}");
}

// ---------------------------------------------------------------------------
// 9. The PromQL path: a real Prometheus scraping the proxy
// ---------------------------------------------------------------------------

/// A Prometheus server started by a test; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the Debian `prometheus` on `addr`, scraping `target` every
/// 500 ms; `None` (the test is skipped) when it is not installed, unless CI
/// requires it.
fn start_prometheus(addr: SocketAddr, target: &str) -> Option<Prometheus> {
    let found = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        let required = std::env::var_os("CI").is_some()
            || std::env::var_os("ALMOND_REQUIRE_PROMETHEUS").is_some();
        assert!(
            !required,
            "prometheus must be on PATH (apt-get install prometheus)"
        );
        eprintln!("skipped: install prometheus to run the PromQL watcher test");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\nscrape_configs:\n  - job_name: almond\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Some(Prometheus { child, _dir: dir })
}

/// The same rollouts as the direct tests, judged from PromQL answers of a
/// real Prometheus: a good canary passes every step, a bad one fails at
/// its first step, as with the direct source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_watcher_gives_the_same_verdicts() {
    // Reserve Prometheus' address first: the control plane needs its URL.
    // Held while the rig binds its sockets (port 0), or one of them could
    // be given the same port and Prometheus could not listen on it.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let prom_addr = reserved.local_addr().unwrap();
    let rig = Rig::start_with(&format!(
        "watcher: {{ prometheus: \"http://{prom_addr}\" }}\n"
    ))
    .await;
    drop(reserved);
    let Some(_prometheus) = start_prometheus(prom_addr, &rig.proxy.admin.to_string()) else {
        return;
    };
    let traffic = rig.traffic();
    // Prometheus has the proxy's series before the rollout starts.
    let query = format!("http://{prom_addr}/api/v1/query?query=almond_requests_total");
    wait_until("prometheus has scraped the proxy", ROLLOUT_DEADLINE, || {
        let query = query.clone();
        async move {
            let client: Client<HttpConnector, Empty<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let req = Request::get(query).body(Empty::new()).ok()?;
            let body = client
                .request(req)
                .await
                .ok()?
                .into_body()
                .collect()
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&body.to_bytes()).ok()?;
            (!v["data"]["result"].as_array()?.is_empty()).then_some(())
        }
    })
    .await;

    // A good canary: every step passes.
    traffic.after(30).await;
    rig.start_rollout(&spec(&[10, 100], 2.0)).await;
    let r = wait_phase(&rig.control, "succeeded").await;
    let good: Vec<String> = verdicts(&r).into_iter().map(|v| v.1).collect();
    assert_eq!(good, ["pass", "pass"], "{r:#}");

    // A bad canary (30% 500s): fails at its first step, rolled back.
    let reply = rig
        .control
        .put_split("s", &json!({ "weights": { "v1": 100, "v2": 0 } }), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    wait_canary_percent(&rig.proxy, 0).await;
    rig.v2.fail_percent(30);
    rig.start_rollout(&spec(&[10, 100], 2.0)).await;
    let r = wait_phase(&rig.control, "rolled_back").await;
    let bad: Vec<String> = verdicts(&r).into_iter().map(|v| v.1).collect();
    assert_eq!(bad.last().map(String::as_str), Some("fail"), "{r:#}");
    assert!(bad.iter().all(|v| v != "pass"), "{r:#}");
    assert!(
        r["reason"].as_str().unwrap().contains("error rate"),
        "{r:#}"
    );
    wait_canary_percent(&rig.proxy, 0).await;

    // `almond status`'s live figures come from Prometheus too: stable
    // served traffic in the last 5 s, all of it successfully.
    let live = rig.control.get("/v1/services/s/live?window=5s").await;
    assert_eq!(live.status, StatusCode::OK, "{}", live.text());
    let live = live.json();
    assert_eq!(live["source"], "prometheus", "{live:#}");
    let v1 = &live["subsets"]["v1"];
    assert!(v1["requests"].as_u64() > Some(0), "{live:#}");
    assert!(v1["rps"].as_f64() > Some(0.0), "{live:#}");
    assert_eq!(v1["success_rate"].as_f64(), Some(1.0), "{live:#}");
    assert!(v1["p99_ms"].as_f64().is_some(), "{live:#}");
    drop(traffic);
}

// ---------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------

/// A webhook receiver: answers 500 to the first post (the notifier must
/// try again), then 200; keeps every body it accepted.
async fn webhook() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicU32::new(0));
    let kept = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                                500
                            } else {
                                kept.lock()
                                    .unwrap()
                                    .push(serde_json::from_slice::<Value>(&body).unwrap());
                                200
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

/// A control plane that stops posts the events still queued first, a
/// post to try again included (the receiver fails the first): the
/// rollout's `started`, written just before the stop, reaches the
/// webhook. (The notifier was aborted, its queue dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_control_plane_posts_the_events_still_queued() {
    let (at, got) = webhook().await;
    let rig = Rig::start_with(&format!("notify:\n  - {{ url: \"http://{at}/hook\" }}\n")).await;
    rig.start_rollout(&spec(&[10, 50, 100], 60.0)).await;
    let Rig { control, .. } = rig;
    control.shutdown().await;
    let kinds: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["event"]["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, ["started"], "posted before the stop ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_events_reach_the_webhooks() {
    let (json_at, json_got) = webhook().await;
    let (slack_at, slack_got) = webhook().await;
    let rig = Rig::start_with(&format!(
        "notify:\n  - {{ url: \"http://{json_at}/hook\" }}\n  - {{ url: \"http://{slack_at}/hook\", format: slack }}\n"
    ))
    .await;
    rig.v2.fail_percent(30);
    let traffic = rig.traffic();
    traffic.after(30).await;
    rig.start_rollout(&spec(&[10, 50, 100], 1.0)).await;
    wait_phase(&rig.control, "rolled_back").await;

    // Every event, in order, the first one after a retry.
    let kinds = |got: &Arc<std::sync::Mutex<Vec<Value>>>| -> Vec<String> {
        got.lock()
            .unwrap()
            .iter()
            .map(|b| b["event"]["kind"].as_str().unwrap_or("").to_owned())
            .filter(|k| k != "step_inconclusive")
            .collect()
    };
    eventually("the JSON webhook has every event", || async {
        kinds(&json_got) == ["started", "step_failed", "rolled_back"]
    })
    .await;
    let first = json_got.lock().unwrap()[0].clone();
    assert_eq!(first["service"], "s");
    assert_eq!(first["event"]["seq"], 1);
    eventually("the Slack webhook has the rollback", || async {
        slack_got.lock().unwrap().iter().any(|b| {
            b["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("s: rolled_back v2 at ")
        })
    })
    .await;
}

// ---------------------------------------------------------------------------
// A canary only a little worse than stable
// ---------------------------------------------------------------------------

/// 5 % errors against stable's 0 %, with a ceiling (`max_error_rate`) of
/// 5 %: only the comparison with stable (Fisher's exact test) can catch
/// it, and it does, with few failed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_a_little_worse_than_stable_is_rolled_back() {
    let rig = Rig::start().await;
    rig.v2.fail_percent(5);
    let traffic = rig.traffic();
    traffic.after(30).await;
    let failed_before = traffic.failed.load(Ordering::SeqCst);
    let posted = Instant::now();
    rig.start_rollout(&spec(&[10, 50, 100], 6.0)).await;
    let r = wait_phase(&rig.control, "rolled_back").await;
    wait_canary_percent(&rig.proxy, 0).await;
    let took = posted.elapsed();
    let failed = traffic.failed.load(Ordering::SeqCst) - failed_before;
    let reason = r["reason"].as_str().unwrap();
    eprintln!("a little worse: rolled back after {took:?}, {failed} failed requests: {reason}");
    assert!(reason.contains("above stable's"), "{reason}");
    assert!(failed < 50, "{failed} failed requests");
}

// ---------------------------------------------------------------------------
// A shadow stage (`--shadow`): mirrored copies judged before real traffic
// ---------------------------------------------------------------------------

/// The rollout spec with a shadow stage mirroring `percent` to v2.
fn shadow_spec(percent: f64) -> Value {
    let mut s = spec(&[10, 100], 1.0);
    s["shadow"] = json!(percent);
    s
}

/// The watcher's Prometheus source does not read the mirror's copies: a
/// shadow stage would only be inconclusive, then rolled back, minutes
/// later. It is refused at once, with the reason, and nothing changes.
#[tokio::test]
async fn a_shadow_stage_is_refused_with_the_prometheus_source() {
    let rig = Rig::start_with("watcher: { prometheus: \"http://127.0.0.1:9\" }\n").await;
    let before = rig.control.service("s").await["policy"].clone();
    let reply = rig.post_rollout(&shadow_spec(50.0)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("direct"), "{}", reply.text());
    assert_eq!(rig.control.service("s").await["policy"], before);
    // Without a shadow stage the same source takes the rollout.
    rig.start_rollout(&spec(&[10, 100], 1.0)).await;
    // The live view asks Prometheus over a minute unless told (a second
    // holds no two scrapes: `almond status` showed only dashes).
    let live = rig.control.get("/v1/services/s/live").await;
    assert_eq!(live.json()["window_seconds"], 60.0, "{}", live.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_stage_is_judged_on_copies_then_real_steps_follow() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    let started = rig.start_rollout(&shadow_spec(100.0)).await;
    assert_eq!(started["policy"]["mirror"]["subset"], "v2", "{started:#}");
    // The stage: copies reach the canary, real answers all come from v1.
    let before = traffic.by_backend();
    eventually("copies reach the canary", || async { rig.v2.count() > 20 }).await;
    // Until the first real step, no real request is answered by v2. The
    // step can follow the verdict at once, so the answers are sampled
    // while the stage runs: answers counted, then the proxy's split read;
    // the split's gauge is set before its table is swapped in, so a 0
    // read after the count means every counted answer was routed at 0 %.
    let mut at_zero = None;
    let until = Instant::now() + ROLLOUT_DEADLINE;
    let r = loop {
        let answers = traffic.by_backend();
        if weight(&rig.proxy, "v2").await == 0.0 {
            at_zero = Some(answers);
        }
        let r = rig.control.get("/v1/services/s/rollouts").await.json();
        if !verdicts(&r).is_empty() {
            break r;
        }
        assert!(
            Instant::now() < until,
            "the shadow stage was never judged: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first = verdicts(&r)[0].clone();
    assert_eq!((first.0, first.1.as_str()), (0, "pass"), "{r:#}");
    let during = at_zero.expect("the split was read at 0 % during the shadow stage");
    assert_eq!(
        during.get("v2").copied().unwrap_or(0),
        before.get("v2").copied().unwrap_or(0)
    );
    wait_canary_percent(&rig.proxy, 10).await;
    assert!(
        rig.control.service("s").await["policy"]
            .get("mirror")
            .is_none(),
        "the mirror ends with the stage"
    );
    let r = wait_phase(&rig.control, "succeeded").await;
    let steps: Vec<u64> = verdicts(&r)
        .iter()
        .filter(|v| v.1 == "pass")
        .map(|v| v.0)
        .collect();
    assert_eq!(steps, [0, 10, 100], "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_fails_its_shadow_stage_without_real_traffic() {
    let rig = Rig::start().await;
    rig.v2.fail_percent(30);
    let traffic = rig.traffic();
    traffic.after(30).await;
    let before = traffic.by_backend();
    rig.start_rollout(&shadow_spec(100.0)).await;
    let r = wait_phase(&rig.control, "rolled_back").await;
    let v = verdicts(&r);
    assert_eq!(v.last().unwrap().0, 0, "failed in the shadow stage: {r:#}");
    assert_eq!(v.last().unwrap().1, "fail", "{r:#}");
    assert!(
        r["reason"].as_str().unwrap().contains("error rate"),
        "{r:#}"
    );
    assert!(rig.v2.count() > 0, "the canary got copies");
    // No real request ever went to the canary, and the split never moved.
    let after = traffic.by_backend();
    assert_eq!(
        after.get("v2").copied().unwrap_or(0),
        before.get("v2").copied().unwrap_or(0)
    );
    assert_eq!(weight(&rig.proxy, "v2").await, 0.0);
    assert!(rig.control.service("s").await["policy"]
        .get("mirror")
        .is_none());
    let text = rig.proxy.admin_get("/metrics").await.text();
    let mirrored_5xx = [
        ("direction", "mirror"),
        ("subset", "v2"),
        ("code_class", "5xx"),
    ];
    assert!(metric(&text, "almond_requests_total", &mirrored_5xx) > 0.0);
}

/// An operator's mirror is the operator's again when a shadow stage is
/// over (the stage's own copies took its place and then cleared it), and
/// it cannot be changed while the stage owns the mirror (it was accepted
/// and overwritten at the watcher's next write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_stage_gives_the_operators_mirror_back() {
    let rig = Rig::start().await;
    let traffic = rig.traffic();
    traffic.after(30).await;
    let mine = json!({ "subset": "v2", "percent": 5.0 });
    let reply = rig
        .control
        .send(Method::PUT, "/v1/services/s/mirror", &mine, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Windows of 3 s: the stage lasts long enough for the change below.
    let mut spec = spec(&[10, 100], 3.0);
    spec["shadow"] = json!(100.0);
    let started = rig.start_rollout(&spec).await;
    assert_eq!(started["policy"]["mirror"]["percent"], 100.0, "{started:#}");
    let during = json!({ "subset": "v2", "percent": 50.0 });
    let reply = rig
        .control
        .send(Method::PUT, "/v1/services/s/mirror", &during, None)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert!(reply.text().contains("shadow stage"), "{}", reply.text());
    wait_canary_percent(&rig.proxy, 10).await;
    let policy = rig.control.service("s").await["policy"].clone();
    assert_eq!(policy["mirror"]["percent"], 5.0, "{policy:#}");
    assert_eq!(policy["mirror"]["subset"], "v2", "{policy:#}");
    // A mirror changed after the stage stays through the later steps.
    let after = json!({ "subset": "v2", "percent": 7.0 });
    let reply = rig
        .control
        .send(Method::PUT, "/v1/services/s/mirror", &after, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    wait_phase(&rig.control, "succeeded").await;
    let policy = rig.control.service("s").await["policy"].clone();
    assert_eq!(policy["mirror"]["percent"], 7.0, "{policy:#}");
}

/// A control plane that stops gives back the leases of the rollouts it
/// drives: the one started in its place (under a new replica name) drives
/// them at once, not once the lease has run out (15 s).
#[tokio::test]
async fn a_stopping_control_plane_gives_its_rollout_leases_back() {
    let rig = Rig::start().await;
    rig.start_rollout(&spec(&[10, 50], 60.0)).await;
    let policy_file = rig.registry.policy_file.clone();
    let lease = || {
        let text = std::fs::read(&policy_file).unwrap_or_default();
        let file: Value = serde_json::from_slice(&text).unwrap_or_default();
        file["s"]["rollout"]["lease"].clone()
    };
    eventually("the rollout's lease is taken", || async {
        lease().is_array()
    })
    .await;
    let Rig { control, .. } = rig;
    control.shutdown().await;
    assert!(lease().is_null(), "{}", lease());
}
