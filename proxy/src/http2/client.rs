//! An HTTP/2 client connection on almond's codec: requests written into the
//! connection's buffer from the request's own task (no frame queue), the
//! connection's frames read and written by one driver task, streams in a
//! table keyed by stream ID. Flow control both ways, `SETTINGS`, pings,
//! `GOAWAY` (streams above its last ID told apart as never processed) and
//! trailers, as RFC 9113 says. `upstream/h2.rs` runs on it.

use super::frame::{
    self, flag, kind, Assembled, Block, Error as FrameError, Head, Reason, Settings,
};
use super::hpack::{self, Decoder, Encoder, Field, Indexing};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite};

/// The settings this end asks for.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Each stream's receive window.
    pub stream_window: u32,
    /// The connection's receive window.
    pub conn_window: u32,
    /// The largest response head taken (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            stream_window: 2 * 1024 * 1024,
            conn_window: 32 * 1024 * 1024,
            max_header_list: 16 * 1024,
        }
    }
}

/// Why a stream or the connection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The stream was reset: by the peer (`remote`) or by this end.
    #[error("stream reset ({:#x}, remote {remote})", reason.0)]
    Reset {
        /// The reset's code.
        reason: Reason,
        /// The peer reset it.
        remote: bool,
    },
    /// The connection is going away or gone: `refused` says the stream
    /// was never processed (above the peer's `GOAWAY` last stream, or
    /// never sent at all).
    #[error("connection going away ({:#x}), refused {refused}", reason.0)]
    GoAway {
        /// The `GOAWAY`'s code.
        reason: Reason,
        /// The stream was never processed.
        refused: bool,
    },
    /// The connection broke.
    #[error("connection failed: {0}")]
    Io(String),
}

impl Error {
    /// Nothing of the stream was processed (RFC 9113 §8.7): it may be sent
    /// again, whatever its method.
    pub fn is_refused(&self) -> bool {
        match self {
            Error::Reset { reason, remote } => *remote && *reason == Reason::REFUSED_STREAM,
            Error::GoAway { refused, .. } => *refused,
            Error::Io(_) => false,
        }
    }
}

/// The sending half of a connection; clones share it. Once every clone is
/// dropped and no stream is left, the connection closes (`GOAWAY`).
pub struct Client {
    shared: Arc<Shared>,
}

impl Clone for Client {
    fn clone(&self) -> Client {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Client {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut inner = self.shared.lock();
            inner.released = true;
            inner.wake_driver();
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// The [`Client`]s alive (a [`Control`] is not one).
    handles: AtomicUsize,
}

/// A stream ID as its own hash: the IDs are distinct integers.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

type Streams = HashMap<u32, Stream, BuildHasherDefault<IdHasher>>;

struct Inner {
    config: Config,
    encoder: Encoder,
    decoder: Decoder,
    /// Frames written, not yet handed to the socket.
    out: BytesMut,
    /// The driver, to be woken when `out` has something.
    driver: Option<Waker>,
    streams: Streams,
    next_id: u32,
    /// Streams open or half-closed: counted against the peer's limit.
    active: usize,
    /// Places held by [`Reservation`]s for streams about to open: counted
    /// against the limit too.
    reserved: usize,
    // The peer's settings.
    max_streams: usize,
    initial_send_window: i64,
    max_frame: u32,
    /// The connection's send window, and what this end may still receive
    /// on it before a `WINDOW_UPDATE` (data taken is given back in
    /// batches).
    send_window: i64,
    recv_window: i64,
    recv_taken: i64,
    /// Streams with data waiting for window.
    blocked: VecDeque<u32>,
    /// The peer's `GOAWAY`: its last stream and reason.
    goaway: Option<(u32, Reason)>,
    /// The connection is over, and why.
    closed: Option<Error>,
    /// A header block being put together.
    partial: Option<Block>,
    /// The user's ping: sent, and whether its pong came (one at a time).
    ping: Option<(bool, Option<Waker>)>,
    /// Bodies waiting for `out` to drain below [`MAX_OUT`].
    out_waiters: Vec<Waker>,
    /// Requests waiting for room for a stream ([`Client::poll_ready`]).
    room_waiters: Vec<Waker>,
    /// Every [`Client`] is dropped: the connection closes once its last
    /// stream is over.
    released: bool,
}

/// Bytes written by the streams and not yet taken by the socket, past which
/// a request body's next chunk waits and the driver reads no more frames
/// (whose answers, pings and settings acknowledgements, would pile up).
const MAX_OUT: usize = 1024 * 1024;

#[derive(Default)]
struct Stream {
    /// The response head, once it came (until taken).
    head: Option<Response<()>>,
    /// The response head came (an interim one does not count).
    answered: bool,
    /// The answer has no content whatever its `content-length` says (the
    /// request was a `HEAD`; RFC 9110 §8.6).
    no_content: bool,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// `END_STREAM` received.
    recv_done: bool,
    /// `END_STREAM` sent.
    send_done: bool,
    /// Reset (by either side), or failed with the connection.
    error: Option<Error>,
    /// This end's receive window for the stream, and data taken since
    /// the last `WINDOW_UPDATE`.
    recv_window: i64,
    recv_taken: i64,
    send_window: i64,
    /// Data queued beyond the window, with whether it ends the stream; then
    /// trailers to send once it is out.
    queued: VecDeque<(Bytes, bool)>,
    queued_trailers: Option<HeaderMap>,
    /// What is left of the response's `content-length`.
    remaining: Option<u64>,
    /// The request's task, waiting for the head, data or trailers.
    recv_waker: Option<Waker>,
    /// The body's task, waiting for window.
    send_waker: Option<Waker>,
    /// The peer asked for no more of the body, its answer whole
    /// (`RST_STREAM(NO_ERROR)`): what `poll_reset` says.
    stopped: Option<Reason>,
    /// The handles still held: the response side, the body side.
    recv_held: bool,
    send_held: bool,
    /// Counted in `active`.
    counted: bool,
}

impl Stream {
    fn wake(&mut self) {
        if let Some(w) = self.recv_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    /// Both halves closed, or reset: no more frames either way.
    fn is_closed(&self) -> bool {
        self.error.is_some() || (self.recv_done && self.send_done)
    }
}

/// Starts a connection over `io`: the client, and the driver to run in a
/// task of its own (it ends with the connection).
pub fn handshake<T>(io: T, mut config: Config) -> (Client, Driver<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // Windows past 2^31-1 are not windows (RFC 9113 §6.9.1).
    config.stream_window = config.stream_window.min(frame::MAX_WINDOW);
    config.conn_window = config.conn_window.min(frame::MAX_WINDOW);
    let mut out = BytesMut::with_capacity(16 * 1024);
    out.extend_from_slice(frame::PREFACE);
    Settings {
        enable_push: Some(false),
        initial_window_size: Some(config.stream_window),
        max_header_list_size: Some(config.max_header_list),
        ..Settings::default()
    }
    .write(&mut out);
    let extra = config.conn_window.saturating_sub(frame::DEFAULT_WINDOW);
    if extra > 0 {
        frame::write_window_update(0, extra, &mut out);
    }
    let inner = Inner {
        config,
        encoder: Encoder::default(),
        decoder: Decoder::default(),
        out,
        driver: None,
        streams: Streams::default(),
        next_id: 1,
        active: 0,
        reserved: 0,
        max_streams: 100,
        initial_send_window: i64::from(frame::DEFAULT_WINDOW),
        max_frame: frame::DEFAULT_MAX_FRAME,
        send_window: i64::from(frame::DEFAULT_WINDOW),
        recv_window: i64::from(config.conn_window.max(frame::DEFAULT_WINDOW)),
        recv_taken: 0,
        blocked: VecDeque::new(),
        goaway: None,
        closed: None,
        partial: None,
        ping: None,
        out_waiters: Vec::new(),
        room_waiters: Vec::new(),
        released: false,
    };
    let shared = Arc::new(Shared {
        inner: Mutex::new(inner),
        handles: AtomicUsize::new(1),
    });
    let driver = Driver {
        io,
        shared: shared.clone(),
        read: BytesMut::with_capacity(16 * 1024),
        write: BytesMut::new(),
        done: false,
    };
    (Client { shared }, driver)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-written that
        // matters more than the connection itself: it is used as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn wake_driver(&mut self) {
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// Wakes the requests waiting for room for a stream (a stream ended,
    /// the peer's limit changed, or the connection is going).
    fn wake_room(&mut self) {
        for w in self.room_waiters.drain(..) {
            w.wake();
        }
    }

    /// Fails the connection: every stream gets `error` (streams above the
    /// peer's last stream ID, refused), a `GOAWAY` goes out for an error of
    /// this end's finding.
    fn fail(&mut self, error: Error, goaway: Option<Reason>) {
        if self.closed.is_some() {
            return;
        }
        if let Some(reason) = goaway {
            frame::write_goaway(0, reason, &mut self.out);
        }
        self.closed = Some(error.clone());
        for stream in self.streams.values_mut() {
            if stream.error.is_none() && !(stream.recv_done && stream.send_done) {
                stream.error = Some(error.clone());
            }
            stream.wake();
        }
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.settle(id);
        }
        if let Some((_, waker)) = &mut self.ping {
            if let Some(w) = waker.take() {
                w.wake();
            }
        }
        for w in self.out_waiters.drain(..) {
            w.wake();
        }
        self.wake_room();
        self.wake_driver();
    }

    /// Resets stream `id` from this end.
    fn reset(&mut self, id: u32, reason: Reason) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if stream.is_closed() {
                return;
            }
            stream.error = Some(Error::Reset {
                reason,
                remote: false,
            });
            stream.wake();
            frame::write_rst_stream(id, reason, &mut self.out);
            self.discard(id);
            self.settle(id);
            self.wake_driver();
        }
    }

