//! The HTTP/2 client, on almond's codec (`http2/client.rs`): a request is
//! sent and its response awaited in the request's own task; the
//! connection's driver runs in a task of its own, with keep-alive pings and
//! an idle close. Also the stream plumbing the edge shares: a body piped
//! onto a stream (`pipe`), a body received from one ([`RecvBody`]).

use crate::headers;
use crate::http2::client::{
    self, Client, Control, RecvStream, Reservation, ResponseFuture, SendStream,
};
use crate::http2::frame::Reason;
use crate::outcome::ErrorKind;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// The window hyper's client gave a stream (2 MiB). The connection's is
/// sixteen streams' worth: it is shared by every client's request to the
/// endpoint, and a stream whose client stops reading holds its window
/// until that client reads (with hyper's 5 MiB, three such clients
/// stalled every other stream on the connection). Memory stays bounded
/// by the streams' windows.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 16 * STREAM_WINDOW;
/// The largest response head taken.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A ping every this long; no pong within `PONG_TIMEOUT` closes the
/// connection (its streams fail, and the next request opens another).
const PING_INTERVAL: Duration = Duration::from_secs(20);
const PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of one HTTP/2 connection; clones share it. The
/// connection closes (`GOAWAY`) once every clone is dropped and its last
/// stream is over.
pub struct Sender {
    client: Client,
    state: Arc<ConnState>,
    /// The place of the request this clone is readied for
    /// ([`Sender::ready`]), and its room under the server's limit.
    slot: Option<Slot>,
    room: Option<Reservation>,
}

impl Clone for Sender {
    /// Another handle, readied for nothing yet.
    fn clone(&self) -> Sender {
        Sender {
            client: self.client.clone(),
            state: self.state.clone(),
            slot: None,
            room: None,
        }
    }
}

/// What the proxy knows of one connection beyond its codec.
#[derive(Debug, Default)]
struct ConnState {
    /// The connection is gone, or going away.
    closed: AtomicBool,
    /// Streams sent whose answer is not over (each counted by a [`Slot`]).
    streams: AtomicUsize,
    /// Streams sent, ever.
    started: AtomicUsize,
    /// For one stream's place held twice (see [`Slot`]): the connection
    /// it is a place on, given back when the last holder goes.
    owner: Option<Arc<ConnState>>,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            owner.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One stream's place on its connection, given back when its answer ends
/// (or fails, or is dropped) and, for a request body still going up after
/// the answer came, when that ends too. One pointer: it is in every
/// HTTP/2 body, which requests and responses move around.
#[derive(Debug)]
pub struct Slot(Arc<ConnState>);

impl Slot {
    /// Takes a place (`SeqCst`: the driver closing an idle connection
    /// sees it, or this sees the connection closed; see `Watch::next`).
    fn new(state: &Arc<ConnState>) -> Slot {
        state.streams.fetch_add(1, Ordering::Relaxed);
        state.started.fetch_add(1, Ordering::SeqCst);
        Slot(state.clone())
    }

