//! Listen: the proxy listeners' accept loop (`almond_net`), the cap on open
//! connections, and each connection's life: hyper, closed when idle or told to.

use crate::edge::serve::{self, Answer};
use crate::identity::authz::{self, Identities, Inbound};
use crate::outcome::ErrorKind;
use crate::rescue::Rescue;
use crate::Shared;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use almond_net::bind;

/// The HTTP server settings every downstream connection uses.
pub fn http_builder(limits: &almond_config::Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(1024)
        .keep_alive_interval(limits.keep_alive_interval)
        .keep_alive_timeout(limits.keep_alive_timeout);
    builder
}

/// Accepts on `listener` until `stop` changes; each connection's task is
/// spawned on `connections`, which the drain waits for.
pub async fn accept_loop(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    tls: Option<Arc<Inbound>>,
    mut stop: watch::Receiver<bool>,
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
        match tls.clone() {
            // The handshake runs in the connection's own task.
            Some(inbound) => connections.spawn(async move {
                serve_tls(shared, index, inbound, stream, peer, closing, idle).await;
                drop(slot);
            }),
            None => connections.spawn(async move {
                let activity = Arc::new(Activity::new());
                let builder = shared.http.clone();
                let svc = counted(activity.clone(), move |req| {
                    serve::handle(shared.clone(), index, peer, req)
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                if let Err(e) = drive(conn, closing, &activity, idle).await {
                    tracing::debug!(%peer, error = %e, "downstream connection ended");
                }
                drop(slot);
            }),
        };
    })
    .await;
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

/// A downstream connection's requests in progress and when the last one
/// ended: what `limits.idle_timeout` is measured from.
pub struct Activity {
    born: Instant,
    /// Requests whose response body is not done.
    open: AtomicU32,
    /// Milliseconds after `born` when a request last began or ended.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            open: AtomicU32::new(0),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When the connection will have been idle for `idle`, if nothing
    /// happens first; `None` when it is already.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return Some(Instant::now() + idle);
        }
        let at = self.born + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
        (at > Instant::now()).then_some(at)
    }
}

/// Held by a response body: the request is in progress until it drops.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// `handle` behind a service that counts each request in `activity` until
/// its response body is done.
fn counted<F, Fut>(
    activity: Arc<Activity>,
    handle: F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Counted>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Counted>, Infallible>> + Send + 'static,
> + Clone
       + Send
       + 'static
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Answer>, Infallible>> + Send + 'static,
{
    service_fn(move |req| {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        let held = InFlight(activity.clone());
        // Boxed: the request's future is 6 KiB, and hyper keeps a slot of
        // its size for every HTTP/1.1 connection, idle or not (and moves
        // it into a task per HTTP/2 stream): a pointer costs 16 bytes
        // (benches/results/2026-12-04-memory.md).
        let answer = Box::pin(handle(req));
        async move {
            let resp = answer.await?;
            Ok(resp.map(|body| Counted { body, _held: held }))
        }
    })
}

/// A response body that keeps its request counted on its connection
/// until it is dropped (`limits.idle_timeout`).
pub struct Counted {
    body: Answer,
    _held: InFlight,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = <Answer as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A hyper connection that can be asked to finish what it has and close
/// (HTTP/2: GOAWAY; HTTP/1.1: after the response in progress).
trait Closable: Future {
    fn close(self: Pin<&mut Self>);
}

impl<I, S, B> Closable for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn close(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Runs `conn` to its end; it is closed gracefully when the proxy stops
/// (`stop` changes) or when it has had no request in progress for `idle`
/// (`limits.idle_timeout`: an HTTP/2 connection kept alive by PINGs alone,
/// an HTTP/1.1 one between requests, though `header_timeout` usually ends
/// those first).
async fn drive<C: Closable>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    activity: &Activity,
    idle: Duration,
) -> C::Output {
    tokio::pin!(conn);
    let mut at = Instant::now() + idle;
    loop {
        tokio::select! {
            done = conn.as_mut() => return done,
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(at) => match activity.idle_at(idle) {
                Some(later) => at = later,
                None => {
                    tracing::debug!(?idle, "downstream connection idle: closing");
                    break;
                }
            },
        }
    }
    conn.as_mut().close();
    conn.await
}

/// Serves one connection on a `tls` listener: the mTLS handshake (bounded
/// by `limits.header_timeout`, against clients that stall in it), then
/// HTTP/1.1 or HTTP/2 (ALPN); a client whose certificate names no identity
/// of the listener's `allow` list gets 403 on every request.
async fn serve_tls(
    shared: Arc<Shared>,
    index: usize,
    inbound: Arc<Inbound>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    idle: Duration,
) {
    let timeout = shared.table.load().config.limits.header_timeout;
    let acceptor = tokio_rustls::TlsAcceptor::from(inbound.tls.server());
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
    let identity: Arc<str> = Arc::from(names.first().map_or("client", String::as_str));
    let identities = Identities(names.into());
    let builder = shared.http.clone();
    let activity = Arc::new(Activity::new());
    let svc = counted(activity.clone(), move |mut req: Request<Incoming>| {
        let shared = shared.clone();
        let identity = identity.clone();
        req.extensions_mut().insert(identities.clone());
        async move {
            if !allowed {
                shared.metrics.tls_denied.inc();
                return Ok(ErrorKind::Forbidden.response(&identity));
            }
            serve::handle(shared, index, peer, req).await
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    if let Err(e) = drive(conn, stop, &activity, idle).await {
        tracing::debug!(%peer, error = %e, "downstream tls connection ended");
    }
}
