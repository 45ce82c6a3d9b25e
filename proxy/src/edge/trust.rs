//! Trust: what the edge believes of a client's headers -- one target
//! host or a 400, its `x-almond-*` headers only on listeners that trust
//! them, and (inbound) its address appended to `X-Forwarded-For`.

use crate::pipeline::mirror::MIRROR_HEADER;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Checks that a request names one target host (RFC 9112 3.2, RFC 9113
/// 8.3.1): at most one `Host`, a host and port and nothing else (a server
/// MUST answer 400 to an invalid one), and one that agrees with the
/// authority of an absolute-form target or `:authority`, which carries no
/// user info; an HTTP/1.1 request names one (`Host` or an absolute-form
/// target). `Err` says what is wrong.
pub fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    // Routing reads the host before the last `:`; an upstream (or an
    // app building links) would read `orders:80@evil.example` otherwise.
    if host.is_some_and(|h| !is_host_and_port(h.as_bytes())) {
        return Err("Host is not a host and port");
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err("user info in the request target's authority");
    }
    match (req.uri().authority(), host) {
        (None, None) if req.version() == Version::HTTP_11 => {
            Err("an HTTP/1.1 request without Host")
        }
        (Some(authority), Some(host))
            if !authority
                .as_str()
                .as_bytes()
                .eq_ignore_ascii_case(host.as_bytes()) =>
        {
            Err("Host disagrees with the request target's authority")
        }
        _ => Ok(()),
    }
}

/// Checks that the target's path is absolute (`/...`), or `*` for
/// `OPTIONS` only (RFC 9112 §3.2.4, RFC 9113 §8.3.1): a `GET *` (an HTTP/2
/// `:path` of `*` is taken by the `http` crate, as is an HTTP/1.1 target
/// of `*`) would meet no guard or route on a path and be sent upstream as
/// it came.
pub fn check_path<B>(req: &Request<B>) -> Result<(), &'static str> {
    let path = req.uri().path();
    let asterisk = path == "*" && req.method() == http::Method::OPTIONS;
    // A CONNECT's target is a host and port (answered 501 after this).
    if path.starts_with('/') || asterisk || req.method() == http::Method::CONNECT {
        Ok(())
    } else {
        Err("the request target's path is not absolute")
    }
}

/// Checks that a request's `Transfer-Encoding` is `chunked` alone: hyper
/// takes any list that ends in `chunked` and undoes the chunking only, and
/// the header is hop-by-hop, so `gzip, chunked` would reach the upstream
/// as gzip bytes that nothing says are gzip. A coding the proxy does not
/// apply is not implemented (RFC 9112 §6.1: SHOULD answer 501, as nginx
/// does).
pub fn check_codings<B>(req: &Request<B>) -> Result<(), &'static str> {
    let codings = req.headers().get_all(header::TRANSFER_ENCODING);
    // One `chunked` in all the lines (`chunked, chunked` is chunked twice,
    // which a sender must not do: hyper would undo it once).
    let mut chunked = 0;
    let only_chunked = codings.iter().all(|line| {
        (line.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
            .all(|c| {
                chunked += 1;
                c.eq_ignore_ascii_case(b"chunked")
            })
    }) && chunked <= 1;
    if only_chunked {
        Ok(())
    } else {
        Err("a transfer coding other than chunked")
    }
}

