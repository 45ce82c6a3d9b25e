//! An HTTP/2 server connection on almond's codec (`conn.rs`): the streams
//! a client opens handed out as requests in turn, each answered from its
//! own task; the limits a server keeps against its client (streams at
//! once, the head's size, streams reset before they are taken, the
//! client's resets a second, streams reset for the client's errors). The
//! edge's HTTP/2 server (`edge/h2.rs`) runs on it.

use super::conn::{self, poll_reset, start, write_response, Accepting, Shared};
pub use super::conn::{Config, Control, Driver, Error, Pong, RecvStream, SendStream, ServerLimits};
use super::frame::{self, Reason, Settings};
use http::{Request, Response};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

impl Default for ServerLimits {
    /// `h2`'s server's: 20 pending resets; hyper's 1,024 streams reset for
    /// the client's errors, and the proxy's 1,024 streams at once; Netty's
    /// ten empty frames in a row.
    fn default() -> ServerLimits {
        ServerLimits {
            max_streams: 1024,
            max_pending_resets: 20,
            max_local_resets: 1024,
            reset_burst: 1000,
            resets_per_sec: 33,
            max_empty_frames: 10,
        }
    }
}

/// The accepting half of a server's connection. Once it is dropped and no
/// stream is left, the connection closes (`GOAWAY`).
pub struct Server {
    shared: Arc<Shared>,
}

impl Drop for Server {
    /// The streams not taken are refused (nothing of them was processed).
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let queued: Vec<u32> = (inner.server.as_mut())
            .map(|s| s.queue.drain(..).map(|(id, _)| id).collect())
            .unwrap_or_default();
        for id in queued {
            inner.reset(id, Reason::REFUSED_STREAM);
            if let Some(stream) = inner.streams.get_mut(&id) {
                stream.recv_held = false;
                stream.send_held = false;
            }
            inner.settle(id);
        }
        // Nobody takes streams now: the client is told, and the
        // connection closes once those taken are over.
        let inner = &mut *inner;
        if let Some(server) = inner.server.as_mut() {
            if !server.going_away && inner.closed.is_none() {
                server.go_away(&mut inner.out);
                inner.wake_driver();
            }
        }
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            inner.released = true;
            inner.wake_driver();
        }
    }
}

/// Starts serving a connection over `io` (the client's preface is read
/// first, by the driver): the server, and the driver to poll, in a task of
/// its own or in the one taking the requests (`edge/h2.rs` polls it beside
/// the streams); it ends with the connection.
pub fn handshake<T>(io: T, config: Config, limits: ServerLimits) -> (Server, Driver<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let settings = Settings {
        max_concurrent_streams: Some(limits.max_streams),
        ..Settings::default()
    };
    let accepting = Accepting {
        limits,
        queue: VecDeque::new(),
        waker: None,
        last_peer: 0,
        last_taken: 0,
        reset_ids: VecDeque::new(),
        pending_resets: 0,
        local_resets: 0,
        resets: conn::ResetBudget::new(&limits),
        window_changes: 0,
        going_away: false,
        draining: false,
        preface: false,
        settled: false,
        empty_run: 0,
    };
    let (shared, driver) = start(io, config, settings, Some(Box::new(accepting)));
    (Server { shared }, driver)
}

impl Server {
    /// The next request a client opened: its head and body, and the
    /// handle its answer goes out by. `None` once the connection is over,
    /// or going away with nothing left to take.
    pub fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(Request<RecvStream>, Respond)>> {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        loop {
            let Some(server) = inner.server.as_mut() else {
                return Poll::Ready(None);
            };
            let Some((id, req)) = server.queue.pop_front() else {
                if inner.closed.is_some() || server.going_away || inner.goaway.is_some() {
                    return Poll::Ready(None);
                }
                conn::park(&mut server.waker, cx);
                return Poll::Pending;
            };
            let stream = inner.streams.get(&id);
            if stream.is_none_or(|s| s.error.is_some()) {
                // Reset before it was taken: let go (counted if the client
                // reset it).
                if stream
                    .is_some_and(|s| matches!(s.error, Some(Error::Reset { remote: true, .. })))
                {
                    server.pending_resets = server.pending_resets.saturating_sub(1);
                }
                if let Some(stream) = inner.streams.get_mut(&id) {
                    stream.recv_held = false;
                    stream.send_held = false;
                }
                inner.settle(id);
                continue;
            }
            let shared = self.shared.clone();
            let body = RecvStream {
                shared: shared.clone(),
                id,
                length: stream.and_then(|s| s.declared),
            };
            let respond = Respond {
                shared,
                id,
                sent: false,
            };
            return Poll::Ready(Some((req.map(|()| body), respond)));
        }
    }

    /// Takes no new stream once the client knows: a `GOAWAY` naming the
    /// highest stream ID and a `PING` go first, and with the pong a
    /// `GOAWAY` naming the last stream taken (as `h2` and nghttp2 do: a
    /// request the client sent before it saw the first is served, not
    /// refused); the connection closes once the streams open are over.
    pub fn graceful_shutdown(&self) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(server) = inner.server.as_mut() else {
            return;
        };
        if server.going_away || server.draining || inner.closed.is_some() {
            return;
        }
        server.draining = true;
        frame::write_goaway(frame::MAX_STREAM_ID, Reason::NO_ERROR, &mut inner.out);
        frame::write_ping(false, conn::SHUTDOWN_PING, &mut inner.out);
        inner.wake_driver();
    }

    /// Takes no new stream from now: the last `GOAWAY` goes at once (a
    /// graceful shutdown whose pong is slow to come).
    pub fn go_away(&self) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        if let Some(server) = inner.server.as_mut() {
            if inner.closed.is_none() {
                server.go_away(&mut inner.out);
                inner.wake_driver();
            }
        }
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.shared.lock().active
    }

    /// The client's preface and first `SETTINGS` came (a server bounds
    /// the wait for them).
    pub fn has_preface(&self) -> bool {
        self.shared
            .lock()
            .server
            .as_ref()
            .is_some_and(|s| s.settled)
    }

    /// A handle that pings and closes the connection.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
        }
    }
}

