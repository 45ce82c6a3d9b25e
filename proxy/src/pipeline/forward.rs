//! Forward: the tries of one admitted request -- balance (one endpoint of
//! the pool), send, classify (failure accrual, the latency estimate),
//! retry within the budget -- and the response they end with.
//!
//! Each try goes through a `tower` stack, `send::try_once` (the per-try
//! timeout layer over the send); admission (`pipeline/shed.rs`) wraps
//! [`service`].
//! The tries themselves stay a loop here (see docs/architecture.md).

use crate::body::ResponseBody;
use crate::body::{
    BodyError, ClientBody, ClientRequest, IdleTimer, Kept, Liveness, RequestBody, Upload,
    Uploading, UpstreamBody,
};
use crate::headers;
use crate::observe::access_log::Observed;
use crate::observe::trace::Stamp;
use crate::observe::Observe;
use crate::outcome::{grpc_status, CodeClass, ErrorKind};
use crate::pipeline::admit::{Admitted, Finish};
use crate::pipeline::mirror::Shadow;
use crate::pipeline::retry::RetryPolicy;
use crate::pipeline::route::{ServiceRoute, SubsetRoute};
use crate::pipeline::shed::Refuse;
use crate::rescue::Rescue;
use crate::upstream::balance::{Pool, Tried};
use crate::upstream::endpoint::EndpointState;
use crate::upstream::send::{self, OneTry, Sent, TryRequest};
use crate::upstream::tunnel::{Tunnels, Upgrade};
use almond_config::GrpcCode;
use bytes::Bytes;
use http::request::Parts;
use http::Method;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Service};

/// The answer to a forwarded request: its body releases the admission
/// (and pools the connection) when it ends.
type Answer = ResponseBody<Finish>;

/// An answer as it goes back to the client, boxed once where it is made:
/// every stage passes it back by pointer (a move of the response itself
/// copies its 264 bytes, and it crosses about ten stages).
pub type Reply = Box<Response<Answer>>;

/// One routed request: what every try of it shares.
pub struct Call<'a> {
    /// Its service.
    pub svc: &'a ServiceRoute,
    /// The pool its split chose.
    pub pool: &'a Pool,
    /// The metric direction (0 outbound, 1 inbound).
    pub direction: usize,
    /// When it arrived.
    pub start: Instant,
    /// `limits.body_idle`: a request body stalled this long ends.
    pub body_idle: Duration,
    /// A copy to mirror, once the body is known (see `pipeline/mirror.rs`).
    pub mirror: Option<Shadow>,
    /// The client's server (the lean HTTP/1.1 one) writes the response
    /// head itself: a simple upstream head may be passed through.
    pub pass: bool,
    /// A gRPC call (HTTP/2, `content-type: application/grpc`): counted by
    /// its `grpc-status`, the proxy's own answers by the status its client
    /// gets for them.
    pub grpc: bool,
    /// What this hop adds to the request (request ID, `traceparent`).
    pub stamp: &'a Stamp,
    /// Where an upgrade's tunnel goes.
    pub tunnels: &'a Arc<Tunnels>,
    /// Whether the proxy's drain is cutting what is left (see `Unanswered`).
    pub observe: &'a Observe,
}

impl Call<'_> {
    /// The upstream's response, counted for `subset`, on its way to the
    /// client; `finish` runs when its body ends (none: an upgrade's
    /// tunnel holds it). A gRPC call's 2xx is
    /// counted by its `grpc-status`: now for a trailers-only response,
    /// else when the trailers end the body.
    fn relay(
        &self,
        subset: &SubsetRoute,
        mut resp: Response<UpstreamBody>,
        mut finish: Option<Finish>,
        elapsed: f64,
        grpc: bool,
        shared: Option<Liveness>,
    ) -> Reply {
        let metrics = &subset.metrics[self.direction];
        let class = CodeClass::of(resp.status());
        match &metrics.grpc {
            Some(calls) if grpc && class == CodeClass::Success => {
                metrics.duration.observe(elapsed);
                match grpc_status(resp.headers()) {
                    Some(code) => calls.record(code),
                    None => finish = finish.map(|f| f.with_grpc(calls.clone())),
                }
            }
            _ => metrics.record(class, elapsed),
        }
        headers::from_upstream(&mut resp);
        let (idle, timeouts) = ((self.svc.body_idle, shared), metrics.timeouts());
        Box::new(resp.map(|body| ResponseBody::upstream(body, finish, idle, timeouts)))
    }

    /// The proxy's own answer for `kind`, counted for subset `subset` as an
    /// upstream error `elapsed` seconds after arrival.
    pub fn fail(&self, kind: ErrorKind, subset: usize, elapsed: f64) -> Reply {
        let metrics = &self.svc.subsets[subset].metrics[self.direction];
        metrics.upstream_error(kind);
        metrics.record(kind.code_class(), elapsed);
        if let (true, Some(calls)) = (self.grpc, &metrics.grpc) {
            calls.record_local(kind.grpc_code());
        }
        Box::new(kind.response(&self.svc.name))
    }
}

