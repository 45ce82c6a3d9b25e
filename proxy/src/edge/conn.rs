//! Connection: the life of a downstream HTTP/1.1 connection hyper serves
//! -- its requests in progress counted (each until its response body
//! ends), and closed gracefully when idle (`limits.idle_timeout`) or when
//! the proxy stops. (`h2` keeps its own streams.)

use crate::edge::serve::Answer;
use crate::edge::stop;
use crate::pipeline::forward::Reply;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A downstream connection's requests in progress and when the last one
/// ended: what `limits.idle_timeout` is measured from.
pub struct Activity {
    born: Instant,
    /// Requests whose response body is not done.
    open: AtomicU32,
    /// Milliseconds after `born` when a request last began or ended.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    /// A connection that starts now, with no request yet.
    pub fn new() -> Activity {
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
pub fn counted<F, Fut>(
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
    Fut: Future<Output = Result<Reply, Infallible>> + Send + 'static,
{
    service_fn(move |req| {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        let held = InFlight(activity.clone());
        // Boxed: the request's future is kilobytes, and hyper keeps a slot
        // of its size for every connection, idle or not: a pointer costs
        // 16 bytes (benches/results/2026-12-04-memory.md).
        let answer = crate::boxed(|| handle(req));
        async move {
            let resp = answer.await?;
            Ok((*resp).map(|body| Counted { body, _held: held }))
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
/// (after the response in progress).
pub trait Closable: Future {
    /// Finish what is in progress, then close.
    fn close(self: Pin<&mut Self>);
}

impl<I, S, B> Closable for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn close(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Runs `conn` to its end; it is closed gracefully when the proxy stops
/// (`stop` changes) or when it has had no request in progress for `idle`
/// (`limits.idle_timeout`: between requests, though `header_timeout`
/// usually ends those first).
pub async fn drive<C: Closable>(
    conn: C,
    stop: watch::Receiver<bool>,
    activity: &Activity,
    idle: Duration,
) -> C::Output {
    tokio::pin!(conn);
    let stopping = stop::stopping(stop);
    tokio::pin!(stopping);
    let mut at = Instant::now() + idle;
    loop {
        tokio::select! {
            // The connection first: one handed off by the lean server with
            // a request's bytes already read must read them before a drain
            // that started meanwhile closes it (hyper's graceful shutdown
            // closes a connection with no request in progress at once).
            biased;
            done = conn.as_mut() => return done,
            () = &mut stopping => break,
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
