//! Eject: failure accrual per endpoint (outlier detection).
//!
//! `consecutive_failures` failures in a row take an endpoint out of
//! balancing for `base_ejection` x its ejection count (capped by
//! `max_ejection`, jittered); the count goes down by one for each
//! `base_ejection` the endpoint stays in service (Envoy's multiplier
//! decay), so an endpoint that flaps is kept out longer each time; at most `max_ejection_percent` of
//! a subset is out at once. When the time is up, one real request probes
//! the endpoint: success brings it back, failure ejects it again, longer
//! (as far as `max_ejection_percent` allows). An ejection whose time is up
//! no longer counts as one (for `max_ejection_percent`, the panic
//! threshold, zone shares and the gauges), probed or not: a quiet
//! service's endpoint was counted ejected for good, and filled the room
//! another endpoint needed to be ejected (Envoy un-ejects on a timer).
//!
//! Active health checks are kept apart (as Envoy's active health status
//! and outlier status): an endpoint whose checks fail is out until they
//! pass again, whatever the length of an ejection, and no real request
//! probes it meanwhile (it answered them well while draining by its health
//! check, and was probed back as each ejection ended).
//!
//! Whether there is room and the ejection itself happen under one lock
//! (`EJECTING`): failures at the same moment on two endpoints of a
//! subset would otherwise both see room and both eject. Only a failure
//! about to eject takes it; a success never does.

use crate::observe::metrics::EjectionMetrics;
use crate::outcome::ErrorKind;
use almond_config::{CircuitBreaker, Condition};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// Held from the count of a subset's endpoints out to the ejection of one
/// more. One for the process rather than one per subset: a subset's
/// endpoints outlive the route table (a request on the table being
/// replaced and one on the new table count the same endpoints), so no
/// per-table lock would do. Ejections are rare
/// and the lock is held for a few atomic operations, so nothing waits on
/// it for long.
static EJECTING: Mutex<()> = Mutex::new(());

/// An endpoint's health as failure accrual sees it.
pub struct Health {
    consecutive: AtomicU32,
    /// 0: in service; else ns (since the process epoch) until it may be
    /// probed.
    ejected_until: AtomicU64,
    /// Ejections not yet forgiven: the multiplier of the next ejection's
    /// length, less one for each `base_ejection` in service since `back_at`.
    ejections: AtomicU32,
    /// When it last came back to service (ns since the process epoch); 0
    /// while out, or never ejected.
    back_at: AtomicU64,
    /// A probe request is out.
    probing: AtomicBool,
    /// Active checks: when the next is due (ns since the process epoch),
    /// and the successes and failures in a row.
    check_due: AtomicU64,
    checks_passed: AtomicU32,
    checks_failed: AtomicU32,
    /// The active checks failed `unhealthy` times in a row and have not
    /// passed `healthy` times since: any ejection lasts until they do.
    check_failing: AtomicBool,
}

/// The `ejected_until` of an endpoint whose active checks fail: never due
/// a probe, out until a check returns it.
const UNTIL_CHECK_PASSES: u64 = u64::MAX;

/// The `check_due` of an endpoint whose check is out: never due.
const CHECKING: u64 = u64::MAX;

