//! Send: one request to one chosen endpoint, and the guard that follows
//! its response to the end.

use crate::admit::Permit;
use crate::body::RequestBody;
use crate::outcome::ErrorKind;
use crate::route::ServiceRoute;
use crate::upstream::{EndpointState, H1Sender, InFlight, SendError};
use almond_config::Protocol;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Sends `req` (already readied by `headers::to_upstream`) to `endpoint`.
/// An upgrade request gets a connection of its own, then a tunnel; the
/// downstream half stays in `upgrade` until that connection is open, so a
/// retry after a connect failure is still an upgrade. `fresh`: open a new
/// HTTP/1.1 connection rather than reuse one. `connected` gets the time
/// spent opening a connection, if one was opened.
pub async fn forward(
    svc: &ServiceRoute,
    endpoint: &Arc<EndpointState>,
    req: Request<RequestBody>,
    upgrade: &mut Option<OnUpgrade>,
    fresh: bool,
    connected: &mut Option<Duration>,
) -> Result<(Response<Incoming>, Option<H1Sender>), SendError> {
    if upgrade.is_some() {
        // Boxed: upgrades are rare, and keep the common future small.
        let start = Instant::now();
        let opened = Box::pin(endpoint.connect_h1(svc.connect_timeout, svc.tls.as_deref())).await;
        *connected = Some(start.elapsed());
        let mut sender = match opened {
            Ok(sender) => sender,
            Err(kind) => return Err(SendError::unsent(kind, req)),
        };
        let downstream = upgrade.take();
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(|_| SendError::sent(ErrorKind::Reset))?;
        if let (StatusCode::SWITCHING_PROTOCOLS, Some(downstream)) = (resp.status(), downstream) {
            tunnel(downstream, hyper::upgrade::on(&mut resp));
        }
        return Ok((resp, None));
    }
    match svc.protocol {
        Protocol::Http1 => {
            let (resp, sender) = endpoint
                .send_h1(
                    req,
                    svc.connect_timeout,
                    svc.idle_timeout,
                    fresh,
                    &svc.pending,
                    svc.tls.as_deref(),
                    connected,
                )
                .await?;
            Ok((resp, Some(sender)))
        }
        Protocol::Http2 => Ok((
            endpoint
                .send_h2(
                    req,
                    svc.connect_timeout,
                    &svc.pending,
                    svc.tls.as_deref(),
                    connected,
                )
                .await?,
            None,
        )),
    }
}

/// Joins both upgraded halves and copies bytes both ways until either
/// side closes.
fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = tokio::join!(downstream, upstream);
        match (down, up) {
            (Ok(down), Ok(up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(error = %e, "upgraded tunnel ended");
                }
            }
            (down, up) => {
                tracing::debug!(
                    downstream = down.is_ok(),
                    upstream = up.is_ok(),
                    "upgrade failed"
                );
            }
        }
    });
}

/// A request admitted to a service: counted in flight (the gauge and the
/// concurrency limit) from admission until it is dropped.
pub struct Admitted {
    svc: Arc<ServiceRoute>,
    direction: usize,
    _permit: Permit,
}

impl Admitted {
    /// Counts a request that got a place under the service's limit.
    pub fn new(svc: Arc<ServiceRoute>, direction: usize, permit: Permit) -> Admitted {
        svc.in_flight[direction].inc();
        Admitted {
            svc,
            direction,
            _permit: permit,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.svc.in_flight[self.direction].dec();
    }
}

/// Follows a response to its end: then the service's and the endpoint's
/// in-flight counts drop and an HTTP/1.1 connection returns to its pool.
pub struct Finish {
    _admitted: Admitted,
    endpoint: InFlight,
    h1: Option<H1Sender>,
}

impl Finish {
    /// Follows a response from `endpoint` for an admitted request.
    pub fn new(admitted: Admitted, endpoint: InFlight) -> Finish {
        Finish {
            _admitted: admitted,
            endpoint,
            h1: None,
        }
    }

    /// The HTTP/1.1 connection to pool when the response completes.
    pub fn with_h1(mut self, h1: Option<H1Sender>) -> Finish {
        self.h1 = h1;
        self
    }

    /// The response ended; `complete` when it ended cleanly.
    pub fn done(mut self, complete: bool) {
        if let (true, Some(sender)) = (complete, self.h1.take()) {
            self.endpoint.state().release_h1(sender);
        }
    }
}
