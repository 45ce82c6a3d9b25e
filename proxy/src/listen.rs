//! Listen: bind sockets (socket2: SO_REUSEPORT, TCP_NODELAY, backlog) and
//! accept connections until shutdown, handing each to hyper.

use crate::outcome::ErrorKind;
use crate::serve;
use crate::tls;
use crate::Shared;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Pending connections the kernel may queue per listener.
const BACKLOG: i32 = 1024;

/// Binds a listening socket the way a proxy should.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Lets a new proxy start beside the old one during an upgrade.
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it on Linux; set again on accept anyway.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

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

/// Accepts on `listener` until `stop` changes, then lets open connections
/// finish through `graceful`.
pub async fn accept_loop(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    tls: Option<Arc<tls::Inbound>>,
    mut stop: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let max = shared.table.load().config.limits.max_connections;
    let open = Arc::new(std::sync::atomic::AtomicU32::new(0));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // Over `max_connections`: closed at once (the client sees a reset or
        // EOF, not a hang), counted.
        let Some(slot) = ConnSlot::take(&open, max) else {
            shared.metrics.connections_refused.inc();
            tracing::debug!(%peer, max, "max_connections reached: connection closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        if let Some(inbound) = tls.clone() {
            // The handshake runs in the connection's own task.
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                serve_tls(shared, index, inbound, stream, peer, watcher).await;
                drop(slot);
            });
            continue;
        }
        let builder = shared.http.clone();
        let svc = service_fn(move |req| serve::handle(shared.clone(), index, peer, req));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "downstream connection ended");
            }
            drop(slot);
        });
    }
}

/// One of a listener's `max_connections` places, given back when dropped.
struct ConnSlot(Arc<std::sync::atomic::AtomicU32>);

impl ConnSlot {
    fn take(open: &Arc<std::sync::atomic::AtomicU32>, max: u32) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering;
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
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Serves one connection on a `tls` listener: the mTLS handshake (bounded
/// by `limits.header_timeout`, against clients that stall in it), then
/// HTTP/1.1 or HTTP/2 (ALPN); a client whose certificate names no identity
/// of the listener's `allow` list gets 403 on every request.
async fn serve_tls(
    shared: Arc<Shared>,
    index: usize,
    inbound: Arc<tls::Inbound>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
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
        .map(|leaf| tls::identities(leaf))
        .unwrap_or_default();
    let allowed = inbound.allows(&names);
    if !allowed {
        tracing::info!(%peer, identities = ?names, "client identity not allowed");
    }
    let identity: Arc<str> = Arc::from(names.first().map_or("client", String::as_str));
    let builder = shared.http.clone();
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let identity = identity.clone();
        async move {
            if !allowed {
                shared.metrics.tls_denied.inc();
                return Ok(ErrorKind::Forbidden.response(&identity));
            }
            serve::handle(shared, index, peer, req).await
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "downstream tls connection ended");
    }
}