    /// The same place, held twice: it moves to a node of its own (which
    /// counts its two holders), given back when both are dropped.
    fn share(self) -> (Slot, Slot) {
        self.0.streams.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(ConnState {
            closed: AtomicBool::new(false),
            streams: AtomicUsize::new(2),
            started: AtomicUsize::new(0),
            owner: Some(self.0.clone()),
        });
        // `self` gives its own place back as it goes.
        drop(self);
        (Slot(node.clone()), Slot(node))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts an HTTP/2 connection over `io` (the preface and settings go
/// first; nothing is awaited): returns the sending half and the
/// connection's driver, to be run in a task of its own. The connection
/// closes when it has carried no stream for `idle`.
pub fn handshake<T>(io: T, idle: Option<Duration>) -> (Sender, impl Future<Output = ()> + Send)
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = client::Config {
        stream_window: STREAM_WINDOW,
        conn_window: CONN_WINDOW,
        max_header_list: MAX_HEADER_LIST,
    };
    let (client, driver) = client::handshake(io, config);
    let state = Arc::new(ConnState::default());
    let driver = drive(driver, client.control(), state.clone(), idle);
    let sender = Sender {
        client,
        state,
        slot: None,
        room: None,
    };
    (sender, driver)
}

/// Runs the connection until it ends (an error, a `GOAWAY`, every handle
/// dropped, a ping left unanswered, or no stream for `idle`), then marks
/// it closed.
async fn drive<T>(
    conn: client::Driver<T>,
    control: Control,
    state: Arc<ConnState>,
    idle: Option<Duration>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = pin!(conn);
    let mut watch = Watch::new(idle, &state);
    let ended = loop {
        let due = pin!(watch.next(&control, &state));
        match futures_util::future::select(conn.as_mut(), due).await {
            futures_util::future::Either::Left((ended, _)) => break ended,
            futures_util::future::Either::Right((Some(Close::Idle), _)) => {
                tracing::debug!("upstream h2 connection idle: closing");
                // A `GOAWAY` first, and the socket's close (TLS's
                // `close_notify`), as long as the peer takes them.
                state.closed.store(true, Ordering::Release);
                control.close();
                let _ = tokio::time::timeout(PONG_TIMEOUT, conn.as_mut()).await;
                break Ok(());
            }
            futures_util::future::Either::Right((Some(Close::Silent), _)) => {
                // Nothing more is sent to a peer that answers nothing.
                tracing::debug!("upstream h2 ping unanswered: closing");
                break Ok(());
            }
            futures_util::future::Either::Right((None, _)) => {}
        }
    };
    state.closed.store(true, Ordering::Release);
    if let Err(e) = ended {
        tracing::debug!(error = %e, "upstream h2 connection ended");
    }
}

/// Why a connection is closed.
enum Close {
    /// It carried no stream for `timeouts.idle`.
    Idle,
    /// Its ping went unanswered.
    Silent,
}

/// What a connection's driver watches besides the connection: its
/// keep-alive pings, and how long it has carried no stream.
struct Watch {
    next_ping: Instant,
    /// Closed after this long with no stream (`timeouts.idle`).
    idle: Option<Duration>,
    next_check: Instant,
    /// Streams started by the last check.
    started: usize,
    /// The first check that found the connection quiet since.
    quiet_since: Option<Instant>,
}

/// How often a connection is checked for having been idle `idle`: a
/// quarter of it, at least a millisecond (a `timeouts.idle` of a few
/// nanoseconds made the check a busy loop).
fn check_every(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_millis(1))
}

impl Watch {
    fn new(idle: Option<Duration>, state: &ConnState) -> Watch {
        let now = Instant::now();
        Watch {
            next_ping: now + PING_INTERVAL,
            idle,
            next_check: now + idle.map_or(Duration::ZERO, check_every),
            started: state.started.load(Ordering::Relaxed),
            quiet_since: None,
        }
    }

    /// Waits for the next ping or idle check and does it: `Some` says why
    /// the connection is to close.
    async fn next(&mut self, control: &Control, state: &ConnState) -> Option<Close> {
        let at = match self.idle {
            Some(_) => self.next_ping.min(self.next_check),
            None => self.next_ping,
        };
        tokio::time::sleep_until(at).await;
        let now = Instant::now();
        if now >= self.next_ping {
            let pong = control.ping();
            if !matches!(tokio::time::timeout(PONG_TIMEOUT, pong).await, Ok(true)) {
                return Some(Close::Silent);
            }
            self.next_ping = Instant::now() + PING_INTERVAL;
        }
        if let Some(idle) = self.idle.filter(|_| now >= self.next_check) {
            self.next_check = now + check_every(idle);
            let started = state.started.load(Ordering::Relaxed);
            let quiet = state.streams.load(Ordering::Relaxed) == 0;
            if quiet && state.closed.load(Ordering::Relaxed) {
                // Closed below with a request slipping in: it is over.
                return Some(Close::Idle);
            }
            if started == self.started && quiet {
                let since = *self.quiet_since.get_or_insert(now);
                if now.duration_since(since) >= idle {
                    // Closed first, then a last look: a request that took
                    // a place before this is let finish (no other takes
                    // the connection now), one after it sees it closed.
                    state.closed.store(true, Ordering::SeqCst);
                    if state.started.load(Ordering::SeqCst) == started {
                        return Some(Close::Idle);
                    }
                    self.quiet_since = None;
                }
            } else {
                self.quiet_since = None;
            }
            self.started = started;
        }
        None
    }
}

/// A request's body as it goes up.
pub enum Outgoing<B> {
    /// None: the head ends the stream.
    Empty,
    /// Known whole: queued at once, sent as the window allows.
    Whole(Bytes),
    /// Still coming: copied as it comes and as the window allows.
    Stream(B),
}

impl Sender {
    /// Is the connection gone?
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    /// Has the connection room for another stream: fewer streams open on
    /// it than the server takes at once (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`)?
    pub fn has_room(&self) -> bool {
        self.client.has_room()
    }