/// A request whose client leaves before its answer (it closed the
/// connection or reset the stream: a deadline shorter than the proxy's,
/// say) is counted when its future is dropped: as a 4xx (Nginx's 499: the
/// client's doing), with its time so far in the latency histogram, so an
/// upstream that hangs past its clients' patience shows in p99 rather
/// than in no metric at all. One the proxy's drain cut (its connection
/// closed at `drain_timeout`) is the proxy's: a 5xx, as its log line and
/// span say (503 `proxy-cut`). Disarmed by every answer.
struct Unanswered<'a> {
    observe: &'a Observe,
    svc: &'a ServiceRoute,
    direction: usize,
    start: Instant,
    /// The subset of the try in progress.
    subset: usize,
    armed: bool,
}

impl Unanswered<'_> {
    /// The request is answered (and counted by whoever answered it).
    fn answer(mut self, resp: Reply) -> Result<Reply, Infallible> {
        self.armed = false;
        Ok(resp)
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            let metrics = &self.svc.subsets[self.subset].metrics[self.direction];
            let class = if self.observe.cutting() {
                CodeClass::ServerError
            } else {
                CodeClass::ClientError
            };
            metrics.record(class, self.start.elapsed().as_secs_f64());
        }
    }
}

/// A routed request on its way to admission: the request of the
/// admission layer (`pipeline/shed.rs`).
pub struct Forwarding<'a> {
    /// What every try shares.
    pub call: Call<'a>,
    /// The request, as the client sent it.
    pub req: ClientRequest,
    /// What the access log learns of the request.
    pub seen: &'a mut Observed,
}

/// Shed: the service is at its concurrency limit, a fast 503.
impl Refuse<Reply> for Forwarding<'_> {
    fn refuse(self) -> Reply {
        let elapsed = self.call.start.elapsed().as_secs_f64();
        self.call
            .fail(ErrorKind::Overloaded, self.call.pool.home(), elapsed)
    }
}

/// Forwarding as a `tower::Service` (a `service_fn` over `admitted`; its
/// future is `forward`'s own, not boxed): the service inside the
/// admission layer. Its future's `Send` is stated here so that the
/// handler's future can be proven `Send` for every lifetime.
pub fn service<'a>() -> impl Service<
    (Forwarding<'a>, Admitted),
    Response = Reply,
    Error = Infallible,
    Future = impl Future<Output = Result<Reply, Infallible>> + Send + 'a,
> + Send
       + 'a {
    service_fn(|(fwd, admitted): (Forwarding<'a>, Admitted)| self::admitted(fwd, admitted))
}

/// An admitted request, counted toward the retry budget and readied for
/// the upstream, on its way to [`forward`]. A plain `fn` (not an `async`
/// one wrapping `forward`): a second state machine would keep its own
/// copy of the request's state beside `forward`'s.
fn admitted<'a>(
    fwd: Forwarding<'a>,
    admitted: Admitted,
) -> impl Future<Output = Result<Reply, Infallible>> + Send + 'a {
    let Forwarding {
        call,
        mut req,
        seen,
    } = fwd;
    call.svc.retry.deposit(call.start);
    let upgrade = headers::is_upgrade(&req);
    let on_upgrade = upgrade.then(|| Upgrade {
        client: hyper::upgrade::on(&mut *req),
        tunnels: call.tunnels.clone(),
    });
    // An upgrade goes up on an HTTP/1.1 connection of its own, whatever
    // the service's protocol: in HTTP/1.1's form (origin form, `Host`).
    let protocol = match upgrade {
        true => almond_config::Protocol::Http1,
        false => call.svc.target.protocol,
    };
    headers::to_upstream(&mut req, protocol, upgrade);
    forward(call, admitted, req, on_upgrade, seen)
}

