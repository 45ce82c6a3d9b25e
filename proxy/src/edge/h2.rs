//! H2: the HTTP/2 server, on the `h2` crate. Every stream's request is
//! served in the connection's own task (hyper's server spawned a task per
//! stream and crossed into it and back for each answer); the connection
//! pings its client, and closes gracefully when idle or when the proxy
//! stops.

use crate::body::ClientBody;
use crate::edge::h1::with_date;
use crate::edge::serve::Answer;
use crate::edge::stop;
use crate::headers;
use crate::http2::frame::Reason;
use crate::outcome::ErrorKind;
use crate::pipeline::forward::Reply;
use crate::upstream::h2::{pipe, Closed, RecvBody, RecvHalf, SendHalf};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use std::convert::Infallible;
use std::future::{pending, poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

/// The windows hyper's server gave a stream and a connection (1 MiB each):
/// the same flow control as before.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
/// Bytes queued for sending on the connection, in all (hyper's server's).
const MAX_SEND_BUF: usize = 400 * 1024;
/// Streams a client may have open at once.
const MAX_STREAMS: u32 = 1024;
/// Streams reset for a protocol error of the client's before the
/// connection is closed (hyper's server's limit).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What an HTTP/2 connection needs of `limits`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `limits.max_header_bytes`: the largest request head taken.
    pub max_header_list: u32,
    /// `limits.keep_alive_interval`: a PING this often.
    pub keep_alive_interval: Duration,
    /// `limits.keep_alive_timeout`: a PING unanswered for this long closes
    /// the connection.
    pub keep_alive_timeout: Duration,
    /// `limits.idle_timeout`: a connection with no stream open for this
    /// long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// `limits.header_timeout`: the client's preface must have come within
    /// this (after TLS, nothing else bounds a silent client).
    pub preface_timeout: Duration,
    /// `limits.body_idle`: a stream whose client gives no room for a byte
    /// of its answer for this long is reset (it holds the request's
    /// places, and its upstream stream, while it waits).
    pub body_idle: Duration,
}

/// Serves the HTTP/2 connection `io` with `handle` until it ends: the
/// client closes it or goes silent, it is idle for `idle_timeout`, or
/// `stop` changes (GOAWAY: the streams open finish, no new one starts).
pub async fn serve<IO, F, Fut>(
    io: IO,
    limits: Limits,
    stop: watch::Receiver<bool>,
    handle: F,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Reply, Infallible>>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_header_list_size(limits.max_header_list)
        .max_concurrent_streams(MAX_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUF)
        .handshake::<_, Bytes>(io);
    // A client that sends no preface is dropped, as one that sends no
    // head is on HTTP/1.1 (it holds a `max_connections` place).
    let conn = match tokio::time::timeout(limits.preface_timeout, handshake).await {
        Ok(conn) => conn?,
        Err(_) => {
            tracing::debug!(timeout = ?limits.preface_timeout, "downstream h2 preface not sent in time: closing");
            return Ok(());
        }
    };
    // Boxed once the handshake is done: an idle connection keeps only
    // what serving needs (the handshake's state is as large), and a
    // connection's task is not sized for HTTP/2.
    Box::pin(run(conn, limits, stop, handle)).await
}

