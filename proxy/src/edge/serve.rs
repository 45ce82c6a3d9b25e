//! Serve: every downstream request, from its arrival to its answer.
//!
//! [`handle`] reads the trace context (what this hop adds goes up with the
//! request as a `Stamp`) and records the span and the access log line; `serve` walks the stages in order: check the host, route
//! (service), authorize, split (subset), admit, then
//! `pipeline::forward` (balance, send, classify, retry).

use crate::body::{ClientBody, ClientRequest, PassedHead, ResponseBody};
use crate::edge::trust;
use crate::headers;
use crate::identity::authz::{Identities, NotAllowed};
use crate::observe::access_log::{Entry, Observed};
use crate::observe::otlp::{Finished, Spans};
use crate::observe::tap::Summary;
use crate::observe::trace;
use crate::outcome::{self, is_grpc, ErrorKind};
use crate::pipeline::admit::Finish;
use crate::pipeline::forward::{self, Call, Forwarding, Reply};
use crate::pipeline::mirror::Shadow;
use crate::pipeline::route::ServiceRoute;
use crate::pipeline::shed::ShedLayer;
use crate::rescue::Rescue;
use crate::upstream::timeout::call_ready;
use crate::Shared;
use almond_config::Direction;
use http_body::Body;

use hyper::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tower::Layer;
use tracing::Instrument;

/// What the proxy answers a request with: its body, which releases the
/// request's admission (and pools its connection) when it ends.
pub type Answer = ResponseBody<Finish>;

