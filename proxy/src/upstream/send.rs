//! Send: one request to one chosen endpoint, over the connection its
//! service's protocol calls for (an upgrade on an HTTP/1.1 connection of
//! its own).

use crate::body::{RequestBody, UploadClock, UpstreamBody};
use crate::observe::trace::Stamp;
use crate::outcome::ErrorKind;
pub use crate::upstream::connect::Target;
use crate::upstream::connect::{H1Sender, LeanTarget, SendError};
use crate::upstream::endpoint::EndpointState;
use crate::upstream::h1;
use crate::upstream::timeout::{call_ready, TryTimeoutLayer};
use almond_config::Protocol;
use bytes::Bytes;
use http::request::Parts;
use http_body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service};

/// The request of one try (readied by `headers::to_upstream`).
// Not boxed: it lives in the try's future either way, and a box would be
// an allocation per try.
#[allow(clippy::large_enum_variant)]
pub enum TryRequest<'a> {
    /// In hand: it goes with the try.
    Owned(Request<RequestBody>),
    /// The kept copy of a replayable request, lent: the lean HTTP/1.1
    /// client writes it as it is; another client gets a copy of it.
    Kept(&'a Parts, &'a Bytes),
}

/// A request made from a kept copy (`parts`, `body`).
pub fn owned(parts: &Parts, body: &Bytes) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::Replay(
        (!body.is_empty()).then(|| body.clone()),
    ));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// One try: the request and what the try reports back to its caller.
pub struct OneTry<'a> {
    /// The request.
    pub req: TryRequest<'a>,
    /// An upgrade request: sent on an HTTP/1.1 connection of its own
    /// (its tunnel is the caller's to open, on a `101`).
    pub upgrade: bool,
    /// Open a new HTTP/1.1 connection rather than reuse one.
    pub fresh: bool,
    /// The client's server writes the response head itself: a lean
    /// HTTP/1.1 response's lines may be passed through (`h1::Passed`).
    pub pass: bool,
    /// What this hop adds to the request: written after its lines by the
    /// lean client, encoded into its head by the HTTP/2 client, put in
    /// its map for hyper's.
    pub stamp: &'a Stamp,
    /// The time spent opening a connection, if one was opened.
    pub connected: &'a mut Option<Duration>,
    /// When the try started: the clock reading a pooled connection is
    /// judged and stamped by (no reading of its own).
    pub at: Instant,
}

/// What a try comes to: the response and the HTTP/1.1 connection it came
/// on, or why there is none.
pub type Sent = Result<(Response<UpstreamBody>, Option<H1Sender>), SendError>;

/// Sending to `endpoint` of `target` as a `tower::Service` (a
/// `service_fn` over `send_to`: its future is the `async fn`'s own, not
/// boxed), for the per-try layers to wrap.
pub fn sender<'a>(
    target: &'a Target,
    endpoint: &'a Arc<EndpointState>,
) -> impl Service<
    OneTry<'a>,
    Response = (Response<UpstreamBody>, Option<H1Sender>),
    Error = SendError,
    Future = impl Future<Output = Sent> + Send + 'a,
> + Send
       + 'a {
    service_fn(move |one: OneTry<'a>| {
        send_to(
            target,
            endpoint,
            one.req,
            one.upgrade,
            one.fresh,
            one.pass,
            one.stamp,
            one.connected,
            one.at,
        )
    })
}

/// The largest kept body the lean HTTP/1.1 client sends. It writes a
/// request whole before it reads: a body that could fill the socket's
/// buffers would hide an upstream's early answer (a 413, then no more
/// reading) until the try timed out. Larger ones go through hyper, which
/// reads while it writes (the default `retries.max_body_bytes` is this
/// size: only a raised limit sends any through hyper).
const LEAN_MAX_BODY: usize = 64 * 1024;

/// One try through the try stack: [`TryTimeoutLayer`] over [`sender`],
/// built in place, never boxed; `upload` when `deadline` is the
/// request's and its body still streams. Not an `async fn`, so that its future's
/// `Send` is proven here, where the lifetime is named: the compiler cannot
/// prove it through the stack's associated types for the erased
/// lifetimes of a caller's future.
pub fn try_once<'a>(
    target: &'a Target,
    endpoint: &'a Arc<EndpointState>,
    (deadline, upload): (Instant, Option<Box<UploadClock>>),
    one: OneTry<'a>,
) -> impl Future<Output = Sent> + Send + 'a {
    let timeout = TryTimeoutLayer::until(deadline).with_upload(upload);
    let stack = timeout.layer(sender(target, endpoint));
    call_ready(stack, one)
}

