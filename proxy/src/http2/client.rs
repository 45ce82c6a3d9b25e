//! An HTTP/2 client connection on almond's codec (`conn.rs`): requests
//! written into the connection's buffer from the request's own task,
//! streams opened within the server's limit (a place held for a request
//! readied), `GOAWAY` telling apart the streams never processed.
//! `upstream/h2.rs` runs on it.

use super::conn::{indexing, park, ping, refused, start, Shared};
pub use super::conn::{Config, Control, Driver, Error, Pong, RecvStream, SendStream};
use super::frame::{self, Reason, Settings};
use super::hpack::Indexing;
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

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
        open(&self.shared, req, end, false, &[])
    }

    /// As [`Client::send_request`], with `extra` fields after the head's
    /// (never indexed: see [`Encoder::never`](super::hpack::Encoder::never)).
    pub fn send_request_with(
        &self,
        req: &Request<()>,
        end: bool,
        extra: &[(&[u8], &[u8])],
    ) -> Result<(ResponseFuture, SendStream), Error> {
        open(&self.shared, req, end, false, extra)
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
        self,
        req: &Request<()>,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream), Error> {
        self.send_request_with(req, end, &[])
    }

    /// As [`Client::send_request_with`], in the place held.
    pub fn send_request_with(
        mut self,
        req: &Request<()>,
        end: bool,
        extra: &[(&[u8], &[u8])],
    ) -> Result<(ResponseFuture, SendStream), Error> {
        match self.shared.take() {
            Some(shared) => open(&shared, req, end, true, extra),
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

/// Opens a stream (see [`Client::send_request_with`]); `reserved`: in a
/// place a [`Reservation`] held, given up whatever happens.
fn open(
    shared: &Arc<Shared>,
    req: &Request<()>,
    end: bool,
    reserved: bool,
    extra: &[(&[u8], &[u8])],
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
        // A place held still goes over a limit the peer lowered since.
        let held = if reserved { 0 } else { inner.reserved };
        if inner.active + held >= inner.max_streams || inner.next_id > frame::MAX_WINDOW {
            if reserved {
                // The place given back, unused: another may take it.
                inner.wake_room();
            }
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
        for (name, value) in extra {
            enc.never(name, value, block);
        }
        frame::finish_headers(&mut inner.out, start, id, end, inner.max_frame);
        inner.add_stream(id, |stream| {
            stream.send_done = end;
            stream.no_content = req.method() == http::Method::HEAD;
        });
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
                length: stream.declared,
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

/// Starts a connection over `io`: the client, and the driver to run in a
/// task of its own (it ends with the connection).
pub fn handshake<T>(io: T, config: Config) -> (Client, Driver<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let settings = Settings {
        enable_push: Some(false),
        ..Settings::default()
    };
    let (shared, driver) = start(io, config, settings, None);
    (Client { shared }, driver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http2::frame::kind;
    use crate::http2::hpack::Encoder;
    use bytes::{Buf, Bytes, BytesMut};
    use futures_util::future::poll_fn;
    use http::{HeaderMap, HeaderValue, StatusCode};
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
            frames in frame::any_frames(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async move {
                let (io, server) = tokio::io::duplex(64 * 1024);
                let mut out = BytesMut::new();
                Settings::default().write(&mut out);
                for any in frames {
                    frame::put_any(&mut out, any);
                }
                tokio::spawn(frame::write_then_close(server, out));
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
