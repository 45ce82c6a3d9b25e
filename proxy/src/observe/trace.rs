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
//! Everything is formatted into stack buffers: the only allocations are
//! the two `HeaderValue`s handed to the upstream. Both are marked
//! sensitive: unique to one request, so HTTP/2 sends them as never-indexed
//! literals instead of churning each HPACK table with entries nothing will
//! reuse (evicting the ones that repeat).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The request ID header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C trace context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest client-sent request ID kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// The trace context of one request, as sent upstream.
#[derive(Clone, Debug)]
pub struct Context {
    /// The request's ID (the client's or a new one).
    pub request_id: HeaderValue,
    /// The trace ID (the client's or a new one).
    pub trace_id: u128,
    /// This hop's span ID: the upstream's parent.
    pub span_id: u64,
    /// The parent span ID the client sent, if it sent a valid one.
    pub parent_id: Option<u64>,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl Context {
    /// Reads the client's request ID and trace context from `headers`,
    /// continues or starts them, and writes what the upstream should see.
    pub fn stamp(headers: &mut HeaderMap, sample_rate: f64) -> Context {
        let [has_id, has_parent, has_state] = present(headers);
        let client_id = if has_id {
            headers.get_mut(&REQUEST_ID)
        } else {
            None
        };
        let request_id = match client_id {
            Some(v) if !v.is_empty() && v.len() <= MAX_REQUEST_ID => {
                v.set_sensitive(true);
                v.clone()
            }
            _ => {
                let id = hex128(fastrand::u128(..));
                let mut v = HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"));
                v.set_sensitive(true);
                headers.insert(REQUEST_ID, v.clone());
                v
            }
        };
        let parent = has_parent
            .then(|| headers.get(&TRACEPARENT))
            .flatten()
            .and_then(|v| parse_traceparent(v.as_bytes()));
        let span_id = nonzero_u64();
        let ctx = match parent {
            Some(p) => Context {
                request_id,
                trace_id: p.trace_id,
                span_id,
                parent_id: Some(p.parent_id),
                sampled: p.flags & 1 == 1,
            },
            None => {
                if has_state {
                    headers.remove(&TRACESTATE);
                }
                Context {
                    request_id,
                    trace_id: nonzero_u128(),
                    span_id,
                    parent_id: None,
                    sampled: sample_rate >= 1.0 || fastrand::f64() < sample_rate,
                }
            }
        };
        let tp = ctx.traceparent();
        if let Ok(mut v) = HeaderValue::from_bytes(&tp) {
            v.set_sensitive(true);
            headers.insert(TRACEPARENT, v);
        }
        ctx
    }

    /// The `traceparent` this hop sends: `00-TRACE-SPAN-FLAGS`.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        out[3..35].copy_from_slice(&hex128(self.trace_id));
        out[36..52].copy_from_slice(&hex64(self.span_id));
        out[53..55].copy_from_slice(if self.sampled { b"01" } else { b"00" });
        out
    }

    /// The trace ID as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> [u8; 32] {
        hex128(self.trace_id)
    }

    /// Returns the request ID to the client.
    pub fn on_response(&self, headers: &mut HeaderMap) {
        headers.insert(REQUEST_ID, self.request_id.clone());
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
    fn a_valid_parent_is_continued_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        let ctx = Context::stamp(&mut h, 0.0);
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["tracestate"], "k=v");
        // Unique per request: never indexed by HPACK.
        assert!(h["x-request-id"].is_sensitive() && h["traceparent"].is_sensitive());
        assert!(ctx.request_id.is_sensitive());
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
        let ctx = Context::stamp(&mut h, 1.0);
        assert!(h.get("tracestate").is_none());
        assert!(ctx.sampled && ctx.parent_id.is_none());
        assert_eq!(h["x-request-id"].len(), 32);
        assert!(h["x-request-id"].is_sensitive() && h["traceparent"].is_sensitive());
        let tp = ctx.traceparent();
        assert!(parse_traceparent(&tp).is_some());
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
