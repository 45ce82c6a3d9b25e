//! Propagation benchmarks (issues 3 and 4): how fast a change reaches the
//! proxies, and what following the control plane costs it.
//!
//! a. `almond control` (the real release binary, so its CPU and memory are
//!    its own) on the Consul double with 1,000 services x 10 endpoints.
//!    N simulated proxies (N = 1, 100, 1,000, added in steps) long-poll it
//!    as `proxy/src/follow.rs` does (`GET /v1/snapshot?proxy=ID&index=N&
//!    wait=30s`, same index rule and pause) and apply every answer with
//!    `Snapshot::apply_to` (they skip validation and the table build). One
//!    endpoint's check goes critical, then passing again, in the double;
//!    for each client, the time from that change to having applied a
//!    snapshot whose services reflect it.
//! b. Shift propagation: real in-process `almond_proxy::Proxy` instances
//!    following an in-process file-mode control plane; the time from
//!    `PUT /v1/services/web/split` returning to each proxy's route table
//!    carrying the new weights. With `--change block` (issue 21), the
//!    changes are `almond block web --path /api/giveaway` and `almond
//!    unblock` in turn (`PUT /v1/services/web/guards`), timed to the route
//!    table carrying (or no longer carrying) the guard.
//!
//! Figures are printed as Markdown on stdout (progress on stderr), never
//! asserted. Run in release mode:
//!
//! ```text
//! cargo bench --bench propagation
//! cargo bench --bench propagation -- --part a --ns 1,100,1000 --modes apply,light --changes 8
//! cargo bench --bench propagation -- --part b --proxies 100 --shifts 10
//! cargo bench --bench propagation -- --part b --proxies 100 --shifts 10 --change block
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use almond_config::{Service, Snapshot};
use almond_consul_double::{CheckDef, ConsulDouble, ServiceDef, Status};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use support::{almond, get_h1, write_temp, Registry, TestControl};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

/// Services registered in the double (part a).
const SERVICES: usize = 1000;
/// Endpoints per service (part a).
const ENDPOINTS: usize = 10;
/// Nodes the instances are spread over (100 instances per node).
const NODES: usize = 100;
/// The long-poll wait the proxies ask for (`proxy/src/follow.rs`).
const WAIT: Duration = Duration::from_secs(30);
/// Slack on top of `WAIT` before a poll counts as failed (ditto).
const SLACK: Duration = Duration::from_secs(10);
/// Light-mode clients join `STAGGER_BATCH` at a time, `STAGGER_PAUSE`
/// apart.
const STAGGER_BATCH: usize = 25;
const STAGGER_PAUSE: Duration = Duration::from_millis(50);
/// Longest a change may take to reach every client before it is given up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

struct Opts {
    part_a: bool,
    part_b: bool,
    ns: Vec<usize>,
    modes: Vec<Mode>,
    changes: usize,
    consul_wait: String,
    proxies: usize,
    shifts: usize,
    b_services: usize,
    /// Part b's changes: splits (`false`) or block / unblock (`true`).
    block: bool,
    args: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let mut o = Opts {
            part_a: true,
            part_b: true,
            ns: vec![1, 100, 1000],
            modes: vec![Mode::Apply, Mode::Light],
            changes: 8,
            consul_wait: "10s".into(),
            proxies: 100,
            shifts: 10,
            b_services: 50,
            block: false,
            args: args.clone(),
        };
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--part" => match value().as_str() {
                    "a" => o.part_b = false,
                    "b" => o.part_a = false,
                    _ => {}
                },
                "--ns" => {
                    o.ns = value()
                        .split(',')
                        .map(|n| n.trim().parse().expect("--ns 1,100,1000"))
                        .collect();
                }
                "--modes" => {
                    o.modes = value()
                        .split(',')
                        .map(|m| match m.trim() {
                            "apply" => Mode::Apply,
                            "light" => Mode::Light,
                            other => panic!("--modes apply,light: not {other:?}"),
                        })
                        .collect();
                }
                "--changes" => o.changes = value().parse().expect("--changes N"),
                "--consul-wait" => o.consul_wait = value(),
                "--proxies" => o.proxies = value().parse().expect("--proxies N"),
                "--shifts" => o.shifts = value().parse().expect("--shifts N"),
                "--services" => o.b_services = value().parse().expect("--services N"),
                "--change" => match value().as_str() {
                    "split" => o.block = false,
                    "block" => o.block = true,
                    other => panic!("--change split|block: not {other:?}"),
                },
                other => eprintln!("ignoring argument {other:?}"),
            }
        }
        o.ns.sort_unstable();
        // Pairs: out, then back in.
        o.changes = o.changes.max(2) & !1;
        o
    }

    fn command(&self) -> String {
        if self.args.is_empty() {
            "cargo bench --bench propagation".into()
        } else {
            format!("cargo bench --bench propagation -- {}", self.args.join(" "))
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

/// CPU seconds (user + system) of `/proc/{pid}` (`self` for this process).
fn cpu_seconds(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat(5); index 0 here is field 3.
    (field(11) + field(12)) / ticks
}

/// `VmHWM` (peak) and `VmRSS` (now) of `/proc/{pid}`, in KiB.
fn memory_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmHWM:"), get("VmRSS:"))
}

/// Resets `VmHWM` to the current RSS (`clear_refs` 5, Linux >= 4.0).
fn reset_peak(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Busy and total core-seconds of the whole machine so far (`/proc/stat`).
fn machine_ticks(ticks: f64) -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    (busy / ticks, total / ticks)
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
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0 / 1024.0);
    format!(
        "{cpus} vCPU ({model}), {mem_gib:.0} GiB, kernel {}",
        kernel.trim()
    )
}

