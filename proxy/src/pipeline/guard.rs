//! Guard: a service's `guards` (per-route deny and rate limits), compiled
//! with the route rules' matcher; the first guard a request matches either
//! answers it here (deny, or 429 over the rate) or lets it go on.
//!
//! Guards compare the request's path in normal form (`normalize_path`:
//! `%67` is `g`, `//` is `/`, `.` and `..` segments resolved), as
//! written, and as many services read it (`slashes_unescaped`: an escaped
//! slash or a backslash read as `/`, `;` parameters dropped);
//! their own paths are in normal form: a block must not be walked around
//! by spelling the path another way that the service reads as the
//! blocked one. What is forwarded is the path as the client sent it.
//!
//! Rate limits are GCRA token buckets, one atomic word each: one bucket per
//! guard, or 4096 per guard keyed by client address or a header's value
//! (keys that hash alike share one). A guard's buckets survive config
//! updates that keep its match and its limit's settings, wherever the
//! guard moves in the list: `almond block` puts the new guard first, and
//! that must not hand every limited route a fresh burst.

use crate::body::{Completion, ResponseBody};
use crate::observe::metrics::{Metrics, SubsetMetrics};
use crate::outcome::{CodeClass, ERROR_HEADER};
use crate::pipeline::rules::Rules;
use almond_config::{
    canonical_match, normalize_path, slashes_unescaped, Direction, LimitBy, Match, Protocol, Rate,
    Service,
};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use prometheus::IntCounter;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Buckets per keyed limit.
const KEYED_SLOTS: usize = 4096;

/// The subset label guarded answers are counted under.
pub const GUARD_SUBSET: &str = "guard";

/// A service's compiled guards.
pub struct Guards {
    rules: Rules<Action>,
    /// The limiters, by the guard they belong to (reused by the next
    /// table for the same guard, wherever it is in the list).
    limiters: HashMap<Identity, Arc<Limiter>>,
    /// `almond_requests_total{subset="guard"}` and its duration, by
    /// direction.
    metrics: [SubsetMetrics; 2],
    /// `almond_guarded_requests_total{reason="denied"}`.
    denied: IntCounter,
    /// `almond_guarded_requests_total{reason="rate_limited"}`.
    limited: IntCounter,
}

/// What a limiter belongs to: its guard's match and the settings it was
/// built from. Not the guard's place in the list, which shifts whenever
/// another guard comes or goes; a change of rate, burst or key starts a
/// fresh limiter, except a `fleet` limit's share (see [`Identity::shared`]).
#[derive(PartialEq, Eq, Hash)]
struct Identity {
    when: Match,
    rate: Rate,
    burst: u32,
    by: LimitBy,
    fleet: bool,
}

impl Identity {
    fn of(when: &Match, limit: &almond_config::Limit) -> Identity {
        Identity {
            when: when.clone(),
            rate: limit.rate,
            burst: limit.burst(),
            by: limit.by.clone(),
            fleet: limit.scope == almond_config::LimitScope::Fleet,
        }
    }

    /// The same `fleet` limit with another share: the control plane
    /// shares its rate out again whenever proxies come or go, and that
    /// must not hand every client a fresh burst.
    fn shared(&self, other: &Identity) -> bool {
        self.fleet && other.fleet && self.when == other.when && self.by == other.by
    }
}

enum Action {
    Deny { status: StatusCode, body: Bytes },
    Limit(Arc<Limiter>),
}

/// A GCRA rate limiter: each slot holds the theoretical arrival time of
/// the next request, in nanoseconds since `epoch`.
pub struct Limiter {
    by: By,
    interval: u64,
    tolerance: u64,
    epoch: Instant,
    keys: std::hash::RandomState,
    slots: Box<[AtomicU64]>,
}

enum By {
    None,
    ClientIp,
    Header(HeaderName),
}

