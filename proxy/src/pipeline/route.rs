//! Route: the immutable table that maps a request to a service and a pool.
//!
//! Built off the hot path from a config (or, later, a snapshot), published
//! through one `ArcSwap`; a request loads it once and takes no lock.
//! Per-endpoint state and per-service admission counters are carried over
//! from the previous table by address and by name.

use crate::headers::SUBSET;
use crate::identity::tls::{Tls, Upstream};
use crate::limit::Admission;
use crate::observe::metrics::{EjectionMetrics, Metrics, SubsetMetrics};
use crate::outcome::ErrorKind;
use crate::pipeline::guard::Guards;
use crate::pipeline::retry::RetryPolicy;
use crate::pipeline::rules::Rules;
use crate::pipeline::split::Split;
use crate::upstream::balance::{Member, Pool};
use crate::upstream::eject::{Outlier, Peers};
use crate::upstream::endpoint::EndpointState;
use crate::upstream::send::Target;
use almond_config::{Direction, Lb, ProxyConfig, Service};
use http::Request;
use prometheus::{IntCounter, IntGauge};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Endpoint state by service, address and connection key (see
/// [`ServiceRoute::conn_key`]).
type States = HashMap<(Box<str>, SocketAddr, Option<Arc<str>>), Arc<EndpointState>>;

/// Everything routing needs, for one config.
pub struct Table {
    services: HashMap<Box<str>, Arc<ServiceRoute>>,
    /// Per listener (config order): its bound service, if any.
    listeners: Vec<ListenerRoute>,
    /// The config this table was built from (for `/config`).
    pub config: Arc<ProxyConfig>,
}

/// What a listener does with a request.
pub struct ListenerRoute {
    /// The metric direction of its traffic.
    pub direction: Direction,
    /// `Some`: everything goes to this service; `None`: route by host.
    pub service: Option<Box<str>>,
    /// That service, found once when the table is built rather than by
    /// name on every request (`None` if this table has no such service).
    pub bound: Option<Arc<ServiceRoute>>,
    /// Client-sent `x-almond-*` headers are acted on (else removed).
    pub trust_routing_headers: bool,
    /// Inbound listeners: the `X-Forwarded-Proto` they set (`http`,
    /// `https`), with the peer appended to `X-Forwarded-For`.
    pub forwarded_proto: Option<&'static str>,
}

/// One service, ready to serve requests.
pub struct ServiceRoute {
    /// The service's name.
    pub name: Arc<str>,
    /// How its endpoints are reached (protocol, connect, TLS).
    pub target: Target,
    /// Time allowed until response headers.
    pub request_timeout: Duration,
    /// A response body with no byte for this long is ended.
    pub body_idle: Duration,
    /// What, besides the service and the address, makes a connection to an
    /// endpoint of this service: the TLS server name, `None` for plaintext.
    /// Endpoint state (health, latency, pooled connections) is the
    /// service's own, carried to the next table only under the same key.
    pub conn_key: Option<Arc<str>>,
    /// The service's subsets, in name order.
    pub subsets: Vec<SubsetRoute>,
    /// All endpoints together (used when there is no split).
    pub all: Pool,
    /// The weighted split over subsets, if configured.
    pub split: Option<Split>,
    /// Route rules (`routes`), compiled: where a matching request goes.
    pub rules: Rules<RouteTarget>,
    /// Guards (`guards`), compiled; `None` when it has none.
    pub guards: Option<Guards>,
    /// Traffic mirroring (`mirror`), if configured.
    pub mirror: Option<MirrorPolicy>,
    /// Concurrency limit (`circuit_breaker.max_requests`).
    pub admission: Arc<Admission>,
    /// Failure accrual and ejection.
    pub outlier: Outlier,
    /// Active health checks, if configured.
    pub health_check: Option<almond_config::HealthCheck>,
    /// Retry policy and budget.
    pub retry: RetryPolicy,
    /// `almond_retries_total{service}`.
    pub retries: IntCounter,
    /// In-flight gauges, by direction (outbound, inbound).
    pub in_flight: [IntGauge; 2],
    /// Who may call it on inbound listeners (`authz.allow`), if set.
    pub authz: Option<Arc<[String]>>,
    /// The same service in the table that replaced this one: an ejection
    /// a request of this table records is noted there too, or no request
    /// of the new table would claim the endpoint's probe when it is due.
    successor: OnceLock<Weak<ServiceRoute>>,
}

/// A request's service after its route rules, and the subset a rule
/// picked, if any.
pub type Destination<'a> = (&'a Arc<ServiceRoute>, Option<usize>);