/// What the whole machine did during a part, against what this bench and
/// its control plane did: the rest is other work on the machine.
struct Window {
    ticks: f64,
    start: Instant,
    machine: (f64, f64),
    me: f64,
    load: String,
}

impl Window {
    fn open(ticks: f64) -> Window {
        Window {
            ticks,
            start: Instant::now(),
            machine: machine_ticks(ticks),
            me: cpu_seconds("self", ticks),
            load: loadavg(),
        }
    }

    /// `child`: CPU seconds the control plane child used meanwhile.
    fn close(&self, child: f64) -> String {
        let wall = self.start.elapsed().as_secs_f64();
        let (busy, total) = machine_ticks(self.ticks);
        let busy = busy - self.machine.0;
        let total = total - self.machine.1;
        let me = cpu_seconds("self", self.ticks) - self.me;
        let others = (busy - me - child).max(0.0);
        format!(
            "wall {wall:.0} s; machine busy {busy:.1} of {total:.1} core-s ({:.0} %); this bench \
             {me:.1} core-s, control child {child:.1} core-s, **other work on the machine \
             {others:.1} core-s** (load average {} at start, {} at end)",
            100.0 * busy / total.max(1e-9),
            self.load,
            loadavg()
        )
    }
}

/// `2026-11-25T12:19:08.882191Z` -> time since the Unix epoch.
fn rfc3339(s: &str) -> Option<Duration> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let num = |x: &str| x.parse::<i64>().ok();
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':');
    let (h, mi, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    let frac = &frac[..frac.len().min(9)];
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    Some(Duration::new(u64::try_from(secs).ok()?, nanos))
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Nearest-rank percentile of sorted `v`.
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
        format!("{m:.0}")
    }
}

fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.2} MiB", bytes as f64 / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn median_usize(mut v: Vec<usize>) -> usize {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Part a: simulated proxies
// ---------------------------------------------------------------------------

/// The change clients are waiting for: `addr` in (or out of) `svc`.
struct Expect {
    id: u64,
    svc: String,
    addr: SocketAddr,
    present: bool,
    t0: Instant,
    /// Per client: change -> answer read in full.
    delivered: Vec<Duration>,
    /// Per client: change -> snapshot applied.
    applied: Vec<Duration>,
    /// Body size of the answer that carried the change.
    bytes: Vec<usize>,
}

/// What the simulated proxies share with the bench.
#[derive(Default)]
struct Hub {
    expect: Mutex<Option<Expect>>,
    synced: AtomicUsize,
    full_bytes: AtomicUsize,
    /// Parse + apply time of full snapshots and of deltas, client side.
    full_work: Mutex<Vec<Duration>>,
    delta_work: Mutex<Vec<Duration>>,
    errors: AtomicUsize,
    /// Answers with nothing new (the wait ran out).
    unchanged: AtomicUsize,
}

impl Hub {
    /// Reports this client's answer if it reflects the awaited change;
    /// `has(svc, addr)`: whether the client now has `addr` in `svc`
    /// (`None`: cannot tell from this answer).
    fn check(
        &self,
        has: impl Fn(&str, SocketAddr) -> Option<bool>,
        reported: &mut u64,
        delivered: Instant,
        applied: Instant,
        bytes: usize,
    ) {
        let mut guard = self.expect.lock().unwrap();
        let Some(e) = guard.as_mut() else { return };
        if e.id == *reported || has(&e.svc, e.addr) != Some(e.present) {
            return;
        }
        *reported = e.id;
        e.delivered.push(delivered.saturating_duration_since(e.t0));
        e.applied.push(applied.saturating_duration_since(e.t0));
        e.bytes.push(bytes);
    }
}

fn has_endpoint(svc: Option<&Service>, addr: SocketAddr) -> Option<bool> {
    svc.map(|s| s.endpoints.iter().any(|x| x.addr == addr))
}

type PollClient = Client<HttpConnector, Empty<Bytes>>;

