//! Shared support for the end-to-end tests: builder-style fakes on
//! `127.0.0.1:0`, the proxy in-process or as the real binary, HTTP/1.1 and
//! h2c clients, a raw TCP helper, and [`eventually`].
//!
//! Every network step is bounded by [`DEADLINE`] so a broken proxy fails a
//! test instead of hanging it; nothing here sleeps where a condition can be
//! awaited.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod pki;

/// How long any single step may take before the test fails: generous, for a
/// loaded two-core machine running debug builds.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Bodies the test clients and backends send.
pub type Body = BoxBody<Bytes, Infallible>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().boxed()
}

/// Size of the chunks [`stream_of`] produces.
const CHUNK: usize = 64 * 1024;
static FILLER: [u8; CHUNK] = [b'x'; CHUNK];

/// A body of `total` bytes produced chunk by chunk, with no length known in
/// advance (HTTP/1.1 sends it chunked): nothing holds it whole.
pub fn stream_of(total: u64) -> Body {
    let chunks = stream::unfold(total, |left| async move {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        let frame = Frame::data(Bytes::from_static(&FILLER[..n]));
        Some((Ok::<_, Infallible>(frame), left - n as u64))
    });
    BodyExt::boxed(StreamBody::new(chunks))
}

/// An address whose connections never complete: a listener with a full
/// accept queue (backlog 0, its one place taken by a connection never
/// accepted), so the kernel drops further SYNs. Keep what it returns.
pub async fn unreachable() -> (SocketAddr, Vec<TcpStream>, TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Connect until one does not complete: the queue is full.
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
    {
        queued.push(s);
        assert!(queued.len() < 16, "the accept queue never filled");
    }
    (addr, queued, listener)
}

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `fut`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hung for {DEADLINE:?}: {what}"),
    }
}

/// An address that refuses connections for the rest of the test
/// process: a socket bound to it that never listens, kept open, so no
/// other test can take the port in the meantime (a released port can
/// be handed to the next socket that binds `:0`).
pub async fn closed_port() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// Two backends that read and keep request bodies: `bad` answers every
/// request 503, `good` answers 200 (a retry's way from one to the other).
pub async fn bad_and_good() -> (Backend, Backend) {
    let bad = Backend::builder("bad")
        .status(503)
        .keep_bodies()
        .start()
        .await;
    let good = Backend::builder("good").keep_bodies().start().await;
    (bad, good)
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request method.
    pub method: Method,
    /// The request target as received (origin-form for HTTP/1.1, absolute
    /// for HTTP/2).
    pub uri: String,
    /// Path and query.
    pub path: String,
    /// HTTP version on the backend's connection.
    pub version: Version,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Bytes of body received.
    pub body_len: u64,
}

#[derive(Default)]
struct BackendState {
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Connections open now, and the most there ever were at once.
    open: AtomicUsize,
    peak_open: AtomicUsize,
    /// Requests whose head arrived.
    requests: AtomicUsize,
    /// Requests seen in full (body read), in order.
    seen: Mutex<Vec<Seen>>,
    /// A status every answer carries; 0: answer as usual.
    forced_status: AtomicU16,
    /// The status of answers to `/health`; 0: as any other path.
    health_status: AtomicU16,
    /// Requests being answered now, and the most there ever were.
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    /// Request bodies, in order (only with `keep_bodies`).
    bodies: Mutex<Vec<Bytes>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// HTTP/1.1 and h2c, answering every request.
    Http,
    /// Reads one request head, then resets the connection (RST).
    Reset,
    /// Reads requests (counting their heads) and never answers.
    Hang,
}

/// Configures a [`Backend`].
pub struct BackendBuilder {
    name: String,
    delay: Duration,
    trailers: Vec<(String, String)>,
    mode: Mode,
    status: Option<StatusCode>,
    keep_bodies: bool,
    max_streams: Option<u32>,
}

impl BackendBuilder {
    /// Waits this long before sending response headers.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Ends every response body with this trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Resets each connection once a request head has arrived.
    pub fn reset(mut self) -> Self {
        self.mode = Mode::Reset;
        self
    }

    /// Accepts connections and reads requests, but never answers.
    pub fn hang(mut self) -> Self {
        self.mode = Mode::Hang;
        self
    }

