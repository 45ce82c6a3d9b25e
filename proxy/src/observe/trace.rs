//! Trace: request IDs and W3C trace context, stamped on each request
//! before it is routed (so error answers carry them too), by `serve`.
//!
//! - `x-request-id` is kept when the client sent one, generated otherwise
//!   (128 random bits as hex), passed upstream and returned downstream.
//! - `traceparent` (W3C Trace Context level 1) is continued when valid: same
//!   trace ID, a new span ID (this proxy's hop) as the upstream's parent,
//!   the flags kept. When absent or invalid a trace is started and sampled
//!   at `tracing.sample_rate`; an invalid parent's `tracestate` is dropped.
//!
//! Everything is formatted into stack buffers. What this hop adds to the
//! request (a request ID it made, its `traceparent`) is a [`Stamp`], not
//! header values: the lean HTTP/1.1 client writes it after the request's
//! lines, the HTTP/2 client encodes its fields (`Stamp::fields`) into the
//! head, and only the paths that send a header map make values of it
//! (`Stamp::insert`). HTTP/2 sends both fields as never-indexed literals
//! (the map's values are marked sensitive): unique to one request, they
//! would churn each HPACK table with entries nothing will reuse (evicting
//! the ones that repeat).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The request ID header's name, for heads written field by field.
pub const REQUEST_ID_NAME: &str = "x-request-id";
/// The request ID header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_NAME);
/// The W3C trace context header's name, as [`REQUEST_ID_NAME`].
const TRACEPARENT_NAME: &str = "traceparent";
/// The W3C trace context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_NAME);
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest client-sent request ID kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// A request's ID: the client's (which stays in the request's headers), or
/// one made here (which the request's [`Stamp`] carries up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestId {
    /// Sent by the client.
    Client(HeaderValue),
    /// Made here: 128 random bits as hex.
    Made([u8; 32]),
}

impl RequestId {
    /// The ID's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Client(v) => v.as_bytes(),
            RequestId::Made(id) => id,
        }
    }

    /// The ID as a (sensitive) header value: an allocation for a made one.
    pub fn to_value(&self) -> HeaderValue {
        match self {
            RequestId::Client(v) => v.clone(),
            RequestId::Made(id) => sensitive(id),
        }
    }
}

/// What this hop adds to a request on its way up: the request ID it made
/// (a client's stays in the request's headers) and its `traceparent`.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    made_id: Option<[u8; 32]>,
    traceparent: [u8; 55],
}

impl Stamp {
    /// Puts the stamp in `headers` (the paths that send a header map:
    /// hyper's client, for upgrades and HTTP/1.1 requests the lean client
    /// does not take, and a tap's copy); again is the same.
    pub fn insert(&self, headers: &mut HeaderMap) {
        if let Some(id) = &self.made_id {
            headers.insert(REQUEST_ID, sensitive(id));
        }
        headers.insert(TRACEPARENT, sensitive(&self.traceparent));
    }

    /// Appends the stamp as header lines (the lean HTTP/1.1 client's
    /// head, whose header map holds neither).
    pub fn write(&self, out: &mut Vec<u8>) {
        if let Some(id) = &self.made_id {
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(id);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&self.traceparent);
        out.extend_from_slice(b"\r\n");
    }

    /// The stamp's fields, names and values, in the order of
    /// [`Stamp::write`] (the HTTP/2 client's head encodes them straight
    /// in, never indexed, as [`Stamp::insert`]'s sensitive values are).
    pub fn fields(&self) -> Fields<'_> {
        let id = self.made_id.as_ref().map_or(&[][..], |id| &id[..]);
        Fields {
            pairs: [
                (REQUEST_ID_NAME.as_bytes(), id),
                (TRACEPARENT_NAME.as_bytes(), &self.traceparent[..]),
            ],
            skip: usize::from(self.made_id.is_none()),
        }
    }

    /// The bytes [`Stamp::write`] appends, at most.
    pub const MAX_LEN: usize = 16 + 32 + 15 + 55;
}