/// One long-poll, as `proxy/src/follow.rs` sends it; the body's bytes.
async fn poll(client: &PollClient, uri: &str) -> Result<Bytes, String> {
    let req = hyper::Request::get(uri)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(WAIT + SLACK, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = tokio::time::timeout(SLACK, resp.into_body().collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(body)
}

/// How a simulated proxy treats an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Parse, then `Snapshot::apply_to` onto its services (what a proxy
    /// does before validating and building its table).
    Apply,
    /// Parse only, and look for the change in the answer itself: the
    /// control plane's fan-out with as little client CPU as possible.
    Light,
}

/// A simulated proxy: the follow loop of `proxy/src/follow.rs`, reporting
/// to `hub`.
async fn sim_proxy(id: usize, url: String, mode: Mode, hub: Arc<Hub>) {
    let client: PollClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build_http();
    let mut index = 0u64;
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut reported = 0u64;
    let mut synced = false;
    loop {
        let uri = format!(
            "{url}/v1/snapshot?proxy=sim-{id}&index={index}&wait={}s",
            WAIT.as_secs()
        );
        let asked = Instant::now();
        let body = match poll(&client, &uri).await {
            Ok(b) => b,
            Err(_) => {
                hub.errors.fetch_add(1, Ordering::Relaxed);
                sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let delivered = Instant::now();
        let snapshot: Snapshot = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(_) => {
                hub.errors.fetch_add(1, Ordering::Relaxed);
                sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if snapshot.index <= index {
            hub.unchanged.fetch_add(1, Ordering::Relaxed);
            if asked.elapsed() < Duration::from_millis(100) {
                sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        let full = snapshot.full;
        index = snapshot.index;
        let light = match mode {
            Mode::Apply => {
                services = snapshot.apply_to(&services);
                None
            }
            Mode::Light => Some(snapshot),
        };
        let applied = Instant::now();
        let work = if full {
            hub.full_bytes.store(body.len(), Ordering::Relaxed);
            &hub.full_work
        } else {
            &hub.delta_work
        };
        work.lock().unwrap().push(applied - delivered);
        if !synced {
            synced = true;
            hub.synced.fetch_add(1, Ordering::Relaxed);
        }
        let has = |svc: &str, addr| match &light {
            None => Some(has_endpoint(services.get(svc), addr).unwrap_or(false)),
            Some(s) => has_endpoint(s.services.get(svc), addr),
        };
        hub.check(has, &mut reported, delivered, applied, body.len());
    }
}

fn svc_name(s: usize) -> String {
    format!("svc-{s:04}")
}

fn instance_addr(s: usize, j: usize) -> SocketAddr {
    SocketAddr::from(([10, (s / 256) as u8, (s % 256) as u8, (j + 1) as u8], 8080))
}

fn instance_id(s: usize, j: usize) -> String {
    format!("{}-{j}", svc_name(s))
}

/// The control plane binary, its config file and its pid.
struct ControlChild {
    child: tokio::process::Child,
    pid: String,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _config: tempfile::NamedTempFile,
}

impl ControlChild {
    async fn start(consul: &ConsulDouble, wait: &str) -> ControlChild {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = write_temp(
            ".yaml",
            &format!(
                "listen: {addr}\nsource:\n  consul: {{ addr: \"{}\", wait: {wait}, token_env: ALMOND_BENCH_NO_CONSUL_TOKEN }}\nstore: consul\nsubset_key: version\n",
                consul.url()
            ),
        );
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("propagation-control.log");
        let child = almond()
            .arg("control")
            .arg("--config")
            .arg(config.path())
            // "service updated" (with its time) is how the bench sees when
            // the control plane took a change in.
            .env("ALMOND_LOG", "warn,almond_control::state=info")
            .env("ALMOND_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap().to_string();
        ControlChild {
            child,
            pid,
            addr,
            log,
            _config: config,
        }
    }

    async fn ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).await.is_ok()
                && get_h1(self.addr, "control", "/ready").await.status == http::StatusCode::OK
            {
                return true;
            }
            sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// When the control plane logged `svc` updated, first at or after
    /// `since` (wall clock, from its JSON log's timestamps).
    fn updated(&self, svc: &str, since: SystemTime) -> Option<SystemTime> {
        let since = since.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        std::fs::read_to_string(&self.log)
            .ok()?
            .lines()
            .filter(|l| l.contains("service updated"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["service"] == svc)
            .filter_map(|v| rfc3339(v["timestamp"].as_str()?))
            .filter(|t| *t >= since)
            .min()
            .map(|t| SystemTime::UNIX_EPOCH + t)
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// One change's figures over the clients.
struct ChangeRow {
    what: String,
    clients: usize,
    /// When the control plane logged the service updated.
    saw: Option<Duration>,
    first: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// One (mode, N)'s figures.
struct Phase {
    mode: Mode,
    n: usize,
    new_clients: usize,
    sync: Duration,
    sync_cpu: f64,
    sync_peak_kib: u64,
    samples_applied: Vec<Duration>,
    samples_delivered: Vec<Duration>,
    /// Applied, from the control plane's update instead of the change.
    samples_fanout: Vec<Duration>,
    rows: Vec<ChangeRow>,
    missing: usize,
    delta_bytes: usize,
    change_cpu: f64,
    change_wall: f64,
    idle_cpu_per_s: f64,
    change_peak_kib: u64,
    rss_end_kib: u64,
    client_delta_work: Duration,
    full_bytes: usize,
    client_full_work: Duration,
}

/// What every phase of part a shares.
struct PartA<'a> {
    opts: &'a Opts,
    ticks: f64,
    consul: ConsulDouble,
    control: &'a ControlChild,
}

impl PartA<'_> {
    fn cpu(&self) -> f64 {
        cpu_seconds(&self.control.pid, self.ticks)
    }

    /// Grows the clients to `n`, waits for their first snapshot, then
    /// times `opts.changes` changes.
    async fn phase(
        &self,
        (mode, m, p): (Mode, usize, usize),
        n: usize,
        hub: &Arc<Hub>,
        clients: &mut Vec<JoinHandle<()>>,
        next_id: &mut u64,
    ) -> Phase {
        let pid = &self.control.pid;
        let new_clients = n.saturating_sub(clients.len());
        reset_peak(pid);
        let cpu0 = self.cpu();
        let t = Instant::now();
        for id in clients.len()..n {
            clients.push(tokio::spawn(sim_proxy(
                id,
                self.control.url(),
                mode,
                hub.clone(),
            )));
            // Light: the new clients join in batches (25 every 50 ms), as
            // proxies starting one after another would; apply: all at once
            // (the storm after a control-plane restart).
            if mode == Mode::Light && id % STAGGER_BATCH == STAGGER_BATCH - 1 {
                sleep(STAGGER_PAUSE).await;
            }
        }
        while hub.synced.load(Ordering::Relaxed) < n {
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "only {} of {n} clients synced",
                hub.synced.load(Ordering::Relaxed)
            );
            sleep(Duration::from_millis(10)).await;
        }
        let sync = t.elapsed();
        let sync_cpu = self.cpu() - cpu0;
        let (sync_peak_kib, _) = memory_kib(pid);
        eprintln!("part a: {mode:?} N={n}: {new_clients} new clients synced in {sync:?}");
        // Let the connection storm settle.
        sleep(Duration::from_millis(500)).await;

        reset_peak(pid);
        let cpu0 = self.cpu();
        let t_changes = Instant::now();
        let mut samples_applied = Vec::new();
        let mut samples_delivered = Vec::new();
        let mut samples_fanout = Vec::new();
        let mut rows = Vec::new();
        let mut missing = 0;
        let mut delta_sizes = Vec::new();
        hub.delta_work.lock().unwrap().clear();
        for k in 0..self.opts.changes {
            let pair = k / 2;
            let s = (m * 500 + p * 131 + pair * 97 + 13) % SERVICES;
            let j = (m + p + pair) % ENDPOINTS;
            let present = k % 2 == 1;
            let svc = svc_name(s);
            let t0_wall = SystemTime::now();
            let t0 = Instant::now();
            *hub.expect.lock().unwrap() = Some(Expect {
                id: *next_id,
                svc: svc.clone(),
                addr: instance_addr(s, j),
                present,
                t0,
                delivered: Vec::with_capacity(n),
                applied: Vec::with_capacity(n),
                bytes: Vec::with_capacity(n),
            });
            *next_id += 1;
            let status = if present {
                Status::Passing
            } else {
                Status::Critical
            };
            assert!(self
                .consul
                .set_check(&format!("service:{}", instance_id(s, j)), status));
            loop {
                sleep(Duration::from_millis(2)).await;
                let done = hub.expect.lock().unwrap().as_ref().unwrap().applied.len();
                if done >= n || t0.elapsed() > CHANGE_TIMEOUT {
                    break;
                }
            }
            let e = hub.expect.lock().unwrap().take().unwrap();
            let saw = self
                .control
                .updated(&svc, t0_wall)
                .and_then(|t| t.duration_since(t0_wall).ok());
            let (mut applied, mut delivered) = (e.applied, e.delivered);
            if let Some(saw) = saw {
                samples_fanout.extend(applied.iter().map(|a| a.saturating_sub(saw)));
            }
            applied.sort_unstable();
            delivered.sort_unstable();
            missing += n - applied.len();
            delta_sizes.extend(e.bytes);
            rows.push(ChangeRow {
                what: format!(
                    "{} {} {}",
                    if present { "back in:" } else { "out:" },
                    e.svc,
                    e.addr
                ),
                clients: applied.len(),
                saw,
                first: pct(&applied, 0.0),
                p50: pct(&applied, 0.5),
                p99: pct(&applied, 0.99),
                max: applied.last().copied().unwrap_or_default(),
            });
            samples_applied.extend(applied);
            samples_delivered.extend(delivered);
            sleep(Duration::from_millis(300)).await;
        }
        let change_wall = t_changes.elapsed().as_secs_f64();
        let change_cpu = self.cpu() - cpu0;
        let (change_peak_kib, _) = memory_kib(pid);
        // Idle: nothing changes; long-polls and Consul watches renew.
        let cpu0 = self.cpu();
        let t_idle = Instant::now();
        sleep(Duration::from_secs(4)).await;
        let idle_cpu_per_s = (self.cpu() - cpu0) / t_idle.elapsed().as_secs_f64();
        let (_, rss_end_kib) = memory_kib(pid);
        let mut work = std::mem::take(&mut *hub.delta_work.lock().unwrap());
        work.sort_unstable();
        let mut full_work = hub.full_work.lock().unwrap().clone();
        full_work.sort_unstable();
        samples_applied.sort_unstable();
        samples_delivered.sort_unstable();
        samples_fanout.sort_unstable();
        eprintln!(
            "part a: {mode:?} N={n}: p99 {} ms over {} samples, {missing} missing",
            ms(pct(&samples_applied, 0.99)),
            samples_applied.len()
        );
        Phase {
            mode,
            n,
            new_clients,
            sync,
            sync_cpu,
            sync_peak_kib,
            samples_applied,
            samples_delivered,
            samples_fanout,
            rows,
            missing,
            delta_bytes: median_usize(delta_sizes),
            change_cpu,
            change_wall,
            idle_cpu_per_s,
            change_peak_kib,
            rss_end_kib,
            client_delta_work: pct(&work, 0.5),
            full_bytes: hub.full_bytes.load(Ordering::Relaxed),
            client_full_work: pct(&full_work, 0.5),
        }
    }
}

async fn part_a(opts: &Opts, ticks: f64, out: &mut String) {
    eprintln!(
        "part a: registering {SERVICES} services x {ENDPOINTS} endpoints in the Consul double"
    );
    // The double on a runtime of its own (one thread): every change wakes
    // its ~1,000 blocked queries, and that work must not queue the
    // simulated proxies' tasks behind it (they share the cores all the same).
    let double_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("consul-double")
        .enable_all()
        .build()
        .unwrap();
    let consul = double_rt.spawn(ConsulDouble::start()).await.unwrap();
    for s in 0..SERVICES {
        for j in 0..ENDPOINTS {
            let def = ServiceDef::new(&svc_name(s))
                .id(&instance_id(s, j))
                .address(&instance_addr(s, j).ip().to_string())
                .port(8080)
                .meta("version", if j < ENDPOINTS / 2 { "v1" } else { "v2" })
                .node(&format!("node-{:03}", (s * ENDPOINTS + j) % NODES))
                .check(CheckDef::with_status(Status::Passing));
            consul.register(def).unwrap();
        }
    }

    let window = Window::open(ticks);
    let mut phases = Vec::new();
    let mut starts = Vec::new();
    let mut next_id = 1u64;
    let (mut errors, mut unchanged, mut endpoints) = (0, 0, 0);
    let (mut control_cpu_total, mut can_reset) = (0.0, true);
    for (m, &mode) in opts.modes.iter().enumerate() {
        // A fresh control plane per mode: its memory and long-polls start
        // clean.
        let control = ControlChild::start(&consul, &opts.consul_wait).await;
        let t = Instant::now();
        assert!(
            control.ready(Duration::from_secs(120)).await,
            "the control plane did not become ready; see target/tmp/propagation-control.log"
        );
        let ready_after = t.elapsed();
        let ready_cpu = cpu_seconds(&control.pid, ticks);
        let (ready_peak, _) = memory_kib(&control.pid);
        let served = get_h1(control.addr, "control", "/v1/services").await.json();
        endpoints = served["services"]
            .as_object()
            .map(|m| {
                m.values()
                    .flat_map(|s| {
                        s["subsets"]
                            .as_object()
                            .into_iter()
                            .flat_map(|o| o.values())
                    })
                    .filter_map(|n| n.as_u64())
                    .sum()
            })
            .unwrap_or(0);
        eprintln!(
            "part a: {mode:?}: control ready after {ready_after:?} serving {} services, \
             {endpoints} endpoints",
            served["services"].as_object().map_or(0, |m| m.len())
        );
        starts.push((mode, ready_after, ready_cpu, ready_peak));
        can_reset &= reset_peak(&control.pid);
        let ctx = PartA {
            opts,
            ticks,
            consul: consul.clone(),
            control: &control,
        };
        let hub = Arc::new(Hub::default());
        let mut clients: Vec<JoinHandle<()>> = Vec::new();
        for (p, &n) in opts.ns.iter().enumerate() {
            let phase = ctx
                .phase((mode, m, p), n, &hub, &mut clients, &mut next_id)
                .await;
            phases.push(phase);
        }
        errors += hub.errors.load(Ordering::Relaxed);
        unchanged += hub.unchanged.load(Ordering::Relaxed);
        for c in clients {
            c.abort();
        }
        control_cpu_total += cpu_seconds(&control.pid, ticks);
        drop(ctx);
        control.stop().await;
        if m + 1 < opts.modes.len() {
            // The stopped control plane's blocking queries stay in the
            // double until their wait ends.
            sleep(Duration::from_secs(11)).await;
        }
    }
    let machine = window.close(control_cpu_total);
    drop(consul);
    double_rt.shutdown_background();

    // --- report ---
    let _ = writeln!(
        out,
        "## a. Endpoint change -> N simulated proxies (issue 3)\n\n\
         `almond control` (release binary, its own process) on the Consul double (in the bench \
         process, on a runtime of its own with one thread) with **{SERVICES} services x {ENDPOINTS} endpoints** ({endpoints} endpoints \
         served; instances on {NODES} nodes), `source: consul` (`wait: {}`), `store: consul`. \
         Each simulated proxy is one long-poll client doing what `proxy/src/follow.rs` does \
         (`GET /v1/snapshot?proxy=ID&index=N&wait=30s`, skip an answer whose index is not \
         newer), in one of two modes: **apply** parses the answer and applies it with \
         `Snapshot::apply_to` onto its services, as a proxy does (it then skips \
         `validate_proxy` and the route-table build); **light** parses the answer and looks \
         for the change in it (no apply): the same control-plane work with as little client \
         CPU as this machine allows. Each mode runs on a fresh `almond control` process. N \
         grows in steps (the clients of one step stay for the next); in apply mode the new \
         clients of a step all connect at once (the storm after a control-plane restart), in \
         light mode they join {STAGGER_BATCH} every {} ms (proxies starting one after \
         another). A change is one instance's \
         check set critical (`out`) in the double, then passing again (`back in`), on a \
         different service each pair; the clock starts just before the double is changed and \
         stops when a client has applied (light: parsed) an answer whose service has (or \
         lacks) that endpoint. {} changes per (mode, N).\n",
        opts.consul_wait,
        STAGGER_PAUSE.as_millis(),
        opts.changes
    );
    for (mode, ready_after, ready_cpu, ready_peak) in &starts {
        let _ = writeln!(
            out,
            "Control plane start ({} mode): ready (first full sync of {SERVICES} services) after \
             {:.2} s, {ready_cpu:.2} CPU s, peak RSS {} MiB.\n",
            mode_name(*mode),
            ready_after.as_secs_f64(),
            mib(*ready_peak),
        );
    }
    let _ = writeln!(
        out,
        "| mode | N | samples | control took it in, ms (median) | from the change in Consul: \
         first ms | p50 ms | p99 ms | max ms | p99 delivered ms | from the control's update: \
         p50 ms | p99 ms | max ms | missed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for ph in &phases {
        let mut saw: Vec<Duration> = ph.rows.iter().filter_map(|r| r.saw).collect();
        saw.sort_unstable();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | **{}** | {} | {} |",
            mode_name(ph.mode),
            ph.n,
            ph.samples_applied.len(),
            ms(pct(&saw, 0.5)),
            ms(pct(&ph.samples_applied, 0.0)),
            ms(pct(&ph.samples_applied, 0.5)),
            ms(pct(&ph.samples_applied, 0.99)),
            ms(ph.samples_applied.last().copied().unwrap_or_default()),
            ms(pct(&ph.samples_delivered, 0.99)),
            ms(pct(&ph.samples_fanout, 0.5)),
            ms(pct(&ph.samples_fanout, 0.99)),
            ms(ph.samples_fanout.last().copied().unwrap_or_default()),
            ph.missing,
        );
    }
    let _ = writeln!(
        out,
        "\nPercentiles pool every (client, change) sample of that (mode, N). \"Control took it \
         in\": from the change in the double to the control plane's `service updated` log line \
         (its JSON log's wall-clock timestamp against the bench's wall clock): the Consul \
         side. It is slow here because the double wakes every blocked health query (~1,000, \
         the control plane's) on any change and recomputes each by scanning all 10,000 \
         instances under one lock, which a real Consul (per-service indexes) does not. \
         \"From the control's update\" is each client's time minus that: the control plane's \
         fan-out plus the client's own work. \"first\": the fastest client. \"delivered\": the \
         clock stops when the answer has been read, before it is parsed.\n"
    );
    let _ = writeln!(
        out,
        "| mode | N | control CPU s in the change window (net of idle) | control idle CPU % | \
         control peak RSS MiB (changes) | control RSS MiB after |\n|---|---|---|---|---|---|"
    );
    for ph in &phases {
        let net = (ph.change_cpu - ph.idle_cpu_per_s * ph.change_wall).max(0.0);
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} ({:.2}) | {:.1} | {} | {} |",
            mode_name(ph.mode),
            ph.n,
            ph.change_cpu,
            net,
            100.0 * ph.idle_cpu_per_s,
            mib(ph.change_peak_kib),
            mib(ph.rss_end_kib),
        );
    }
    let _ = writeln!(
        out,
        "\nThe change window holds {} changes and a 0.3 s pause after each; its control CPU is \
         shown raw and net of the idle rate (long-poll renewals, Consul re-polls) measured \
         over 4 s afterwards. Peaks are VmHWM, reset (`/proc/PID/clear_refs`) before each \
         window.\n",
        opts.changes
    );
    let _ = writeln!(
        out,
        "| mode | N | new clients | first connect to all synced s | control CPU s (sync) | control peak RSS MiB (sync) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for ph in &phases {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.2} | {} |",
            mode_name(ph.mode),
            ph.n,
            ph.new_clients,
            ph.sync.as_secs_f64(),
            ph.sync_cpu,
            mib(ph.sync_peak_kib)
        );
    }
    if !can_reset {
        let _ = writeln!(
            out,
            "\n(VmHWM could not be reset here: every peak above is the process's peak so far.)"
        );
    }
    if let Some(ph) = phases
        .iter()
        .rev()
        .find(|p| p.mode == Mode::Apply)
        .or(phases.last())
    {
        let (full, delta) = (ph.full_bytes, ph.delta_bytes);
        let _ = writeln!(
            out,
            "\n| snapshot | bytes (JSON body) | client parse + apply, median ({} mode, N = {}) |\n\
             |---|---|---|\n\
             | full ({SERVICES} services x {ENDPOINTS} endpoints) | {} ({full} B) | {} ms |\n\
             | delta (one service changed) | {} ({delta} B) | {} ms |\n\
             | ratio | {:.1}x smaller | |\n",
            mode_name(ph.mode),
            ph.n,
            kib(full),
            ms(ph.client_full_work),
            kib(delta),
            ms(ph.client_delta_work),
            full as f64 / delta.max(1) as f64,
        );
    }
    let _ = writeln!(
        out,
        "Control planes over the whole of part a: {control_cpu_total:.1} CPU s. Clients: \
         {errors} failed polls, {unchanged} answers with nothing new.\n"
    );
    let _ = writeln!(out, "Per change (ms, over clients):\n");
    let _ = writeln!(
        out,
        "| mode | N | change | clients | control took it in | first | p50 | p99 | max |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for ph in &phases {
        for r in &ph.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode_name(ph.mode),
                ph.n,
                r.what,
                r.clients,
                r.saw.map_or_else(|| "?".into(), ms),
                ms(r.first),
                ms(r.p50),
                ms(r.p99),
                ms(r.max)
            );
        }
    }
    let _ = writeln!(out, "\nMachine during part a: {machine}.\n");
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Apply => "apply",
        Mode::Light => "light",
    }
}

