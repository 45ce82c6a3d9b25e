//! Classify each request's outcome once, into closed enums.
//!
//! The same [`ErrorKind`] picks the response status, the `x-almond-error`
//! header, the metric label and the retry decision; [`CodeClass`] is the
//! `code_class` label. `rescue` turns an [`ErrorKind`] into a response.

use almond_config::GrpcCode;
use http::{HeaderMap, HeaderName, StatusCode};

/// The header naming why the proxy answered a request itself.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-almond-error");

/// The header carrying a gRPC call's status (trailers, or the headers of
/// a trailers-only response).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Is this request a gRPC call (`content-type: application/grpc`, or
/// `application/grpc+proto` and the like)?
#[inline]
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const PREFIX: &[u8] = b"application/grpc";
    headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .is_some_and(|v| {
            v.len() >= PREFIX.len()
                && v[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
                && matches!(v.get(PREFIX.len()), None | Some(b'+' | b';'))
        })
}

/// The `grpc-status` in `headers`, if any; a value that is not a code
/// (0 to 16) reads as `UNKNOWN`, as gRPC clients read it.
#[inline]
pub fn grpc_status(headers: &HeaderMap) -> Option<GrpcCode> {
    let value = headers.get(GRPC_STATUS)?;
    let code = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .and_then(GrpcCode::from_number);
    Some(code.unwrap_or(GrpcCode::Unknown))
}

/// A try ran out of time (it may have been sent): what the per-try
/// timeout (`upstream/timeout.rs`) ends a try with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// The `code_class` label: the upstream's status class, or `error` when no
/// upstream response arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CodeClass {
    /// 1xx
    Informational = 0,
    /// 2xx
    Success = 1,
    /// 3xx
    Redirection = 2,
    /// 4xx
    ClientError = 3,
    /// 5xx
    ServerError = 4,
    /// No response from the upstream (the proxy answered).
    Error = 5,
}

impl CodeClass {
    /// How many classes there are.
    pub const COUNT: usize = 6;
    /// Every class, in label order.
    pub const ALL: [CodeClass; CodeClass::COUNT] = [
        CodeClass::Informational,
        CodeClass::Success,
        CodeClass::Redirection,
        CodeClass::ClientError,
        CodeClass::ServerError,
        CodeClass::Error,
    ];

    /// The class of an upstream status.
    #[inline]
    pub fn of(status: StatusCode) -> CodeClass {
        match status.as_u16() {
            100..=199 => CodeClass::Informational,
            200..=299 => CodeClass::Success,
            300..=399 => CodeClass::Redirection,
            400..=499 => CodeClass::ClientError,
            _ => CodeClass::ServerError,
        }
    }

    /// The `code_class` label value.
    pub fn label(self) -> &'static str {
        match self {
            CodeClass::Informational => "1xx",
            CodeClass::Success => "2xx",
            CodeClass::Redirection => "3xx",
            CodeClass::ClientError => "4xx",
            CodeClass::ServerError => "5xx",
            CodeClass::Error => "error",
        }
    }

    /// The `outcome` label: 5xx and errors are failures (4xx is the
    /// client's doing, as in Linkerd's classification).
    pub fn outcome_label(self) -> &'static str {
        match self {
            CodeClass::ServerError | CodeClass::Error => "failure",
            _ => "success",
        }
    }
}

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The endpoint refused or failed the TCP connection.
    Connect,
    /// The TCP connection did not complete within `timeouts.connect`.
    ConnectTimeout,
    /// No response headers within `timeouts.request`.
    Timeout,
    /// The connection or stream broke before a response.
    Reset,
    /// The client sent no byte of its request body for `limits.body_idle`.
    ClientTimeout,
    /// The service is at its concurrency limit.
    Overloaded,
    /// The chosen subset has no endpoint to send to.
    NoEndpoints,
    /// `Host` / `:authority` names no known service.
    UnknownService,
    /// No configuration yet: a following proxy before its first snapshot
    /// (or its cache), which knows no service at all.
    NotReady,
    /// `x-almond-subset` names no subset of the service.
    UnknownSubset,
    /// The request cannot be proxied (no host, bad upgrade).
    BadRequest,
    /// The client's certificate identity is not in the listener's `allow`.
    Forbidden,
    /// A method the proxy does not forward (`CONNECT`: almond routes by
    /// service, it is no forward proxy).
    Unsupported,
}

impl ErrorKind {
    /// Does a try's outcome say something of the endpoint it went to? Its
    /// answer, or its connection's failure, does; a local limit that shed
    /// the try, or a client that stalled its own upload, says nothing, and
    /// counts neither as a failure nor as a success (which would end a run
    /// of failures, or return an ejected endpoint that never answered).
    pub fn about_endpoint(result: Result<u16, ErrorKind>) -> bool {
        matches!(
            result,
            Ok(_)
                | Err(ErrorKind::Connect
                    | ErrorKind::ConnectTimeout
                    | ErrorKind::Timeout
                    | ErrorKind::Reset)
        )
    }

