//! H1: a lean HTTP/1.1 client for the common request -- its body known
//! whole (most have none), no upgrade -- run in the request's own task, no
//! connection task and no channel: the head written straight from the
//! request, the response head parsed by `httparse` (a simple one's lines
//! passed through as received for the lean server to write, with no
//! `HeaderMap`: [`Passed`]), the body framed by its length or its chunks
//! exactly as hyper's client frames it (the differential test below feeds
//! both the same bytes). Anything else goes through hyper (`connect.rs`).

use crate::headers;
use crate::observe::trace::{RequestId, Stamp};
use crate::upstream::pool::{Pool, Reusable};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// A lean response's body over an endpoint's connection (plain or TLS).
pub type LeanBody = Body<crate::identity::tls::Conn>;

/// Most header lines a response head may carry (hyper's limit).
const MAX_HEADERS: usize = 100;
/// Header lines whose offsets are kept on the stack while a head is split.
const FEW_HEADERS: usize = 24;
/// Largest response head buffered (hyper's read buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Chunk extension bytes allowed in one body (hyper's limit).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// Trailer bytes allowed (hyper's limit).
const TRAILER_LIMIT: usize = 16 * 1024;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;

/// Why a lean exchange failed.
#[derive(Debug)]
pub enum Error {
    /// The connection ended (EOF, reset, broken pipe) before a whole
    /// response head: on a reused connection, the upstream closed it idle.
    Closed,
    /// Reading or writing failed otherwise.
    Io(io::Error),
    /// The response is not HTTP/1.1 that can be framed.
    Invalid(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => f.write_str("connection closed before a response"),
            Error::Io(e) => e.fmt(f),
            Error::Invalid(why) => write!(f, "invalid response: {why}"),
        }
    }
}

impl std::error::Error for Error {}

fn io_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => Error::Closed,
        _ => Error::Io(e),
    }
}

/// One upstream HTTP/1.1 connection and the bytes read from it not yet
/// consumed.
pub struct Connection<IO> {
    io: IO,
    buf: BytesMut,
    /// Counted open (for `/endpoints`) while it lives.
    open: Option<Arc<AtomicU32>>,
    /// When its last request was sent (idle from then, once answered).
    used: Instant,
}

impl<IO> Drop for Connection<IO> {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A socket that can tell, with no system call while its peer is quiet,
/// whether the peer has sent anything (bytes, or its close) since it was
/// settled: an idle connection that stirred cannot carry a request (it
/// holds an unsolicited answer, such as a 408, or the upstream's idle
/// close). What hyper's connection task learns by reading an idle
/// connection, learned from the readiness the runtime already has (a
/// read only when it says something may be there).
pub trait Stir {
    /// Reads, without waiting, what the peer sent past the response just
    /// read whole: `true` when nothing was there (the runtime's read
    /// readiness is then clear, so anything that arrives after is news).
    /// `false` when bytes, or the close, were: left unread, they would be
    /// taken for the next request's answer. A read that filled its buffer
    /// leaves the readiness set, so bytes the upstream sent past its
    /// framing (a body on a `HEAD` answer) may still be in the kernel, or,
    /// with TLS, already decrypted by rustls.
    fn settle(&mut self) -> bool;
    /// Has anything arrived since [`Stir::settle`]?
    fn stirred(&self) -> bool;
}

/// [`Stir::settle`] for any reader: one poll, which reads only when the
/// runtime's readiness says something may be there, and clears it when
/// nothing is (a TLS stream also gives up what rustls holds decrypted).
fn settle_reader(io: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut scratch = [MaybeUninit::<u8>::uninit(); 64];
    let mut buf = tokio::io::ReadBuf::uninit(&mut scratch);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    // Outside the task's cooperative budget: spent, it would make the
    // read say "pending" without looking.
    let read = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf));
    let mut read = std::pin::pin!(tokio::task::unconstrained(read));
    std::future::Future::poll(read.as_mut(), &mut cx).is_pending()
}