    /// Drops what stream `id` will no longer send or deliver: its queued
    /// data and trailers, and the data received and not taken, whose
    /// connection window goes back to the peer.
    fn discard(&mut self, id: u32) {
        self.discard_send(id);
        self.discard_recv(id);
    }

    /// Drops what stream `id` still had to send; its body learns so.
    fn discard_send(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.queued.clear();
        stream.queued_trailers = None;
        if let Some(w) = stream.send_waker.take() {
            w.wake();
        }
        self.blocked.retain(|&b| b != id);
    }

    /// Drops the data stream `id` received and nobody took: its connection
    /// window goes back to the peer.
    fn discard_recv(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let unread: usize = stream.data.drain(..).map(|d| d.len()).sum();
        self.release(None, unread as i64);
    }

    /// Counts `n` bytes taken (or thrown away) on stream `id` (`None`: on
    /// the connection only), and gives window back once what was taken is
    /// half the window or more than what is left of it (as `h2` does: a
    /// window held by unread data never stalls the rest).
    fn release(&mut self, id: Option<u32>, n: i64) {
        if self.closed.is_some() {
            return;
        }
        self.recv_taken += n;
        let conn = i64::from(self.config.conn_window.max(frame::DEFAULT_WINDOW));
        if self.recv_taken > 0
            && (self.recv_taken * 2 >= conn || self.recv_taken >= self.recv_window)
        {
            frame::write_window_update(0, self.recv_taken as u32, &mut self.out);
            self.recv_window += self.recv_taken;
            self.recv_taken = 0;
            self.wake_driver();
        }
        let Some((id, stream)) = id.and_then(|id| self.streams.get_mut(&id).map(|s| (id, s)))
        else {
            return;
        };
        stream.recv_taken += n;
        let window = i64::from(self.config.stream_window);
        let due = stream.recv_taken * 2 >= window || stream.recv_taken >= stream.recv_window;
        if !stream.recv_done && stream.error.is_none() && stream.recv_taken > 0 && due {
            frame::write_window_update(id, stream.recv_taken as u32, &mut self.out);
            stream.recv_window += stream.recv_taken;
            stream.recv_taken = 0;
            self.wake_driver();
        }
    }

    /// The answer of stream `id` is let go (its last handle dropped): if
    /// it was whole, what was not read goes back (the request's body may
    /// still be going up); if not, the rest is not wanted (`CANCEL`).
    fn let_go(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.recv_held = false;
        if stream.recv_done {
            self.discard_recv(id);
        } else {
            self.reset(id, Reason::CANCEL);
        }
        self.settle(id);
    }

    /// Counts a closed stream out of `active`, and drops it once no handle
    /// holds it.
    fn settle(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.is_closed() && stream.counted {
            stream.counted = false;
            self.active -= 1;
            // All of them: one woken that no longer wants the room (its
            // request dropped) must not leave the rest waiting.
            for w in self.room_waiters.drain(..) {
                w.wake();
            }
        }
        if stream.is_closed() && !stream.recv_held && !stream.send_held {
            self.discard_recv(id);
            self.streams.remove(&id);
            if (self.goaway.is_some() || self.released) && self.streams.is_empty() {
                // The last stream after a `GOAWAY`, or after the last
                // handle went: the driver closes.
                self.wake_driver();
            }
        }
    }

    /// Moves queued data of blocked streams into `out` as the windows allow.
    fn flush_blocked(&mut self) {
        // The first in line goes last next time: no stream starves the rest
        // of a small connection window.
        if let Some(first) = self.blocked.pop_front() {
            self.blocked.push_back(first);
        }
        let mut still = VecDeque::new();
        while let Some(id) = self.blocked.pop_front() {
            if self.send_window <= 0 {
                still.push_back(id);
                continue;
            }
            self.send_queued(id);
            if let Some(stream) = self.streams.get(&id) {
                if !stream.queued.is_empty() && stream.error.is_none() {
                    still.push_back(id);
                }
            }
        }
        self.blocked = still;
    }

    /// Writes what the windows allow of stream `id`'s queued data (and its
    /// trailers once the data is out).
    fn send_queued(&mut self, id: u32) {
        let max_frame = self.max_frame as usize;
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.error.is_some() {
            // Reset or refused: nothing more goes on it (RFC 9113 §5.1).
            stream.queued.clear();
            stream.queued_trailers = None;
            return;
        }
        while let Some((mut data, end)) = stream.queued.pop_front() {
            let room = stream.send_window.min(self.send_window).max(0) as usize;
            if room == 0 && !data.is_empty() {
                stream.queued.push_front((data, end));
                break;
            }
            let n = data.len().min(room).min(max_frame);
            let chunk = data.split_to(n);
            let last = data.is_empty();
            frame::write_data_head(id, n as u32, end && last, &mut self.out);
            self.out.extend_from_slice(&chunk);
            stream.send_window -= n as i64;
            self.send_window -= n as i64;
            if !last {
                stream.queued.push_front((data, end));
                continue;
            }
            if end {
                stream.send_done = true;
            }
        }
        if stream.queued.is_empty() {
            if let Some(trailers) = stream.queued_trailers.take() {
                let mut block = BytesMut::new();
                self.encoder.begin(&mut block);
                for (name, value) in &trailers {
                    let indexing = indexing(name.as_str().as_bytes(), value);
                    self.encoder.field(
                        name.as_str().as_bytes(),
                        value.as_bytes(),
                        indexing,
                        &mut block,
                    );
                }
                frame::write_headers(id, &block, true, self.max_frame, &mut self.out);
                stream.send_done = true;
            }
            if let Some(w) = stream.send_waker.take() {
                w.wake();
            }
        }
        self.settle(id);
    }
}

/// How a field is to be indexed: a sensitive value never, else by name.
fn indexing(name: &[u8], value: &HeaderValue) -> Indexing {
    if value.is_sensitive() {
        Indexing::Never
    } else {
        hpack::indexing_for(name)
    }
}

impl Client {
    /// Has the connection room for another stream now?
    pub fn has_room(&self) -> bool {
        let inner = self.shared.lock();
        inner.closed.is_none()
            && inner.goaway.is_none()
            && inner.active + inner.reserved < inner.max_streams
            && inner.next_id <= frame::MAX_WINDOW
    }

    /// Is the connection gone, or going away?
    pub fn is_closed(&self) -> bool {
        let inner = self.shared.lock();
        inner.closed.is_some() || inner.goaway.is_some()
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.shared.lock().active
    }