// ---------------------------------------------------------------------------
// Part b: shift propagation to real proxies
// ---------------------------------------------------------------------------

/// One in-process proxy following the control plane.
struct RealProxy {
    proxy: almond_proxy::Proxy,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn split_of(p: &almond_proxy::Proxy, svc: &str) -> Option<BTreeMap<String, u32>> {
    p.shared()
        .table
        .load()
        .config
        .services
        .get(svc)
        .and_then(|s| s.split.clone())
        .map(|s| s.weights)
}

/// The path `--change block` blocks and unblocks.
const BLOCKED: &str = "/api/giveaway";

/// Whether `p`'s route table carries a guard for [`BLOCKED`] on `svc`.
fn blocked_in(p: &almond_proxy::Proxy, svc: &str) -> bool {
    p.shared()
        .table
        .load()
        .config
        .services
        .get(svc)
        .is_some_and(|s| {
            s.guards
                .iter()
                .any(|g| g.when.path_prefix.as_deref() == Some(BLOCKED))
        })
}

fn services_of(p: &almond_proxy::Proxy) -> usize {
    p.shared().table.load().config.services.len()
}

async fn part_b(opts: &Opts, ticks: f64, out: &mut String) {
    let n = opts.proxies;
    let others = opts.b_services.saturating_sub(1);
    eprintln!("part b: file-mode control plane, web + {others} services, {n} real proxies");
    let registry = Registry::new();
    let mut web = String::from("web:\n  endpoints:\n");
    for j in 0..10 {
        let subset = if j < 5 { "v1" } else { "v2" };
        let _ = writeln!(
            web,
            "    - {{ addr: \"10.9.0.{}:8080\", subset: {subset} }}",
            j + 1
        );
    }
    registry.write("web.yaml", &web);
    let mut rest = String::new();
    for s in 0..others {
        let _ = writeln!(rest, "{}:\n  endpoints:", svc_name(s));
        for j in 0..10 {
            let _ = writeln!(rest, "    - {{ addr: \"{}\" }}", instance_addr(s, j));
        }
    }
    if others > 0 {
        registry.write("others.yaml", &rest);
    }
    let control = TestControl::start(&registry.control_yaml(None)).await;
    reset_peak("self");
    let window = Window::open(ticks);

    let (_, rss_before) = memory_kib("self");
    let t = Instant::now();
    let mut proxies = Vec::with_capacity(n);
    for i in 0..n {
        let yaml = format!(
            "admin: 127.0.0.1:0\ncontrol: {}\nproxy_id: bench-{i:03}\nlisteners:\n  - bind: 127.0.0.1:0\n",
            control.url()
        );
        let config = almond_config::load_proxy(&yaml, "bench").unwrap();
        let bound = almond_proxy::Bound::bind(&config).unwrap();
        let proxy = almond_proxy::Proxy::new(config).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.clone().run(bound, async {
            let _ = rx.await;
        }));
        proxies.push(RealProxy {
            proxy,
            stop: Some(tx),
            task,
        });
    }
    let want = opts.b_services;
    while proxies.iter().any(|p| services_of(&p.proxy) < want) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "proxies did not all receive the services"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let synced = t.elapsed();
    let (_, rss_synced) = memory_kib("self");
    let per_proxy_kib = rss_synced.saturating_sub(rss_before) / n.max(1) as u64;
    eprintln!("part b: {n} proxies synced in {synced:?}, {per_proxy_kib} KiB each");
    sleep(Duration::from_millis(500)).await;