impl Stir for crate::identity::tls::Conn {
    fn settle(&mut self) -> bool {
        match self {
            // A read only when the readiness the runtime has says bytes
            // may be there; else an atomic load, and no waker registered.
            crate::identity::tls::Conn::Plain(tcp) => {
                let mut scratch = [0u8; 64];
                matches!(tcp.try_read(&mut scratch), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // What rustls holds decrypted counts too.
            tls => settle_reader(tls),
        }
    }

    fn stirred(&self) -> bool {
        // A read only when the runtime's readiness says bytes (or the
        // close) may be there: else an atomic load, no waker registered,
        // and no cooperative budget taken (spent, a poll would say
        // "quiet" without looking). What it reads, it was going to
        // throw away with the connection.
        let mut scratch = [0u8; 1];
        !matches!(tcp(self).try_read(&mut scratch), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The TCP stream under a plain or TLS upstream connection.
fn tcp(conn: &crate::identity::tls::Conn) -> &tokio::net::TcpStream {
    match conn {
        crate::identity::tls::Conn::Plain(s) => s,
        crate::identity::tls::Conn::Tls(s) => s.get_ref().0,
    }
}

/// A lean connection waits in a [`Pool`] while its socket is quiet.
impl<IO: Stir> Reusable for Connection<IO> {
    fn usable(&self) -> bool {
        !self.io.stirred()
    }

    fn parked(&mut self) -> bool {
        self.io.settle()
    }
}

/// How a response body is delimited (RFC 9112 6.3, as hyper reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// This many bytes still to come.
    Length(u64),
    /// Chunked coding, in this state (boxed: 48 bytes, which every
    /// response's body would carry through each of its moves).
    Chunked(Box<Chunked>),
    /// Until the upstream closes.
    Close,
}

/// Where a chunked body's decoder is (hyper's states, same names).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
    /// The chunk's size, then what is left of it.
    size: u64,
    extensions: u64,
    /// The trailer section's bytes, once one starts.
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    End,
}

/// A request to write: its head (readied by `headers::to_upstream`:
/// origin-form, no hop-by-hop headers) and its whole body.
pub struct Head<'a> {
    /// The method.
    pub method: &'a Method,
    /// The target.
    pub uri: &'a Uri,
    /// The header fields, written as they are.
    pub headers: &'a HeaderMap,
    /// The body, if it has bytes.
    pub body: Option<&'a Bytes>,
    /// The client's server writes the response head itself (the lean
    /// HTTP/1.1 server): a simple response's header lines may be passed
    /// through as received ([`Passed`]), with no `HeaderMap` built.
    pub pass: bool,
    /// What this hop adds, written after the map's lines.
    pub stamp: &'a Stamp,
}

/// A parsed response head and how its body is framed.
struct Parsed {
    parts: http::response::Parts,
    framing: Framing,
    /// The connection may carry another request after this response.
    reuse: bool,
    /// The header lines, passed through (`parts.headers` is then empty).
    passed: Option<Box<Passed>>,
}

/// A response head's header lines as the upstream sent them, for the lean
/// HTTP/1.1 server to write to its client as they are: the pass-through
/// of a simple response (a final status with a body, one plain
/// `Content-Length`, every line `name: value\r\n`). What the proxy would
/// strip or replace is cut out already: `Connection` naming only
/// `keep-alive` / `close`, `Keep-Alive`, and `x-request-id` (which
/// `serve::handle` sets on every response). A head with anything else
/// hop-by-hop, framing or proxy-owned is read into a `HeaderMap` instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passed {
    /// The header lines, from the first name to the last line's end.
    lines: Bytes,
    /// Lines cut out, as ranges of `lines`, in order.
    cuts: [(u16, u16); MAX_CUTS],
    /// How many of `cuts` are used.
    cut: u8,
    /// A `Date` line is among the lines.
    date: bool,
    /// The proxy's `x-request-id`, written after the lines (in place of
    /// an entry in the response's map, which then stays unallocated).
    request_id: Option<RequestId>,
}

/// Lines a passed head may have cut out (`Connection`, `Keep-Alive`,
/// `x-request-id`).
const MAX_CUTS: usize = 3;

impl Passed {
    /// Appends the lines, less the cut ones.
    pub fn write(&self, dst: &mut Vec<u8>) {
        let mut at = 0;
        for &(from, to) in &self.cuts[..usize::from(self.cut)] {
            dst.extend_from_slice(&self.lines[at..usize::from(from)]);
            at = usize::from(to);
        }
        dst.extend_from_slice(&self.lines[at..]);
        if let Some(id) = &self.request_id {
            dst.extend_from_slice(b"x-request-id: ");
            dst.extend_from_slice(id.as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
    }

    /// Sets the `x-request-id` the client gets (`serve::handle`).
    pub fn set_request_id(&mut self, id: RequestId) {
        self.request_id = Some(id);
    }

    /// A `Date` line is among them (the server adds none).
    pub fn has_date(&self) -> bool {
        self.date
    }
}

/// What reading a head for the pass-through learned besides its lines.
struct PassRead {
    passed: Passed,
    /// The one `Content-Length`.
    length: u64,
    /// The `Connection` line's options, if it had one.
    connection: Option<Options>,
}

/// A header name the pass-through must look at, by its length first (most
/// names match no length here, or differ at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Special {
    /// `Connection`: cut out if it names only options; else not passed.
    Connection,
    /// `Keep-Alive`, and `x-request-id` (the proxy sets its own): cut out.
    Cut,
    /// `Content-Length`: read.
    ContentLength,
    /// `Date`: noted (the server adds one otherwise).
    Date,
    /// Hop-by-hop, framing or the proxy's own: the head is not passed.
    Refuse,
}

/// What the pass-through must do with a line named `name`, if anything.
fn special(name: &[u8]) -> Option<Special> {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    Some(match name.len() {
        4 if is("date") => Special::Date,
        10 if is("connection") => Special::Connection,
        10 if is("keep-alive") => Special::Cut,
        12 if is("x-request-id") => Special::Cut,
        14 if is("content-length") => Special::ContentLength,
        2 if is("te") => Special::Refuse,
        7 if is("trailer") || is("upgrade") => Special::Refuse,
        14 if is(crate::outcome::ERROR_HEADER.as_str()) => Special::Refuse,
        15 if is(headers::SUBSET_HEADER) => Special::Refuse,
        16 if is("proxy-connection") => Special::Refuse,
        17 if is("transfer-encoding") => Special::Refuse,
        19 if is("proxy-authorization") => Special::Refuse,
        _ => return None,
    })
}

/// Reads a head's header lines (`spans`: name and value offsets into
/// `head`) for the pass-through; `None` if it cannot be passed.
fn pass_through(head: &Bytes, spans: &[(usize, usize, usize, usize)]) -> Option<PassRead> {
    let start = spans.first()?.0;
    let mut at = start;
    let mut cuts = [(0u16, 0u16); MAX_CUTS];
    let mut cut = 0usize;
    let mut length = None;
    let mut connection = None;
    let mut date = false;
    for &(n0, n1, v0, v1) in spans {
        // `name: value\r\n`, right after the line before.
        if n0 != at || v0 != n1 + 2 || head.get(n1..v0)? != b": " {
            return None;
        }
        if head.get(v1..v1 + 2)? != b"\r\n" {
            return None;
        }
        let end = v1 + 2;
        let mut drop_line = false;
        match special(&head[n0..n1]) {
            None => {}
            Some(Special::Date) => date = true,
            Some(Special::ContentLength) => {
                if length.is_some() {
                    return None;
                }
                length = Some(digits(&head[v0..v1])?);
            }
            Some(Special::Connection) => {
                let options = Options::read(&head[v0..v1]);
                if connection.is_some() || !options.only {
                    return None;
                }
                connection = Some(options);
                drop_line = true;
            }
            Some(Special::Cut) => drop_line = true,
            Some(Special::Refuse) => return None,
        }
        if drop_line {
            let slot = cuts.get_mut(cut)?;
            *slot = (
                u16::try_from(n0 - start).ok()?,
                u16::try_from(end - start).ok()?,
            );
            cut += 1;
        }
        at = end;
    }
    let length = length.filter(|&n| n > 0 && n < u64::MAX - 1)?;
    // Offsets fit a `u16`: the lines are shorter than 64 KiB.
    u16::try_from(at - start).ok()?;
    Some(PassRead {
        passed: Passed {
            lines: head.slice(start..at),
            cuts,
            cut: cut as u8,
            date,
            request_id: None,
        },
        length,
        connection,
    })
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Stir> Connection<IO> {
    /// A connection over `io`, counted in `open` while it lives.
    pub fn new(io: IO, open: Option<Arc<AtomicU32>>) -> Connection<IO> {
        if let Some(open) = &open {
            open.fetch_add(1, Ordering::Relaxed);
        }
        Connection {
            io,
            buf: BytesMut::new(),
            open,
            used: Instant::now(),
        }
    }

    /// Sends a request at `at` and reads the response's head; its body is
    /// read through the returned [`Body`], which hands the connection back
    /// to `home` once it is complete (idle since `at`).
    pub async fn send(
        mut self: Box<Self>,
        req: Head<'_>,
        home: Option<Arc<Pool<Box<Connection<IO>>>>>,
        at: Instant,
    ) -> Result<http::Response<Body<IO>>, Error> {
        self.used = at;
        let (method, body, pass) = (req.method, req.body, req.pass);
        let head = encode_request(req.method, req.uri, req.headers, req.stamp, body);
        match body {
            Some(body) if !body.is_empty() => {
                let mut bufs = [io::IoSlice::new(&head), io::IoSlice::new(body)];
                write_all_vectored(&mut self.io, &mut bufs).await
            }
            _ => self.io.write_all(&head).await,
        }
        .map_err(io_error)?;
        // TLS keeps the records it could not write yet (the socket was
        // full) until flushed, and reading never writes them: without this
        // the end of a large body stays here while both sides wait (a
        // no-op on plain TCP).
        self.io.flush().await.map_err(io_error)?;
        // Once any byte of an answer came, the upstream saw the request:
        // its end is no longer `Error::Closed` (an idle close, safe to send
        // again) but a broken exchange.
        let mut answered = false;
        let head = loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&mut self.buf, method, pass)? {
                    break head;
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(Error::Invalid("head too large"));
                }
            }
            self.buf.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if answered => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(0) => return Err(Error::Closed),
                Ok(_) => answered = true,
                Err(e) if answered => return Err(Error::Io(e)),
                Err(e) => return Err(io_error(e)),
            }
        };
        let mut body = Body {
            conn: Some(self),
            framing: head.framing,
            reuse: head.reuse,
            home,
            passed: head.passed,
        };
        // A bodiless response frees its connection at once.
        body.release();
        Ok(http::Response::from_parts(head.parts, body))
    }
}

