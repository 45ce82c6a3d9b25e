//! Rescue: the one place where an error becomes a response (as
//! linkerd2-proxy's rescue layer): the status, `x-almond-error` and a
//! line of text saying what went wrong; for a gRPC client, the same as a
//! trailers-only gRPC answer.

use crate::body::{Completion, ResponseBody};
use crate::outcome::{ErrorKind, ERROR_HEADER};
use almond_config::GrpcCode;
use http::{header, HeaderValue, Response, StatusCode};

/// An error the client gets an answer for.
pub trait Rescue {
    /// The response; `detail` names the service or subset concerned.
    fn response<C: Completion>(self, detail: &str) -> Response<ResponseBody<C>>;
}

impl Rescue for ErrorKind {
    fn response<C: Completion>(self, detail: &str) -> Response<ResponseBody<C>> {
        let text = match self {
            ErrorKind::Connect => format!("almond: cannot connect to {detail}\n"),
            ErrorKind::ConnectTimeout => format!("almond: connect to {detail} timed out\n"),
            ErrorKind::Timeout => format!("almond: {detail} did not answer in time\n"),
            ErrorKind::Reset => format!("almond: connection to {detail} was reset\n"),
            ErrorKind::ClientTimeout => {
                format!("almond: the request body for {detail} stopped arriving\n")
            }
            ErrorKind::Overloaded => format!("almond: {detail} is at its concurrency limit\n"),
            ErrorKind::NoEndpoints => format!("almond: no endpoints available for {detail}\n"),
            ErrorKind::UnknownService => format!("almond: unknown service {detail:?}\n"),
            ErrorKind::NotReady => {
                format!(
                    "almond: no configuration from the control plane yet (asked for {detail:?})\n"
                )
            }
            ErrorKind::UnknownSubset => format!("almond: unknown subset {detail:?}\n"),
            ErrorKind::BadRequest => format!("almond: bad request: {detail}\n"),
            ErrorKind::Forbidden => format!("almond: {detail} is not allowed here\n"),
            ErrorKind::Unsupported => format!("almond: {detail} is not forwarded\n"),
        };
        let mut resp = Response::new(ResponseBody::full(text));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self == ErrorKind::Overloaded {
            headers.insert("x-almond-overloaded", HeaderValue::from_static("true"));
        }
        if self == ErrorKind::NotReady {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The proxy's own answer `resp` (an error, a guard's refusal) in the
/// form a gRPC client reads: a trailers-only answer, HTTP 200 with
/// `grpc-status` and `grpc-message` (the text line, percent-encoded) and
/// no body, as Envoy's and Linkerd's local replies to gRPC calls are.
/// Without it a gRPC client guesses a status from the HTTP one and loses
/// the reason (a 504 reads as `UNAVAILABLE`, which its retry policy
/// sends again). An upstream's answer, or a local one under 400, is left
/// as it is.
pub fn for_grpc<C: Completion>(resp: &mut Response<ResponseBody<C>>) {
    if resp.status().as_u16() < 400 {
        return;
    }
    let Some(text) = resp.body_mut().take_local() else {
        return;
    };
    let reason = resp.headers().get(ERROR_HEADER).map(HeaderValue::as_bytes);
    let code = match reason {
        Some(b"rate-limited") => GrpcCode::ResourceExhausted,
        reason => (reason.and_then(ErrorKind::of_reason)).map_or_else(
            || GrpcCode::of_http_status(resp.status().as_u16()),
            ErrorKind::grpc_code,
        ),
    };
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code as u8)));
    if let Ok(message) = HeaderValue::from_bytes(&percent_encoded(text.trim_ascii())) {
        headers.insert("grpc-message", message);
    }
}

/// `text` as a `grpc-message` carries it: printable ASCII but `%` as it
/// is, every other byte as `%XX`.
fn percent_encoded(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encoded(b"a 100% done"), b"a 100%25 done".to_vec());
        assert_eq!(
            percent_encoded("caf\u{e9}\n".as_bytes()),
            b"caf%C3%A9%0A".to_vec()
        );
    }
}