/// Handles one request that arrived on listener `listener`: reads or
/// makes its request ID and trace context, serves it, returns the ID,
/// logs it.
// Not `async fn`: it would keep the request twice (docs/architecture.md).
#[allow(clippy::manual_async_fn)]
pub fn handle(
    shared: Arc<Shared>,
    listener: usize,
    peer: SocketAddr,
    mut req: ClientRequest,
) -> impl Future<Output = Result<Reply, Infallible>> + Send {
    async move {
        let start = Instant::now();
        // Trace: request ID and trace context, before anything can answer;
        // what this hop adds to the request goes up with it as a stamp.
        let trace = trace::Context::read(req.headers_mut(), shared.observe.sample_rate);
        let stamp = trace.stamp();
        // Access log: decided up front, so an unlogged request copies nothing.
        let log = (shared.observe.access_log.as_ref()).filter(|log| log.admits(start));
        let head = log.map(|_| (req.method().clone(), Box::<str>::from(req.uri().path())));
        // Spans: only sampled requests, and only when export is configured.
        let spans = (shared.observe.spans.as_ref()).filter(|_| trace.sampled);
        let span_head = spans.map(|_| (req.method().clone(), Box::<str>::from(req.uri().path())));
        // Tap: one atomic load while nobody watches.
        let taps = &shared.observe.taps;
        let tap_head = taps.active().then(|| {
            // The headers as the upstream gets them: with this hop's stamp.
            let headers = taps.wants_headers().then(|| {
                let mut headers = req.headers().clone();
                stamp.insert(&mut headers);
                headers
            });
            (
                req.method().clone(),
                Box::<str>::from(req.uri().path()),
                headers,
            )
        });
        let mut seen = Observed::default();
        // The access log's line if the client leaves before its answer.
        let mut left = LeftLog {
            log,
            head,
            spans,
            span_head,
            trace: &trace,
            start,
            seen: &mut seen,
            observe: &shared.observe,
        };
        // Logs: the request's debug lines carry its ID (a disabled span is free).
        // (The ID's text is made only when the span is enabled.)
        let span = tracing::debug_span!(
            "request",
            request_id = std::str::from_utf8(trace.request_id.as_bytes()).ok()
        );
        // A gRPC call gets the proxy's own answers in gRPC's form.
        let h2 = req.version() == http::Version::HTTP_2;
        let grpc = h2 && is_grpc(req.headers());
        let mut resp = serve(
            &shared,
            (listener, grpc),
            peer,
            req,
            start,
            left.seen,
            &stamp,
        )
        .instrument(span)
        .await;
        // Answered: the line and the span below are the request's.
        let head = left.head.take();
        let span_head = left.span_head.take();
        drop(left);
        // The request ID back to the client: a passed-through head
        // writes it after its lines, HTTP/2's edge into the head it
        // encodes, any other in the map.
        match resp.body_mut().passed_mut() {
            Some(passed) => passed.set_request_id(trace.request_id.clone()),
            None if h2 => resp.body_mut().set_request_id(trace.request_id.clone()),
            None => trace.on_response(resp.headers_mut()),
        }
        if let Some((method, path, headers)) = tap_head {
            taps.offer(&Summary {
                time_ms: almond_net::now_ms(),
                method: &method,
                path: &path,
                status: resp.status().as_u16(),
                observed: &seen,
                latency: start.elapsed(),
                request_id: trace.request_id.as_bytes(),
                headers: headers.as_ref(),
            });
        }
        if let (Some(spans), Some(head)) = (spans, span_head) {
            // Shared with the access log only when it logs this request.
            let observed = match log {
                Some(_) => seen.clone(),
                None => std::mem::take(&mut seen),
            };
            export_span(spans, &trace, start, head, &resp, observed);
        }
        if let (Some(log), Some((method, path))) = (log, head) {
            // A passed-through head's length is its body's, and so is one
            // the proxy made (its length goes on the wire from the body).
            let bytes = match resp.headers().get(http::header::CONTENT_LENGTH) {
                Some(v) => v.to_str().ok().and_then(|v| v.parse().ok()),
                None => resp.body().size_hint().exact(),
            };
            log.record(Entry {
                time_ms: almond_net::now_ms(),
                request_id: String::from_utf8_lossy(trace.request_id.as_bytes()).into(),
                trace_id: trace.trace_id,
                sampled: trace.sampled,
                method,
                path,
                status: resp.status().as_u16(),
                duration_ms: start.elapsed().as_secs_f64() * 1e3,
                bytes,
                observed: seen,
            });
        }
        // After the log, the tap and the span, which keep the HTTP status
        // (a 503 or a 504 says more there than a 200).
        if grpc {
            crate::rescue::for_grpc(&mut resp);
        }
        Ok(resp)
    }
}

/// The access log line and the span of a request whose client left
/// before its answer (it closed the connection or reset the stream):
/// status 499, as Nginx logs it, written when the request's future is
/// dropped unanswered; 503 when the proxy cut it (its drain's time was
/// up). The span is exported too: the upstream already has this hop's
/// span as its parent, and a trace must not lose the hop.
struct LeftLog<'a> {
    log: Option<&'a crate::observe::access_log::AccessLog>,
    /// Method and path, taken out once the request is answered.
    head: Option<(http::Method, Box<str>)>,
    spans: Option<&'a Spans>,
    /// Method and path for the span of a sampled request, likewise.
    span_head: Option<(http::Method, Box<str>)>,
    trace: &'a trace::Context,
    start: Instant,
    seen: &'a mut Observed,
    /// Where the proxy says it is cutting what its drain left.
    observe: &'a crate::observe::Observe,
}

impl Drop for LeftLog<'_> {
    #[inline]
    fn drop(&mut self) {
        // Small, so that an answered request's drop is inlined to a test.
        if self.head.is_some() || self.span_head.is_some() {
            self.write();
        }
    }
}

