//! H2: the HTTP/2 server, on almond's codec (`http2/server.rs`). Every
//! stream's request is served in the connection's own task, beside the
//! connection's driver (one task reads, writes and answers); the
//! connection pings its client, and closes gracefully when idle or when
//! the proxy stops.

use crate::body::ClientBody;
use crate::edge::h1::with_date;
use crate::edge::serve::Answer;
use crate::edge::stop;
use crate::headers;
use crate::http2::frame::Reason;
use crate::http2::server::{self, Config, Control, Error, Respond, SendStream, ServerLimits};
use crate::observe::trace::REQUEST_ID_NAME as REQUEST_ID;
use crate::outcome::ErrorKind;
use crate::pipeline::forward::Reply;
use crate::upstream::h2::{pipe, RecvBody};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderValue, Request, Response};
use http_body::Body;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

/// The window a client's stream gets (a quarter of the connection's, as
/// linkerd's is a sixteenth): a stream whose upstream takes nothing holds
/// its own window of unread data, never the whole connection's, and the
/// other streams go on (hyper's server gave both 1 MiB: one stalled upload
/// could stop the connection).
const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window: what a client may have sent and the proxy not
/// yet passed on, in all its streams.
const CONN_WINDOW: u32 = 1024 * 1024;

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
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Reply, Infallible>>,
{
    let config = Config {
        stream_window: STREAM_WINDOW,
        conn_window: CONN_WINDOW,
        max_header_list: limits.max_header_list,
    };
    // The limits `h2`'s server kept, and the proxy's 1,024 streams at once.
    let (server, driver) = server::handshake(io, config, ServerLimits::default());
    // Boxed: a connection's task is not sized for HTTP/2's buffers.
    Box::pin(run(server, driver, limits, stop, handle)).await
}

/// Serves a connection (see [`serve`]): the driver, the requests taken in
/// turn and their answers, the timers, all polled in this one task.
async fn run<IO, F, Fut>(
    mut server: server::Server,
    mut driver: server::Driver<IO>,
    limits: Limits,
    stop: watch::Receiver<bool>,
    mut handle: F,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Result<Reply, Infallible>>,
{
    // Resolves when a PING goes unanswered.
    let control = server.control();
    let mut silent = pin!(keep_alive(
        &control,
        limits.keep_alive_interval,
        limits.keep_alive_timeout
    ));
    // A client that sends no preface is dropped, as one that sends no
    // head is on HTTP/1.1 (it holds a `max_connections` place).
    let mut preface = pin!(tokio::time::sleep(limits.preface_timeout));
    let mut prefaced = false;
    let mut idle = pin!(tokio::time::sleep(limits.idle_timeout));
    // Closing: a client that has not answered the shutdown's ping within
    // `keep_alive_timeout` takes no new stream all the same.
    let mut drain = pin!(tokio::time::sleep(limits.keep_alive_timeout));
    let mut drained = false;
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    // The server hands out requests until the connection goes away.
    let mut taking = true;
    let mut stopping = pin!(stop::stopping(stop));
    loop {
        tokio::select! {
            // The streams first, then the driver: an answer queues frames
            // that the driver writes in the same turn.
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    let wait = if closing { limits.body_idle } else { limits.idle_timeout };
                    idle.as_mut().reset(Instant::now() + wait);
                }
            }
            accepted = poll_fn(|cx| server.poll_accept(cx)), if taking => match accepted {
                Some((req, mut respond)) => {
                    let bodiless = req.method() == http::Method::HEAD;
                    let mut req = RecvBody::request(req);
                    continue_if_expected(&mut req, &mut respond);
                    let req = req.map(ClientBody::H2);
                    // Boxed where it is made: the stream's own future,
                    // small, is what moves into the set.
                    let served = crate::boxed(|| handle(req));
                    streams.push(answer(served, respond, bodiless, limits.body_idle));
                }
                // Going away: the driver ends once the streams are over.
                None => taking = false,
            },
            ended = &mut driver => return ended,
            () = &mut preface, if !prefaced => {
                if !server.has_preface() {
                    tracing::debug!(timeout = ?limits.preface_timeout, "downstream h2 preface not sent in time: closing");
                    return Ok(());
                }
                prefaced = true;
            }
            () = &mut stopping, if !closing => {
                closing = true;
                server.graceful_shutdown();
                idle.as_mut().reset(Instant::now() + limits.body_idle);
                drain.as_mut().reset(Instant::now() + limits.keep_alive_timeout);
            }
            () = &mut drain, if closing && !drained => {
                drained = true;
                server.go_away();
            }
            // Idle: GOAWAY. Closing, with every answer queued: what the
            // codec still holds is the last frames past a client's
            // window, and a client that answers pings but gives no room
            // for them for `body_idle` is let go (it would hold its
            // connection forever).
            () = &mut idle, if streams.is_empty() => {
                if closing {
                    tracing::debug!(timeout = ?limits.body_idle, "downstream h2 answers not taken after GOAWAY: closing");
                    return Ok(());
                }
                tracing::debug!(idle = ?limits.idle_timeout, "downstream h2 connection idle: closing");
                closing = true;
                server.graceful_shutdown();
                idle.as_mut().reset(Instant::now() + limits.body_idle);
                drain.as_mut().reset(Instant::now() + limits.keep_alive_timeout);
            }
            () = &mut silent => {
                tracing::debug!(timeout = ?limits.keep_alive_timeout, "downstream h2 ping unanswered: closing");
                return Ok(());
            }
        }
    }
}