/// The sending side of a request's stream until its answer's head goes.
pub struct Respond {
    shared: Arc<Shared>,
    id: u32,
    /// The head went: the [`SendStream`] holds the stream's sending side.
    sent: bool,
}

impl Respond {
    /// Sends the answer's head (ending the stream if `end`); its body goes
    /// by the [`SendStream`]. `Err` if the stream is reset.
    pub fn send_response(&mut self, resp: Response<()>, end: bool) -> Result<SendStream, Error> {
        self.send_response_with(resp, end, &[])
    }

    /// As [`Respond::send_response`], with `extra` fields after the
    /// head's (never indexed: this end's own, unique to the answer).
    pub fn send_response_with(
        &mut self,
        resp: Response<()>,
        end: bool,
        extra: &[(&[u8], &[u8])],
    ) -> Result<SendStream, Error> {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(stream) = inner.streams.get_mut(&self.id) else {
            return Err(Error::Io("stream gone".to_owned()));
        };
        if let Some(error) = &stream.error {
            return Err(error.clone());
        }
        if self.sent || stream.send_done {
            return Err(Error::Io("answer already sent".to_owned()));
        }
        stream.send_done = end;
        self.sent = true;
        write_response(inner, self.id, &resp, end, extra);
        inner.settle(self.id);
        Ok(SendStream {
            shared: self.shared.clone(),
            id: self.id,
        })
    }

    /// Sends an interim answer (`100 Continue`).
    pub fn send_informational(&mut self, resp: Response<()>) -> Result<(), Error> {
        let mut inner = self.shared.lock();
        let Some(stream) = inner.streams.get(&self.id) else {
            return Err(Error::Io("stream gone".to_owned()));
        };
        if let Some(error) = &stream.error {
            return Err(error.clone());
        }
        if self.sent || !resp.status().is_informational() {
            return Err(Error::Io("not an interim answer".to_owned()));
        }
        write_response(&mut inner, self.id, &resp, false, &[]);
        Ok(())
    }

    /// Waits for the client to reset the stream (it gave up on the
    /// answer): the reason.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Reason> {
        poll_reset(&mut self.shared.lock(), self.id, cx)
    }

    /// Resets the stream.
    pub fn send_reset(&mut self, reason: Reason) {
        self.sent = true;
        let mut inner = self.shared.lock();
        inner.reset(self.id, reason);
        if let Some(stream) = inner.streams.get_mut(&self.id) {
            stream.send_held = false;
        }
        inner.settle(self.id);
    }
}

impl Drop for Respond {
    /// No answer sent: the stream is reset (`INTERNAL_ERROR`: the server
    /// gave none).
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        let mut inner = self.shared.lock();
        inner.reset(self.id, Reason::INTERNAL_ERROR);
        if let Some(stream) = inner.streams.get_mut(&self.id) {
            stream.send_held = false;
        }
        inner.settle(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http2::frame::{flag, kind, Head};
    use crate::http2::hpack::{Encoder, Indexing};
    use bytes::{Bytes, BytesMut};
    use futures_util::future::poll_fn;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A server on an in-memory connection that hands each request to
    /// `answer` in a task of its own; an `h2` client on the other end.
    async fn serving<F, Fut>(
        config: Config,
        limits: ServerLimits,
        answer: F,
    ) -> h2::client::SendRequest<Bytes>
    where
        F: Fn(Request<RecvStream>, Respond) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (client, io) = tokio::io::duplex(256 * 1024);
        let (mut server, driver) = handshake(io, config, limits);
        tokio::spawn(driver);
        tokio::spawn(async move {
            while let Some((req, respond)) = poll_fn(|cx| server.poll_accept(cx)).await {
                tokio::spawn(answer(req, respond));
            }
        });
        let (send, conn) = h2::client::handshake(client)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        send
    }

    async fn read_all(body: &mut RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut all = Vec::new();
        while let Some(Ok(data)) = poll_fn(|cx| body.poll_data(cx)).await {
            all.extend_from_slice(&data);
        }
        let trailers = poll_fn(|cx| body.poll_trailers(cx)).await.ok().flatten();
        (all, trailers)
    }

