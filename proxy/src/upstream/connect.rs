//! Connect: the connections to one endpoint -- LIFO pools of idle
//! HTTP/1.1 connections (hyper's, and the lean client's), shared HTTP/2
//! connections (`upstream/h2.rs`; another opens when those open have no
//! room for a stream) -- opened (TCP, then TLS) within the connect
//! timeout, and one request sent over them.

use crate::body::{BodyError, RequestBody};
use crate::headers;
use crate::identity::tls::{Conn, Upstream};
use crate::limit::Admission;
use crate::observe::trace::Stamp;
use crate::outcome::ErrorKind;
use crate::upstream::h1::{self, LeanBody};
use crate::upstream::h2::{self, Outgoing};
use crate::upstream::pool::{Pool, Reusable};
use almond_config::Protocol;
use arc_swap::ArcSwap;
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed.
const MAX_IDLE_H1: usize = 512;
/// New connections one try may open before it gives up: an endpoint that
/// accepts and closes at once must not keep a request connecting until
/// its timeout.
const MAX_FRESH_H1: u32 = 2;
/// HTTP/2 connections kept open to one endpoint: past them, a request
/// waits for a stream on the least busy one (a server that takes no
/// streams at all must not get a new connection for every request).
const MAX_H2_CONNECTIONS: usize = 16;
/// Longest a connection whose upload outlived its answer is waited for,
/// to be pooled once the upload is over.
const UPLOAD_WAIT: Duration = Duration::from_secs(60);
/// An idle HTTP/1.1 connection's sending half.
pub type H1Sender = http1::SendRequest<RequestBody>;

/// hyper's HTTP/1.1 connection waits in a [`Pool`] until it closes.
impl Reusable for H1Sender {
    fn usable(&self) -> bool {
        !self.is_closed()
    }
}

/// How a service's endpoints are reached: what every try shares.
#[derive(Clone)]
pub struct Target {
    /// Upstream protocol.
    pub protocol: Protocol,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled HTTP/1.1 connections, and HTTP/2 ones with no stream,
    /// are closed after this long.
    pub idle_timeout: Duration,
    /// Requests waiting for a new connection (`circuit_breaker.max_pending`).
    pub pending: Arc<Admission>,
    /// Upstream TLS (`tls: true` services), with the server name to verify.
    pub tls: Option<Arc<Upstream>>,
}

/// The connections to one endpoint address.
pub struct Connections {
    addr: SocketAddr,
    /// Open connections (for `/endpoints`).
    open: Arc<AtomicU32>,
    /// Idle HTTP/1.1 connections of hyper's client.
    h1_idle: Arc<Pool<H1Sender>>,
    /// Idle connections of the lean HTTP/1.1 client (`upstream/h1.rs`).
    lean: Arc<Pool<Box<h1::Connection<Conn>>>>,
    /// HTTP/2 connections, oldest first: a request takes the first with
    /// room for a stream, and opens another when none has (as Envoy does
    /// at a server's `SETTINGS_MAX_CONCURRENT_STREAMS`).
    h2: ArcSwap<Vec<h2::Sender>>,
    /// One opener of an HTTP/2 connection at a time; it holds when the
    /// last attempt failed and how, so that those who waited for it fail
    /// at once with it rather than each try in turn.
    h2_connecting: tokio::sync::Mutex<Option<(Instant, ErrorKind)>>,
}