/// A service's `mirror`, resolved: where copies go, how many, and the
/// handles they are counted with (see `pipeline/mirror.rs`).
pub struct MirrorPolicy {
    /// The target service (this one for a subset target).
    pub service: Box<str>,
    /// The target subset's index, or `None` for the target's split.
    pub subset: Option<usize>,
    /// A request is copied when a draw in `[0, 1)` is below this.
    pub share: f64,
    /// Copies in flight (`max_in_flight`).
    pub in_flight: Arc<Admission>,
    /// Copies waiting for a new upstream connection: the mirror's own
    /// `max_pending` (as many as may be in flight).
    pub pending: Arc<Admission>,
    /// Golden metrics with `direction="mirror"`, by the target's subset
    /// index.
    pub metrics: Box<[SubsetMetrics]>,
    /// The mirror names a subset the target has no endpoints in (a
    /// snapshot may deliver that): copies are dropped, never sent to the
    /// target's split instead.
    pub subset_missing: bool,
    /// `almond_mirror_dropped_total{reason="full"}`, `{reason="body"}`
    /// and `{reason="subset"}`.
    pub dropped_full: IntCounter,
    /// See `dropped_full`.
    pub dropped_body: IntCounter,
    /// See `dropped_full`.
    pub dropped_subset: IntCounter,
}

/// Where a route rule sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// This service's subset at this index.
    Subset(usize),
    /// Another service, by name (its split applies).
    Service(Box<str>),
    /// The split (a rule's subset that has no endpoints now).
    Split,
}

/// One subset of a service.
pub struct SubsetRoute {
    /// Its name (e.g. `v2`).
    pub name: Arc<str>,
    /// Its endpoints.
    pub pool: Pool,
    /// Metric handles by direction (outbound, inbound).
    pub metrics: [SubsetMetrics; 2],
    /// Ejection counter and endpoint-state gauges.
    pub ejection: EjectionMetrics,
}

impl Table {
    /// Builds a table from a checked config, carrying state over from
    /// `previous` for endpoints and services that stay.
    pub fn build(config: Arc<ProxyConfig>, metrics: &Metrics, previous: Option<&Table>) -> Table {
        Table::build_tls(config, metrics, previous, None)
    }