/// Is `value` a `Host` as RFC 9110 §7.2 has it: `uri-host [":" port]`,
/// where the host is a reg-name or IPv4 address (RFC 3986 §3.2.2: letters,
/// digits, `-._~`, `%`-escapes and sub-delims) or an IP literal in
/// brackets, and the port is digits? (Empty is a host: an empty reg-name.)
fn is_host_and_port(value: &[u8]) -> bool {
    let reg_name = |b: u8| REG_NAME[usize::from(b)];
    let (host_ok, rest) = match value.strip_prefix(b"[") {
        Some(literal) => match literal.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && literal[..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b":.".contains(&b)),
                &literal[end + 1..],
            ),
            None => return false,
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (value[..end].iter().all(|&b| reg_name(b)), &value[end..])
        }
    };
    let port_ok = match rest.split_first() {
        None => true,
        Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// The bytes of a reg-name (RFC 3986 §3.2.2: unreserved, sub-delims and
/// pct-encoding's `%`), by value: one load a byte of every request's
/// `Host`, not a search of the list for each `.`.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// Removes every client-sent `x-almond-*` header (a listener that does not
/// trust them: a pin or a forged error header from the network), but the
/// mirror's mark (`x-almond-mirror`): it routes nothing, and tells the
/// service behind an inbound listener that a request is a copy (to skip
/// its side effects), as it tells one reached directly.
pub fn strip_almond_headers(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-almond-") && *n != MIRROR_HEADER)
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Appends the peer's address to `X-Forwarded-For` and sets
/// `X-Forwarded-Proto` (inbound listeners: the service learns who called).
pub fn add_forwarded(headers: &mut HeaderMap, peer: std::net::IpAddr, proto: &'static str) {
    let xff = HeaderName::from_static("x-forwarded-for");
    // Every line the client sent, in order (one list, RFC 9110 §5.3: a
    // balancer in front may have added its own line), then the peer.
    let mut value = Vec::new();
    for line in headers.get_all(&xff) {
        let line = line.as_bytes().trim_ascii();
        if !line.is_empty() {
            value.extend_from_slice(line);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(peer.to_string().as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        // One header line, whatever the client sent.
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_that_agrees_with_the_target() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap_or_default()
        };
        assert!(check_host(&req("/", &["a"])).is_ok());
        assert!(check_host(&req("/", &[])).is_err());
        let http10 = Request::get("/").version(Version::HTTP_10).body(());
        assert!(check_host(&http10.unwrap_or_default()).is_ok());
        assert!(check_host(&req("http://a:80/", &["A:80"])).is_ok());
        assert!(check_host(&req("http://a/", &[])).is_ok());
        assert!(check_host(&req("/", &["a", "a"])).is_err());
        assert!(check_host(&req("http://a/", &["b"])).is_err());
        assert!(check_host(&req("http://a:81/", &["a"])).is_err());
        // Only a host and a port.
        for good in [
            "orders",
            "orders:8080",
            "10.0.0.1:80",
            "[::1]:80",
            "[::1]",
            "a_b.c~",
            "",
        ] {
            assert!(check_host(&req("/", &[good])).is_ok(), "{good}");
        }
        for bad in [
            "orders:80@evil.example",
            "orders:abc",
            "user@orders",
            "orders/x",
            "orders:80:81",
            "[::1",
            "[]:80",
            "[::1]x",
            "a b",
        ] {
            assert!(check_host(&req("/", &[bad])).is_err(), "{bad}");
        }
        assert!(check_host(&req("http://user@a/", &[])).is_err());
    }

    /// The table holds RFC 3986's reg-name bytes and no other.
    #[test]
    fn the_reg_name_table_is_the_rfc_s() {
        let listed = b"-._~%!$&'()*+,;=";
        for b in 0..=255u8 {
            let rfc = b.is_ascii_alphanumeric() || listed.contains(&b);
            assert_eq!(REG_NAME[usize::from(b)], rfc, "byte {b}");
        }
    }

    #[test]
    fn only_chunked_is_taken() {
        let req = |te: &[&str]| {
            let mut b = Request::post("/");
            for v in te {
                b = b.header("transfer-encoding", *v);
            }
            b.body(()).unwrap_or_default()
        };
        assert!(check_codings(&req(&[])).is_ok());
        assert!(check_codings(&req(&["chunked"])).is_ok());
        assert!(check_codings(&req(&["Chunked "])).is_ok());
        assert!(check_codings(&req(&["gzip, chunked"])).is_err());
        assert!(check_codings(&req(&["gzip", "chunked"])).is_err());
        assert!(check_codings(&req(&["identity"])).is_err());
    }

    #[test]
    fn only_absolute_paths() {
        let req = |method: &str, uri: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap_or_default()
        };
        assert!(check_path(&req("GET", "/a/b?q")).is_ok());
        assert!(check_path(&req("GET", "http://h/a")).is_ok());
        assert!(check_path(&req("OPTIONS", "*")).is_ok());
        assert!(check_path(&req("GET", "*")).is_err());
        assert!(check_path(&req("DELETE", "*")).is_err());
    }

    #[test]
    fn forwarded_for_is_appended_on_one_line() {
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        headers.append("x-forwarded-for", HeaderValue::from_static(" 203.0.113.7 "));
        add_forwarded(&mut headers, [10, 0, 0, 9].into(), "http");
        let all: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["6.6.6.6, 203.0.113.7, 10.0.0.9"]);

        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("x-almond-subset", HeaderValue::from_static("v2"));
        add_forwarded(&mut headers, [127, 0, 0, 2].into(), "https");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(headers["x-forwarded-proto"], "https");
        strip_almond_headers(&mut headers);
        assert!(headers.get("x-almond-subset").is_none());
    }
}
