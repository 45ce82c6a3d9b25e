//! Mirror: a copy of a share of a service's requests sent to a subset or
//! another service, its response read and discarded. The copy goes out in
//! a task of its own, so the real request never waits on it; at most
//! `max_in_flight` copies are out per service (more are dropped and
//! counted), a body is copied only when forward.rs kept it for retry (a
//! gRPC call's, kept as it streams, goes once the client has sent it all),
//! and the copy carries `x-almond-mirror: 1`. Counted in the golden metrics
//! with `direction="mirror"` (a gRPC call by its `grpc-status`).

use crate::body::{BodyError, Kept, RequestBody};
use crate::headers;
use crate::limit::Permit;
use crate::observe::trace::Stamp;
use crate::outcome::{grpc_status, is_grpc, CodeClass};
use crate::pipeline::route::{MirrorPolicy, ServiceRoute, Table};
use crate::upstream::balance::Tried;
use crate::upstream::send::{self, OneTry, TryRequest};
use almond_config::GrpcCode;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use tokio::time::Instant;

/// The header every copy carries, so its receiver can tell.
pub const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-almond-mirror");

/// A copy about to be made: its place under `max_in_flight` is taken.
pub struct Shadow {
    source: Arc<ServiceRoute>,
    target: Arc<ServiceRoute>,
    _permit: Permit,
}

impl Shadow {
    /// Draws whether `source`'s request is copied (never an upgrade);
    /// `None` when not, or when `max_in_flight` copies are out (counted).
    pub fn decide(table: &Table, source: &Arc<ServiceRoute>, upgrade: bool) -> Option<Shadow> {
        let m = source.mirror.as_ref()?;
        if upgrade || m.share <= 0.0 || fastrand::f64() >= m.share {
            return None;
        }
        if m.subset_missing {
            m.dropped_subset.inc();
            return None;
        }
        let target = table.service_named(&m.service)?.clone();
        let Some(permit) = m.in_flight.try_acquire() else {
            m.dropped_full.inc();
            return None;
        };
        Some(Shadow {
            source: source.clone(),
            target,
            _permit: permit,
        })
    }

    fn policy(&self) -> Option<&MirrorPolicy> {
        self.source.mirror.as_ref()
    }

    /// Copies `req` (readied for the source's upstream) with `kept`, its
    /// body as kept for retry, and this hop's `stamp`, and sends the copy
    /// in a task of its own. A request whose body was not kept is not
    /// copied (counted), unless it has none.
    pub fn send(self, req: &Request<RequestBody>, kept: Option<&Bytes>, stamp: &Stamp) {
        let Some(m) = self.policy() else { return };
        let body = match kept {
            Some(b) => b.clone(),
            None if req.body().size_hint().exact() == Some(0) => Bytes::new(),
            None => {
                m.dropped_body.inc();
                return;
            }
        };
        let copy = self.copy(req, Some(body));
        tokio::spawn(self.run(copy, *stamp));
    }

    /// As [`Shadow::send`], for a body still streaming and kept as it goes
    /// (a gRPC call's): the copy goes once the client has sent all of it,
    /// within the request's timeout; not at all if it did not fit the copy
    /// (counted as a body not kept).
    pub fn send_when_kept(self, req: &Request<RequestBody>, kept: Arc<Kept>, stamp: &Stamp) {
        let mut copy = self.copy(req, None);
        let wait = self.source.request_timeout;
        let stamp = *stamp;
        tokio::spawn(async move {
            let Some(m) = self.policy() else { return };
            match tokio::time::timeout(wait, kept.finished()).await {
                Ok(Some(body)) => {
                    *copy.body_mut() = RequestBody::Replay((!body.is_empty()).then_some(body));
                    self.run(copy, stamp).await;
                }
                _ => m.dropped_body.inc(),
            }
        });
    }

    /// The copy of `req`, with `body`, readied for the target.
    fn copy(&self, req: &Request<RequestBody>, body: Option<Bytes>) -> Request<RequestBody> {
        let body = body.filter(|b| !b.is_empty());
        let mut copy = Request::new(RequestBody::Replay(body));
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        copy.headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        headers::to_upstream(&mut copy, self.target.target.protocol, false);
        copy
    }