/// Answers one stream: awaits `served` (dropped, and so cancelled, if the
/// client resets the stream first), then sends its head and streams its
/// body as the client's window allows (reset when it gives no room for
/// `send_limit`); `bodiless`: the answer to a HEAD, whose head ends the
/// stream.
async fn answer<Fut>(served: Fut, respond: Respond, bodiless: bool, send_limit: Duration)
where
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
    mut respond: Respond,
    bodiless: bool,
) -> Option<(SendStream, Answer)>
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
/// the length of a body known whole; and the request's `x-request-id`
/// (the body carries it), in place of any the upstream's answer had.
/// Returns the body still to send, if
/// any: none for a HEAD (`bodiless`), a 204 or a 304 (RFC 9110 §6.4.1),
/// whatever the answer holds (the proxy's own answers carry text).
fn send_head(resp: Reply, respond: &mut Respond, bodiless: bool) -> Option<(SendStream, Answer)> {
    let (mut parts, mut body) = (*resp).into_parts();
    headers::for_h2(&mut parts.headers);
    // The request's ID goes into the head as it is encoded, in place of
    // any the upstream's answer had.
    let request_id = body.take_request_id();
    // One pass over the names (a standard name compares as a number), not
    // two hashed lookups.
    let (mut date, mut length, mut id) = (false, false, false);
    for name in parts.headers.keys() {
        date |= name == header::DATE;
        length |= name == header::CONTENT_LENGTH;
        id |= name.as_str().len() == REQUEST_ID.len() && name == REQUEST_ID;
    }
    if id && request_id.is_some() {
        parts.headers.remove(REQUEST_ID);
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
    let stamp;
    let extra: &[(&[u8], &[u8])] = match &request_id {
        Some(request_id) => {
            stamp = [(REQUEST_ID.as_bytes(), request_id.as_bytes())];
            &stamp
        }
        None => &[],
    };
    match respond.send_response_with(Response::from_parts(parts, ()), end, extra) {
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
fn continue_if_expected<B: Body>(req: &mut Request<B>, respond: &mut Respond) {
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

/// Pings every `interval`; resolves once a pong does not come within
/// `timeout`.
async fn keep_alive(control: &Control, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let pong = control.ping();
        if !matches!(tokio::time::timeout(timeout, pong).await, Ok(true)) {
            return;
        }
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

    /// Told to stop, a connection says GOAWAY with the highest stream ID
    /// and pings; a client that never answers that ping gets the last
    /// GOAWAY, naming the stream taken, after `keep_alive_timeout` all the
    /// same, and a stream it opens after is refused (it could otherwise
    /// go on opening streams until the proxy's drain ends).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_answers_the_shutdown_ping_is_told_all_the_same() {
        use crate::http2::frame::{self, kind, Settings};
        use crate::http2::hpack::{Encoder, Indexing};
        use bytes::{Bytes, BytesMut};
        /// The server's next frame; `None` once it closes.
        async fn next(
            read: &mut BytesMut,
            client: &mut tokio::io::DuplexStream,
        ) -> Option<(frame::Head, Bytes)> {
            loop {
                if let Ok(Some(frame)) = frame::next(read, frame::MAX_FRAME_LIMIT) {
                    return Some(frame);
                }
                match client.read_buf(read).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        }
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (stop_tx, stop) = watch::channel(false);
        // Never answered: the stream stays open.
        let handle = |_: Request<ClientBody>| std::future::pending::<Result<Reply, Infallible>>();
        tokio::spawn(serve(server, limits(), stop, handle));
        let mut encoder = Encoder::default();
        let mut get = |id: u32, out: &mut BytesMut| {
            let mut block = BytesMut::new();
            encoder.begin(&mut block);
            for (name, value) in [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "web"),
                (":path", "/"),
            ] {
                encoder.field(
                    name.as_bytes(),
                    value.as_bytes(),
                    Indexing::Index,
                    &mut block,
                );
            }
            frame::write_headers(id, &block, true, frame::DEFAULT_MAX_FRAME, out);
        };
        let mut out = BytesMut::new();
        out.extend_from_slice(frame::PREFACE);
        Settings::default().write(&mut out);
        get(1, &mut out);
        assert!(client.write_all(&out).await.is_ok());
        let mut read = BytesMut::new();
        // The server's opening frames, then told to stop.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(stop_tx.send(true).is_ok());
        let started = Instant::now();
        let mut goaways = Vec::new();
        while goaways.len() < 2 {
            let Some((head, payload)) = next(&mut read, &mut client).await else {
                panic!("closed after GOAWAYs {goaways:?}");
            };
            if head.kind == kind::GOAWAY {
                let goaway = frame::goaway(&head, payload).map(|g| g.last_stream);
                goaways.push((goaway.ok(), started.elapsed()));
            }
        }
        assert_eq!(goaways[0].0, Some(frame::MAX_STREAM_ID));
        assert_eq!(goaways[1].0, Some(1), "{goaways:?}");
        assert!(goaways[1].1 >= Duration::from_secs(10), "{goaways:?}");
        let mut out = BytesMut::new();
        get(3, &mut out);
        assert!(client.write_all(&out).await.is_ok());
        loop {
            let Some((head, payload)) = next(&mut read, &mut client).await else {
                panic!("closed before refusing stream 3");
            };
            if head.kind == kind::RST_STREAM && head.stream == 3 {
                assert_eq!(
                    frame::rst_stream(&head, &payload).ok(),
                    Some(Reason::REFUSED_STREAM)
                );
                break;
            }
        }
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
