//! Bodies on both sides of the proxy; they stream, never buffer whole,
//! and a side that stops sending for the idle timeout ends its stream.
//!
//! [`ResponseBody`] carries a [`Completion`] to the end of the response
//! stream (the request path's: in-flight accounting ends and an HTTP/1.1
//! connection goes back to its pool).

use crate::http2::client;
use crate::observe::trace::RequestId;
use crate::upstream::h1::{self, LeanBody};
use crate::upstream::h2::RecvBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a streamed body ended early.
#[derive(Debug)]
pub enum BodyError {
    /// The peer's connection or stream failed.
    Hyper(hyper::Error),
    /// The upstream's connection failed, or its body was malformed (the
    /// lean HTTP/1.1 client).
    Lean(h1::Error),
    /// An HTTP/2 stream (a client's or an upstream's) or its connection
    /// failed.
    H2(client::Error),
    /// No byte arrived for this long.
    Idle(Duration),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Hyper(e) => e.fmt(f),
            BodyError::Lean(e) => e.fmt(f),
            BodyError::H2(e) => e.fmt(f),
            BodyError::Idle(d) => write!(f, "no body bytes for {d:?}"),
        }
    }
}

impl From<hyper::Error> for BodyError {
    fn from(e: hyper::Error) -> BodyError {
        BodyError::Hyper(e)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Hyper(e) => Some(e),
            BodyError::Lean(e) => Some(e),
            BodyError::H2(e) => Some(e),
            BodyError::Idle(_) => None,
        }
    }
}

/// A streamed body's idle timer: armed the first time the stream has
/// nothing to give, and pushed on by every frame after that (one clock
/// read per frame, only once armed).
pub struct IdleTimer {
    limit: Duration,
    /// The timer, and when the last frame came (set when armed).
    sleep: Option<(Pin<Box<Sleep>>, Instant)>,
    /// The last frame either way, when the request's body and its
    /// response's both stream (see [`Liveness`]).
    shared: Option<Liveness>,
}

/// When a frame last moved either way on a request whose body streams
/// while its response streams back (a gRPC bidirectional or
/// client-streaming call): each side's idle timer counts the other's
/// frames as progress, as Envoy's stream idle timeout does, so a client
/// quiet while its server streams (or the reverse) is not cut off.
/// Kept with the upload's state ([`Upload`]): only a streamed request
/// body has one.
#[derive(Clone)]
pub struct Liveness(Arc<UploadState>);

impl IdleTimer {
    /// A timer that fires after `limit` without a frame.
    pub fn new(limit: Duration) -> IdleTimer {
        IdleTimer {
            limit,
            sleep: None,
            shared: None,
        }
    }

    /// A timer that fires after `limit` without a frame of this body or
    /// of the other body sharing `shared`.
    pub fn sharing(limit: Duration, shared: Option<Liveness>) -> IdleTimer {
        IdleTimer {
            limit,
            sleep: None,
            shared,
        }
    }

    /// A frame arrived.
    #[inline]
    fn progress(&mut self) {
        // Shared while the upload goes on: after, the other side has
        // nothing left to keep alive.
        let shared = (self.shared.as_ref()).filter(|s| s.0.ended_at.load(Ordering::Relaxed) == 0);
        if let Some(shared) = shared {
            let now = Instant::now();
            let at = crate::clock::nanos_since_epoch(now);
            shared.0.last_frame.store(at, Ordering::Relaxed);
            if let Some((_, last)) = &mut self.sleep {
                *last = now;
            }
        } else if let Some((_, last)) = &mut self.sleep {
            *last = Instant::now();
        }
    }

    /// The stream is pending: has it been idle for `limit`? (Registers
    /// the waker to be told when it will have been.)
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let (sleep, last) = self
            .sleep
            .get_or_insert_with(|| (Box::pin(tokio::time::sleep(limit)), Instant::now()));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let mut due = *last + limit;
            if let Some(shared) = &self.shared {
                let other = crate::clock::instant_at(shared.0.last_frame.load(Ordering::Relaxed));
                due = due.max(other + limit);
            }
            if Instant::now() >= due {
                return true;
            }
            sleep.as_mut().reset(due);
        }
    }
}