    /// Sends the copy, with the request's `stamp`, to an endpoint of the
    /// target's pool, reads the response to its end and counts it; the
    /// permit goes with `self`.
    async fn run(self, req: Request<RequestBody>, stamp: Stamp) {
        let Some(m) = self.policy() else { return };
        let target = &self.target;
        let pool = match m.subset.and_then(|i| target.subsets.get(i)) {
            Some(s) => &s.pool,
            None => match target.pool(&req, None) {
                Ok(pool) => pool,
                Err(_) => return,
            },
        };
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        // Not one of the service's requests: not in its zone counts.
        let Some(member) = pool.pick_uncounted(start, Tried::NONE) else {
            if let Some(metrics) = m.metrics.get(pool.home()) {
                metrics.record(CodeClass::Error, 0.0);
            }
            return;
        };
        let (subset, endpoint) = (member.subset, member.state.clone());
        let _in_flight = endpoint.start();
        let mut connected = None;
        let one = OneTry {
            req: TryRequest::Owned(req),
            upgrade: false,
            fresh: false,
            // Nothing reads the copy's response headers.
            pass: true,
            stamp: &stamp,
            connected: &mut connected,
            at: start,
        };
        // The same try stack as the request's own, under the request
        // timeout; copies waiting for a connection hold the mirror's own
        // places, never the service's `max_pending` (real requests would
        // get 503s for them).
        let until = start + target.request_timeout;
        let own = send::Target {
            pending: m.pending.clone(),
            ..target.target.clone()
        };
        let sent = send::try_once(&own, &endpoint, (until, None), one).await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        let (result, class, code) = match sent {
            Ok((resp, h1)) => {
                let status = resp.status();
                let head = grpc.then(|| grpc_status(resp.headers())).flatten();
                // A trailers-only answer is judged by its status, as the
                // request's own are (`UNAVAILABLE` as a 503).
                let judged = head.map_or(status.as_u16(), GrpcCode::http_status);
                // Read and discard the body, so an HTTP/1.1 connection can
                // go back to its pool: frame by frame, keeping only the
                // trailers (a mirrored download is not held in memory).
                // Idle for `body_idle` between frames ends it, as it ends
                // the request's own: a long stream that keeps flowing (a
                // server-streaming gRPC call) is drained to its end.
                let idle = target.body_idle;
                let drained = async {
                    let mut body = resp.into_body();
                    let mut trailers = None;
                    loop {
                        match tokio::time::timeout(idle, body.frame()).await {
                            Err(elapsed) => return Err(elapsed),
                            Ok(None) => return Ok(Ok::<_, BodyError>(trailers)),
                            Ok(Some(Err(e))) => return Ok(Err(e)),
                            Ok(Some(Ok(frame))) => {
                                if let Ok(t) = frame.into_trailers() {
                                    trailers = Some(t);
                                }
                            }
                        }
                    }
                }
                .await;
                // A gRPC call's status: in the head (trailers-only), else
                // in the trailers; as the request's own are counted.
                let code = match &drained {
                    _ if !grpc => None,
                    _ if head.is_some() => head,
                    Ok(Ok(trailers)) => Some(
                        trailers
                            .as_ref()
                            .and_then(grpc_status)
                            .unwrap_or(GrpcCode::Unknown),
                    ),
                    _ => Some(GrpcCode::Internal),
                };
                if let (Ok(Ok(_)), Some(h1)) = (drained, h1) {
                    endpoint.conns.release_h1(h1);
                }
                (Ok(judged), CodeClass::of(status), code)
            }
            Err(e) => (Err(e.kind), CodeClass::Error, None),
        };
        target.record_outcome(subset, &endpoint, result, now);
        if let Some(metrics) = m.metrics.get(subset) {
            match (&metrics.grpc, code) {
                (Some(calls), Some(code)) if class == CodeClass::Success => {
                    metrics.duration.observe(elapsed);
                    calls.record(code);
                }
                _ => metrics.record(class, elapsed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::Metrics;
    use crate::pipeline::route::Table;

    /// A mirror whose subset has no endpoints (a snapshot may say so; a
    /// static file may not) copies nothing, and counts it: the copies do
    /// not go to the target's split, which serves production.
    #[test]
    fn a_mirror_to_a_subset_with_no_endpoints_copies_nothing() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                    endpoints: [{ addr: 127.0.0.1:1, subset: v1 }, { addr: 127.0.0.1:2, subset: v3 }]\n    \
                    split: { v1: 100 }\n    mirror: { subset: v3, percent: 100 }\n";
        let mut config = almond_config::load_proxy(text, "t").unwrap();
        let metrics = Metrics::new().unwrap();
        let table = Table::build(Arc::new(config.clone()), &metrics, None);
        assert!(Shadow::decide(&table, table.service_named("web").unwrap(), false).is_some());
        // v3's endpoints leave (deregistered).
        if let Some(web) = config.services.get_mut("web") {
            web.endpoints.retain(|e| e.subset == "v1");
        }
        let table = Table::build(Arc::new(config), &metrics, Some(&table));
        let web = table.service_named("web").unwrap();
        for _ in 0..3 {
            assert!(Shadow::decide(&table, web, false).is_none());
        }
        let dropped = web.mirror.as_ref().map(|m| m.dropped_subset.get());
        assert_eq!(dropped, Some(3));
    }
}