    /// Answers every request with `status` (see [`Backend::set_status`]).
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(StatusCode::from_u16(status).unwrap());
        self
    }

    /// Keeps every request body whole (see [`Backend::bodies`]).
    pub fn keep_bodies(mut self) -> Self {
        self.keep_bodies = true;
        self
    }

    /// Takes at most `n` HTTP/2 streams at once on a connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub fn max_streams(mut self, n: u32) -> Self {
        self.max_streams = Some(n);
        self
    }

    /// Binds `127.0.0.1:0` and serves until the [`Backend`] is dropped.
    pub async fn start(self) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        if let Some(status) = self.status {
            state.forced_status.store(status.as_u16(), Ordering::SeqCst);
        }
        let behaviour = Arc::new(Behaviour {
            name: self.name.clone(),
            delay: self.delay,
            trailers: self.trailers,
            keep_bodies: self.keep_bodies,
            max_streams: self.max_streams,
        });
        let conns = Arc::new(Mutex::new(Vec::new()));
        let task = accept_loop(listener, &state, &behaviour, self.mode, &conns);
        Backend {
            name: self.name,
            addr,
            state,
            task,
            behaviour,
            mode: self.mode,
            conns,
        }
    }
}

/// Accepts connections and serves each in its own task (kept in `conns`
/// so that [`Backend::stop`] can end them).
fn accept_loop(
    listener: TcpListener,
    state: &Arc<BackendState>,
    behaviour: &Arc<Behaviour>,
    mode: Mode,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> JoinHandle<()> {
    let (state, behaviour, conns) = (state.clone(), behaviour.clone(), conns.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            state.accepted.fetch_add(1, Ordering::Relaxed);
            let open = state.open.fetch_add(1, Ordering::SeqCst) + 1;
            state.peak_open.fetch_max(open, Ordering::SeqCst);
            let state = state.clone();
            let behaviour = behaviour.clone();
            let conn = tokio::spawn(async move {
                let counted = state.clone();
                match mode {
                    Mode::Http => serve_http(stream, state, behaviour).await,
                    Mode::Reset => reset_after_head(stream, &state).await,
                    Mode::Hang => hang(stream, &state).await,
                }
                counted.open.fetch_sub(1, Ordering::SeqCst);
            });
            let mut conns = conns.lock().unwrap();
            conns.retain(|c| !c.is_finished());
            conns.push(conn);
        }
    })
}

/// How a backend answers.
struct Behaviour {
    name: String,
    delay: Duration,
    trailers: Vec<(String, String)>,
    keep_bodies: bool,
    max_streams: Option<u32>,
}

/// A test backend on `127.0.0.1:0` that says who it is: every response
/// carries `x-backend: NAME`, and by default its body is a JSON echo of
/// the request. Paths change the answer: `/bytes/N` streams N bytes,
/// `/status/N` answers status N.
pub struct Backend {
    /// The name it answers with.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    task: JoinHandle<()>,
    behaviour: Arc<Behaviour>,
    mode: Mode,
    /// Connection tasks (dropping a handle leaves its task running).
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    /// A builder for a backend called `name`.
    pub fn builder(name: &str) -> BackendBuilder {
        BackendBuilder {
            name: name.to_owned(),
            delay: Duration::ZERO,
            trailers: Vec::new(),
            mode: Mode::Http,
            status: None,
            keep_bodies: false,
            max_streams: None,
        }
    }

    /// A plain echo backend called `name`.
    pub async fn start(name: &str) -> Backend {
        Backend::builder(name).start().await
    }