/// A request as its client sent it, boxed once where it is read: every
/// stage passes it on by pointer (a move of the request itself copies
/// its 272 bytes, and it crosses about ten stages).
pub type ClientRequest = Box<http::Request<ClientBody>>;

/// A request's body as its client sends it: hyper's stream (HTTP/1.1
/// handed to hyper), an HTTP/2 stream's (`edge/h2.rs`), or one the lean
/// HTTP/1.1 server (`edge/h1.rs`) read whole with the head.
#[derive(Debug)]
pub enum ClientBody {
    /// Read by hyper's server.
    Hyper(HyperBody),
    /// Read from an HTTP/2 stream.
    H2(RecvBody),
    /// No body.
    Empty,
    /// A small body that arrived with its head, whole (`None` once read).
    Full(Option<Bytes>),
    /// A body read whole for a replay copy that came with trailers: sent
    /// once, as it came (a copy keeps no trailers), data then trailers.
    Collected(Option<Bytes>, Option<Box<http::HeaderMap>>),
}

/// hyper's request body, which marks its connection when it is dropped
/// before its end: hyper then closes the connection with the rest of the
/// upload unread, and the connection lingers (`edge::listen`) so that
/// the close does not reset the answer away.
#[derive(Debug)]
pub struct HyperBody {
    body: Incoming,
    unread: Arc<AtomicBool>,
    /// Read to its end (hyper's `is_end_stream` says so of a known
    /// length only, never of a chunked body).
    ended: bool,
}

impl HyperBody {
    /// `body`, marking `unread` if it is dropped before its end.
    pub fn new(body: Incoming, unread: &Arc<AtomicBool>) -> HyperBody {
        HyperBody {
            body,
            unread: unread.clone(),
            ended: false,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }
}

impl Drop for HyperBody {
    fn drop(&mut self) {
        if !self.is_end_stream() {
            self.unread.store(true, Ordering::Relaxed);
        }
    }
}

impl ClientBody {
    /// Read by the lean HTTP/1.1 server, which writes the response head
    /// itself (and so can pass an upstream head through).
    pub fn lean(&self) -> bool {
        matches!(self, ClientBody::Empty | ClientBody::Full(_))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Hyper(body) => body.poll_frame(cx).map_err(BodyError::Hyper),
            ClientBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::H2),
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Collected(bytes, trailers) => Poll::Ready(match bytes.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
            ClientBody::Empty => true,
            ClientBody::Full(bytes) => bytes.is_none(),
            ClientBody::Collected(bytes, trailers) => bytes.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(body) => body.body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Full(bytes) | ClientBody::Collected(bytes, _) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// An upstream response's body: hyper's, or the lean HTTP/1.1 client's.
pub enum UpstreamBody {
    /// From hyper's HTTP/1.1 client (upgrades, streamed request bodies).
    Hyper(Incoming),
    /// From the lean HTTP/1.1 client (`upstream/h1.rs`).
    Lean(LeanBody),
    /// From the HTTP/2 client (`upstream/h2.rs`).
    H2(RecvBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Hyper),
            UpstreamBody::Lean(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Lean),
            UpstreamBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::H2),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::Lean(body) => body.is_end_stream(),
            UpstreamBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::Lean(body) => body.size_hint(),
            UpstreamBody::H2(body) => body.size_hint(),
        }
    }
}

/// Polls `body` under `timer`: a frame pushes the timer on, and a pending
/// stream past its idle limit ends with [`BodyError::Idle`].
fn poll_timed<B>(
    body: &mut B,
    timer: &mut IdleTimer,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => {
            timer.progress();
            Poll::Ready(Some(Ok(frame)))
        }
        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Pending if timer.expired(cx) => Poll::Ready(Some(Err(BodyError::Idle(timer.limit)))),
        Poll::Pending => Poll::Pending,
    }
}

/// Whether a streamed upload is waiting on its client, as the request's
/// tries see it: a try that runs out of time while the proxy waits for
/// the client's next bytes was held up by the client, not by the
/// endpoint. One that runs out while the upstream is not taking the
/// bytes the client already sent (the proxy stopped reading them) is the
/// upstream's. Nothing (no allocation) for a body that was over before
/// it started.
#[derive(Default)]
pub struct Upload(Option<Arc<UploadState>>);

