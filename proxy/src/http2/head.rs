//! Heads read from HPACK fields, a request's and a response's, with their
//! `content-length`, checked as RFC 9113 §8 says.

use super::hpack::Field;
use http::header::{HeaderName, HeaderValue};
use http::{uri, HeaderMap, Method, Request, Response, StatusCode, Uri};

pub(super) enum Parsed {
    Informational,
    Head(Response<()>, Option<u64>),
    Trailers(HeaderMap),
}

/// A response head: `:status` first and alone among pseudo-fields, the
/// rest valid lowercase fields with no connection-specific ones.
pub(super) fn response_head(fields: &[Field]) -> Option<Parsed> {
    let (first, rest) = fields.split_first()?;
    if first.name != ":status" {
        return None;
    }
    let status = StatusCode::from_bytes(&first.value).ok()?;
    if status.is_informational() {
        return (status != StatusCode::SWITCHING_PROTOCOLS).then_some(Parsed::Informational);
    }
    let (headers, length) = field_map(rest, Part::Response)?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = http::Version::HTTP_2;
    *resp.headers_mut() = headers;
    Some(Parsed::Head(resp, length))
}

/// Takes one `content-length` value into `length` (the head's so far):
/// `None` for a malformed one. One plain number (RFC 9110 §8.6), or the
/// same number repeated (a list of equal values, as `h2` takes it).
fn content_length(length: Option<u64>, digits: &[u8]) -> Option<Option<u64>> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    match length {
        Some(m) if m != n => None,
        _ => Some(Some(n)),
    }
}

/// Room in a head's map for the fields the proxy adds (a response's
/// `date`, and its `x-request-id` for an HTTP/1.1 client; a request's
/// `host` or `content-length`
/// going to an HTTP/1.1 upstream), so that adding them does not usually
/// grow the map, which would move every entry.
const ADDED: usize = 3;

/// Which part of a message a list of fields is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Request,
    Response,
    Trailers,
}

/// Regular fields into a map, with a head's `content-length`, in one
/// pass; `None` for a malformed list (a request's `te` may only be
/// `trailers`, RFC 9113 §8.2.2).
pub(super) fn field_map(fields: &[Field], part: Part) -> Option<(HeaderMap, Option<u64>)> {
    let mut map = HeaderMap::with_capacity(fields.len() + ADDED);
    let mut length = None;
    for field in fields {
        let name = match &field.known {
            // A name of the static table's: valid, and allowed.
            Some(name) => name.clone(),
            None => literal_name(&field.name)?,
        };
        if name == http::header::CONTENT_LENGTH && part != Part::Trailers {
            length = content_length(length, &field.value)?;
        } else if part == Part::Request && name == http::header::TE && field.value != "trailers" {
            return None;
        }
        let mut value = HeaderValue::from_maybe_shared(field.value.clone()).ok()?;
        value.set_sensitive(field.sensitive);
        map.append(name, value);
    }
    Some((map, length))
}

/// A name not from the static table: lowercase, valid, no pseudo-field's,
/// and not connection-specific (RFC 9113 §8.2).
fn literal_name(name: &[u8]) -> Option<HeaderName> {
    if name.starts_with(b":") || name.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    let name = HeaderName::from_bytes(name).ok()?;
    let specific = matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    );
    (!specific).then_some(name)
}

/// A request head (RFC 9113 §8.3.1): the pseudo-fields first, each at most
/// once and no other: `:method`, `:scheme` and a `:path` not empty, with
/// `:authority` if there is one (a `CONNECT` has `:authority` alone); then
/// valid lowercase fields, none connection-specific, a `te` only
/// `trailers`. With its `content-length`; `None` if malformed.
pub(super) fn request_head(fields: &[Field]) -> Option<(Request<()>, Option<u64>)> {
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let regular = fields
        .iter()
        .position(|f| !f.name.starts_with(b":"))
        .unwrap_or(fields.len());
    for field in &fields[..regular] {
        let slot = match &field.name[..] {
            b":method" => &mut method,
            b":scheme" => &mut scheme,
            b":authority" => &mut authority,
            b":path" => &mut path,
            _ => return None,
        };
        if slot.replace(&field.value).is_some() {
            return None;
        }
    }
    let method = Method::from_bytes(method?).ok()?;
    let (headers, length) = field_map(&fields[regular..], Part::Request)?;
    let mut parts = uri::Parts::default();
    if let Some(authority) = authority {
        parts.authority = Some(uri::Authority::from_maybe_shared(authority.clone()).ok()?);
    }
    if method == Method::CONNECT {
        if scheme.is_some() || path.is_some() || parts.authority.is_none() {
            return None;
        }
    } else {
        let path = path.filter(|p| !p.is_empty())?;
        let scheme = uri::Scheme::try_from(&scheme?[..]).ok()?;
        // No `:authority` (a request made from an HTTP/1.1 one names its
        // host in `host`, RFC 9113 §8.3.1): the target is the path alone,
        // as `h2` makes it.
        if parts.authority.is_some() {
            parts.scheme = Some(scheme);
        }
        parts.path_and_query = Some(uri::PathAndQuery::from_maybe_shared(path.clone()).ok()?);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = Uri::from_parts(parts).ok()?;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    Some((req, length))
}

#[cfg(test)]
mod tests {
    use super::super::hpack::static_header;
    use super::*;
    use bytes::Bytes;

    /// A field as the decoder hands it out: its name from the static
    /// table if `index` says so, else literal.
    fn field(name: &'static str, value: &'static str, index: usize) -> Field {
        Field {
            name: Bytes::from_static(name.as_bytes()),
            value: Bytes::from_static(value.as_bytes()),
            sensitive: false,
            known: static_header(index),
        }
    }

    fn request(extra: Vec<Field>) -> Option<Option<u64>> {
        let mut fields = vec![
            field(":method", "POST", 0),
            field(":scheme", "http", 0),
            field(":path", "/", 0),
        ];
        fields.extend(extra);
        request_head(&fields).map(|(_, length)| length)
    }

    /// A head's `content-length` and a request's `te`, whether the name
    /// came from the static table or as a literal: one number, or the
    /// same one repeated; `te` only `trailers`.
    #[test]
    fn lengths_and_te_are_checked_in_the_one_pass() {
        for index in [0, 28] {
            let length = |v| field("content-length", v, index);
            assert_eq!(request(vec![]), Some(None));
            assert_eq!(request(vec![length("5")]), Some(Some(5)));
            assert_eq!(request(vec![length("5"), length("5")]), Some(Some(5)));
            assert_eq!(request(vec![length("5"), length("6")]), None);
            for bad in ["", "-1", "5 ", "abc", "99999999999999999999"] {
                assert_eq!(request(vec![length(bad)]), None, "{bad:?}");
            }
            let status = field(":status", "200", 0);
            let resp = response_head(&[status, length("7")]);
            assert!(matches!(resp, Some(Parsed::Head(_, Some(7)))));
        }
        assert_eq!(request(vec![field("te", "trailers", 0)]), Some(None));
        assert_eq!(request(vec![field("te", "gzip", 0)]), None);
        // Trailers: no length read (a malformed one is not looked at),
        // and a `te` is not a request's.
        let trailers = [field("content-length", "x", 28), field("te", "gzip", 0)];
        assert!(field_map(&trailers, Part::Trailers).is_some());
    }
}
