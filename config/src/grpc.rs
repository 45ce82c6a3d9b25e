//! gRPC status codes as config names them (`grpc.failure_codes`, the
//! `grpc-*` conditions of `retries.on`), and a service's `grpc` section.

use serde::{Deserialize, Serialize};

/// The 17 gRPC status codes, by number (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum GrpcCode {
    /// 0
    Ok = 0,
    /// 1
    Cancelled,
    /// 2
    Unknown,
    /// 3
    InvalidArgument,
    /// 4
    DeadlineExceeded,
    /// 5
    NotFound,
    /// 6
    AlreadyExists,
    /// 7
    PermissionDenied,
    /// 8
    ResourceExhausted,
    /// 9
    FailedPrecondition,
    /// 10
    Aborted,
    /// 11
    OutOfRange,
    /// 12
    Unimplemented,
    /// 13
    Internal,
    /// 14
    Unavailable,
    /// 15
    DataLoss,
    /// 16
    Unauthenticated,
}

impl GrpcCode {
    /// How many codes there are.
    pub const COUNT: usize = 17;
    /// Every code, by number.
    pub const ALL: [GrpcCode; GrpcCode::COUNT] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The code of a `grpc-status` value (`None`: not 0 to 16).
    pub fn from_number(n: u32) -> Option<GrpcCode> {
        GrpcCode::ALL.get(usize::try_from(n).ok()?).copied()
    }

    /// Its canonical name (`UNAVAILABLE`): config values and the
    /// `grpc_status` metric label.
    pub fn name(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The HTTP status gRPC's own table gives this code (Envoy's
    /// `grpcToHttpStatus`): what failure accrual judges a gRPC answer by,
    /// as Envoy's outlier detection does.
    pub fn http_status(self) -> u16 {
        match self {
            GrpcCode::Ok => 200,
            GrpcCode::Cancelled => 499,
            GrpcCode::Unknown | GrpcCode::Internal | GrpcCode::DataLoss => 500,
            GrpcCode::InvalidArgument | GrpcCode::FailedPrecondition | GrpcCode::OutOfRange => 400,
            GrpcCode::DeadlineExceeded => 504,
            GrpcCode::NotFound => 404,
            GrpcCode::AlreadyExists | GrpcCode::Aborted => 409,
            GrpcCode::PermissionDenied => 403,
            GrpcCode::ResourceExhausted => 429,
            GrpcCode::Unimplemented => 501,
            GrpcCode::Unavailable => 503,
            GrpcCode::Unauthenticated => 401,
        }
    }

    /// The code gRPC's own table gives an HTTP status that came without
    /// a `grpc-status` (doc/http-grpc-status-mapping.md in grpc/grpc).
    pub fn of_http_status(status: u16) -> GrpcCode {
        match status {
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }

    /// The code named `name` (`UNAVAILABLE`).
    pub fn from_name(name: &str) -> Option<GrpcCode> {
        GrpcCode::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Its `retries.on` condition name (`grpc-unavailable`).
    pub fn condition(self) -> String {
        format!(
            "grpc-{}",
            self.name().to_ascii_lowercase().replace('_', "-")
        )
    }

    /// The code of a `retries.on` condition name (`grpc-unavailable`).
    pub fn from_condition(text: &str) -> Option<GrpcCode> {
        let rest = text.strip_prefix("grpc-")?;
        GrpcCode::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(&rest.replace('-', "_")) && !rest.contains('_'))
    }

    /// Its bit in a [`CodeSet`].
    fn bit(self) -> u32 {
        1 << (self as u8)
    }
}

impl Serialize for GrpcCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for GrpcCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        GrpcCode::from_name(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid gRPC status {text:?}; expected a code name like UNAVAILABLE or DEADLINE_EXCEEDED"
            ))
        })
    }
}

/// A set of codes, one bit each: tested per response without a lookup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The set of `codes`.
    pub fn of(codes: &[GrpcCode]) -> CodeSet {
        CodeSet(codes.iter().fold(0, |bits, c| bits | c.bit()))
    }

    /// Is `code` in the set?
    #[inline]
    pub fn contains(self, code: GrpcCode) -> bool {
        self.0 & code.bit() != 0
    }
}

/// A service's `grpc` section: how its gRPC calls are classified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    /// The `grpc-status` codes that make a call count as
    /// `outcome="failure"` (the others are successes).
    #[serde(default = "default_failure_codes")]
    pub failure_codes: Vec<GrpcCode>,
}

impl Default for Grpc {
    fn default() -> Self {
        Grpc {
            failure_codes: default_failure_codes(),
        }
    }
}

impl Grpc {
    /// Is this the default (left out of serialized snapshots)?
    pub fn is_default(&self) -> bool {
        *self == Grpc::default()
    }
}

/// Server-side faults, as Istio and Linkerd classify gRPC calls: the
/// codes a caller's mistake cannot produce.
fn default_failure_codes() -> Vec<GrpcCode> {
    vec![
        GrpcCode::Unknown,
        GrpcCode::DeadlineExceeded,
        GrpcCode::ResourceExhausted,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_conditions_round_trip() {
        for (n, code) in GrpcCode::ALL.into_iter().enumerate() {
            assert_eq!(GrpcCode::from_number(n as u32), Some(code));
            assert_eq!(GrpcCode::from_name(code.name()), Some(code));
            assert_eq!(GrpcCode::from_condition(&code.condition()), Some(code));
        }
        assert_eq!(GrpcCode::from_number(17), None);
        assert_eq!(
            GrpcCode::from_condition("grpc-resource-exhausted"),
            Some(GrpcCode::ResourceExhausted)
        );
        assert_eq!(GrpcCode::from_condition("grpc-resource_exhausted"), None);
        assert_eq!(GrpcCode::from_condition("grpc-nope"), None);
        let set = CodeSet::of(&Grpc::default().failure_codes);
        assert!(set.contains(GrpcCode::Unavailable));
        assert!(!set.contains(GrpcCode::NotFound));
        assert!(!set.contains(GrpcCode::Ok));
    }
}