    async fn read_h2(mut body: h2::RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut all = Vec::new();
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
            all.extend_from_slice(&data);
        }
        (all, body.trailers().await.ok().flatten())
    }

    /// Sends `data` on `stream` as its window allows, then ends it.
    async fn send_all(stream: &mut SendStream, data: Bytes, trailers: http::HeaderMap) {
        for chunk in data.chunks(16 * 1024) {
            let sent = stream.send_data(Bytes::copy_from_slice(chunk), false);
            assert!(sent.is_ok());
            let room = poll_fn(|cx| stream.poll_sent(cx)).await;
            assert!(room.is_ok());
        }
        assert!(stream.send_trailers(trailers).is_ok());
    }

    /// A request whose body is far past the windows, with trailers, and an
    /// answer as large with trailers, on one stream, arrive whole; the
    /// request's head arrives as sent.
    #[tokio::test]
    async fn bodies_past_the_windows_and_trailers_arrive_whole_both_ways() {
        let send = serving(
            Config::default(),
            ServerLimits::default(),
            |req, mut respond| async move {
                let (parts, mut body) = req.into_parts();
                let (got, trailers) = read_all(&mut body).await;
                let mut resp = Response::new(());
                let head = format!(
                    "{} {} {} {:?}",
                    parts.method,
                    parts.uri,
                    got.len(),
                    trailers.as_ref().and_then(|t| t.get("x-sum"))
                );
                resp.headers_mut()
                    .insert("x-saw", head.parse().unwrap_or_else(|e| panic!("{e}")));
                let mut stream = respond
                    .send_response(resp, false)
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                send_all(&mut stream, Bytes::from(vec![7u8; 3_000_000]), trailers).await;
            },
        )
        .await;
        let req = Request::post("http://svc.local/up?x=1")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let (response, mut upload) = send
            .send_request(req, false)
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let body = Bytes::from(vec![1u8; 300_000]);
            upload.reserve_capacity(body.len());
            let _ = upload.send_data(body, false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-sum", http::HeaderValue::from_static("300000"));
            let _ = upload.send_trailers(trailers);
            // Kept until the end: dropping it would not reset, but keep the
            // stream's sending side alive as a real client does.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let resp = tokio::time::timeout(Duration::from_secs(20), response).await;
        let resp = resp
            .unwrap_or_else(|_| panic!("no answer"))
            .unwrap_or_else(|e| panic!("{e}"));
        let saw = resp.headers().get("x-saw").cloned();
        assert_eq!(
            saw.as_ref().and_then(|v| v.to_str().ok()),
            Some(r#"POST http://svc.local/up?x=1 300000 Some("300000")"#)
        );
        let (body, trailers) = read_h2(resp.into_body()).await;
        assert_eq!(body.len(), 3_000_000);
        assert!(body.iter().all(|&b| b == 7));
        assert_eq!(
            trailers.and_then(|t| t.get("grpc-status").cloned()),
            Some(http::HeaderValue::from_static("0"))
        );
    }

    /// A raw client: the preface and empty settings written, the server's
    /// frames read back.
    struct Raw {
        io: DuplexStream,
        read: BytesMut,
        encoder: Encoder,
        /// The writes the server made.
        writes: Arc<AtomicUsize>,
    }

    /// The server's end of the connection, counting its writes.
    struct Counted {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl tokio::io::AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let written = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(1..)) = written {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            written
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Raw {
        async fn start(config: Config, limits: ServerLimits) -> (Raw, Server) {
            let (client, io) = tokio::io::duplex(256 * 1024);
            let writes = Arc::new(AtomicUsize::new(0));
            let io = Counted {
                io,
                writes: writes.clone(),
            };
            let (server, driver) = handshake(io, config, limits);
            tokio::spawn(driver);
            let mut raw = Raw {
                io: client,
                read: BytesMut::new(),
                encoder: Encoder::default(),
                writes,
            };
            let mut out = BytesMut::new();
            out.extend_from_slice(frame::PREFACE);
            Settings::default().write(&mut out);
            raw.write(&out).await;
            (raw, server)
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.io
                .write_all(bytes)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }

        /// A request head on stream `id` with these fields (pseudo ones
        /// included, as given).
        fn head(&mut self, id: u32, fields: &[(&str, &str)], end: bool, out: &mut BytesMut) {
            let mut block = BytesMut::new();
            self.encoder.begin(&mut block);
            for (name, value) in fields {
                self.encoder.field(
                    name.as_bytes(),
                    value.as_bytes(),
                    Indexing::Index,
                    &mut block,
                );
            }
            frame::write_headers(id, &block, end, frame::DEFAULT_MAX_FRAME, out);
        }

        /// Writes a request head on each of `ids` (fields as given).
        async fn send_heads(&mut self, ids: &[u32], fields: &[(&str, &str)], end: bool) {
            let mut out = BytesMut::new();
            for &id in ids {
                self.head(id, fields, end, &mut out);
            }
            self.write(&out).await;
        }

        /// The server's next `PING`'s data (frames before it are skipped).
        async fn ping(&mut self) -> [u8; 8] {
            let ping = self.until(kind::PING, 0).await;
            let data = ping.and_then(|(head, payload)| frame::ping(&head, &payload).ok());
            data.unwrap_or_else(|| panic!("no PING"))
        }

        /// Answers a `PING` with this data.
        async fn ack(&mut self, data: [u8; 8]) {
            let mut out = BytesMut::new();
            frame::write_ping(true, data, &mut out);
            self.write(&out).await;
        }

        /// Answers the server's next `PING`.
        async fn pong(&mut self) {
            let data = self.ping().await;
            self.ack(data).await;
        }

        /// Resets stream `id`.
        async fn reset(&mut self, id: u32, reason: Reason) {
            let mut out = BytesMut::new();
            frame::write_rst_stream(id, reason, &mut out);
            self.write(&out).await;
        }

        /// Whether the connection still answers a ping (frames before the
        /// answer are skipped): it took everything sent before.
        async fn still_up(&mut self) -> bool {
            let mut out = BytesMut::new();
            frame::write_ping(false, *b"still up", &mut out);
            self.write(&out).await;
            let pong = self.until(kind::PING, 0).await;
            let data = pong.and_then(|(head, payload)| frame::ping(&head, &payload).ok());
            data == Some(*b"still up")
        }

        /// DATA on stream 0: a connection error (§6.1).
        async fn break_connection(&mut self) {
            let mut out = BytesMut::new();
            frame::write_data_head(0, 1, false, &mut out);
            out.extend_from_slice(b"x");
            self.write(&out).await;
        }

        /// The server's next frame (within 10 s).
        async fn next(&mut self) -> Option<(Head, Bytes)> {
            loop {
                if let Ok(Some(frame)) = frame::next(&mut self.read, frame::MAX_FRAME_LIMIT) {
                    return Some(frame);
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.read));
                match read.await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
        }

        /// Whether the server closes the connection (after any frames)
        /// within 10 s.
        async fn closes(&mut self) -> bool {
            loop {
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.read));
                match read.await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => self.read.clear(),
                    Err(_) => return false,
                }
            }
        }

        /// The writes the server has made so far.
        fn writes(&self) -> usize {
            self.writes.load(Ordering::Relaxed)
        }

        /// The server's frames until one of `kind` (for `stream`): it.
        async fn until(&mut self, kind: u8, stream: u32) -> Option<(Head, Bytes)> {
            while let Some((head, payload)) = self.next().await {
                if head.kind == kind && head.stream == stream {
                    return Some((head, payload));
                }
            }
            None
        }
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "svc"),
        (":path", "/"),
    ];

    /// An answer made while another task that answers is queued goes out
    /// in one write with that one's, when other streams are open: the
    /// driver, woken by the first, polled before the second task, holds it
    /// until the tasks queued have run (as answers from several upstream
    /// connections' tasks come in one turn; data-path-28).
    #[tokio::test]
    async fn answers_of_tasks_queued_together_go_out_in_one_write() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1, 3, 5], &GET, true).await;
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(take(&mut server).await.1);
        }
        assert!(raw.still_up().await);
        let before = raw.writes();
        // Wakes the driver: queued first.
        assert!(answers[0].send_response(Response::new(()), true).is_ok());
        // Queued after the driver.
        let mut second = answers.remove(1);
        let second = tokio::spawn(async move { second.send_response(Response::new(()), true) });
        assert!(raw.until(kind::HEADERS, 1).await.is_some());
        assert!(raw.until(kind::HEADERS, 3).await.is_some());
        assert!(matches!(second.await, Ok(Ok(_))));
        assert_eq!(raw.writes() - before, 1);
    }

    /// A client's only open stream gets its answer written the first time
    /// the driver is polled, not after the tasks queued behind it (nothing
    /// could share the write: no latency added to a lone request).
    #[tokio::test]
    async fn a_lone_stream_s_answer_is_written_at_once() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let (_req, mut answer) = take(&mut server).await;
        assert!(raw.still_up().await);
        let before = raw.writes();
        // Wakes the driver: queued before the task that looks.
        assert!(answer.send_response(Response::new(()), true).is_ok());
        let writes = raw.writes.clone();
        let seen = tokio::spawn(async move { writes.load(Ordering::Relaxed) });
        assert_eq!(seen.await.ok(), Some(before + 1));
        assert!(raw.until(kind::HEADERS, 1).await.is_some());
    }

    /// A stream over the limit of streams at once is refused
    /// (`REFUSED_STREAM`: nothing processed); those within are taken.
    #[tokio::test]
    async fn a_stream_over_the_limit_is_refused() {
        let limits = ServerLimits {
            max_streams: 2,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        raw.send_heads(&[1, 3, 5], &GET, true).await;
        let refused = raw.until(kind::RST_STREAM, 5).await;
        let reason = refused.and_then(|(head, payload)| frame::rst_stream(&head, &payload).ok());
        assert_eq!(reason, Some(Reason::REFUSED_STREAM));
        let mut taken = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..2 {
            let accepted = tokio::time::timeout(
                Duration::from_secs(10),
                poll_fn(|cx| server.poll_accept(cx)),
            )
            .await;
            let (req, respond) = accepted
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("not taken"));
            taken.push(req.uri().path().to_owned());
            answers.push(respond);
        }
        assert_eq!(taken, ["/", "/"]);
        assert_eq!(server.active(), 2);
    }

    /// Streams opened and reset before they are taken, past the limit:
    /// the connection is closed (`GOAWAY` with `ENHANCE_YOUR_CALM`), as the
    /// 2023 rapid-reset floods call for.
    #[tokio::test]
    async fn a_rapid_reset_flood_closes_the_connection() {
        let (mut raw, _server) = Raw::start(Config::default(), ServerLimits::default()).await;
        let mut out = BytesMut::new();
        for i in 0..30 {
            let id = 1 + 2 * i;
            raw.head(id, &GET, false, &mut out);
            frame::write_rst_stream(id, Reason::CANCEL, &mut out);
        }
        raw.write(&out).await;
        let goaway = raw.until(kind::GOAWAY, 0).await;
        let reason = goaway.and_then(|(head, payload)| frame::goaway(&head, payload).ok());
        assert_eq!(reason.map(|g| g.reason), Some(Reason::ENHANCE_YOUR_CALM));
    }

    /// Empty `DATA` frames that end nothing, more in a row than the limit
    /// (10), close the connection (`ENHANCE_YOUR_CALM`: the 2019
    /// empty-frames flood); up to the limit between frames with data, or
    /// with one ending the stream, they are taken, and the body arrives
    /// whole.
    #[tokio::test]
    async fn empty_frames_in_a_row_close_the_connection() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &POST, false).await;
        let (mut req, _answer) = take(&mut server).await;
        let mut out = BytesMut::new();
        for chunk in [&b"ab"[..], b"cd"] {
            for _ in 0..10 {
                frame::write_data_head(1, 0, false, &mut out);
            }
            frame::write_data_head(1, chunk.len() as u32, false, &mut out);
            out.extend_from_slice(chunk);
        }
        for _ in 0..10 {
            frame::write_data_head(1, 0, false, &mut out);
        }
        frame::write_data_head(1, 0, true, &mut out);
        raw.write(&out).await;
        let (body, _) = read_all(req.body_mut()).await;
        assert_eq!(body, b"abcd");
        assert!(raw.still_up().await, "let go for ten empty frames in a row");

        raw.send_heads(&[3], &POST, false).await;
        let _taken = take(&mut server).await;
        let mut out = BytesMut::new();
        for _ in 0..11 {
            frame::write_data_head(3, 0, false, &mut out);
            // Frames of other kinds between them do not start the count
            // again.
            frame::write_ping(false, *b"in a row", &mut out);
        }
        raw.write(&out).await;
        assert_eq!(
            goaway(&mut raw).await,
            Some((3, Reason::ENHANCE_YOUR_CALM)),
            "eleven empty frames in a row"
        );
    }

    /// Empty chunks of a body (a streamed one's flushes) are not sent as
    /// empty `DATA` frames: the client gets the data, in one frame, and
    /// nothing a peer's empty-frames limit counts.
    #[tokio::test]
    async fn empty_chunks_send_no_empty_frames() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let (_req, mut respond) = take(&mut server).await;
        let mut body = respond
            .send_response(Response::new(()), false)
            .unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..3 {
            assert!(body.send_data(Bytes::new(), false).is_ok());
        }
        assert!(body.send_data(Bytes::from_static(b"ab"), true).is_ok());
        let data = raw.until(kind::DATA, 1).await;
        let (head, payload) = data.unwrap_or_else(|| panic!("no DATA"));
        assert_eq!(&payload[..], b"ab");
        assert!(head.has(flag::END_STREAM));
    }

    /// Resets of streams already taken (each a request started) count
    /// against the client's allowance, not only those still queued: past
    /// it, `GOAWAY(ENHANCE_YOUR_CALM)` (the paced "rapid reset").
    #[tokio::test]
    async fn resets_of_taken_streams_past_the_allowance_close_the_connection() {
        let limits = ServerLimits {
            reset_burst: 5,
            resets_per_sec: 0,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        let mut taken = Vec::new();
        for i in 0..6 {
            let id = 1 + 2 * i;
            raw.send_heads(&[id], &GET, false).await;
            taken.push(take(&mut server).await);
            raw.reset(id, Reason::CANCEL).await;
        }
        assert_eq!(
            goaway(&mut raw).await,
            Some((11, Reason::ENHANCE_YOUR_CALM)),
            "six resets over an allowance of five"
        );
    }

    /// Streams that end whole give back what resets took (the allowance
    /// grows with the client's traffic), and a reset of a stream whose
    /// answer is out takes nothing: a client that answers its calls and
    /// cancels some, or resets answered ones (`NO_ERROR`, as gRPC
    /// clients do), is not let go.
    #[tokio::test]
    async fn resets_within_the_traffic_are_allowed() {
        let limits = ServerLimits {
            reset_burst: 2,
            resets_per_sec: 0,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        let mut id = 1;
        let mut held = Vec::new();
        for _ in 0..6 {
            // One answered whole and let go: a reset given back.
            raw.send_heads(&[id], &GET, true).await;
            let (req, mut respond) = take(&mut server).await;
            drop(req);
            assert!(respond.send_response(Response::new(()), true).is_ok());
            drop(respond);
            assert!(raw.until(kind::HEADERS, id).await.is_some());
            // One cancelled while it is being answered.
            raw.send_heads(&[id + 2], &GET, true).await;
            held.push(take(&mut server).await);
            raw.reset(id + 2, Reason::CANCEL).await;
            // One answered, its handles held, reset `NO_ERROR`.
            raw.send_heads(&[id + 4], &GET, true).await;
            let (req, mut respond) = take(&mut server).await;
            let sent = respond.send_response(Response::new(()), true);
            assert!(raw.until(kind::HEADERS, id + 4).await.is_some());
            raw.reset(id + 4, Reason::NO_ERROR).await;
            held.push((req, respond));
            drop(sent);
            id += 6;
        }
        assert!(raw.still_up().await, "let go");
    }

    /// `HEADERS` on a stream this end refused, ignored, still counts
    /// against the client's resets: a client could send them without end,
    /// each a header block decoded for nothing.
    #[tokio::test]
    async fn headers_on_a_refused_stream_count_against_the_client() {
        let limits = ServerLimits {
            max_streams: 1,
            max_local_resets: 2,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        raw.send_heads(&[1], &GET, false).await;
        let _first = take(&mut server).await;
        // Over the limit: refused (one).
        raw.send_heads(&[3], &GET, true).await;
        assert!(raw.until(kind::RST_STREAM, 3).await.is_some());
        // Ignored: the first free (it may have crossed the refusal), the
        // next two counted, over the limit of two.
        raw.send_heads(&[3, 3, 3], &GET, true).await;
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::ENHANCE_YOUR_CALM)));
    }

    /// A small DATA payload is kept in a buffer of its own, not as a slice
    /// of the buffer the connection read it into (which a client could
    /// pin a read at a time with a byte of data each).
    #[tokio::test]
    async fn a_small_payload_does_not_hold_the_read_buffer() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &POST, false).await;
        let (req, _respond) = take(&mut server).await;
        let mut body = req.into_body();
        let mut out = BytesMut::new();
        frame::write_data_head(1, 1, false, &mut out);
        out.extend_from_slice(b"x");
        // An unknown frame type after it, in the same read.
        out.extend_from_slice(&[0, 0, 100, 0xfa, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&[0; 100]);
        raw.write(&out).await;
        let data = tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| body.poll_data(cx)));
        let Ok(Some(Ok(data))) = data.await else {
            panic!("no data");
        };
        assert_eq!(&data[..], b"x");
        assert!(data.try_into_mut().is_ok(), "a slice of a shared buffer");
    }

    /// A head of many fields leaves no room for them kept with the
    /// connection: the vector the blocks' fields are decoded into is let
    /// go past 64, not kept at its largest for the connection's life.
    #[tokio::test]
    async fn a_head_of_many_fields_leaves_no_room_held() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        let mut fields = POST.to_vec();
        fields.extend(std::iter::repeat_n(("x-many", "1"), 300));
        raw.send_heads(&[1], &fields, true).await;
        let (req, _respond) = take(&mut server).await;
        assert_eq!(req.headers().get_all("x-many").iter().count(), 300);
        let kept = server.shared.lock().fields.capacity();
        assert!(kept <= 64, "room for {kept} fields kept");
    }

    /// A client that changes its streams' initial window without end (each
    /// change walks the streams, and may send a frame on each waiting for
    /// window) is let go after 100 changes; the same value again is no
    /// change.
    #[tokio::test]
    async fn a_client_changing_its_window_without_end_is_let_go() {
        let (mut raw, _server) = Raw::start(Config::default(), ServerLimits::default()).await;
        let mut out = BytesMut::new();
        // The same value many times: no change, nothing said.
        for _ in 0..150 {
            Settings {
                initial_window_size: Some(65_535),
                ..Settings::default()
            }
            .write(&mut out);
        }
        raw.write(&out).await;
        // A ping's answer after them: the connection took them all.
        assert!(raw.still_up().await);
        let mut out = BytesMut::new();
        for i in 0..101 {
            Settings {
                initial_window_size: Some(70_000 + i),
                ..Settings::default()
            }
            .write(&mut out);
        }
        raw.write(&out).await;
        let reason = goaway(&mut raw).await.map(|(_, reason)| reason);
        assert_eq!(reason, Some(Reason::ENHANCE_YOUR_CALM));
    }

    /// A client's `GOAWAY` ends the taking (no more streams come) while the
    /// stream taken is still answered.
    #[tokio::test]
    async fn a_client_goaway_ends_the_taking_not_the_streams() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let (_req, mut respond) = take(&mut server).await;
        // Waiting for the next request, in a task of its own (woken, or
        // never done).
        let taking =
            tokio::spawn(async move { poll_fn(|cx| server.poll_accept(cx)).await.is_none() });
        tokio::task::yield_now().await;
        let mut out = BytesMut::new();
        frame::write_goaway(0, Reason::NO_ERROR, &mut out);
        raw.write(&out).await;
        let ended = tokio::time::timeout(Duration::from_secs(10), taking).await;
        assert!(matches!(ended, Ok(Ok(true))), "still taking: {ended:?}");
        assert!(respond.send_response(Response::new(()), true).is_ok());
        assert!(raw.until(kind::HEADERS, 1).await.is_some());
    }

    /// A malformed request (no `:path`; a connection-specific field) is
    /// reset alone (`PROTOCOL_ERROR`); the connection serves the next.
    #[tokio::test]
    async fn a_malformed_request_is_reset_alone() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        let mut out = BytesMut::new();
        raw.head(1, &GET[..3], true, &mut out);
        let mut with_connection = GET.to_vec();
        with_connection.push(("connection", "close"));
        raw.head(3, &with_connection, true, &mut out);
        raw.head(5, &GET, true, &mut out);
        raw.write(&out).await;
        for id in [1, 3] {
            let reset = raw.until(kind::RST_STREAM, id).await;
            let reason = reset.and_then(|(head, payload)| frame::rst_stream(&head, &payload).ok());
            assert_eq!(reason, Some(Reason::PROTOCOL_ERROR), "stream {id}");
        }
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| server.poll_accept(cx)),
        )
        .await;
        let (_req, mut respond) = accepted
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("not taken"));
        assert!(respond.send_response(Response::new(()), true).is_ok());
        let answer = raw.until(kind::HEADERS, 5).await;
        assert!(answer.is_some_and(|(head, _)| head.has(frame::flag::END_STREAM)));
    }

    /// A head over the header list limit gets `431`, as `h2` answers it.
    #[tokio::test]
    async fn a_head_over_the_limit_gets_431() {
        let config = Config {
            max_header_list: 1024,
            ..Config::default()
        };
        let send = serving(
            config,
            ServerLimits::default(),
            |_req, mut respond| async move {
                let _ = respond.send_response(Response::new(()), true);
            },
        )
        .await;
        let big = "x".repeat(2000);
        let req = Request::get("http://svc/")
            .header("x-big", big)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let (response, _) = send
            .send_request(req, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = tokio::time::timeout(Duration::from_secs(10), response).await;
        let status = resp.ok().and_then(Result::ok).map(|r| r.status().as_u16());
        assert_eq!(status, Some(431));
        // The connection still serves.
        let req = Request::get("http://svc/")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let (response, _) = send
            .send_request(req, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let status = response.await.ok().map(|r| r.status().as_u16());
        assert_eq!(status, Some(200));
    }

    /// A graceful shutdown lets the stream open finish, takes no new one,
    /// and closes the connection once it is over.
    #[tokio::test]
    async fn a_graceful_shutdown_finishes_the_open_streams() {
        let (client, io) = tokio::io::duplex(64 * 1024);
        let (mut server, driver) = handshake(io, Config::default(), ServerLimits::default());
        let driver = tokio::spawn(driver);
        let (send, conn) = h2::client::handshake(client)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let conn = tokio::spawn(conn);
        let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let req = Request::get("http://svc/first")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let (response, _) = send
            .send_request(req, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| server.poll_accept(cx)),
        )
        .await;
        let (_req, mut respond) = accepted
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("not taken"));
        server.graceful_shutdown();
        assert!(poll_fn(|cx| server.poll_accept(cx)).await.is_none());
        let mut stream = respond
            .send_response(Response::new(()), false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(stream.send_data(Bytes::from_static(b"last"), true).is_ok());
        let resp = response.await.unwrap_or_else(|e| panic!("{e}"));
        let (body, _) = read_h2(resp.into_body()).await;
        assert_eq!(body, b"last");
        drop(stream);
        let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "the connection did not close: {ended:?}"
        );
        let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(closed.is_ok(), "the client saw no close");
    }

    /// A graceful shutdown says `GOAWAY` with the highest stream ID and
    /// pings; a request the client sends before the pong is taken and
    /// answered; the last `GOAWAY`, after the pong, names it, and a later
    /// stream is refused.
    #[tokio::test]
    async fn a_graceful_shutdown_serves_what_came_before_the_client_knew() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let first = take(&mut server).await;
        server.graceful_shutdown();
        assert_eq!(
            goaway(&mut raw).await,
            Some((frame::MAX_STREAM_ID, Reason::NO_ERROR))
        );
        let ping = raw.ping().await;
        // On its way before the client saw the `GOAWAY`.
        raw.send_heads(&[3], &GET, true).await;
        let (req, mut respond) = take(&mut server).await;
        assert_eq!(req.uri().path(), "/");
        let answer = respond.send_response(Response::new(()), true);
        assert!(answer.is_ok());
        assert!(raw.until(kind::HEADERS, 3).await.is_some());
        raw.ack(ping).await;
        assert_eq!(goaway(&mut raw).await, Some((3, Reason::NO_ERROR)));
        let taken = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| server.poll_accept(cx)),
        );
        assert!(matches!(taken.await, Ok(None)), "still taking streams");
        raw.send_heads(&[5], &GET, true).await;
        let refused = raw.until(kind::RST_STREAM, 5).await;
        let reason = refused.and_then(|(head, payload)| frame::rst_stream(&head, &payload).ok());
        assert_eq!(reason, Some(Reason::REFUSED_STREAM));
        drop((first, req, answer));
        assert!(raw.closes().await, "open after its last stream");
    }

    /// Answers larger than the client's stream windows, sent as its window
    /// updates come on a connection window that never runs out: no stream
    /// is left in the line for window once it is over (a long-lived
    /// connection grew the line by a stream each).
    #[tokio::test]
    async fn streams_over_leave_the_line_for_window() {
        let (client, io) = tokio::io::duplex(256 * 1024);
        let (mut server, driver) = handshake(io, Config::default(), ServerLimits::default());
        tokio::spawn(driver);
        let control = server.control();
        tokio::spawn(async move {
            while let Some((_req, mut respond)) = poll_fn(|cx| server.poll_accept(cx)).await {
                tokio::spawn(async move {
                    let Ok(mut stream) = respond.send_response(Response::new(()), false) else {
                        return;
                    };
                    send_all(
                        &mut stream,
                        Bytes::from(vec![3u8; 40_000]),
                        http::HeaderMap::new(),
                    )
                    .await;
                });
            }
        });
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake::<_, Bytes>(client)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        // Streams seen waiting in the line (else this tests nothing).
        let mut waited = 0;
        for _ in 0..20 {
            let mut send = send.clone().ready().await.unwrap_or_else(|e| panic!("{e}"));
            let req = Request::get("http://svc/")
                .body(())
                .unwrap_or_else(|e| panic!("{e}"));
            let (response, _) = send
                .send_request(req, true)
                .unwrap_or_else(|e| panic!("{e}"));
            let resp = tokio::time::timeout(Duration::from_secs(10), response).await;
            let resp = resp
                .ok()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("no answer"));
            waited = waited.max(control.shared.lock().blocked.len());
            let (body, _) = read_h2(resp.into_body()).await;
            assert_eq!(body.len(), 40_000);
        }
        assert!(waited > 0, "no answer waited for window");
        // The last stream's end may still be settling.
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = control.shared.lock().blocked.len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left, 0, "streams over still in the line");
    }

    /// An answer sent whole before the request's body ended (its body let
    /// go) goes out whole; the rest of the upload is stopped with
    /// `RST_STREAM(NO_ERROR)` (RFC 9113 §8.1), not cut with an error.
    #[tokio::test]
    async fn an_early_answer_stops_the_upload_with_no_error() {
        let send = serving(
            Config::default(),
            ServerLimits::default(),
            |req, mut respond| async move {
                drop(req);
                let resp = Response::new(());
                if let Ok(mut stream) = respond.send_response(resp, false) {
                    let _ = stream.send_data(Bytes::from_static(b"early"), true);
                }
            },
        )
        .await;
        let req = Request::post("http://svc/")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let (response, mut upload) = send
            .send_request(req, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = upload.send_data(Bytes::from_static(b"never ends"), false);
        let resp = tokio::time::timeout(Duration::from_secs(10), response).await;
        let resp = resp
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("no answer"));
        let (body, _) = read_h2(resp.into_body()).await;
        assert_eq!(body, b"early");
        let reset =
            tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| upload.poll_reset(cx)))
                .await;
        assert_eq!(reset.ok().and_then(Result::ok), Some(h2::Reason::NO_ERROR));
    }

    /// Takes the next request, within 10 s.
    async fn take(server: &mut Server) -> (Request<RecvStream>, Respond) {
        let accepted = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| server.poll_accept(cx)),
        );
        accepted
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("not taken"))
    }

    /// A `GOAWAY`'s last stream and reason, the next to come.
    async fn goaway(raw: &mut Raw) -> Option<(u32, Reason)> {
        let (head, payload) = raw.until(kind::GOAWAY, 0).await?;
        frame::goaway(&head, payload)
            .ok()
            .map(|g| (g.last_stream, g.reason))
    }

    const POST: [(&str, &str); 4] = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "svc"),
        (":path", "/up"),
    ];

    /// A request's body let go while its answer goes on: what the client
    /// still sends gives back the connection's window, never the
    /// stream's (a client could upload without end).
    #[tokio::test]
    async fn a_body_let_go_gets_no_more_stream_window() {
        let config = Config {
            stream_window: 65_535,
            ..Config::default()
        };
        let (mut raw, mut server) = Raw::start(config, ServerLimits::default()).await;
        raw.send_heads(&[1], &POST, false).await;
        let (req, mut respond) = take(&mut server).await;
        drop(req);
        let _answer = respond.send_response(Response::new(()), false);
        let mut out = BytesMut::new();
        for _ in 0..4 {
            frame::write_data_head(1, 16_000, false, &mut out);
            out.extend_from_slice(&[0u8; 16_000]);
        }
        frame::write_ping(false, *b"afterall", &mut out);
        raw.write(&out).await;
        let mut stream_updates = 0;
        while let Some((head, _)) = raw.next().await {
            if head.kind == kind::WINDOW_UPDATE && head.stream == 1 {
                stream_updates += 1;
            }
            if head.kind == kind::PING {
                break;
            }
        }
        assert_eq!(stream_updates, 0, "the stream's window was given back");
    }

    /// The server dropped with a stream open: the client is told which
    /// streams were taken (`GOAWAY` naming the last), a new one is
    /// refused, and the connection closes once the open one is answered.
    #[tokio::test]
    async fn a_server_dropped_says_goaway_and_refuses_new_streams() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let (req, mut respond) = take(&mut server).await;
        drop(req);
        drop(server);
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::NO_ERROR)));
        raw.send_heads(&[3], &GET, true).await;
        let refused = raw.until(kind::RST_STREAM, 3).await;
        let reason = refused.and_then(|(head, payload)| frame::rst_stream(&head, &payload).ok());
        assert_eq!(reason, Some(Reason::REFUSED_STREAM));
        assert!(respond.send_response(Response::new(()), true).is_ok());
        assert!(raw.until(kind::HEADERS, 1).await.is_some());
        // Then the close: the end of the stream, well within 10 s.
        assert!(raw.closes().await, "the connection stayed open");
    }

    /// A connection error names the last stream taken in its `GOAWAY`
    /// (0 would tell the client that nothing was processed).
    #[tokio::test]
    async fn a_connection_error_names_the_last_stream_taken() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        raw.send_heads(&[1], &GET, true).await;
        let _taken = take(&mut server).await;
        raw.break_connection().await;
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::PROTOCOL_ERROR)));
    }

    /// Streams refused over the limit count against the streams reset for
    /// the client's doing: past that, the connection is closed.
    #[tokio::test]
    async fn refusals_without_end_close_the_connection() {
        let limits = ServerLimits {
            max_streams: 1,
            max_local_resets: 2,
            ..ServerLimits::default()
        };
        let (mut raw, _server) = Raw::start(Config::default(), limits).await;
        raw.send_heads(&[1, 3, 5, 7], &GET, true).await;
        let closed = goaway(&mut raw).await;
        assert_eq!(closed.map(|(_, r)| r), Some(Reason::ENHANCE_YOUR_CALM));
    }

    /// A request with no `:authority` (made from an HTTP/1.1 one, its host
    /// in `host`) is taken, its target the path alone, as `h2` takes it.
    #[tokio::test]
    async fn a_request_without_authority_is_taken() {
        let (mut raw, mut server) = Raw::start(Config::default(), ServerLimits::default()).await;
        let mut out = BytesMut::new();
        let fields = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/p?q=1"),
            ("host", "svc.local"),
        ];
        raw.head(1, &fields, true, &mut out);
        raw.write(&out).await;
        let (req, _respond) = take(&mut server).await;
        assert_eq!(req.uri(), "/p?q=1");
        assert_eq!(
            req.headers().get("host").map(|h| h.as_bytes()),
            Some(&b"svc.local"[..])
        );
    }

    /// The preface must be followed by `SETTINGS` (§3.4); a stream error on
    /// a stream never opened is a connection error (no reset of an idle
    /// stream, §6.4).
    #[tokio::test]
    async fn a_client_that_breaks_the_opening_or_resets_idle_streams_is_let_go() {
        for case in ["no settings", "settings ack", "idle stream"] {
            let (client, io) = tokio::io::duplex(64 * 1024);
            let (_server, driver) = handshake(io, Config::default(), ServerLimits::default());
            tokio::spawn(driver);
            let mut raw = Raw {
                io: client,
                read: BytesMut::new(),
                encoder: Encoder::default(),
                writes: Arc::default(),
            };
            let mut out = BytesMut::new();
            out.extend_from_slice(frame::PREFACE);
            match case {
                "idle stream" => Settings::default().write(&mut out),
                "settings ack" => frame::write_settings_ack(&mut out),
                _ => {}
            }
            match case {
                // A window update of 0 on stream 99: a stream error, on a
                // stream never opened.
                "idle stream" => frame::write_window_update(99, 0, &mut out),
                // A frame that would be answered, were the opening right.
                _ => frame::write_ping(false, *b"answer?!", &mut out),
            }
            raw.write(&out).await;
            let closed = goaway(&mut raw).await;
            assert_eq!(closed, Some((0, Reason::PROTOCOL_ERROR)), "{case}");
        }
    }

    /// A `GOAWAY` after the first never names a higher stream (RFC 9113
    /// §6.8), whatever was refused between; refusals after it do not count
    /// against the client.
    #[tokio::test]
    async fn a_later_goaway_never_names_a_higher_stream() {
        let limits = ServerLimits {
            max_local_resets: 1,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        raw.send_heads(&[1], &GET, true).await;
        let (req, mut respond) = take(&mut server).await;
        drop(req);
        server.graceful_shutdown();
        assert_eq!(
            goaway(&mut raw).await,
            Some((frame::MAX_STREAM_ID, Reason::NO_ERROR))
        );
        raw.pong().await;
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::NO_ERROR)));
        raw.send_heads(&[3, 5, 7], &GET, true).await;
        let refused = raw.until(kind::RST_STREAM, 7).await;
        let reason = refused.and_then(|(head, payload)| frame::rst_stream(&head, &payload).ok());
        assert_eq!(reason, Some(Reason::REFUSED_STREAM));
        // Three refusals over a limit of one: not the client's doing.
        let answer = respond.send_response(Response::new(()), false);
        assert!(answer.is_ok());
        assert!(raw.until(kind::HEADERS, 1).await.is_some());
        raw.break_connection().await;
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::PROTOCOL_ERROR)));
    }

    /// `HEADERS` on a stream this end refused is ignored (it may have been
    /// on its way); on a lower stream never used, it is a connection error
    /// (§5.1.1).
    #[tokio::test]
    async fn headers_on_a_closed_stream_are_ignored_only_if_this_end_closed_it() {
        let limits = ServerLimits {
            max_streams: 1,
            ..ServerLimits::default()
        };
        let (mut raw, mut server) = Raw::start(Config::default(), limits).await;
        raw.send_heads(&[1, 5], &GET, true).await;
        let _taken = take(&mut server).await;
        assert!(raw.until(kind::RST_STREAM, 5).await.is_some());
        // Trailers on the refused stream 5: ignored; a ping still answered.
        let mut out = BytesMut::new();
        raw.head(5, &[("x-t", "1")], true, &mut out);
        frame::write_ping(false, *b"stillok!", &mut out);
        raw.write(&out).await;
        let pong = raw.until(kind::PING, 0).await;
        assert!(pong.is_some_and(|(head, _)| head.has(frame::flag::ACK)));
        // Stream 3, skipped: closed, never used.
        raw.send_heads(&[3], &GET, true).await;
        assert_eq!(goaway(&mut raw).await, Some((1, Reason::PROTOCOL_ERROR)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]
        /// Any frames a client sends (any kind, flags, stream and payload)
        /// among well-formed requests, then its close: no panic, every
        /// request taken gets its answer or an error, and the connection
        /// ends (within 10 s: never a hang).
        #[test]
        fn any_frames_from_a_client_end_in_answers_or_errors(
            frames in frame::any_frames(),
            requests in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..4),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            let ended = runtime.block_on(async move {
                let (client, io) = tokio::io::duplex(64 * 1024);
                let (mut server, driver) = handshake(io, Config::default(), ServerLimits::default());
                let driver = tokio::spawn(driver);
                tokio::spawn(async move {
                    let mut out = BytesMut::new();
                    out.extend_from_slice(frame::PREFACE);
                    Settings::default().write(&mut out);
                    let mut encoder = Encoder::default();
                    let mut id = 1;
                    for (i, any) in frames.into_iter().enumerate() {
                        if let Some(&end) = requests.get(i) {
                            let mut block = BytesMut::new();
                            encoder.begin(&mut block);
                            for (name, value) in GET {
                                encoder.field(name.as_bytes(), value.as_bytes(), Indexing::Index, &mut block);
                            }
                            frame::write_headers(id, &block, end, frame::DEFAULT_MAX_FRAME, &mut out);
                            id += 2;
                        }
                        frame::put_any(&mut out, any);
                    }
                    frame::write_then_close(client, out).await;
                });
                let serving = async move {
                    while let Some((req, mut respond)) = poll_fn(|cx| server.poll_accept(cx)).await {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let _ = read_all(&mut body).await;
                            if let Ok(mut stream) = respond.send_response(Response::new(()), false) {
                                let _ = stream.send_data(Bytes::from_static(b"ok"), true);
                            }
                        });
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), async move {
                    serving.await;
                    let _ = driver.await;
                })
                .await
                .is_ok()
            });
            proptest::prop_assert!(ended, "the connection did not end");
        }
    }
}