impl Connections {
    /// No connection yet to `addr`.
    pub fn new(addr: SocketAddr) -> Connections {
        Connections {
            addr,
            open: Arc::new(AtomicU32::new(0)),
            h1_idle: Arc::new(Pool::new(MAX_IDLE_H1)),
            lean: Arc::new(Pool::new(MAX_IDLE_H1)),
            h2: ArcSwap::from_pointee(Vec::new()),
            h2_connecting: tokio::sync::Mutex::new(None),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Sends over HTTP/1.1: the most recently used idle connection if one
    /// is ready (unless `fresh`), else a new one. Returns the sender to pool
    /// once the response body ends. `connected` gets the time spent opening
    /// a connection, if one was.
    #[allow(clippy::too_many_arguments)]
    // Not `async fn`: it would keep the request twice (docs/architecture.md).
    #[allow(clippy::manual_async_fn)]
    pub fn send_h1<'a>(
        &'a self,
        mut req: Request<RequestBody>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        fresh: bool,
        pending: &'a Arc<Admission>,
        tls: Option<&'a Upstream>,
        connected: &'a mut Option<Duration>,
    ) -> impl Future<Output = Result<(Response<Incoming>, H1Sender), SendError>> + Send + 'a {
        async move {
            let mut opened = 0;
            // Only a request that may be sent twice goes again after a
            // reused connection closed on it (see `send_lean`).
            let idempotent = headers::idempotent(req.method());
            let method = req.method().clone();
            loop {
                let pooled = if fresh {
                    None
                } else {
                    self.h1_idle.pop(Instant::now(), idle_timeout)
                };
                let reused = pooled.is_some();
                let mut sender = match pooled {
                    Some(s) => s,
                    None if opened == MAX_FRESH_H1 => {
                        return Err(SendError::unsent(ErrorKind::Reset, req));
                    }
                    // Boxed: connecting is rare, and keeps this future small.
                    None => {
                        opened += 1;
                        let start = Instant::now();
                        let opened =
                            Box::pin(self.connect_pending(pending, connect_timeout, tls)).await;
                        *connected = Some(start.elapsed());
                        match opened {
                            Ok(s) => s,
                            Err(kind) => return Err(SendError::unsent(kind, req)),
                        }
                    }
                };
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(req).await {
                    // A 101 to a request that asked for no upgrade, or a
                    // coding the proxy would undo without saying so: a
                    // 502, and the connection not kept.
                    Ok(resp) if h1::unrelayable(&method, resp.status(), resp.headers()) => {
                        return Err(SendError::sent(ErrorKind::Reset));
                    }
                    Ok(mut resp) => {
                        let status = resp.status();
                        h1::tidy_length(status, resp.headers_mut());
                        return Ok((resp, sender));
                    }
                    Err(mut e) => match e.take_message() {
                        // Never written: the pooled connection had closed
                        // under us, so try again on another.
                        Some(r) => req = r,
                        None => {
                            let mut err = SendError::sent(classify(e.error()));
                            err.stale = reused && idempotent && closed_before_answer(e.error());
                            return Err(err);
                        }
                    },
                }
            }
        }
    }

    /// Closes the idle connections that have been idle `idle_timeout` or
    /// more (the oldest are at the bottom of the stacks); returns how many
    /// are left.
    pub fn close_idle(&self, now: Instant, idle_timeout: Duration) -> usize {
        self.h1_idle.close_idle(now, idle_timeout) + self.lean.close_idle(now, idle_timeout)
    }