    let patterns: [(u32, u32); 6] = [(90, 10), (50, 50), (10, 90), (75, 25), (1, 99), (99, 1)];
    let mut from_return: Vec<Duration> = Vec::new();
    let mut from_send: Vec<Duration> = Vec::new();
    let mut put_times: Vec<Duration> = Vec::new();
    let mut before_return = 0usize;
    let mut missed = 0usize;
    let mut rows = Vec::new();
    for k in 0..opts.shifts {
        let (v1, v2) = patterns[k % patterns.len()];
        let want: BTreeMap<String, u32> = [("v1".to_owned(), v1), ("v2".to_owned(), v2)].into();
        // With `--change block`: block on even changes, unblock on odd.
        let block = k % 2 == 0;
        let applied = |p: &almond_proxy::Proxy| {
            if opts.block {
                blocked_in(p, "web") == block
            } else {
                split_of(p, "web").as_ref() == Some(&want)
            }
        };
        let sent = Instant::now();
        let reply = if opts.block {
            let guard = if block {
                json!({ "match": { "path_prefix": BLOCKED }, "deny": { "status": 503 } })
            } else {
                json!({ "match": { "path_prefix": BLOCKED }, "remove": true })
            };
            control
                .send(http::Method::PUT, "/v1/services/web/guards", &guard, None)
                .await
        } else {
            control
                .put_split("web", &json!({ "weights": { "v1": v1, "v2": v2 } }), None)
                .await
        };
        let returned = Instant::now();
        assert_eq!(reply.status, http::StatusCode::OK, "{}", reply.text());
        put_times.push(returned - sent);
        let mut seen: Vec<Option<Instant>> = vec![None; n];
        let mut first_look = true;
        loop {
            let now = Instant::now();
            for (i, p) in proxies.iter().enumerate() {
                if seen[i].is_none() && applied(&p.proxy) {
                    // Already there at the first look: applied by the time
                    // the PUT returned.
                    seen[i] = Some(if first_look { returned } else { now });
                    before_return += usize::from(first_look);
                }
            }
            first_look = false;
            if seen.iter().all(Option::is_some) || returned.elapsed() > CHANGE_TIMEOUT {
                break;
            }
            sleep(Duration::from_millis(1)).await;
        }
        let mut this: Vec<Duration> = Vec::new();
        for s in seen.iter() {
            match s {
                Some(at) => {
                    this.push(at.saturating_duration_since(returned));
                    from_send.push(at.saturating_duration_since(sent));
                }
                None => missed += 1,
            }
        }
        this.sort_unstable();
        let what = match (opts.block, block) {
            (false, _) => format!("v1={v1} v2={v2}"),
            (true, true) => format!("block {BLOCKED}"),
            (true, false) => format!("unblock {BLOCKED}"),
        };
        rows.push((
            what,
            this.len(),
            returned - sent,
            pct(&this, 0.0),
            pct(&this, 0.5),
            pct(&this, 0.99),
            this.last().copied().unwrap_or_default(),
        ));
        from_return.extend(this);
        sleep(Duration::from_millis(300)).await;
    }
    from_return.sort_unstable();
    from_send.sort_unstable();
    put_times.sort_unstable();
    let machine = window.close(0.0);
    let (my_peak, my_rss) = memory_kib("self");
    for p in &mut proxies {
        if let Some(tx) = p.stop.take() {
            let _ = tx.send(());
        }
    }
    for p in proxies {
        let _ = tokio::time::timeout(Duration::from_secs(5), p.task).await;
    }
    control.shutdown().await;

