//! Resilience benchmark (issue 5): what callers see through an in-process
//! proxy when one of three real backends is slow, or dies mid-run.
//!
//! 1. Slow endpoint: three backends, one answering 50 ms late; a fixed
//!    request rate, open loop (each request is sent at its scheduled time;
//!    latency runs from that time, so waiting for an in-flight slot counts)
//!    with a bounded number in flight, for each `lb`; p50/p99 and success
//!    rate, against the same run with three healthy backends.
//! 2. Crash: three healthy backends at the same rate; one is killed (its
//!    listener closed, its connections dropped) a few seconds in, with
//!    retries off (`retries: { attempts: 0 }`) and on (the defaults); the
//!    failed requests, and the time from the crash to the proxy's ejection
//!    of the endpoint (`almond_endpoint_ejections_total`,
//!    `almond_endpoints{state="ejected"}` polled at the admin `/metrics`).
//!    The killed backend is restarted `--restart-after` s later (before its
//!    `base_ejection` of 2 s ends); the time from the kill until it is back
//!    in service (`almond_endpoints{state="ejected"}` 0 again) and its share
//!    of the successes from then on.
//!
//! Figures are printed as Markdown on stdout (progress on stderr), never
//! asserted. Run in release mode:
//!
//! ```text
//! cargo bench --bench resilience
//! cargo bench --bench resilience -- --rate 1000 --secs 10 --max-in-flight 256
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{metric, Backend, ProxyYaml, ServiceYaml, TestProxy, H1};
use tokio::sync::Semaphore;
use tokio::time::{sleep, sleep_until, Instant};

/// The balancers compared.
const LBS: [&str; 3] = ["p2c_ewma", "round_robin", "least_request"];
/// The slow backend's extra latency.
const SLOW: Duration = Duration::from_millis(50);
/// The crash runs' `circuit_breaker.base_ejection` (and `max_ejection`).
const BASE_EJECTION: &str = "2s";
/// How often the ejection metrics are scraped during a crash run.
const SCRAPE_EVERY: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