/// Serves a connection whose handshake is done (see [`serve`]). Not an
/// `async fn`: it would keep the connection twice, as an argument and as a
/// local.
#[allow(clippy::manual_async_fn)]
fn run<IO, F, Fut>(
    mut conn: h2::server::Connection<IO, Bytes>,
    limits: Limits,
    stop: watch::Receiver<bool>,
    mut handle: F,
) -> impl Future<Output = Result<(), h2::Error>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Reply, Infallible>>,
{
    async move {
        // Resolves when a PING goes unanswered.
        let mut pinger = conn.ping_pong();
        let mut silent = pin!(async {
            match pinger.as_mut() {
                Some(pinger) => {
                    let (every, wait) = (limits.keep_alive_interval, limits.keep_alive_timeout);
                    while keep_alive(pinger, every, wait).await {}
                }
                None => pending().await,
            }
        });
        let mut idle = pin!(tokio::time::sleep(limits.idle_timeout));
        let mut streams = FuturesUnordered::new();
        let mut closing = false;
        let mut stopping = pin!(stop::stopping(stop));
        loop {
            tokio::select! {
                // The streams first: an answer queues frames that the
                // connection's next poll (below) writes.
                biased;
                Some(()) = streams.next(), if !streams.is_empty() => {
                    if streams.is_empty() {
                        let wait = if closing { limits.body_idle } else { limits.idle_timeout };
                        idle.as_mut().reset(Instant::now() + wait);
                    }
                }
                accepted = conn.accept() => match accepted {
                    Some(Ok((mut req, mut respond))) => {
                        let bodiless = req.method() == http::Method::HEAD;
                        continue_if_expected(&mut req, &mut respond);
                        let req = RecvBody::request(req).map(ClientBody::H2);
                        // Boxed where it is made: the stream's own future,
                        // small, is what moves into the set.
                        let served = crate::boxed(|| handle(req));
                        streams.push(answer(served, respond, bodiless, limits.body_idle));
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                () = &mut stopping, if !closing => {
                    closing = true;
                    conn.graceful_shutdown();
                    idle.as_mut().reset(Instant::now() + limits.body_idle);
                }
                // Idle: GOAWAY. Closing, with every answer queued: what
                // `h2` still holds is the last frames past a client's
                // window, and a client that answers pings but gives no
                // room for them for `body_idle` is let go (it would hold
                // its connection forever).
                () = &mut idle, if streams.is_empty() => {
                    if closing {
                        tracing::debug!(timeout = ?limits.body_idle, "downstream h2 answers not taken after GOAWAY: closing");
                        return Ok(());
                    }
                    tracing::debug!(idle = ?limits.idle_timeout, "downstream h2 connection idle: closing");
                    closing = true;
                    conn.graceful_shutdown();
                    idle.as_mut().reset(Instant::now() + limits.body_idle);
                }
                () = &mut silent => {
                    tracing::debug!(timeout = ?limits.keep_alive_timeout, "downstream h2 ping unanswered: closing");
                    return Ok(());
                }
            }
        }
    }
}

/// Answers one stream: awaits `served` (dropped, and so cancelled, if the
/// client resets the stream first), then sends its head and streams its
/// body as the client's window allows (reset when it gives no room for
/// `send_limit`); `bodiless`: the answer to a HEAD, whose head ends the
/// stream.
async fn answer<Fut>(
    served: Fut,
    respond: SendResponse<Bytes>,
    bodiless: bool,
    send_limit: Duration,
) where
    Fut: Future<Output = Result<Reply, Infallible>> + Unpin,
{
    // Two awaits in turn: the head's state is gone before the body's.
    let Some((stream, body)) = head(served, respond, bodiless).await else {
        return;
    };
    // An answer broken off (the upstream reset, or went silent) is an
    // error of the server's, not a cancel: gRPC reads `INTERNAL`.
    if let Err(kind) = pipe(
        body,
        stream,
        (|_| ErrorKind::Reset, Reason::INTERNAL_ERROR),
        Some(send_limit),
    )
    .await
    {
        tracing::debug!(?kind, "downstream h2 body ended early");
    }
}

/// Awaits `served` unless the client resets the stream first, and sends
/// its head; returns the body still to send, if any.
async fn head<Fut>(
    mut served: Fut,
    mut respond: SendResponse<Bytes>,
    bodiless: bool,
) -> Option<(SendStream<Bytes>, Answer)>
where
    Fut: Future<Output = Result<Reply, Infallible>> + Unpin,
{
    let resp = poll_fn(|cx| {
        if let Poll::Ready(Ok(resp)) = Pin::new(&mut served).poll(cx) {
            return Poll::Ready(Some(resp));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(resp) = resp else {
        tracing::debug!("downstream h2 stream reset before its answer");
        return None;
    };
    send_head(resp, &mut respond, bodiless)
}

/// Sends `resp`'s head on the stream, with what hyper's server added or
/// removed: no connection-specific fields (RFC 9113 §8.2.2), a `date`,
/// the length of a body known whole. Returns the body still to send, if
/// any: none for a HEAD (`bodiless`), a 204 or a 304 (RFC 9110 §6.4.1),
/// whatever the answer holds (the proxy's own answers carry text).
fn send_head(
    resp: Reply,
    respond: &mut SendResponse<Bytes>,
    bodiless: bool,
) -> Option<(SendStream<Bytes>, Answer)> {
    let (mut parts, body) = (*resp).into_parts();
    headers::for_h2(&mut parts.headers);
    // One pass over the names (a standard name compares as a number), not
    // two hashed lookups.
    let (mut date, mut length) = (false, false);
    for name in parts.headers.keys() {
        date |= name == header::DATE;
        length |= name == header::CONTENT_LENGTH;
    }
    if !date {
        if let Ok(date) = with_date(HeaderValue::from_str) {
            parts.headers.insert(header::DATE, date);
        }
    }
    let status = parts.status;
    let bodiless = bodiless
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    let end = bodiless || body.is_end_stream();
    if !body.is_end_stream() && !length && status != http::StatusCode::NO_CONTENT {
        if let Some(len) = body.size_hint().exact() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) => (!end).then_some((stream, body)),
        Err(e) => {
            tracing::debug!(error = %e, "downstream h2 answer not sent");
            None
        }
    }
}

/// `Expect: 100-continue` on a stream with a body still to come: the
/// proxy wants that body (it reads it to send it on), so it says so with a
/// `100 Continue` at once, as hyper's HTTP/1.1 server and nginx do, and the
/// expectation, met, goes no further (Envoy's default too). A client that
/// waits for the 100 would otherwise wait for its own timeout, or for good.
fn continue_if_expected(
    req: &mut Request<h2::RecvStream>,
    respond: &mut h2::server::SendResponse<Bytes>,
) {
    let expects = (req.headers().get(http::header::EXPECT))
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects {
        return;
    }
    req.headers_mut().remove(http::header::EXPECT);
    if !req.body().is_end_stream() {
        let mut next = http::Response::new(());
        *next.status_mut() = http::StatusCode::CONTINUE;
        let _ = respond.send_informational(next);
    }
}

/// Waits `interval`, pings, and says whether the pong came within
/// `timeout`.
async fn keep_alive(pinger: &mut PingPong, interval: Duration, timeout: Duration) -> bool {
    tokio::time::sleep(interval).await;
    let pong = pinger.ping(Ping::opaque());
    matches!(tokio::time::timeout(timeout, pong).await, Ok(Ok(_)))
}

/// An answer going down: `h2`'s stream as `pipe` drives it.
impl SendHalf for SendStream<Bytes> {
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        // Room for at least a byte.
        self.reserve_capacity(1);
        while self.capacity() == 0 {
            match self.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Err(Closed)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        SendStream::poll_reset(self, cx).map(drop)
    }

    fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), Closed> {
        SendStream::send_data(self, data, end).map_err(|_| Closed)
    }

    fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), Closed> {
        SendStream::send_trailers(self, trailers).map_err(|_| Closed)
    }

    fn send_reset(&mut self, reason: Reason) {
        SendStream::send_reset(self, h2::Reason::from(reason.0));
    }
}

/// A client's request body: `h2`'s stream as [`RecvBody`] reads it, its
/// window given back as the data is taken.
impl RecvHalf for RecvStream {
    type Error = h2::Error;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
        let polled = RecvStream::poll_data(self, cx);
        if let Poll::Ready(Some(Ok(data))) = &polled {
            let _ = self.flow_control().release_capacity(data.len());
        }
        polled
    }

    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h2::Error>> {
        RecvStream::poll_trailers(self, cx)
    }

    fn is_end_stream(&self) -> bool {
        RecvStream::is_end_stream(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that sends the preface and its settings, acknowledges the
    /// server's, then reads everything and answers nothing (no pong).
    async fn mute_client(mut io: tokio::io::DuplexStream) {
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (type 4), empty; then SETTINGS with ACK (flag 1).
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0]);
        if io.write_all(&hello).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    }

    fn limits() -> Limits {
        Limits {
            max_header_list: 16 * 1024,
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            preface_timeout: Duration::from_secs(10),
            body_idle: Duration::from_secs(60),
        }
    }

    /// A client that stops answering is dropped: no pong within
    /// `keep_alive_timeout` of a ping closes the connection, though it is
    /// far from idle long enough to be closed for that.
    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_pings_go_unanswered_is_closed() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(mute_client(client));
        let (_stop_tx, stop) = watch::channel(false);
        let handle = |_: Request<ClientBody>| async {
            Ok::<_, Infallible>(Box::new(Response::new(Answer::full("never asked"))))
        };
        let served = tokio::spawn(serve(server, limits(), stop, handle));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!served.is_finished(), "closed before the pong was due");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(served.is_finished(), "still open with its ping unanswered");
    }

    /// A client that opens the connection (after TLS, say) and sends no
    /// preface is dropped after `header_timeout`, not held forever.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_preface_is_dropped() {
        let (_client, server) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop) = watch::channel(false);
        let handle = |_: Request<ClientBody>| async {
            Ok::<_, Infallible>(Box::new(Response::new(Answer::full("never asked"))))
        };
        let served = tokio::spawn(serve(server, limits(), stop, handle));
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!served.is_finished(), "dropped before its time");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(served.is_finished(), "still held with no preface");
    }

    /// A HEAD is answered with a head that ends the stream, even when the
    /// answer holds a body (the proxy's own answers carry text): DATA on
    /// a HEAD is a protocol error to the client.
    #[tokio::test]
    async fn a_head_is_answered_without_data() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop) = watch::channel(false);
        let handle = |_: Request<ClientBody>| async {
            Ok::<_, Infallible>(Box::new(Response::new(Answer::full("no such service"))))
        };
        tokio::spawn(serve(server, limits(), stop, handle));
        let (send, conn) = h2::client::handshake(client).await.expect("handshake");
        tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let req = Request::head("http://web/").body(()).expect("request");
        let (answer, _) = send.send_request(req, true).expect("sent");
        let resp = answer.await.expect("answered");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            "15",
            "a GET's length"
        );
        let mut body = resp.into_body();
        let data = body.data().await;
        assert!(data.is_none(), "{data:?}");
    }

    /// Told to stop, an idle connection says GOAWAY and ends.
    #[tokio::test]
    async fn a_connection_ends_when_the_proxy_stops() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop_tx, stop) = watch::channel(false);
        let handle = |_: Request<ClientBody>| async {
            Ok::<_, Infallible>(Box::new(Response::new(Answer::full("hello"))))
        };
        let served = tokio::spawn(serve(server, limits(), stop, handle));
        let (send, conn) = h2::client::handshake(client).await.expect("handshake");
        let conn = tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let req = Request::get("http://web/").body(()).expect("request");
        let (answer, _) = send.send_request(req, true).expect("sent");
        let resp = answer.await.expect("answered");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key(header::DATE));
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
        let mut body = resp.into_body();
        let data = body.data().await.expect("a frame").expect("data");
        assert_eq!(&data[..], b"hello");
        stop_tx.send(true).expect("stop");
        // Ended (the client may close its side first: a broken pipe).
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(matches!(ended, Ok(Ok(_))), "{ended:?}");
        let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(closed.is_ok(), "the client's connection ended too");
        assert!(send.ready().await.is_err(), "no new stream after GOAWAY");
    }
}