    let (title, changes, watched) = if opts.block {
        (
            "Block / unblock -> {n} real proxies (issue 21)",
            "`almond block web --path /api/giveaway` and `almond unblock` in turn \
             (`PUT /v1/services/web/guards`)",
            ".guards`) every 1 ms and stops a proxy's clock when it carries the guard (or no \
             longer does)",
        )
    } else {
        (
            "Split shift -> {n} real proxies (issue 4)",
            "shifts `PUT /v1/services/web/split`",
            ".split`) every 1 ms and stops a proxy's clock when it carries the new weights",
        )
    };
    let title = title.replace("{n}", &n.to_string());
    let _ = writeln!(
        out,
        "## b. {title}\n\n\
         {n} real `almond_proxy::Proxy` instances in the bench process (each with its own \
         listener, admin listener, metrics registry and follow loop, i.e. \
         `proxy/src/follow.rs` unchanged: validate, build the route table, swap), following \
         an in-process control plane in file mode (`source: {{ file: DIR }}`, `store: file`) \
         serving {} services of 10 endpoints (`web`: v1 x 5, v2 x 5). {} {changes}; the bench \
         polls every proxy's route table (`proxy.shared().table.load().config.services[\"web\"]\
         {watched}. All {n} proxies synced in {:.2} s.\n",
        opts.b_services,
        opts.shifts,
        synced.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| proxies | changes | samples | PUT p50 ms | after PUT returned: p50 ms | p99 ms | max ms | \
         from PUT sent: p99 ms | already applied when the PUT returned | missed |\n\
         |---|---|---|---|---|---|---|---|---|---|\n\
         | {n} | {} | {} | {} | {} | **{}** | {} | {} | {before_return} | {missed} |\n",
        opts.shifts,
        from_return.len(),
        ms(pct(&put_times, 0.5)),
        ms(pct(&from_return, 0.5)),
        ms(pct(&from_return, 0.99)),
        ms(from_return.last().copied().unwrap_or_default()),
        ms(pct(&from_send, 0.99)),
    );
    let _ = writeln!(
        out,
        "Per change (ms; proxies' times after the PUT returned):\n\n\
         | change | proxies | PUT | first | p50 | p99 | max |\n|---|---|---|---|---|---|---|"
    );
    for (what, got, put, first, p50, p99, max) in rows {
        let _ = writeln!(
            out,
            "| {what} | {got} | {} | {} | {} | {} | {} |",
            ms(put),
            ms(first),
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    let _ = writeln!(
        out,
        "\nBench process (control plane + {n} proxies + poller) peak RSS {} MiB, RSS {} MiB at \
         the end; the proxies added {} MiB of RSS once synced: **{} MiB per proxy** for {} \
         endpoints. Machine during part b: {machine}.\n",
        mib(my_peak),
        mib(my_rss),
        mib(rss_synced.saturating_sub(rss_before)),
        mib(per_proxy_kib),
        opts.b_services * 10,
    );
}

// ---------------------------------------------------------------------------

fn main() {
    let opts = Opts::parse();
    let ticks = clock_ticks();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Propagation benchmark\n\nCommand: `{}` (release build; `benches/propagation.rs`)\n\n\
         Machine: {}. Everything on 127.0.0.1 on this one machine: the control plane, the \
         Consul double and every (simulated or real) proxy share its cores, and other work \
         may run on it too (see the machine line under each part). Part b runs first, so \
         that its memory figures come from a fresh process.\n",
        opts.command(),
        machine_line()
    );
    let mut out_b = String::new();
    rt.block_on(async {
        if opts.part_b {
            part_b(&opts, ticks, &mut out_b).await;
        }
        if opts.part_a {
            part_a(&opts, ticks, &mut out).await;
        }
    });
    out.push_str(&out_b);
    let _ = writeln!(
        out,
        "Total wall time {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
}