    /// Waits for room for another stream under the peer's limit and holds
    /// it: the [`Reservation`] opens the stream, and no other request takes
    /// the place meanwhile. `Err` if the connection is going away or gone
    /// (no stream will go on it).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<Reservation, Error>> {
        let mut inner = self.shared.lock();
        if let Some(error) = &inner.closed {
            return Poll::Ready(Err(refused(error)));
        }
        if let Some((_, reason)) = inner.goaway {
            return Poll::Ready(Err(Error::GoAway {
                reason,
                refused: true,
            }));
        }
        if inner.next_id > frame::MAX_WINDOW {
            return Poll::Ready(Err(Error::GoAway {
                reason: Reason::NO_ERROR,
                refused: true,
            }));
        }
        if inner.active + inner.reserved < inner.max_streams {
            inner.reserved += 1;
            return Poll::Ready(Ok(Reservation {
                shared: Some(self.shared.clone()),
            }));
        }
        if !inner.room_waiters.iter().any(|w| w.will_wake(cx.waker())) {
            inner.room_waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// A handle that pings and closes the connection and does not keep it
    /// open.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
        }
    }

    /// Opens a stream and writes `req`'s head (its URI absolute: scheme
    /// and authority become the pseudo-fields), ending the stream if
    /// `end`. Over the peer's stream limit, or on a connection going away,
    /// nothing is sent and the error says the stream was refused.
    pub fn send_request(
        &self,
        req: &Request<()>,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream), Error> {
        open(&self.shared, req, end, false)
    }

    /// Sends a ping; the future ends with its pong (`false` if the
    /// connection ended first). One at a time, from one task: a second
    /// ping replaces the first.
    pub fn ping(&self) -> Pong {
        ping(&self.shared)
    }
}

/// A place for one stream under the peer's limit, held from
/// [`Client::poll_ready`] until the stream opens (or this is dropped).
pub struct Reservation {
    /// `None` once used.
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reservation")
    }
}

impl Reservation {
    /// As [`Client::send_request`], in the place held.
    pub fn send_request(
        mut self,
        req: &Request<()>,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream), Error> {
        match self.shared.take() {
            Some(shared) => open(&shared, req, end, true),
            None => Err(Error::Io("reservation used".to_owned())),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let mut inner = shared.lock();
            inner.reserved -= 1;
            inner.wake_room();
        }
    }
}

/// Opens a stream (see [`Client::send_request`]); `reserved`: in a place a
/// [`Reservation`] held, given up whatever happens.
fn open(
    shared: &Arc<Shared>,
    req: &Request<()>,
    end: bool,
    reserved: bool,
) -> Result<(ResponseFuture, SendStream), Error> {
    let id = {
        let mut inner = shared.lock();
        if reserved {
            inner.reserved -= 1;
        }
        if let Some(error) = &inner.closed {
            return Err(refused(error));
        }
        if let Some((_, reason)) = inner.goaway {
            return Err(Error::GoAway {
                reason,
                refused: true,
            });
        }
        let full = !reserved && inner.active + inner.reserved >= inner.max_streams;
        if full || inner.next_id > frame::MAX_WINDOW {
            return Err(Error::GoAway {
                reason: Reason::REFUSED_STREAM,
                refused: true,
            });
        }
        let id = inner.next_id;
        inner.next_id += 2;
        let inner = &mut *inner;
        // The block is encoded in place, after room for its frame's head.
        let start = inner.out.len();
        inner.out.extend_from_slice(&[0; frame::HEAD_LEN]);
        let block = &mut inner.out;
        inner.encoder.begin(block);
        let uri = req.uri();
        let method = req.method().as_str();
        let scheme = uri.scheme_str().unwrap_or("http");
        let authority = uri.authority().map_or("", |a| a.as_str());
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let enc = &mut inner.encoder;
        enc.field(b":method", method.as_bytes(), Indexing::Index, block);
        enc.field(b":scheme", scheme.as_bytes(), Indexing::Index, block);
        if !authority.is_empty() {
            enc.field(b":authority", authority.as_bytes(), Indexing::Index, block);
        }
        enc.field(b":path", path.as_bytes(), Indexing::Skip, block);
        for (name, value) in req.headers() {
            // Connection-specific fields make a request malformed in
            // HTTP/2 (RFC 9113 §8.2.2): `te` but for `trailers`, and the
            // rest, are not sent.
            match name.as_str() {
                "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding"
                | "upgrade" | "host" => continue,
                "te" if !value.as_bytes().eq_ignore_ascii_case(b"trailers") => continue,
                _ => {}
            }
            let name = name.as_str().as_bytes();
            enc.field(name, value.as_bytes(), indexing(name, value), block);
        }
        frame::finish_headers(&mut inner.out, start, id, end, inner.max_frame);
        let stream = Stream {
            recv_window: i64::from(inner.config.stream_window),
            send_window: inner.initial_send_window,
            send_done: end,
            no_content: req.method() == http::Method::HEAD,
            recv_held: true,
            send_held: true,
            counted: true,
            ..Stream::default()
        };
        inner.streams.insert(id, stream);
        inner.active += 1;
        inner.wake_driver();
        id
    };
    Ok((
        ResponseFuture {
            shared: shared.clone(),
            id,
        },
        SendStream {
            shared: shared.clone(),
            id,
        },
    ))
}

/// Pings and closes a connection without holding it open (its keep-alive's
/// handle).
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// As [`Client::ping`].
    pub fn ping(&self) -> Pong {
        ping(&self.shared)
    }

    /// Closes the connection now: a `GOAWAY` (`NO_ERROR`) goes out, then
    /// the socket closes; streams still open fail (not as refused: they
    /// may have been processed).
    pub fn close(&self) {
        let error = Error::GoAway {
            reason: Reason::NO_ERROR,
            refused: false,
        };
        self.shared.lock().fail(error, Some(Reason::NO_ERROR));
    }
}

fn ping(shared: &Arc<Shared>) -> Pong {
    let mut inner = shared.lock();
    if inner.closed.is_none() {
        frame::write_ping(false, PING_DATA, &mut inner.out);
        inner.ping = Some((false, None));
        inner.wake_driver();
    }
    Pong {
        shared: shared.clone(),
    }
}

const PING_DATA: [u8; 8] = *b"almond\0\0";

/// Keeps `cx`'s waker in `slot` (no clone if it is there already).
fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// The error a stream not yet opened gets on a closed connection.
fn refused(error: &Error) -> Error {
    match error {
        Error::GoAway { reason, .. } => Error::GoAway {
            reason: *reason,
            refused: true,
        },
        Error::Reset { reason, .. } => Error::GoAway {
            reason: *reason,
            refused: true,
        },
        Error::Io(_) => Error::GoAway {
            reason: Reason::NO_ERROR,
            refused: true,
        },
    }
}

/// A ping's answer, awaited.
pub struct Pong {
    shared: Arc<Shared>,
}

impl Future for Pong {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut inner = self.shared.lock();
        if inner.closed.is_some() {
            return Poll::Ready(false);
        }
        match &mut inner.ping {
            Some((true, _)) => {
                inner.ping = None;
                Poll::Ready(true)
            }
            Some((false, waker)) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            None => Poll::Ready(false),
        }
    }
}

/// A stream's response head, awaited.
pub struct ResponseFuture {
    shared: Arc<Shared>,
    id: u32,
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvStream>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(Error::Io("stream gone".to_owned())));
        };
        if let Some(head) = stream.head.take() {
            let body = RecvStream {
                shared: self.shared.clone(),
                id: self.id,
            };
            // The handle moves to the body.
            return Poll::Ready(Ok(head.map(|()| body)));
        }
        if let Some(error) = &stream.error {
            return Poll::Ready(Err(error.clone()));
        }
        park(&mut stream.recv_waker, cx);
        Poll::Pending
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return;
        };
        // The head handed to a `RecvStream`: the response side lives on
        // there. Else it came and was not taken, or never came.
        if !(stream.answered && stream.head.is_none()) {
            inner.let_go(self.id);
        }
    }
}

/// A response's body: its data, then its trailers. Data taken is given
/// back to the peer's window as it is taken.
pub struct RecvStream {
    shared: Arc<Shared>,
    id: u32,
}