/// An upload's state, when it ended, and when a frame last moved either
/// way (see [`Liveness`]).
struct UploadState {
    state: AtomicU8,
    /// `timeouts.request` and `limits.body_idle`, for [`UploadClock`].
    limits: (Duration, Duration),
    /// Nanoseconds since the process epoch (0: not ended).
    ended_at: AtomicU64,
    /// Nanoseconds since the process epoch.
    last_frame: AtomicU64,
}

/// [`Upload`] states.
const UPLOAD_MOVING: u8 = 0;
const UPLOAD_WAITING: u8 = 1;
const UPLOAD_ENDED: u8 = 2;

impl Upload {
    /// Watches `body`'s end: the upload, and the handle the tries keep.
    pub fn watch(body: &ClientBody, limits: (Duration, Duration)) -> (Upload, Uploading) {
        // One that came whole with its head never waits on its client.
        if body.is_end_stream() || matches!(body, ClientBody::Full(_)) {
            return (Upload(None), Uploading(None));
        }
        let now = crate::clock::nanos_since_epoch(Instant::now());
        let state = Arc::new(UploadState {
            state: AtomicU8::new(UPLOAD_MOVING),
            limits,
            ended_at: AtomicU64::new(0),
            last_frame: AtomicU64::new(now),
        });
        (Upload(Some(state.clone())), Uploading(Some(state)))
    }

    /// Notes what a poll of the client's body gave.
    #[inline]
    fn polled<T>(&self, polled: &Poll<Option<T>>, end: bool) {
        if let Some(state) = &self.0 {
            let now = match polled {
                Poll::Ready(None) => UPLOAD_ENDED,
                Poll::Ready(Some(_)) if end => UPLOAD_ENDED,
                Poll::Ready(Some(_)) => UPLOAD_MOVING,
                Poll::Pending => UPLOAD_WAITING,
            };
            if state.state.load(Ordering::Relaxed) != now {
                if now == UPLOAD_ENDED {
                    let at = crate::clock::nanos_since_epoch(Instant::now()).max(1);
                    state.ended_at.store(at, Ordering::Relaxed);
                }
                state.state.store(now, Ordering::Relaxed);
            }
        }
    }
}

/// The tries' side of an [`Upload`].
#[derive(Default)]
pub struct Uploading(Option<Arc<UploadState>>);

impl Uploading {
    /// Is the proxy waiting for the client to send more of the body?
    pub fn unfinished(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.state.load(Ordering::Relaxed) == UPLOAD_WAITING)
    }

    /// When a frame last moved either way, shared by the request's and
    /// its answer's idle timers (none for a body that was over before it
    /// started).
    pub fn liveness(&self) -> Option<Liveness> {
        self.0.clone().map(Liveness)
    }

    /// When the upload ended, if it has.
    pub fn ended_at(&self) -> Option<Instant> {
        let ended = self.0.as_ref()?.ended_at.load(Ordering::Relaxed);
        (ended > 0).then(|| crate::clock::instant_at(ended))
    }

    /// The request's `deadline` (its arrival plus `timeouts.request`) as
    /// it stands at `now`: counted from the end of a streamed body, and at
    /// least `timeouts.request` ahead while the body still comes.
    pub fn deadline(&self, deadline: Instant, now: Instant) -> Instant {
        let Some(state) = &self.0 else {
            return deadline;
        };
        let timeout = state.limits.0;
        match self.ended_at() {
            Some(ended) => deadline.max(ended + timeout),
            None => deadline.max(now + timeout),
        }
    }

    /// The clock a try's deadline keeps for this upload, with `limit`
    /// (`timeouts.request` or `retries.per_try_timeout`); none for a body
    /// that was over before it started. Boxed: a try's future carries it
    /// whatever the request, and most have none.
    pub fn clock(&self, limit: Duration) -> Option<Box<UploadClock>> {
        Some(Box::new(UploadClock {
            state: self.0.as_ref()?.clone(),
            timeout: limit,
        }))
    }
}