    /// Requests that reached it (counted when their head arrived).
    pub fn count(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every request it read in full, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The last request it read in full.
    pub fn last(&self) -> Seen {
        self.seen()
            .pop()
            .unwrap_or_else(|| panic!("backend {} saw no request", self.name))
    }

    /// From now on answers every request with `status` (200 included: a
    /// failing backend recovers).
    pub fn set_status(&self, status: u16) {
        self.state.forced_status.store(status, Ordering::SeqCst);
    }

    /// From now on answers `/health` with `status`, its other paths as
    /// before (0: `/health` as any other path): a backend draining by its
    /// health check.
    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// The most requests it was ever answering at once.
    pub fn peak_in_flight(&self) -> usize {
        self.state.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Every request body it read, in order (built with `keep_bodies`).
    pub fn bodies(&self) -> Vec<Bytes> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// Connections it has accepted so far.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now (until the peer closes them).
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// The most connections it ever had open at once (until the peer
    /// closed them; connections a [`Backend::stop`] ended stay counted).
    pub fn peak_connections(&self) -> usize {
        self.state.peak_open.load(Ordering::SeqCst)
    }

    /// Closes every open connection (as a keep-alive timeout would), and
    /// keeps listening.
    pub async fn close_connections(&self) {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for conn in conns {
            conn.abort();
            let _ = conn.await;
        }
    }

    /// Kills it: the listener closes (connects are refused) and every open
    /// connection is dropped. Counts stay; [`Backend::restart`] brings it
    /// back on the same port.
    pub async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for conn in conns {
            conn.abort();
            let _ = conn.await;
        }
    }

    /// Listens again on the same address, answering as before.
    pub async fn restart(&mut self) {
        let listener = within("rebind", async {
            loop {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        self.task = accept_loop(
            listener,
            &self.state,
            &self.behaviour,
            self.mode,
            &self.conns,
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_http(stream: TcpStream, state: Arc<BackendState>, behaviour: Arc<Behaviour>) {
    let max_streams = behaviour.max_streams;
    let svc = service_fn(move |req| answer(req, state.clone(), behaviour.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Some(n) = max_streams {
        builder.http2().max_concurrent_streams(n);
    }
    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<BackendState>,
    behaviour: Arc<Behaviour>,
) -> Result<Response<Body>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    // Count the body as it streams; hold it only when asked to.
    let mut body_len = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_len += data.len() as u64;
                    if behaviour.keep_bodies {
                        kept.extend_from_slice(data);
                    }
                }
            }
            Err(_) => break,
        }
    }
    if behaviour.keep_bodies {
        state.bodies.lock().unwrap().push(Bytes::from(kept));
    }
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        path: path.clone(),
        version: parts.version,
        authority,
        headers: parts.headers.clone(),
        body_len,
    };
    state.seen.lock().unwrap().push(seen.clone());

    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }

    let mut status = StatusCode::OK;
    let mut content_type = "application/json";
    let data: Body = if let Some(n) = path.strip_prefix("/bytes/") {
        content_type = "application/octet-stream";
        stream_of(n.parse().unwrap_or(0))
    } else {
        if let Some(code) = path.strip_prefix("/status/") {
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        }
        full(echo_json(&behaviour.name, &seen).to_string())
    };
    let forced = state.forced_status.load(Ordering::SeqCst);
    if forced != 0 {
        status = StatusCode::from_u16(forced).unwrap();
    }
    let health = state.health_status.load(Ordering::SeqCst);
    if health != 0 && path == "/health" {
        status = StatusCode::from_u16(health).unwrap();
    }
    let data = if behaviour.trailers.is_empty() {
        data
    } else {
        let mut trailers = HeaderMap::new();
        for (k, v) in &behaviour.trailers {
            trailers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let bytes = data
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(bytes)),
            Ok(Frame::trailers(trailers)),
        ];
        BodyExt::boxed(StreamBody::new(stream::iter(frames)))
    };
    let mut resp = Response::builder()
        .status(status)
        .header("x-backend", behaviour.name.as_str())
        .header(http::header::CONTENT_TYPE, content_type);
    if !behaviour.trailers.is_empty() {
        // Declared, so an HTTP/1.1 hop may forward them too.
        let names: Vec<&str> = behaviour.trailers.iter().map(|(k, _)| k.as_str()).collect();
        resp = resp.header(http::header::TRAILER, names.join(", "));
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok(resp.body(data).unwrap())
}

fn echo_json(name: &str, seen: &Seen) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for key in seen.headers.keys() {
        let values: Vec<serde_json::Value> = seen
            .headers
            .get_all(key)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        headers.insert(key.as_str().to_owned(), values.into());
    }
    serde_json::json!({
        "backend": name,
        "method": seen.method.as_str(),
        "uri": seen.uri,
        "path": seen.path,
        "version": format!("{:?}", seen.version),
        "authority": seen.authority,
        "headers": headers,
        "body_len": seen.body_len,
    })
}

/// Reads until a request head is complete, then closes with RST.
async fn reset_after_head(mut stream: TcpStream, state: &BackendState) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Reads until the peer closes, counting request heads; never writes.
async fn hang(mut stream: TcpStream, state: &BackendState) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            state.requests.fetch_add(1, Ordering::SeqCst);
            buf.drain(..end + 4);
        }
    }
}

// ---------------------------------------------------------------------------
// Proxy config
// ---------------------------------------------------------------------------