/// The state of a request across its tries.
struct Tries {
    /// A retryable request's small body still on its way: read whole
    /// before the first try (boxed: rare).
    reading: Option<Reading>,
    /// The request for the next try, if it is in hand (never sent).
    next: Option<Request<RequestBody>>,
    /// A copy to send again, when the body was small enough to keep.
    replay: Option<Replay>,
    /// The head of a request whose body's length is not known, and its
    /// body as it streams, for a retry once the client has sent all of it
    /// (boxed: rare, and large).
    kept: Option<Box<(Parts, Arc<Kept>)>>,
    /// The client's half of an upgrade, until the upstream accepts it.
    upgrade: Option<Upgrade>,
    /// `timeouts.request` from arrival.
    deadline: Instant,
    retries: u32,
    /// The pause before the next retry, drawn when it was decided on.
    pause: Duration,
    /// Re-sending after a stale pooled connection (see `SendError::stale`).
    fresh: bool,
    /// The endpoints earlier tries failed on, oldest first (a retry goes
    /// elsewhere while it can).
    failed_on: Vec<Arc<EndpointState>>,
    /// A gRPC call (its status counts, and may call for a retry).
    grpc: bool,
    /// Responses may be passed through (see [`Call::pass`]): not a gRPC
    /// call's, whose status is read from its head.
    pass: bool,
    /// A streamed body's end, as its tries see it.
    uploading: Uploading,
    /// The body kept for a replay took the client half the request's time
    /// or more to send: a try cut short by the request's deadline is then
    /// the client's doing, not the endpoint's (Envoy's request timeout
    /// starts once the request is whole); a per-try timeout still is the
    /// endpoint's.
    late_body: bool,
}

/// A request readied for its tries, and its replay copy if it has one.
type Readied = (Option<Request<RequestBody>>, Option<Replay>);

/// The reading of a request's body for a replay copy, boxed.
type Reading = Pin<Box<dyn Future<Output = Result<Readied, ErrorKind>> + Send>>;

