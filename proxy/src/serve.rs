//! Serve: the request path that every downstream request walks.
//!
//! [`handle`] is the whole flow in one place:
//! route -> split -> admit -> balance -> send -> classify (eject, retry)
//! -> measure. Connections are accepted in `listen`.

use crate::access_log::{self, Entry, Observed};
use crate::body::{IdleTimer, RequestBody, ResponseBody};
use crate::headers;
use crate::otlp::Finished;
use crate::outcome::{self, CodeClass, ErrorKind};
use crate::retry::RetryPolicy;
use crate::send::{self, Admitted, Finish};
use crate::trace;
use crate::upstream::EndpointState;
use crate::Shared;
use almond_config::Direction;
use bytes::Bytes;
use http::request::Parts;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;
use tracing::Instrument;

/// Handles one request that arrived on listener `listener`: stamps its
/// request ID and trace context, serves it, returns the ID, logs it.
pub async fn handle(
    shared: Arc<Shared>,
    listener: usize,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    // Trace: request ID and trace context, before anything can answer.
    let trace = trace::Context::stamp(req.headers_mut(), shared.observe.sample_rate);
    // Access log: decided up front, so an unlogged request copies nothing.
    let log = (shared.observe.access_log.as_ref()).filter(|log| log.admits(start));
    let head = log.map(|_| (req.method().clone(), Box::<str>::from(req.uri().path())));
    // Spans: only sampled requests, and only when export is configured.
    let spans = (shared.observe.spans.as_ref()).filter(|_| trace.sampled);
    let span_head = spans.map(|_| (req.method().clone(), Box::<str>::from(req.uri().path())));
    let mut seen = Observed::default();
    // Logs: the request's debug lines carry its ID (a disabled span is free).
    let span = tracing::debug_span!("request", request_id = trace.request_id.to_str().ok());
    let Ok(mut resp) = serve(&shared, listener, peer, req, start, &mut seen)
        .instrument(span)
        .await;
    trace.on_response(resp.headers_mut());
    if let (Some(spans), Some((method, path))) = (spans, span_head) {
        let end = SystemTime::now();
        spans.record(Finished {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent_id: trace.parent_id,
            request_id: trace.request_id.clone(),
            start: end.checked_sub(start.elapsed()).unwrap_or(end),
            end,
            method,
            path,
            status: resp.status().as_u16(),
            error: resp.headers().get(outcome::ERROR_HEADER).cloned(),
            // Shared with the access log only when it logs this request.
            observed: match log {
                Some(_) => seen.clone(),
                None => std::mem::take(&mut seen),
            },
            response_bytes: resp.body().size_hint().exact(),
        });
    }
    if let (Some(log), Some((method, path))) = (log, head) {
        let bytes = resp.headers().get(http::header::CONTENT_LENGTH);
        log.record(Entry {
            time_ms: access_log::now_ms(),
            request_id: String::from_utf8_lossy(trace.request_id.as_bytes()).into(),
            trace_id: trace.trace_id,
            sampled: trace.sampled,
            method,
            path,
            status: resp.status().as_u16(),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            bytes: bytes.and_then(|v| v.to_str().ok()?.parse().ok()),
            observed: seen,
        });
    }
    Ok(resp)
}