struct Opts {
    rate: u32,
    secs: f64,
    warmup: f64,
    max_in_flight: usize,
    crash_at: f64,
    restart_after: f64,
    slow: bool,
    crash: bool,
    args: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let mut o = Opts {
            rate: 1000,
            secs: 10.0,
            warmup: 1.0,
            max_in_flight: 256,
            crash_at: 4.0,
            restart_after: 1.0,
            slow: true,
            crash: true,
            args: args.clone(),
        };
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--rate" => o.rate = value().parse().expect("--rate N"),
                "--secs" => o.secs = value().parse().expect("--secs S"),
                "--warmup" => o.warmup = value().parse().expect("--warmup S"),
                "--max-in-flight" => o.max_in_flight = value().parse().expect("--max-in-flight N"),
                "--crash-at" => o.crash_at = value().parse().expect("--crash-at S"),
                "--restart-after" => o.restart_after = value().parse().expect("--restart-after S"),
                "--part" => match value().as_str() {
                    "slow" => o.crash = false,
                    "crash" => o.slow = false,
                    _ => {}
                },
                other => eprintln!("ignoring argument {other:?}"),
            }
        }
        o
    }

    fn command(&self) -> String {
        if self.args.is_empty() {
            "cargo bench --bench resilience".into()
        } else {
            format!("cargo bench --bench resilience -- {}", self.args.join(" "))
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring: /proc
// ---------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) of this process.
fn self_cpu(ticks: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// Busy and total core-seconds of the whole machine so far.
fn machine_ticks(ticks: f64) -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy / ticks, (busy + get(3) + get(4)) / ticks)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine_line() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPU ({model}), kernel {}", kernel.trim())
}

/// Machine-wide CPU against this process's over one run: the rest is
/// other work on the machine.
struct Window {
    ticks: f64,
    start: Instant,
    machine: (f64, f64),
    me: f64,
}

impl Window {
    fn open(ticks: f64) -> Window {
        Window {
            ticks,
            start: Instant::now(),
            machine: machine_ticks(ticks),
            me: self_cpu(ticks),
        }
    }

    /// (wall s, this process's core-s, other work's core-s, machine busy %).
    fn close(&self) -> (f64, f64, f64, f64) {
        let wall = self.start.elapsed().as_secs_f64();
        let (busy, total) = machine_ticks(self.ticks);
        let busy = busy - self.machine.0;
        let total = total - self.machine.1;
        let me = self_cpu(self.ticks) - self.me;
        (
            wall,
            me,
            (busy - me).max(0.0),
            100.0 * busy / total.max(1e-9),
        )
    }
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// What became of one request.
#[derive(Clone, Debug)]
enum Outcome {
    /// 200 from backend `b0`..`b2`.
    Ok(usize),
    /// Another status, with the proxy's `x-almond-error` if any.
    Status(u16, String),
    /// No response at all.
    Failed(String),
}

struct Rec {
    /// Scheduled send time, from the start of the measured window.
    at: Duration,
    /// Scheduled send time -> response read in full.
    latency: Duration,
    outcome: Outcome,
}

type LoadClient = Client<HttpConnector, Empty<Bytes>>;

async fn one(client: &LoadClient, uri: &str) -> Outcome {
    let req = hyper::Request::get(uri)
        .header("host", "svc")
        .body(Empty::new())
        .unwrap();
    let resp = match tokio::time::timeout(Duration::from_secs(15), client.request(req)).await {
        Err(_) => return Outcome::Failed("client timeout".into()),
        Ok(Err(e)) => {
            let text = format!("{e:?}");
            let kind = if text.contains("Connect") {
                "client connect"
            } else {
                "client error"
            };
            return Outcome::Failed(kind.into());
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let backend = header("x-backend");
    let error = header("x-almond-error");
    if resp.into_body().collect().await.is_err() {
        return Outcome::Failed("body cut".into());
    }
    match (
        status,
        backend.strip_prefix('b').and_then(|n| n.parse().ok()),
    ) {
        (200, Some(b)) => Outcome::Ok(b),
        _ => Outcome::Status(status, error),
    }
}

/// Sends `rate` requests a second for `secs` from `start`, each at its
/// scheduled time, at most `max_in_flight` at once; returns every
/// request's record and how many had to wait for an in-flight slot.
async fn open_loop(
    client: &LoadClient,
    uri: &str,
    rate: u32,
    secs: f64,
    max_in_flight: usize,
    start: Instant,
) -> (Vec<Rec>, usize) {
    let total = (f64::from(rate) * secs) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let recs = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut waited = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = start + period.mul_f64(i as f64);
        sleep_until(at).await;
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                waited += 1;
                slots.clone().acquire_owned().await.unwrap()
            }
        };
        let (client, uri, recs) = (client.clone(), uri.to_owned(), recs.clone());
        tasks.spawn(async move {
            let outcome = one(&client, &uri).await;
            let latency = at.elapsed();
            drop(permit);
            recs.lock().unwrap().push(Rec {
                at: at - start,
                latency,
                outcome,
            });
        });
    }
    while tasks.join_next().await.is_some() {}
    let recs = std::mem::take(&mut *recs.lock().unwrap());
    (recs, waited)
}

// ---------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Healthy,
    Slow,
    Crash { retries: bool },
}

struct Result {
    lb: &'static str,
    kind: Kind,
    sent: usize,
    ok: usize,
    waited: usize,
    /// Latencies of every request, sorted.
    all: Vec<Duration>,
    /// Share of successes answered by each backend.
    share: [f64; 3],
    /// Failures by kind.
    failures: BTreeMap<String, usize>,
    /// Crash runs: failures completed after the crash, the first and last
    /// of them (from the crash), ejection counter and gauge times.
    after_crash: usize,
    first_failure: Option<Duration>,
    last_failure: Option<Duration>,
    ejected_counter: Option<Duration>,
    ejected_gauge: Option<Duration>,
    /// From the kill until `state="ejected"` went back to 0.
    returned: Option<Duration>,
    /// Share of successes from the killed backend once it was back.
    killed_share_returned: f64,
    ejections: f64,
    retries: f64,
    /// Share of successes from the killed backend before the crash.
    killed_share_before: f64,
    cpu: (f64, f64, f64, f64),
}

fn pct(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2}")
    } else {
        format!("{m:.1}")
    }
}

fn ms_opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".into(), ms)
}