/// Writes every byte of `bufs` (the head and the body in one `writev`
/// when the socket takes them).
pub async fn write_all_vectored<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The request head as hyper's client writes it: the request line, every
/// header as given, and `content-length` when the body has bytes and no
/// length was given.
fn encode_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    stamp: &Stamp,
    body: Option<&Bytes>,
) -> Vec<u8> {
    use std::io::Write;
    let mut size = method.as_str().len() + 64 + Stamp::MAX_LEN;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    // The target as hyper writes it (`Uri`'s `Display`, without `fmt`).
    if let Some(scheme) = uri.scheme() {
        out.extend_from_slice(scheme.as_str().as_bytes());
        out.extend_from_slice(b"://");
    }
    if let Some(authority) = uri.authority() {
        out.extend_from_slice(authority.as_str().as_bytes());
    }
    out.extend_from_slice(uri.path().as_bytes());
    if let Some(query) = uri.query() {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    stamp.write(&mut out);
    if let Some(body) = body.filter(|b| !b.is_empty()) {
        if !headers.contains_key(header::CONTENT_LENGTH) {
            let _ = write!(out, "content-length: {}\r\n", body.len());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Parses a response head at the start of `buf` (skipping 1xx interim
/// responses, as hyper does), consuming it; with `pass`, a simple one's
/// header lines are passed through ([`Passed`]). `None`: more bytes
/// needed.
fn parse_head(buf: &mut BytesMut, method: &Method, pass: bool) -> Result<Option<Parsed>, Error> {
    loop {
        // Uninitialized: 100 headers' worth of zeroes per response is
        // more work than parsing a small head.
        let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut lines);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many headers")),
            Err(_) => return Err(Error::Invalid("malformed head")),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("status"))?;
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let reason = res.reason.unwrap_or("");
        let custom_reason = (Some(reason) != status.canonical_reason())
            .then(|| Bytes::copy_from_slice(reason.as_bytes()));
        // Offsets, so the values can share the head's bytes once split off
        // (a few on the stack; a long head's in a `Vec`).
        let base = buf.as_ptr() as usize;
        let span = |h: &httparse::Header<'_>| {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            (n, n + h.name.len(), v, v + h.value.len())
        };
        let count = res.headers.len();
        let mut few = [(0usize, 0usize, 0usize, 0usize); FEW_HEADERS];
        let many: Vec<_>;
        let spans = if count <= FEW_HEADERS {
            for (slot, h) in few.iter_mut().zip(res.headers.iter()) {
                *slot = span(h);
            }
            &few[..count]
        } else {
            many = res.headers.iter().map(span).collect();
            &many[..]
        };
        let head = buf.split_to(len).freeze();
        let mut keep_alive = version == Version::HTTP_11;
        // The pass-through: a final status with a body, nothing unusual.
        let passable = pass
            && status.as_u16() >= 200
            && !matches!(status.as_u16(), 204 | 304)
            && method != Method::HEAD
            && method != Method::CONNECT;
        if let Some(read) = passable.then(|| pass_through(&head, spans)).flatten() {
            if let Some(options) = read.connection {
                if options.close {
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = options.keep_alive;
                }
            }
            return Ok(Some(Parsed {
                parts: response_parts(status, version, HeaderMap::new(), custom_reason),
                framing: Framing::Length(read.length),
                reuse: keep_alive,
                passed: Some(Box::new(read.passed)),
            }));
        }
        // Room for the request ID the proxy adds to the response.
        let mut headers = HeaderMap::with_capacity(count + 2);
        let mut saw_close = false;
        // The framing headers, read on the way (no lookups after).
        let mut lengths = Lengths::default();
        for &(n0, n1, v0, v1) in spans {
            let name = headers::name(&head[n0..n1]).map_err(|_| Error::Invalid("header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|_| Error::Invalid("header value"))?;
            if name == header::CONNECTION {
                let options = Options::of(&value);
                if saw_close || options.close {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = options.keep_alive;
                }
                // Only `keep-alive` / `close` (nginx's `Connection:
                // keep-alive` on every answer): read here, and left out of
                // the map -- hop-by-hop, naming no other header, the
                // relay would remove it (a removal re-hashes the entry it
                // moves: 1,000 instructions a response).
                if options.only {
                    continue;
                }
            } else if name == header::CONTENT_LENGTH {
                lengths.odd |= lengths.length.is_some() || value.as_bytes().contains(&b',');
                lengths.content_length(&value);
            } else if name == header::TRANSFER_ENCODING {
                // Only one `chunked`, on its own, in all the lines: a
                // second line (or coding) is a coding the proxy cannot
                // pass on (`chunked, chunked` included).
                lengths.chunked = Some(lengths.chunked.is_none() && only_chunked(&value));
            }
            headers.append(name, value);
        }
        let Some((framing, upgrade)) = framing(status, version, &lengths, method)? else {
            // 1xx: skipped; the real response follows.
            continue;
        };
        if lengths.odd || status == StatusCode::NO_CONTENT {
            tidy_length(status, &mut headers);
        }
        let parts = response_parts(status, version, headers, custom_reason);
        let reuse = keep_alive && !upgrade && framing != Framing::Close;
        return Ok(Some(Parsed {
            parts,
            framing,
            reuse,
            passed: None,
        }));
    }
}

/// A parsed head's parts: a reason phrase other than the status's own
/// is kept (as hyper's client keeps it).
fn response_parts(
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    custom_reason: Option<Bytes>,
) -> http::response::Parts {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some(reason) = custom_reason {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
            parts.extensions.insert(reason);
        }
    }
    parts
}

/// What a head's framing headers said.
#[derive(Default)]
struct Lengths {
    /// `Transfer-Encoding` was present: is it `chunked` alone?
    chunked: Option<bool>,
    /// `Content-Length` was present: its value, if every value agreed
    /// (hyper's `content_length_parse_all`).
    length: Option<Option<u64>>,
    /// `Content-Length` came as a list (`2, 2`) or on several lines.
    odd: bool,
}

/// The one `Content-Length` a response may be relayed with: the agreed
/// value of a list or of repeated lines (`2, 2`), which HTTP/2 clients
/// (h2, nghttp2) and Go's refuse as sent, as RFC 9110 8.6 lets a
/// recipient collapse them; none on a 204, which must not have one (an
/// HTTP/2 client resets such a stream). Values that disagree, which
/// framed no body (a HEAD's or a 304's answer; a chunked one's), are not
/// relayed at all.
pub(crate) fn tidy_length(status: StatusCode, headers: &mut HeaderMap) {
    if status == StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
        return;
    }
    let mut lines = headers.get_all(header::CONTENT_LENGTH).iter();
    match (lines.next(), lines.next()) {
        (Some(one), None) if !one.as_bytes().contains(&b',') => return,
        (None, _) => return,
        _ => {}
    }
    let mut lengths = Lengths::default();
    for line in headers.get_all(header::CONTENT_LENGTH) {
        lengths.content_length(line);
    }
    match lengths.length {
        Some(Some(n)) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        _ => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

impl Lengths {
    fn content_length(&mut self, value: &HeaderValue) {
        let mut length = match self.length {
            None => None,
            Some(None) => return,
            Some(Some(n)) => Some(n),
        };
        let agreed = value.to_str().ok().and_then(|line| {
            for v in line.split(',') {
                let n = digits(v.trim().as_bytes())?;
                if *length.get_or_insert(n) != n {
                    return None;
                }
            }
            length
        });
        self.length = Some(agreed);
    }
}

/// Is a `Transfer-Encoding` line `chunked` alone (empty list elements
/// aside)? Anything else (`gzip, chunked`, `gzip`) is a coding the proxy
/// would undo without saying so: its response is refused (502), as
/// nginx's "upstream sent unknown Transfer-Encoding".
pub(crate) fn only_chunked(value: &HeaderValue) -> bool {
    let Ok(line) = value.to_str() else {
        return false;
    };
    let mut codings = line.split(',').map(str::trim).filter(|c| !c.is_empty());
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
        && codings.next().is_none()
}

/// Is a response hyper's client read (framed by its own rules) one the
/// lean client refuses: a 101 (neither client carries upgrades: a 101
/// answers a request that asked for none, nginx's 502), or a body in a
/// transfer coding other than `chunked` alone (see [`only_chunked`])? The
/// same verdict on both paths.
pub(crate) fn unrelayable(method: &Method, status: StatusCode, headers: &HeaderMap) -> bool {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return true;
    }
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
        || (method == Method::CONNECT && status.is_success());
    if no_body {
        return false;
    }
    let mut lines = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (lines.next(), lines.next()) {
        (None, _) => false,
        (Some(line), None) => !only_chunked(line),
        _ => true,
    }
}

/// A response body's framing and whether the response is an upgrade;
/// `None` for an interim 1xx (RFC 9112 6.3, hyper's `Client::decoder`).
fn framing(
    status: StatusCode,
    version: Version,
    lengths: &Lengths,
    method: &Method,
) -> Result<Option<(Framing, bool)>, Error> {
    match status.as_u16() {
        // Upgrades go through hyper's client, never this one.
        101 => return Err(Error::Invalid("101 to a request that asked for no upgrade")),
        100..=199 => return Ok(None),
        204 | 304 => return Ok(Some((Framing::Empty, false))),
        _ => {}
    }
    if method == Method::HEAD {
        return Ok(Some((Framing::Empty, false)));
    }
    if method == Method::CONNECT && status.is_success() {
        return Ok(Some((Framing::Empty, true)));
    }
    if let Some(chunked) = lengths.chunked {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("transfer-encoding in HTTP/1.0"));
        }
        if !chunked {
            return Err(Error::Invalid("transfer-encoding other than chunked"));
        }
        return Ok(Some((Framing::Chunked(Box::new(Chunked::new())), false)));
    }
    match lengths.length {
        None => Ok(Some((Framing::Close, false))),
        Some(Some(0)) => Ok(Some((Framing::Empty, false))),
        Some(Some(n)) if n < u64::MAX - 1 => Ok(Some((Framing::Length(n), false))),
        Some(_) => Err(Error::Invalid("content-length")),
    }
}

fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// What a `Connection` value says, read in one pass (nginx's
/// `keep-alive`, on every answer, without splitting at all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Options {
    /// It has the `close` option.
    close: bool,
    /// It has the `keep-alive` option.
    keep_alive: bool,
    /// It is nothing but those options (no header names).
    only: bool,
}