/// A [`Stamp`]'s fields (see [`Stamp::fields`]).
pub struct Fields<'a> {
    pairs: [(&'static [u8], &'a [u8]); 2],
    /// 1 when the client's own request ID went up in its head.
    skip: usize,
}

impl<'a> Fields<'a> {
    /// The fields, names and values.
    pub fn as_slice(&self) -> &[(&'static [u8], &'a [u8])] {
        &self.pairs[self.skip..]
    }
}

/// A header value of bytes made here (hex and dashes), marked sensitive.
fn sensitive(bytes: &[u8]) -> HeaderValue {
    let mut v = HeaderValue::from_bytes(bytes).unwrap_or(HeaderValue::from_static("0"));
    v.set_sensitive(true);
    v
}

/// A client's request ID is kept when it is at most [`MAX_REQUEST_ID`]
/// visible ASCII characters, none of them a quote, a backslash or a comma
/// (a UUID, hex, base64 or a ULID pass): one that could split a log field
/// or read as a list is replaced.
fn valid_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|&b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b','))
}

/// The trace context of one request, as sent upstream.
#[derive(Clone, Debug)]
pub struct Context {
    /// The request's ID (the client's or a new one).
    pub request_id: RequestId,
    /// The trace ID (the client's or a new one).
    pub trace_id: u128,
    /// This hop's span ID: the upstream's parent.
    pub span_id: u64,
    /// The parent span ID the client sent, if it sent a valid one.
    pub parent_id: Option<u64>,
    /// Whether the trace is sampled.
    pub sampled: bool,
    /// The trace flags sent on: the client's sampled and random-trace-ID
    /// bits (W3C levels 1 and 2; undefined bits are sent as 0, as the
    /// specification asks), else `sampled` alone.
    pub flags: u8,
}

impl Context {
    /// Reads the client's request ID and trace context from `headers`,
    /// and continues or starts them. `headers` keeps a valid client ID
    /// (marked sensitive), loses the client's `traceparent` (this hop's,
    /// in [`Context::stamp`], replaces it) and, when that was invalid, its
    /// `tracestate`.
    pub fn read(headers: &mut HeaderMap, sample_rate: f64) -> Context {
        let [has_id, has_parent, has_state] = present(headers);
        // The client's ID only if it sent one (two would reach the app
        // unchecked, and its logs would disagree with ours).
        let client_id = if has_id && headers.get_all(&REQUEST_ID).iter().nth(1).is_none() {
            headers.get_mut(&REQUEST_ID)
        } else {
            None
        };
        let request_id = match client_id {
            Some(v) if valid_request_id(v.as_bytes()) => {
                v.set_sensitive(true);
                RequestId::Client(v.clone())
            }
            _ => {
                if has_id {
                    headers.remove(&REQUEST_ID);
                }
                RequestId::Made(hex128(fastrand::u128(..)))
            }
        };
        let parent = if has_parent {
            // Two `traceparent` fields are no valid one (W3C Trace
            // Context: it is not a list): a new trace starts.
            let mut all = headers.get_all(&TRACEPARENT).iter();
            let parent = match (all.next(), all.next()) {
                (Some(v), None) => parse_traceparent(v.as_bytes()),
                _ => None,
            };
            headers.remove(&TRACEPARENT);
            parent
        } else {
            None
        };
        let span_id = nonzero_u64();
        match parent {
            Some(p) => Context {
                request_id,
                trace_id: p.trace_id,
                span_id,
                parent_id: Some(p.parent_id),
                sampled: p.flags & 1 == 1,
                flags: p.flags & KNOWN_FLAGS,
            },
            None => {
                if has_state {
                    headers.remove(&TRACESTATE);
                }
                let sampled = sample_rate >= 1.0 || fastrand::f64() < sample_rate;
                Context {
                    request_id,
                    trace_id: nonzero_u128(),
                    span_id,
                    parent_id: None,
                    sampled,
                    flags: u8::from(sampled),
                }
            }
        }
    }

