//! Headers across the hop: what RFC 9110 says a proxy must drop, and the
//! request target each upstream protocol expects.

use almond_config::Protocol;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, Version};

/// Header that pins a request to a subset (stripped before upstream).
pub const SUBSET_HEADER: &str = "x-almond-subset";
/// The same, as a name: looked up without parsing the string each time.
pub const SUBSET: HeaderName = HeaderName::from_static(SUBSET_HEADER);

/// Hop-by-hop headers (RFC 9110 7.6.1 and the legacy ones still seen), and
/// the routing header, which must not travel upstream either.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    SUBSET,
];

/// The names most heads carry, by length, in the two spellings seen on
/// the wire (lower case, and capitalized as nginx and most HTTP/1.1
/// clients write them): found by comparing bytes, where
/// `HeaderName::from_bytes` copies the name lower-cased and matches it
/// against every standard name (160 instructions a name).
#[allow(clippy::type_complexity)]
static COMMON: [&[(&[u8], &[u8], HeaderName)]; 18] = [
    &[],
    &[],
    &[],
    &[],
    &[
        (b"host", b"Host", header::HOST),
        (b"date", b"Date", header::DATE),
    ],
    &[],
    &[
        (b"server", b"Server", header::SERVER),
        (b"accept", b"Accept", header::ACCEPT),
    ],
    &[],
    &[],
    &[],
    &[
        (b"connection", b"Connection", header::CONNECTION),
        (b"user-agent", b"User-Agent", header::USER_AGENT),
    ],
    &[],
    &[(b"content-type", b"Content-Type", header::CONTENT_TYPE)],
    &[],
    &[(b"content-length", b"Content-Length", header::CONTENT_LENGTH)],
    &[],
    &[],
    &[(
        b"transfer-encoding",
        b"Transfer-Encoding",
        header::TRANSFER_ENCODING,
    )],
];

/// A header name read off the wire, as `HeaderName::from_bytes` reads it
/// (the same name, the same refusals); the common ones without its parse.
pub fn name(bytes: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    if let Some(common) = COMMON.get(bytes.len()) {
        for (lower, capitalized, name) in common.iter() {
            if bytes == *capitalized || bytes == *lower {
                return Ok(name.clone());
            }
        }
    }
    HeaderName::from_bytes(bytes)
}

/// Methods RFC 9110 calls idempotent: those a request may be sent again
/// with when it may have been processed.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Is this an HTTP/1.1 `Upgrade` request (WebSocket and the like)? Not
/// when it offers only `h2c`, the cleartext HTTP/2 upgrade that curl's
/// `--http2` and Java's `HttpClient` offer on `http://` URLs: a server
/// may decline an upgrade (RFC 9110 §7.8), and the proxy declines this
/// one as Envoy does; the request goes on as a plain one, its `Upgrade`
/// and the `HTTP2-Settings` its `Connection` names dropped as hop-by-hop.
#[inline]
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    // Most requests have no `Upgrade`: one lookup says so.
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && upgrade_offered(req.headers())
}

/// Does a request with `Upgrade` offer more than `h2c`, and name it in
/// `Connection`?
#[cold]
fn upgrade_offered(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|p| !p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    }) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The position in `HOP_BY_HOP` of a hop-by-hop (or routing) header name.
/// Names are lowercase; the length rules out almost every other header
/// before any byte is compared.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    let s = name.as_str();
    let at = match s.len() {
        10 if s == "connection" => 0,
        10 if s == "keep-alive" => 1,
        16 if s == "proxy-connection" => 2,
        19 if s == "proxy-authorization" => 3,
        2 if s == "te" => 4,
        17 if s == "transfer-encoding" => 5,
        7 if s == "upgrade" => 6,
        15 if s == SUBSET_HEADER => 7,
        _ => return None,
    };
    Some(at)
}

/// Fields a client's `Connection` cannot name away: `Host` and
/// `Content-Length` (the target and the framing), and what the proxy adds
/// for the service (`X-Forwarded-*`, whose appended peer an app may trust;
/// the request's trace context). RFC 9110 §7.6.1 has a proxy remove the
/// fields it received so named, not the ones it sends.
const KEPT: [&str; 6] = [
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "traceparent",
];