/// Sends one try's request to `endpoint` (the fields of [`OneTry`] as
/// arguments: a struct argument would sit in the future beside its fields).
/// An upgrade request gets a connection of its own (the caller opens its
/// tunnel on a `101`: `hyper::upgrade::on` the response). An `async`
/// block, not an `async fn`: that would keep the request twice.
// Not `async fn`: it would keep the arguments twice (see above).
#[allow(clippy::manual_async_fn, clippy::too_many_arguments)]
fn send_to<'a>(
    target: &'a Target,
    endpoint: &'a Arc<EndpointState>,
    req: TryRequest<'a>,
    upgrade: bool,
    fresh: bool,
    pass: bool,
    stamp: &'a Stamp,
    connected: &'a mut Option<Duration>,
    at: Instant,
) -> impl Future<Output = Sent> + Send + 'a {
    async move {
        let mut req = match req {
            TryRequest::Kept(parts, body)
                if target.protocol == Protocol::Http1
                    && !upgrade
                    && parts.method != Method::CONNECT
                    && body.len() <= LEAN_MAX_BODY =>
            {
                let head = h1::Head {
                    method: &parts.method,
                    uri: &parts.uri,
                    headers: &parts.headers,
                    body: (!body.is_empty()).then_some(body),
                    pass,
                    stamp,
                };
                let sent =
                    endpoint
                        .conns
                        .send_lean(head, lean_target(target, at), fresh, connected);
                return match sent.await {
                    Ok(resp) => Ok((resp.map(UpstreamBody::Lean), None)),
                    Err(e) => Err(e.into_send_error(|| owned(parts, body))),
                };
            }
            TryRequest::Kept(parts, body) => owned(parts, body),
            TryRequest::Owned(req) => req,
        };
        // hyper's client sends a map: the stamp goes in it. (The lean
        // client and the HTTP/2 one write it into the head they encode.)
        let by_lean = !upgrade && target.protocol == Protocol::Http1 && lean(&req);
        if !by_lean && (upgrade || target.protocol == Protocol::Http1) {
            stamp.insert(req.headers_mut());
        }
        if upgrade {
            // Boxed: upgrades are rare, and keep the common future small.
            let start = Instant::now();
            let opened = Box::pin(
                endpoint
                    .conns
                    .connect_h1(target.connect_timeout, target.tls.as_deref()),
            )
            .await;
            *connected = Some(start.elapsed());
            let mut sender = match opened {
                Ok(sender) => sender,
                Err(kind) => return Err(SendError::unsent(kind, req)),
            };
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| SendError::sent(ErrorKind::Reset))?;
            return Ok((resp.map(UpstreamBody::Hyper), None));
        }
        match target.protocol {
            Protocol::Http1 if by_lean => {
                let sent = {
                    let body = match req.body() {
                        RequestBody::Replay(body) => body.as_ref(),
                        _ => None,
                    };
                    let head = h1::Head {
                        method: req.method(),
                        uri: req.uri(),
                        headers: req.headers(),
                        body,
                        pass,
                        stamp,
                    };
                    endpoint
                        .conns
                        .send_lean(head, lean_target(target, at), fresh, connected)
                        .await
                };
                match sent {
                    Ok(resp) => Ok((resp.map(UpstreamBody::Lean), None)),
                    Err(e) => Err(e.into_send_error(|| req)),
                }
            }
            Protocol::Http1 => {
                // hyper's client sends a GET's or HEAD's body of unknown
                // length as no body at all, unless asked for chunks.
                if matches!(*req.method(), Method::GET | Method::HEAD)
                    && req.body().size_hint().exact().is_none()
                    && !req.body().is_end_stream()
                {
                    (req.headers_mut()).insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                }
                // Boxed: a streamed body through hyper's client is the rare
                // case, and its state (770 bytes) would size every try.
                let (resp, sender) = Box::pin(endpoint.conns.send_h1(
                    req,
                    target.connect_timeout,
                    target.idle_timeout,
                    fresh,
                    &target.pending,
                    target.tls.as_deref(),
                    connected,
                ))
                .await?;
                Ok((resp.map(UpstreamBody::Hyper), Some(sender)))
            }
            Protocol::Http2 => {
                let resp = endpoint
                    .conns
                    .send_h2(req, target, connected, stamp)
                    .await?;
                Ok((resp.map(UpstreamBody::H2), None))
            }
        }
    }
}

/// What the lean client needs of a service's target, for a try started
/// `at`.
fn lean_target(target: &Target, at: Instant) -> LeanTarget<'_> {
    LeanTarget {
        at,
        connect_timeout: target.connect_timeout,
        idle_timeout: target.idle_timeout,
        pending: &target.pending,
        tls: target.tls.as_deref(),
    }
}

/// Does the lean HTTP/1.1 client take this request? Its body must be
/// known whole (a replay copy, or none at all) and at most
/// [`LEAN_MAX_BODY`]; a `CONNECT` goes through hyper. (Upgrades never
/// come here.)
fn lean(req: &Request<RequestBody>) -> bool {
    let whole = match req.body() {
        RequestBody::Replay(body) => body.as_ref().is_none_or(|b| b.len() <= LEAN_MAX_BODY),
        RequestBody::Stream(..) => req.body().is_end_stream(),
        RequestBody::Tee(..) => false,
    };
    whole && req.method() != hyper::Method::CONNECT
}
