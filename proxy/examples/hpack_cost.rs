//! What one proxied HTTP/2 request's two heads cost to encode and decode,
//! as the bench's requests look (one upstream request, one response):
//! almond's codec (`ours`, Huffman-coding the fields it indexes;
//! `ours-plain` coding none, `ours-huffman` all, as `h2` does) against
//! the `h2` crate's (`h2`, through its `Codec` over an in-memory
//! connection). Run it under callgrind with two
//! iteration counts and take the difference, for instructions a request:
//!
//! ```sh
//! cargo build --release --example hpack_cost -p almond-proxy
//! for n in 1000 11000; do valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!   target/release/examples/hpack_cost ours $n; done
//! ```

use almond_proxy::http2::frame::{self, Assembled, Block};
use almond_proxy::http2::hpack::{indexing_for, Decoder, Encoder, Field, Huffman};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use h2::frame as theirs;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The request head as almond sends it upstream: h2load's fields, the
/// request ID and the trace context (unique to each request).
const REQUEST: [(&str, &str); 3] = [
    ("user-agent", "h2load nghttp2/1.52.0"),
    ("x-request-id", "3f2a9c1e-8b4d-4e6f-9a01-23456789abcd"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
];

/// nginx's answer to it.
const RESPONSE: [(&str, &str); 4] = [
    ("server", "nginx/1.22.1"),
    ("date", "Mon, 07 Dec 2026 03:35:05 GMT"),
    ("content-type", "application/octet-stream"),
    ("content-length", "13"),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let fields = match which.as_str() {
        "ours" => ours(n, Huffman::Indexed),
        "ours-plain" => ours(n, Huffman::Never),
        "ours-huffman" => ours(n, Huffman::Always),
        "h2" => theirs_run(n),
        _ => {
            eprintln!("usage: hpack_cost ours|ours-plain|ours-huffman|h2 N");
            std::process::exit(2);
        }
    };
    println!("{which}: {n} requests, {fields} fields decoded");
}

/// A request ID of the same shape for request `i`.
fn request_id(i: u64) -> String {
    format!("3f2a9c1e-8b4d-4e6f-9a01-{i:012x}")
}

/// `huffman`: which strings the encoders Huffman-code.
fn ours(n: u64, huffman: Huffman) -> usize {
    // The upstream connection's two ends: the proxy's encoder and the
    // server's decoder, and the other way for the answer.
    let encoder = || Encoder::default().huffman(huffman);
    let (mut up, mut down) = (encoder(), Decoder::default());
    let (mut answer, mut read) = (encoder(), Decoder::default());
    let mut wire = BytesMut::with_capacity(16 * 1024);
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let mut count = 0;
    for i in 0..n {
        let id = request_id(i);
        let stream = (2 * i + 1) as u32 & frame::MAX_WINDOW;
        let mut block = BytesMut::with_capacity(256);
        up.begin(&mut block);
        let pseudo = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "127.0.0.1:28091"),
            (":path", "/"),
        ];
        for (name, value) in pseudo.iter().chain(&REQUEST) {
            let value = if *name == "x-request-id" {
                id.as_str()
            } else {
                value
            };
            up.field(
                name.as_bytes(),
                value.as_bytes(),
                indexing_for(name.as_bytes()),
                &mut block,
            );
        }
        frame::write_headers(stream, &block, true, frame::DEFAULT_MAX_FRAME, &mut wire);
        count += decode(&mut wire, &mut down, &mut fields);

        let mut block = BytesMut::with_capacity(256);
        answer.begin(&mut block);
        answer.field(b":status", b"200", indexing_for(b":status"), &mut block);
        for (name, value) in RESPONSE {
            answer.field(
                name.as_bytes(),
                value.as_bytes(),
                indexing_for(name.as_bytes()),
                &mut block,
            );
        }
        frame::write_headers(stream, &block, false, frame::DEFAULT_MAX_FRAME, &mut wire);
        count += decode(&mut wire, &mut read, &mut fields);
    }
    count
}

fn decode(wire: &mut BytesMut, decoder: &mut Decoder, fields: &mut Vec<Field>) -> usize {
    fields.clear();
    let Ok(Some((head, payload))) = frame::next(wire, frame::DEFAULT_MAX_FRAME) else {
        panic!("no frame");
    };
    let Ok(Assembled::Whole { block, .. }) = Block::start(&head, payload, 1 << 16) else {
        panic!("not a whole block");
    };
    if decoder.decode(&block, 1 << 16, |f| fields.push(f)) != Ok(true) {
        panic!("not decoded");
    }
    fields.len()
}

/// An in-memory connection for `h2`'s `Codec`: writes append, reads
/// drain (no locks, no wakers: both ends are polled by hand).
#[derive(Default)]
struct Memory(BytesMut);

impl tokio::io::AsyncRead for Memory {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.0.len());
        if n == 0 {
            return Poll::Pending;
        }
        buf.put_slice(&self.0.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Memory {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn theirs_run(n: u64) -> usize {
    let waker = futures_util::task::noop_waker();
    let cx = &mut Context::from_waker(&waker);
    let mut up = h2::Codec::<Memory, Bytes>::new(Memory::default());
    let mut down = h2::Codec::<Memory, Bytes>::new(Memory::default());
    let mut answer = h2::Codec::<Memory, Bytes>::new(Memory::default());
    let mut read = h2::Codec::<Memory, Bytes>::new(Memory::default());
    let mut request = HeaderMap::new();
    for (name, value) in REQUEST {
        let mut value = HeaderValue::from_static(value);
        // As almond marks them.
        value.set_sensitive(name != "user-agent");
        request.insert(HeaderName::from_static(name), value);
    }
    let mut response = HeaderMap::new();
    for (name, value) in RESPONSE {
        response.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let mut count = 0;
    for i in 0..n {
        let stream = theirs::StreamId::from((2 * i + 1) as u32 & frame::MAX_WINDOW);
        let mut fields = request.clone();
        let mut id = HeaderValue::from_str(&request_id(i)).unwrap_or(HeaderValue::from_static("x"));
        id.set_sensitive(true);
        fields.insert("x-request-id", id);
        let uri = http::Uri::from_static("http://127.0.0.1:28091/");
        let pseudo = theirs::Pseudo::request(Method::GET, uri, None);
        let mut head = theirs::Headers::new(stream, pseudo, fields);
        head.set_end_stream();
        count += relay(&mut up, &mut down, head.into(), cx);

        let pseudo = theirs::Pseudo::response(StatusCode::OK);
        let head = theirs::Headers::new(stream, pseudo, response.clone());
        count += relay(&mut answer, &mut read, head.into(), cx);
    }
    count
}

/// Encodes `frame` through `from` and decodes it through `to`.
fn relay(
    from: &mut h2::Codec<Memory, Bytes>,
    to: &mut h2::Codec<Memory, Bytes>,
    frame: theirs::Frame<Bytes>,
    cx: &mut Context<'_>,
) -> usize {
    if from.buffer(frame).is_err() || from.flush(cx).is_pending() {
        panic!("not written");
    }
    let written = std::mem::take(&mut from.get_mut().0);
    to.get_mut().0 = written;
    match to.poll_next_unpin(cx) {
        Poll::Ready(Some(Ok(theirs::Frame::Headers(h)))) => h.fields().len() + 1,
        other => panic!("not decoded: {other:?}"),
    }
}