/// Drops hop-by-hop headers, including those that `Connection` names.
/// Returns the `Upgrade` value when `keep_upgrade` and one was present.
/// Most messages carry none, or only `connection: keep-alive`: one pass
/// over the names (no hashing, no allocation) finds out which to remove.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> Option<HeaderValue> {
    let mut found = 0u8;
    for name in headers.keys() {
        if let Some(at) = hop_by_hop(name) {
            found |= 1 << at;
        }
    }
    if found == 0 {
        return None;
    }
    let upgrade = if keep_upgrade && found & (1 << 6) != 0 {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if found & 1 != 0 {
        found &= !1;
        // `Connection` goes, and the headers it names are hop-by-hop too
        // (`keep-alive` and `close` are options, not names: in the common
        // case nothing is collected and nothing allocated). One lookup.
        let mut named: Vec<HeaderName> = Vec::new();
        if let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
            for value in entry.remove_entry_mult().1 {
                let tokens = value.to_str().unwrap_or("").split(',').map(str::trim);
                for t in tokens {
                    if t.eq_ignore_ascii_case("keep-alive") || t.eq_ignore_ascii_case("close") {
                        continue;
                    }
                    // What frames the message, names its target, or is this
                    // hop's own word (the peer's address) is not the
                    // client's to take away.
                    if KEPT.iter().any(|k| t.eq_ignore_ascii_case(k)) {
                        continue;
                    }
                    if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
                        named.push(name);
                    }
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (at, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << at) != 0 {
            headers.remove(name);
        }
    }
    // A length beside a transfer coding is no length: an intermediary
    // removes it before forwarding (RFC 9112 §6.3), as the message's next
    // framing is the proxy's.
    if found & (1 << 5) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    upgrade
}

/// HTTP/2 lets a client split `Cookie` into several fields; HTTP/1.1 has
/// one line, its pairs joined by `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Readies a request for the upstream: hop-by-hop and routing headers
/// gone, the target in the form the protocol wants (origin-form and `Host`
/// for HTTP/1.1; absolute with `:authority` for HTTP/2).
pub fn to_upstream<B>(req: &mut Request<B>, protocol: Protocol, upgrade: bool) {
    // Only HTTP/2 passes `te: trailers` on (a lookup spared on HTTP/1.1).
    let trailers = protocol == Protocol::Http2
        && (req.headers().get(header::TE))
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let headers = req.headers_mut();
    let upgrade_value = strip_hop_by_hop(headers, upgrade);
    if let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
    match protocol {
        Protocol::Http1 => {
            if req.uri().authority().is_some() {
                // The target's authority is what routing used: the upstream
                // gets it as its one `Host`.
                let authority = req.uri().authority().map(|a| a.as_str().to_owned());
                if let Some(a) = authority {
                    if let Ok(v) = HeaderValue::from_str(&a) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
                let path = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from(path);
            }
            if req.version() == Version::HTTP_2 {
                join_cookies(req.headers_mut());
            }
            *req.version_mut() = Version::HTTP_11;
        }
        Protocol::Http2 => {
            // gRPC needs `te: trailers`; HTTP/2 allows exactly that value.
            if trailers {
                req.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            if req.uri().authority().is_none() {
                let host = req.headers_mut().remove(header::HOST);
                let authority = host
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                    .unwrap_or_else(|| Authority::from_static("localhost"));
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(authority);
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(PathAndQuery::from_static("/"));
                }
                *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
            } else {
                req.headers_mut().remove(header::HOST);
            }
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// Drops what HTTP/2 forbids in a message: connection-specific fields
/// (RFC 9113 §8.2.2), and the fields `Connection` names.
pub fn for_h2(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, false);
}

/// Readies an upstream response for the client: hop-by-hop headers gone,
/// except the `Upgrade` handshake of a 101.
pub fn from_upstream<B>(resp: &mut Response<B>) {
    // A proxy sends its own version (RFC 9110 §2.5): an HTTP/1.0 service's
    // answer reaches an HTTP/1.1 client as HTTP/1.1, kept alive and framed
    // (chunked when the service gave no length); the edge still answers an
    // HTTP/1.0 client as HTTP/1.0.
    if resp.version() == Version::HTTP_10 {
        *resp.version_mut() = Version::HTTP_11;
    }
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = strip_hop_by_hop(resp.headers_mut(), switching);
    if let Some(value) = upgrade {
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The common names come out as `HeaderName::from_bytes` makes them,
    /// whatever their case; every other name, valid or not, as it does.
    #[test]
    fn names_read_off_the_wire_are_http_s() {
        for (len, common) in COMMON.iter().enumerate() {
            for (lower, capitalized, name) in common.iter() {
                assert_eq!((lower.len(), capitalized.len()), (len, len));
                assert_eq!(name.as_str().as_bytes(), *lower);
                assert!(capitalized.eq_ignore_ascii_case(lower));
                let upper = lower.to_ascii_uppercase();
                for spelled in [lower.to_vec(), capitalized.to_vec(), upper] {
                    assert_eq!(
                        super::name(&spelled).ok(),
                        HeaderName::from_bytes(&spelled).ok()
                    );
                }
            }
        }
        for other in [
            &b"X-Request-Id"[..],
            b"hOsT",
            b"hos\xf4",
            b"host ",
            b"",
            b"content-lengt",
            b"x y",
            b"Content-Length\0",
        ] {
            assert_eq!(
                super::name(other).ok(),
                HeaderName::from_bytes(other).ok(),
                "{other:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_and_named_headers_are_dropped() {
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header("host", "orders")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("x-almond-subset", "v2")
            .header("x-kept", "yes")
            .body(())
            .unwrap_or_default();
        to_upstream(&mut req, Protocol::Http1, false);
        let h = req.headers();
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none() && h.get("x-almond-subset").is_none());
        assert_eq!(h.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        assert_eq!(req.uri(), "/a?b=1");
    }

    #[test]
    fn every_hop_by_hop_name_is_dropped_and_look_alikes_are_kept() {
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP.iter() {
            h.insert(name.clone(), HeaderValue::from_static("x"));
        }
        // Same lengths as hop-by-hop names, other bytes.
        for kept in [
            "tx",
            "upgrades",
            "connectio1",
            "x-almond-subsex",
            "content-encoding",
        ] {
            h.insert(
                HeaderName::from_static(kept),
                HeaderValue::from_static("kept"),
            );
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("close, tx"));
        assert_eq!(
            strip_hop_by_hop(&mut h, true),
            Some(HeaderValue::from_static("x"))
        );
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(h.get("tx").is_none(), "named by Connection");
        for kept in [
            "upgrades",
            "connectio1",
            "x-almond-subsex",
            "content-encoding",
        ] {
            assert_eq!(h[kept], "kept");
        }
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        assert_eq!(strip_hop_by_hop(&mut plain, true), None);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn h1_to_h2_moves_host_to_authority_and_keeps_te_trailers() {
        let mut req = Request::builder()
            .uri("/pkg.Svc/Call")
            .header("host", "orders:4140")
            .header("te", "trailers")
            .body(())
            .unwrap_or_default();
        to_upstream(&mut req, Protocol::Http2, false);
        assert_eq!(req.uri(), "http://orders:4140/pkg.Svc/Call");
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.headers()["te"], "trailers");
        assert_eq!(req.version(), Version::HTTP_2);
    }

    #[test]
    fn h2_to_h1_moves_authority_to_host() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://orders/x")
            .body(())
            .unwrap_or_default();
        to_upstream(&mut req, Protocol::Http1, false);
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()["host"], "orders");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn an_offer_of_h2c_alone_is_no_upgrade() {
        let offer = |upgrade: &str| {
            Request::builder()
                .uri("/")
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", upgrade)
                .body(())
                .unwrap_or_default()
        };
        assert!(!is_upgrade(&offer("h2c")));
        assert!(!is_upgrade(&offer("H2C")));
        assert!(is_upgrade(&offer("h2c, websocket")));
        assert!(is_upgrade(&offer("websocket")));
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut req = Request::builder()
            .uri("/ws")
            .header("host", "chat")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap_or_default();
        assert!(is_upgrade(&req));
        to_upstream(&mut req, Protocol::Http1, true);
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
    }
}