    /// [`Table::build`] for a proxy with an mTLS identity, which services
    /// with `tls` connect with.
    pub fn build_tls(
        config: Arc<ProxyConfig>,
        metrics: &Metrics,
        previous: Option<&Table>,
        tls: Option<&Arc<Tls>>,
    ) -> Table {
        let mut states: States = HashMap::new();
        let mut admissions: HashMap<&str, (Arc<Admission>, Arc<Admission>)> = HashMap::new();
        let mut guards: HashMap<&str, &Guards> = HashMap::new();
        if let Some(prev) = previous {
            for svc in prev.services.values() {
                if let Some(g) = &svc.guards {
                    guards.insert(&svc.name, g);
                }
                admissions.insert(
                    &svc.name,
                    (svc.admission.clone(), svc.target.pending.clone()),
                );
                for m in svc.all.members() {
                    let key = (Box::from(&*svc.name), m.state.addr, svc.conn_key.clone());
                    states.insert(key, m.state.clone());
                }
            }
        }
        let local_zone = config.local_zone();
        let services = config
            .services
            .iter()
            .map(|(name, svc)| {
                let admission = admissions.get(name.as_str()).cloned();
                let zone = (local_zone.as_deref(), config.zone_min_healthy);
                let mut route =
                    ServiceRoute::build(name, svc, metrics, &mut states, admission, zone);
                let kept = guards.get(name.as_str()).copied();
                route.guards = Guards::build(name, svc, metrics, kept);
                let before = previous.and_then(|p| p.services.get(name.as_str()));
                if let Some(before) = before {
                    route.retry.carry_budget(&before.retry);
                }
                route.target.tls = svc.tls.as_ref().map(|t| upstream_tls(name, t, tls));
                let carried = (before.and_then(|s| s.mirror.as_ref())).map(|m| m.in_flight.clone());
                route.mirror = (svc.mirror.as_ref())
                    .map(|m| mirror_policy(name, m, &config, metrics, carried));
                let route = Arc::new(route);
                if let Some(before) = before {
                    let _ = before.successor.set(Arc::downgrade(&route));
                }
                (Box::from(name.as_str()), route)
            })
            .collect();
        if let Some(prev) = previous {
            forget_stale(prev, &services, metrics);
        }
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRoute {
                direction: l.direction,
                service: l.service.as_deref().map(Box::from),
                bound: (l.service.as_deref()).and_then(|name| {
                    let found = services.get(name);
                    found
                        .or_else(|| services.get(name.to_ascii_lowercase().as_str()))
                        .cloned()
                }),
                trust_routing_headers: l.trusts_routing_headers(),
                forwarded_proto: (l.direction == Direction::Inbound).then_some(if l.tls {
                    "https"
                } else {
                    "http"
                }),
            })
            .collect();
        Table {
            services,
            listeners,
            config,
        }
    }

    /// The listener at `index` (as bound, in config order).
    pub fn listener(&self, index: usize) -> Option<&ListenerRoute> {
        self.listeners.get(index)
    }

    /// Finds the service of a request on a listener: the listener's bound
    /// service, else the `Host` / `:authority` without its port. Host names
    /// are case-insensitive and service names are lower case (the config
    /// check refuses others, the control plane leaves them out), so the
    /// host is looked up as sent, then in lower case.
    pub fn service<'a, B>(
        &'a self,
        listener: &'a ListenerRoute,
        req: &Request<B>,
    ) -> Result<&'a Arc<ServiceRoute>, (ErrorKind, String)> {
        let name: &str = match (&listener.bound, &listener.service) {
            (Some(svc), _) => return Ok(svc),
            (None, Some(name)) => name,
            (None, None) => match host(req) {
                Some(h) => h,
                None => return Err((ErrorKind::BadRequest, "no Host header or :authority".into())),
            },
        };
        if let Some(svc) = self.services.get(name) {
            return Ok(svc);
        }
        let lower = name.to_ascii_lowercase();
        self.services
            .get(lower.as_str())
            .ok_or((ErrorKind::UnknownService, lower))
    }

    /// Applies `svc`'s route rules to `req`: the service it goes to (`svc`
    /// or the one a rule names) and the subset a rule picked, if any.
    pub fn apply_rules<'a, B>(
        &'a self,
        svc: &'a Arc<ServiceRoute>,
        req: &Request<B>,
    ) -> Result<Destination<'a>, (ErrorKind, String)> {
        match svc.rules.first_match(req) {
            None | Some(RouteTarget::Split) => Ok((svc, None)),
            Some(RouteTarget::Subset(i)) => Ok((svc, Some(*i))),
            Some(RouteTarget::Service(name)) => match self.services.get(name) {
                Some(other) => Ok((other, None)),
                None => Err((ErrorKind::UnknownService, name.to_string())),
            },
        }
    }

    /// A service by name.
    pub fn service_named(&self, name: &str) -> Option<&Arc<ServiceRoute>> {
        self.services.get(name)
    }

    /// Every service, by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceRoute>> {
        self.services.values()
    }

    /// Sets every subset's `almond_endpoints` gauges from its endpoints'
    /// state at `now_ns` (for a scrape): an ejection whose time ran out
    /// stops counting then, not when a request probes the endpoint, which
    /// a quiet service may never send.
    pub fn refresh_endpoint_gauges(&self, now_ns: u64) {
        for svc in self.services.values() {
            for s in &svc.subsets {
                s.ejection.update(s.pool.out_of(now_ns));
            }
        }
    }
}

/// A service's upstream TLS: its `server_name` (default: the service's
/// name) and the proxy's identity.
fn upstream_tls(
    service: &str,
    options: &almond_config::UpstreamTls,
    tls: Option<&Arc<Tls>>,
) -> Arc<Upstream> {
    let name = options.server_name.as_deref().unwrap_or(service).to_owned();
    let server_name = rustls::pki_types::ServerName::try_from(name).unwrap_or_else(|e| {
        tracing::warn!(service, error = %e, "tls.server_name is not a DNS name or IP address");
        rustls::pki_types::ServerName::from(std::net::IpAddr::from([0, 0, 0, 0]))
    });
    if tls.is_none() {
        tracing::warn!(
            service,
            "service asks for tls, but the proxy has no `tls` identity"
        );
    }
    Arc::new(Upstream {
        tls: tls.cloned(),
        server_name,
    })
}

/// Resolves service `name`'s `mirror` against the config: the target's
/// subset index and its `direction="mirror"` handles. `carried`: the
/// previous table's in-flight count, so copies in flight stay counted.
fn mirror_policy(
    name: &str,
    m: &almond_config::Mirror,
    config: &ProxyConfig,
    metrics: &Metrics,
    carried: Option<Arc<Admission>>,
) -> MirrorPolicy {
    let target = m.service.as_deref().unwrap_or(name);
    let target_svc = config.services.get(target);
    let subsets = target_svc.map(subset_names).unwrap_or_default();
    let subset = (m.subset.as_ref()).and_then(|want| subsets.iter().position(|s| s == want));
    let in_flight = match carried {
        Some(a) => {
            a.set_limit(m.max_in_flight);
            a
        }
        None => Arc::new(Admission::new(m.max_in_flight)),
    };
    MirrorPolicy {
        service: target.into(),
        subset_missing: m.subset.is_some() && subset.is_none(),
        subset,
        share: m.percent / 100.0,
        pending: Arc::new(Admission::new(m.max_in_flight)),
        in_flight,
        metrics: match target_svc {
            Some(t) => (subsets.iter())
                .map(|s| metrics.subset_labeled("mirror", target, s, t))
                .collect(),
            None => Box::default(),
        },
        dropped_full: metrics.mirror_dropped(name, "full"),
        dropped_body: metrics.mirror_dropped(name, "body"),
        dropped_subset: metrics.mirror_dropped(name, "subset"),
    }
}