/// One service of a [`ProxyYaml`].
pub struct ServiceYaml {
    name: String,
    lines: Vec<String>,
    endpoints: Vec<String>,
}

impl ServiceYaml {
    /// A service called `name` (HTTP/1.1, default balancer).
    pub fn new(name: &str) -> ServiceYaml {
        ServiceYaml {
            name: name.to_owned(),
            lines: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// Any `key: value` line of the service.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.lines.push(format!("{key}: {value}"));
        self
    }

    /// Upstream HTTP/2 (h2c).
    pub fn http2(self) -> Self {
        self.set("protocol", "http2")
    }

    /// The balancer: `p2c_ewma`, `round_robin` or `least_request`.
    pub fn lb(self, lb: &str) -> Self {
        self.set("lb", lb)
    }

    /// An endpoint with a subset and weight.
    pub fn endpoint(mut self, addr: SocketAddr, subset: &str, weight: u32) -> Self {
        self.endpoints.push(format!(
            "{{ addr: \"{addr}\", subset: {subset}, weight: {weight} }}"
        ));
        self
    }

    /// An endpoint in subset `v1`, weight 1.
    pub fn at(self, addr: SocketAddr) -> Self {
        self.endpoint(addr, "v1", 1)
    }

    /// A percent split over subsets.
    pub fn split(self, weights: &[(&str, u32)]) -> Self {
        let inner: Vec<String> = weights.iter().map(|(s, w)| format!("{s}: {w}")).collect();
        self.set("split", &format!("{{ {} }}", inner.join(", ")))
    }

    /// Connect and request timeouts (`1s`, `200ms`, ...).
    pub fn timeouts(self, connect: &str, request: &str) -> Self {
        self.set(
            "timeouts",
            &format!("{{ connect: {connect}, request: {request} }}"),
        )
    }

    /// The service's concurrency limit.
    pub fn max_requests(self, n: u32) -> Self {
        self.set("circuit_breaker", &format!("{{ max_requests: {n} }}"))
    }
}

/// A proxy config, built up in YAML with every address on port 0.
#[derive(Default)]
pub struct ProxyYaml {
    listeners: Vec<Option<String>>,
    /// Listeners given whole, as YAML flow mappings (after `listeners`).
    raw_listeners: Vec<String>,
    services: Vec<ServiceYaml>,
    top: Vec<String>,
}

impl ProxyYaml {
    /// An empty config (add listeners and services).
    pub fn new() -> ProxyYaml {
        ProxyYaml::default()
    }

    /// A listener that routes by `Host` / `:authority`.
    pub fn by_host(mut self) -> Self {
        self.listeners.push(None);
        self
    }

    /// A listener bound to one service.
    pub fn bound_to(mut self, service: &str) -> Self {
        self.listeners.push(Some(service.to_owned()));
        self
    }

    /// A listener given whole, as a YAML flow mapping (`{ bind: ..., ... }`);
    /// it comes after those of `by_host` and `bound_to`.
    pub fn listener(mut self, flow: &str) -> Self {
        self.raw_listeners.push(flow.to_owned());
        self
    }

    /// A service.
    pub fn service(mut self, svc: ServiceYaml) -> Self {
        self.services.push(svc);
        self
    }

    /// Any top-level `key: value` line.
    pub fn top(mut self, line: &str) -> Self {
        self.top.push(line.to_owned());
        self
    }

    /// The YAML text.
    pub fn build(&self) -> String {
        let mut out = String::from("admin: 127.0.0.1:0\n");
        for line in &self.top {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("listeners:\n");
        for l in &self.listeners {
            out.push_str("  - bind: 127.0.0.1:0\n");
            if let Some(svc) = l {
                out.push_str(&format!("    service: {svc}\n"));
            }
        }
        for l in &self.raw_listeners {
            out.push_str(&format!("  - {l}\n"));
        }
        out.push_str("services:\n");
        for s in &self.services {
            out.push_str(&format!("  {}:\n", s.name));
            for line in &s.lines {
                out.push_str(&format!("    {line}\n"));
            }
            out.push_str("    endpoints:\n");
            for e in &s.endpoints {
                out.push_str(&format!("      - {e}\n"));
            }
        }
        out
    }

    /// Starts the proxy in-process.
    pub async fn start(&self) -> TestProxy {
        TestProxy::start(&self.build()).await
    }
}

// ---------------------------------------------------------------------------
// The proxy, in-process
// ---------------------------------------------------------------------------

/// A proxy running in this test's runtime on port 0.
pub struct TestProxy {
    /// Listener addresses, in config order.
    pub listeners: Vec<SocketAddr>,
    /// Admin address.
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Loads `yaml` (it must bind port 0) and serves it.
    pub async fn start(yaml: &str) -> TestProxy {
        let config = almond_config::load_proxy(yaml, "test")
            .unwrap_or_else(|e| panic!("test config refused:\n{e}\n---\n{yaml}"));
        let bound = almond_proxy::Bound::bind(&config).unwrap();
        let listeners = bound.listener_addrs();
        let admin = bound.admin_addr().unwrap();
        let proxy = almond_proxy::Proxy::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(bound, async {
            let _ = rx.await;
        }));
        TestProxy {
            listeners,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The first listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0]
    }