impl LeftLog<'_> {
    #[cold]
    #[inline(never)]
    fn write(&mut self) {
        // Whether or not this request is logged: its span says it too.
        let cut = self.observe.cutting();
        let status = if cut { PROXY_CUT } else { CLIENT_LEFT };
        if let (Some(spans), Some((method, path))) = (self.spans, self.span_head.take()) {
            let end = SystemTime::now();
            let why = if cut { "proxy-cut" } else { "client-left" };
            spans.record(Finished {
                trace_id: self.trace.trace_id,
                span_id: self.trace.span_id,
                parent_id: self.trace.parent_id,
                request_id: self.trace.request_id.clone(),
                start: end.checked_sub(self.start.elapsed()).unwrap_or(end),
                end,
                method,
                path,
                status,
                error: Some(http::HeaderValue::from_static(why)),
                observed: self.seen.clone(),
                response_bytes: None,
            });
        }
        let (Some(log), Some((method, path))) = (self.log, self.head.take()) else {
            return;
        };
        log.record(Entry {
            time_ms: almond_net::now_ms(),
            request_id: String::from_utf8_lossy(self.trace.request_id.as_bytes()).into(),
            trace_id: self.trace.trace_id,
            sampled: self.trace.sampled,
            method,
            path,
            status,
            duration_ms: self.start.elapsed().as_secs_f64() * 1e3,
            bytes: None,
            observed: std::mem::take(self.seen),
        });
    }
}

/// The status logged for a request whose client left first (Nginx's).
const CLIENT_LEFT: u16 = 499;

/// The status logged for a request the proxy cut unanswered, closing the
/// connections its drain left: the proxy's failure (code class `error`).
const PROXY_CUT: u16 = 503;

/// Hands the span of a sampled request, `head` its method and path, to
/// the OTLP exporter.
fn export_span(
    spans: &Spans,
    trace: &trace::Context,
    start: Instant,
    (method, path): (http::Method, Box<str>),
    resp: &Response<Answer>,
    observed: Observed,
) {
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
        observed,
        response_bytes: resp.body().size_hint().exact(),
    });
}