    /// The kinds counted in `almond_upstream_errors_total`, in index order.
    pub const UPSTREAM_KINDS: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Overloaded,
        ErrorKind::NoEndpoints,
    ];

    /// The `kind` label of `almond_upstream_errors_total`, if counted there.
    pub fn metric_kind(self) -> Option<&'static str> {
        match self {
            ErrorKind::Connect => Some("connect"),
            ErrorKind::ConnectTimeout | ErrorKind::Timeout => Some("timeout"),
            ErrorKind::Reset => Some("reset"),
            ErrorKind::Overloaded => Some("overloaded"),
            ErrorKind::NoEndpoints => Some("no_endpoints"),
            _ => None,
        }
    }

    /// Index into [`Self::UPSTREAM_KINDS`].
    pub fn upstream_index(self) -> Option<usize> {
        match self {
            ErrorKind::Connect => Some(0),
            ErrorKind::ConnectTimeout | ErrorKind::Timeout => Some(1),
            ErrorKind::Reset => Some(2),
            ErrorKind::Overloaded => Some(3),
            ErrorKind::NoEndpoints => Some(4),
            _ => None,
        }
    }

    /// The `code_class` the proxy's own answer counts as: `4xx` when the
    /// client caused it (a stalled or broken upload), else `error`.
    pub fn code_class(self) -> CodeClass {
        match self {
            ErrorKind::ClientTimeout | ErrorKind::BadRequest | ErrorKind::Unsupported => {
                CodeClass::ClientError
            }
            _ => CodeClass::Error,
        }
    }

    /// The status the client gets.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::Connect | ErrorKind::Reset => StatusCode::BAD_GATEWAY,
            ErrorKind::ConnectTimeout | ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Overloaded
            | ErrorKind::NoEndpoints
            | ErrorKind::UnknownSubset
            | ErrorKind::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UnknownService => StatusCode::NOT_FOUND,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The `grpc-status` a gRPC client gets with the proxy's own answer
    /// (as Envoy's and Linkerd's local replies carry one): what was not
    /// processed is `UNAVAILABLE`, a call that ran out of time
    /// `DEADLINE_EXCEEDED` (not the `UNAVAILABLE` gRPC's table gives a
    /// 504, which a client's retry policy would send again), others by
    /// gRPC's table of HTTP statuses.
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            ErrorKind::Timeout => GrpcCode::DeadlineExceeded,
            ErrorKind::Connect
            | ErrorKind::ConnectTimeout
            | ErrorKind::Reset
            | ErrorKind::Overloaded
            | ErrorKind::NoEndpoints
            | ErrorKind::NotReady
            | ErrorKind::UnknownSubset => GrpcCode::Unavailable,
            ErrorKind::UnknownService | ErrorKind::Unsupported => GrpcCode::Unimplemented,
            ErrorKind::Forbidden => GrpcCode::PermissionDenied,
            ErrorKind::BadRequest => GrpcCode::Internal,
            ErrorKind::ClientTimeout => GrpcCode::Unknown,
        }
    }

    /// The kind an `x-almond-error` value names.
    pub fn of_reason(reason: &[u8]) -> Option<ErrorKind> {
        const ALL: [ErrorKind; 13] = [
            ErrorKind::Connect,
            ErrorKind::ConnectTimeout,
            ErrorKind::Timeout,
            ErrorKind::Reset,
            ErrorKind::ClientTimeout,
            ErrorKind::Overloaded,
            ErrorKind::NoEndpoints,
            ErrorKind::UnknownService,
            ErrorKind::NotReady,
            ErrorKind::UnknownSubset,
            ErrorKind::BadRequest,
            ErrorKind::Forbidden,
            ErrorKind::Unsupported,
        ];
        ALL.into_iter().find(|k| k.reason().as_bytes() == reason)
    }

    /// The `x-almond-error` header value.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect-timeout",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::ClientTimeout => "client-timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NoEndpoints => "no-endpoints",
            ErrorKind::UnknownService => "unknown-service",
            ErrorKind::NotReady => "not-ready",
            ErrorKind::UnknownSubset => "unknown-subset",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(ErrorKind::Connect.status(), 502);
        assert_eq!(ErrorKind::Timeout.status(), 504);
        assert_eq!(ErrorKind::NoEndpoints.status(), 503);
        assert_eq!(ErrorKind::UnknownService.status(), 404);
        for kind in ErrorKind::UPSTREAM_KINDS {
            assert_eq!(
                ErrorKind::UPSTREAM_KINDS[kind.upstream_index().unwrap_or(99)],
                kind
            );
        }
    }

    #[test]
    fn grpc_requests_and_statuses() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
        assert_eq!(grpc_status(&h), None);
        for (v, code) in [
            ("0", GrpcCode::Ok),
            ("14", GrpcCode::Unavailable),
            ("17", GrpcCode::Unknown),
            ("x", GrpcCode::Unknown),
        ] {
            h.insert("grpc-status", v.parse().unwrap());
            assert_eq!(grpc_status(&h), Some(code), "{v}");
        }
    }

    #[test]
    fn classes_and_outcomes() {
        assert_eq!(CodeClass::of(StatusCode::OK).label(), "2xx");
        assert_eq!(
            CodeClass::of(StatusCode::NOT_FOUND).outcome_label(),
            "success"
        );
        assert_eq!(
            CodeClass::of(StatusCode::BAD_GATEWAY).outcome_label(),
            "failure"
        );
        assert_eq!(CodeClass::Error.outcome_label(), "failure");
    }
}