/// Serves one request that arrived at `start`: every stage, in order;
/// `seen` is filled for the access log as the stages learn the route.
async fn serve(
    shared: &Shared,
    listener: usize,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    start: Instant,
    seen: &mut Observed,
) -> Result<Response<ResponseBody>, Infallible> {
    // One target host, or 400 (a request-smuggling and cache-poisoning
    // vector otherwise: routing and the upstream could read two hosts).
    if let Err(why) = headers::check_host(&req) {
        shared.metrics.unroutable.inc();
        return Ok(ErrorKind::BadRequest.response(why));
    }

    // Route: the listener's bound service, or Host / :authority.
    let table = shared.table.load();
    let Some(on) = table.listener(listener) else {
        return Ok(ErrorKind::BadRequest.response("listener gone"));
    };
    let direction = match on.direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    seen.direction = on.direction;
    if !on.trust_routing_headers {
        headers::strip_almond_headers(req.headers_mut());
    }
    if let Some(proto) = on.forwarded_proto {
        headers::add_forwarded(req.headers_mut(), peer.ip(), proto);
    }
    let svc = match table.service(on, &req) {
        Ok(svc) => svc.clone(),
        Err((kind, detail)) => {
            shared.metrics.unroutable.inc();
            return Ok(kind.response(&detail));
        }
    };
    let body_idle = table.config.limits.body_idle;
    let inbound = on.direction == Direction::Inbound;
    drop(table);
    seen.service = Some(svc.name.clone());

    // Authorization: an inbound service with an allow-list (`authz`, from
    // the control plane) admits only the client identities on it; no
    // verified identity (a plain listener) is no admission.
    if let (true, Some(allow)) = (inbound, &svc.authz) {
        let who = req.extensions().get::<crate::tls::Identities>();
        if !who.is_some_and(|w| w.any_in(allow)) {
            shared.metrics.tls_denied.inc();
            let name = who.and_then(|w| w.0.first().cloned());
            return Ok(ErrorKind::Forbidden.response(name.as_deref().unwrap_or("client")));
        }
    }

    // Split: a pinned subset, the weighted split, or every endpoint.
    let pool = match svc.pool(&req) {
        Ok(pool) => pool,
        Err((kind, detail)) => {
            shared.metrics.unroutable.inc();
            return Ok(kind.response(&detail));
        }
    };

    // Admit: shed at once when the service is at its concurrency limit.
    let Some(permit) = svc.admission.try_acquire() else {
        let metrics = &svc.subsets[pool.home()].metrics[direction];
        metrics.upstream_error(ErrorKind::Overloaded);
        metrics.record(CodeClass::Error, start.elapsed().as_secs_f64());
        return Ok(ErrorKind::Overloaded.response(&svc.name));
    };
    let admitted = Admitted::new(svc.clone(), direction, permit);
    svc.retry.deposit(start);

    // Ready the request for the upstream; keep a small body for replay.
    let upgrade = headers::is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    headers::to_upstream(&mut req, svc.protocol, upgrade);
    let deadline = start + svc.request_timeout;
    let (mut next, replay) = match replayable(req, &svc.retry, upgrade, deadline, body_idle).await {
        Ok(prepared) => prepared,
        Err(kind) => return Ok(kind.response(&svc.name)),
    };
    let mut on_upgrade = on_upgrade;

    let mut retries = 0;
    // Re-sends after a stale pooled connection (see `SendError::stale`).
    let mut fresh = false;
    let mut failed_on: Option<Arc<EndpointState>> = None;
    loop {
        // Balance: one endpoint of the pool (another one on a retry). The
        // clock is read once a try: balancing takes well under a microsecond.
        let try_start = Instant::now();
        let Some(member) = pool.pick(try_start, failed_on.as_deref()) else {
            let metrics = &svc.subsets[pool.home()].metrics[direction];
            metrics.upstream_error(ErrorKind::NoEndpoints);
            metrics.record(CodeClass::Error, start.elapsed().as_secs_f64());
            return Ok(ErrorKind::NoEndpoints.response(&svc.name));
        };
        let subset = &svc.subsets[member.subset];
        let endpoint = member.state.clone();
        seen.subset = Some(subset.name.clone());
        seen.endpoint = Some(endpoint.addr);
        let in_flight = endpoint.start();
        let Some(req) = next.take().or_else(|| replay.as_ref().map(Replay::request)) else {
            // Unreachable: a retry is only allowed with a request in hand.
            return Ok(ErrorKind::Reset.response(&svc.name));
        };
        let method = req.method().clone();
        seen.request_bytes = req.body().size_hint().exact();

        // Send, within the per-try and the request timeouts.
        if retries == 0 {
            seen.queue = try_start.saturating_duration_since(start);
        }
        seen.connect = None;
        let budget = deadline.saturating_duration_since(try_start);
        let limit = svc.retry.per_try_timeout.map_or(budget, |t| t.min(budget));
        let sent = tokio::time::timeout(
            limit,
            send::forward(
                &svc,
                &endpoint,
                req,
                &mut on_upgrade,
                fresh,
                &mut seen.connect,
            ),
        )
        .await;
        let now = Instant::now();
        seen.upstream = now.saturating_duration_since(try_start);

        // A pooled connection the upstream had closed idle: nothing was
        // processed, so any method goes again once, on a new connection,
        // with no retry counted and nothing held against the endpoint.
        if let Ok(Err(e)) = &sent {
            if e.stale && !fresh && (e.unsent.is_some() || replay.is_some()) && now < deadline {
                fresh = true;
                if let Ok(Err(e)) = sent {
                    next = e.unsent;
                }
                tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, "stale pooled connection: sending again");
                continue;
            }
        }
        fresh = false;

        // Classify: feed failure accrual, then respond or retry.
        let (result, unsent, response) = match sent {
            Ok(Ok((resp, h1))) => (Ok(resp.status().as_u16()), None, Some((resp, h1))),
            Ok(Err(e)) => (Err(e.kind), e.unsent, None),
            Err(_elapsed) => (Err(ErrorKind::Timeout), None, None),
        };
        // Overloaded: shed here, before the endpoint saw anything.
        let failed = result != Err(ErrorKind::Overloaded)
            && svc.record_outcome(member.subset, &endpoint, result, now);
        // A failure counts as a slow answer, so P2C steers away from it
        // until it is ejected (its estimate is reset when it returns).
        // Opening a connection is a one-off cost, not the endpoint's latency.
        let rtt = now
            .saturating_duration_since(try_start)
            .saturating_sub(seen.connect.unwrap_or_default());
        endpoint.observe_rtt(
            now,
            if failed {
                rtt.max(svc.connect_timeout)
            } else {
                rtt
            },
        );
        let may_replay = unsent.is_some() || replay.is_some();
        if now < deadline && svc.retry.allows(retries, &method, result, may_replay, now) {
            retries += 1;
            svc.retries.inc();
            tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, retries, "retrying");
            next = unsent;
            failed_on = Some(endpoint);
            drop(response);
            let pause = RetryPolicy::backoff(retries).min(deadline.saturating_duration_since(now));
            tokio::time::sleep(pause).await;
            continue;
        }

        // Measure, and answer.
        seen.retries = retries;
        let metrics = &subset.metrics[direction];
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        return Ok(match (response, result) {
            (Some((mut resp, h1)), _) => {
                seen.upstream_answered = true;
                metrics.record(CodeClass::of(resp.status()), elapsed);
                headers::from_upstream(&mut resp);
                let finish = Finish::new(admitted, in_flight).with_h1(h1);
                let timeouts = metrics.timeouts();
                resp.map(|body| ResponseBody::upstream(body, finish, svc.body_idle, timeouts))
            }
            (None, Err(kind)) => {
                metrics.upstream_error(kind);
                metrics.record(CodeClass::Error, elapsed);
                tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, reason = kind.reason(), "request failed");
                kind.response(&svc.name)
            }
            (None, Ok(_)) => ErrorKind::Reset.response(&svc.name),
        });
    }
}

