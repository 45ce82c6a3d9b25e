//! Admit: a request's place under its service's concurrency limit
//! (`circuit_breaker.max_requests`; over it, shed at once with 503), held
//! until its response has ended (an upgrade's: until its tunnel closes)
//! -- then its endpoint is free again and an HTTP/1.1 connection goes
//! back to its pool.

use crate::body::Completion;
use crate::limit::{Admission, Permit};
use crate::observe::metrics::GrpcMetrics;
use crate::outcome::grpc_status;
use crate::upstream::connect::H1Sender;
use crate::upstream::endpoint::InFlight;
use almond_config::GrpcCode;
use prometheus::IntGauge;
use std::sync::Arc;

/// A request admitted to a service: counted in flight (the gauge and the
/// concurrency limit) from admission until it is dropped.
pub struct Admitted {
    in_flight: IntGauge,
    _permit: Permit,
}

impl Admitted {
    /// Admits a request under `admission`, counted in `in_flight`; `None`
    /// when the service is at its limit.
    #[inline]
    pub fn try_new(admission: &Arc<Admission>, in_flight: &IntGauge) -> Option<Admitted> {
        let permit = admission.try_acquire()?;
        in_flight.inc();
        Some(Admitted {
            in_flight: in_flight.clone(),
            _permit: permit,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// Follows a response to its end: then the service's and the endpoint's
/// in-flight counts drop and an HTTP/1.1 connection returns to its pool.
pub struct Finish {
    _admitted: Admitted,
    endpoint: InFlight,
    h1: Option<H1Sender>,
    grpc: Option<GrpcCall>,
}

/// A gRPC call whose status comes in the response's trailers: counted
/// when they arrive and the body ends, by the `grpc-status` they carry
/// (none: `UNKNOWN`; the upstream's stream broke: `INTERNAL`; the client
/// went away first: `CANCELLED`).
struct GrpcCall {
    metrics: Option<Arc<GrpcMetrics>>,
    status: Option<GrpcCode>,
}

impl GrpcCall {
    fn record(&mut self, code: GrpcCode) {
        if let Some(metrics) = self.metrics.take() {
            metrics.record(code);
        }
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        self.record(GrpcCode::Cancelled);
    }
}

impl Finish {
    /// Follows a response from `endpoint` for an admitted request.
    pub fn new(admitted: Admitted, endpoint: InFlight) -> Finish {
        Finish {
            _admitted: admitted,
            endpoint,
            h1: None,
            grpc: None,
        }
    }

    /// Counts the response as a gRPC call in `metrics` when its body ends,
    /// by the `grpc-status` of its trailers.
    pub fn with_grpc(mut self, metrics: Arc<GrpcMetrics>) -> Finish {
        self.grpc = Some(GrpcCall {
            metrics: Some(metrics),
            status: None,
        });
        self
    }

    /// The HTTP/1.1 connection to pool when the response completes.
    pub fn with_h1(mut self, h1: Option<H1Sender>) -> Finish {
        self.h1 = h1;
        self
    }
}

impl Completion for Finish {
    fn done(mut self, complete: bool) {
        if let (true, Some(sender)) = (complete, self.h1.take()) {
            self.endpoint.state().conns.release_h1(sender);
        }
        if let Some(call) = &mut self.grpc {
            let ended = if complete {
                GrpcCode::Unknown
            } else {
                GrpcCode::Internal
            };
            let code = call.status.unwrap_or(ended);
            call.record(code);
        }
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if let Some(call) = &mut self.grpc {
            call.status = grpc_status(trailers);
        }
    }
}