/// Serves one request that arrived at `start`: every stage, in order;
/// `seen` is filled for the access log as the stages learn the route;
/// `stamp` goes up with the request.
// Not `async fn`: it would keep the request twice (docs/architecture.md).
#[allow(clippy::manual_async_fn)]
fn serve<'a>(
    shared: &'a Shared,
    (listener, grpc): (usize, bool),
    peer: SocketAddr,
    mut req: ClientRequest,
    start: Instant,
    seen: &'a mut Observed,
    stamp: &'a trace::Stamp,
) -> impl Future<Output = Reply> + Send + 'a {
    async move {
        // A client a `tls` listener does not allow: 403, nothing more.
        if let Some(NotAllowed(who)) = req.extensions().get::<NotAllowed>() {
            shared.metrics.tls_denied.inc();
            seen.direction = listener_direction(shared, listener);
            return Box::new(ErrorKind::Forbidden.response(who));
        }
        // One target host, or 400 (a request-smuggling and cache-poisoning
        // vector otherwise: routing and the upstream could read two hosts).
        if let Err(why) = trust::check_host(&req).and_then(|()| trust::check_path(&req)) {
            shared.metrics.unroutable.inc();
            seen.direction = listener_direction(shared, listener);
            let mut answer = ErrorKind::BadRequest.response(why);
            // A client this confused about its own request is not sent
            // another on the connection (as nginx closes after a 400).
            if req.version() < http::Version::HTTP_2 {
                answer.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            return Box::new(answer);
        }
        // Codings: only chunked (the lean server takes no coding at all,
        // and HTTP/2 none: the h2 crate refuses the header).
        if !req.body().lean() && req.version() < http::Version::HTTP_2 {
            if let Err(why) = trust::check_codings(&req) {
                shared.metrics.unroutable.inc();
                seen.direction = listener_direction(shared, listener);
                return Box::new(ErrorKind::Unsupported.response(why));
            }
        }
        // A tunnel to a host:port is a forward proxy's work, not a
        // service's: said at once (RFC 9110 §9.3.6), never sent upstream.
        if req.method() == http::Method::CONNECT {
            shared.metrics.unroutable.inc();
            seen.direction = listener_direction(shared, listener);
            return Box::new(ErrorKind::Unsupported.response("CONNECT"));
        }
        // Route: the listener's bound service, or Host / :authority; then
        // its route rules (another service, or a subset).
        let Routed {
            svc,
            subset: routed,
            direction,
            body_idle,
            mirror,
        } = match route(shared, listener, peer, &mut req, seen, start) {
            Ok(routed) => routed,
            // Boxed: rare, and the result is moved on every request.
            Err(answer) => return answer,
        };
        // Authorize, then guard (as `route` did for the service the request
        // was addressed to, when its rules chose another).
        if let Some(answer) = check(shared, &svc, direction, &req, peer, start) {
            return answer;
        }
        // An HTTP/1.0 client may name no host, and an HTTP/2 client no
        // `:authority` (nor `host`); an HTTP/1.1 upstream request must
        // (RFC 9112 §3.2), and an HTTP/2 one should: the service's name,
        // as routing used it. (HTTP/1.1 without one was refused.)
        if (req.version() == http::Version::HTTP_10
            || (req.version() == http::Version::HTTP_2 && req.uri().authority().is_none()))
            && !req.headers().contains_key(http::header::HOST)
        {
            if let Ok(name) = http::HeaderValue::from_str(&svc.name) {
                req.headers_mut().insert(http::header::HOST, name);
            }
        }
        // Split: a pinned subset, a rule's, the weighted split, or every endpoint.
        let pool = match svc.pool(&req, routed) {
            Ok(pool) => pool,
            Err((kind, detail)) => {
                shared.metrics.unroutable.inc();
                return Box::new(kind.response(&detail));
            }
        };
        let call = Call {
            svc: &svc,
            pool,
            direction,
            start,
            body_idle,
            mirror,
            pass: req.body().lean(),
            grpc,
            stamp,
            tunnels: &shared.tunnels,
            observe: &shared.observe,
        };
        // Admit (shed at once, 503, when the service is at its concurrency
        // limit), then forward.
        match admit_and_forward(&svc, direction, Forwarding { call, req, seen }).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

/// The admission stack: [`ShedLayer`] over `forward::service()`, built in
/// place (a few references), never boxed, and called at once
/// (`call_ready`: admission never waits). Not an `async fn`: its future
/// is declared `Send` here, where the lifetime is named, because the
/// compiler cannot prove it for the erased lifetimes of the caller's
/// future through the stack's associated types.
fn admit_and_forward<'a>(
    svc: &'a ServiceRoute,
    direction: usize,
    fwd: Forwarding<'a>,
) -> impl Future<Output = Result<Reply, Infallible>> + Send + 'a {
    let admit = ShedLayer::new(&svc.admission, &svc.in_flight[direction]);
    call_ready(admit.layer(forward::service()), fwd)
}

/// What routing decided.
struct Routed {
    /// The service (after its route rules).
    svc: Arc<ServiceRoute>,
    /// The subset a route rule picked, if one did.
    subset: Option<usize>,
    /// The metric direction index (0 outbound, 1 inbound).
    direction: usize,
    /// `limits.body_idle`.
    body_idle: Duration,
    /// A copy to mirror, if this request is drawn for one.
    mirror: Option<Shadow>,
}

/// The direction of listener `listener`, for a request answered before
/// routing (which sets it for every other): its log line, tap summary and
/// span say which side of the host it came in on.
#[cold]
fn listener_direction(shared: &Shared, listener: usize) -> Direction {
    let table = shared.table.load();
    table
        .listener(listener)
        .map_or(Direction::Outbound, |on| on.direction)
}