/// Sends `req` (readied by `headers::to_upstream`) to an endpoint of the
/// call's pool, retrying as the service's policy allows; `upgrade` is the
/// client's half of an upgrade request. An `async` block, not an `async
/// fn`, which would keep every argument twice in the request's future
/// (see docs/architecture.md, "Future sizes").
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    mut call: Call<'a>,
    admitted: Admitted,
    req: ClientRequest,
    upgrade: Option<Upgrade>,
    seen: &'a mut Observed,
) -> impl Future<Output = Result<Reply, Infallible>> + Send + 'a {
    // Readied before the block: the block keeps the tries' state, not
    // the request it came from as well (an argument the block captures
    // keeps its room in the future for good, even once moved from).
    let mut tries = Tries::read(&mut call, req, upgrade);
    async move {
        let svc = call.svc;
        let mut left = Unanswered {
            observe: call.observe,
            svc,
            direction: call.direction,
            start: call.start,
            subset: call.pool.home(),
            armed: true,
        };
        if let Some(reading) = tries.reading.take() {
            match reading.await {
                Ok((next, replay)) => {
                    (tries.next, tries.replay) = (next, replay);
                    tries.late_body = call.start.elapsed() >= svc.request_timeout / 2;
                    tries.prepare(&mut call);
                }
                // Counted as any answer the proxy gives for the service.
                Err(kind) => {
                    let elapsed = call.start.elapsed().as_secs_f64();
                    return left.answer(call.fail(kind, call.pool.home(), elapsed));
                }
            }
        }
        // Scoped, as every local below: a local still in scope at an
        // `.await` keeps its room in the future even once moved from.
        let mut pause = None;
        loop {
            // The pause before a retry, here where only the tries' state
            // is in scope.
            if let Some(now) = pause.take() {
                tries.back_off(now).await;
            }
            // Balance: one endpoint of the pool (another one on a retry). The
            // clock is read once a try: balancing takes well under a microsecond.
            let try_start = Instant::now();
            let exclude = Tried(&tries.failed_on);
            let picked = match tries.fresh {
                // A re-send is not another first try in the zone counts.
                true => call.pool.pick_uncounted(try_start, exclude),
                false => call.pool.pick(try_start, exclude),
            };
            let Some(member) = picked else {
                let elapsed = call.start.elapsed().as_secs_f64();
                return left.answer(call.fail(ErrorKind::NoEndpoints, call.pool.home(), elapsed));
            };
            left.subset = member.subset;
            let endpoint = member.state.clone();
            seen.subset = Some(svc.subsets[member.subset].name.clone());
            seen.endpoint = Some(endpoint.addr);
            let in_flight = endpoint.start();
            if tries.retries == 0 {
                seen.queue = try_start.saturating_duration_since(call.start);
            }
            let method;
            let mut sent = {
                let Some((sending, req)) = tries.send(svc, &endpoint, try_start, seen, call.stamp)
                else {
                    // Unreachable: a retry is only allowed with a request in hand.
                    return left.answer(Box::new(ErrorKind::Reset.response(&svc.name)));
                };
                method = req;
                sending
            }
            .await;
            let now = Instant::now();
            seen.upstream = now.saturating_duration_since(try_start);
            if tries.resend_stale(&mut sent, now) {
                tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, "stale pooled connection: sending again");
                continue;
            }

            // Classify: feed failure accrual, then respond or retry. Time
            // ran out while the client was still sending its body: the
            // client's doing (Envoy's request timeout starts once the
            // request is whole), a 408 not held against the endpoint.
            let (result, unsent, response) = match sent {
                Ok((resp, h1)) => (Ok(resp.status().as_u16()), None, Some((resp, h1))),
                Err(e)
                    if e.kind == ErrorKind::Timeout
                        && (tries.uploading.unfinished()
                            || (tries.late_body && now >= tries.deadline)) =>
                {
                    (Err(ErrorKind::ClientTimeout), e.unsent, None)
                }
                Err(e) => (Err(e.kind), e.unsent, None),
            };
            // A trailers-only gRPC answer: its status is known now.
            let grpc_code = (response.as_ref())
                .filter(|_| tries.grpc)
                .and_then(|(resp, _)| grpc_status(resp.headers()));
            // Only what the endpoint did counts for it: not a try shed here
            // (`Overloaded`), nor one a client's stalled upload ended. A
            // trailers-only gRPC answer is judged by its status's HTTP
            // equivalent (`UNAVAILABLE` as a 503), as Envoy's outlier
            // detection does: a fast failure is no success.
            let judged = grpc_code.map_or(result, |code| Ok(code.http_status()));
            let failed = svc.record_outcome(member.subset, &endpoint, judged, now);
            if ErrorKind::about_endpoint(judged) {
                // Not the upload's time: a long client stream is not the
                // endpoint's latency.
                let times = (
                    try_start.max(tries.uploading.ended_at().unwrap_or(try_start)),
                    now,
                );
                learn_rtt((svc, call.pool), &endpoint, times, failed, seen.connect);
            }
            if tries.retry(
                svc,
                &method,
                (result, grpc_code),
                unsent.is_some(),
                (now, try_start),
            ) {
                tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, retries = tries.retries, "retrying");
                tries.next = unsent.map(|req| *req);
                // Ordered by last failure: the one that failed longest
                // ago is the one tried again when all have failed.
                tries.failed_on.retain(|e| !Arc::ptr_eq(e, &endpoint));
                tries.failed_on.push(endpoint);
                pause = Some(now);
                continue;
            }

            // Measure, and answer.
            seen.retries = tries.retries;
            let elapsed = now.saturating_duration_since(call.start).as_secs_f64();
            let Some((mut resp, h1)) = response else {
                let kind = result.err().unwrap_or(ErrorKind::Reset);
                tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, reason = kind.reason(), "request failed");
                return left.answer(call.fail(kind, member.subset, elapsed));
            };
            seen.upstream_answered = true;
            let mut finish = Some(Finish::new(admitted, in_flight).with_h1(h1));
            // An upgrade the upstream took: its tunnel holds the request's
            // places (in flight, under `max_requests`, and on its endpoint)
            // until it closes, as Envoy counts an upgraded stream active.
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(up) = tries.upgrade.take() {
                    let upstream = hyper::upgrade::on(&mut resp);
                    up.tunnels.open(up.client, upstream, finish.take());
                }
            }
            let subset = &svc.subsets[member.subset];
            let shared = tries.uploading.liveness();
            return left.answer(call.relay(subset, resp, finish, elapsed, tries.grpc, shared));
        }
    }
}

