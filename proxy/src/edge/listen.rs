//! Listen: the proxy listeners' accept loop (`almond_net`), the cap on open
//! connections, the mTLS handshake, and hyper serving each connection
//! (whose life `conn` follows).

use crate::edge::conn::{counted, drive, Activity};
use crate::edge::serve;
use crate::identity::authz::{self, Identities, Inbound};
use crate::outcome::ErrorKind;
use crate::rescue::Rescue;
use crate::Shared;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
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