impl Options {
    /// A value that is not visible ASCII says nothing (as `to_str` fails).
    fn of(value: &HeaderValue) -> Options {
        Options::read(value.as_bytes())
    }

    /// [`Options::of`] a value's bytes.
    fn read(value: &[u8]) -> Options {
        if value.eq_ignore_ascii_case(b"keep-alive") {
            return Options {
                close: false,
                keep_alive: true,
                only: true,
            };
        }
        let visible = |&b: &u8| b == b'\t' || (32..127).contains(&b);
        let Some(s) = (value.iter().all(visible))
            .then(|| std::str::from_utf8(value).ok())
            .flatten()
        else {
            return Options::default();
        };
        let mut seen = Options {
            only: true,
            ..Options::default()
        };
        for t in s.split(',').map(str::trim) {
            if t.eq_ignore_ascii_case("close") {
                seen.close = true;
            } else if t.eq_ignore_ascii_case("keep-alive") {
                seen.keep_alive = true;
            } else {
                seen.only = false;
            }
        }
        seen
    }
}

/// A lean response's body: read from its connection as it is polled; the
/// connection goes back to its pool as soon as the body is complete (and
/// is closed if it is dropped before).
pub struct Body<IO: Stir> {
    /// Boxed once per connection: the body moves several times a request.
    conn: Option<Box<Connection<IO>>>,
    framing: Framing,
    reuse: bool,
    home: Option<Arc<Pool<Box<Connection<IO>>>>>,
    /// The head's lines, passed through (see [`Passed`]). Boxed: the
    /// body moves several times a request, and this would add 88 bytes
    /// to each move (more than an allocation costs).
    passed: Option<Box<Passed>>,
}

