//! Rescue: the one place where an error becomes a response (as
//! linkerd2-proxy's rescue layer): the status, `x-almond-error` and a
//! line of text saying what went wrong.

use crate::body::{Completion, ResponseBody};
use crate::outcome::{ErrorKind, ERROR_HEADER};
use http::{HeaderValue, Response};

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
