//! Health: what runs beside the request path to keep pools honest --
//! active health checks (`health_check`) feeding the ejection state, and
//! the closing of HTTP/1.1 connections idle longer than `timeouts.idle`.

use crate::body::RequestBody;
use crate::pipeline::route::ServiceRoute;
use crate::upstream::balance::Member;
use crate::upstream::connect::send_on;
use crate::upstream::endpoint::EndpointState;
use crate::Shared;
use almond_config::{HealthCheck, Protocol};
use http::{header, Request};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often due checks are looked for: the granularity of `interval`.
const TICK: Duration = Duration::from_millis(50);
/// How often idle connections are swept.
const SWEEP: Duration = Duration::from_secs(1);
/// The `User-Agent` of health check requests.
const USER_AGENT: &str = "almond-health-check";

/// Runs checks and sweeps until `stop` turns true.
pub async fn maintain(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sweep = Instant::now() + SWEEP;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let table = shared.table.load_full();
        let now = Instant::now();
        let now_ns = crate::clock::nanos_since_epoch(now);
        for svc in table.services() {
            let Some(hc) = &svc.health_check else {
                continue;
            };
            for (index, m) in svc.all.members().iter().enumerate() {
                if m.state.health.claim_check(now_ns) {
                    let next = NextCheck {
                        state: m.state.clone(),
                        interval: hc.interval,
                    };
                    let svc = svc.clone();
                    tokio::spawn(async move {
                        check(svc, index).await;
                        drop(next);
                    });
                }
            }
        }
        if now >= next_sweep {
            next_sweep = now + SWEEP;
            for svc in table.services() {
                for m in svc.all.members() {
                    m.state.conns.close_idle(now, svc.target.idle_timeout);
                }
            }
        }
    }
}

/// Makes an endpoint's next check due `interval` after its check ends,
/// however the check ends (done, or its task dropped): one check at a
/// time per endpoint.
struct NextCheck {
    state: Arc<EndpointState>,
    interval: Duration,
}

impl Drop for NextCheck {
    fn drop(&mut self) {
        let now_ns = crate::clock::nanos_since_epoch(Instant::now());
        self.state.health.check_done(now_ns, self.interval);
    }
}

/// Checks member `index` of `svc` once and feeds the result to its
/// ejection state: `unhealthy` failures in a row take it out (as far as
/// `max_ejection_percent` allows) until `healthy` passes in a row return
/// it; meanwhile no real request probes it back, however long its
/// ejection was.
async fn check(svc: Arc<ServiceRoute>, index: usize) {
    let (Some(hc), Some(m)) = (&svc.health_check, svc.all.members().get(index)) else {
        return;
    };
    let passed = probe(&svc, hc, m).await;
    let state: &EndpointState = &m.state;
    let in_row = state.health.count_check(passed);
    let Some(subset) = svc.subsets.get(m.subset) else {
        return;
    };
    let now = Instant::now();
    if passed {
        if in_row >= hc.healthy {
            state.health.checks_recovered();
            if state.health.is_out() {
                svc.outlier.restore(
                    state,
                    now,
                    &subset.pool,
                    &subset.ejection,
                    &svc.name,
                    "health check passed",
                );
            }
        }
    } else {
        tracing::debug!(service = %svc.name, endpoint = %state.addr, in_row, "health check failed");
        if in_row >= hc.unhealthy {
            let ejected = svc.outlier.check_failed(
                state,
                now,
                &subset.pool,
                &subset.ejection,
                &svc.name,
                in_row,
            );
            if let Some(until) = ejected {
                svc.note_ejection(m.subset, until);
            }
        }
    }
}

/// One check within `timeout`: a TCP connect, or `GET path` on a
/// connection of its own (TLS and protocol as the service's requests)
/// answered 2xx or 3xx.
async fn probe(svc: &ServiceRoute, hc: &HealthCheck, m: &Member) -> bool {
    let attempt = async {
        let Some(path) = &hc.path else {
            return TcpStream::connect(m.state.addr).await.is_ok();
        };
        let mut req = Request::new(RequestBody::Replay(None));
        // HTTP/1.1: origin form and `Host`; HTTP/2: the `:authority`.
        let target = match svc.target.protocol {
            Protocol::Http1 => path.parse(),
            Protocol::Http2 => format!("http://{}{path}", svc.name).parse(),
        };
        let Ok(target) = target else {
            return false;
        };
        *req.uri_mut() = target;
        let headers = req.headers_mut();
        if svc.target.protocol == Protocol::Http1 {
            if let Ok(host) = http::HeaderValue::from_str(&svc.name) {
                headers.insert(header::HOST, host);
            }
        }
        headers.insert(
            header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        );
        let status = match svc.target.protocol {
            Protocol::Http1 => {
                let Ok(mut sender) = m
                    .state
                    .conns
                    .connect_h1(hc.timeout, svc.target.tls.as_deref())
                    .await
                else {
                    return false;
                };
                sender.send_request(req).await.ok().map(|r| r.status())
            }
            Protocol::Http2 => {
                let Ok(mut sender) = m
                    .state
                    .conns
                    .connect_h2(hc.timeout, svc.target.tls.as_deref(), None)
                    .await
                else {
                    return false;
                };
                *req.version_mut() = http::Version::HTTP_2;
                if !sender.ready().await {
                    return false;
                }
                send_on(&mut sender, req, &[])
                    .await
                    .ok()
                    .map(|r| r.status())
            }
        };
        status.is_some_and(|s| s.is_success() || s.is_redirection())
    };
    tokio::time::timeout(hc.timeout, attempt)
        .await
        .unwrap_or(false)
}