impl RecvStream {
    /// The next data, `None` at the end of the data.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(None);
        };
        if let Some(data) = stream.data.pop_front() {
            inner.release(Some(self.id), data.len() as i64);
            return Poll::Ready(Some(Ok(data)));
        }
        if let Some(error) = &stream.error {
            return Poll::Ready(Some(Err(error.clone())));
        }
        if stream.recv_done {
            return Poll::Ready(None);
        }
        park(&mut stream.recv_waker, cx);
        Poll::Pending
    }

    /// The trailers, once the data is over (`None` if there are none).
    pub fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, Error>> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Ok(None));
        };
        if let Some(trailers) = stream.trailers.take() {
            return Poll::Ready(Ok(Some(trailers)));
        }
        if let Some(error) = &stream.error {
            return Poll::Ready(Err(error.clone()));
        }
        if stream.recv_done {
            return Poll::Ready(Ok(None));
        }
        park(&mut stream.recv_waker, cx);
        Poll::Pending
    }

    /// Is the body over (all received and taken)?
    pub fn is_end_stream(&self) -> bool {
        let inner = self.shared.lock();
        inner
            .streams
            .get(&self.id)
            .is_none_or(|s| s.recv_done && s.data.is_empty() && s.trailers.is_none())
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.let_go(self.id);
    }
}

/// A request's body, sent as the peer's windows allow.
pub struct SendStream {
    shared: Arc<Shared>,
    id: u32,
}

impl SendStream {
    /// Queues `data` (ending the stream if `end`); it goes out as the
    /// windows allow. A stream reset or failed says so.
    pub fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), Error> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Err(Error::Io("stream gone".to_owned()));
        };
        if let Some(error) = &stream.error {
            return Err(error.clone());
        }
        if stream.send_done {
            return Err(Error::Io("stream already ended".to_owned()));
        }
        let was_blocked = !stream.queued.is_empty();
        stream.queued.push_back((data, end));
        if was_blocked {
            return Ok(());
        }
        inner.send_queued(self.id);
        if inner
            .streams
            .get(&self.id)
            .is_some_and(|s| !s.queued.is_empty())
        {
            inner.blocked.push_back(self.id);
        }
        inner.wake_driver();
        Ok(())
    }

    /// Ends the stream with trailers, after any data queued.
    pub fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), Error> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Err(Error::Io("stream gone".to_owned()));
        };
        if let Some(error) = &stream.error {
            return Err(error.clone());
        }
        if stream.send_done || stream.queued.back().is_some_and(|(_, end)| *end) {
            return Err(Error::Io("stream already ended".to_owned()));
        }
        stream.queued_trailers = Some(trailers);
        if stream.queued.is_empty() {
            inner.send_queued(self.id);
        }
        inner.wake_driver();
        Ok(())
    }

    /// Waits until the queued data is all out (window given for it): a
    /// body's next chunk is read only then. `Err` if the stream was reset.
    pub fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Ok(()));
        };
        if let Some(error) = &stream.error {
            return Poll::Ready(Err(error.clone()));
        }
        if !stream.queued.is_empty() {
            park(&mut stream.send_waker, cx);
            return Poll::Pending;
        }
        if inner.out.len() > MAX_OUT && inner.closed.is_none() {
            // Out of the window, not yet out of the process: the socket
            // takes it first.
            if !inner.out_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                inner.out_waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// Waits for the stream to be reset, by the peer or with its
    /// connection: the reason (a body waiting on its source learns so that
    /// nothing more will go).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Reason> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Reason::STREAM_CLOSED);
        };
        match &stream.error {
            Some(Error::Reset { reason, .. } | Error::GoAway { reason, .. }) => {
                Poll::Ready(*reason)
            }
            Some(Error::Io(_)) => Poll::Ready(Reason::INTERNAL_ERROR),
            None if stream.stopped.is_some() => {
                Poll::Ready(stream.stopped.unwrap_or(Reason::NO_ERROR))
            }
            None => {
                if !stream
                    .send_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    stream.send_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Resets the stream.
    pub fn send_reset(&mut self, reason: Reason) {
        self.shared.lock().reset(self.id, reason);
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return;
        };
        stream.send_held = false;
        let ending = stream.send_done
            || stream.queued.back().is_some_and(|(_, end)| *end)
            || stream.queued_trailers.is_some();
        if !ending {
            // Dropped before the body ended: the request is cut short.
            inner.reset(self.id, Reason::CANCEL);
        }
        inner.settle(self.id);
    }
}

/// The connection's driver: reads and handles the peer's frames, writes
/// what the streams wrote. Ends with the connection.
pub struct Driver<T> {
    io: T,
    shared: Arc<Shared>,
    read: BytesMut,
    write: BytesMut,
    done: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Driver<T> {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut progress = false;
            // Read and handle what came, unless the writes are backed up
            // (a peer that sends and does not read) or the connection is
            // over.
            let can_read = {
                let inner = this.shared.lock();
                inner.closed.is_none() && this.write.len() + inner.out.len() <= MAX_OUT
            };
            let read = match can_read {
                true => tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.read),
                false => Poll::Pending,
            };
            let mut inner = this.shared.lock();
            match read {
                Poll::Ready(Ok(0)) => {
                    inner.fail(Error::Io("connection closed".to_owned()), None);
                }
                Poll::Ready(Ok(_)) => {
                    progress = true;
                    if let Err(e) = handle_frames(&mut inner, &mut this.read) {
                        let reason = e.reason;
                        let error = Error::GoAway {
                            reason,
                            refused: false,
                        };
                        inner.fail(error, Some(reason));
                    }
                }
                Poll::Ready(Err(e)) => inner.fail(Error::Io(e.to_string()), None),
                Poll::Pending => {}
            }
            // Gone away, and every stream over: nothing more will use it.
            if let (Some((_, reason)), true) = (inner.goaway, inner.streams.is_empty()) {
                let error = Error::GoAway {
                    reason,
                    refused: true,
                };
                inner.fail(error, None);
            }
            // Every handle dropped, and every stream over: closed with a
            // `GOAWAY` of this end's.
            if inner.released && inner.streams.is_empty() && inner.closed.is_none() {
                let error = Error::GoAway {
                    reason: Reason::NO_ERROR,
                    refused: true,
                };
                inner.fail(error, Some(Reason::NO_ERROR));
            }
            if this.read.capacity() - this.read.len() < 4096 {
                this.read.reserve(16 * 1024);
            }
            // Write what the streams and the handling wrote.
            if this.write.is_empty() && !inner.out.is_empty() {
                std::mem::swap(&mut this.write, &mut inner.out);
                for w in inner.out_waiters.drain(..) {
                    w.wake();
                }
            }
            // Over once everything written is out (a `GOAWAY`, resets).
            let closed = inner.closed.is_some() && inner.out.is_empty();
            if !inner
                .driver
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.driver = Some(cx.waker().clone());
            }
            drop(inner);
            while !this.write.is_empty() {
                match Pin::new(&mut this.io).poll_write(cx, &this.write) {
                    Poll::Ready(Ok(0)) => return this.end(Error::Io("write zero".to_owned())),
                    Poll::Ready(Ok(n)) => {
                        this.write.advance(n);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return this.end(Error::Io(e.to_string())),
                    Poll::Pending => break,
                }
            }
            if this.write.is_empty() {
                match Pin::new(&mut this.io).poll_flush(cx) {
                    Poll::Ready(Err(e)) => return this.end(Error::Io(e.to_string())),
                    Poll::Pending if closed => return Poll::Pending,
                    _ => {}
                }
                if closed {
                    // The last frames (a `GOAWAY`) out, then the close
                    // (TLS's `close_notify`).
                    if Pin::new(&mut this.io).poll_shutdown(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

impl<T> Driver<T> {
    /// Ends the connection on a broken socket: every stream fails.
    fn end(&mut self, error: Error) -> Poll<Result<(), Error>> {
        self.shared.lock().fail(error.clone(), None);
        self.done = true;
        Poll::Ready(Err(error))
    }
}

impl<T> Drop for Driver<T> {
    /// A driver dropped (its task aborted, its connection let go) fails
    /// whatever still waits on the connection.
    fn drop(&mut self) {
        self.shared
            .lock()
            .fail(Error::Io("connection dropped".to_owned()), None);
    }
}

/// Handles every whole frame in `read`: a stream error resets its stream,
/// a connection error ends the connection.
fn handle_frames(inner: &mut Inner, read: &mut BytesMut) -> Result<(), FrameError> {
    while let Some((head, payload)) = frame::next(read, frame::DEFAULT_MAX_FRAME)? {
        match handle_frame(inner, head, payload) {
            Err(e) if e.stream != 0 => inner.reset(e.stream, e.reason),
            other => other?,
        }
    }
    Ok(())
}

fn handle_frame(inner: &mut Inner, head: Head, payload: Bytes) -> Result<(), FrameError> {
    if let Some(block) = inner.partial.take() {
        let assembled = block.push(&head, &payload)?;
        return on_block(inner, assembled);
    }
    {
        match head.kind {
            kind::DATA => on_data(inner, &head, payload)?,
            kind::HEADERS => {
                let max = inner.config.max_header_list as usize * 2 + 1024;
                let assembled = Block::start(&head, payload, max)?;
                on_block(inner, assembled)?;
            }
            kind::PRIORITY => frame::priority(&head, &payload)?,
            kind::RST_STREAM => {
                let reason = frame::rst_stream(&head, &payload)?;
                idle_check(inner, head.stream)?;
                if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    if stream.error.is_none() {
                        stream.error = Some(Error::Reset {
                            reason,
                            remote: true,
                        });
                        // An answer already whole stands (RFC 9113 §8.1):
                        // only the sending stops.
                        if stream.recv_done && reason == Reason::NO_ERROR {
                            stream.error = None;
                            stream.send_done = true;
                            stream.stopped = Some(reason);
                        }
                    }
                    stream.wake();
                    inner.discard_send(head.stream);
                    inner.settle(head.stream);
                }
            }
            kind::SETTINGS => {
                if let Some(settings) = Settings::parse(&head, &payload)? {
                    on_settings(inner, settings)?;
                    frame::write_settings_ack(&mut inner.out);
                }
            }
            kind::PUSH_PROMISE => return Err(FrameError::connection(Reason::PROTOCOL_ERROR)),
            kind::PING => {
                let data = frame::ping(&head, &payload)?;
                if !head.has(flag::ACK) {
                    frame::write_ping(true, data, &mut inner.out);
                } else if data == PING_DATA {
                    if let Some((pong, waker)) = &mut inner.ping {
                        *pong = true;
                        if let Some(w) = waker.take() {
                            w.wake();
                        }
                    }
                }
            }
            kind::GOAWAY => {
                let goaway = frame::goaway(&head, payload)?;
                inner.goaway = Some((goaway.last_stream, goaway.reason));
                for (&id, stream) in inner.streams.iter_mut() {
                    if id > goaway.last_stream && stream.error.is_none() {
                        stream.error = Some(Error::GoAway {
                            reason: goaway.reason,
                            refused: true,
                        });
                        stream.wake();
                    }
                }
                let ids: Vec<u32> = inner.streams.keys().copied().collect();
                for id in ids {
                    inner.settle(id);
                }
                inner.wake_room();
            }
            kind::WINDOW_UPDATE => {
                let increment = i64::from(frame::window_update(&head, &payload)?);
                if head.stream == 0 {
                    inner.send_window += increment;
                    if inner.send_window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError::connection(Reason::FLOW_CONTROL_ERROR));
                    }
                } else if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    stream.send_window += increment;
                    if stream.send_window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError::stream(Reason::FLOW_CONTROL_ERROR, head.stream));
                    }
                    if !stream.queued.is_empty() && !inner.blocked.contains(&head.stream) {
                        inner.blocked.push_back(head.stream);
                    }
                } else {
                    idle_check(inner, head.stream)?;
                }
                inner.flush_blocked();
            }
            kind::CONTINUATION => return Err(FrameError::connection(Reason::PROTOCOL_ERROR)),
            // Unknown frame types are ignored (§4.1).
            _ => {}
        }
    }
    Ok(())
}