impl Tries {
    /// Readies `req` for its tries: a copy kept for a replay when the
    /// policy allows (its body read first, in `reading`, which most
    /// requests, with no body, never need), and a gRPC call's head kept
    /// for a `grpc-*` retry as its body streams; `upgrade` is the
    /// client's half of an upgrade request.
    fn read(call: &mut Call<'_>, req: ClientRequest, upgrade: Option<Upgrade>) -> Tries {
        let svc = call.svc;
        let grpc = call.grpc;
        // A body of unknown length is kept as it streams when a retry
        // could send it again: a gRPC call's for a `grpc-*` condition, an
        // idempotent request's for any (a POST's is never sent twice).
        let keep = upgrade.is_none()
            && match grpc {
                true => svc.retry.on_grpc(),
                false => headers::idempotent(req.method()),
            };
        let kept = if keep { tee(&req, &svc.retry) } else { None };
        let deadline = call.start + svc.request_timeout;
        let mut tries = Tries {
            reading: None,
            next: None,
            replay: None,
            kept,
            upgrade,
            deadline,
            retries: 0,
            pause: Duration::ZERO,
            fresh: false,
            failed_on: Vec::new(),
            grpc,
            pass: call.pass && !grpc,
            uploading: Uploading::default(),
            late_body: false,
        };
        // Filled in place (each move of a request copies it whole).
        let limits = (svc.request_timeout, call.body_idle);
        tries.reading = tries.ready(req, &svc.retry, limits);
        if tries.reading.is_none() {
            tries.prepare(call);
        }
        tries
    }