impl<IO: Stir> Drop for Body<IO> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<IO: Stir> Body<IO> {
    /// Hands the connection back to its pool if the body has ended
    /// cleanly and the connection may carry another request (nothing left
    /// over in its buffer).
    fn release(&mut self) {
        let done = self.framing == Framing::Empty
            || matches!(&self.framing, Framing::Chunked(c) if c.state == ChunkState::End);
        if !(done && self.reuse) {
            return;
        }
        if let (Some(conn), Some(home)) = (self.conn.take(), &self.home) {
            if conn.buf.is_empty() {
                let since = conn.used;
                home.push(conn, since);
            }
        }
    }

    /// Nothing more will come.
    pub fn is_end_stream(&self) -> bool {
        match &self.framing {
            Framing::Empty => true,
            Framing::Chunked(c) => c.state == ChunkState::End,
            _ => false,
        }
    }

    /// The response head's lines, if they are passed through.
    pub fn passed(&self) -> Option<&Passed> {
        self.passed.as_deref()
    }

    /// The same, to add to.
    pub fn passed_mut(&mut self) -> Option<&mut Passed> {
        self.passed.as_deref_mut()
    }

    /// The body's length when it is known.
    pub fn size_hint(&self) -> SizeHint {
        match &self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

impl<IO: AsyncRead + Unpin + Stir> http_body::Body for Body<IO> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.get_mut().next_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint()
    }
}

impl<IO: AsyncRead + Unpin + Stir> Body<IO> {
    /// The next frame: data, the trailers of a chunked body, or the end.
    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                // Released (complete) or failed before.
                return Poll::Ready(None);
            };
            match &mut self.framing {
                Framing::Empty => return Poll::Ready(None),
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = conn
                            .buf
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *left == 0 {
                            self.framing = Framing::Empty;
                            self.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(chunked) => {
                    if chunked.state == ChunkState::End {
                        return Poll::Ready(None);
                    }
                    match chunked.step(&mut conn.buf) {
                        Err(e) => {
                            self.conn = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                        Ok(Some(frame)) => {
                            if chunked.state == ChunkState::End {
                                self.release();
                            }
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Ok(None) if chunked.state == ChunkState::End => {
                            self.release();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                    }
                }
            }
            // More bytes needed.
            conn.buf.reserve(READ_SIZE);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) if self.framing == Framing::Close => {
                    self.conn = None;
                    self.framing = Framing::Empty;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(Error::Invalid("body cut short"))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }
}

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            state: ChunkState::Start,
            size: 0,
            extensions: 0,
            trailers: None,
            trailer_lines: 0,
        }
    }

    /// Advances over `buf`: a data frame, the trailers, or `None` when
    /// more bytes are needed (or the body has ended: `state` is `End`).
    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, Error> {
        use ChunkState::*;
        while !buf.is_empty() {
            if self.state == Body {
                let n = buf
                    .len()
                    .min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = BodyCr;
                }
                return Ok(Some(Frame::data(buf.split_to(n).freeze())));
            }
            let b = buf[0];
            buf.advance(1);
            self.state = match (self.state, b) {
                (Start, _) => {
                    self.size = hex(b).ok_or(Error::Invalid("chunk size"))?;
                    Size
                }
                (Size, b'\t' | b' ') => SizeLws,
                (Size, b';') => Extension,
                (Size, b'\r') => SizeLf,
                (Size, _) => {
                    let d = hex(b).ok_or(Error::Invalid("chunk size"))?;
                    self.size = (self.size.checked_mul(16))
                        .and_then(|s| s.checked_add(d))
                        .ok_or(Error::Invalid("chunk size overflow"))?;
                    Size
                }
                (SizeLws, b'\t' | b' ') => SizeLws,
                (SizeLws, b';') => Extension,
                (SizeLws, b'\r') => SizeLf,
                (SizeLws, _) => return Err(Error::Invalid("chunk size whitespace")),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(Error::Invalid("newline in chunk extension")),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= EXTENSIONS_LIMIT {
                        return Err(Error::Invalid("chunk extensions too long"));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (SizeLf, _) => return Err(Error::Invalid("chunk size line end")),
                (BodyCr, b'\r') => BodyLf,
                (BodyCr, _) => return Err(Error::Invalid("chunk data end")),
                (BodyLf, b'\n') => {
                    self.size = 0;
                    Start
                }
                (BodyLf, _) => return Err(Error::Invalid("chunk data end")),
                (Trailer, _) => {
                    self.push_trailer(b)?;
                    if b == b'\r' {
                        TrailerLf
                    } else {
                        Trailer
                    }
                }
                (TrailerLf, b'\n') => {
                    if self.trailer_lines >= MAX_HEADERS {
                        return Err(Error::Invalid("too many trailers"));
                    }
                    self.trailer_lines += 1;
                    self.push_trailer(b)?;
                    EndCr
                }
                (TrailerLf, _) => return Err(Error::Invalid("trailer line end")),
                (EndCr, b'\r') => {
                    if self.trailers.is_some() {
                        self.push_trailer(b)?;
                    }
                    EndLf
                }
                (EndCr, _) => {
                    match &mut self.trailers {
                        None => {
                            let mut t = BytesMut::with_capacity(64);
                            t.extend_from_slice(&[b]);
                            self.trailers = Some(t);
                        }
                        Some(_) => self.push_trailer(b)?,
                    }
                    Trailer
                }
                (EndLf, b'\n') => {
                    if self.trailers.is_some() {
                        self.push_trailer(b)?;
                    }
                    self.state = End;
                    return match self.trailers.take() {
                        Some(t) => Ok(Some(Frame::trailers(trailers(&t, self.trailer_lines)?))),
                        None => Ok(None),
                    };
                }
                (EndLf, _) => return Err(Error::Invalid("chunked body end")),
                (Body | End, _) => unreachable_state()?,
            };
        }
        Ok(None)
    }

    fn push_trailer(&mut self, b: u8) -> Result<(), Error> {
        let Some(t) = self.trailers.as_mut() else {
            return Err(Error::Invalid("trailer"));
        };
        t.extend_from_slice(&[b]);
        if t.len() >= TRAILER_LIMIT {
            return Err(Error::Invalid("trailers too long"));
        }
        Ok(())
    }
}

