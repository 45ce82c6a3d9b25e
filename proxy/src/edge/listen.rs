//! Listen: the proxy listeners' accept loop (`almond_net`), the cap on open
//! connections, the mTLS handshake, the choice of HTTP/1.1 or HTTP/2 for
//! each connection, and the server for it: `h2`, or `h1` then hyper (whose
//! life `conn` follows).

use crate::body::{ClientBody, HyperBody};
use crate::edge::conn::{counted, drive, Activity};
use crate::edge::send_timeout::SendTimeout;
use crate::edge::serve;
use crate::edge::stop::unless_cut;
use crate::edge::{h1, h2};
use crate::identity::authz::{self, Identities, Inbound, NotAllowed};
use crate::Shared;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use almond_net::bind;

/// The settings of hyper's HTTP/1.1 server, which serves a connection
/// once the lean server hands it over.
#[derive(Clone)]
pub struct HttpServer {
    h1: http1::Builder,
}

/// The HTTP server settings for `limits`.
pub fn http_builder(limits: &almond_config::Limits) -> HttpServer {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // The head's limit, exactly (431 over it), whatever the reads'
        // sizes; the buffer's cap follows it.
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    HttpServer { h1 }
}

/// What a downstream connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which a client with
/// prior knowledge sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads, without consuming, the first bytes of a cleartext connection:
/// HTTP/2 if they are the connection preface, HTTP/1.1 otherwise; `None`
/// when the client closes first. The caller bounds the wait.
///
/// Peeking, not reading, keeps hyper's buffers unallocated until the
/// client speaks, and hands hyper the request whole: hyper-util's `auto`
/// server reads the first 24 bytes into a buffer of its own and replays
/// them, after which hyper's read buffer grows from 8 to 16 KiB for the
/// connection's life (benches/results/2026-12-04-memory.md).
async fn sniff(stream: &TcpStream) -> Option<Protocol> {
    let mut first = [0u8; PREFACE.len()];
    let mut pause = Duration::from_millis(2);
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // Part of the preface: peeking again at once would return the same
        // bytes, so wait for the rest a little, and longer each time (a
        // client that stops there costs a few wakeups, not 500 a second).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Counts a request head hyper's server refused (it answered 400, 414 or
/// 431 itself: the request never reached the pipeline, its metrics or
/// its access log).
fn count_malformed(shared: &Shared, e: &hyper::Error) {
    if e.is_parse() {
        shared.metrics.malformed.inc();
    }
}

/// Serves one HTTP/1.1 connection with hyper and `svc`, to its end.
async fn serve_h1<I, S>(
    server: &HttpServer,
    io: I,
    svc: S,
    stop: watch::Receiver<bool>,
    activity: &Activity,
    idle: Duration,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = hyper::Response<crate::edge::conn::Counted>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = server.h1.serve_connection(io, svc).with_upgrades();
    drive(conn, stop, activity, idle).await
}

/// Accepts on `listener` until `stop` changes; each connection's task is
/// spawned on `connections`, which the drain waits for, and ends when
/// `cut` changes (the drain's time is up).
pub async fn accept_loop(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    tls: Option<Arc<Inbound>>,
    (mut stop, cut): (watch::Receiver<bool>, watch::Receiver<bool>),
    connections: TaskTracker,
) {
    let limits = shared.table.load().config.limits.clone();
    let open = Arc::new(AtomicU32::new(0));
    let closing = stop.clone();
    almond_net::accept_until("proxy", &listener, &mut stop, |stream, peer| {
        // Over `max_connections`: closed at once (the client sees a reset or
        // EOF, not a hang), counted.
        let Some(slot) = ConnSlot::take(&open, limits.max_connections) else {
            shared.metrics.connections_refused.inc();
            tracing::debug!(%peer, max = limits.max_connections, "max_connections reached: connection closed");
            return;
        };
        let shared = shared.clone();
        let closing = closing.clone();
        let idle = limits.idle_timeout;
        let send_limit = limits.body_idle;
        let lean_limits = lean_limits(&limits);
        let h2_limits = h2_limits(&limits);
        match tls.clone() {
            // The handshake runs in the connection's own task.
            Some(inbound) => connections.spawn(unless_cut(cut.clone(), async move {
                let limits = (idle, h2_limits);
                serve_tls(shared, index, inbound, stream, slot, peer, closing, limits).await;
            })),
            None => connections.spawn(unless_cut(cut.clone(), async move {
                // A client that says nothing (or only part of the HTTP/2
                // preface) is closed after `header_timeout`, the time a
                // request head has.
                let mut stopping = closing.clone();
                let first_bytes = limits.header_timeout;
                let protocol = tokio::select! {
                    protocol = tokio::time::timeout(first_bytes, sniff(&stream)) => protocol.ok().flatten(),
                    _ = stopping.changed() => None,
                };
                let Some(protocol) = protocol else {
                    return drop(slot);
                };
                // A client that takes nothing of what is written to it is
                // not waited for past `body_idle`.
                let stream = SendTimeout::new(stream, send_limit);
                // HTTP/1.1: the lean server takes the simple requests; the
                // first it does not hands the connection to hyper.
                let lean = shared.clone();
                if protocol == Protocol::Http2 {
                    let handle = move |req| serve::handle(lean.clone(), index, peer, Box::new(req));
                    if let Err(e) = h2::serve(stream, h2_limits, closing, handle).await {
                        tracing::debug!(%peer, error = %e, "downstream h2 connection ended");
                    }
                    return drop(slot);
                }
                let handle = move |req| crate::boxed(|| serve::handle(lean.clone(), index, peer, req));
                let rewind = match h1::serve(stream, lean_limits, closing.clone(), handle).await {
                    h1::Ended::Closed => return drop(slot),
                    h1::Ended::Handoff(rewind) => rewind,
                };
                let activity = Arc::new(Activity::new());
                let server = shared.http.clone();
                let metrics = shared.clone();
                let unread = Arc::new(AtomicBool::new(false));
                let marks = unread.clone();
                let svc = counted(activity.clone(), move |req: Request<Incoming>| {
                    let req = req.map(|body| ClientBody::Hyper(HyperBody::new(body, &marks)));
                    closing_if_unread(marks.clone(), serve::handle(shared.clone(), index, peer, Box::new(req)))
                });
                // The place goes with the socket: into an upgrade's tunnel
                // too, which outlives hyper's connection.
                let io = TokioIo::new(Held::new(rewind, slot, unread));
                if let Err(e) = serve_h1(&server, io, svc, closing, &activity, idle).await {
                    count_malformed(&metrics, &e);
                    tracing::debug!(%peer, error = %e, "downstream connection ended");
                }
            })),
        };
    })
    .await;
}

/// The HTTP/2 server's share of `limits`.
fn h2_limits(limits: &almond_config::Limits) -> h2::Limits {
    h2::Limits {
        max_header_list: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
        keep_alive_interval: limits.keep_alive_interval,
        keep_alive_timeout: limits.keep_alive_timeout,
        idle_timeout: limits.idle_timeout,
        preface_timeout: limits.header_timeout,
        body_idle: limits.body_idle,
    }
}

/// The lean HTTP/1.1 server's share of `limits`.
fn lean_limits(limits: &almond_config::Limits) -> h1::Limits {
    h1::Limits {
        header_timeout: limits.header_timeout,
        idle_timeout: limits.idle_timeout,
        max_head: limits.max_header_bytes,
    }
}

/// One of a listener's `max_connections` places, given back when dropped.
struct ConnSlot(Arc<AtomicU32>);

impl ConnSlot {
    fn take(open: &Arc<AtomicU32>, max: u32) -> Option<ConnSlot> {
        let mut now = open.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match open.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ConnSlot(open.clone())),
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's socket with its `max_connections` place: whoever holds
/// the socket holds the place, an upgrade's tunnel included (it outlives
/// hyper's connection, which hands the socket over). When a request's
/// upload was left unread (`unread`, set by its body: the proxy answered
/// before taking it all), the socket lingers as it closes.
struct Held<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `None` only once dropped.
    io: Option<IO>,
    slot: Option<ConnSlot>,
    unread: Arc<AtomicBool>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Held<IO> {
    fn new(io: IO, slot: ConnSlot, unread: Arc<AtomicBool>) -> Held<IO> {
        Held {
            io: Some(io),
            slot: Some(slot),
            unread,
        }
    }

    fn io(&mut self) -> std::io::Result<Pin<&mut IO>> {
        match &mut self.io {
            Some(io) => Ok(Pin::new(io)),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Held<IO> {
    fn drop(&mut self) {
        if !self.unread.load(Ordering::Relaxed) {
            return;
        }
        if let (Some(io), Some(slot), Ok(rt)) = (
            self.io.take(),
            self.slot.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(linger(io, slot));
        }
    }
}

/// An answer made with its request's upload left unread (the proxy
/// answered first) ends its connection: it says so (`Connection: close`,
/// RFC 9110 §9.6), as nginx and Envoy do, rather than have the client
/// send its next request on a connection about to close.
async fn closing_if_unread(
    unread: Arc<AtomicBool>,
    answer: impl std::future::Future<
        Output = Result<crate::pipeline::forward::Reply, std::convert::Infallible>,
    >,
) -> Result<crate::pipeline::forward::Reply, std::convert::Infallible> {
    let mut resp = answer.await?;
    if unread.load(Ordering::Relaxed) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    Ok(resp)
}

/// Longest a closing connection reads its client's unread upload, and
/// longest it waits for the next byte of it (nginx's `lingering_time` and
/// `lingering_timeout`).
const LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// nginx's lingering close: a connection closed with its client's upload
/// unread (the proxy answered first: a 404, 403, 413, 429, 503...) reads
/// and drops the rest until the client stops sending (quiet for
/// `LINGER_QUIET`), closes, or `LINGER_TIME` passes, its place still
/// held. Closed at once, the socket would answer the rest of the upload
/// with a reset, which can destroy the answer before the client reads it
/// (RFC 9112 §9.6): a client that writes its whole upload before it reads
/// saw "connection reset", not the 429 and its `Retry-After`.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, slot: ConnSlot) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = tokio::time::Instant::now() + LINGER_TIME;
    // The answer is written; this says no more comes (hyper may have).
    let _ = tokio::time::timeout_at(end, io.shutdown()).await;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let quiet = (tokio::time::Instant::now() + LINGER_QUIET).min(end);
        match tokio::time::timeout_at(quiet, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    drop(slot);
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Held<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Held<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Serves one connection on a `tls` listener: the mTLS handshake (bounded
/// by `limits.header_timeout`, against clients that stall in it), then
/// HTTP/1.1 or HTTP/2 (ALPN); a client whose certificate names no identity
/// of the listener's `allow` list gets 403 on every request.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    shared: Arc<Shared>,
    index: usize,
    inbound: Arc<Inbound>,
    stream: TcpStream,
    slot: ConnSlot,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    limits: (Duration, h2::Limits),
) {
    let (timeout, send_limit) = {
        let table = shared.table.load();
        (
            table.config.limits.header_timeout,
            table.config.limits.body_idle,
        )
    };
    let shared_http = shared.http.clone();
    let metrics = shared.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(inbound.tls.server());
    // A client that takes nothing of what is written to it is not waited
    // for past `body_idle`.
    let stream = SendTimeout::new(stream, send_limit);
    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, "tls handshake timed out");
            return;
        }
    };
    let names = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| authz::identities(leaf))
        .unwrap_or_default();
    let allowed = inbound.allows(&names);
    if !allowed {
        tracing::info!(%peer, identities = ?names, "client identity not allowed");
    }
    // Over TLS, HTTP/2 is chosen by ALPN (RFC 9113 §3.2).
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    let identity: Arc<str> = Arc::from(names.first().map_or("client", String::as_str));
    let identities = Identities(names.into());
    // Every request carries the client's identities (for `authz`), and
    // one not allowed here is marked, to be answered 403 by the pipeline
    // (with its request ID, access log line, span and tap summary).
    let serve = move |mut req: Request<ClientBody>| {
        let shared = shared.clone();
        req.extensions_mut().insert(identities.clone());
        if !allowed {
            req.extensions_mut().insert(NotAllowed(identity.clone()));
        }
        serve::handle(shared, index, peer, Box::new(req))
    };
    let (idle, h2_limits) = limits;
    let ended = match protocol {
        Protocol::Http2 => {
            (h2::serve(stream, h2_limits, stop, serve).await).map_err(|e| e.to_string())
        }
        Protocol::Http1 => {
            let server = serve;
            let activity = Arc::new(Activity::new());
            let unread = Arc::new(AtomicBool::new(false));
            let marks = unread.clone();
            let svc = counted(activity.clone(), move |req: Request<Incoming>| {
                let req = req.map(|body| ClientBody::Hyper(HyperBody::new(body, &marks)));
                closing_if_unread(marks.clone(), server(req))
            });
            let io = TokioIo::new(Held::new(stream, slot, unread));
            let http = shared_http;
            let ended = serve_h1(&http, io, svc, stop, &activity, idle).await;
            if let Err(e) = &ended {
                count_malformed(&metrics, e);
            }
            ended.map_err(|e| e.to_string())
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "downstream tls connection ended");
    }
}
