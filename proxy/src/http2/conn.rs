//! An HTTP/2 connection on almond's codec, either end's: streams in a
//! table keyed by stream ID, flow control both ways, `SETTINGS`, pings,
//! `GOAWAY`, trailers, and the driver that reads and writes the socket.
//! Streams write their frames into the connection's buffer from wherever
//! they are polled (no frame queue). `client.rs` and `server.rs` are its
//! two ends.

use super::frame::{
    self, flag, kind, Assembled, Block, Error as FrameError, Head, Reason, Settings,
};
use super::head::{field_map, request_head, response_head, Parsed, Part};
use super::hpack::{self, Decoder, Encoder, Field, Indexing};
use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::{HeaderMap, Response, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
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

pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    /// The `Client`s alive (a [`Control`] is not one).
    pub(super) handles: AtomicUsize,
}

/// A stream ID as its own hash: the IDs are distinct integers.
#[derive(Default)]
pub(super) struct IdHasher(u64);

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

pub(super) type Streams = HashMap<u32, Stream, BuildHasherDefault<IdHasher>>;

pub(super) struct Inner {
    pub(super) config: Config,
    pub(super) encoder: Encoder,
    pub(super) decoder: Decoder,
    /// Frames written, not yet handed to the socket.
    pub(super) out: BytesMut,
    /// The driver, to be woken when `out` has something.
    pub(super) driver: Option<Waker>,
    pub(super) streams: Streams,
    pub(super) next_id: u32,
    /// Streams open or half-closed: counted against the peer's limit.
    pub(super) active: usize,
    /// Places held by `Reservation`s for streams about to open: counted
    /// against the limit too.
    pub(super) reserved: usize,
    // The peer's settings.
    pub(super) max_streams: usize,
    pub(super) initial_send_window: i64,
    pub(super) max_frame: u32,
    /// The connection's send window, and what this end may still receive
    /// on it before a `WINDOW_UPDATE` (data taken is given back in
    /// batches).
    pub(super) send_window: i64,
    pub(super) recv_window: i64,
    pub(super) recv_taken: i64,
    /// Streams with data waiting for window.
    pub(super) blocked: VecDeque<u32>,
    /// The peer's `GOAWAY`: its last stream and reason.
    pub(super) goaway: Option<(u32, Reason)>,
    /// The connection is over, and why.
    pub(super) closed: Option<Error>,
    /// A header block being put together.
    pub(super) partial: Option<Block>,
    /// A block's fields as they are decoded: kept, cleared, between blocks
    /// (not a vector allocated for each).
    pub(super) fields: Vec<Field>,
    /// The user's ping: sent, and whether its pong came (one at a time).
    pub(super) ping: Option<(bool, Option<Waker>)>,
    /// Bodies waiting for `out` to drain below [`MAX_OUT`].
    pub(super) out_waiters: Vec<Waker>,
    /// Requests waiting for room for a stream (`Client::poll_ready`).
    pub(super) room_waiters: Vec<Waker>,
    /// Every handle (`Client`, `Server`) is dropped: the connection
    /// closes once its last stream is over.
    pub(super) released: bool,
    /// A server's side of the connection (`None` for a client's).
    pub(super) server: Option<Box<Accepting>>,
}

/// The limits a server keeps against its client.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Streams the client may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`); one more is refused.
    pub max_streams: u32,
    /// Streams the client reset before they were taken (`h2`'s
    /// `max_pending_accept_reset_streams`, 20): one more and the connection
    /// is closed (`ENHANCE_YOUR_CALM`; the 2023 "rapid reset" floods).
    pub max_pending_resets: usize,
    /// Streams this end reset for the client's errors (`h2`'s
    /// `max_local_error_reset_streams`): one more and the connection is
    /// closed (`ENHANCE_YOUR_CALM`).
    pub max_local_resets: usize,
    /// Streams the client may reset at once, whether taken or not, and
    /// how many more a second after that (nghttp2's
    /// `stream_reset_rate_limit`, 1,000 and 33): a client that resets
    /// streams as fast as they are taken (the paced "rapid reset": each
    /// costs the proxy a request started upstream) is let go
    /// (`ENHANCE_YOUR_CALM`).
    pub reset_burst: u32,
    /// The allowance's refill, a second (see `reset_burst`).
    pub resets_per_sec: u32,
    /// Frames in a row with nothing in them that end nothing (`DATA`
    /// without `END_STREAM`, `HEADERS` or `CONTINUATION` without
    /// `END_HEADERS`, each of length 0) a client may send: one more and the
    /// connection is closed (`ENHANCE_YOUR_CALM`; the 2019 "empty frames"
    /// flood, CVE-2019-9518). Netty's limit, 10 (Envoy's
    /// `max_consecutive_inbound_frames_with_empty_payload` is 1: a client
    /// whose streamed body flushes empty chunks would be let go).
    pub max_empty_frames: u32,
}