/// Drops the series of services, subsets and splits the new table no
/// longer has.
fn forget_stale(prev: &Table, next: &HashMap<Box<str>, Arc<ServiceRoute>>, metrics: &Metrics) {
    for (name, old) in &prev.services {
        let new = next.get(name);
        if new.is_none() {
            metrics.forget_service(name);
        }
        // The service gone: its guards' series too (requests, duration
        // and errors under `subset="guard"`, and the guarded counters).
        // A service that stays keeps them, as its other counters (a
        // counter that vanished would read as a reset).
        if old.guards.is_some() && new.is_none() {
            metrics.forget_subset(name, crate::pipeline::guard::GUARD_SUBSET);
            metrics.forget_guarded(name);
        }
        for subset in &old.subsets {
            let kept = new.and_then(|n| n.subsets.iter().find(|s| s.name == subset.name));
            match (kept, new) {
                (None, _) => metrics.forget_subset(name, &subset.name),
                (Some(_), Some(n)) if n.split.is_none() && old.split.is_some() => {
                    metrics.forget_split(name, &subset.name)
                }
                _ => {}
            }
        }
    }
}

/// The request's host without a port: the URI's authority (HTTP/2, or an
/// absolute-form HTTP/1.1 target), else the `Host` header.
fn host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().authority() {
        Some(a) => a.host(),
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    // Strip a port; keep IPv6 brackets intact.
    let h = match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    };
    (!h.is_empty()).then_some(h)
}

/// The pool members of service `name` in subset `filter` (`None`: all),
/// their state carried over from `states` by service, address and
/// connection key, marked local when in `zone`.
fn members(
    name: &str,
    svc: &Service,
    subset_names: &[&str],
    filter: Option<&str>,
    (zone, conn_key): (Option<&str>, &Option<Arc<str>>),
    states: &mut States,
) -> Vec<Member> {
    svc.endpoints
        .iter()
        .filter(|e| filter.is_none_or(|f| e.subset == f))
        .map(|e| Member {
            state: {
                let state = states
                    .entry((Box::from(name), e.addr, conn_key.clone()))
                    .or_insert_with(|| Arc::new(EndpointState::new(e.addr)));
                // Checks turned off: none is left to return an endpoint
                // their failures hold out.
                if svc.health_check.is_none() {
                    state.health.checks_stopped();
                }
                state.clone()
            },
            weight: e.weight,
            local: zone.is_some() && e.zone.as_deref() == zone,
            subset: subset_names
                .iter()
                .position(|s| *s == e.subset)
                .unwrap_or(0),
        })
        .collect()
}

/// The service's route rules, compiled, their subsets resolved to
/// indexes of `subset_names` (an unknown subset: the split decides).
fn route_rules(svc: &Service, subset_names: &[&str]) -> Rules<RouteTarget> {
    Rules::compile(svc.routes.iter().map(|r| {
        let to = match (&r.to.subset, &r.to.service) {
            (_, Some(service)) => RouteTarget::Service(service.as_str().into()),
            (Some(subset), None) => match subset_names.iter().position(|s| s == subset) {
                Some(i) => RouteTarget::Subset(i),
                None => RouteTarget::Split,
            },
            (None, None) => RouteTarget::Split,
        };
        (&r.when, to)
    }))
}