    /// Sends a request whose body is known whole with the lean HTTP/1.1
    /// client, in this task: the most recently used idle lean connection
    /// (unless `fresh`), else a new one. A reused connection that closes
    /// before any answer is stale (the upstream closed it idle).
    // Not `async fn`: it would keep its arguments twice (docs/architecture.md).
    #[allow(clippy::manual_async_fn)]
    pub fn send_lean<'a>(
        &'a self,
        head: h1::Head<'a>,
        target: LeanTarget<'a>,
        fresh: bool,
        connected: &'a mut Option<Duration>,
    ) -> impl Future<Output = Result<Response<LeanBody>, LeanError>> + Send + 'a {
        async move {
            let pooled = if fresh {
                None
            } else {
                self.lean.pop(target.at, target.idle_timeout)
            };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(c) => c,
                // Boxed: connecting is rare, and keeps this future small.
                None => {
                    let start = Instant::now();
                    let opened = Box::pin(async {
                        let Some(_place) = target.pending.try_acquire() else {
                            return Err(ErrorKind::Overloaded);
                        };
                        self.connect(target.connect_timeout, target.tls, false)
                            .await
                    })
                    .await;
                    *connected = Some(start.elapsed());
                    match opened {
                        Ok(io) => Box::new(h1::Connection::new(
                            io.into_inner(),
                            Some(self.open.clone()),
                        )),
                        Err(kind) => return Err(LeanError::Unsent(kind)),
                    }
                }
            };
            // A pooled connection the upstream closed before it was taken is
            // never taken (`Stir`). One that closes after the request went,
            // before any answer, was most likely closed idle as it went, but
            // the upstream may have done the work and died: only a request
            // that may be sent twice goes again (Go's `http.Transport`).
            let again = reused && headers::idempotent(head.method);
            match conn.send(head, Some(self.lean.clone()), target.at).await {
                Ok(resp) => Ok(resp),
                Err(h1::Error::Closed) if again => Err(LeanError::Stale),
                Err(e) => {
                    tracing::debug!(endpoint = %self.addr, error = %e, "upstream exchange failed");
                    Err(LeanError::Sent(ErrorKind::Reset))
                }
            }
        }
    }

    /// Opens an HTTP/1.1 connection while holding a `max_pending` place.
    async fn connect_pending(
        &self,
        pending: &Arc<Admission>,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
    ) -> Result<H1Sender, ErrorKind> {
        let Some(_place) = pending.try_acquire() else {
            return Err(ErrorKind::Overloaded);
        };
        self.connect_h1(connect_timeout, tls).await
    }

    /// Puts an HTTP/1.1 connection back once its response is complete.
    pub fn release_h1(&self, sender: H1Sender) {
        if sender.is_ready() {
            self.h1_idle.push(sender, Instant::now());
            return;
        }
        // Not ready for another request: the upstream answered before the
        // request's body was all sent, and it is still going up. Pooled
        // now, the next request would take it and wait behind the upload;
        // it is pooled once the upload is over (or closed with it).
        let pool = self.h1_idle.clone();
        let mut sender = sender;
        tokio::spawn(async move {
            // Bounded: an upload the upstream never takes does not keep
            // this task (the connection ends with the upload, or when the
            // upstream closes it).
            let ready = tokio::time::timeout(UPLOAD_WAIT, sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                pool.push(sender, Instant::now());
            }
        });
    }

    /// Sends over the endpoint's first HTTP/2 connection with room for a
    /// stream, opening one first if none has (one opener at a time; the
    /// others wait for it), `stamp`'s fields after the head's.
    /// `connected` gets the time spent opening the connection, if it was.
    // Not `async fn`: it would keep the request twice (docs/architecture.md).
    #[allow(clippy::manual_async_fn)]
    pub fn send_h2<'a>(
        &'a self,
        req: Request<RequestBody>,
        target: &'a Target,
        connected: &'a mut Option<Duration>,
        stamp: &'a Stamp,
    ) -> impl Future<Output = Result<Response<h2::RecvBody>, SendError>> + Send + 'a {
        async move {
            let mut sender = match self.live_h2() {
                Some(s) => s,
                // Boxed: rare, and its state (the lock's wait, the
                // connect) would size every request's future.
                None => match Box::pin(self.open_h2(target, connected)).await {
                    Ok(s) => s,
                    Err(kind) => return Err(SendError::unsent(kind, req)),
                },
            };
            if !sender.ready().await {
                // Going away (a GOAWAY came) or gone: the request was never
                // sent, so it goes again on a new connection, as a stale
                // HTTP/1.1 one does. (`ready` marked this one closed: the
                // next opener replaces it, and a newer one is left alone.)
                let mut e = SendError::unsent(ErrorKind::Reset, req);
                e.stale = true;
                return Err(e);
            }
            send_on(&mut sender, req, stamp.fields().as_slice())
                .await
                .map_err(|failure| {
                    let mut e = SendError::sent(failure.kind);
                    // Refused: nothing was processed, as on a stale connection.
                    e.stale = failure.refused;
                    e
                })
        }
    }

    /// Opens an HTTP/2 connection to the endpoint for a request that found
    /// none with room, holding a `max_pending` place meanwhile; one opener
    /// at a time, and those who waited for an attempt that failed fail
    /// with it (each trying again in turn would take a connect timeout
    /// each), unless a connection is open: then the request waits for a
    /// stream on the least busy one, as it would have before. Connections
    /// that closed are let go.
    async fn open_h2(
        &self,
        target: &Target,
        connected: &mut Option<Duration>,
    ) -> Result<h2::Sender, ErrorKind> {
        let Some(_place) = target.pending.try_acquire() else {
            return Err(ErrorKind::Overloaded);
        };
        let waited_from = Instant::now();
        let mut last_failure = self.h2_connecting.lock().await;
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        if let Some((at, kind)) = *last_failure {
            if at >= waited_from {
                return self.pick_h2(1).ok_or(kind);
            }
        }
        let start = Instant::now();
        let opened = self
            .connect_h2(
                target.connect_timeout,
                target.tls.as_deref(),
                Some(target.idle_timeout),
            )
            .await;
        *connected = Some(start.elapsed());
        match opened {
            Ok(s) => {
                let mut open: Vec<h2::Sender> = (self.h2.load().iter())
                    .filter(|s| !s.is_closed())
                    .cloned()
                    .collect();
                open.push(s.clone());
                self.h2.store(Arc::new(open));
                *last_failure = None;
                Ok(s)
            }
            Err(kind) => {
                *last_failure = Some((Instant::now(), kind));
                self.pick_h2(1).ok_or(kind)
            }
        }
    }

    /// The first open HTTP/2 connection with room for a stream; with as
    /// many open as an endpoint keeps, the least busy.
    fn live_h2(&self) -> Option<h2::Sender> {
        self.pick_h2(MAX_H2_CONNECTIONS)
    }

    /// The first open HTTP/2 connection with room for a stream; else, with
    /// `full_at` or more open, the least busy.
    fn pick_h2(&self, full_at: usize) -> Option<h2::Sender> {
        let open = self.h2.load();
        let mut least: Option<&h2::Sender> = None;
        let mut count = 0;
        for s in open.iter().filter(|s| !s.is_closed()) {
            if s.has_room() {
                return Some(s.clone());
            }
            count += 1;
            if least.is_none_or(|l| s.streams() < l.streams()) {
                least = Some(s);
            }
        }
        least.filter(|_| count >= full_at).cloned()
    }

    /// Opens TCP, then TLS for a `tls` service (offering `h2` or
    /// `http/1.1` by ALPN), within `connect_timeout` in all.
    async fn connect(
        &self,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
        h2: bool,
    ) -> Result<TokioIo<Conn>, ErrorKind> {
        let start = Instant::now();
        let stream =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %self.addr, error = %e, "connect failed");
                    return Err(ErrorKind::Connect);
                }
                Err(_) => return Err(ErrorKind::ConnectTimeout),
            };
        let _ = stream.set_nodelay(true);
        almond_net::loopback_congestion(socket2::SockRef::from(&stream), self.addr.ip());
        let Some(upstream) = tls else {
            return Ok(TokioIo::new(Conn::Plain(stream)));
        };
        let Some(identity) = &upstream.tls else {
            return Err(ErrorKind::Connect);
        };
        let left = connect_timeout.saturating_sub(start.elapsed());
        let handshake = identity.connect(upstream.server_name.clone(), h2, stream);
        match tokio::time::timeout(left, handshake).await {
            Ok(Ok(s)) => Ok(TokioIo::new(Conn::Tls(Box::new(s)))),
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %self.addr, error = %e, "tls handshake failed");
                Err(ErrorKind::Connect)
            }
            Err(_) => Err(ErrorKind::ConnectTimeout),
        }
    }

    /// Opens an HTTP/1.1 connection (upgrades allowed: WebSocket).
    pub async fn connect_h1(
        &self,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
    ) -> Result<H1Sender, ErrorKind> {
        let io = self.connect(connect_timeout, tls, false).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| classify(&e))?;
        self.run(conn.with_upgrades(), "h1");
        Ok(sender)
    }

    /// Opens an HTTP/2 connection of its own (the shared ones are opened
    /// through [`Connections::send_h2`]), closed when it has carried no
    /// stream for `idle`.
    pub async fn connect_h2(
        &self,
        connect_timeout: Duration,
        tls: Option<&Upstream>,
        idle: Option<Duration>,
    ) -> Result<h2::Sender, ErrorKind> {
        let io = self.connect(connect_timeout, tls, true).await?;
        let (sender, driver) = h2::handshake(io.into_inner(), idle);
        let open = ConnCount::new(&self.open);
        tokio::spawn(async move {
            driver.await;
            drop(open);
        });
        Ok(sender)
    }

    /// Drives an opened connection in a task of its own, counted open
    /// until it ends.
    fn run<F>(&self, conn: F, protocol: &'static str)
    where
        F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let addr = self.addr;
        let open = ConnCount::new(&self.open);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, protocol, error = %e, "upstream connection ended");
            }
            drop(open);
        });
    }
}