/// A request's deadline while its client still uploads: the request's
/// time counts from the end of its body (Envoy's route timeout starts at
/// the request's end), so a long upload (a file, a gRPC client stream)
/// is not cut at `timeouts.request` after its arrival. The deadline
/// moves on while the body still comes: the proxy is waiting on the
/// client (a client that stalls is ended by `limits.body_idle`), or a
/// frame moved either way within `timeouts.request` (or `body_idle`, if
/// shorter). An upstream that stopped taking the body gets no more time:
/// its 504 comes that long after the last frame moved.
#[derive(Clone)]
pub struct UploadClock {
    state: Arc<UploadState>,
    /// `timeouts.request` (or the per-try timeout, when shorter).
    timeout: Duration,
}

impl std::fmt::Debug for UploadClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadClock").finish_non_exhaustive()
    }
}

impl UploadClock {
    /// The request deadline passed at `now`: the later one it moves to,
    /// or `None` (the try has run out of time).
    pub fn moved_deadline(&self, now: Instant) -> Option<Instant> {
        match self.state.ended_at.load(Ordering::Relaxed) {
            0 => {
                let window = self.timeout.min(self.state.limits.1);
                if self.state.state.load(Ordering::Relaxed) == UPLOAD_WAITING {
                    return Some(now + window);
                }
                let last = self.state.last_frame.load(Ordering::Relaxed);
                Some(crate::clock::instant_at(last) + window).filter(|at| *at > now)
            }
            ended => Some(crate::clock::instant_at(ended) + self.timeout).filter(|at| *at > now),
        }
    }
}

/// What the proxy sends upstream: the client's body as it arrives, or a
/// copy kept for replay (retries).
pub enum RequestBody {
    /// Streamed from the client (ended if idle for `limits.body_idle`);
    /// cannot be sent twice.
    Stream(ClientBody, IdleTimer, Upload),
    /// Held whole (small bodies, when retries are on); `None` once sent.
    Replay(Option<Bytes>),
    /// Streamed from the client and kept as it goes: a body whose length
    /// is not known up front, of an idempotent request, or of a gRPC call
    /// when `retries.on` names gRPC codes.
    Tee(ClientBody, IdleTimer, Feed),
}

/// What feeds a [`Kept`] copy: a body dropped before its end gives the
/// copy up, so that nothing waits on it (a mirror's copy of the call).
pub struct Feed(Arc<Kept>);

impl Drop for Feed {
    fn drop(&mut self) {
        if !self.0.state().complete {
            self.0.end(false);
        }
    }
}

/// A streamed request body's copy, kept up to a size for a retry: whole
/// once the client's stream has ended, spoiled if it went past the limit,
/// carried trailers or failed. Locked once per frame by the one request
/// that owns it (never shared between requests).
pub struct Kept {
    /// The upload the copy is fed from, watched as [`Upload`] is on a
    /// plain stream (held here, so a tee is no larger than a stream).
    upload: OnceLock<Upload>,
    limit: usize,
    state: Mutex<KeptState>,
    /// Woken when the copy is complete, whole or given up.
    done: tokio::sync::Notify,
}

#[derive(Default)]
struct KeptState {
    chunks: Vec<Bytes>,
    len: usize,
    complete: bool,
    spoiled: bool,
}