/// `Body` is handled before the byte match, and nothing follows `End`.
fn unreachable_state() -> Result<ChunkState, Error> {
    Err(Error::Invalid("chunked state"))
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// The trailer section's fields (hyper's `decode_trailers`).
fn trailers(bytes: &[u8], lines: usize) -> Result<HeaderMap, Error> {
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    match httparse::parse_headers(bytes, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| Error::Invalid("trailer name"))?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| Error::Invalid("trailer value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(Error::Invalid("trailers")),
    }
}

/// The differential harness: the same generated response bytes (valid,
/// malformed, and smuggling shapes: conflicting lengths, chunked after
/// another coding, bare LFs, bad chunk lines, trailers) read by hyper's
/// client and by this one, which must agree on every outcome: error or
/// not, status, version, header list, body bytes and trailers. The cases
/// run in `cargo test` (CI) for a bounded count, `ALMOND_DIFF_CASES` more.
/// Parses the response head at the front of `bytes` as a lean exchange
/// to a `method` request does (`pass` as [`Head::pass`]): the head, the
/// body length as the body reports it (none when it has ended), whether
/// the connection is reused, and the passed lines; `Err` for a head the
/// exchange fails on, `Ok(None)` for one still partial.
#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) fn parse_for_test(
    bytes: &[u8],
    method: &Method,
    pass: bool,
) -> Result<
    Option<(
        http::response::Parts,
        Option<Option<u64>>,
        bool,
        Option<Passed>,
    )>,
    Error,
> {
    let mut buf = BytesMut::from(bytes);
    let Some(parsed) = parse_head(&mut buf, method, pass)? else {
        return Ok(None);
    };
    let length = match parsed.framing {
        Framing::Empty => None,
        Framing::Length(n) => Some(Some(n)),
        Framing::Chunked(_) | Framing::Close => Some(None),
    };
    Ok(Some((
        parsed.parts,
        length,
        parsed.reuse,
        parsed.passed.map(|p| *p),
    )))
}

#[cfg(test)]
pub(crate) mod differential {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// Header fields as (name, value) pairs, in order.
    type Fields = Vec<(String, Vec<u8>)>;

    /// A request to write: method, target, headers, body.
    type RequestCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

    /// In memory, readiness is not cached: only what is there counts.
    impl Stir for DuplexStream {
        fn settle(&mut self) -> bool {
            settle_reader(self)
        }
        fn stirred(&self) -> bool {
            false
        }
    }

