//! Trust: what the edge believes of a client's headers -- one target
//! host or a 400, its `x-almond-*` headers only on listeners that trust
//! them, and (inbound) its address appended to `X-Forwarded-For`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Checks that a request names one target host (RFC 9112 3.2, RFC 9113
/// 8.3.1): at most one `Host`, and one that agrees with the authority of an
/// absolute-form target or `:authority`; an HTTP/1.1 request names one
/// (`Host` or an absolute-form target). `Err` says what is wrong.
pub fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
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

/// Removes every client-sent `x-almond-*` header (a listener that does not
/// trust them: a pin or a forged error header from the network).
pub fn strip_almond_headers(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-almond-"))
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
    let peer = peer.to_string();
    let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {peer}"),
        _ => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
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
    }

    #[test]
    fn forwarded_for_is_appended_on_one_line() {
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