    /// Answers awaited on the connection now.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::Relaxed)
    }

    /// Waits until the connection can take another stream, and holds that
    /// room for this handle's next [`Sender::send`]; `false` if it never
    /// will (it is then marked closed). The request counts on the
    /// connection while it waits (the least busy is picked by that count,
    /// and the connection is not idle).
    pub async fn ready(&mut self) -> bool {
        if self.room.is_some() && self.slot.is_some() {
            return true;
        }
        if self.slot.is_none() {
            self.slot = Some(Slot::new(&self.state));
        }
        match poll_fn(|cx| self.client.poll_ready(cx)).await {
            Ok(room) => {
                self.room = Some(room);
                true
            }
            Err(_) => {
                self.state.closed.store(true, Ordering::Release);
                self.slot = None;
                false
            }
        }
    }

    /// Sends `head` (readied by `headers::to_upstream`: absolute target,
    /// no connection-specific fields), then the `extra` fields (the trace
    /// stamp's), and `body`, once [`Sender::ready`];
    /// the future waits for the response head. A streamed body is copied
    /// from the request's task until the head comes, then from a task of
    /// its own; `failed` names the try's error when the body fails before
    /// that. A plain `fn`: the head and a whole body go to the connection
    /// now, and the future is only the wait (tens of bytes, not the
    /// kilobyte an `async fn` keeping its arguments took in every try's
    /// future).
    pub fn send<B>(
        &mut self,
        mut head: Request<()>,
        body: Outgoing<B>,
        failed: fn(&B::Error) -> ErrorKind,
        extra: &[(&[u8], &[u8])],
    ) -> Sending
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
    {
        let length = match &body {
            Outgoing::Empty => Some(0),
            Outgoing::Whole(bytes) => Some(bytes.len() as u64),
            Outgoing::Stream(body) => body.size_hint().exact(),
        };
        if let Some(len) = length {
            // A length for a body known whole, as hyper's client gave it.
            if (len != 0 || has_payload_semantics(head.method()))
                && !head.headers().contains_key(header::CONTENT_LENGTH)
            {
                head.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let end = matches!(body, Outgoing::Empty);
        // The place first, then a look at whether the connection closed
        // idle meanwhile: a stream is never sent on a connection being
        // dropped (it would fail as sent, not as refused).
        let slot = (self.slot.take()).unwrap_or_else(|| Slot::new(&self.state));
        let room = self.room.take();
        if self.state.closed.load(Ordering::SeqCst) {
            return Sending::Failed(Some(Failure {
                kind: ErrorKind::Reset,
                refused: true,
            }));
        }
        // No stream opened (the connection is going away or gone, or full):
        // nothing was sent, so nothing was processed.
        let opened = match room {
            Some(room) => room.send_request_with(&head, end, extra),
            None => self.client.send_request_with(&head, end, extra),
        };
        let (response, mut stream) = match opened {
            Ok(sent) => sent,
            Err(e) => return Sending::Failed(Some(classify(&e))),
        };
        match body {
            Outgoing::Empty => Sending::Head(response, Some(slot)),
            // A body the stream no longer takes (the driver may have seen
            // the server answer and reset the stream meanwhile): the
            // answer decides, as below.
            Outgoing::Whole(bytes) => {
                let _ = stream.send_data(bytes, true);
                Sending::Head(response, Some(slot))
            }
            // Boxed: streamed bodies are the rarer case, and their state
            // would size every request's future.
            Outgoing::Stream(body) => {
                Sending::Streaming(Box::pin(stream_body(response, stream, body, failed, slot)))
            }
        }
    }
}

/// A request sent on an HTTP/2 connection: its response head, awaited.
pub enum Sending {
    /// Nothing to wait for: the stream could not be opened or written.
    Failed(Option<Failure>),
    /// The head and any whole body are queued: the answer is awaited,
    /// holding the stream's place on its connection.
    Head(ResponseFuture, Option<Slot>),
    /// A streamed body goes up while the answer is awaited.
    Streaming(Pin<Box<dyn Future<Output = Result<Response<RecvBody>, Failure>> + Send>>),
}

impl Future for Sending {
    type Output = Result<Response<RecvBody>, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Sending::Failed(failure) => {
                Poll::Ready(Err(failure.take().unwrap_or(ErrorKind::Reset.into())))
            }
            Sending::Head(response, slot) => Pin::new(response).poll(cx).map(|r| {
                let slot = slot.take();
                r.map(|resp| RecvBody::head(resp, slot))
                    .map_err(|e| classify(&e))
            }),
            Sending::Streaming(sending) => sending.as_mut().poll(cx),
        }
    }
}

/// Streams `body` up while the response head is awaited; once it comes,
/// whatever is left of the body goes on in a task of its own.
async fn stream_body<B>(
    response: ResponseFuture,
    stream: SendStream,
    body: B,
    failed: fn(&B::Error) -> ErrorKind,
    slot: Slot,
) -> Result<Response<RecvBody>, Failure>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    // `None` once the body is all sent: a finished future is not polled
    // again.
    // An upstream that takes no more of the body is bounded by the
    // request's timeout until it answers, and by its answer after.
    let mut pipe = Some(Box::pin(pipe(body, stream, (failed, Reason::CANCEL), None)));
    let mut response = pin!(response);
    // Why the body stopped going up, if it did. The answer decides even
    // then: a server may answer in full and reset the stream with
    // NO_ERROR, "send no more" (RFC 9113 §8.1), and that answer stands;
    // any other reset (or the stream's own, for a body that failed)
    // fails the answer too, and the try fails for the body's reason.
    let mut broke: Option<ErrorKind> = None;
    let resp = poll_fn(|cx| loop {
        if let Poll::Ready(r) = response.as_mut().poll(cx) {
            return Poll::Ready(match (r, broke) {
                // The stream was never processed: that decides, whatever
                // stopped the body.
                (Err(e), Some(kind)) => match classify(&e) {
                    unprocessed @ Failure { refused: true, .. } => Err(unprocessed),
                    _ => Err(kind.into()),
                },
                (r, _) => Ok(r),
            });
        }
        let Some(sending) = pipe.as_mut() else {
            return Poll::Pending;
        };
        match sending.as_mut().poll(cx) {
            // Sent: only the response is awaited now.
            Poll::Ready(Ok(())) => pipe = None,
            // The stream is reset: the answer is ready, or will be.
            Poll::Ready(Err(kind)) => {
                pipe = None;
                broke = Some(kind);
            }
            Poll::Pending => return Poll::Pending,
        }
    })
    .await?;
    // The body pipe keeps going: a server may answer before the request
    // ends (gRPC streams both ways).
    // The stream is the connection's until both are over.
    let (slot, upload) = match pipe {
        Some(sending) => {
            let (answer, upload) = slot.share();
            let task = tokio::spawn(async move {
                let _ = sending.await;
                drop(upload);
            });
            (answer, Some(task.abort_handle()))
        }
        None => (slot, None),
    };
    resp.map(|resp| {
        let mut resp = RecvBody::head(resp, Some(slot));
        resp.body_mut().upload = upload;
        resp
    })
    .map_err(|e| classify(&e))
}