    /// Decides whether the request can be replayed: retries on, no
    /// upgrade, and a body known to fit `max_body_bytes` (read whole
    /// before the first try). Others stream, and are retried only if
    /// nothing of them was sent, or if one of unknown length was kept
    /// whole as it streamed (see `tee`). Any method is kept: a non-idempotent one
    /// is sent again only when nothing was processed (a stale pooled
    /// connection), `RetryPolicy::allows` says when. Fills `next` or
    /// `replay`, or returns the boxed reading of a body to read first.
    fn ready(
        &mut self,
        req: ClientRequest,
        policy: &RetryPolicy,
        (timeout, body_idle): (Duration, Duration),
    ) -> Option<Reading> {
        let fits = req
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= policy.max_body_bytes as u64);
        if !policy.enabled() || self.upgrade.is_some() || !fits {
            let (upload, uploading) = Upload::watch(req.body(), (timeout, body_idle));
            self.uploading = uploading;
            // A body still to come may stream beside its answer: each
            // side's frames keep the other's idle timer from firing.
            let timer = IdleTimer::sharing(body_idle, self.uploading.liveness());
            self.next = Some((*req).map(|body| RequestBody::Stream(body, timer, upload)));
            return None;
        }
        let (parts, body) = (*req).into_parts();
        // A body read whole with its head (the lean server's) is kept as is.
        let body = match body {
            ClientBody::Full(bytes) => {
                let body = bytes.unwrap_or_default();
                self.replay = Some(Replay { parts, body });
                return None;
            }
            body if body.is_end_stream() => {
                self.replay = Some(Replay {
                    parts,
                    body: Bytes::new(),
                });
                return None;
            }
            body => body,
        };
        let deadline = self.deadline;
        Some(Box::pin(async move {
            let body = RequestBody::Stream(body, IdleTimer::new(body_idle), Upload::default());
            let collected = match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(Ok(collected)) => collected,
                Ok(Err(BodyError::Idle(_))) => return Err(ErrorKind::ClientTimeout),
                Ok(Err(_)) => return Err(ErrorKind::BadRequest),
                // Nothing went up yet: the client's upload outlasted the
                // request's time (Envoy's `request_timeout` answers 408).
                Err(_) => return Err(ErrorKind::ClientTimeout),
            };
            // Trailers (an HTTP/2 request's, with a length): a copy keeps
            // none, so the request goes once, as it came, not replayed.
            if let Some(trailers) = collected.trailers().cloned() {
                let data = collected.to_bytes();
                let body = ClientBody::Collected(
                    (!data.is_empty()).then_some(data),
                    Some(Box::new(trailers)),
                );
                let timer = IdleTimer::new(body_idle);
                let req =
                    Request::from_parts(parts, RequestBody::Stream(body, timer, Upload::default()));
                return Ok((Some(req), None));
            }
            Ok(Replay::whole(parts, collected.to_bytes()))
        }))
    }

    /// The readied request and its replay copy in hand: the gRPC body
    /// kept as it streams, and the mirror's copy sent off (in a task of
    /// its own).
    fn prepare(&mut self, call: &mut Call<'_>) {
        if let (Some(req), Some(kept)) = (&mut self.next, &self.kept) {
            req.body_mut().keep_in(&kept.1);
        }
        if let Some(shadow) = call.mirror.take() {
            match (self.next.as_ref(), self.replay.as_ref(), self.kept.as_ref()) {
                // A gRPC call's body, kept as it streams: copied once sent.
                (Some(req), None, Some(kept)) => {
                    shadow.send_when_kept(req, kept.1.clone(), call.stamp)
                }
                (Some(req), replay, _) => shadow.send(req, replay.map(|r| &r.body), call.stamp),
                (None, Some(r), _) => {
                    shadow.send(&send::owned(&r.parts, &r.body), Some(&r.body), call.stamp)
                }
                (None, None, _) => {}
            }
        }
    }

    /// Sends one try to `endpoint` through the try's stack: the send
    /// within the per-try and the request timeouts, and the request's
    /// method; `None` with no request in hand. The request is the one in
    /// hand, or the kept copy, lent (the lean HTTP/1.1 client writes it
    /// without a clone). A plain `fn`: the try stack's future is all the
    /// state a try needs (an `async fn` would keep its own copy of the
    /// request beside it).
    fn send<'a>(
        &'a mut self,
        svc: &'a ServiceRoute,
        endpoint: &'a Arc<EndpointState>,
        try_start: Instant,
        seen: &'a mut Observed,
        stamp: &'a Stamp,
    ) -> Option<(Pin<Box<impl Future<Output = Sent> + Send + 'a>>, Method)> {
        let Tries {
            next,
            replay,
            upgrade,
            fresh,
            deadline,
            pass,
            uploading,
            ..
        } = self;
        let (req, method) = match next.take() {
            Some(req) => {
                seen.request_bytes = req.body().size_hint().exact();
                let method = req.method().clone();
                (TryRequest::Owned(req), method)
            }
            None => {
                let kept = replay.as_ref()?;
                seen.request_bytes = Some(kept.body.len() as u64);
                (
                    TryRequest::Kept(&kept.parts, &kept.body),
                    kept.parts.method.clone(),
                )
            }
        };
        seen.connect = None;
        // The try's deadline: the request's (counted from the end of a
        // streamed body), or sooner by the per-try timeout from the clock
        // reading the try started at. Either moves on while the body
        // still comes, as Envoy's timers start once the request is whole.
        let deadline = uploading.deadline(*deadline, try_start);
        let per_try = (svc.retry.per_try_timeout)
            .and_then(|t| Some((try_start.checked_add(t)?, t)))
            .filter(|(at, _)| *at < deadline);
        let (until, limit) = per_try.unwrap_or((deadline, svc.request_timeout));
        let upload = uploading.clock(limit);
        let one = OneTry {
            req,
            upgrade: upgrade.is_some(),
            fresh: *fresh,
            pass: *pass,
            stamp,
            connected: &mut seen.connect,
            at: try_start,
        };
        Some((
            crate::boxed(|| send::try_once(&svc.target, endpoint, (until, upload), one)),
            method,
        ))
    }

    /// A pooled connection the upstream had closed idle (the client judged
    /// that nothing was processed: an idempotent request, or one never
    /// sent): it goes again once, on a new connection, with no retry
    /// counted and nothing held against the endpoint.
    fn resend_stale(&mut self, sent: &mut Sent, now: Instant) -> bool {
        if let Err(e) = sent {
            let again = e.unsent.is_some() || self.replay.is_some();
            if e.stale && !self.fresh && again && now < self.deadline_at(now) {
                self.fresh = true;
                self.next = e.unsent.take().map(|req| *req);
                return true;
            }
        }
        self.fresh = false;
        false
    }

    /// May the request go again after `result` (and a trailers-only gRPC
    /// answer's status), with time left for its pause and a try as long
    /// as the one that failed took (from `try_start`)? Counts the retry if
    /// so.
    fn retry(
        &mut self,
        svc: &ServiceRoute,
        method: &Method,
        (result, grpc): (Result<u16, ErrorKind>, Option<GrpcCode>),
        unsent: bool,
        (now, try_start): (Instant, Instant),
    ) -> bool {
        // The body kept as it streamed, if the client had sent all of it
        // (made one only for a retry: most tries succeed).
        let kept_whole = !unsent
            && self.replay.is_none()
            && (self.kept.as_ref()).is_some_and(|kept| kept.1.is_whole());
        let may_replay = unsent || self.replay.is_some() || kept_whole;
        // Time for the pause and a try as long as the one that failed
        // took (at least `MIN_TRY`), or the answer in hand (the
        // upstream's 503, its `Retry-After`) is worth more than a try cut
        // off at the deadline (a 504, held against the next endpoint).
        let (deadline, done, mut pause) = (self.deadline_at(now), self.retries, Duration::ZERO);
        // A try's own time, not its upload's.
        let try_start = try_start.max(self.uploading.ended_at().unwrap_or(try_start));
        let room = || {
            pause = RetryPolicy::backoff(done + 1);
            let took = now.saturating_duration_since(try_start);
            now + pause + took.max(MIN_TRY) < deadline
        };
        let again = match grpc {
            Some(code) => (svc.retry).allows_grpc(done, code, (may_replay, room), now),
            None => (svc.retry).allows(done, method, result, (may_replay, room), now),
        };
        if again {
            if kept_whole {
                self.replay = (self.kept.take()).and_then(|kept| {
                    let (parts, kept) = *kept;
                    Some(Replay {
                        parts,
                        body: kept.whole()?,
                    })
                });
            }
            self.retries += 1;
            self.pause = pause;
            svc.retries.inc();
        }
        again
    }

    /// The request's deadline as it stands at `now`: moved on while its
    /// body streams, and counted from the body's end once it is over.
    fn deadline_at(&self, now: Instant) -> Instant {
        self.uploading.deadline(self.deadline, now)
    }

    /// The pause before the next retry (drawn when it was decided on),
    /// never past the deadline.
    fn back_off(&self, now: Instant) -> tokio::time::Sleep {
        let left = self.deadline_at(now).saturating_duration_since(now);
        tokio::time::sleep(self.pause.min(left))
    }
}