/// What is left of a client's allowance of resets (see
/// [`ServerLimits::reset_burst`]).
pub(super) struct ResetBudget {
    left: u64,
    /// When `left` last grew.
    since: tokio::time::Instant,
}

impl ResetBudget {
    pub(super) fn new(limits: &ServerLimits) -> ResetBudget {
        ResetBudget {
            left: u64::from(limits.reset_burst),
            since: tokio::time::Instant::now(),
        }
    }

    /// Takes one reset from the allowance: `false` once it is spent.
    fn take(&mut self, limits: &ServerLimits) -> bool {
        let now = tokio::time::Instant::now();
        let rate = u64::from(limits.resets_per_sec);
        let ms = u64::try_from(now.duration_since(self.since).as_millis()).unwrap_or(u64::MAX);
        let earned = ms.saturating_mul(rate) / 1000;
        if earned > 0 {
            self.left = self.left.saturating_add(earned);
            // The time of the tokens earned, not all of it: what is
            // earned of the next one is kept.
            self.since += std::time::Duration::from_millis(earned.saturating_mul(1000) / rate);
        }
        if self.left >= u64::from(limits.reset_burst) {
            self.left = u64::from(limits.reset_burst);
            self.since = now;
        }
        match self.left.checked_sub(1) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    /// Gives one back for a stream that ended whole: the allowance grows
    /// with the client's traffic (a busy gRPC channel cancels a share of
    /// its calls).
    fn credit(&mut self, limits: &ServerLimits) {
        self.left = (self.left + 1).min(u64::from(limits.reset_burst));
    }
}

/// What a server's connection keeps of the streams its client opens.
pub(super) struct Accepting {
    pub(super) limits: ServerLimits,
    /// Streams opened and not yet taken, with their request heads.
    pub(super) queue: VecDeque<(u32, http::Request<()>)>,
    /// The task taking them.
    pub(super) waker: Option<Waker>,
    /// The highest stream ID the client opened.
    pub(super) last_peer: u32,
    /// The highest stream ID taken (queued, or answered `431`): what a
    /// `GOAWAY` of this end's names, never higher than one sent before.
    pub(super) last_taken: u32,
    /// Streams of the client's this end reset or refused lately: a
    /// `HEADERS` still coming on one is ignored (RFC 9113 §5.4.2), on any
    /// other closed stream it is a connection error (§5.1.1).
    /// With whether a `HEADERS` came on it since (one may have been on its
    /// way, its trailers: free; more are the client's doing).
    pub(super) reset_ids: VecDeque<(u32, bool)>,
    /// Streams in `queue` the client reset.
    pub(super) pending_resets: usize,
    /// Streams reset for the client's errors, in all.
    pub(super) local_resets: usize,
    /// The client's resets of live streams.
    pub(super) resets: ResetBudget,
    /// Times the client changed its streams' initial window.
    pub(super) window_changes: u32,
    /// This end sent its `GOAWAY`: no new stream is taken.
    pub(super) going_away: bool,
    /// A graceful shutdown's first `GOAWAY` (the highest stream ID) and its
    /// `PING` are out; the last `GOAWAY`, naming the last stream taken,
    /// goes with the pong (by then the client opens no new stream: one
    /// on its way is served, not refused).
    pub(super) draining: bool,
    /// The client's preface was read.
    pub(super) preface: bool,
    /// Its first `SETTINGS` came.
    pub(super) settled: bool,
    /// Empty frames in a row (see [`ServerLimits::max_empty_frames`]).
    pub(super) empty_run: u32,
}

/// Bytes written by the streams and not yet taken by the socket, past which
/// a request body's next chunk waits and the driver reads no more frames
/// (whose answers, pings and settings acknowledgements, would pile up).
pub(super) const MAX_OUT: usize = 1024 * 1024;

/// DATA payloads under this are copied out of the read buffer (see
/// `on_data`).
const COPY_BELOW: usize = 8 * 1024;

/// Changes of the initial window a client may make on a connection: one
/// more is `ENHANCE_YOUR_CALM` (see `on_settings`).
const MAX_WINDOW_CHANGES: u32 = 100;

#[derive(Default)]
pub(super) struct Stream {
    /// The response head, once it came (until taken).
    pub(super) head: Option<Response<()>>,
    /// The response head came (an interim one does not count).
    pub(super) answered: bool,
    /// The answer has no content whatever its `content-length` says (the
    /// request was a `HEAD`; RFC 9110 §8.6).
    pub(super) no_content: bool,
    pub(super) data: VecDeque<Bytes>,
    /// Boxed, as `queued_trailers`: rare, and a stream entry moves in and
    /// out of the table whole (each map inline is 96 bytes more a move).
    pub(super) trailers: Option<Box<HeaderMap>>,
    /// `END_STREAM` received.
    pub(super) recv_done: bool,
    /// `END_STREAM` sent.
    pub(super) send_done: bool,
    /// Reset (by either side), or failed with the connection.
    pub(super) error: Option<Error>,
    /// This end's receive window for the stream, and data taken since
    /// the last `WINDOW_UPDATE`.
    pub(super) recv_window: i64,
    pub(super) recv_taken: i64,
    pub(super) send_window: i64,
    /// Data queued beyond the window, with whether it ends the stream; then
    /// trailers to send once it is out.
    pub(super) queued: VecDeque<(Bytes, bool)>,
    pub(super) queued_trailers: Option<Box<HeaderMap>>,
    /// What is left of the response's `content-length`.
    pub(super) remaining: Option<u64>,
    /// The head's `content-length`, as it said (for the body's handle).
    pub(super) declared: Option<u64>,
    /// The request's task, waiting for the head, data or trailers.
    pub(super) recv_waker: Option<Waker>,
    /// The body's task, waiting for window.
    pub(super) send_waker: Option<Waker>,
    /// The peer asked for no more of the body, its answer whole
    /// (`RST_STREAM(NO_ERROR)`): what `poll_reset` says.
    pub(super) stopped: Option<Reason>,
    /// The handles still held: the response side, the body side.
    pub(super) recv_held: bool,
    pub(super) send_held: bool,
    /// Counted in `active`.
    pub(super) counted: bool,
    /// In `Inner::blocked` (a flag: no walk of the list to find it).
    pub(super) in_blocked: bool,
}

impl Stream {
    pub(super) fn wake(&mut self) {
        if let Some(w) = self.recv_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    /// Both halves closed, or reset: no more frames either way.
    pub(super) fn is_closed(&self) -> bool {
        self.error.is_some() || (self.recv_done && self.send_done)
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-written that
        // matters more than the connection itself: it is used as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    pub(super) fn wake_driver(&mut self) {
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// Wakes the requests waiting for room for a stream (a stream ended,
    /// the peer's limit changed, or the connection is going).
    pub(super) fn wake_room(&mut self) {
        for w in self.room_waiters.drain(..) {
            w.wake();
        }
    }

    /// Fails the connection: every stream gets `error` (streams above the
    /// peer's last stream ID, refused), a `GOAWAY` goes out for an error of
    /// this end's finding.
    pub(super) fn fail(&mut self, error: Error, goaway: Option<Reason>) {
        if self.closed.is_some() {
            return;
        }
        if let Some(reason) = goaway {
            // A server names the last stream of its client's it took (0
            // would say none was processed, and invite replays).
            let last = self.server.as_ref().map_or(0, |s| s.last_taken);
            frame::write_goaway(last, reason, &mut self.out);
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
        if let Some(waker) = self.server.as_mut().and_then(|s| s.waker.take()) {
            waker.wake();
        }
        self.wake_driver();
    }

    /// Resets stream `id` from this end.
    pub(super) fn reset(&mut self, id: u32, reason: Reason) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if stream.is_closed() {
                return;
            }
            if let Some(server) = &mut self.server {
                server.note_reset(id);
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
    pub(super) fn discard(&mut self, id: u32) {
        self.discard_send(id);
        self.discard_recv(id);
    }

    /// Drops what stream `id` still had to send; its body learns so.
    pub(super) fn discard_send(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.queued.clear();
        stream.queued_trailers = None;
        if let Some(w) = stream.send_waker.take() {
            w.wake();
        }
        if std::mem::take(&mut stream.in_blocked) {
            self.blocked.retain(|&b| b != id);
        }
    }

    /// Drops the data stream `id` received and nobody took: its connection
    /// window goes back to the peer.
    pub(super) fn discard_recv(&mut self, id: u32) {
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
    pub(super) fn release(&mut self, id: Option<u32>, n: i64) {
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
    pub(super) fn let_go(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.recv_held = false;
        if stream.recv_done {
            self.discard_recv(id);
        } else if self.server.is_some() {
            // A request's body let go: its answer goes on (a server may
            // answer before the request ends), what comes of the body is
            // thrown away as it comes, and `settle` ends the stream with
            // `RST_STREAM(NO_ERROR)` once the answer is out (RFC 9113 §8.1).
            self.discard_recv(id);
        } else {
            self.reset(id, Reason::CANCEL);
        }
        self.settle(id);
    }

    /// Counts a closed stream out of `active`, and drops it once no handle
    /// holds it.
    pub(super) fn settle(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let unread = !stream.recv_held && !stream.recv_done && stream.error.is_none();
        if self.server.is_some() && unread && stream.send_done && stream.queued.is_empty() {
            // The answer is out, the rest of the request is not wanted.
            stream.error = Some(Error::Reset {
                reason: Reason::NO_ERROR,
                remote: false,
            });
            frame::write_rst_stream(id, Reason::NO_ERROR, &mut self.out);
            if let Some(server) = &mut self.server {
                server.note_reset(id);
            }
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
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
            if let Some(server) = self.server.as_mut().filter(|_| stream.error.is_none()) {
                server.resets.credit(&server.limits);
            }
            // Out of the line for window too (a stream whose own window
            // update let it send everything is still in it).
            if std::mem::take(&mut stream.in_blocked) {
                self.blocked.retain(|&b| b != id);
            }
            self.discard_recv(id);
            self.streams.remove(&id);
            let going = self.server.as_ref().is_some_and(|s| s.going_away);
            if (self.goaway.is_some() || self.released || going) && self.streams.is_empty() {
                // The last stream after a `GOAWAY`, or after the last
                // handle went: the driver closes.
                self.wake_driver();
            }
        }
    }

    /// Moves queued data of blocked streams into `out` as the windows allow.
    pub(super) fn flush_blocked(&mut self) {
        // The first in line goes last next time: no stream starves the rest
        // of a small connection window.
        // (Each stream served goes to the back of the line; the walk ends
        // with the connection's window, not with the line.)
        for _ in 0..self.blocked.len() {
            if self.send_window <= 0 {
                break;
            }
            let Some(id) = self.blocked.pop_front() else {
                break;
            };
            // Out of the line while it sends (its end, settled, need not
            // look for it there); back in below if it still waits.
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.in_blocked = false;
            }
            self.send_queued(id);
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.in_blocked = !stream.queued.is_empty() && stream.error.is_none();
                if stream.in_blocked {
                    self.blocked.push_back(id);
                }
            }
        }
    }

    /// Opens stream `id` with the windows in force, both its sides held
    /// and counted in `active`; `set` fills in what is its own.
    pub(super) fn add_stream(&mut self, id: u32, set: impl FnOnce(&mut Stream)) {
        let mut stream = Stream {
            recv_window: i64::from(self.config.stream_window),
            send_window: self.initial_send_window,
            recv_held: true,
            send_held: true,
            counted: true,
            ..Stream::default()
        };
        set(&mut stream);
        self.streams.insert(id, stream);
        self.active += 1;
    }

    /// Puts stream `id` in line for window, unless it is already.
    pub(super) fn block(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if !stream.in_blocked && !stream.queued.is_empty() {
                stream.in_blocked = true;
                self.blocked.push_back(id);
            }
        }
    }

    /// Writes what the windows allow of stream `id`'s queued data (and its
    /// trailers once the data is out).
    pub(super) fn send_queued(&mut self, id: u32) {
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
            if data.is_empty() && !end {
                // A frame with nothing in it that ends nothing: never
                // sent (a peer counts those in a row as a flood; Envoy
                // lets go of one that sends two).
                continue;
            }
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
                for (name, value) in trailers.iter() {
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
pub(super) fn indexing(name: &[u8], value: &HeaderValue) -> Indexing {
    if value.is_sensitive() {
        Indexing::Never
    } else {
        hpack::indexing_for(name)
    }
}

/// Pings and closes a connection without holding it open (its keep-alive's
/// handle).
pub struct Control {
    pub(super) shared: Arc<Shared>,
}

impl Control {
    /// As `Client::ping`.
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

pub(super) fn ping(shared: &Arc<Shared>) -> Pong {
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

pub(super) const PING_DATA: [u8; 8] = *b"almond\0\0";
/// The `PING` of a graceful shutdown (see [`Accepting::draining`]).
pub(super) const SHUTDOWN_PING: [u8; 8] = *b"almond\0\x01";

/// Keeps `cx`'s waker in `slot` (no clone if it is there already).
pub(super) fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// The error a stream not yet opened gets on a closed connection.
pub(super) fn refused(error: &Error) -> Error {
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
    pub(super) shared: Arc<Shared>,
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

/// A response's body: its data, then its trailers. Data taken is given
/// back to the peer's window as it is taken.
pub struct RecvStream {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u32,
    /// The head's `content-length`.
    pub(super) length: Option<u64>,
}

impl RecvStream {
    /// The `content-length` the head said (read once, with the head).
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

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
            return Poll::Ready(Ok(Some(*trailers)));
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
    pub(super) shared: Arc<Shared>,
    pub(super) id: u32,
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
        inner.block(self.id);
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
        stream.queued_trailers = Some(Box::new(trailers));
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
        poll_reset(&mut self.shared.lock(), self.id, cx)
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
    /// A server's fresh answers were held back (see [`hold`]): the next
    /// poll writes them.
    waited: bool,
    done: bool,
}

/// Should a server's fresh output wait until the tasks already queued
/// have run? Only while two streams or more are open: then answers to
/// other streams, which the upstream connections' tasks queued in the same
/// turn bring in, go out in the same write (nghttpx writes a loop's output
/// on the next loop): fewer writes, fewer wake-ups of the client. A
/// client's lone stream gets its answer at once, as does a client end's
/// output (requests held back batched no better: measured,
/// data-path-28).
fn hold(inner: &Inner) -> bool {
    inner.server.is_some() && inner.closed.is_none() && inner.active > 1
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Driver<T> {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        // Output held back in this poll: written in the next.
        let mut held = false;
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
            // This end's `GOAWAY` sent (a server's), and every stream over.
            let going = inner.server.as_ref().is_some_and(|s| s.going_away);
            if going && inner.streams.is_empty() && inner.closed.is_none() {
                let error = Error::GoAway {
                    reason: Reason::NO_ERROR,
                    refused: false,
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
            // Write what the streams and the handling wrote (a server's
            // fresh answers once the tasks already queued have run, while
            // other streams are open: polled again from the back of the
            // queue, where a task woken while it runs goes on both of
            // tokio's schedulers).
            let fresh = this.write.is_empty() && !inner.out.is_empty();
            if fresh && !this.waited && hold(&inner) {
                this.waited = true;
                held = true;
                cx.waker().wake_by_ref();
            } else if fresh && !held {
                this.waited = false;
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
pub(super) fn handle_frames(inner: &mut Inner, read: &mut BytesMut) -> Result<(), FrameError> {
    if let Some(server) = inner.server.as_mut().filter(|s| !s.preface) {
        // A client's connection starts with the preface (RFC 9113 §3.4).
        let n = read.len().min(frame::PREFACE.len());
        if read[..n] != frame::PREFACE[..n] {
            return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
        }
        if n < frame::PREFACE.len() {
            return Ok(());
        }
        read.advance(n);
        server.preface = true;
    }
    while let Some((head, payload)) = frame::next(read, frame::DEFAULT_MAX_FRAME)? {
        if let Some(server) = inner.server.as_mut().filter(|s| !s.settled) {
            // The preface's second part is a `SETTINGS` frame (§3.4), the
            // client's own (not an acknowledgement).
            if head.kind != kind::SETTINGS || head.has(flag::ACK) {
                return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
            }
            server.settled = true;
        }
        if let Some(server) = inner.server.as_mut() {
            server.count_empty(&head)?;
        }
        match handle_frame(inner, head, payload) {
            Err(e) if e.stream != 0 => {
                if let Some(server) = &mut inner.server {
                    server.local_resets += 1;
                    if server.local_resets > server.limits.max_local_resets {
                        return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
                    }
                    if e.stream > server.last_peer || e.stream.is_multiple_of(2) {
                        // No reset for a stream never opened (§6.4).
                        return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
                    }
                    if !inner.streams.contains_key(&e.stream) {
                        // A request refused as it opened: it has no
                        // stream of its own to reset.
                        server.note_reset(e.stream);
                        frame::write_rst_stream(e.stream, e.reason, &mut inner.out);
                        inner.wake_driver();
                    }
                }
                inner.reset(e.stream, e.reason);
            }
            other => other?,
        }
    }
    Ok(())
}

pub(super) fn handle_frame(
    inner: &mut Inner,
    head: Head,
    payload: Bytes,
) -> Result<(), FrameError> {
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
                let client = inner.server.is_none();
                if let Some(server) = &mut inner.server {
                    let live = (inner.streams.get(&head.stream)).is_some_and(|s| s.error.is_none());
                    // Within the client's allowance of resets: of streams
                    // still being answered (one whose answer is out costs
                    // nothing more: gRPC clients reset those, `NO_ERROR`).
                    let answering = (inner.streams.get(&head.stream)).is_some_and(|s| !s.send_done);
                    if live && answering && !server.resets.take(&server.limits) {
                        return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
                    }
                    // Reset before it was taken: counted, as `h2` does.
                    let queued = live && server.queue.iter().any(|(id, _)| *id == head.stream);
                    if queued {
                        server.pending_resets += 1;
                        if server.pending_resets > server.limits.max_pending_resets {
                            return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
                        }
                    }
                }
                if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    if stream.error.is_none() {
                        stream.error = Some(Error::Reset {
                            reason,
                            remote: true,
                        });
                        // An answer already whole stands (RFC 9113 §8.1):
                        // only the sending stops.
                        if client && stream.recv_done && reason == Reason::NO_ERROR {
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
                } else if data == SHUTDOWN_PING {
                    if let Some(server) = inner.server.as_mut().filter(|s| s.draining) {
                        server.draining = false;
                        server.go_away(&mut inner.out);
                    }
                }
            }
            kind::GOAWAY => {
                let goaway = frame::goaway(&head, payload)?;
                inner.goaway = Some((goaway.last_stream, goaway.reason));
                // A client's `GOAWAY` names the last of this end's streams
                // (pushes, none): its own streams go on, and only the
                // taker learns that no more will come (no walk of the
                // streams: a flood of them costs nothing more).
                if let Some(server) = inner.server.as_mut() {
                    if let Some(w) = server.waker.take() {
                        w.wake();
                    }
                    return Ok(());
                }
                // The streams above the server's last one were never
                // processed: refused.
                let last = goaway.last_stream;
                for (&id, stream) in inner.streams.iter_mut() {
                    if id > last && stream.error.is_none() {
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
                    let was_shut = inner.send_window <= 0;
                    inner.send_window += increment;
                    if inner.send_window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError::connection(Reason::FLOW_CONTROL_ERROR));
                    }
                    // Only a window that opens helps the streams in line:
                    // a stream waits there with the connection's window
                    // spent, or its own (an update a frame walking them
                    // all would be a peer's lever on this end's CPU).
                    if was_shut && inner.send_window > 0 {
                        inner.flush_blocked();
                    }
                } else if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    stream.send_window += increment;
                    if stream.send_window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError::stream(Reason::FLOW_CONTROL_ERROR, head.stream));
                    }
                    if !stream.queued.is_empty() && inner.send_window > 0 {
                        inner.send_queued(head.stream);
                    }
                    inner.block(head.stream);
                } else {
                    idle_check(inner, head.stream)?;
                }
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
pub(super) fn idle_check(inner: &Inner, id: u32) -> Result<(), FrameError> {
    let opened = match &inner.server {
        Some(server) => id <= server.last_peer,
        None => id < inner.next_id,
    };
    if id == 0 || id.is_multiple_of(2) || !opened {
        return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
    }
    Ok(())
}

pub(super) fn on_settings(inner: &mut Inner, settings: Settings) -> Result<(), FrameError> {
    if let Some(size) = settings.max_frame_size {
        inner.max_frame = size;
    }
    if let Some(n) = settings.max_concurrent_streams {
        inner.max_streams = n as usize;
        inner.wake_room();
    }
    if let Some(window) = settings.initial_window_size {
        let delta = i64::from(window) - inner.initial_send_window;
        // Each change walks the streams (and may send a frame on each
        // waiting for window): a client gets `MAX_WINDOW_CHANGES` of them
        // (a window tuned as the connection goes, gRPC's, takes a few).
        if let Some(server) = inner.server.as_mut().filter(|_| delta != 0) {
            server.window_changes += 1;
            if server.window_changes > MAX_WINDOW_CHANGES {
                return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
            }
        }
        inner.initial_send_window = i64::from(window);
        // The same again: no walk of the streams.
        if delta != 0 {
            for (&id, stream) in inner.streams.iter_mut() {
                stream.send_window += delta;
                if stream.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(FrameError::connection(Reason::FLOW_CONTROL_ERROR));
                }
                if delta > 0 && !stream.queued.is_empty() && !stream.in_blocked {
                    stream.in_blocked = true;
                    inner.blocked.push_back(id);
                }
            }
        }
        if delta > 0 {
            inner.flush_blocked();
        }
    }
    if let Some(size) = settings.header_table_size {
        // Never more than the 4,096 this end's encoder keeps.
        inner
            .encoder
            .resize((size as usize).min(hpack::DEFAULT_TABLE_SIZE));
    }
    Ok(())
}

pub(super) fn on_data(inner: &mut Inner, head: &Head, payload: Bytes) -> Result<(), FrameError> {
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
    // A body let go (a server's request answered early): thrown away as
    // it comes, its window given back.
    let kept = stream.recv_held;
    if n > 0 && kept {
        // A small payload copied out of the buffer it was read into: kept
        // as a slice, it would hold that whole buffer (16 KiB and more)
        // for as long as the body waits to be read, and a client sending
        // a byte of data a read could pin far more than its window.
        let data = match data.len() < COPY_BELOW {
            true => Bytes::copy_from_slice(&data),
            false => data,
        };
        stream.data.push_back(data);
    }
    if end {
        stream.recv_done = true;
    }
    // Nothing to take from an empty frame that does not end the stream.
    if n > 0 || end {
        if let Some(w) = stream.recv_waker.take() {
            w.wake();
        }
    }
    // Padding counts against the windows but is never taken: back now.
    // A body let go gives back the connection's window only: its stream's
    // stalls, as `h2` does (the client may not upload without end).
    match kept {
        true => inner.release(Some(id), len - n as i64),
        false => inner.release(None, len),
    }
    inner.settle(id);
    Ok(())
}

pub(super) fn on_block(inner: &mut Inner, assembled: Assembled) -> Result<(), FrameError> {
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
    let mut fields = std::mem::take(&mut inner.fields);
    let limit = inner.config.max_header_list as usize;
    let decoded = inner.decoder.decode(&block, limit, |f| fields.push(f));
    let handled = match decoded {
        Ok(fit) => on_head(inner, id, end, &fields, fit),
        Err(_) => Err(FrameError::connection(Reason::COMPRESSION_ERROR)),
    };
    // The fields' bytes let go (they hold the block), the room kept
    // unless a block of many fields made it large (it would stay so for
    // as long as the connection).
    fields.clear();
    if fields.capacity() > MAX_KEPT_FIELDS {
        fields = Vec::new();
    }
    inner.fields = fields;
    handled
}

/// The most fields [`Inner::fields`] keeps room for between blocks.
const MAX_KEPT_FIELDS: usize = 64;

/// A head decoded on stream `id` (`fit`: within the list's size): a
/// request taken, or a response or its trailers.
fn on_head(
    inner: &mut Inner,
    id: u32,
    end: bool,
    fields: &[Field],
    fit: bool,
) -> Result<(), FrameError> {
    let Some(stream) = inner.streams.get_mut(&id) else {
        return on_request(inner, id, end, fields, fit);
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
        false => response_head(fields),
        true => field_map(fields, Part::Trailers).map(|(map, _)| Parsed::Trailers(map)),
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
            stream.declared = length;
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
            stream.trailers = Some(Box::new(map));
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

/// Starts a connection over `io` with this end's `settings` (its windows
/// and header list limit come from `config`, clamped to what a window may
/// be): the shared state, and the driver to poll (in a task of its own, or
/// beside the streams; it ends with the connection). A client (no `server` side) writes the
/// preface first.
pub(super) fn start<T>(
    io: T,
    mut config: Config,
    mut settings: Settings,
    server: Option<Box<Accepting>>,
) -> (Arc<Shared>, Driver<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // Windows past 2^31-1 are not windows (RFC 9113 §6.9.1).
    config.stream_window = config.stream_window.min(frame::MAX_WINDOW);
    config.conn_window = config.conn_window.min(frame::MAX_WINDOW);
    let mut out = BytesMut::with_capacity(16 * 1024);
    if server.is_none() {
        out.extend_from_slice(frame::PREFACE);
    }
    settings.initial_window_size = Some(config.stream_window);
    settings.max_header_list_size = Some(config.max_header_list);
    settings.write(&mut out);
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
        fields: Vec::new(),
        ping: None,
        out_waiters: Vec::new(),
        room_waiters: Vec::new(),
        released: false,
        server,
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
        waited: false,
        done: false,
    };
    (shared, driver)
}

/// A `HEADERS` block on a stream not in the table: on a server's
/// connection, a client opening a stream (a request, handed out in turn by
/// `Server::poll_accept`); else a frame on a stream long gone, or never
/// opened.
fn on_request(
    inner: &mut Inner,
    id: u32,
    end: bool,
    fields: &[Field],
    fit: bool,
) -> Result<(), FrameError> {
    let active = inner.active;
    let Some(server) = inner.server.as_mut() else {
        return idle_check(inner, id);
    };
    if id.is_multiple_of(2) {
        return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
    }
    if id <= server.last_peer {
        // A stream this end reset or refused lately: what was on its way
        // is ignored (§5.4.2). Any other closed stream: §5.1.1.
        if let Some(seen) = (server.reset_ids.iter_mut())
            .find(|(reset, _)| *reset == id)
            .map(|(_, seen)| seen)
        {
            // The first may have crossed the reset (trailers on their way);
            // another is counted as a reset of the client's doing: a head
            // decoded for nothing, and a client could send them without end.
            if std::mem::replace(seen, true) {
                server.local_resets += 1;
                if server.local_resets > server.limits.max_local_resets {
                    return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
                }
            }
            return Ok(());
        }
        return Err(FrameError::connection(Reason::PROTOCOL_ERROR));
    }
    server.last_peer = id;
    // Over the limit, or a head too large: counted, as `h2` counts
    // refusals (a client that goes on sending them is let go).
    let over = active >= server.limits.max_streams as usize;
    if over || !fit {
        server.local_resets += 1;
        if server.local_resets > server.limits.max_local_resets {
            return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
        }
    }
    // After this end's `GOAWAY` or the client's, with nobody taking
    // streams, or over the limit: refused, nothing processed (the client
    // may send it again).
    let closing = server.going_away || inner.goaway.is_some() || inner.released;
    if closing || over {
        server.note_reset(id);
        frame::write_rst_stream(id, Reason::REFUSED_STREAM, &mut inner.out);
        inner.wake_driver();
        return Ok(());
    }
    if !fit {
        server.last_taken = id;
        server.note_reset(id);
        // A head over the limit this end set: `431`, as `h2` answers it,
        // and no more of the request.
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        write_response(inner, id, &resp, true, &[]);
        if !end {
            frame::write_rst_stream(id, Reason::NO_ERROR, &mut inner.out);
        }
        return Ok(());
    }
    let Some((req, length)) = request_head(fields) else {
        return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
    };
    // A head that ends the stream with content promised (§8.1.1).
    if end && length.is_some_and(|n| n != 0) {
        return Err(FrameError::stream(Reason::PROTOCOL_ERROR, id));
    }
    server.last_taken = id;
    server.queue.push_back((id, req));
    if let Some(waker) = server.waker.take() {
        waker.wake();
    }
    inner.add_stream(id, |stream| {
        // The head of what this end receives came.
        stream.answered = true;
        stream.recv_done = end;
        stream.remaining = length;
        stream.declared = length;
    });
    Ok(())
}

/// Writes a response head on stream `id` (ending it if `end`): `:status`,
/// then the fields, none connection-specific (RFC 9113 §8.2.2).
pub(super) fn write_response(
    inner: &mut Inner,
    id: u32,
    resp: &Response<()>,
    end: bool,
    extra: &[(&[u8], &[u8])],
) {
    let start = inner.out.len();
    inner.out.extend_from_slice(&[0; frame::HEAD_LEN]);
    let block = &mut inner.out;
    let enc = &mut inner.encoder;
    enc.begin(block);
    let status = resp.status();
    enc.field(
        b":status",
        status.as_str().as_bytes(),
        Indexing::Index,
        block,
    );
    for (name, value) in resp.headers() {
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        ) {
            continue;
        }
        let name = name.as_str().as_bytes();
        enc.field(name, value.as_bytes(), indexing(name, value), block);
    }
    for (name, value) in extra {
        enc.never(name, value, block);
    }
    frame::finish_headers(&mut inner.out, start, id, end, inner.max_frame);
    inner.wake_driver();
}

/// Waits for stream `id` to be reset, by the peer or with its connection
/// (or stopped: a whole answer's `RST_STREAM(NO_ERROR)`): the reason.
pub(super) fn poll_reset(inner: &mut Inner, id: u32, cx: &Context<'_>) -> Poll<Reason> {
    let Some(stream) = inner.streams.get_mut(&id) else {
        return Poll::Ready(Reason::STREAM_CLOSED);
    };
    match &stream.error {
        Some(Error::Reset { reason, .. } | Error::GoAway { reason, .. }) => Poll::Ready(*reason),
        Some(Error::Io(_)) => Poll::Ready(Reason::INTERNAL_ERROR),
        None => match stream.stopped {
            Some(reason) => Poll::Ready(reason),
            None => {
                park(&mut stream.send_waker, cx);
                Poll::Pending
            }
        },
    }
}

impl Accepting {
    /// Counts a client's frame that carries nothing and ends nothing, and
    /// lets go of a client that sends more in a row than its limit; a frame
    /// of a stream's with something in it, or ending something, starts
    /// the count again (other kinds of frame leave it as it is).
    fn count_empty(&mut self, head: &Head) -> Result<(), FrameError> {
        let ends = match head.kind {
            kind::DATA => flag::END_STREAM,
            kind::HEADERS | kind::CONTINUATION => flag::END_HEADERS,
            _ => return Ok(()),
        };
        if head.len > 0 || head.has(ends) {
            self.empty_run = 0;
            return Ok(());
        }
        self.empty_run += 1;
        if self.empty_run > self.limits.max_empty_frames {
            return Err(FrameError::connection(Reason::ENHANCE_YOUR_CALM));
        }
        Ok(())
    }

    /// Sends this end's (last) `GOAWAY`, naming the last stream taken, if
    /// it has not gone: no new stream is taken after it.
    pub(super) fn go_away(&mut self, out: &mut BytesMut) {
        if !self.going_away {
            self.going_away = true;
            frame::write_goaway(self.last_taken, Reason::NO_ERROR, out);
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }

    /// Keeps `id` among the streams reset or refused lately (the last
    /// 256).
    pub(super) fn note_reset(&mut self, id: u32) {
        if self.reset_ids.len() == 256 {
            self.reset_ids.pop_front();
        }
        self.reset_ids.push_back((id, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allowance refills at its rate whatever the gaps between resets:
    /// what is earned of a token is kept, not lost with each reset (at 33
    /// a second, a reset every 40 ms earns 1.32 tokens: 1 was kept, and a
    /// client spending one a gap never got the rest back).
    #[tokio::test(start_paused = true)]
    async fn the_reset_allowance_keeps_what_is_earned_of_a_token() {
        let limits = ServerLimits {
            reset_burst: 20,
            resets_per_sec: 33,
            ..ServerLimits::default()
        };
        let mut budget = ResetBudget::new(&limits);
        for _ in 0..20 {
            assert!(budget.take(&limits));
        }
        assert!(!budget.take(&limits), "the burst is spent");
        // 50 resets 40 ms apart (25 a second, under 33): 66 earned, 50
        // spent.
        for _ in 0..50 {
            tokio::time::advance(std::time::Duration::from_millis(40)).await;
            assert!(budget.take(&limits));
        }
        for i in 0..10 {
            assert!(budget.take(&limits), "reset {i} of what was earned");
        }
    }
}