async fn run(opts: &Opts, lb: &'static str, kind: Kind) -> Result {
    let slow = matches!(kind, Kind::Slow);
    let mut backends = vec![
        Backend::start("b0").await,
        Backend::start("b1").await,
        if slow {
            Backend::builder("b2").delay(SLOW).start().await
        } else {
            Backend::start("b2").await
        },
    ];
    let mut svc = ServiceYaml::new("svc").lb(lb);
    for b in &backends {
        svc = svc.at(b.addr);
    }
    if let Kind::Crash { retries: false } = kind {
        svc = svc.set("retries", "{ attempts: 0 }");
    }
    if let Kind::Crash { .. } = kind {
        svc = svc.set(
            "circuit_breaker",
            &format!("{{ base_ejection: {BASE_EJECTION}, max_ejection: {BASE_EJECTION} }}"),
        );
    }
    let proxy: TestProxy = ProxyYaml::new().bound_to("svc").service(svc).start().await;
    let client: LoadClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let uri = format!("http://{}/", proxy.addr());

    // Warm-up (not recorded): connections, latency estimates.
    let start = Instant::now();
    let _ = open_loop(
        &client,
        &uri,
        opts.rate,
        opts.warmup,
        opts.max_in_flight,
        start,
    )
    .await;

    let window = Window::open(clock_ticks());
    let start = Instant::now() + Duration::from_millis(20);
    let crash = matches!(kind, Kind::Crash { .. });
    let crash_at = start + Duration::from_secs_f64(opts.crash_at);
    let restart_at = crash_at + Duration::from_secs_f64(opts.restart_after);
    // Kill b1 at `crash_at`; scrape the ejection metrics until the end.
    let crashed_at = Arc::new(Mutex::new(None::<Instant>));
    let done = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicUsize::new(0));
    let killer = {
        let crashed_at = crashed_at.clone();
        let mut victim = backends.remove(1);
        tokio::spawn(async move {
            if crash {
                sleep_until(crash_at).await;
                *crashed_at.lock().unwrap() = Some(Instant::now());
                victim.stop().await;
                sleep_until(restart_at).await;
                victim.restart().await;
            }
            victim
        })
    };
    let watcher = {
        let (admin, done, scrapes) = (proxy.admin, done.clone(), scrapes.clone());
        tokio::spawn(async move {
            let (mut counter, mut gauge, mut returned) = (None, None, None);
            let (mut ejections, mut retries) = (0.0, 0.0);
            if !crash {
                return (counter, gauge, returned, ejections, retries);
            }
            let mut admin_conn = H1::connect(admin).await;
            while !done.load(Ordering::Relaxed) {
                let text = admin_conn.get("admin", "/metrics").await.text();
                scrapes.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                ejections = metric(
                    &text,
                    "almond_endpoint_ejections_total",
                    &[("service", "svc")],
                );
                retries = metric(&text, "almond_retries_total", &[("service", "svc")]);
                let ejected = metric(
                    &text,
                    "almond_endpoints",
                    &[("service", "svc"), ("state", "ejected")],
                );
                if counter.is_none() && ejections > 0.0 {
                    counter = Some(now);
                }
                if gauge.is_none() && ejected > 0.0 {
                    gauge = Some(now);
                }
                if gauge.is_some() && returned.is_none() && ejected == 0.0 {
                    returned = Some(now);
                }
                sleep(SCRAPE_EVERY).await;
            }
            (counter, gauge, returned, ejections, retries)
        })
    };
    let (mut recs, waited) = open_loop(
        &client,
        &uri,
        opts.rate,
        opts.secs,
        opts.max_in_flight,
        start,
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let cpu = window.close();
    let (counter, gauge, returned, ejections, retries) = watcher.await.unwrap();
    let victim = killer.await.unwrap();
    backends.insert(1, victim);
    let crashed = *crashed_at.lock().unwrap();

    recs.sort_by_key(|r| r.at);
    let sent = recs.len();
    let mut all: Vec<Duration> = recs.iter().map(|r| r.latency).collect();
    all.sort_unstable();
    let mut by_backend = [0usize; 3];
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let (mut after_crash, mut first_failure, mut last_failure) = (0, None, None);
    let (mut ok_before, mut killed_before) = (0usize, 0usize);
    let (mut ok_returned, mut killed_returned) = (0usize, 0usize);
    for r in &recs {
        let finished = start + r.at + r.latency;
        let after = crashed.is_some_and(|c| finished >= c);
        match &r.outcome {
            Outcome::Ok(b) => {
                by_backend[*b] += 1;
                if returned.is_some_and(|t| start + r.at >= t) {
                    ok_returned += 1;
                    killed_returned += usize::from(*b == 1);
                }
                if !after {
                    ok_before += 1;
                    killed_before += usize::from(*b == 1);
                }
            }
            failed => {
                let key = match failed {
                    Outcome::Status(s, e) if e.is_empty() => format!("{s}"),
                    Outcome::Status(s, e) => format!("{s} {e}"),
                    Outcome::Failed(e) => e.clone(),
                    Outcome::Ok(_) => unreachable!(),
                };
                *failures.entry(key).or_default() += 1;
                if let Some(c) = crashed.filter(|_| after) {
                    after_crash += 1;
                    let since = finished.saturating_duration_since(c);
                    first_failure = Some(first_failure.map_or(since, |f: Duration| f.min(since)));
                    last_failure = Some(last_failure.map_or(since, |l: Duration| l.max(since)));
                }
            }
        }
    }
    let ok: usize = by_backend.iter().sum();
    let share = by_backend.map(|n| n as f64 / ok.max(1) as f64);
    let since = |t: Option<Instant>| t.zip(crashed).map(|(t, c)| t.saturating_duration_since(c));
    drop(client);
    proxy.shutdown().await;
    drop(backends);
    eprintln!(
        "{lb} {}: {ok}/{sent} ok, p99 {} ms ({} scrapes)",
        label(kind),
        ms(pct(&all, 0.99)),
        scrapes.load(Ordering::Relaxed)
    );
    Result {
        lb,
        kind,
        sent,
        ok,
        waited,
        all,
        share,
        failures,
        after_crash,
        first_failure,
        last_failure,
        ejected_counter: since(counter),
        ejected_gauge: since(gauge),
        returned: since(returned),
        killed_share_returned: killed_returned as f64 / ok_returned.max(1) as f64,
        ejections,
        retries,
        killed_share_before: killed_before as f64 / ok_before.max(1) as f64,
        cpu,
    }
}

fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::Healthy => "healthy",
        Kind::Slow => "slow b2",
        Kind::Crash { retries: false } => "crash, retries off",
        Kind::Crash { retries: true } => "crash, retries on",
    }
}

fn failures_text(f: &BTreeMap<String, usize>) -> String {
    if f.is_empty() {
        return "-".into();
    }
    f.iter()
        .map(|(k, n)| format!("{n} x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let load_start = loadavg();
    let mut results = Vec::new();
    rt.block_on(async {
        if opts.slow {
            for lb in LBS {
                results.push(run(&opts, lb, Kind::Healthy).await);
                results.push(run(&opts, lb, Kind::Slow).await);
            }
        }
        if opts.crash {
            for lb in LBS {
                for retries in [false, true] {
                    results.push(run(&opts, lb, Kind::Crash { retries }).await);
                }
            }
        }
    });

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Resilience benchmark\n\nCommand: `{}` (release build; `benches/resilience.rs`)\n\n\
         Machine: {}. The load generator, the proxy (in-process `almond_proxy::Proxy`, one \
         listener bound to the service, HTTP/1.1 upstream) and the three backends \
         (`tests/support` echo backends) all run in the bench process on 127.0.0.1 and share \
         the machine's cores with any other work on it (see the last columns). Load: \
         {} req/s open loop (each request sent at its scheduled time over a keep-alive pool; \
         latency from the scheduled time to the response read in full, so time spent waiting \
         for one of the {} in-flight slots counts), {} s measured after a {} s warm-up, \
         `GET /`.\n",
        opts.command(),
        machine_line(),
        opts.rate,
        opts.max_in_flight,
        opts.secs,
        opts.warmup
    );
    if opts.slow {
        let _ = writeln!(
            out,
            "## 1. One slow endpoint (+{} ms) of three\n\n\
             | lb | backends | sent | success | p50 ms | p99 ms | max ms | share b0 / b1 / b2 | \
             p99 / healthy p99 | waited for a slot | other work core-s (busy %) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|",
            SLOW.as_millis()
        );
        for r in results
            .iter()
            .filter(|r| matches!(r.kind, Kind::Healthy | Kind::Slow))
        {
            let healthy = results
                .iter()
                .find(|h| h.lb == r.lb && matches!(h.kind, Kind::Healthy))
                .map_or(Duration::ZERO, |h| pct(&h.all, 0.99));
            let p99 = pct(&r.all, 0.99);
            let ratio = p99.as_secs_f64() / healthy.as_secs_f64().max(1e-9);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} % | {} | **{}** | {} | {:.0} / {:.0} / {:.0} % | {} | {} | {:.1} ({:.0} %) |",
                r.lb,
                if matches!(r.kind, Kind::Slow) {
                    "b2 slow"
                } else {
                    "all healthy"
                },
                r.sent,
                100.0 * r.ok as f64 / r.sent.max(1) as f64,
                ms(pct(&r.all, 0.5)),
                ms(p99),
                ms(r.all.last().copied().unwrap_or_default()),
                100.0 * r.share[0],
                100.0 * r.share[1],
                100.0 * r.share[2],
                if matches!(r.kind, Kind::Slow) {
                    format!("{ratio:.2}x")
                } else {
                    "1".into()
                },
                r.waited,
                r.cpu.2,
                r.cpu.3,
            );
        }
        let _ = writeln!(
            out,
            "\nTarget (issue 5): p2c_ewma's p99 with the slow endpoint within 2x of its \
             healthy-only p99.\n"
        );
    }
    if opts.crash {
        let _ = writeln!(
            out,
            "## 2. One endpoint of three killed {:.0} s into the run\n\n\
             b1's listener is closed and its open connections dropped at once (connects are \
             refused from then on); it listens again {:.1} s later. `base_ejection` and \
             `max_ejection` {BASE_EJECTION}, other ejection settings default (a refused \
             connect ejects at once); metrics scraped every {} ms. Times are from the kill.\n\n\
             | lb | retries | sent | failed | success | failures after the kill: first / last ms | \
             ejection counter after ms | `state=\"ejected\"` after ms | back in service after ms | \
             ejections | retries sent | \
             b1 share of successes before the kill / once back | p99 ms | failures | other work core-s (busy %) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            opts.crash_at,
            opts.restart_after,
            SCRAPE_EVERY.as_millis()
        );
        for r in results
            .iter()
            .filter(|r| matches!(r.kind, Kind::Crash { .. }))
        {
            let failed = r.sent - r.ok;
            let _ = writeln!(
                out,
                "| {} | {} | {} | **{failed}** | {:.3} % | {} / {} | **{}** | {} | **{}** | {} | {} | {:.1} / {:.1} % | {} | {} | {:.1} ({:.0} %) |",
                r.lb,
                if matches!(r.kind, Kind::Crash { retries: true }) {
                    "on (default: 2 attempts)"
                } else {
                    "off (attempts: 0)"
                },
                r.sent,
                100.0 * r.ok as f64 / r.sent.max(1) as f64,
                ms_opt(r.first_failure),
                ms_opt(r.last_failure),
                ms_opt(r.ejected_counter),
                ms_opt(r.ejected_gauge),
                ms_opt(r.returned),
                r.ejections,
                r.retries,
                100.0 * r.killed_share_before,
                100.0 * r.killed_share_returned,
                ms(pct(&r.all, 0.99)),
                failures_text(&r.failures),
                r.cpu.2,
                r.cpu.3,
            );
            if failed != r.after_crash {
                let _ = writeln!(
                    out,
                    "\n({} of those failures finished before the kill.)\n",
                    failed - r.after_crash
                );
            }
        }
        let _ = writeln!(out);
    }
    let cpu_me: f64 = results.iter().map(|r| r.cpu.1).sum();
    let cpu_others: f64 = results.iter().map(|r| r.cpu.2).sum();
    let _ = writeln!(
        out,
        "Measured windows: this bench {cpu_me:.1} core-s, other work on the machine \
         {cpu_others:.1} core-s. Load average {load_start} at start, {} at end; total wall \
         time {:.0} s.",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
}