/// A request kept whole so it can be sent again.
struct Replay {
    parts: Parts,
    body: Bytes,
}

impl Replay {
    fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Replay(
            (!self.body.is_empty()).then(|| self.body.clone()),
        ));
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = self.parts.headers.clone();
        req
    }
}

/// Decides whether a request can be replayed: retries on, no upgrade, and
/// a body known to fit `max_body_bytes` (read whole before the first try).
/// Others stream, and are retried only if nothing of them was sent. Any
/// method is kept: a non-idempotent one is sent again only when nothing was
/// processed (a stale pooled connection), `RetryPolicy::allows` says when.
async fn replayable(
    req: Request<Incoming>,
    policy: &RetryPolicy,
    upgrade: bool,
    deadline: Instant,
    body_idle: std::time::Duration,
) -> Result<(Option<Request<RequestBody>>, Option<Replay>), ErrorKind> {
    let fits = req
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= policy.max_body_bytes as u64);
    if !policy.enabled() || upgrade || !fits {
        let stream = |body| RequestBody::Stream(body, IdleTimer::new(body_idle));
        return Ok((Some(req.map(stream)), None));
    }
    let (parts, body) = req.into_parts();
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        let body = RequestBody::Stream(body, IdleTimer::new(body_idle));
        match tokio::time::timeout_at(deadline, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(crate::body::BodyError::Idle(_))) => return Err(ErrorKind::ClientTimeout),
            Ok(Err(_)) => return Err(ErrorKind::BadRequest),
            Err(_) => return Err(ErrorKind::Timeout),
        }
    };
    let replay = Replay { parts, body };
    Ok((Some(replay.request()), Some(replay)))
}