/// A frame on a stream this end never opened (an even or unused odd ID)
/// is a connection error (§5.1: "idle" streams).
fn idle_check(inner: &Inner, id: u32) -> Result<(), FrameError> {
    if id == 0 || id.is_multiple_of(2) || id >= inner.next_id {
        return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
    }
    Ok(())
}

fn on_settings(inner: &mut Inner, settings: Settings) -> Result<(), FrameError> {
    if let Some(size) = settings.max_frame_size {
        inner.max_frame = size;
    }
    if let Some(n) = settings.max_concurrent_streams {
        inner.max_streams = n as usize;
        inner.wake_room();
    }
    if let Some(window) = settings.initial_window_size {
        let delta = i64::from(window) - inner.initial_send_window;
        inner.initial_send_window = i64::from(window);
        for (&id, stream) in inner.streams.iter_mut() {
            stream.send_window += delta;
            if stream.send_window > i64::from(frame::MAX_WINDOW) {
                return Err(FrameError::connection(Reason::FLOW_CONTROL_ERROR));
            }
            if delta > 0 && !stream.queued.is_empty() && !inner.blocked.contains(&id) {
                inner.blocked.push_back(id);
            }
        }
        inner.flush_blocked();
    }
    if let Some(size) = settings.header_table_size {
        // Never more than the 4,096 this end's encoder keeps.
        inner
            .encoder
            .resize((size as usize).min(hpack::DEFAULT_TABLE_SIZE));
    }
    Ok(())
}

fn on_data(inner: &mut Inner, head: &Head, payload: Bytes) -> Result<(), FrameError> {
    let len = i64::from(head.len);
    inner.recv_window -= len;
    if inner.recv_window < 0 {
        return Err(FrameError::connection(Reason::FLOW_CONTROL_ERROR));
    }
    let data = frame::data(head, payload)?;
    let id = head.stream;
    let Some(stream) = inner.streams.get_mut(&id) else {
        idle_check(inner, id)?;
        // A stream already gone: its window goes back at once.
        inner.release(None, len);
        return Ok(());
    };
    if stream.error.is_some() {
        inner.release(None, len);
        return Ok(());
    }
    // After the end (§5.1), before the head (§8.1): stream errors, the
    // stream reset by the caller and the window given back.
    if stream.recv_done {
        inner.release(None, len);
        return Err(FrameError::stream(Reason::STREAM_CLOSED, id));
    }
    if !stream.answered {
        inner.release(None, len);
        return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
    }
    stream.recv_window -= len;
    if stream.recv_window < 0 {
        inner.release(None, len);
        return Err(FrameError::stream(Reason::FLOW_CONTROL_ERROR, id));
    }
    let n = data.len() as u64;
    let end = head.has(flag::END_STREAM);
    // More data than `content-length`, or less by the end (§8.1.1).
    if stream
        .remaining
        .is_some_and(|left| n > left || (end && left != n))
    {
        inner.release(None, len);
        return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
    }
    if let Some(left) = &mut stream.remaining {
        *left -= n;
    }
    if n > 0 {
        stream.data.push_back(data);
    }
    if end {
        stream.recv_done = true;
    }
    if let Some(w) = stream.recv_waker.take() {
        w.wake();
    }
    // Padding counts against the windows but is never taken: back now.
    inner.release(Some(id), len - n as i64);
    inner.settle(id);
    Ok(())
}

fn on_block(inner: &mut Inner, assembled: Assembled) -> Result<(), FrameError> {
    let (id, end, block) = match assembled {
        Assembled::Partial(block) => {
            inner.partial = Some(block);
            return Ok(());
        }
        Assembled::Whole {
            stream,
            end_stream,
            block,
        } => (stream, end_stream, block),
    };
    // Decoded whatever the stream's state: the table must stay in step.
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let limit = inner.config.max_header_list as usize;
    let fit = inner
        .decoder
        .decode(&block, limit, |f| fields.push(f))
        .map_err(|_| FrameError::connection(Reason::COMPRESSION_ERROR))?;
    let Some(stream) = inner.streams.get_mut(&id) else {
        return idle_check(inner, id);
    };
    if stream.error.is_some() {
        return Ok(());
    }
    if stream.recv_done {
        return Err(FrameError::stream(Reason::STREAM_CLOSED, id));
    }
    if !fit {
        return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
    }
    let parsed = match stream.answered {
        false => response_head(&fields),
        true => field_map(&fields).map(Parsed::Trailers),
    };
    match parsed {
        // An interim answer (100 Continue, 103 Early Hints): not passed on.
        Some(Parsed::Informational) if !end => {}
        Some(Parsed::Head(head, length)) => {
            // No content for a `HEAD` or a 204 or 304, whatever the length
            // says (RFC 9110 §8.6).
            let no_content = stream.no_content
                || head.status() == StatusCode::NO_CONTENT
                || head.status() == StatusCode::NOT_MODIFIED;
            let length = if no_content { Some(0) } else { length };
            // A head that ends the stream with content promised (§8.1.1).
            if end && length.is_some_and(|n| n != 0) {
                return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
            }
            stream.remaining = length;
            stream.head = Some(head);
            stream.answered = true;
            stream.recv_done = end;
        }
        // Trailers end the stream, and the data `content-length` promised
        // came whole.
        Some(Parsed::Trailers(map)) if end && stream.remaining.is_none_or(|left| left == 0) => {
            stream.trailers = Some(map);
            stream.recv_done = true;
        }
        // Malformed (RFC 9113 §8.1.1): a stream error.
        _ => return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id)),
    }
    if let Some(stream) = inner.streams.get_mut(&id) {
        if let Some(w) = stream.recv_waker.take() {
            w.wake();
        }
    }
    inner.settle(id);
    Ok(())
}