    /// What this hop adds to the request on its way up.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            made_id: match self.request_id {
                RequestId::Made(id) => Some(id),
                RequestId::Client(_) => None,
            },
            traceparent: self.traceparent(),
        }
    }

    /// The `traceparent` this hop sends: `00-TRACE-SPAN-FLAGS`.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        out[3..35].copy_from_slice(&hex128(self.trace_id));
        out[36..52].copy_from_slice(&hex64(self.span_id));
        out[53..55].copy_from_slice(&hex8(self.flags));
        out
    }

    /// The trace ID as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> [u8; 32] {
        hex128(self.trace_id)
    }

    /// Returns the request ID to the client.
    pub fn on_response(&self, headers: &mut HeaderMap) {
        headers.insert(REQUEST_ID, self.request_id.to_value());
    }
}

/// Which of `x-request-id`, `traceparent` and `tracestate` the request
/// carries: one pass over its names, compared by length first, since most
/// requests carry none and a lookup that misses still hashes the name.
fn present(headers: &HeaderMap) -> [bool; 3] {
    let mut seen = [false; 3];
    for name in headers.keys() {
        let s = name.as_str();
        match s.len() {
            12 if s == REQUEST_ID.as_str() => seen[0] = true,
            11 if s == TRACEPARENT.as_str() => seen[1] = true,
            10 if s == TRACESTATE.as_str() => seen[2] = true,
            _ => {}
        }
    }
    seen
}

/// A valid incoming `traceparent`.
#[derive(Debug, PartialEq, Eq)]
struct Parent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

/// Parses a `traceparent` per W3C Trace Context: version 00 is exactly 55
/// bytes; later versions may append `-...`; version `ff`, uppercase hex and
/// all-zero IDs are invalid.
fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = u8::try_from(parse_hex(&v[..2])?).ok()?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = parse_hex(&v[3..35])?;
    let parent_id = u64::try_from(parse_hex(&v[36..52])?).ok()?;
    let flags = u8::try_from(parse_hex(&v[53..55])?).ok()?;
    (trace_id != 0 && parent_id != 0).then_some(Parent {
        trace_id,
        parent_id,
        flags,
    })
}

/// Lowercase hex (as the spec requires) of up to 32 digits.
fn parse_hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &d| {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(n))
    })
}

/// Two lowercase hex digits for every byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    pairs
};

/// `N` big-endian bytes as `2 * N` lowercase hex digits (`M` = `2 * N`).
fn hex_bytes<const N: usize, const M: usize>(bytes: [u8; N]) -> [u8; M] {
    let mut out = [0u8; M];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
    out
}

pub(crate) fn hex128(n: u128) -> [u8; 32] {
    hex_bytes(n.to_be_bytes())
}

fn hex64(n: u64) -> [u8; 16] {
    hex_bytes(n.to_be_bytes())
}

fn hex8(n: u8) -> [u8; 2] {
    hex_bytes([n])
}