/// Copies `body` into `stream` as the stream's window allows (hyper's
/// `PipeToSendStream`; a request's body going up, or a response's going
/// down): a body that fails resets the stream with `reset` (`CANCEL` for
/// a request whose client gave up, `INTERNAL_ERROR` for an answer the
/// upstream broke off), and the error is what `failed` makes of it; a
/// peer's reset ends it. A peer that gives no room for a byte for `stall`
/// has the stream reset (`CANCEL`; [`ErrorKind::ClientTimeout`]): it
/// stopped reading, and the stream must not hold its places forever.
pub(crate) async fn pipe<B>(
    mut body: B,
    mut stream: SendStream,
    (failed, reset): (fn(&B::Error) -> ErrorKind, Reason),
    stall: Option<Duration>,
) -> Result<(), ErrorKind>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut done = false;
    // Armed only while the peer gives no room (a timer a frame would cost
    // every body that flows).
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Nothing of the body is on the stream before its first frame: that
    // one goes at once (most bodies are one frame). Each later one waits
    // for room, so at most one frame waits beyond the window either way.
    let mut first = true;
    poll_fn(|cx| loop {
        if done {
            return Poll::Ready(Ok(()));
        }
        // Room before a later frame is read.
        if !first {
            match stream.poll_sent(cx) {
                Poll::Ready(Ok(())) => stalled = None,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(ErrorKind::Reset)),
                Poll::Pending => {
                    // The peer may reset the stream meanwhile.
                    if stream.poll_reset(cx).is_ready() {
                        return Poll::Ready(Err(ErrorKind::Reset));
                    }
                    if let Some(limit) = stall {
                        let timer =
                            stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            stream.send_reset(Reason::CANCEL);
                            return Poll::Ready(Err(ErrorKind::ClientTimeout));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
        let frame = match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            // Waiting for the body: a reset meanwhile must wake the task
            // (a frame ready is sent at once, and a reset stream refuses it).
            Poll::Pending if stream.poll_reset(cx).is_ready() => {
                return Poll::Ready(Err(ErrorKind::Reset))
            }
            Poll::Pending => return Poll::Pending,
        };
        first = false;
        match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                done = true;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if stream.send_data(data, end).is_err() {
                        return Poll::Ready(Err(ErrorKind::Reset));
                    }
                    done = end;
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        // An HTTP/1.1 peer's trailer section may name
                        // fields HTTP/2 forbids (`keep-alive`): a peer
                        // refuses those, and the stream would be reset
                        // after its whole body.
                        headers::for_h2(&mut trailers);
                        if stream.send_trailers(trailers).is_err() {
                            stream.send_reset(reset);
                            return Poll::Ready(Err(ErrorKind::Reset));
                        }
                        done = true;
                    }
                }
            },
            Some(Err(e)) => {
                stream.send_reset(reset);
                return Poll::Ready(Err(failed(&e)));
            }
        }
    })
    .await
}