enum Parsed {
    Informational,
    Head(Response<()>, Option<u64>),
    Trailers(HeaderMap),
}

/// A response head: `:status` first and alone among pseudo-fields, the
/// rest valid lowercase fields with no connection-specific ones.
fn response_head(fields: &[Field]) -> Option<Parsed> {
    let (first, rest) = fields.split_first()?;
    if first.name != ":status" {
        return None;
    }
    let status = StatusCode::from_bytes(&first.value).ok()?;
    if status.is_informational() {
        return (status != StatusCode::SWITCHING_PROTOCOLS).then_some(Parsed::Informational);
    }
    let headers = field_map(rest)?;
    let length = content_length(&headers)?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = http::Version::HTTP_2;
    *resp.headers_mut() = headers;
    Some(Parsed::Head(resp, length))
}

/// The `content-length` of a head: `Some(None)` for none, `None` for a
/// malformed one. One plain number (RFC 9110 §8.6), or the same number
/// repeated (a list of equal values, as `h2` takes it).
pub fn content_length(headers: &HeaderMap) -> Option<Option<u64>> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let digits = value.as_bytes();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        if length.is_some_and(|m| m != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length)
}

/// Regular fields into a map; `None` for a malformed list.
fn field_map(fields: &[Field]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        if field.name.starts_with(b":") || field.name.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        let name = HeaderName::from_bytes(&field.name).ok()?;
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        ) {
            return None;
        }
        let mut value = HeaderValue::from_maybe_shared(field.value.clone()).ok()?;
        value.set_sensitive(field.sensitive);
        map.append(name, value);
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client on an in-memory connection to an `h2` server built by
    /// `server`, which hands each stream it accepts to `answer`.
    async fn served_by<F>(server: h2::server::Builder, answer: F) -> Client
    where
        F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) + Send + Sync + 'static,
    {
        let (client, io) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let Ok(mut conn) = server.handshake::<_, Bytes>(io).await else {
                return;
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                answer(req, respond);
            }
        });
        let (client, driver) = handshake(client, Config::default());
        tokio::spawn(driver);
        client
    }

    async fn read_all(body: &mut RecvStream) -> Result<Vec<u8>, Error> {
        let mut all = Vec::new();
        while let Some(data) = poll_fn(|cx| body.poll_data(cx)).await {
            all.extend_from_slice(&data?);
        }
        Ok(all)
    }

    async fn read_body(mut body: h2::RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut all = Vec::new();
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
            all.extend_from_slice(&data);
        }
        (all, body.trailers().await.ok().flatten())
    }

    /// Opens a `POST` to `uri` whose body is still to come.
    fn upload(client: &Client, uri: &str) -> (ResponseFuture, SendStream) {
        let req = Request::post(uri)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .send_request(&req, false)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn get(path: &str) -> Request<()> {
        let uri = format!("http://up{path}");
        Request::get(uri).body(()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Bodies far past every window both ways (a 300 KB upload against
    /// `h2`'s 64 KB windows, a 5 MB answer against this end's 2 MB), the
    /// request's trailers and the answer's, on one stream, arrive whole.
    #[tokio::test]
    async fn bodies_past_the_windows_and_trailers_arrive_whole() {
        let client = served_by(h2::server::Builder::new(), |req, mut respond| {
            tokio::spawn(async move {
                let (body, trailers) = read_body(req.into_body()).await;
                let tag = trailers.and_then(|t| t.get("x-tag").cloned());
                let resp = Response::builder()
                    .header("x-got", body.len().to_string())
                    .header("x-tag", tag.unwrap_or(HeaderValue::from_static("none")))
                    .body(())
                    .unwrap_or_else(|e| panic!("{e}"));
                let Ok(mut stream) = respond.send_response(resp, false) else {
                    return;
                };
                let _ = stream.send_data(Bytes::from(vec![7u8; 5_000_000]), false);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = stream.send_trailers(trailers);
                // Keep the stream's sending half until all is out.
                let _ = poll_fn(|cx| stream.poll_reset(cx)).await;
            });
        })
        .await;
        let (response, mut body) = upload(&client, "http://up/upload");
        body.send_data(Bytes::from(vec![1u8; 300_000]), false)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-tag", HeaderValue::from_static("t1"));
        body.send_trailers(trailers)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-got"], "300000");
        assert_eq!(resp.headers()["x-tag"], "t1");
        let mut recv = resp.into_body();
        let got = read_all(&mut recv).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), 5_000_000);
        assert!(got.iter().all(|&b| b == 7));
        let trailers = poll_fn(|cx| recv.poll_trailers(cx)).await;
        let status = trailers
            .ok()
            .flatten()
            .and_then(|t| t.get("grpc-status").cloned());
        assert_eq!(status, Some(HeaderValue::from_static("0")));
    }

    /// Many streams at once on one connection, each answered with its own
    /// path; the server's stream limit is kept (no stream over it sent,
    /// and room again as streams end).
    #[tokio::test]
    async fn concurrent_streams_get_their_own_answers_within_the_limit() {
        let mut builder = h2::server::Builder::new();
        builder.max_concurrent_streams(8);
        let client = served_by(builder, |req, mut respond| {
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let path = req.uri().path().to_owned();
                let resp = Response::new(());
                if let Ok(mut stream) = respond.send_response(resp, false) {
                    let _ = stream.send_data(Bytes::from(path), true);
                }
            });
        })
        .await;
        // The server's settings first (its limit).
        assert!(client.ping().await);
        let mut waiting = Vec::new();
        for i in 0..8 {
            let (response, _body) = client
                .send_request(&get(&format!("/{i}")), true)
                .unwrap_or_else(|e| panic!("{e}"));
            waiting.push((i, response));
        }
        assert!(!client.has_room());
        let over = client.send_request(&get("/over"), true).err();
        assert!(over.is_some_and(|e| e.is_refused()));
        for (i, response) in waiting {
            let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
            let mut body = resp.into_body();
            let got = read_all(&mut body).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, format!("/{i}").into_bytes());
        }
        assert!(client.has_room());
        assert_eq!(client.active(), 0);
    }

    /// `REFUSED_STREAM` says nothing was processed; another reset does not.
    #[tokio::test]
    async fn a_refused_stream_is_told_apart_from_a_reset_one() {
        let client = served_by(h2::server::Builder::new(), |req, mut respond| {
            match req.uri().path() {
                "/refuse" => respond.send_reset(h2::Reason::REFUSED_STREAM),
                _ => respond.send_reset(h2::Reason::INTERNAL_ERROR),
            }
        })
        .await;
        let (refused, _b1) = client
            .send_request(&get("/refuse"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let (reset, _b2) = client
            .send_request(&get("/reset"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let refused = refused.await.err().unwrap_or_else(|| panic!("answered"));
        let reset = reset.await.err().unwrap_or_else(|| panic!("answered"));
        assert!(refused.is_refused(), "{refused}");
        assert!(!reset.is_refused(), "{reset}");
        assert_eq!(
            reset,
            Error::Reset {
                reason: Reason::INTERNAL_ERROR,
                remote: true
            }
        );
    }

    /// An answer dropped before its end resets its stream upstream
    /// (`CANCEL`), and the stream's place is given back.
    #[tokio::test]
    async fn a_dropped_answer_cancels_its_stream() {
        let (seen_tx, seen) = tokio::sync::oneshot::channel::<h2::Reason>();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let client = served_by(h2::server::Builder::new(), move |_req, mut respond| {
            let tx = seen_tx.lock().ok().and_then(|mut t| t.take());
            tokio::spawn(async move {
                let Ok(mut stream) = respond.send_response(Response::new(()), false) else {
                    return;
                };
                let _ = stream.send_data(Bytes::from_static(b"part"), false);
                let reason = poll_fn(|cx| stream.poll_reset(cx)).await;
                if let (Some(tx), Ok(reason)) = (tx, reason) {
                    let _ = tx.send(reason);
                }
            });
        })
        .await;
        let (response, _body) = client
            .send_request(&get("/"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
        let mut body = resp.into_body();
        let first = poll_fn(|cx| body.poll_data(cx)).await;
        assert_eq!(
            first.and_then(Result::ok),
            Some(Bytes::from_static(b"part"))
        );
        drop(body);
        assert_eq!(seen.await.ok(), Some(h2::Reason::CANCEL));
        assert_eq!(client.active(), 0);
    }

    /// A server with no dynamic table (`SETTINGS_HEADER_TABLE_SIZE` 0) and
    /// its 16 KB frames: heads still arrive whole, large ones in
    /// `CONTINUATION`s.
    #[tokio::test]
    async fn heads_follow_the_servers_table_size_and_frame_size() {
        let mut builder = h2::server::Builder::new();
        builder.header_table_size(0).max_header_list_size(64 * 1024);
        let client = served_by(builder, |req, mut respond| {
            let big = req.headers().get("x-big").map_or(0, |v| v.len());
            let resp = Response::builder()
                .header("x-big-len", big.to_string())
                .body(())
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = respond.send_response(resp, true);
        })
        .await;
        assert!(client.ping().await);
        for _ in 0..3 {
            let mut req = get("/");
            let big = HeaderValue::from_str(&"b".repeat(20_000)).unwrap_or_else(|e| panic!("{e}"));
            req.headers_mut().insert("x-big", big);
            req.headers_mut()
                .insert("user-agent", HeaderValue::from_static("almond"));
            let (response, _b) = client
                .send_request(&req, true)
                .unwrap_or_else(|e| panic!("{e}"));
            let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.headers()["x-big-len"], "20000");
        }
    }

    /// A raw server: its settings, then whatever `script` writes once it
    /// has read `requests` request heads (decoded with almond's decoder).
    async fn raw_server(io: tokio::io::DuplexStream, requests: usize, script: fn(&mut BytesMut)) {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut out = BytesMut::new();
        Settings::default().write(&mut out);
        if wr.write_all(&out).await.is_err() {
            return;
        }
        let mut buf = BytesMut::new();
        let mut heads = 0;
        let mut preface = false;
        while heads < requests {
            if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            if !preface && buf.len() >= frame::PREFACE.len() {
                buf.advance(frame::PREFACE.len());
                preface = true;
            }
            while let Ok(Some((head, _))) = frame::next(&mut buf, frame::MAX_FRAME_LIMIT) {
                if head.kind == kind::HEADERS {
                    heads += 1;
                }
            }
        }
        let mut out = BytesMut::new();
        script(&mut out);
        let _ = wr.write_all(&out).await;
        // Hold the connection open.
        let mut sink = [0u8; 1024];
        while rd.read(&mut sink).await.unwrap_or(0) > 0 {}
    }

    fn answer_200(stream: u32, out: &mut BytesMut) {
        let mut encoder = Encoder::default();
        let mut block = BytesMut::new();
        encoder.field(b":status", b"200", Indexing::Index, &mut block);
        frame::write_headers(stream, &block, true, frame::DEFAULT_MAX_FRAME, out);
    }

    /// A `GOAWAY` naming stream 1 as the last: stream 3 was never
    /// processed (refused, may go again), stream 1 still gets its answer,
    /// and no new stream is opened.
    #[tokio::test]
    async fn a_goaway_refuses_the_streams_above_its_last() {
        let (io, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(raw_server(server, 2, |out| {
            frame::write_goaway(1, Reason::NO_ERROR, out);
            answer_200(1, out);
        }));
        let (client, driver) = handshake(io, Config::default());
        tokio::spawn(driver);
        let (first, _b1) = client
            .send_request(&get("/1"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let (second, _b2) = client
            .send_request(&get("/3"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let second = second.await.err().unwrap_or_else(|| panic!("answered"));
        assert!(second.is_refused(), "{second}");
        let first = first.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.status(), 200);
        assert!(client.is_closed());
        let third = client.send_request(&get("/5"), true).err();
        assert!(third.is_some_and(|e| e.is_refused()));
    }

    /// A malformed answer (an uppercase field name, RFC 9113 §8.2.1) is a
    /// stream error: the stream is reset, the connection carries on.
    #[tokio::test]
    async fn a_malformed_answer_resets_only_its_stream() {
        let (io, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(raw_server(server, 2, |out| {
            let mut encoder = Encoder::default();
            let mut block = BytesMut::new();
            encoder.field(b":status", b"200", Indexing::Index, &mut block);
            encoder.field(b"X-Upper", b"1", Indexing::Skip, &mut block);
            frame::write_headers(1, &block, true, frame::DEFAULT_MAX_FRAME, out);
            let mut block = BytesMut::new();
            encoder.field(b":status", b"200", Indexing::Index, &mut block);
            frame::write_headers(3, &block, true, frame::DEFAULT_MAX_FRAME, out);
        }));
        let (client, driver) = handshake(io, Config::default());
        tokio::spawn(driver);
        let (first, _b1) = client
            .send_request(&get("/1"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let (second, _b2) = client
            .send_request(&get("/3"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let first = first.await.err();
        assert_eq!(
            first,
            Some(Error::Reset {
                reason: Reason::PROTOCOL_ERROR,
                remote: false
            })
        );
        let second = second.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(second.status(), 200);
        assert!(!client.is_closed());
    }

    /// A `HEAD`'s answer may give the length of what a `GET` would get and
    /// end its stream at once (RFC 9110 §8.6): it is whole, not malformed.
    #[tokio::test]
    async fn a_head_answer_with_a_length_and_no_data_is_whole() {
        let (io, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(raw_server(server, 1, |out| {
            let mut encoder = Encoder::default();
            let mut block = BytesMut::new();
            encoder.field(b":status", b"200", Indexing::Index, &mut block);
            encoder.field(b"content-length", b"1234", Indexing::Skip, &mut block);
            frame::write_headers(1, &block, true, frame::DEFAULT_MAX_FRAME, out);
        }));
        let (client, driver) = handshake(io, Config::default());
        tokio::spawn(driver);
        let head = Request::head("http://up/")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let (response, _b) = client
            .send_request(&head, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.headers()["content-length"], "1234");
        let mut body = resp.into_body();
        assert_eq!(read_all(&mut body).await, Ok(Vec::new()));
        drop(body);
        assert_eq!(client.active(), 0);
    }

    /// Answers left half read (their clients gone) give their connection
    /// window back: with a connection window of two answers, the tenth
    /// answer still comes whole.
    #[tokio::test(start_paused = true)]
    async fn answers_left_unread_give_their_window_back() {
        let (io, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(server).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let Ok(mut stream) = respond.send_response(Response::new(()), false) else {
                        return;
                    };
                    let _ = stream.send_data(Bytes::from(vec![3u8; 100_000]), true);
                    let _ = poll_fn(|cx| stream.poll_reset(cx)).await;
                });
            }
        });
        let config = Config {
            stream_window: 120_000,
            conn_window: 200_000,
            ..Config::default()
        };
        let (client, driver) = handshake(io, config);
        tokio::spawn(driver);
        for i in 0..10 {
            let (response, _b) = client
                .send_request(&get("/"), true)
                .unwrap_or_else(|e| panic!("{e}"));
            let resp = tokio::time::timeout(std::time::Duration::from_secs(60), response).await;
            let resp = resp
                .unwrap_or_else(|_| panic!("answer {i} stalled"))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut body = resp.into_body();
            if i < 9 {
                // One frame read, then let go with the rest unread.
                let first = poll_fn(|cx| body.poll_data(cx));
                let first = tokio::time::timeout(std::time::Duration::from_secs(60), first).await;
                let first = first.unwrap_or_else(|_| panic!("answer {i}'s data stalled"));
                assert!(matches!(first, Some(Ok(_))));
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            let all =
                tokio::time::timeout(std::time::Duration::from_secs(60), read_all(&mut body)).await;
            let all = all.unwrap_or_else(|_| panic!("the last answer stalled"));
            assert_eq!(all.map(|b| b.len()), Ok(100_000));
        }
    }

    /// A request body dropped before its end resets the stream (`CANCEL`)
    /// even with data still queued for window; the stream's place is
    /// given back.
    #[tokio::test]
    async fn a_body_dropped_before_its_end_cancels_the_stream() {
        let (seen_tx, seen) = tokio::sync::oneshot::channel::<bool>();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let client = served_by(h2::server::Builder::new(), move |req, _respond| {
            let tx = seen_tx.lock().ok().and_then(|mut t| t.take());
            tokio::spawn(async move {
                // Reads nothing at first: the upload waits for window.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let mut body = req.into_body();
                let mut failed = false;
                while let Some(chunk) = body.data().await {
                    match chunk {
                        Ok(data) => {
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if let Some(tx) = tx {
                    let _ = tx.send(failed);
                }
            });
        })
        .await;
        let (response, mut body) = upload(&client, "http://up/");
        body.send_data(Bytes::from(vec![0u8; 200_000]), false)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(body);
        assert_eq!(
            seen.await.ok(),
            Some(true),
            "the server saw the upload end cleanly"
        );
        drop(response);
        assert_eq!(client.active(), 0);
    }

    /// A driver dropped (its task aborted) fails every request waiting on
    /// its connection, and the connection takes no more.
    #[tokio::test]
    async fn a_dropped_driver_fails_what_waits_on_it() {
        let (io, _server) = tokio::io::duplex(64 * 1024);
        let (client, driver) = handshake(io, Config::default());
        let task = tokio::spawn(driver);
        let (response, _b) = client
            .send_request(&get("/"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        task.abort();
        let failed = response.await;
        assert!(matches!(failed, Err(Error::Io(_))), "{:?}", failed.err());
        assert!(client.is_closed());
        assert!(client.send_request(&get("/"), true).is_err());
    }

    /// A body waiting on its source learns of its stream's reset.
    #[tokio::test]
    async fn a_waiting_body_learns_of_a_reset() {
        let client = served_by(h2::server::Builder::new(), |_req, mut respond| {
            respond.send_reset(h2::Reason::ENHANCE_YOUR_CALM);
        })
        .await;
        let (_response, mut body) = upload(&client, "http://up/");
        let reason = poll_fn(|cx| body.poll_reset(cx)).await;
        assert_eq!(reason, Reason::ENHANCE_YOUR_CALM);
        assert!(body.send_data(Bytes::from_static(b"late"), true).is_err());
    }

    /// An answer whole before its request's body (the server answered
    /// early and still reads): letting the answer go leaves the upload to
    /// finish, every byte of it.
    #[tokio::test]
    async fn an_early_answer_let_go_leaves_the_upload_whole() {
        let (got_tx, got) = tokio::sync::oneshot::channel::<usize>();
        let got_tx = std::sync::Mutex::new(Some(got_tx));
        let client = served_by(h2::server::Builder::new(), move |req, mut respond| {
            let tx = got_tx.lock().ok().and_then(|mut t| t.take());
            let _ = respond.send_response(Response::new(()), true);
            tokio::spawn(async move {
                // The answer is let go before any window is given back:
                // most of the upload is still queued then.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let (body, _) = read_body(req.into_body()).await;
                if let Some(tx) = tx {
                    let _ = tx.send(body.len());
                }
            });
        })
        .await;
        let (response, mut body) = upload(&client, "http://up/");
        body.send_data(Bytes::from(vec![5u8; 300_000]), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
        drop(resp);
        drop(body);
        assert_eq!(got.await.ok(), Some(300_000));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]
        /// Any frames a server sends (any kind, flags, stream and payload),
        /// then its close: no panic, and every request gets its answer or
        /// an error.
        #[test]
        fn any_frames_from_a_server_end_in_answers_or_errors(
            frames in proptest::collection::vec(
                (
                    0u8..11,
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(vec![0u32, 1, 2, 3, 5, 7, 99]),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
                ),
                0..12,
            ),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async move {
                let (io, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = tokio::io::split(server);
                    let mut out = BytesMut::new();
                    Settings::default().write(&mut out);
                    for (kind, flags, stream, payload) in frames {
                        let head = Head { len: payload.len() as u32, kind, flags, stream };
                        head.write(&mut out);
                        out.extend_from_slice(&payload);
                    }
                    let _ = wr.write_all(&out).await;
                    // Read a little, then close.
                    let mut sink = [0u8; 256];
                    let _ = rd.read(&mut sink).await;
                });
                let (client, driver) = handshake(io, Config::default());
                tokio::spawn(driver);
                let mut waiting = Vec::new();
                for path in ["/1", "/3", "/5"] {
                    if let Ok((response, body)) = client.send_request(&get(path), false) {
                        waiting.push((response, body));
                    }
                }
                for (response, _body) in waiting {
                    if let Ok(resp) = response.await {
                        let mut body = resp.into_body();
                        let _ = read_all(&mut body).await;
                    }
                }
            });
        }
    }

    /// A request over the server's stream limit waits for room, and gets
    /// it as a stream ends.
    #[tokio::test]
    async fn a_request_waits_for_room_and_gets_it_as_a_stream_ends() {
        let mut builder = h2::server::Builder::new();
        builder.max_concurrent_streams(1);
        let (go_tx, go) = tokio::sync::watch::channel(false);
        let client = served_by(builder, move |_req, mut respond| {
            let mut go = go.clone();
            tokio::spawn(async move {
                let _ = go.wait_for(|go| *go).await;
                let _ = respond.send_response(Response::new(()), true);
            });
        })
        .await;
        // The server's settings first (its limit).
        assert!(client.ping().await);
        let (first, _body) = client
            .send_request(&get("/1"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        // Waiting in a task of its own: only the stream's end wakes it.
        let other = client.clone();
        let mut waiter = tokio::spawn(async move { poll_fn(|cx| other.poll_ready(cx)).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "room over the server's limit");
        let _ = go_tx.send(true);
        let ready = tokio::time::timeout(std::time::Duration::from_secs(10), &mut waiter).await;
        assert!(
            matches!(ready, Ok(Ok(Ok(_)))),
            "no room after the stream ended: {ready:?}"
        );
        let answered = first.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answered.status(), StatusCode::OK);
    }

    /// Once every handle is dropped the connection closes (`GOAWAY`, and
    /// the socket), but not before its last stream is over.
    #[tokio::test]
    async fn the_connection_closes_once_every_handle_is_dropped_and_its_streams_end() {
        let (io, server_io) = tokio::io::duplex(64 * 1024);
        let (go_tx, go) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let mut go = go.clone();
                tokio::spawn(async move {
                    let _ = go.wait_for(|go| *go).await;
                    let _ = respond.send_response(Response::new(()), true);
                });
            }
        });
        let (client, driver) = handshake(io, Config::default());
        let mut driver = tokio::spawn(driver);
        let (response, body) = client
            .send_request(&get("/"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(body);
        let control = client.control();
        let other = client.clone();
        drop(client);
        drop(other);
        // A stream is open: the connection stays (its pings answered).
        assert!(control.ping().await, "closed with a stream open");
        assert!(!driver.is_finished());
        let _ = go_tx.send(true);
        let answered = response.await.unwrap_or_else(|e| panic!("{e}"));
        drop(answered);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), &mut driver).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "the driver did not end cleanly: {ended:?}"
        );
        let served = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
        assert!(served.is_ok(), "the server saw no end of the connection");
    }

    /// An answer whose `content-length` is repeated with the same value is
    /// whole (RFC 9110 §8.6, as `h2` takes it); different values are
    /// malformed.
    #[tokio::test]
    async fn a_repeated_equal_content_length_is_taken() {
        let client = served_by(h2::server::Builder::new(), |req, mut respond| {
            let second = match req.uri().path() {
                "/same" => "5",
                _ => "6",
            };
            let resp = Response::builder()
                .header("content-length", "5")
                .header("content-length", second)
                .body(())
                .unwrap_or_else(|e| panic!("{e}"));
            if let Ok(mut stream) = respond.send_response(resp, false) {
                let _ = stream.send_data(Bytes::from_static(b"hello"), true);
            }
        })
        .await;
        let (same, _b1) = client
            .send_request(&get("/same"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = same.await.unwrap_or_else(|e| panic!("{e}"));
        let mut body = resp.into_body();
        let got = read_all(&mut body).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, b"hello");
        let (other, _b2) = client
            .send_request(&get("/other"), true)
            .unwrap_or_else(|e| panic!("{e}"));
        let failed = other.await.err();
        assert_eq!(
            failed,
            Some(Error::Reset {
                reason: Reason::PROTOCOL_ERROR,
                remote: false
            })
        );
    }
}