/// What a picker may do with an endpoint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// In service.
    Available,
    /// Ejected (or a probe is out).
    Ejected,
    /// Ejection time is up: whoever claims it sends the probe.
    ProbeDue,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            consecutive: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            back_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            check_due: AtomicU64::new(0),
            checks_passed: AtomicU32::new(0),
            checks_failed: AtomicU32::new(0),
            check_failing: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Is the endpoint usable at `now_ns`? (one atomic load when healthy)
    #[inline]
    pub fn availability(&self, now_ns: u64) -> Availability {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => Availability::Available,
            until if now_ns < until => Availability::Ejected,
            _ => Availability::ProbeDue,
        }
    }

    /// Claims the probe of an endpoint whose ejection is up; `grace` keeps
    /// others away while the probe is out (a lost probe is retried then).
    pub fn claim_probe(&self, now_ns: u64, grace: Duration) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || now_ns < until {
            return false;
        }
        let next = now_ns + grace.as_nanos() as u64;
        let won = self
            .ejected_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if won {
            self.probing.store(true, Ordering::Release);
        }
        won
    }

    /// Is the endpoint out of service (ejected, due its probe or
    /// probing)?
    pub fn is_out(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Does it count as ejected at `now_ns` (for `max_ejection_percent`,
    /// the panic threshold, zone shares and `almond_endpoints`)? Out, and
    /// its ejection (or the grace of the probe it is being sent) not up: an
    /// endpoint waiting for its probe does not, however long it waits.
    pub fn counts_out(&self, now_ns: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ns < until
    }

    /// Claims the active check due at `now_ns`: none is due again until
    /// this one ends ([`Health::check_done`]), so checks never overlap
    /// (due an interval after the last one started, the checks of a hung
    /// endpoint piled up, one an interval, until each timed out).
    pub fn claim_check(&self, now_ns: u64) -> bool {
        let due = self.check_due.load(Ordering::Relaxed);
        now_ns >= due
            && self
                .check_due
                .compare_exchange(due, CHECKING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// The claimed check ended at `now_ns`: the next is due `interval`
    /// later, give or take 10 % (Envoy's `interval_jitter`), so that the
    /// checks of endpoints that came together, and of the proxies that
    /// learnt of them together, drift apart instead of landing on each
    /// endpoint at once, every interval.
    pub fn check_done(&self, now_ns: u64, interval: Duration) {
        let jittered = interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        let next = now_ns.saturating_add(jittered.as_nanos() as u64);
        self.check_due.store(next, Ordering::Release);
    }

    /// Counts an active check's result; returns the results of its kind
    /// in a row, this one included.
    pub fn count_check(&self, passed: bool) -> u32 {
        let (this, other) = if passed {
            (&self.checks_passed, &self.checks_failed)
        } else {
            (&self.checks_failed, &self.checks_passed)
        };
        other.store(0, Ordering::Relaxed);
        this.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }

    /// When the ejection (or the probe's grace) ends, in ns since the
    /// process epoch; 0 when in service, `u64::MAX` while its active
    /// checks fail.
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Acquire)
    }

    /// Do its active checks fail (out until they pass)?
    pub fn check_failing(&self) -> bool {
        self.check_failing.load(Ordering::Acquire)
    }

    /// Its active checks passed `healthy` times in a row: their hold ends.
    pub fn checks_recovered(&self) {
        self.check_failing.store(false, Ordering::Release);
    }

    /// The service no longer checks it: a failing check's hold ends, and
    /// an ejection held by it is due its probe at once (its length was
    /// the check's, not one of failure accrual's).
    pub fn checks_stopped(&self) {
        if self.check_failing.swap(false, Ordering::AcqRel) {
            let _ = self.ejected_until.compare_exchange(
                UNTIL_CHECK_PASSES,
                1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

/// An endpoint as failure accrual sees it (implemented by the
/// endpoint's state).
pub trait Ejectable {
    /// Its ejection state.
    fn health(&self) -> &Health;
    /// Its address (for logs).
    fn addr(&self) -> SocketAddr;
    /// Back in service: what it measured while failing says nothing now.
    fn returned(&self);
}

/// The endpoints an ejection is counted against (a subset's pool).
pub trait Peers {
    /// How many there are, and how many of them count as ejected at
    /// `now_ns` (see [`Health::counts_out`]).
    fn out_of(&self, now_ns: u64) -> (usize, usize);
}

/// A service's ejection policy.
pub struct Outlier {
    threshold: u32,
    base: Duration,
    max: Duration,
    max_percent: u32,
    failure_on: Vec<Condition>,
    /// Time a probe has before another may be sent.
    pub probe_grace: Duration,
}

impl Outlier {
    /// The policy of `circuit_breaker`; `request_timeout` bounds a probe.
    pub fn new(cb: &CircuitBreaker, request_timeout: Duration) -> Outlier {
        Outlier {
            threshold: cb.consecutive_failures,
            base: cb.base_ejection,
            max: cb.max_ejection,
            max_percent: cb.max_ejection_percent,
            failure_on: cb.failure_on.clone(),
            probe_grace: request_timeout,
        }
    }

    /// Does this try's result count as a failure?
    pub fn is_failure(&self, result: Result<u16, ErrorKind>) -> bool {
        match result {
            Ok(status) => self.failure_on.iter().any(|c| c.matches_status(status)),
            Err(kind) => {
                let on = |c| self.failure_on.contains(&c);
                match kind {
                    ErrorKind::Connect => on(Condition::Connect),
                    // Unreachable: a connect failure, and a timeout.
                    ErrorKind::ConnectTimeout => on(Condition::Connect) || on(Condition::Timeout),
                    ErrorKind::Timeout => on(Condition::Timeout),
                    ErrorKind::Reset => on(Condition::Reset),
                    // Shed or unroutable: not the endpoint's fault.
                    _ => false,
                }
            }
        }
    }

    /// Does a failure of this kind eject at once? A refused or unreachable
    /// connection says the endpoint is gone (Envoy's
    /// `consecutive_local_origin_failure` of 1): waiting for
    /// `consecutive_failures` of them would leave it to the balancer to
    /// notice, and a latency-aware one stops sending before the count is
    /// reached, so the endpoint would never be ejected nor probed back.
    pub fn ejects_at_once(&self, result: Result<u16, ErrorKind>) -> bool {
        matches!(result, Err(ErrorKind::Connect | ErrorKind::ConnectTimeout))
            && self.failure_on.contains(&Condition::Connect)
    }

    /// Records one try's outcome for `endpoint`, a member of `subset`;
    /// ejects or returns it as the rules say. `at_once`: this failure alone
    /// ejects (see [`Outlier::ejects_at_once`]). Returns when a new
    /// ejection ends (ns since the process epoch), for the pools to probe.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        endpoint: &impl Ejectable,
        failed: bool,
        at_once: bool,
        now: Instant,
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
    ) -> Option<u64> {
        let health = endpoint.health();
        if !failed {
            health.consecutive.store(0, Ordering::Relaxed);
            // Only the probe returns an endpoint (or any success once the
            // ejection is up: a pool of one never claims a probe). A request
            // sent before the ejection and answered after it says nothing
            // about the endpoint now, and must not cut the ejection short.
            // Nor does any request while its active checks fail: they
            // answered well while it drained by its health check.
            let now_ns = crate::clock::nanos_since_epoch(now);
            if health.is_out()
                && (health.probing.swap(false, Ordering::AcqRel)
                    || health.availability(now_ns) == Availability::ProbeDue)
                && !health.check_failing()
            {
                self.restore(endpoint, now, subset, metrics, service, "probe succeeded");
            }
            return None;
        }
        let was_probe = health.probing.swap(false, Ordering::AcqRel);
        let failures = health.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        // A straggler failing while already ejected changes nothing.
        if health.is_out() && !was_probe {
            return None;
        }
        if was_probe {
            return self.eject_again_if_room(endpoint, now, subset, metrics, service, failures);
        }
        if !at_once && failures < self.threshold {
            return None;
        }
        self.eject_if_room(endpoint, now, subset, metrics, service, failures)
    }

    /// The active checks of `endpoint` failed `failures` times in a row,
    /// enough to take it out: it stays out until they pass (see
    /// [`Health::check_failing`]). One in service is ejected as far as
    /// `max_ejection_percent` allows; one ejected already has its ejection
    /// held until then. Returns when a new ejection ends (`u64::MAX`).
    pub fn check_failed(
        &self,
        endpoint: &impl Ejectable,
        now: Instant,
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
        failures: u32,
    ) -> Option<u64> {
        let health = endpoint.health();
        let newly = !health.check_failing.swap(true, Ordering::AcqRel);
        let now_ns = crate::clock::nanos_since_epoch(now);
        loop {
            let until = health.ejected_until.load(Ordering::Acquire);
            if until == 0 {
                // In service (or just returned: the next check ejects it).
                return self.eject_if_room(endpoint, now, subset, metrics, service, failures);
            }
            if until == UNTIL_CHECK_PASSES {
                return None;
            }
            // Its ejection is up, so it no longer counts as one: in service
            // as far as room goes, taken out again only if there is room
            // (the loop's next turn). Still ejected, or probed, by failure
            // accrual: held until a check passes, and a probe out now no
            // longer returns it.
            let held = if now_ns >= until {
                0
            } else {
                UNTIL_CHECK_PASSES
            };
            let swapped = (health.ejected_until)
                .compare_exchange(until, held, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if swapped {
                health.probing.store(false, Ordering::Release);
                if held == 0 {
                    // Back in service unless the next turn finds room:
                    // its ejections start to be forgiven from now.
                    health.back_at.store(now_ns.max(1), Ordering::Relaxed);
                }
            }
            if swapped && held != 0 {
                if newly {
                    tracing::warn!(service, endpoint = %endpoint.addr(), failures, "endpoint kept out until its health check passes");
                }
                return None;
            }
        }
    }

    /// Takes `endpoint` out for the next ejection length if it is in and
    /// `max_ejection_percent` leaves room in `subset`, both decided under
    /// `EJECTING`; returns when the ejection ends (ns since the process
    /// epoch), `None` when it was not ejected.
    pub fn eject_if_room(
        &self,
        endpoint: &impl Ejectable,
        now: Instant,
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
        failures: u32,
    ) -> Option<u64> {
        let health = endpoint.health();
        let now_ns = crate::clock::nanos_since_epoch(now);
        let room = || !health.is_out() && self.room_to_eject(subset, now_ns);
        // First without the lock: a subset at its cap, whose endpoints keep
        // failing, never takes it.
        let taken = if room() {
            let _held = EJECTING.lock().unwrap_or_else(PoisonError::into_inner);
            // Again under it: another ejection may just have taken the
            // room, or this endpoint.
            room().then(|| self.take_out(health, now))
        } else {
            None
        };
        let Some((n, length, until)) = taken else {
            tracing::debug!(service, endpoint = %endpoint.addr(), "not ejected: out already, or max_ejection_percent reached");
            return None;
        };
        self.ejected(endpoint, (n, length), subset, metrics, service, failures);
        Some(until)
    }

    /// A probe of `endpoint` failed: ejected again, longer, if
    /// `max_ejection_percent` leaves room for it among the others (its
    /// ejection was up, so others may have taken its room meanwhile); else
    /// it is back in service, as when Envoy's ejection timer ends, and
    /// failure accrual counts its failures from there.
    fn eject_again_if_room(
        &self,
        endpoint: &impl Ejectable,
        now: Instant,
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
        failures: u32,
    ) -> Option<u64> {
        let health = endpoint.health();
        let now_ns = crate::clock::nanos_since_epoch(now);
        let taken = {
            let _held = EJECTING.lock().unwrap_or_else(PoisonError::into_inner);
            let (n, out) = subset.out_of(now_ns);
            let others = out.saturating_sub(usize::from(health.counts_out(now_ns)));
            if others < self.allowed(n) {
                Some(self.take_out(health, now))
            } else {
                health.ejected_until.store(0, Ordering::Release);
                health.back_at.store(now_ns.max(1), Ordering::Relaxed);
                None
            }
        };
        let Some((n, length, until)) = taken else {
            metrics.update(subset.out_of(now_ns));
            tracing::info!(service, endpoint = %endpoint.addr(), failures, "probe failed, endpoint back in service: max_ejection_percent reached");
            return None;
        };
        self.ejected(endpoint, (n, length), subset, metrics, service, failures);
        Some(until)
    }

    /// Marks `health` out for its next ejection length; returns the
    /// ejections in a row, the length and when it ends (ns since the
    /// process epoch).
    fn take_out(&self, health: &Health, now: Instant) -> (u32, Duration, u64) {
        let now_ns = crate::clock::nanos_since_epoch(now);
        // Counted no higher than the ejections `max_ejection` takes: more
        // would lengthen nothing, only the time to forgive them (a day's
        // outage would keep a recovered endpoint on long ejections for
        // hours; Envoy stops raising its multiplier there too).
        let n = (self.unforgiven(health, now_ns) + 1).min(self.most_counted());
        health.ejections.store(n, Ordering::Relaxed);
        let length = self.ejection_length(n);
        let until = if health.check_failing() {
            UNTIL_CHECK_PASSES
        } else {
            (now_ns + length.as_nanos() as u64).max(1)
        };
        health.ejected_until.store(until, Ordering::Release);
        health.consecutive.store(0, Ordering::Relaxed);
        // Only checks passed from now on may bring it back early.
        health.checks_passed.store(0, Ordering::Relaxed);
        (n, length, until)
    }

    /// The ejections of `health` not yet forgiven at `now_ns`: one is for
    /// each `base_ejection` it has been in service since it came back
    /// (none while it is out: a failed probe ejects it longer). Clears
    /// `back_at`: it is going out.
    fn unforgiven(&self, health: &Health, now_ns: u64) -> u32 {
        let ejections = health.ejections.load(Ordering::Relaxed);
        match health.back_at.swap(0, Ordering::Relaxed) {
            0 => ejections,
            back => {
                let base = self.base.as_nanos().max(1) as u64;
                let forgiven = now_ns.saturating_sub(back) / base;
                ejections.saturating_sub(u32::try_from(forgiven).unwrap_or(u32::MAX))
            }
        }
    }

    /// Counts and logs the ejection of `endpoint`, its `n`th unforgiven, for
    /// `length`.
    fn ejected(
        &self,
        endpoint: &impl Ejectable,
        (n, length): (u32, Duration),
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
        failures: u32,
    ) {
        metrics.ejections.inc();
        let now_ns = crate::clock::nanos_since_epoch(Instant::now());
        metrics.update(subset.out_of(now_ns));
        if endpoint.health().check_failing() {
            tracing::warn!(
                service,
                endpoint = %endpoint.addr(),
                failures,
                ejections = n,
                ejected_for = "until its health check passes",
                "endpoint ejected"
            );
            return;
        }
        tracing::warn!(
            service,
            endpoint = %endpoint.addr(),
            failures,
            ejections = n,
            ejected_for = ?length,
            "endpoint ejected"
        );
    }

    /// Puts an ejected `endpoint` back in service, its latency estimate
    /// forgotten (its failures must not keep it shunned). Its ejection
    /// count is forgiven with time in service, not at once: an endpoint
    /// that fails again soon after is out longer.
    pub fn restore(
        &self,
        endpoint: &impl Ejectable,
        now: Instant,
        subset: &impl Peers,
        metrics: &EjectionMetrics,
        service: &str,
        why: &str,
    ) {
        let health = endpoint.health();
        let now_ns = crate::clock::nanos_since_epoch(now);
        health.ejected_until.store(0, Ordering::Release);
        health.back_at.store(now_ns.max(1), Ordering::Relaxed);
        health.consecutive.store(0, Ordering::Relaxed);
        health.probing.store(false, Ordering::Release);
        endpoint.returned();
        metrics.update(subset.out_of(now_ns));
        tracing::info!(service, endpoint = %endpoint.addr(), why, "endpoint returned to service");
    }

    /// May one more endpoint of `subset` be ejected? At least one may,
    /// whatever the percent (as in Envoy); the panic threshold then keeps
    /// traffic flowing.
    fn room_to_eject(&self, subset: &impl Peers, now_ns: u64) -> bool {
        let (n, out) = subset.out_of(now_ns);
        out < self.allowed(n)
    }

    /// How many of `n` endpoints may be ejected at once.
    fn allowed(&self, n: usize) -> usize {
        (n * self.max_percent as usize / 100).max(1)
    }

    /// The ejections it takes to reach `max`: `max / base`, rounded up.
    fn most_counted(&self) -> u32 {
        let base = self.base.as_nanos().max(1);
        u32::try_from(self.max.as_nanos().div_ceil(base))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// `base` x `n`, capped at `max`, with +-10 % jitter so endpoints that
    /// failed together do not return together.
    fn ejection_length(&self, n: u32) -> Duration {
        let raw = self.base.saturating_mul(n).min(self.max);
        let jitter = 0.9 + fastrand::f64() * 0.2;
        raw.mul_f64(jitter).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounter, IntGauge};

    /// An endpoint: its health and address, nothing else.
    struct Endpoint(Health, SocketAddr);

    impl Ejectable for Endpoint {
        fn health(&self) -> &Health {
            &self.0
        }
        fn addr(&self) -> SocketAddr {
            self.1
        }
        fn returned(&self) {}
    }

    /// A subset of endpoints.
    struct Subset(Vec<Endpoint>);

    impl Peers for Subset {
        fn out_of(&self, now_ns: u64) -> (usize, usize) {
            let out = self.0.iter().filter(|e| e.0.counts_out(now_ns)).count();
            (self.0.len(), out)
        }
    }

    fn subset(n: u16) -> Subset {
        Subset(
            (0..n)
                .map(|i| {
                    Endpoint(
                        Health::default(),
                        SocketAddr::from(([127, 0, 0, 1], 2000 + i)),
                    )
                })
                .collect(),
        )
    }

    fn metrics() -> EjectionMetrics {
        EjectionMetrics {
            ejections: IntCounter::new("e", "e").unwrap(),
            healthy: IntGauge::new("h", "h").unwrap(),
            ejected: IntGauge::new("x", "x").unwrap(),
        }
    }

    fn policy() -> Outlier {
        let cb = CircuitBreaker {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            ..CircuitBreaker::default()
        };
        Outlier::new(&cb, Duration::from_secs(1))
    }

    /// A refused connection, and one that never completes (unreachable),
    /// eject at once when `failure_on` has `connect`; a timeout waiting
    /// for an answer counts toward the run.
    #[test]
    fn a_refused_or_unreachable_endpoint_is_ejected_at_once() {
        let p = policy();
        for kind in [ErrorKind::Connect, ErrorKind::ConnectTimeout] {
            assert!(
                p.is_failure(Err(kind)) && p.ejects_at_once(Err(kind)),
                "{kind:?}"
            );
        }
        assert!(p.is_failure(Err(ErrorKind::Timeout)));
        assert!(!p.ejects_at_once(Err(ErrorKind::Timeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_then_probes_back() {
        let (pool, m, p) = (subset(3), metrics(), policy());
        let ep = &pool.0[0];
        let now = Instant::now();
        p.record(ep, true, false, now, &pool, &m, "s");
        p.record(ep, true, false, now, &pool, &m, "s");
        assert!(!ep.0.is_out());
        p.record(ep, true, false, now, &pool, &m, "s");
        assert!(ep.0.is_out());
        assert_eq!(m.ejections.get(), 1);
        assert_eq!((m.healthy.get(), m.ejected.get()), (2, 1));

        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        assert_eq!(ep.0.availability(ns(now)), Availability::Ejected);
        let later = now + Duration::from_secs(12);
        assert_eq!(ep.0.availability(ns(later)), Availability::ProbeDue);
        assert!(ep.0.claim_probe(ns(later), p.probe_grace));
        // Only one probe at a time.
        assert!(!ep.0.claim_probe(ns(later), p.probe_grace));
        // A failed probe ejects again, for twice as long (+-10 %).
        p.record(ep, true, false, later, &pool, &m, "s");
        assert_eq!(m.ejections.get(), 2);
        let t = later + Duration::from_secs(17);
        assert_eq!(ep.0.availability(ns(t)), Availability::Ejected);
        let t = later + Duration::from_secs(23);
        assert!(ep.0.claim_probe(ns(t), p.probe_grace));
        p.record(ep, false, false, t, &pool, &m, "s");
        assert!(!ep.0.is_out());
        assert_eq!((m.healthy.get(), m.ejected.get()), (3, 0));
    }

    /// An endpoint whose probe failed with no room to eject it again goes
    /// back in service; once it answers well, its next run of failures
    /// ejects it for `base_ejection`, not longer (the multiplier is for
    /// ejections in a row).
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_back_for_want_of_room_starts_again_at_base() {
        let (pool, m, p) = (subset(2), metrics(), policy());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let (a, b) = (&pool.0[0], &pool.0[1]);
        let t0 = Instant::now();
        for _ in 0..3 {
            p.record(a, true, false, t0, &pool, &m, "s");
        }
        assert!(a.0.is_out());
        // A's ejection is up: B may go out in its place.
        let t1 = t0 + Duration::from_secs(12);
        for _ in 0..3 {
            p.record(b, true, false, t1, &pool, &m, "s");
        }
        assert!(b.0.is_out());
        // A's probe fails, with no room: A is back in service.
        assert!(a.0.claim_probe(ns(t1), p.probe_grace));
        p.record(a, true, false, t1, &pool, &m, "s");
        assert!(!a.0.is_out());
        // B returns; A answers well, then fails a run again.
        let t2 = t1 + Duration::from_secs(25);
        assert!(b.0.claim_probe(ns(t2), p.probe_grace));
        p.record(b, false, false, t2, &pool, &m, "s");
        assert!(!b.0.is_out());
        p.record(a, false, false, t2, &pool, &m, "s");
        for _ in 0..3 {
            p.record(a, true, false, t2, &pool, &m, "s");
        }
        assert!(a.0.is_out());
        let t3 = t2 + Duration::from_secs(12);
        assert_eq!(a.0.availability(ns(t3)), Availability::ProbeDue);
    }

    /// An endpoint that fails again soon after its probe brought it back
    /// is out longer each time (a flapping endpoint); one that stayed in
    /// service `base_ejection` per ejection starts again at base (Envoy's
    /// multiplier decay).
    #[tokio::test(start_paused = true)]
    async fn a_flapping_endpoint_is_out_longer_each_time() {
        let (pool, m, p) = (subset(3), metrics(), policy());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let ep = &pool.0[0];
        // Ejected at `at`, probed back when its ejection is up; returns
        // when it was back.
        let eject_then_return = |at: Instant, out_for_at_least: u64| {
            for _ in 0..3 {
                p.record(ep, true, false, at, &pool, &m, "s");
            }
            assert!(ep.0.is_out());
            let still_out = at + Duration::from_secs(out_for_at_least);
            assert_eq!(ep.0.availability(ns(still_out)), Availability::Ejected);
            let back = at + Duration::from_secs(out_for_at_least * 12 / 9 + 1);
            assert!(ep.0.claim_probe(ns(back), p.probe_grace));
            p.record(ep, false, false, back, &pool, &m, "s");
            assert!(!ep.0.is_out());
            back
        };
        // 10 s, then (failing 1 s after each return) 20 s, then 30 s.
        let t = eject_then_return(Instant::now(), 8);
        let t = eject_then_return(t + Duration::from_secs(1), 17);
        let t = eject_then_return(t + Duration::from_secs(1), 26);
        // 25 s in service forgive two of its three ejections: 20 s next.
        let t = eject_then_return(t + Duration::from_secs(25), 17);
        assert_eq!(ep.0.ejections.load(Ordering::Relaxed), 2);
        // An hour in service forgives them all: 10 s, as the first.
        let t = t + Duration::from_secs(3600);
        for _ in 0..3 {
            p.record(ep, true, false, t, &pool, &m, "s");
        }
        let t = t + Duration::from_secs(12);
        assert_eq!(ep.0.availability(ns(t)), Availability::ProbeDue);
        assert_eq!(m.ejections.get(), 5);
    }

    /// However long an endpoint stays down, its count stops where
    /// `max_ejection` is reached (here 60 s / 10 s = 6): once it is back,
    /// a minute in service forgives it all, not one base per probe it
    /// failed.
    #[tokio::test(start_paused = true)]
    async fn the_count_stops_at_max_ejection() {
        let cb = CircuitBreaker {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            ..CircuitBreaker::default()
        };
        let p = Outlier::new(&cb, Duration::from_secs(1));
        let (pool, m) = (subset(3), metrics());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let ep = &pool.0[0];
        let mut t = Instant::now();
        p.record(ep, true, false, t, &pool, &m, "s");
        // A hundred failed probes: still 6.
        for _ in 0..100 {
            t += Duration::from_secs(70);
            assert!(ep.0.claim_probe(ns(t), p.probe_grace));
            p.record(ep, true, false, t, &pool, &m, "s");
        }
        assert_eq!(ep.0.ejections.load(Ordering::Relaxed), 6);
        t += Duration::from_secs(70);
        assert!(ep.0.claim_probe(ns(t), p.probe_grace));
        p.record(ep, false, false, t, &pool, &m, "s");
        // 61 s in service: its next ejection is the first's length.
        t += Duration::from_secs(61);
        p.record(ep, true, false, t, &pool, &m, "s");
        assert_eq!(ep.0.ejections.load(Ordering::Relaxed), 1);
    }

    /// Checks are spread: the next is due within 10 % of the interval
    /// after the last, not exactly on it.
    #[test]
    fn the_next_check_is_jittered() {
        let health = Health::default();
        let interval = Duration::from_secs(10);
        let dues: Vec<u64> = (0..20)
            .map(|_| {
                health.check_done(0, interval);
                health.check_due.load(Ordering::Relaxed)
            })
            .collect();
        let (lo, hi) = (9_000_000_000, 11_000_000_000);
        assert!(dues.iter().all(|d| (lo..=hi).contains(d)), "{dues:?}");
        assert!(dues.iter().any(|&d| d != dues[0]), "no jitter: {dues:?}");
    }

    /// Active checks and failure accrual are apart: an endpoint whose
    /// checks fail is out until they pass. No probe is due however long it
    /// has been out, and a request's success does not return it.
    #[tokio::test(start_paused = true)]
    async fn failing_checks_hold_an_endpoint_out_until_they_pass() {
        let (pool, m, p) = (subset(3), metrics(), policy());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let ep = &pool.0[0];
        let now = Instant::now();
        assert!(p.check_failed(ep, now, &pool, &m, "s", 3).is_some());
        assert!(ep.0.is_out());
        let later = now + Duration::from_secs(3600);
        assert_eq!(ep.0.availability(ns(later)), Availability::Ejected);
        assert!(!ep.0.claim_probe(ns(later), p.probe_grace));
        // A success of a request sent before the ejection.
        p.record(ep, false, false, later, &pool, &m, "s");
        assert!(ep.0.is_out());
        // Checks passing again: back.
        ep.0.checks_recovered();
        p.restore(ep, Instant::now(), &pool, &m, "s", "health check passed");
        assert!(!ep.0.is_out());
        assert_eq!(m.ejections.get(), 1);
    }

    /// An endpoint ejected by failure accrual whose checks then fail: its
    /// probe, out already, does not return it, nor does a later one.
    #[tokio::test(start_paused = true)]
    async fn failing_checks_hold_an_ejection_and_its_probe() {
        let (pool, m, p) = (subset(3), metrics(), policy());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let ep = &pool.0[0];
        let now = Instant::now();
        for _ in 0..3 {
            p.record(ep, true, false, now, &pool, &m, "s");
        }
        assert!(ep.0.is_out());
        let due = now + Duration::from_secs(12);
        assert!(ep.0.claim_probe(ns(due), p.probe_grace));
        assert_eq!(p.check_failed(ep, due, &pool, &m, "s", 3), None);
        p.record(ep, false, false, due, &pool, &m, "s");
        assert!(ep.0.is_out(), "a probe's success returned it");
        let later = due + Duration::from_secs(3600);
        assert_eq!(ep.0.availability(ns(later)), Availability::Ejected);
        // The service stops checking it: its probe is due at once.
        ep.0.checks_stopped();
        assert!(ep.0.claim_probe(ns(later), p.probe_grace));
        p.record(ep, false, false, later, &pool, &m, "s");
        assert!(!ep.0.is_out());
    }

    /// A check is not due again until the one out ends, then `interval`
    /// (+-10 %) after its end, however long it took.
    #[test]
    fn one_check_at_a_time() {
        let h = Health::default();
        let s = 1_000_000_000;
        assert!(h.claim_check(s));
        assert!(!h.claim_check(100 * s), "due while the last is out");
        h.check_done(3 * s, Duration::from_millis(200));
        assert!(!h.claim_check(3 * s + s / 10));
        assert!(h.claim_check(3 * s + s / 5 + s / 50));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_caps_ejections() {
        // 50 % of 3 endpoints = 1 may be out at once.
        let (pool, m, p) = (subset(3), metrics(), policy());
        let now = Instant::now();
        for ep in &pool.0 {
            for _ in 0..3 {
                p.record(ep, true, false, now, &pool, &m, "s");
            }
        }
        assert_eq!(m.ejected.get(), 1);
    }

    /// An ejection whose time is up leaves its room, probe or none: of two
    /// endpoints (one may be out), the second is ejected by its failures
    /// though the first was never probed back (it used to fill the room
    /// for good). The first's probe then fails with no room left: it is
    /// back in service rather than past `max_ejection_percent`.
    #[tokio::test(start_paused = true)]
    async fn an_ejection_that_is_up_leaves_its_room() {
        let (pool, m, p) = (subset(2), metrics(), policy());
        let ns = |t: Instant| crate::clock::nanos_since_epoch(t);
        let (first, second) = (&pool.0[0], &pool.0[1]);
        let now = Instant::now();
        for _ in 0..3 {
            p.record(first, true, false, now, &pool, &m, "s");
        }
        assert_eq!(pool.out_of(ns(now)), (2, 1));
        let later = now + Duration::from_secs(12);
        assert!(first.0.is_out() && !first.0.counts_out(ns(later)));
        assert_eq!(pool.out_of(ns(later)), (2, 0));
        for _ in 0..3 {
            p.record(second, true, false, later, &pool, &m, "s");
        }
        assert!(second.0.counts_out(ns(later)), "no room for the second");
        assert!(first.0.claim_probe(ns(later), p.probe_grace));
        p.record(first, true, false, later, &pool, &m, "s");
        assert!(!first.0.is_out(), "the first's failed probe passed the cap");
        assert_eq!(pool.out_of(ns(later)), (2, 1));
        assert_eq!(m.ejections.get(), 2);
    }

    /// A subset whose first two counts wait for each other (a second at
    /// most): two failures deciding at the same moment, on two threads.
    struct Gated {
        subset: Subset,
        counts: std::sync::Mutex<u32>,
        met: std::sync::Condvar,
    }

    impl Peers for Gated {
        fn out_of(&self, now_ns: u64) -> (usize, usize) {
            let counted = self.subset.out_of(now_ns);
            let mut counts = self.counts.lock().unwrap();
            *counts += 1;
            if *counts <= 2 {
                self.met.notify_all();
                let wait = Duration::from_secs(1);
                drop(
                    self.met
                        .wait_timeout_while(counts, wait, |n| *n < 2)
                        .unwrap(),
                );
            }
            counted
        }
    }

    /// Two endpoints of a subset refusing connections at the same moment:
    /// both saw room before either was out, and both were ejected, past
    /// `max_ejection_percent` (34 % of 3 = 1).
    #[test]
    fn simultaneous_failures_do_not_pass_max_ejection_percent() {
        let cb = CircuitBreaker {
            max_ejection_percent: 34,
            ..CircuitBreaker::default()
        };
        let p = Outlier::new(&cb, Duration::from_secs(1));
        for _ in 0..10 {
            let (m, now) = (metrics(), Instant::now());
            let pool = Gated {
                subset: subset(3),
                counts: std::sync::Mutex::new(0),
                met: std::sync::Condvar::new(),
            };
            std::thread::scope(|s| {
                for ep in &pool.subset.0[..2] {
                    let (p, pool, m) = (&p, &pool, &m);
                    s.spawn(move || p.record(ep, true, true, now, pool, m, "s"));
                }
            });
            assert_eq!(
                pool.subset.out_of(crate::clock::nanos_since_epoch(now)),
                (3, 1)
            );
            assert_eq!(m.ejections.get(), 1);
        }
    }

    /// Two failures of one endpoint at the same moment eject it once.
    #[test]
    fn simultaneous_failures_of_one_endpoint_eject_it_once() {
        let (p, m, now) = (policy(), metrics(), Instant::now());
        let pool = Gated {
            subset: subset(3),
            counts: std::sync::Mutex::new(0),
            met: std::sync::Condvar::new(),
        };
        let ep = &pool.subset.0[0];
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (p, pool, m) = (&p, &pool, &m);
                s.spawn(move || p.record(ep, true, true, now, pool, m, "s"));
            }
        });
        assert_eq!(m.ejections.get(), 1);
        assert_eq!(ep.0.ejections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn only_configured_outcomes_are_failures() {
        let p = policy();
        assert!(p.is_failure(Ok(503)));
        assert!(!p.is_failure(Ok(404)));
        assert!(p.is_failure(Err(ErrorKind::Connect)));
        assert!(!p.is_failure(Err(ErrorKind::Overloaded)));
    }
}