/// What the lean client needs of a service's target.
pub struct LeanTarget<'a> {
    /// When the try started: idle connections are judged by it, and the
    /// one used is idle from it once its answer is read (a little early,
    /// never late, for `idle_timeout`).
    pub at: Instant,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections older than this are not reused.
    pub idle_timeout: Duration,
    /// Requests waiting for a new connection (`circuit_breaker.max_pending`).
    pub pending: &'a Arc<Admission>,
    /// Upstream TLS, with the server name to verify.
    pub tls: Option<&'a Upstream>,
}

/// Why the lean client got no response.
#[derive(Debug)]
pub enum LeanError {
    /// Nothing was sent: no connection could be had.
    Unsent(ErrorKind),
    /// A reused connection closed before any answer: the upstream had
    /// closed it idle, so nothing was processed.
    Stale,
    /// The request was (perhaps partly) sent.
    Sent(ErrorKind),
}

impl LeanError {
    /// The try's error; `req` makes the request to hand back when none of
    /// it was processed.
    pub fn into_send_error(self, req: impl FnOnce() -> Request<RequestBody>) -> SendError {
        match self {
            LeanError::Unsent(kind) => SendError::unsent(kind, req()),
            LeanError::Stale => {
                let mut e = SendError::unsent(ErrorKind::Reset, req());
                e.stale = true;
                e
            }
            LeanError::Sent(kind) => SendError::sent(kind),
        }
    }
}