impl Limiter {
    fn new(limit: &almond_config::Limit) -> Limiter {
        let interval = (limit.rate.per.as_nanos() / u128::from(limit.rate.count)) as u64;
        let tolerance = interval.saturating_mul(u64::from(limit.burst().saturating_sub(1)));
        let (by, slots) = match &limit.by {
            LimitBy::None => (By::None, 1),
            LimitBy::ClientIp => (By::ClientIp, KEYED_SLOTS),
            LimitBy::Header(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => (By::Header(name), KEYED_SLOTS),
                Err(_) => (By::None, 1),
            },
        };
        Limiter {
            by,
            interval: interval.max(1),
            tolerance,
            epoch: Instant::now(),
            keys: std::hash::RandomState::new(),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A limiter for `limit` that goes on from `old` (the same fleet
    /// limit at another share): the same keys in the same buckets, each
    /// bucket's debt kept, but no more than the new burst allows.
    fn carried(limit: &almond_config::Limit, old: &Limiter) -> Limiter {
        let mut new = Limiter::new(limit);
        if new.slots.len() != old.slots.len() {
            return new;
        }
        new.epoch = old.epoch;
        new.keys = old.keys.clone();
        let now = Instant::now()
            .saturating_duration_since(old.epoch)
            .as_nanos() as u64;
        let most = now
            .saturating_add(new.tolerance)
            .saturating_add(new.interval);
        for (to, from) in new.slots.iter().zip(old.slots.iter()) {
            to.store(from.load(Ordering::Relaxed).min(most), Ordering::Relaxed);
        }
        new
    }

    /// Takes one request from the bucket of `req`'s key at `now`, or says
    /// how long until one is free.
    fn take<B>(&self, req: &Request<B>, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        let slot = &self.slots[self.slot(req, peer)];
        let t = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut tat = slot.load(Ordering::Relaxed);
        loop {
            let start = tat.max(t);
            if start - t > self.tolerance {
                return Err(Duration::from_nanos(start - t - self.tolerance));
            }
            match slot.compare_exchange_weak(
                tat,
                start + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

impl Limiter {
    /// The bucket of `req`'s key.
    fn slot<B>(&self, req: &Request<B>, peer: IpAddr) -> usize {
        match &self.by {
            By::None => 0,
            By::ClientIp => self.keys.hash_one(peer) as usize % self.slots.len(),
            By::Header(name) => {
                let value = req.headers().get(name).map(HeaderValue::as_bytes);
                self.keys.hash_one(value.unwrap_or_default()) as usize % self.slots.len()
            }
        }
    }
}

impl Guards {
    /// Compiles `guards` of service `name`; `None` when it has none (a
    /// request then pays one branch). Limiters of guards that `previous`
    /// had too (same match, same limit settings) are kept, buckets and all.
    pub fn build(
        name: &str,
        svc: &Service,
        metrics: &Metrics,
        previous: Option<&Guards>,
    ) -> Option<Guards> {
        let guards = &svc.guards;
        if guards.is_empty() {
            return None;
        }
        // Guarded answers are the proxy's own, never gRPC ones.
        let plain = Service {
            protocol: Protocol::Http1,
            ..svc.clone()
        };
        // Paths in the form requests are compared in (config or a control
        // plane of before may have written them otherwise).
        let whens: Vec<Cow<'_, Match>> = guards.iter().map(|g| canonical_match(&g.when)).collect();
        let mut limiters: HashMap<Identity, Arc<Limiter>> = HashMap::new();
        let actions: Vec<Action> = guards
            .iter()
            .zip(&whens)
            .map(|(guard, when)| match (&guard.limit, &guard.deny) {
                (Some(limit), _) => {
                    // Two guards alike share one limiter: only the first
                    // of them is ever matched.
                    let limiter = limiters
                        .entry(Identity::of(when, limit))
                        .or_insert_with_key(|id| {
                            let before = previous.map(|p| &p.limiters);
                            if let Some(same) = before.and_then(|l| l.get(id)) {
                                return same.clone();
                            }
                            let reshared = (before.into_iter().flatten())
                                .find_map(|(old, limiter)| old.shared(id).then_some(limiter));
                            Arc::new(match reshared {
                                Some(old) => Limiter::carried(limit, old),
                                None => Limiter::new(limit),
                            })
                        });
                    Action::Limit(limiter.clone())
                }
                (None, deny) => {
                    let deny = deny.clone().unwrap_or_default();
                    Action::Deny {
                        status: StatusCode::from_u16(deny.status)
                            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        body: Bytes::from(
                            deny.body
                                .unwrap_or_else(|| "blocked by almond\n".to_owned()),
                        ),
                    }
                }
            })
            .collect();
        let rules = Rules::compile(whens.iter().map(|w| &**w).zip(actions)).heads_as_gets();
        Some(Guards {
            rules,
            limiters,
            metrics: [
                metrics.subset(Direction::Outbound, name, GUARD_SUBSET, &plain),
                metrics.subset(Direction::Inbound, name, GUARD_SUBSET, &plain),
            ],
            denied: metrics.guarded(name, "denied"),
            limited: metrics.guarded(name, "rate_limited"),
        })
    }

    /// The answer for `req` when a guard stops it; `None` lets it go on.
    pub fn check<B, C: Completion>(
        &self,
        req: &Request<B>,
        peer: IpAddr,
        direction: usize,
        start: Instant,
    ) -> Option<Response<ResponseBody<C>>> {
        // Borrowed, not copied, unless the path is spelled oddly. An odd
        // one is also matched as written: the upstream gets it so, and may
        // route it so (`/api/giveaway/..` is `/api/` normalised, but a
        // handler of `/api/giveaway/:id` takes it). One with an escaped
        // slash is also matched with it read as `/`, as nginx and many
        // services read it. The strictest answer of the spellings holds.
        let raw = req.uri().path();
        let path = normalize_path(raw);
        let mut action = self.rules.first_match_at(req, &path);
        if let Cow::Owned(_) = path {
            action = stricter(action, self.rules.first_match_at(req, raw));
        }
        if let Some(slashed) = slashes_unescaped(&path) {
            action = stricter(action, self.rules.first_match_at(req, &slashed));
        }
        let resp = match action? {
            Action::Deny { status, body } => {
                self.denied.inc();
                answer(*status, body.clone(), "denied")
            }
            Action::Limit(limiter) => {
                let wait = limiter.take(req, peer, start).err()?;
                self.limited.inc();
                let mut resp = answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    Bytes::from_static(b"almond: rate limited\n"),
                    "rate-limited",
                );
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                resp
            }
        };
        let class = CodeClass::of(resp.status());
        self.metrics[direction].record(class, start.elapsed().as_secs_f64());
        Some(resp)
    }
}

/// The stricter of two guards' answers: a deny over a limit over none;
/// `first` when they are alike.
fn stricter<'a>(first: Option<&'a Action>, other: Option<&'a Action>) -> Option<&'a Action> {
    match (first, other) {
        (None | Some(Action::Limit(_)), Some(deny @ Action::Deny { .. })) => Some(deny),
        (None, other) => other,
        (kept, _) => kept,
    }
}

fn answer<C: Completion>(
    status: StatusCode,
    body: Bytes,
    reason: &'static str,
) -> Response<ResponseBody<C>> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, burst: u32, by: LimitBy) -> Limiter {
        Limiter::new(&almond_config::Limit {
            rate: almond_config::Rate::parse(rate).unwrap(),
            burst: Some(burst),
            by,
            scope: almond_config::LimitScope::Proxy,
            shared_by: None,
        })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = limiter("10/s", 3, LimitBy::None);
        let req = Request::new(());
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t0 = l.epoch + Duration::from_secs(1);
        assert!((0..3).all(|_| l.take(&req, ip, t0).is_ok()));
        let wait = l.take(&req, ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(l.take(&req, ip, t0 + Duration::from_millis(100)).is_ok());
        assert!(l.take(&req, ip, t0 + Duration::from_millis(100)).is_err());
        // After a quiet spell the burst is back, not more.
        let later = t0 + Duration::from_secs(10);
        assert!((0..3).all(|_| l.take(&req, ip, later).is_ok()));
        assert!(l.take(&req, ip, later).is_err());
    }

    /// A fleet limit shared out again (a proxy came: 2 shares become 3)
    /// keeps its buckets: a client at its limit stays limited, rather than
    /// getting a fresh burst each time the fleet changes.
    #[test]
    fn a_fleet_limit_shared_out_again_keeps_its_buckets() {
        let fleet: almond_config::Limit =
            serde_json::from_str(r#"{"rate": "2/min", "by": "client_ip", "scope": "fleet"}"#)
                .unwrap();
        let guards = |limit: almond_config::Limit, previous: Option<&Guards>| {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "endpoints": [{ "addr": "127.0.0.1:1" }],
                "guards": [{ "match": { "path_prefix": "/x" }, "limit": limit }],
            }))
            .unwrap();
            Guards::build("web", &svc, &Metrics::new().unwrap(), previous).unwrap()
        };
        let limiter = |g: &Guards| match &g
            .rules
            .first_match_at(&Request::get("/x").body(()).unwrap(), "/x")
        {
            Some(Action::Limit(l)) => l.clone(),
            _ => panic!("no limit"),
        };
        let two = guards(fleet.shared(2), None);
        let req = Request::new(());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let l = limiter(&two);
        let now = Instant::now();
        assert!(l.take(&req, ip, now).is_ok());
        assert!(l.take(&req, ip, now).is_err(), "1/min, burst 1");
        let three = guards(fleet.shared(3), Some(&two));
        assert!(
            limiter(&three).take(&req, ip, now).is_err(),
            "a fresh burst"
        );
        // A limit of another kind is another limiter.
        let own = guards(fleet.shared(1), Some(&three));
        assert!(limiter(&own).take(&req, ip, now).is_err());
        let mut proxy = fleet.clone();
        proxy.scope = almond_config::LimitScope::Proxy;
        assert!(limiter(&guards(proxy, Some(&own)))
            .take(&req, ip, now)
            .is_ok());
    }

    #[test]
    fn keyed_buckets_are_separate() {
        let l = limiter("1/min", 1, LimitBy::Header("x-user".into()));
        let user = |u: &str| Request::builder().header("x-user", u).body(()).unwrap();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t = l.epoch + Duration::from_secs(1);
        // Another key in another slot (keys that hash alike share one).
        let a = user("a");
        let b = (0..)
            .map(|i| user(&format!("b{i}")))
            .find(|b| l.slot(b, ip) != l.slot(&a, ip))
            .unwrap();
        assert!(l.take(&a, ip, t).is_ok());
        assert!(l.take(&a, ip, t).is_err());
        assert!(l.take(&b, ip, t).is_ok());
        let by_ip = limiter("1/min", 1, LimitBy::ClientIp);
        let any = Request::new(());
        let other: IpAddr = (1..=255u8)
            .map(|i| IpAddr::from([10, 0, 0, i]))
            .find(|o| by_ip.slot(&any, *o) != by_ip.slot(&any, ip))
            .unwrap();
        assert!(by_ip.take(&any, ip, t).is_ok());
        assert!(by_ip.take(&any, other, t).is_ok());
        assert!(by_ip.take(&any, ip, t).is_err());
    }
}