/// Methods whose empty body still gets `content-length: 0` (hyper's
/// `method_has_defined_payload_semantics`).
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Why a request sent over HTTP/2 got no response.
#[derive(Debug, PartialEq)]
pub struct Failure {
    /// What the try failed with.
    pub kind: ErrorKind,
    /// The upstream refused the stream (`REFUSED_STREAM`): none of it was
    /// processed (RFC 9113, 8.7), so it may go again whatever its method.
    pub refused: bool,
}

impl From<ErrorKind> for Failure {
    fn from(kind: ErrorKind) -> Failure {
        Failure {
            kind,
            refused: false,
        }
    }
}

/// An HTTP/2 error on a stream or its connection: the peer reset or went
/// away, or the connection broke. Some say nothing was processed (RFC
/// 9113 §8.7): a `REFUSED_STREAM` reset, the peer's `GOAWAY` for a stream
/// above its last stream ID, a stream never opened.
fn classify(e: &client::Error) -> Failure {
    tracing::debug!(error = %e, "upstream h2 exchange failed");
    Failure {
        kind: ErrorKind::Reset,
        refused: e.is_refused(),
    }
}

/// A body received on an HTTP/2 stream (an upstream's response, a
/// client's request): its data frames, then its trailers.
pub struct RecvBody {
    recv: RecvStream,
    /// The data is over; trailers are next.
    data_done: bool,
    /// What is left of the `content-length` the head gave, or
    /// [`NO_LENGTH`] (a plain `Option` would make every body 8 bytes
    /// bigger).
    length: u64,
    /// An answer's place on its connection, until it is over.
    slot: Option<Slot>,
    /// The request's body still going up, in a task of its own: stopped
    /// when this answer is dropped before its end (its client left), so
    /// that the stream is reset upstream. Waiting for the upstream's
    /// window, that task would see nothing of the client's going.
    upload: Option<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("data_done", &self.data_done)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            // Read to its end (its length all read, or its data over): an
            // answer delivered whole, whose upload may go on (an upstream
            // that answered early and still reads).
            let whole = self.data_done || self.length == 0 || self.recv.is_end_stream();
            if !whole {
                upload.abort();
            }
        }
    }
}