    /// Signals shutdown and waits for the proxy to drain and stop.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within("proxy shutdown", task).await.unwrap();
        }
    }

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        admin_get(self.admin, path).await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// `GET path` on an admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    let mut c = H1::connect(admin).await;
    // Asked by its address, as `curl http://127.0.0.1:4191/...` asks it.
    c.get(&admin.to_string(), path).await
}

/// The sum of the samples of metric `name` whose labels include every
/// pair of `labels` (0 when none match).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// HTTP version of the client's connection.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any arrived.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// Reads `resp` to its end.
    pub async fn read(resp: Response<Incoming>) -> Reply {
        let (parts, body) = resp.into_parts();
        let collected = within("response body", body.collect())
            .await
            .expect("response body failed");
        let trailers = collected.trailers().cloned();
        Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        }
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (a backend's echo, an admin page).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Which backend answered (`x-backend`).
    pub fn backend(&self) -> &str {
        self.header("x-backend").unwrap_or("(none)")
    }
}

/// One HTTP/1.1 client connection (keep-alive): every request goes over it.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl H1 {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = within("h1 connect", TcpStream::connect(addr))
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H1 { sender }
    }

    /// Sends a request and returns its response head (body unread).
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        within("h1 ready", self.sender.ready())
            .await
            .expect("h1 connection closed");
        within("h1 response", self.sender.send_request(req))
            .await
            .expect("h1 request failed")
    }

    /// Sends a request and reads the response in full.
    pub async fn request(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        Reply::read(resp).await
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> Reply {
        self.request(h1_get(host, path)).await
    }
}

/// A `GET` in origin-form with a `Host` header.
pub fn h1_get(host: &str, path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap()
}

/// `GET path` with `Host: host` on a fresh HTTP/1.1 connection.
pub async fn get_h1(addr: SocketAddr, host: &str, path: &str) -> Reply {
    H1::connect(addr).await.get(host, path).await
}

/// One h2c (prior knowledge) client connection; clones share it.
#[derive(Clone)]
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl H2 {
    /// Connects to `addr` and does the HTTP/2 handshake.
    pub async fn connect(addr: SocketAddr) -> H2 {
        let stream = within("h2 connect", TcpStream::connect(addr))
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 { sender }
    }

    /// Sends a request (its URI must be absolute: it gives `:authority`).
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        within("h2 ready", self.sender.ready())
            .await
            .expect("h2 connection closed");
        within("h2 response", self.sender.send_request(req))
            .await
            .expect("h2 request failed")
    }

    /// Sends a request and reads the response in full.
    pub async fn request(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        Reply::read(resp).await
    }

    /// `GET http://authority/path`.
    pub async fn get(&mut self, authority: &str, path: &str) -> Reply {
        self.request(h2_get(authority, path)).await
    }
}

/// A `GET` with an absolute URI (`:authority` = `authority`).
pub fn h2_get(authority: &str, path: &str) -> Request<Body> {
    Request::get(format!("http://{authority}{path}"))
        .version(Version::HTTP_2)
        .body(empty())
        .unwrap()
}

/// Writes `bytes` on a fresh TCP connection and reads until the peer
/// closes; returns everything read, lossily as text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let stream = within("raw connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    // Write while reading: a server may answer (and close) before it has
    // read everything, and its answer is what the test wants.
    let bytes = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    within("raw read to close", async {
        // A reset after the answer is fine: what arrived before it counts.
        while let Ok(n) = rd.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    drop(writer.await);
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// The proxy as the real binary
// ---------------------------------------------------------------------------

/// An HTTP/2 upstream on 127.0.0.1 (the `h2` crate's server, for what
/// hyper's does not let a test do: resets, answers before the body) that
/// hands each stream to `serve`, in a task of its own; its address.
pub async fn h2_upstream<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(serve(req, respond));
                }
            });
        }
    });
    addr
}