/// A try that got no response.
pub struct SendError {
    /// Why.
    pub kind: ErrorKind,
    /// The request, when none of it was sent (safe to send elsewhere).
    /// Boxed: rare, and it would size every try's result (`Sent`, which
    /// each layer of the try moves) by a request's 312 bytes.
    pub unsent: Option<Box<Request<RequestBody>>>,
    /// A reused connection closed before any answer: the upstream closed
    /// it idle as the request went out (its keep-alive timeout), so
    /// nothing was processed and any method may be sent again.
    pub stale: bool,
}

impl SendError {
    /// Nothing was sent; the request comes back.
    pub fn unsent(kind: ErrorKind, req: Request<RequestBody>) -> SendError {
        SendError {
            kind,
            unsent: Some(Box::new(req)),
            stale: false,
        }
    }

    /// The request was (perhaps partly) sent.
    pub fn sent(kind: ErrorKind) -> SendError {
        SendError {
            kind,
            unsent: None,
            stale: false,
        }
    }
}

/// A try that ran out of time (`upstream/timeout.rs`): perhaps sent.
impl From<crate::outcome::TimedOut> for SendError {
    fn from(_: crate::outcome::TimedOut) -> SendError {
        SendError::sent(ErrorKind::Timeout)
    }
}

/// Sends `req` over `sender`, once ready (`upstream/h2.rs`), with the
/// `extra` fields after its head's: a body known whole goes with the
/// head, a streamed one as it comes.
pub fn send_on(
    sender: &mut h2::Sender,
    req: Request<RequestBody>,
    extra: &[(&[u8], &[u8])],
) -> h2::Sending {
    let (parts, body) = req.into_parts();
    let body = match body {
        RequestBody::Replay(None) => Outgoing::Empty,
        RequestBody::Replay(Some(bytes)) => Outgoing::Whole(bytes),
        body if body.is_end_stream() => Outgoing::Empty,
        body => Outgoing::Stream(body),
    };
    // The request's body is the client's: its failure (a reset stream, a
    // closed connection, a malformed body) says nothing of the endpoint.
    let failed = |e: &BodyError| match e {
        BodyError::Idle(_) => ErrorKind::ClientTimeout,
        _ => ErrorKind::BadRequest,
    };
    sender.send(Request::from_parts(parts, ()), body, failed, extra)
}

/// Counts an open connection for as long as it lives.
struct ConnCount(Arc<AtomicU32>);

impl ConnCount {
    fn new(count: &Arc<AtomicU32>) -> ConnCount {
        count.fetch_add(1, Ordering::Relaxed);
        ConnCount(count.clone())
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Did the connection close (EOF, reset, broken pipe) before a response?
fn closed_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    })
}

/// A hyper error on an established connection: it broke before a response,
/// or the client's request body stalled (`limits.body_idle`) or failed (a
/// client that went away, or sent a malformed body: the client's doing,
/// not the endpoint's, as for a body kept whole).
fn classify(e: &hyper::Error) -> ErrorKind {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        match c.downcast_ref::<BodyError>() {
            Some(BodyError::Idle(_)) => return ErrorKind::ClientTimeout,
            Some(_) => return ErrorKind::BadRequest,
            None => {}
        }
        cause = c.source();
    }
    if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Reset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_loopback_upstream_gets_the_loopback_congestion_control() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conns = Connections::new(listener.local_addr().unwrap());
        let io = conns
            .connect(Duration::from_secs(5), None, false)
            .await
            .unwrap();
        let Conn::Plain(stream) = io.inner() else {
            panic!("no TLS asked for");
        };
        let mut name = socket2::SockRef::from(stream).tcp_congestion().unwrap();
        name.retain(|b| *b != 0);
        assert_eq!(name, almond_net::LOOPBACK_CONGESTION);
    }
}