/// A service's subset names, sorted: those of its endpoints. A split none
/// of whose subsets above 0 % has an endpoint (every v1 instance critical
/// under `v1=100 v2=0`) adds them, empty: its requests get 503
/// `no-endpoints` counted under the subsets they were meant for, where
/// the service's error rate (and its alert) can see them. (While one of
/// them has endpoints, the split's others are left out: their share goes
/// to it.) No endpoints and no split: one empty subset, likewise.
fn subset_names(svc: &Service) -> Vec<&str> {
    let mut names: Vec<&str> = svc.endpoints.iter().map(|e| e.subset.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if let Some(split) = &svc.split {
        let mut weighted = (split.weights.iter()).filter(|(_, w)| **w > 0);
        if !weighted.any(|(s, _)| names.binary_search(&s.as_str()).is_ok()) {
            let meant = (split.weights.iter()).filter(|(_, w)| **w > 0);
            names.extend(meant.map(|(s, _)| s.as_str()));
            names.sort_unstable();
        }
    }
    if names.is_empty() {
        names.push(almond_config::DEFAULT_SUBSET);
    }
    names
}

/// A service's concurrency limits (`max_requests`, `max_pending`): the
/// previous table's, set to the new numbers (requests in flight stay
/// counted), or new ones.
fn limits(
    previous: Option<(Arc<Admission>, Arc<Admission>)>,
    cb: &almond_config::CircuitBreaker,
) -> (Arc<Admission>, Arc<Admission>) {
    match previous {
        Some((admission, pending)) => {
            admission.set_limit(cb.max_requests);
            pending.set_limit(cb.max_pending);
            (admission, pending)
        }
        None => (
            Arc::new(Admission::new(cb.max_requests)),
            Arc::new(Admission::new(cb.max_pending)),
        ),
    }
}

impl SubsetRoute {
    /// Subset `subset` of service `name` over `pool`, its metric handles
    /// resolved and its split weight and endpoint gauges set.
    fn build(
        name: &str,
        svc: &Service,
        subset: &str,
        pool: Pool,
        metrics: &Metrics,
    ) -> SubsetRoute {
        if let Some(split) = &svc.split {
            let weight = split.weights.get(subset).copied().unwrap_or(0);
            metrics.set_split_weight(name, subset, weight);
        }
        let ejection = metrics.ejection(name, subset);
        let now_ns = crate::clock::nanos_since_epoch(tokio::time::Instant::now());
        ejection.update(pool.out_of(now_ns));
        SubsetRoute {
            name: Arc::from(subset),
            pool,
            metrics: [
                metrics.subset(Direction::Outbound, name, subset, svc),
                metrics.subset(Direction::Inbound, name, subset, svc),
            ],
            ejection,
        }
    }
}

impl ServiceRoute {
    fn build(
        name: &str,
        svc: &Service,
        metrics: &Metrics,
        states: &mut States,
        admission: Option<(Arc<Admission>, Arc<Admission>)>,
        (zone, zone_min_healthy): (Option<&str>, u32),
    ) -> ServiceRoute {
        let cb = &svc.circuit_breaker;
        // Zones split a pool after the split chose its subset, so a
        // canary's share holds whatever the zones do.
        let health = |pool: Pool| {
            pool.with_health(cb.panic_threshold, svc.timeouts.request)
                .with_zones(zone_min_healthy, || metrics.zone_requests(name))
        };
        let subset_names = subset_names(svc);
        // Endpoint state carries over from the previous table by service,
        // address and connection key: TLS on or off, or another server
        // name, means other connections. Two services at one address (two
        // sites behind one server) do not share it: one's failures do not
        // eject the other's endpoint (as Envoy's clusters).
        let conn_key: Option<Arc<str>> = svc
            .tls
            .as_ref()
            .map(|t| Arc::from(t.server_name.as_deref().unwrap_or(name)));
        let members_of = |filter: Option<&str>, states: &mut States| {
            members(name, svc, &subset_names, filter, (zone, &conn_key), states)
        };
        let subsets: Vec<SubsetRoute> = (subset_names.iter().enumerate())
            .map(|(index, &subset)| {
                let pool = health(Pool::new(members_of(Some(subset), states), svc.lb, index));
                SubsetRoute::build(name, svc, subset, pool, metrics)
            })
            .collect();
        let split = svc
            .split
            .as_ref()
            .map(|s| Split::new(&s.weights, &subset_names).sticky_on(s.sticky_header.as_deref()));
        let all = health(Pool::new(members_of(None, states), svc.lb, 0));
        let (admission, pending) = limits(admission, cb);
        let rules = route_rules(svc, &subset_names);
        ServiceRoute {
            name: Arc::from(name),
            target: Target {
                protocol: svc.protocol,
                connect_timeout: svc.timeouts.connect,
                idle_timeout: svc.timeouts.idle,
                pending,
                tls: None,
            },
            request_timeout: svc.timeouts.request,
            body_idle: svc.timeouts.body_idle,
            conn_key,
            subsets,
            all,
            split,
            rules,
            guards: None,
            mirror: None,
            admission,
            outlier: Outlier::new(cb, svc.timeouts.request),
            health_check: svc.health_check.clone(),
            authz: svc.authz.as_ref().map(|a| a.allow.as_slice().into()),
            retry: RetryPolicy::new(&svc.retries),
            retries: metrics.retries(name),
            in_flight: [
                metrics.in_flight(Direction::Outbound, name),
                metrics.in_flight(Direction::Inbound, name),
            ],
            successor: OnceLock::new(),
        }
    }

    /// The pool a request goes to: the pinned subset, the subset a route
    /// rule picked (`routed`), the split's pick, or every endpoint. `Err`
    /// names an unknown pinned subset.
    pub fn pool<B>(
        &self,
        req: &Request<B>,
        routed: Option<usize>,
    ) -> Result<&Pool, (ErrorKind, String)> {
        if let Some(pin) = req.headers().get(&SUBSET) {
            let pin = pin.to_str().unwrap_or("");
            return self
                .subsets
                .iter()
                .find(|s| &*s.name == pin)
                .map(|s| &s.pool)
                .ok_or_else(|| (ErrorKind::UnknownSubset, pin.to_owned()));
        }
        if let Some(s) = routed.and_then(|i| self.subsets.get(i)) {
            return Ok(&s.pool);
        }
        match &self.split {
            Some(split) => {
                // No subset the split gives traffic to is here (weights
                // all 0): none goes to one it gives none. (Subsets meant
                // but without endpoints are here, empty: see
                // `subset_names`.)
                match split
                    .pick_for(req.headers())
                    .and_then(|i| self.subsets.get(i))
                {
                    Some(s) => Ok(&s.pool),
                    None => Err((
                        ErrorKind::NoEndpoints,
                        format!("{} (in the subsets its split gives traffic to)", self.name),
                    )),
                }
            }
            None => Ok(&self.all),
        }
    }

    /// Feeds one try's outcome at `endpoint` (of subset `subset`) to
    /// failure accrual (one that says nothing of the endpoint, see
    /// [`ErrorKind::about_endpoint`], is left out); a new ejection is noted
    /// in both pools it is in, so its probe goes out when the ejection ends
    /// whatever the balancer. Returns whether it counts as a failure.
    pub fn record_outcome(
        &self,
        subset: usize,
        endpoint: &EndpointState,
        result: Result<u16, ErrorKind>,
        now: tokio::time::Instant,
    ) -> bool {
        if !ErrorKind::about_endpoint(result) {
            return false;
        }
        let failed = self.outlier.is_failure(result);
        let Some(s) = self.subsets.get(subset) else {
            return failed;
        };
        let at_once = self.outlier.ejects_at_once(result);
        let ejected = self.outlier.record(
            endpoint,
            failed,
            at_once,
            now,
            &s.pool,
            &s.ejection,
            &self.name,
        );
        if let Some(until) = ejected {
            self.note_ejection(subset, until);
        }
        failed
    }

    /// `subset`'s endpoint is out until `until`: both pools probe it then,
    /// in this table and in those that replaced it (a request outlives its
    /// table).
    pub fn note_ejection(&self, subset: usize, until: u64) {
        self.note_here(Some(subset), until);
        // The subset by name: a later table may number them otherwise.
        let name = self.subsets.get(subset).map(|s| &s.name);
        let mut next = self.successor.get().and_then(Weak::upgrade);
        while let Some(route) = next {
            let index = name.and_then(|n| route.subsets.iter().position(|s| &s.name == n));
            route.note_here(index, until);
            next = route.successor.get().and_then(Weak::upgrade);
        }
    }

    fn note_here(&self, subset: Option<usize>, until: u64) {
        if let Some(s) = subset.and_then(|i| self.subsets.get(i)) {
            s.pool.note_ejection(until);
        }
        self.all.note_ejection(until);
    }

    /// The load-balancing algorithm (for `/endpoints`).
    pub fn lb(&self) -> Lb {
        self.all.lb()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str) -> Request<()> {
        Request::builder()
            .uri("/x")
            .header("host", host)
            .body(())
            .unwrap_or_default()
    }

    /// A try shed by a local limit, or ended by the client's stalled
    /// upload, says nothing of the endpoint: it does not break a run of
    /// failures (nor, were the endpoint out, bring it back).
    #[test]
    fn outcomes_that_are_not_the_endpoint_s_do_not_count_for_it() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }, { addr: 127.0.0.1:2 }, { addr: 127.0.0.1:3 }]\n    \
                    circuit_breaker: { consecutive_failures: 2, max_ejection_percent: 100 }\n";
        let config = Arc::new(almond_config::load_proxy(text, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        let table = Table::build(config, &metrics, None);
        let web = &table.services["web"];
        let endpoint = web.all.members()[0].state.clone();
        let now = tokio::time::Instant::now();
        assert!(web.record_outcome(0, &endpoint, Err(ErrorKind::Reset), now));
        for kind in [ErrorKind::ClientTimeout, ErrorKind::Overloaded] {
            assert!(!web.record_outcome(0, &endpoint, Err(kind), now));
        }
        assert!(web.record_outcome(0, &endpoint, Err(ErrorKind::Reset), now));
        assert!(endpoint.health.is_out(), "two failures in a row eject");
    }

    /// Two services at one address (two sites behind one server): one's
    /// failures eject the endpoint for it alone, in this table and the next.
    #[test]
    fn services_at_one_address_do_not_share_health() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  a:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }, { addr: 127.0.0.1:2 }]\n    \
                    circuit_breaker: { consecutive_failures: 1, max_ejection_percent: 100 }\n  b:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }, { addr: 127.0.0.1:2 }]\n";
        let config = Arc::new(almond_config::load_proxy(text, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        let table = Table::build(config.clone(), &metrics, None);
        let a = &table.services["a"];
        let in_a = a.all.members()[0].state.clone();
        assert!(a.record_outcome(0, &in_a, Err(ErrorKind::Reset), tokio::time::Instant::now()));
        assert!(in_a.health.is_out(), "a's endpoint ejected");
        let out = |t: &Table, svc: &str| {
            let members = t.services[svc].all.members();
            members.iter().filter(|m| m.state.health.is_out()).count()
        };
        assert_eq!(
            out(&table, "b"),
            0,
            "b's endpoint at the same address stays in"
        );
        let next = Table::build(config, &metrics, Some(&table));
        assert_eq!(
            (out(&next, "a"), out(&next, "b")),
            (1, 0),
            "carried per service"
        );
    }

    /// An endpoint held out by its failing health checks is due its probe
    /// once the service's checks are turned off: nothing else would ever
    /// return it.
    #[tokio::test(start_paused = true)]
    async fn turning_health_checks_off_releases_what_they_held_out() {
        let text = |checks: &str| {
            format!(
                "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                 endpoints: [{{ addr: 127.0.0.1:1 }}, {{ addr: 127.0.0.1:2 }}]\n{checks}"
            )
        };
        let checked = text("    health_check: { path: /health }\n");
        let config = Arc::new(almond_config::load_proxy(&checked, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        let table = Table::build(config, &metrics, None);
        let web = &table.services["web"];
        let s = &web.subsets[0];
        let held = web.all.members()[0].state.clone();
        let now = tokio::time::Instant::now();
        let ejected = (web.outlier).check_failed(&*held, now, &s.pool, &s.ejection, "web", 3);
        assert!(ejected.is_some() && held.health.check_failing());
        let unchecked = Arc::new(almond_config::load_proxy(&text(""), "t").unwrap());
        let next = Table::build(unchecked, &metrics, Some(&table));
        let later = now + Duration::from_millis(1);
        let picked = next.services["web"]
            .all
            .pick(later, crate::upstream::balance::Tried::NONE)
            .map(|m| m.state.addr);
        assert_eq!(picked, Some(held.addr), "its probe is due at once");
    }

    /// A request outlives its table: an ejection it records after a new
    /// table came is noted in the new one too, whose next request then
    /// probes the endpoint when its ejection is up (a new table's pools
    /// learn of ejections only when built).
    #[test]
    fn an_ejection_recorded_on_a_replaced_table_is_probed_in_the_new_one() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }, { addr: 127.0.0.1:2 }, { addr: 127.0.0.1:3 }]\n    \
                    circuit_breaker: { consecutive_failures: 1, max_ejection_percent: 100 }\n";
        let config = Arc::new(almond_config::load_proxy(text, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        for _ in 0..8 {
            let old = Table::build(config.clone(), &metrics, None);
            let new = Table::build(config.clone(), &metrics, Some(&old));
            let web = &old.services["web"];
            let failing = web.all.members()[0].state.clone();
            let now = tokio::time::Instant::now();
            assert!(web.record_outcome(0, &failing, Err(ErrorKind::Reset), now));
            assert!(failing.health.is_out());
            let later = now + Duration::from_secs(60);
            let picked = new.services["web"]
                .all
                .pick(later, crate::upstream::balance::Tried::NONE)
                .map(|m| m.state.addr);
            assert_eq!(picked, Some(failing.addr), "the probe is claimed first");
        }
    }

    /// A service with guards that goes leaves no guard series behind in
    /// `/metrics`.
    #[test]
    fn guard_series_go_with_the_service() {
        let with = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }]\n    \
                    guards: [{ match: { path_prefix: /x }, deny: { status: 503 } }]\n";
        let without = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  api:\n    \
                       endpoints: [{ addr: 127.0.0.1:1 }]\n";
        let load = |t: &str| Arc::new(almond_config::load_proxy(t, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        let text = |m: &Metrics| String::from_utf8(m.encode()).unwrap();
        let first = Table::build(load(with), &metrics, None);
        assert!(text(&metrics).contains("subset=\"guard\""));
        assert!(text(&metrics).contains("almond_guarded_requests_total"));
        let _next = Table::build(load(without), &metrics, Some(&first));
        assert!(
            !text(&metrics).contains("subset=\"guard\""),
            "{}",
            text(&metrics)
        );
        assert!(!text(&metrics).contains("almond_guarded_requests_total{"));
    }

    /// A new table keeps a service's retry budget account: a budget spent
    /// stays spent when any service's endpoints change.
    #[test]
    fn the_retry_budget_is_carried_over_to_a_new_table() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  web:\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }]\n    \
                    retries: { attempts: 3, budget_percent: 0, min_per_second: 1 }\n";
        let config = Arc::new(almond_config::load_proxy(text, "t").unwrap());
        let metrics = Metrics::new().unwrap();
        let now = tokio::time::Instant::now();
        let retry = |t: &Table| {
            t.services["web"].retry.allows(
                0,
                &http::Method::GET,
                Err(ErrorKind::Reset),
                (true, || true),
                now,
            )
        };
        let first = Table::build(config.clone(), &metrics, None);
        // The floor: 1 a second over 10 s.
        assert_eq!((0..12).filter(|_| retry(&first)).count(), 10);
        let next = Table::build(config, &metrics, Some(&first));
        assert!(!retry(&next), "a new table granted a fresh budget");
    }

    #[test]
    fn endpoint_state_carries_over_only_under_the_same_tls_settings() {
        let text = "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  s:\n    protocol: http2\n    \
                    endpoints: [{ addr: 127.0.0.1:1 }]\n";
        let plain = almond_config::load_proxy(text, "t").unwrap();
        // (A proxy-level identity is not needed to build the table.)
        let with_tls = |server_name: Option<&str>| {
            let mut c = plain.clone();
            if let Some(svc) = c.services.get_mut("s") {
                svc.tls = Some(almond_config::UpstreamTls {
                    server_name: server_name.map(str::to_owned),
                });
            }
            Arc::new(c)
        };
        let metrics = Metrics::new().unwrap();
        let state = |t: &Table| t.services["s"].all.members()[0].state.clone();
        let first = Table::build(Arc::new(plain.clone()), &metrics, None);
        let again = Table::build(Arc::new(plain.clone()), &metrics, Some(&first));
        assert!(
            Arc::ptr_eq(&state(&first), &state(&again)),
            "same settings: kept"
        );
        // Switched to TLS: not the plaintext connection of before.
        let tls = Table::build(with_tls(None), &metrics, Some(&again));
        assert!(!Arc::ptr_eq(&state(&again), &state(&tls)));
        let named = Table::build(with_tls(Some("other")), &metrics, Some(&tls));
        assert!(
            !Arc::ptr_eq(&state(&tls), &state(&named)),
            "another server name"
        );
        let same = Table::build(with_tls(Some("other")), &metrics, Some(&named));
        assert!(Arc::ptr_eq(&state(&named), &state(&same)));
    }

    #[test]
    fn series_of_a_removed_subset_and_service_are_deleted() {
        let yaml = |eps: &str| {
            format!(
                "listeners:\n  - bind: 127.0.0.1:0\nservices:\n  s:\n    endpoints: [{eps}]\n  \
                 gone:\n    endpoints: [{{ addr: 127.0.0.1:9 }}]\n"
            )
        };
        let metrics = Metrics::new().unwrap();
        let load = |text: String| Arc::new(almond_config::load_proxy(&text, "t").unwrap());
        let both = "{ addr: 127.0.0.1:1, subset: v1 }, { addr: 127.0.0.1:2, subset: v2 }";
        let one = Table::build(load(yaml(both)), &metrics, None);
        for svc in one.services() {
            for s in &svc.subsets {
                s.metrics[0].record(crate::outcome::CodeClass::Success, 0.01);
                s.metrics[0].upstream_error(ErrorKind::Connect);
                s.ejection.ejections.inc();
            }
            svc.retries.inc();
        }
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(text.contains("subset=\"v2\"") && text.contains("service=\"gone\""));

        let mut only_v1 = (*load(yaml("{ addr: 127.0.0.1:1, subset: v1 }"))).clone();
        only_v1.services.remove("gone");
        let two = Table::build(Arc::new(only_v1), &metrics, Some(&one));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(!text.contains("subset=\"v2\""), "{text}");
        assert!(!text.contains("service=\"gone\""), "{text}");
        assert!(text.contains("subset=\"v1\""));
        drop(two);
    }

    #[test]
    fn host_strips_ports_and_keeps_ipv6() {
        assert_eq!(host(&req("orders:4140")), Some("orders"));
        assert_eq!(host(&req("orders")), Some("orders"));
        assert_eq!(host(&req("[::1]:80")), Some("[::1]"));
        assert_eq!(host(&req("[::1]")), Some("[::1]"));
        let h2 = Request::builder()
            .uri("http://users:80/x")
            .body(())
            .unwrap_or_default();
        assert_eq!(host(&h2), Some("users"));
    }
}