/// Finds the request's service: the listener's bound one, or the one its
/// host names. Applies the listener's header rules on the way (untrusted
/// `x-almond-*` removed, `X-Forwarded-*` on inbound listeners), then the
/// service's route rules. Returns the service, the subset a rule picked,
/// the metric direction and `limits.body_idle`.
fn route(
    shared: &Shared,
    listener: usize,
    peer: SocketAddr,
    req: &mut Request<ClientBody>,
    seen: &mut Observed,
    start: Instant,
) -> Result<Routed, Reply> {
    let table = shared.table.load();
    let Some(on) = table.listener(listener) else {
        return Err(Box::new(ErrorKind::BadRequest.response("listener gone")));
    };
    seen.direction = on.direction;
    if !on.trust_routing_headers {
        trust::strip_almond_headers(req.headers_mut());
    }
    if let Some(proto) = on.forwarded_proto {
        trust::add_forwarded(req.headers_mut(), peer.ip(), proto);
    }
    let direction = match on.direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    let routed = table.service(on, req).and_then(|addressed| {
        let (svc, subset) = table.apply_rules(addressed, req)?;
        Ok((addressed, svc, subset))
    });
    let (svc, subset) = match routed {
        Ok((addressed, svc, subset)) => {
            // Rules sent it to another service: the one it was addressed
            // to is asked first (its allow-list and guards hold before its
            // rules).
            if !Arc::ptr_eq(addressed, svc) {
                if let Some(answer) = check(shared, addressed, direction, req, peer, start) {
                    // The access log names the service that answered.
                    seen.service = Some(addressed.name.clone());
                    return Err(answer);
                }
            }
            (svc.clone(), subset)
        }
        Err((kind, detail)) => {
            shared.metrics.unroutable.inc();
            // Before its first configuration (no snapshot, no cache) a
            // following proxy knows no service: that is a wait (503, try
            // again), not a 404.
            let unconfigured =
                || table.config.control.is_some() && shared.metrics.config_index.get() == 0;
            let kind = match kind {
                ErrorKind::UnknownService if unconfigured() => ErrorKind::NotReady,
                other => other,
            };
            return Err(Box::new(kind.response(&detail)));
        }
    };
    seen.service = Some(svc.name.clone());
    // Mirror: drawn here, where the table is at hand; sent by forward.
    let mirror = Shadow::decide(&table, &svc, headers::is_upgrade(req));
    Ok(Routed {
        svc,
        subset,
        direction,
        body_idle: table.config.limits.body_idle,
        mirror,
    })
}

/// Asks `svc` whether the request may go on: its allow-list (inbound),
/// then its guards (a deny, or a rate limit); the answer if not.
fn check<B>(
    shared: &Shared,
    svc: &ServiceRoute,
    direction: usize,
    req: &Request<B>,
    peer: SocketAddr,
    start: Instant,
) -> Option<Reply> {
    if let Err(who) = authorize(shared, svc, direction, req) {
        return Some(Box::new(ErrorKind::Forbidden.response(&who)));
    }
    (svc.guards.as_ref())
        .and_then(|guards| guards.check(req, peer.ip(), direction, start))
        .map(Box::new)
}

/// A request to a service with an allow-list (`authz`, from the control
/// plane) that comes inbound, or over mTLS whatever its listener's
/// `direction` (a verified peer is another host's proxy), passes only
/// with a verified client identity on it; no identity (a plain inbound
/// listener) is no admission. `Err` names the client.
fn authorize<B>(
    shared: &Shared,
    svc: &ServiceRoute,
    direction: usize,
    req: &Request<B>,
) -> Result<(), String> {
    let Some(allow) = &svc.authz else {
        return Ok(());
    };
    let who = req.extensions().get::<Identities>();
    if direction != 1 && who.is_none() {
        return Ok(());
    }
    if who.is_some_and(|w| w.any_in(allow)) {
        return Ok(());
    }
    shared.metrics.tls_denied.inc();
    let name = who.and_then(|w| w.0.first().cloned());
    Err(name.unwrap_or_else(|| "client".to_owned()))
}