/// Feeds the try's round trip to the endpoint's latency estimate. A
/// failure counts as a few times its peers' latency in `pool` (see
/// [`Pool::failure_rtt`]), so P2C steers away from it softly until
/// failure accrual ejects it; one failure is washed out by a few answers
/// (counted as `timeouts.connect`, a fast 500 cost 1,000x its peers, and
/// the endpoint got no traffic for about a minute). Opening a connection
/// is a one-off cost, not the endpoint's latency.
fn learn_rtt(
    (svc, pool): (&ServiceRoute, &Pool),
    endpoint: &EndpointState,
    (try_start, now): (Instant, Instant),
    failed: bool,
    connect: Option<Duration>,
) {
    let rtt = now
        .saturating_duration_since(try_start)
        .saturating_sub(connect.unwrap_or_default());
    let rtt = if failed {
        pool.failure_rtt(endpoint, rtt, svc.target.connect_timeout, now)
    } else {
        rtt
    };
    endpoint.observe_rtt(now, rtt);
}

/// The least time a retry is given after its pause: a retry that would
/// have less is not made, and the answer in hand is the client's.
const MIN_TRY: Duration = Duration::from_millis(10);

/// A request kept whole so it can be sent again.
struct Replay {
    parts: Parts,
    body: Bytes,
}

impl Replay {
    /// A request kept whole: every try is sent from the copy (none in hand).
    fn whole(parts: Parts, body: Bytes) -> (Option<Request<RequestBody>>, Option<Replay>) {
        (None, Some(Replay { parts, body }))
    }
}

/// A request whose body's length is not known (a gRPC call's, a chunked
/// upload): streamed as it comes, and kept up to `max_body_bytes` on the
/// way, with a copy of its head.
fn tee(req: &Request<ClientBody>, policy: &RetryPolicy) -> Option<Box<(Parts, Arc<Kept>)>> {
    // Of unknown length only: one known to fit is read whole before the
    // first try, one known not to would be copied for nothing.
    let unknown = req.body().size_hint().upper().is_none();
    if !policy.enabled() || !unknown {
        return None;
    }
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = req.method().clone();
    head.uri = req.uri().clone();
    head.version = req.version();
    head.headers = req.headers().clone();
    Some(Box::new((head, Kept::new(policy.max_body_bytes))))
}