/// The trace flags W3C defines: sampled (level 1), random trace ID
/// (level 2).
const KNOWN_FLAGS: u8 = 0x03;

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_clients_trace_flags_go_on() {
        for (sent, kept) in [
            ("01", "01"),
            ("03", "03"),
            ("02", "02"),
            ("00", "00"),
            ("ff", "03"),
        ] {
            let mut h = HeaderMap::new();
            let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{sent}");
            h.insert(TRACEPARENT, HeaderValue::from_str(&tp).unwrap());
            let ctx = Context::read(&mut h, 0.0);
            let up = ctx.traceparent();
            assert_eq!(&up[53..], kept.as_bytes(), "{sent}");
        }
    }

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        let ctx = Context::read(&mut h, 0.0);
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["tracestate"], "k=v");
        assert!(h.get("traceparent").is_none(), "the stamp's replaces it");
        ctx.stamp().insert(&mut h);
        assert_eq!(h["x-request-id"], "abc");
        // Unique per request: never indexed by HPACK.
        assert!(h["x-request-id"].is_sensitive() && h["traceparent"].is_sensitive());
        assert!(ctx.request_id.to_value().is_sensitive());
        let sent = h["traceparent"].to_str().unwrap_or_default().to_owned();
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(sent.ends_with("-01") && sent != TP);
        assert_eq!(ctx.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        assert!(ctx.sampled);
    }

    #[test]
    fn invalid_parents_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(parse_traceparent(future.as_bytes()).is_some());

        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let ctx = Context::read(&mut h, 1.0);
        assert!(h.get("tracestate").is_none() && h.get("traceparent").is_none());
        assert!(ctx.sampled && ctx.parent_id.is_none());
        let stamp = ctx.stamp();
        stamp.insert(&mut h);
        assert_eq!(h["x-request-id"].len(), 32);
        assert_eq!(h["x-request-id"].as_bytes(), ctx.request_id.as_bytes());
        assert!(h["x-request-id"].is_sensitive() && h["traceparent"].is_sensitive());
        let tp = ctx.traceparent();
        assert!(parse_traceparent(&tp).is_some());
        // Written as lines, the stamp is what the map would hold.
        let mut lines = Vec::new();
        stamp.write(&mut lines);
        let expected = format!(
            "x-request-id: {}\r\ntraceparent: {}\r\n",
            h["x-request-id"].to_str().unwrap_or_default(),
            h["traceparent"].to_str().unwrap_or_default()
        );
        assert_eq!(String::from_utf8_lossy(&lines), expected);
        assert!(lines.len() <= Stamp::MAX_LEN);
    }

    #[test]
    fn a_client_id_too_long_is_replaced_by_a_made_one() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_bytes(&[b'a'; 200]).unwrap());
        let ctx = Context::read(&mut h, 0.0);
        assert!(h.get("x-request-id").is_none(), "the client's is gone");
        assert!(matches!(ctx.request_id, RequestId::Made(_)));
        ctx.stamp().insert(&mut h);
        assert_eq!(h["x-request-id"].as_bytes(), ctx.request_id.as_bytes());
    }

    /// Two IDs, or one that could split a log field or read as a list:
    /// every one the client sent is replaced. A UUID is kept.
    #[test]
    fn a_client_id_must_be_one_plain_token() {
        let read = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
            }
            let ctx = Context::read(&mut h, 0.0);
            (ctx, h.get_all("x-request-id").iter().count())
        };
        let (ctx, kept) = read(&[b"0d6f1a5e-8f43-4a7c-9d0b-5f2e1c3a4b6d"]);
        assert!(matches!(ctx.request_id, RequestId::Client(_)));
        assert_eq!(kept, 1);
        for bad in [
            &[&b"a"[..], b"b"][..],
            &[b"a\tforged"],
            &[b"a, b"],
            &[b"say \"hi\""],
        ] {
            let (ctx, kept) = read(bad);
            assert!(matches!(ctx.request_id, RequestId::Made(_)), "{bad:?}");
            assert_eq!(kept, 0, "{bad:?}");
        }
    }

    /// Two `traceparent` fields are no valid one: a new trace.
    #[test]
    fn two_traceparents_start_a_new_trace() {
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_bytes(parent).unwrap());
        h.append(TRACEPARENT, HeaderValue::from_bytes(parent).unwrap());
        let ctx = Context::read(&mut h, 0.0);
        assert_ne!(ctx.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert!(ctx.parent_id.is_none());
        assert!(h.get("traceparent").is_none());
    }

    #[test]
    fn hex_round_trips() {
        let n = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        assert_eq!(parse_hex(&hex128(n)), Some(n));
        assert_eq!(parse_hex(&hex64(42)), Some(42));
        assert_eq!(&hex64(0x00f0_67aa_0ba9_02b7), b"00f067aa0ba902b7");
        assert_eq!(
            &hex128(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            b"4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
