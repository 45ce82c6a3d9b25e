//! Serve: one downstream connection (HTTP/1.1 or h2c prior knowledge on the
//! same port), and the request path that every request walks.
//!
//! [`handle`] is the whole flow in one place:
//! route -> split -> admit -> balance -> send -> classify and measure.

use crate::body::ResponseBody;
use crate::headers;
use crate::outcome::{CodeClass, ErrorKind};
use crate::send::{self, Finish};
use crate::Shared;
use almond_config::Direction;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;

/// Handles one request that arrived on listener `listener`.
pub async fn handle(
    shared: Arc<Shared>,
    listener: usize,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();

    // Route: the listener's bound service, or Host / :authority.
    let table = shared.table.load();
    let Some(on) = table.listener(listener) else {
        return Ok(ErrorKind::BadRequest.response("listener gone"));
    };
    let direction = match on.direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    let svc = match table.service(on, &req) {
        Ok(svc) => svc.clone(),
        Err((kind, detail)) => {
            if kind == ErrorKind::UnknownService {
                shared.metrics.unroutable.inc();
            }
            return Ok(kind.response(&detail));
        }
    };
    drop(table);

    // Split: a pinned subset, the weighted split, or every endpoint.
    let pool = match svc.pool(&req) {
        Ok(pool) => pool,
        Err((kind, detail)) => return Ok(kind.response(&detail)),
    };

    // Admit: shed at once when the service is at its concurrency limit.
    let Some(permit) = svc.admission.try_acquire() else {
        let metrics = &svc.subsets[pool.home()].metrics[direction];
        metrics.upstream_error(ErrorKind::Overloaded);
        metrics.record(CodeClass::Error, start.elapsed().as_secs_f64());
        return Ok(ErrorKind::Overloaded.response(&svc.name));
    };

    // Balance: one endpoint of the pool.
    let Some(member) = pool.pick(start) else {
        let metrics = &svc.subsets[pool.home()].metrics[direction];
        metrics.upstream_error(ErrorKind::NoEndpoints);
        metrics.record(CodeClass::Error, start.elapsed().as_secs_f64());
        return Ok(ErrorKind::NoEndpoints.response(&svc.name));
    };
    let metrics = &svc.subsets[member.subset].metrics[direction];
    let endpoint = member.state.clone();
    let finish = Finish::new(svc.clone(), direction, endpoint.start(), permit);

    // Send, within the request timeout.
    let upgrade = headers::is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    headers::to_upstream(&mut req, svc.protocol, upgrade);
    let sent = tokio::time::timeout(
        svc.request_timeout,
        send::forward(&svc, &endpoint, req, on_upgrade),
    )
    .await;

    // Classify and measure.
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(start);
    let kind = match sent {
        Ok(Ok((mut resp, h1))) => {
            endpoint.observe_rtt(now, elapsed);
            metrics.record(CodeClass::of(resp.status()), elapsed.as_secs_f64());
            headers::from_upstream(&mut resp);
            let finish = finish.with_h1(h1);
            return Ok(resp.map(|body| ResponseBody::upstream(body, finish)));
        }
        Ok(Err(kind)) => kind,
        Err(_elapsed) => ErrorKind::Timeout,
    };
    // A failure counts as a slow answer, so P2C steers away from it.
    endpoint.observe_rtt(now, elapsed.max(svc.connect_timeout));
    metrics.upstream_error(kind);
    metrics.record(CodeClass::Error, elapsed.as_secs_f64());
    tracing::debug!(service = %svc.name, endpoint = %endpoint.addr, reason = kind.reason(), "request failed");
    Ok(kind.response(&svc.name))
}