impl Kept {
    /// An empty copy that keeps up to `limit` bytes.
    pub fn new(limit: usize) -> Arc<Kept> {
        Arc::new(Kept {
            upload: OnceLock::new(),
            limit,
            state: Mutex::new(KeptState::default()),
            done: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, KeptState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn frame(&self, frame: &Frame<Bytes>, end: bool) {
        let mut s = self.state();
        match frame.data_ref() {
            Some(data) if s.len + data.len() <= self.limit => {
                s.len += data.len();
                s.chunks.push(data.clone());
            }
            _ => {
                s.spoiled = true;
                s.chunks = Vec::new();
            }
        }
        s.complete |= end;
        let complete = s.complete;
        drop(s);
        if complete {
            self.done.notify_waiters();
        }
    }

    fn end(&self, ok: bool) {
        let mut s = self.state();
        s.complete = true;
        s.spoiled |= !ok;
        drop(s);
        self.done.notify_waiters();
    }

    /// Waits for the client's stream to end (or the copy to be given up),
    /// then returns the whole body, if all of it was kept.
    pub async fn finished(&self) -> Option<Bytes> {
        loop {
            let notified = self.done.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the look: an end between the two wakes it.
            notified.as_mut().enable();
            if self.state().complete {
                return self.whole();
            }
            notified.await;
        }
    }

    /// Did the client's stream end with all of it kept?
    pub fn is_whole(&self) -> bool {
        let s = self.state();
        s.complete && !s.spoiled
    }

    /// The whole body, if the client's stream ended and all of it was kept.
    pub fn whole(&self) -> Option<Bytes> {
        let s = self.state();
        if !s.complete || s.spoiled {
            return None;
        }
        Some(match s.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => many.concat().into(),
        })
    }
}

impl RequestBody {
    /// A streamed body goes on kept in `kept` as it streams.
    pub fn keep_in(&mut self, kept: &Arc<Kept>) {
        let this = std::mem::replace(self, RequestBody::Replay(None));
        *self = match this {
            RequestBody::Stream(body, timer, upload) => {
                let _ = kept.upload.set(upload);
                RequestBody::Tee(body, timer, Feed(kept.clone()))
            }
            other => other,
        };
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Stream(body, timer, upload) => {
                let polled = poll_timed(body, timer, cx);
                upload.polled(&polled, body.is_end_stream());
                polled
            }
            RequestBody::Replay(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Tee(body, timer, kept) => {
                let polled = poll_timed(body, timer, cx);
                if let Some(upload) = kept.0.upload.get() {
                    upload.polled(&polled, body.is_end_stream());
                }
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => kept.0.frame(frame, body.is_end_stream()),
                    Poll::Ready(Some(Err(_))) => kept.0.end(false),
                    Poll::Ready(None) => kept.0.end(true),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(body, ..) | RequestBody::Tee(body, ..) => body.is_end_stream(),
            RequestBody::Replay(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(body, ..) | RequestBody::Tee(body, ..) => body.size_hint(),
            RequestBody::Replay(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Replay(None) => SizeHint::with_exact(0),
        }
    }
}

/// What runs when a response body ends: `complete` when it ended cleanly
/// (dropping it unfinished is the same as not complete).
pub trait Completion: Send + Unpin + 'static {
    /// The body ended.
    fn done(self, complete: bool);

    /// The body's trailers went by (before [`Completion::done`]).
    fn trailers(&mut self, _trailers: &http::HeaderMap) {}
}

/// Nothing to do (bodies the proxy makes).
impl Completion for () {
    fn done(self, _complete: bool) {}
}

/// What the proxy sends downstream; `C` runs when it ends.
pub struct ResponseBody<C: Completion = ()> {
    kind: Kind,
    /// Runs when the body is done (or is dropped with it).
    finish: Option<C>,
    /// The request's ID, for an edge that writes it into the head it
    /// encodes (HTTP/2's) rather than into the head's map.
    request_id: Option<RequestId>,
}

enum Kind {
    /// A body made by the proxy (errors, admin pages).
    Full(Option<Bytes>),
    /// The upstream's body, streamed through; an upstream idle for
    /// `timeouts.body_idle` ends it, counted in `timeouts`
    /// (`almond_upstream_errors_total{kind="timeout"}`).
    Upstream(UpstreamBody, IdleTimer, IntCounter),
}

impl<C: Completion> ResponseBody<C> {
    /// A complete body made by the proxy.
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody<C> {
        let bytes = bytes.into();
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            finish: None,
            request_id: None,
        }
    }

    /// An empty body.
    pub fn empty() -> ResponseBody<C> {
        ResponseBody {
            kind: Kind::Full(None),
            finish: None,
            request_id: None,
        }
    }

    /// The upstream's body; `finish` runs when it ends or is dropped. It
    /// ends with an error after `idle` without a byte (of it, or of the
    /// request's body still streaming, when `shared`), counted in
    /// `timeouts`.
    pub fn upstream(
        body: UpstreamBody,
        finish: Option<C>,
        (idle, shared): (Duration, Option<Liveness>),
        timeouts: IntCounter,
    ) -> ResponseBody<C> {
        let mut body = ResponseBody {
            kind: Kind::Upstream(body, IdleTimer::sharing(idle, shared), timeouts),
            finish,
            request_id: None,
        };
        body.finish_if_done();
        body
    }

    /// Gives the request's ID to the edge that writes the head (see
    /// [`ResponseBody::take_request_id`]).
    pub fn set_request_id(&mut self, id: RequestId) {
        self.request_id = Some(id);
    }

    /// The request's ID, for the head: HTTP/2's edge encodes it straight
    /// into the answer's head, never indexed, as the map's sensitive value
    /// would be (no value made and put in the map, looked up again).
    pub fn take_request_id(&mut self) -> Option<RequestId> {
        self.request_id.take()
    }

    /// The text of a body the proxy made, taken out (the body is then
    /// empty); `None` for an upstream's.
    pub fn take_local(&mut self) -> Option<Bytes> {
        match &mut self.kind {
            Kind::Full(bytes) => Some(bytes.take().unwrap_or_default()),
            Kind::Upstream(..) => None,
        }
    }

    fn finish_if_done(&mut self) {
        if self.is_end_stream() {
            if let Some(finish) = self.finish.take() {
                finish.done(true);
            }
        }
    }
}

/// A response body that may carry its upstream head's lines, passed
/// through for the lean HTTP/1.1 server to write as received.
pub trait PassedHead {
    /// The passed-through lines, if the head has them.
    fn passed(&self) -> Option<&h1::Passed> {
        None
    }

    /// The same, to add to.
    fn passed_mut(&mut self) -> Option<&mut h1::Passed> {
        None
    }
}

impl<C: Completion> PassedHead for ResponseBody<C> {
    fn passed(&self) -> Option<&h1::Passed> {
        match &self.kind {
            Kind::Upstream(UpstreamBody::Lean(body), ..) => body.passed(),
            _ => None,
        }
    }

    fn passed_mut(&mut self) -> Option<&mut h1::Passed> {
        match &mut self.kind {
            Kind::Upstream(UpstreamBody::Lean(body), ..) => body.passed_mut(),
            _ => None,
        }
    }
}

impl<C: Completion> Body for ResponseBody<C> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body, timer, timeouts) => {
                let polled = poll_timed(body, timer, cx);
                if let Poll::Ready(Some(Err(BodyError::Idle(_)))) = &polled {
                    timeouts.inc();
                    tracing::debug!("upstream response body idle: stream ended");
                }
                polled
            }
        };
        match &polled {
            Poll::Ready(None) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(false);
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(finish)) = (frame.trailers_ref(), &mut this.finish) {
                    finish.trailers(trailers);
                }
                this.finish_if_done()
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body, ..) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body, ..) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streamed(text: &'static str) -> RequestBody {
        let body = ClientBody::Full(Some(Bytes::from_static(text.as_bytes())));
        RequestBody::Stream(
            body,
            IdleTimer::new(Duration::from_secs(5)),
            Upload::default(),
        )
    }

    /// A kept copy is there for whoever waits on it once the body has
    /// gone by whole.
    #[tokio::test]
    async fn a_kept_body_is_handed_over_once_it_has_all_gone_by() {
        let kept = Kept::new(1024);
        let mut body = streamed("the call");
        body.keep_in(&kept);
        let waiting = tokio::spawn({
            let kept = kept.clone();
            async move { kept.finished().await }
        });
        let sent = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(sent.ok().as_deref(), Some(&b"the call"[..]));
        let copy = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(
            copy.ok().and_then(Result::ok).flatten().as_deref(),
            Some(&b"the call"[..])
        );
    }

    /// A body dropped before its end (its try given up) gives its copy
    /// up: nothing waits on it for the request's whole timeout.
    #[tokio::test]
    async fn a_body_dropped_midway_gives_its_copy_up() {
        let kept = Kept::new(1024);
        let mut body = streamed("never sent");
        body.keep_in(&kept);
        drop(body);
        let copy = tokio::time::timeout(Duration::from_secs(5), kept.finished()).await;
        assert_eq!(copy, Ok(None));
    }
}