    /// What a client made of a response.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        /// No response (an error before or in the head).
        Failed,
        /// Waited past the test's limit.
        Hung,
        Answered {
            status: u16,
            version: Version,
            reason: Option<Vec<u8>>,
            headers: Fields,
            /// The body's bytes and trailers, or `Err` if it failed.
            body: Result<(Vec<u8>, Fields), ()>,
        },
    }

    fn list(map: &HeaderMap) -> Fields {
        map.iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The head's fields as the proxy relays them (`headers::from_upstream`:
    /// hop-by-hop fields dropped). The lean client leaves a `Connection`
    /// line of only `keep-alive` / `close` out of its map (the relay would
    /// remove it); what is relayed is the same.
    fn relayed(resp: &http::Response<impl Sized>) -> Fields {
        let mut relay = http::Response::new(());
        *relay.status_mut() = resp.status();
        *relay.headers_mut() = resp.headers().clone();
        crate::headers::from_upstream(&mut relay);
        // By name, each name's values in their order: a removal from a
        // `HeaderMap` moves its last name into the gap, and the order of
        // different names means nothing in HTTP.
        let mut fields = list(relay.headers());
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields
    }

    /// A response as a client saw it: its head, and its body to the end.
    async fn read<B>(resp: http::Response<B>) -> Outcome
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let reason =
            (resp.extensions().get::<hyper::ext::ReasonPhrase>()).map(|r| r.as_bytes().to_vec());
        let (status, version, headers) = (resp.status().as_u16(), resp.version(), relayed(&resp));
        let mut body = resp.into_body();
        let mut data = Vec::new();
        let mut trailers = Vec::new();
        let body = loop {
            match body.frame().await {
                None => break Ok((data, trailers)),
                Some(Err(_)) => break Err(()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            trailers = list(t);
                        }
                    }
                },
            }
        };
        Outcome::Answered {
            status,
            version,
            reason,
            headers,
            body,
        }
    }

    /// The upstream's side: reads the request head, answers `bytes`, and
    /// closes its sending half (kept open otherwise, so the client's
    /// writes still land).
    async fn upstream(mut server: DuplexStream, bytes: Vec<u8>) -> DuplexStream {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"\r\n\r\n") {
            match server.read(&mut buf).await {
                Ok(0) | Err(_) => return server,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = server.write_all(&bytes).await;
        let _ = server.shutdown().await;
        server
    }

    async fn via_hyper(bytes: Vec<u8>, method: Method) -> Outcome {
        let (client, server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(upstream(server, bytes));
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client)).await
        else {
            return Outcome::Failed;
        };
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method.clone())
            .uri("/")
            .header("host", "upstream")
            .body(Empty::new())
            .unwrap();
        let outcome = match send.send_request(req).await {
            Err(_) => Outcome::Failed,
            // As `connect.rs` refuses what hyper's client read.
            Ok(resp) if super::unrelayable(&method, resp.status(), resp.headers()) => {
                Outcome::Failed
            }
            Ok(mut resp) => {
                let status = resp.status();
                super::tidy_length(status, resp.headers_mut());
                read(resp).await
            }
        };
        drop(upstream.await);
        outcome
    }

    async fn via_lean(bytes: Vec<u8>, method: Method) -> Outcome {
        let (client, server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(upstream(server, bytes));
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("upstream"));
        let uri = Uri::from_static("/");
        let conn = Box::new(Connection::new(client, None));
        let stamp = crate::observe::trace::Context::read(&mut headers, 1.0).stamp();
        let req = Head {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: None,
            pass: false,
            stamp: &stamp,
        };
        let outcome = match conn.send(req, None, Instant::now()).await {
            Err(_) => Outcome::Failed,
            Ok(resp) => read(resp).await,
        };
        drop(upstream.await);
        outcome
    }

    async fn bounded(f: impl std::future::Future<Output = Outcome>) -> Outcome {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap_or(Outcome::Hung)
    }

    fn both(bytes: &[u8], head: bool) -> (Outcome, Outcome) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let method = if head { Method::HEAD } else { Method::GET };
        rt.block_on(async {
            let hyper = bounded(via_hyper(bytes.to_vec(), method.clone())).await;
            let lean = bounded(via_lean(bytes.to_vec(), method)).await;
            (hyper, lean)
        })
    }

    const STATUS: &[&str] = &[
        "HTTP/1.1 200 OK",
        "HTTP/1.1 200 Fine",
        "HTTP/1.0 200 OK",
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 304 Not Modified",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
        "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 404 Not Found",
        "HTTP/1.1 503 Service Unavailable",
        "HTTP/1.1 999 Odd",
        "HTTP/1.1 1000 Big",
        "HTTP/1.1 20 Short",
        "HTTP/2 200 OK",
        "HTTP/1.1 200",
        "HTTP/1.1 200 ",
        "HTTP/1.1  200 OK",
        "HTTP/1.1 200 caf\u{e9}",
        "garbage",
    ];

    const HEADERS: &[&str] = &[
        "content-length: 5",
        "Content-Length: 5",
        "content-length: 0",
        "content-length: 12",
        "content-length: 5, 5",
        "content-length: 5, 6",
        "content-length: 5\r\ncontent-length: 6",
        "content-length: +5",
        "content-length: 5 ",
        "content-length: -1",
        "content-length: 99999999999999999999",
        "content-length: 18446744073709551615",
        "content-length:",
        "transfer-encoding: chunked",
        "Transfer-Encoding: CHUNKED",
        "transfer-encoding: gzip, chunked",
        "transfer-encoding: chunked, gzip",
        "transfer-encoding: identity",
        "transfer-encoding: chunked\r\ntransfer-encoding: gzip",
        "transfer-encoding: gzip\r\ntransfer-encoding: chunked",
        "connection: close",
        "connection: keep-alive",
        "Connection: Keep-Alive, Upgrade",
        "x-a: 1",
        "x-a: 2",
        "server: nginx",
        "x-empty:",
        "x-tab: a\tb",
        "x-obs: a\r\n b",
        "bad header",
        " x-lead: 1",
        "x-trail : 1",
        "x-ctl: a\u{1}b",
        "x-high: caf\u{e9}",
        "x\u{7f}: 1",
        "content-type: text/plain",
    ];

    const BODY: &[&str] = &[
        "hello",
        "hello world!",
        "5\r\nhello\r\n",
        "0\r\n\r\n",
        "0\r\nx-t: 1\r\n\r\n",
        "0\r\nx-t: 1\r\nx-u: 2\r\n\r\n",
        "A\r\n0123456789\r\n",
        "a;ext=1\r\n0123456789\r\n",
        "5 \r\nhello\r\n",
        "5\t;x\r\nhello\r\n",
        "5\nhello\r\n",
        "5\r\nhello\n",
        "5\r\nhelloX\r\n",
        "g\r\n",
        "\r\n",
        "0\r\n",
        "0\r\n\r",
        "ffffffffffffffffff\r\n",
        "5;a\nb\r\nhello\r\n",
        "3\r\nabc\r\n",
        "0\r\nbad trailer\r\n\r\n",
        "0\r\n: v\r\n\r\n",
        "0 \r\n\r\n",
        "00000000000000003\r\nabc\r\n",
        "5 5\r\nhello\r\n",
        "5x\r\nhello\r\n",
        "5\r\r\nhello\r\n",
    ];

    /// A response from the pieces above: a status line, header lines,
    /// body pieces, and the line ending of the head (CRLF or LF).
    fn response() -> impl Strategy<Value = (Vec<u8>, bool)> {
        (
            prop::sample::select(STATUS),
            prop::collection::vec(prop::sample::select(HEADERS), 0..5),
            prop::collection::vec(prop::sample::select(BODY), 0..4),
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(status, headers, body, crlf, head)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut text = String::from(status);
                text.push_str(eol);
                for h in headers {
                    text.push_str(h);
                    text.push_str(eol);
                }
                text.push_str(eol);
                for b in body {
                    text.push_str(b);
                }
                (text.into_bytes(), head)
            })
    }

    /// Generated cases per differential test (`ALMOND_DIFF_CASES`).
    pub(crate) fn cases() -> u32 {
        std::env::var("ALMOND_DIFF_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(3000)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
        #[test]
        fn lean_frames_responses_as_hyper_does((bytes, head) in response()) {
            let (hyper, lean) = both(&bytes, head);
            prop_assert_ne!(&hyper, &Outcome::Hung);
            prop_assert_eq!(hyper, lean, "bytes: {:?}", String::from_utf8_lossy(&bytes));
        }
    }

    /// Hand-picked shapes, each checked once whatever the draw.
    #[test]
    fn smuggling_shapes_agree() {
        for bytes in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\nhello",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
            "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\n\r\nuntil close",
        ] {
            let (hyper, lean) = both(bytes.as_bytes(), false);
            assert_ne!(hyper, Outcome::Hung, "{bytes:?}");
            assert_eq!(hyper, lean, "{bytes:?}");
        }
    }

    /// A `Connection` value's options, read in one pass.
    #[test]
    fn connection_options_are_read_in_one_pass() {
        let of = |v: &'static str| Options::of(&HeaderValue::from_static(v));
        let o = |close, keep_alive, only| Options {
            close,
            keep_alive,
            only,
        };
        assert_eq!(of("keep-alive"), o(false, true, true));
        assert_eq!(of("Keep-Alive"), o(false, true, true));
        assert_eq!(of("close"), o(true, false, true));
        assert_eq!(of("keep-alive, close"), o(true, true, true));
        assert_eq!(of("close, x-secret"), o(true, false, false));
        assert_eq!(of(" keep-alive ,x"), o(false, true, false));
        assert_eq!(of("keep-alive, "), o(false, true, false));
        assert_eq!(of(""), o(false, false, false));
        // Not visible ASCII: nothing is read from it.
        let odd = HeaderValue::from_bytes(b"close, \xff").unwrap();
        assert_eq!(Options::of(&odd), Options::default());
    }

    /// What each client writes for a request: byte for byte the same.
    #[test]
    fn requests_are_written_as_hyper_writes_them() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cases: [RequestCase<'_>; 6] = [
            ("GET", "/", &[("host", "a")], ""),
            (
                "GET",
                "/p?q=1&r",
                &[("host", "a"), ("x-a", "1"), ("x-a", "2")],
                "",
            ),
            ("POST", "/submit", &[("host", "a")], "payload"),
            (
                "PUT",
                "/x",
                &[("host", "a"), ("content-length", "3")],
                "abc",
            ),
            (
                "DELETE",
                "/x",
                &[("host", "a"), ("content-length", "0")],
                "",
            ),
            (
                "GET",
                "/traced",
                &[
                    ("host", "a"),
                    ("x-request-id", "client-1"),
                    (
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
                    ("accept", "*/*"),
                ],
                "",
            ),
        ];
        for (method, uri, headers, body) in cases {
            // As `serve::handle` leaves it: the client's trace context read
            // (its `traceparent` gone), this hop's in a stamp, which hyper
            // gets in the map and the lean client writes after its lines.
            let build = || {
                let mut b = http::Request::builder().method(method).uri(uri);
                for (n, v) in headers {
                    b = b.header(*n, *v);
                }
                let mut req = b.body(Full::new(Bytes::from(body))).unwrap();
                let ctx = crate::observe::trace::Context::read(req.headers_mut(), 1.0);
                (req, ctx)
            };
            let stamp = build().1.stamp();
            let by_hyper = rt.block_on(async {
                let (client, mut server) = tokio::io::duplex(1 << 16);
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut req = build().0;
                stamp.insert(req.headers_mut());
                tokio::spawn(async move { send.send_request(req).await });
                read_request(&mut server, body.len()).await
            });
            let by_lean = rt.block_on(async {
                let (client, mut server) = tokio::io::duplex(1 << 16);
                let req = build().0;
                let sent = Bytes::from(body);
                tokio::spawn(async move {
                    let conn = Box::new(Connection::new(client, None));
                    let head = Head {
                        method: req.method(),
                        uri: req.uri(),
                        headers: req.headers(),
                        body: Some(&sent),
                        pass: false,
                        stamp: &stamp,
                    };
                    let _ = conn.send(head, None, Instant::now()).await;
                });
                read_request(&mut server, body.len()).await
            });
            assert_eq!(
                String::from_utf8_lossy(&by_hyper),
                String::from_utf8_lossy(&by_lean)
            );
        }
    }

    async fn read_request(server: &mut DuplexStream, body: usize) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                if seen.len() >= end + 4 + body {
                    return seen;
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return seen,
            }
        }
    }
}