impl RecvBody {
    /// The response with its body's length from the head's
    /// `content-length` (the codec read it with the head, and holds the
    /// data to it), or none for a
    /// stream already ended, as hyper's client gives it. The stream's
    /// `slot` is held until the body is over.
    fn head(resp: Response<RecvStream>, slot: Option<Slot>) -> Response<RecvBody> {
        let length = resp.body().content_length();
        resp.map(|recv| {
            let mut body = RecvBody::new(recv, length);
            body.slot = slot;
            body
        })
    }

    /// A request as the client sent it, its body's length known as a
    /// response's is (hyper's server gives it so).
    pub(crate) fn request(req: Request<RecvStream>) -> Request<RecvBody> {
        let length = req.body().content_length();
        req.map(|recv| RecvBody::new(recv, length))
    }

    fn new(recv: RecvStream, length: Option<u64>) -> RecvBody {
        let length = match length {
            Some(n) => n,
            None if recv.is_end_stream() => 0,
            None => NO_LENGTH,
        };
        RecvBody {
            recv,
            data_done: false,
            length,
            slot: None,
            upload: None,
        }
    }
}

/// A body's length not known (`content-length` has at most 19 digits,
/// under this).
const NO_LENGTH: u64 = u64::MAX;

impl Body for RecvBody {
    type Data = Bytes;
    type Error = client::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, client::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    if this.length != NO_LENGTH {
                        this.length = this.length.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.slot = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let over = match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Some(Ok(Frame::trailers(trailers))),
            Poll::Ready(Ok(None)) => None,
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        this.slot = None;
        Poll::Ready(over)
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            NO_LENGTH => SizeHint::default(),
            n => SizeHint::with_exact(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use h2::RecvStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A place held by an answer and an upload still going counts once,
    /// until both are over, whichever ends first.
    #[test]
    fn a_shared_place_counts_once_until_both_holders_go() {
        for answer_first in [true, false] {
            let state = Arc::new(ConnState::default());
            let (answer, upload) = Slot::new(&state).share();
            assert_eq!(state.streams.load(Ordering::Relaxed), 1);
            let (first, second) = if answer_first {
                (answer, upload)
            } else {
                (upload, answer)
            };
            drop(first);
            assert_eq!(state.streams.load(Ordering::Relaxed), 1);
            drop(second);
            assert_eq!(state.streams.load(Ordering::Relaxed), 0);
            assert_eq!(state.started.load(Ordering::Relaxed), 1);
        }
    }

    /// A server that says its settings, acknowledges the client's, then
    /// reads everything and answers nothing (no pong).
    async fn mute_server(mut io: tokio::io::DuplexStream) {
        // SETTINGS (type 4), empty; then SETTINGS with ACK (flag 1).
        let frames = [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0];
        if io.write_all(&frames).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    }

    /// An upstream that stops answering is dropped: no pong within 10 s of
    /// a ping closes the connection, and the next request opens another.
    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_pings_go_unanswered_is_closed() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(mute_server(server));
        let (sender, driver) = handshake(client, None);
        let driver = tokio::spawn(driver);
        tokio::time::sleep(PING_INTERVAL + PONG_TIMEOUT / 2).await;
        assert!(!sender.is_closed(), "closed before the pong was due");
        tokio::time::sleep(PONG_TIMEOUT).await;
        assert!(sender.is_closed(), "still open with its ping unanswered");
        assert!(driver.is_finished());
    }

    /// A client on an in-memory connection to an `h2` server that hands
    /// each stream it accepts to `answer`; the connection runs in a task.
    async fn served_by<F>(mut answer: F) -> Sender
    where
        F: FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>) + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server)
                .await
                .expect("server handshake");
            while let Some(Ok((req, respond))) = conn.accept().await {
                answer(req, respond);
            }
        });
        let (sender, driver) = handshake(client, None);
        tokio::spawn(driver);
        sender
    }

    /// A stream the upstream refused (`REFUSED_STREAM`: nothing processed)
    /// is told apart from one it reset after taking it.
    #[tokio::test]
    async fn a_refused_stream_is_told_apart_from_a_reset_one() {
        let mut reasons = [h2::Reason::REFUSED_STREAM, h2::Reason::INTERNAL_ERROR].into_iter();
        let mut sender = served_by(move |_req, mut respond| match reasons.next() {
            Some(reason) => respond.send_reset(reason),
            None => {
                let _ = respond.send_response(Response::new(()), true);
            }
        })
        .await;
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            assert!(sender.ready().await);
            let head = Request::post("http://up/").body(()).expect("request");
            let body = Outgoing::<http_body_util::Empty<Bytes>>::Whole(Bytes::from_static(b"x"));
            let sent = sender.send(head, body, |_| ErrorKind::Reset, &[]).await;
            outcomes.push(sent.map(|r| r.status().as_u16()));
        }
        let refused = Failure {
            kind: ErrorKind::Reset,
            refused: true,
        };
        assert_eq!(outcomes[0].as_ref().err(), Some(&refused));
        assert_eq!(outcomes[1].as_ref().err(), Some(&ErrorKind::Reset.into()));
        assert_eq!(outcomes[2].as_ref().ok(), Some(&200));
    }

    /// A streamed body sent whole before the answer comes: the request's
    /// future may be polled any number of times meanwhile (here, at once
    /// after every poll), and the answer still arrives.
    #[tokio::test]
    async fn a_body_sent_before_its_answer_survives_any_number_of_polls() {
        let mut sender = served_by(|req, mut respond| {
            tokio::spawn(async move {
                let mut body = req.into_body();
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = respond.send_response(Response::new(()), true);
            });
        })
        .await;
        assert!(sender.ready().await);
        let chunks =
            ["a", "b", "c"].map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c))));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let head = Request::post("http://up/").body(()).expect("request");
        let mut sending =
            pin!(sender.send(head, Outgoing::Stream(body), |_| ErrorKind::Reset, &[]));
        let sent = poll_fn(|cx| {
            let polled = sending.as_mut().poll(cx);
            if polled.is_pending() {
                cx.waker().wake_by_ref();
            }
            polled
        })
        .await;
        assert_eq!(sent.map(|r| r.status().as_u16()).ok(), Some(200));
    }

    /// A live upstream answers its pings and keeps its connection, idle or
    /// not, and the connection still carries requests.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_answers_its_pings_stays_open() {
        let mut sender = served_by(|_req, mut respond| {
            let _ = respond.send_response(Response::new(()), true);
        })
        .await;
        tokio::time::sleep(5 * PING_INTERVAL).await;
        assert!(!sender.is_closed());
        assert!(sender.ready().await);
        let head = Request::get("http://up/").body(()).expect("request");
        let resp = sender
            .send(
                head,
                Outgoing::<http_body_util::Empty<Bytes>>::Empty,
                |_| ErrorKind::Reset,
                &[],
            )
            .await;
        assert_eq!(resp.map(|r| r.status()).ok(), Some(http::StatusCode::OK));
    }

    /// An answer complete before the request's body (END_STREAM on its
    /// data or its trailers), then RST_STREAM(NO_ERROR), "send no more"
    /// (RFC 9113 §8.1): its body reads to its end however far it is read
    /// (as hyper's client reads it); the reset is no error of the answer.
    #[tokio::test]
    async fn an_answer_read_past_its_end_after_a_no_error_reset_is_whole() {
        use http_body_util::BodyExt;
        for with_trailers in [false, true] {
            let mut sender = served_by(move |_req, mut respond| {
                let resp = Response::builder()
                    .header("content-length", "5")
                    .body(())
                    .expect("response");
                let Ok(mut stream) = respond.send_response(resp, false) else {
                    return;
                };
                let _ = stream.send_data(Bytes::from_static(b"hello"), !with_trailers);
                if with_trailers {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let _ = stream.send_trailers(trailers);
                }
                // Once the answer is out (a reset drops what is queued).
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    stream.send_reset(h2::Reason::NO_ERROR);
                });
            })
            .await;
            assert!(sender.ready().await);
            // A body that never ends: the answer comes before it would.
            let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >());
            let head = Request::post("http://up/").body(()).expect("request");
            let resp = sender
                .send(head, Outgoing::Stream(body), |_| ErrorKind::Reset, &[])
                .await;
            let resp = resp.expect("the answer");
            // The reset is in by the time the body is read.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let collected = resp.into_body().collect().await;
            let collected = collected.unwrap_or_else(|e| panic!("trailers {with_trailers}: {e}"));
            let status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned());
            assert_eq!(&collected.to_bytes()[..], b"hello");
            assert_eq!(status.is_some(), with_trailers);
        }
    }

    /// Room readied for one request is kept for it: another handle waits
    /// (with one place under the server's limit, it would have taken the
    /// place, and the first request been refused), and gets the place once
    /// the first is over.
    #[tokio::test]
    async fn room_readied_for_a_request_is_kept_for_it() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut builder = h2::server::Builder::new();
            builder.max_concurrent_streams(1);
            let Ok(mut conn) = builder.handshake::<_, Bytes>(server).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let _ = respond.send_response(Response::new(()), true);
            }
        });
        let (sender, driver) = handshake(client, None);
        tokio::spawn(driver);
        // The server's settings first (its limit).
        assert!(sender.client.ping().await);
        let (mut first, mut second) = (sender.clone(), sender.clone());
        assert!(first.ready().await);
        let get = || Request::get("http://up/").body(()).expect("request");
        {
            let mut waiting = pin!(second.ready());
            assert!(
                futures_util::poll!(waiting.as_mut()).is_pending(),
                "the place held for the first request was taken"
            );
            assert_eq!(sender.streams(), 2, "a waiting request counts");
            let no_body = Outgoing::<http_body_util::Empty<Bytes>>::Empty;
            let answered = first.send(get(), no_body, |_| ErrorKind::Reset, &[]).await;
            assert_eq!(answered.map(|r| r.status().as_u16()).ok(), Some(200));
            let ready = tokio::time::timeout(Duration::from_secs(10), waiting).await;
            assert_eq!(ready.ok(), Some(true), "no room once the first was over");
        }
        let no_body = Outgoing::<http_body_util::Empty<Bytes>>::Empty;
        let answered = second.send(get(), no_body, |_| ErrorKind::Reset, &[]).await;
        assert_eq!(answered.map(|r| r.status().as_u16()).ok(), Some(200));
        // Room readied and never used goes to the next who waits.
        let (mut third, mut fourth) = (sender.clone(), sender.clone());
        assert!(third.ready().await);
        {
            let mut waiting = pin!(fourth.ready());
            assert!(futures_util::poll!(waiting.as_mut()).is_pending());
            drop(third);
            let ready = tokio::time::timeout(Duration::from_secs(10), waiting).await;
            assert_eq!(ready.ok(), Some(true), "room let go was not handed on");
        }
        drop(fourth);
        // Nothing held: every place and room given back.
        assert_eq!(sender.streams(), 0);
        assert!(sender.has_room());
    }

    /// A connection closed for being idle says so (`GOAWAY`) before its
    /// socket closes.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_sends_goaway_before_it_closes() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let read = tokio::spawn(async move {
            let frames = [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0];
            let _ = server.write_all(&frames).await;
            let mut all = Vec::new();
            let _ = server.read_to_end(&mut all).await;
            all
        });
        let (sender, driver) = handshake(client, Some(Duration::from_secs(1)));
        let driver = tokio::spawn(driver);
        let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
        assert!(ended.is_ok(), "not closed after 5 s idle");
        assert!(sender.is_closed());
        let all = tokio::time::timeout(Duration::from_secs(5), read).await;
        let all = all.ok().and_then(Result::ok).unwrap_or_default();
        // The preface, then frames: their types.
        let mut kinds = Vec::new();
        let mut at = 24;
        while at + 9 <= all.len() {
            let len = usize::from(all[at]) << 16
                | usize::from(all[at + 1]) << 8
                | usize::from(all[at + 2]);
            kinds.push(all[at + 3]);
            at += 9 + len;
        }
        assert_eq!(kinds.last(), Some(&7), "frames sent: {kinds:?}");
    }
}