/// Writes `text` to a scratch file (removed when the handle drops) in
/// cargo's per-target temp directory.
pub fn write_temp(suffix: &str, text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("almond-test-")
        .suffix(suffix)
        .tempfile_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file
}

/// The `almond` binary under test.
pub fn almond() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_almond"))
}

/// Runs `almond ARGS` to completion; returns (status, stdout, stderr).
pub async fn run_almond(args: &[&str]) -> (ExitStatus, String, String) {
    let out = within(
        "almond to exit",
        almond()
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `almond proxy --config FILE` as a child process. Its addresses are read
/// from its JSON start-up logs (so the config can bind port 0), and it is
/// ready once its admin `/ready` answers 200.
pub struct ProxyProcess {
    child: tokio::process::Child,
    /// The process id.
    pub pid: u32,
    /// Listener addresses, in config order.
    pub listeners: Vec<SocketAddr>,
    /// Admin address.
    pub admin: SocketAddr,
    logs: Arc<Mutex<String>>,
    /// The task reading stderr into `logs`: done at the process's exit,
    /// once the pipe is drained.
    reader: Option<tokio::task::JoinHandle<()>>,
    config: tempfile::NamedTempFile,
}

impl ProxyProcess {
    /// Writes `yaml` to a scratch file, starts the proxy on it and waits
    /// until it is ready.
    pub async fn start(yaml: &str) -> ProxyProcess {
        let config = write_temp(".yaml", yaml);
        let mut child = almond()
            .arg("proxy")
            .arg("--config")
            .arg(config.path())
            .env("ALMOND_LOG_FORMAT", "json")
            .env("ALMOND_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel();
        let reader;
        {
            // Keep reading stderr for the process's whole life, so it never
            // blocks on a full pipe; pass on the addresses it logs.
            let logs = logs.clone();
            reader = tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        let message = v["message"].as_str().unwrap_or("");
                        let addr = match message {
                            "listening" => v["addr"].as_str().map(|a| (false, a.to_owned())),
                            "admin listening" => v["admin"].as_str().map(|a| (true, a.to_owned())),
                            _ => None,
                        };
                        if let Some((is_admin, a)) = addr {
                            let _ = addr_tx.send((is_admin, a.parse::<SocketAddr>().unwrap()));
                        }
                    }
                    let mut logs = logs.lock().unwrap();
                    logs.push_str(&line);
                    logs.push('\n');
                }
            });
        }
        let mut listeners = Vec::new();
        let admin = loop {
            let next = tokio::time::timeout(DEADLINE, addr_rx.recv()).await;
            match next {
                Ok(Some((true, a))) => break a,
                Ok(Some((false, a))) => listeners.push(a),
                _ => panic!(
                    "almond proxy did not log its addresses; stderr:\n{}",
                    logs.lock().unwrap()
                ),
            }
        };
        let process = ProxyProcess {
            child,
            pid,
            listeners,
            admin,
            logs,
            reader: Some(reader),
            config,
        };
        eventually("the proxy binary's /ready answers 200", || async {
            match TcpStream::connect(admin).await {
                Ok(_) => admin_get(admin, "/ready").await.status == StatusCode::OK,
                Err(_) => false,
            }
        })
        .await;
        process
    }

    /// The first listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0]
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Sends SIGTERM (through `kill`, to this child's own pid).
    pub async fn terminate(&self) {
        self.signal("TERM").await;
    }

    /// Sends signal `name` (`HUP`, `USR1`, ...) through `kill`.
    pub async fn signal(&self, name: &str) {
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// The config file it was started on (rewrite it, then send `HUP`).
    pub fn config_path(&self) -> &std::path::Path {
        self.config.path()
    }

    /// Waits for the process to exit, and for everything it logged to be
    /// read (its last lines can still be in the pipe when it exits).
    pub async fn wait(&mut self) -> ExitStatus {
        let status = within("almond proxy to exit", self.child.wait())
            .await
            .unwrap();
        if let Some(reader) = self.reader.take() {
            let _ = within("almond proxy's stderr to be read", reader).await;
        }
        status
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Only this child, by its own handle.
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------
// The control plane, in-process, on a file registry
// ---------------------------------------------------------------------------

/// A registry directory for the control plane's file source, and a policy
/// file path next to it (both removed when this drops).
pub struct Registry {
    dir: tempfile::TempDir,
    /// The directory of service files.
    pub services: std::path::PathBuf,
    /// The policy file (`store: file`); not created until a split is set.
    pub policy_file: std::path::PathBuf,
}

impl Registry {
    /// An empty registry in cargo's per-target temp directory.
    pub fn new() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("almond-registry-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let services = dir.path().join("services");
        std::fs::create_dir(&services).unwrap();
        let policy_file = dir.path().join("policy.json");
        Registry {
            dir,
            services,
            policy_file,
        }
    }

    /// A scratch path inside the registry's temp directory (not watched).
    pub fn scratch(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `services/FILE` atomically (a temporary file outside the
    /// watched extensions, then a rename), so the watcher never reads half
    /// a file.
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.services.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.services.join(file)).unwrap();
    }

    /// Writes `services/NAME.yaml` with service `name` on `endpoints`
    /// (address, subset).
    pub fn service(&self, name: &str, endpoints: &[(SocketAddr, &str)]) {
        self.write(&format!("{name}.yaml"), &service_file(name, endpoints));
    }

    /// As [`Registry::service`], with balancer `lb` (`round_robin` makes
    /// an added endpoint get traffic at once; `p2c_ewma` starts it on a
    /// pessimistic latency prior, so a light sequential load may not reach
    /// it for many seconds).
    pub fn service_lb(&self, name: &str, lb: &str, endpoints: &[(SocketAddr, &str)]) {
        let text = service_file(name, endpoints).replacen(
            "\n  endpoints:",
            &format!("\n  lb: {lb}\n  endpoints:"),
            1,
        );
        self.write(&format!("{name}.yaml"), &text);
    }

    /// Removes `services/FILE`.
    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.services.join(file)).unwrap();
    }

    /// A control config on this registry, `store: file`, binding port 0
    /// (the listener is bound by the test), with `token_env` if given.
    pub fn control_yaml(&self, token_env: Option<&str>) -> String {
        let mut yaml = format!(
            "listen: 127.0.0.1:0\nsource: {{ file: \"{}\" }}\nstore: file\npolicy_file: \"{}\"\n",
            self.services.display(),
            self.policy_file.display()
        );
        if let Some(env) = token_env {
            yaml.push_str(&format!("token_env: {env}\n"));
        }
        yaml
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

/// A registry file: service `name` on `endpoints` (address, subset).
pub fn service_file(name: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let mut out = format!("{name}:\n  endpoints:\n");
    for (addr, subset) in endpoints {
        out.push_str(&format!("    - {{ addr: \"{addr}\", subset: {subset} }}\n"));
    }
    out
}

/// The control plane running in this test's runtime on `127.0.0.1:0`.
pub struct TestControl {
    /// Where its API listens.
    pub addr: SocketAddr,
    /// Its shared state.
    pub state: Arc<almond_control::state::State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestControl {
    /// Loads `yaml` (a control config) and serves it on a fresh port;
    /// returns once its `/ready` answers 200 (the registry has been read).
    pub async fn start(yaml: &str) -> TestControl {
        let control = TestControl::launch_unready(yaml).await;
        eventually("the control plane's /ready answers 200", || async {
            control.get("/ready").await.status == StatusCode::OK
        })
        .await;
        control
    }

    /// `http://ADDR`, for proxies and the CLI.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET path` on the API (fresh connection).
    pub async fn get(&self, path: &str) -> Reply {
        get_h1(self.addr, &self.addr.to_string(), path).await
    }

    /// `GET /v1/services/{svc}` as JSON (it must answer 200).
    pub async fn service(&self, svc: &str) -> serde_json::Value {
        let reply = self.get(&format!("/v1/services/{svc}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }

    /// `METHOD path` with a JSON body and an optional bearer token.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(full(body.to_string())).unwrap();
        H1::connect(self.addr).await.request(req).await
    }

    /// `PUT /v1/services/{svc}/split` with `body`.
    pub async fn put_split(
        &self,
        svc: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> Reply {
        self.send(
            Method::PUT,
            &format!("/v1/services/{svc}/split"),
            body,
            token,
        )
        .await
    }

    /// Signals shutdown and waits for the control plane to stop.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within("control plane shutdown", task).await.unwrap();
        }
    }
}

impl Drop for TestControl {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A proxy config that follows the control plane at `control` (one
/// by-host listener), with a snapshot cache at `cache` if given.
pub fn control_proxy_yaml(control: &str, cache: Option<&std::path::Path>) -> String {
    let mut out = format!("admin: 127.0.0.1:0\ncontrol: {control}\nproxy_id: test-proxy\n");
    if let Some(cache) = cache {
        out.push_str(&format!("cache: \"{}\"\n", cache.display()));
    }
    out.push_str("listeners:\n  - bind: 127.0.0.1:0\n");
    out
}

/// Starts an in-process proxy following `control` and waits until its
/// `/ready` answers 200 (a snapshot, or the cache, is in force).
pub async fn start_following(control: &str, cache: Option<&std::path::Path>) -> TestProxy {
    start_following_with(&control_proxy_yaml(control, cache)).await
}

/// As [`start_following`], presenting the token in env var `token_env`.
pub async fn start_following_token(control: &str, token_env: &str) -> TestProxy {
    let yaml = format!(
        "{}token_env: {token_env}\n",
        control_proxy_yaml(control, None)
    );
    start_following_with(&yaml).await
}

/// Starts an in-process proxy on `yaml` (a following config) and waits
/// until its `/ready` answers 200.
pub async fn start_following_with(yaml: &str) -> TestProxy {
    let proxy = TestProxy::start(yaml).await;
    eventually("the proxy's /ready answers 200", || async {
        proxy.admin_get("/ready").await.status == StatusCode::OK
    })
    .await;
    proxy
}

/// A metric of the proxy's `/metrics`, as in [`metric`].
pub async fn proxy_metric(proxy: &TestProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = proxy.admin_get("/metrics").await.text();
    metric(&text, name, labels)
}

/// Runs `almond ARGS` for an operator command with `ALMOND_TOKEN` and
/// `ALMOND_CONTROL` cleared from its environment (the test passes what it
/// means); returns (exit code, stdout, stderr).
pub async fn run_ops(args: &[&str]) -> (Option<i32>, String, String) {
    let out = within(
        "almond to exit",
        almond()
            .args(args)
            .env_remove("ALMOND_TOKEN")
            .env_remove("ALMOND_CONTROL")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl TestControl {
    /// Like [`TestControl::start`], but on `addr`: a control plane
    /// restarted on the port its proxies already follow. Retries the bind
    /// while the previous listener's socket is being released.
    pub async fn start_on(yaml: &str, addr: SocketAddr) -> TestControl {
        let listener = within("rebind the control port", async {
            loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let control = TestControl::serve_on(yaml, listener);
        eventually(
            "the restarted control plane's /ready answers 200",
            || async { control.get("/ready").await.status == StatusCode::OK },
        )
        .await;
        control
    }
}

// ---------------------------------------------------------------------------
// The control plane on a Consul (double)
// ---------------------------------------------------------------------------

impl TestControl {
    /// Like [`TestControl::start`], but returns at once, without waiting
    /// for `/ready` (for tests of readiness itself).
    pub async fn launch_unready(yaml: &str) -> TestControl {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestControl::serve_on(yaml, listener)
    }

    /// Loads `yaml` and serves it on `listener`; returns at once.
    fn serve_on(yaml: &str, listener: TcpListener) -> TestControl {
        let config = almond_config::load_control(yaml, "test")
            .unwrap_or_else(|e| panic!("test control config refused:\n{e}\n---\n{yaml}"));
        let addr = listener.local_addr().unwrap();
        let control = almond_control::Control::new(config).unwrap();
        let state = control.state().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(control.run(listener, async {
            let _ = rx.await;
        }));
        TestControl {
            addr,
            state,
            stop: Some(tx),
            task: Some(task),
        }
    }
}

/// A metric of the control plane's `/metrics`, as in [`metric`].
pub async fn control_metric(control: &TestControl, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = control.get("/metrics").await.text();
    metric(&text, name, labels)
}

/// A control config on the Consul at `consul` (`store: consul`,
/// `subset_key: version`), blocking queries of `wait` (e.g. `1s`), the
/// Consul ACL token read from the environment variable `token_env`; binds
/// port 0 (the listener is bound by the test).
pub fn consul_control_yaml(consul: &str, wait: &str, token_env: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nsource:\n  consul: {{ addr: \"{consul}\", wait: {wait}, token_env: {token_env} }}\nstore: consul\nsubset_key: version\n"
    )
}