#[cfg(test)]
mod tls {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl Stir for tokio_rustls::client::TlsStream<DuplexStream> {
        fn settle(&mut self) -> bool {
            settle_reader(self)
        }
        fn stirred(&self) -> bool {
            false
        }
    }

    /// A request body whose last TLS records could not be written yet (the
    /// upstream was not reading) reaches the upstream in full: the lean
    /// client flushes before it waits for the answer, or both sides wait
    /// for each other.
    /// A server config for `upstream` (self-signed) and a client config
    /// that trusts it.
    fn configs() -> (rustls::ServerConfig, rustls::ClientConfig) {
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = (rcgen::CertificateParams::new(vec!["upstream".to_owned()]).unwrap())
            .self_signed(&key_pair)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    /// Bytes a TLS upstream sends past its answer to `HEAD` (in the same
    /// record, the head filling the client's read: rustls decrypts them
    /// with the answer and holds them) keep
    /// the connection out of the pool; the same answer without them
    /// leaves it pooled.
    #[tokio::test]
    async fn bytes_held_decrypted_past_an_answer_keep_the_connection_out_of_the_pool() {
        for extra in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
        ] {
            let (server, client) = configs();
            let (near, far) = tokio::io::duplex(64 * 1024);
            let upstream = tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
                let mut tls = acceptor.accept(far).await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await.unwrap() {
                        0 => return tls,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                // A head of exactly the client's first read (8 KiB): what
                // follows stays with rustls, past the read.
                let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-pad: ".to_vec();
                answer.resize(8192 - 4, b'a');
                answer.extend_from_slice(b"\r\n\r\n");
                answer.extend_from_slice(extra);
                tls.write_all(&answer).await.unwrap();
                tls.flush().await.unwrap();
                tls
            });
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = ServerName::try_from("upstream").unwrap();
            let tls = connector.connect(name, near).await.unwrap();
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static("upstream"));
            let stamp = crate::observe::trace::Context::read(&mut headers, 1.0).stamp();
            let head = Head {
                method: &Method::HEAD,
                uri: &Uri::from_static("/"),
                headers: &headers,
                body: None,
                pass: false,
                stamp: &stamp,
            };
            let pool = Arc::new(Pool::new(4));
            let conn = Box::new(Connection::new(tls, None));
            let resp = conn
                .send(head, Some(pool.clone()), Instant::now())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert!(resp.body().is_end_stream());
            // Everything the upstream wrote is at the client (the pipe
            // holds it all) before the connection is judged.
            let _upstream = upstream.await.unwrap();
            drop(resp);
            let pooled = pool.pop(Instant::now(), Duration::from_secs(60)).is_some();
            assert_eq!(
                pooled,
                extra.is_empty(),
                "{:?}",
                String::from_utf8_lossy(extra)
            );
        }
    }

    #[tokio::test]
    async fn a_body_held_in_tls_records_is_flushed_before_the_answer_is_awaited() {
        const BODY: usize = 40 * 1024;
        let (server, client) = configs();
        // A pipe of 4 KiB: most of the body must wait in rustls.
        let (near, far) = tokio::io::duplex(4096);
        let upstream = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let mut tls = acceptor.accept(far).await.unwrap();
            // Not reading for a while: the client's writes fill the pipe.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
                if head_end.is_some_and(|end| got.len() >= end + 4 + BODY) {
                    break;
                }
                match tls.read(&mut buf).await.unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            got
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("upstream").unwrap();
        let tls = connector.connect(name, near).await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("upstream"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(BODY));
        let stamp = crate::observe::trace::Context::read(&mut headers, 1.0).stamp();
        let body = Bytes::from(vec![b'x'; BODY]);
        let head = Head {
            method: &Method::PUT,
            uri: &Uri::from_static("/up"),
            headers: &headers,
            body: Some(&body),
            pass: false,
            stamp: &stamp,
        };
        let conn = Box::new(Connection::new(tls, None));
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            conn.send(head, None, Instant::now()),
        )
        .await
        .expect("answered, not both sides waiting")
        .unwrap();
        assert_eq!(resp.status(), 200);
        let got = upstream.await.unwrap();
        assert!(got.ends_with(&body), "the whole body arrived");
    }
}
