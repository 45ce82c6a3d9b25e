//! Balance: pick one endpoint of a pool for each request, lock-free.
//!
//! `p2c_ewma` (power of two choices over peak-EWMA latency x in-flight, as
//! in Finagle, tower and Linkerd), `least_request` (P2C over in-flight) and
//! `round_robin` (a weighted rotation); all honour endpoint weights and
//! skip ejected endpoints (see `eject`), down to the panic threshold.
//! With zones, a pool first chooses the local or the remote zones
//! (`Zones`), then balances within them.

use crate::upstream::eject::{Availability, Peers};
use crate::upstream::endpoint::EndpointState;
use almond_config::Lb;
use prometheus::IntCounter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Most slots a weighted round-robin schedule may have; beyond, the
/// rotation is a [`Rotation::Stride`].
const MAX_SCHEDULE: u64 = 4096;

/// One endpoint as a pool sees it.
pub struct Member {
    /// Shared per-address state (EWMA, in-flight, connections).
    pub state: Arc<EndpointState>,
    /// Relative weight (1 or more).
    pub weight: u32,
    /// Index of the endpoint's subset in its service.
    pub subset: usize,
    /// Is it in this proxy's zone?
    pub local: bool,
}

/// The endpoints a request's earlier tries failed on, oldest first. A
/// retry avoids all of them while another endpoint is usable (Envoy's
/// `previous_hosts` retry predicate), not just the last one: with three
/// endpoints and two retries, the third try goes to the third endpoint.
#[derive(Clone, Copy, Default)]
pub struct Tried<'a>(pub &'a [Arc<EndpointState>]);

impl Tried<'_> {
    /// A first try: nothing to avoid.
    pub const NONE: Tried<'static> = Tried(&[]);

    fn is_retry(self) -> bool {
        !self.0.is_empty()
    }

    fn has(self, state: &EndpointState) -> bool {
        self.0.iter().any(|t| std::ptr::eq(&**t, state))
    }
}

impl Member {
    fn copy(&self) -> Member {
        Member {
            state: self.state.clone(),
            weight: self.weight,
            subset: self.subset,
            local: self.local,
        }
    }
}

/// What a failed try costs in the endpoint's latency estimate: this many
/// times its peers' estimate (Linkerd's and Finagle's failure penalty, in
/// proportion rather than fixed), or the try's own duration if longer.
/// With `p2c_ewma`'s soft choice the endpoint then gets about a fifth of
/// what its peers get, and its next answers wash the penalty out as any
/// peak: one fast 500 steers traffic away for a few answers, not for the
/// ten seconds of the time decay (failure accrual is what takes a failing
/// endpoint out).
const FAILURE_PENALTY: f64 = 5.0;

/// Peers whose estimates a failure's penalty is drawn from, at most: the
/// cost of a failure stays bounded, however large the pool.
const PEERS_SAMPLED: usize = 8;

/// How often (at most) the local zone's share is worked out again from
/// its members' health; an ejection makes it due at once.
const ZONE_REFRESH_MS: u64 = 100;

/// Zone-aware routing (Envoy's, with the proxies taken to be spread over
/// the zones as the endpoints are): everything goes to the local zone
/// while at least `min_healthy` percent of its endpoints (by weight) are
/// available; below that, the local zone keeps the share of the traffic it
/// can carry -- its share of the available weight over its share of all
/// the weight -- and the rest spills over to the other zones, in
/// proportion to their available weight (the remote pool's balancer).
struct Zones {
    local: Pool,
    remote: Pool,
    /// Weight of the local members, and of all members.
    local_weight: u64,
    all_weight: u64,
    min_healthy: u64,
    /// The whole pool's `panic_threshold` and member count: panic is
    /// judged over every zone (the zones' own pools never panic), or a
    /// zone with few endpoints would ignore its members' health while the
    /// pool has plenty available.
    panic_threshold: u64,
    members: u64,
    /// When the local share was worked out (ms since the process epoch,
    /// + 1) << 16 | the share in permille, or [`PANIC`]; 0 = due.
    cached: AtomicU64,
    /// `almond_zone_requests_total{zone="local"}`, `{zone="remote"}`.
    counters: [IntCounter; 2],
}

/// The cached share's mark for a pool in panic (a permille is at most 1000).
const PANIC: u64 = 0xffff;

impl Zones {
    /// Picks in the local zone with the odds of its share (first tries);
    /// `None` when the whole pool is in panic, or neither zone has an
    /// endpoint to give (the pool's own pick then decides, over every
    /// zone: in panic it ignores zones and health alike).
    fn pick(&self, now: Instant, now_ns: u64, counted: bool) -> Option<&Member> {
        let permille = self.local_permille(now_ns);
        if permille == PANIC {
            return None;
        }
        let local = permille >= 1000 || (permille > 0 && fastrand::u64(..1000) < permille);
        let (first, second, i) = if local {
            (&self.local, &self.remote, 0)
        } else {
            (&self.remote, &self.local, 1)
        };
        // The zones' pools claim no due probe of their own: the whole
        // pool's pick did before (see `Pool::pick_counted`).
        match first.pick_here(now, now_ns, Tried::NONE) {
            Some(m) => {
                if counted {
                    self.counters[i].inc();
                }
                Some(m)
            }
            None => {
                if counted {
                    self.counters[1 - i].inc();
                }
                second.pick_here(now, now_ns, Tried::NONE)
            }
        }
    }

    /// Counts a first try sent to a local (`true`) or a remote endpoint.
    fn count(&self, local: bool) {
        self.counters[usize::from(!local)].inc();
    }

    /// The local zone's share of first tries, in permille (cached).
    fn local_permille(&self, now_ns: u64) -> u64 {
        let now_ms = now_ns / 1_000_000 + 1;
        let cached = self.cached.load(Ordering::Relaxed);
        if cached != 0 && now_ms.saturating_sub(cached >> 16) < ZONE_REFRESH_MS {
            return cached & 0xffff;
        }
        let permille = self.share(now_ns);
        self.cached
            .store((now_ms << 16) | permille, Ordering::Relaxed);
        permille
    }

    /// Works the local share out from the members' health at `now_ns`, or
    /// [`PANIC`]. A member whose ejection is up counts as available: its
    /// next pick is its probe.
    fn share(&self, now_ns: u64) -> u64 {
        // Available members: their weight, and how many.
        let available = |pool: &Pool| -> (u64, u64) {
            (pool.members.iter())
                .filter(|m| !m.state.health.counts_out(now_ns))
                .fold((0, 0), |(w, n), m| (w + u64::from(m.weight), n + 1))
        };
        let ((local, in_local), (remote, in_remote)) =
            (available(&self.local), available(&self.remote));
        if (in_local + in_remote) * 100 < self.panic_threshold * self.members {
            return PANIC;
        }
        if local * 100 >= self.min_healthy * self.local_weight || remote == 0 {
            return 1000;
        }
        // (local / (local + remote)) / (local_weight / all_weight)
        let permille = 1000 * local * self.all_weight / ((local + remote) * self.local_weight);
        permille.min(1000)
    }
}

/// The endpoints a request may go to, and the balancer over them.
pub struct Pool {
    members: Vec<Member>,
    /// The subset an empty pool reports its failures under.
    home: usize,
    lb: Lb,
    /// Running total of weights, for weighted random draws; `None` when
    /// every weight is equal (a uniform draw is then enough).
    cumulative: Option<Vec<u64>>,
    /// Round robin: the order of the rotation.
    rotation: Rotation,
    /// Round robin: the rotation's next position.
    cursor: AtomicU64,
    /// Percent of members that must be available, else ignore health.
    panic_threshold: u32,
    /// The local and remote zones, when zone-aware routing is on.
    zones: Option<Box<Zones>>,
    /// Time a probe of an ejected endpoint has before another is sent.
    probe_grace: std::time::Duration,
    /// The earliest time (ns since the process epoch) a member's ejection
    /// ends, `u64::MAX` when none is out: the one load a pick pays to know
    /// that no probe is due, whatever its algorithm would have chosen.
    probe_at: AtomicU64,
}

impl Peers for Pool {
    fn out_of(&self, now_ns: u64) -> (usize, usize) {
        let out = (self.members.iter())
            .filter(|m| m.state.health.counts_out(now_ns))
            .count();
        (self.members.len(), out)
    }
}

impl Pool {
    /// Builds a pool; `members` may be empty (every pick is then `None`).
    pub fn new(members: Vec<Member>, lb: Lb, home: usize) -> Pool {
        let equal = members.windows(2).all(|w| w[0].weight == w[1].weight);
        let cumulative = (!equal).then(|| {
            members
                .iter()
                .scan(0u64, |sum, m| {
                    *sum += u64::from(m.weight);
                    Some(*sum)
                })
                .collect()
        });
        let rotation = if lb == Lb::RoundRobin {
            Rotation::new(&members, cumulative.as_deref())
        } else {
            Rotation::Schedule(Vec::new())
        };
        // Endpoints carried over from the last table may be out already.
        let probe_at = members
            .iter()
            .map(|m| m.state.health.ejected_until())
            .filter(|&until| until != 0)
            .min()
            .unwrap_or(u64::MAX);
        Pool {
            probe_at: AtomicU64::new(probe_at),
            // Start round robin at a random place so that many proxies
            // do not all hit the first endpoint together.
            cursor: AtomicU64::new(fastrand::u64(..rotation.len().max(1))),
            members,
            home,
            lb,
            cumulative,
            rotation,
            panic_threshold: 50,
            probe_grace: std::time::Duration::from_secs(10),
            zones: None,
        }
    }

    /// Turns zone-aware routing on (see `Zones`) when the pool has
    /// members both in the local zone and outside it; `counters` count
    /// first tries sent to the local and to the remote zones. Call after
    /// [`Pool::with_health`].
    pub fn with_zones(
        mut self,
        min_healthy: u32,
        counters: impl FnOnce() -> [IntCounter; 2],
    ) -> Pool {
        let (local, remote): (Vec<Member>, Vec<Member>) =
            self.members.iter().map(Member::copy).partition(|m| m.local);
        if local.is_empty() || remote.is_empty() {
            return self;
        }
        let weight = |ms: &[Member]| ms.iter().map(|m| u64::from(m.weight)).sum::<u64>();
        let (local_weight, remote_weight) = (weight(&local), weight(&remote));
        let members = (local.len() + remote.len()) as u64;
        let sub = |members| Pool::new(members, self.lb, self.home).with_health(0, self.probe_grace);
        self.zones = Some(Box::new(Zones {
            local: sub(local),
            remote: sub(remote),
            local_weight,
            all_weight: local_weight + remote_weight,
            min_healthy: u64::from(min_healthy),
            panic_threshold: u64::from(self.panic_threshold),
            members,
            cached: AtomicU64::new(0),
            counters: counters(),
        }));
        self
    }

    /// Sets the panic threshold (percent) and the probe grace time.
    pub fn with_health(mut self, panic_threshold: u32, probe_grace: std::time::Duration) -> Pool {
        self.panic_threshold = panic_threshold;
        self.probe_grace = probe_grace;
        self
    }

    /// The subset index failures of this pool count under when it has
    /// no member to pick.
    pub fn home(&self) -> usize {
        self.home
    }

    /// The pool's algorithm.
    pub fn lb(&self) -> Lb {
        self.lb
    }

    /// The pool's members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Picks an endpoint for one request, skipping ejected endpoints and
    /// those in `exclude` (the endpoints the request's earlier tries failed
    /// on) while there is another.
    /// An endpoint whose ejection is up gets the request as its probe.
    /// Below the panic threshold of available endpoints, it balances over
    /// all of them, ejected or not.
    pub fn pick(&self, now: Instant, exclude: Tried<'_>) -> Option<&Member> {
        self.pick_counted(now, exclude, true)
    }

    /// [`Pool::pick`] for what is not a request's first try although it
    /// is balanced as one (a re-send after a stale pooled connection, a
    /// mirror's copy): not counted in `almond_zone_requests_total`.
    pub fn pick_uncounted(&self, now: Instant, exclude: Tried<'_>) -> Option<&Member> {
        self.pick_counted(now, exclude, false)
    }

    fn pick_counted(&self, now: Instant, exclude: Tried<'_>, counted: bool) -> Option<&Member> {
        let now_ns = crate::clock::nanos_since_epoch(now);
        // A due probe goes first, whichever zone its endpoint is in: the
        // zones' picks look in one zone only, and never probed a remote
        // endpoint back while the local zone carried every first try.
        if now_ns >= self.probe_at.load(Ordering::Relaxed) {
            if let Some(probe) = self.claim_due_probe(now_ns, exclude) {
                if let (Some(zones), true, false) = (&self.zones, counted, exclude.is_retry()) {
                    zones.count(probe.local);
                }
                return Some(probe);
            }
        }
        // Zones choose first tries; a retry may go to any other endpoint.
        if let (Some(zones), false) = (&self.zones, exclude.is_retry()) {
            if let Some(picked) = zones.pick(now, now_ns, counted) {
                return Some(picked);
            }
        }
        self.pick_here(now, now_ns, exclude)
    }

    /// The balancer's pick among this pool's members, zones and due
    /// probes aside.
    fn pick_here(&self, now: Instant, now_ns: u64, exclude: Tried<'_>) -> Option<&Member> {
        let n = self.members.len();
        let first = match n {
            0 => return None,
            // Panic off (`panic_threshold: 0`, rare) holds for one endpoint
            // too: one compare here, the health load only then.
            1 if self.panic_threshold == 0 => return self.lone(now_ns, exclude),
            1 => return self.members.first(),
            // A retry must not move round robin's rotation on, or the
            // endpoint after a failing one would get every first try.
            _ if exclude.is_retry() && self.lb == Lb::RoundRobin => {
                let start = fastrand::u64(..self.rotation.len().max(1));
                &self.members[self.rotation.at(start, self.cumulative.as_deref())]
            }
            _ => self.pick_among_all(n, now),
        };
        if self.usable(first, now_ns, exclude) {
            return Some(first);
        }
        self.pick_slow(first, now, now_ns, exclude)
    }

    /// The latency sample of a try at `endpoint` that failed after `took`:
    /// `FAILURE_PENALTY` times the mean estimate of up to
    /// `PEERS_SAMPLED` measured peers, at most `cap` (all of a pool
    /// failing must not drive the estimates up without end, each penalty
    /// the peers' last), or `took` if longer. Just `took` when no peer is
    /// measured.
    pub fn failure_rtt(
        &self,
        endpoint: &EndpointState,
        took: Duration,
        cap: Duration,
        now: Instant,
    ) -> Duration {
        let n = self.members.len();
        let start = fastrand::usize(..n.max(1));
        let (mut sum, mut measured) = (0.0, 0u32);
        let peers = (self.members.iter().cycle().skip(start).take(n))
            .filter(|m| !std::ptr::eq(&*m.state, endpoint))
            .take(PEERS_SAMPLED);
        for m in peers {
            let rtt = m.state.rtt_estimate(now);
            if rtt > 0.0 {
                sum += rtt;
                measured += 1;
            }
        }
        if measured == 0 {
            return took;
        }
        let penalty = sum / f64::from(measured) * FAILURE_PENALTY;
        let penalty = Duration::from_nanos(penalty as u64).min(cap);
        took.max(penalty)
    }

    /// The pick of a pool of one with panic off: its endpoint when it is
    /// in service or due its probe (claimed), or a retry of it (as
    /// [`Pool::pick`] retries the excluded endpoint when no other is
    /// left); else nothing, as for any pool with every endpoint ejected
    /// and panic off (Envoy's "no healthy upstream").
    fn lone(&self, now_ns: u64, exclude: Tried<'_>) -> Option<&Member> {
        let only = self.members.first()?;
        if exclude.has(&only.state) {
            return Some(only);
        }
        self.usable(only, now_ns, Tried::NONE).then_some(only)
    }

    /// A member of this pool was ejected until `until` (ns since the
    /// process epoch): probe it then.
    pub fn note_ejection(&self, until: u64) {
        self.probe_at.fetch_min(until, Ordering::AcqRel);
        if let Some(zones) = &self.zones {
            zones.cached.store(0, Ordering::Relaxed);
        }
    }

    /// Some member's ejection is up: claims its probe for this request,
    /// and sets when the next one is due. One picker scans at a time.
    fn claim_due_probe(&self, now_ns: u64, exclude: Tried<'_>) -> Option<&Member> {
        let seen = self.probe_at.swap(u64::MAX, Ordering::AcqRel);
        if seen > now_ns {
            // Another picker is scanning, or an ejection moved it: keep it.
            self.probe_at.fetch_min(seen, Ordering::AcqRel);
            return None;
        }
        let mut next = u64::MAX;
        let mut claimed = None;
        for m in &self.members {
            let until = m.state.health.ejected_until();
            if until == 0 {
                continue;
            }
            let excluded = exclude.has(&m.state);
            if claimed.is_none()
                && !excluded
                && until <= now_ns
                && m.state.health.claim_probe(now_ns, self.probe_grace)
            {
                claimed = Some(m);
            }
            // A claimed probe's grace, a later ejection's end, or (for an
            // excluded member) now again on the next pick.
            next = next.min(m.state.health.ejected_until().max(1));
        }
        self.probe_at.fetch_min(next, Ordering::AcqRel);
        claimed
    }

    /// The algorithm over every member, health not considered.
    fn pick_among_all(&self, n: usize, now: Instant) -> &Member {
        match self.lb {
            Lb::RoundRobin => {
                let position = self.cursor.fetch_add(1, Ordering::Relaxed);
                &self.members[self.rotation.at(position, self.cumulative.as_deref())]
            }
            Lb::LeastRequest | Lb::P2cEwma => {
                let (a, b) = self.two(n);
                self.cheaper(a, b, now)
            }
        }
    }

    /// Power of two choices between `a` and `b`, drawn by weight (see
    /// [`Pool::two`]; they may be the same member).
    ///
    /// `least_request` (Envoy's): the one with fewer requests in flight
    /// (`a`, drawn at random, wins ties). `p2c_ewma` draws between the two
    /// with odds inverse to their cost: two endpoints that behave the same
    /// split the traffic evenly whatever the noise in their latency
    /// estimates, while one 10x costlier gets about a tenth of what its
    /// peer gets (a strict "cheaper wins" would give the slowest of three
    /// identical endpoints nothing for as long as the order holds). Weights
    /// are in the draw only: between equals, each endpoint's share is its
    /// weight's.
    fn cheaper(&self, a: usize, b: usize, now: Instant) -> &Member {
        let (ma, mb) = (&self.members[a], &self.members[b]);
        if a == b {
            return ma;
        }
        match self.lb {
            Lb::P2cEwma => {
                // An endpoint not measured yet is taken to be as fast as
                // the one it is compared with.
                let (ra, rb) = match (ma.state.rtt_estimate(now), mb.state.rtt_estimate(now)) {
                    (0.0, 0.0) => (1.0, 1.0),
                    (0.0, rb) => (rb, rb),
                    (ra, 0.0) => (ra, ra),
                    known => known,
                };
                let (ca, cb) = (
                    ra * ma.state.in_flight_cost(),
                    rb * mb.state.in_flight_cost(),
                );
                // P(a) = (1 / ca) / (1 / ca + 1 / cb) = cb / (ca + cb)
                if fastrand::f64() * (ca + cb) < cb {
                    ma
                } else {
                    mb
                }
            }
            _ => {
                if ma.state.in_flight_cost() <= mb.state.in_flight_cost() {
                    ma
                } else {
                    mb
                }
            }
        }
    }

    /// Is `m` fine to send to now? Claims the probe of an endpoint whose
    /// ejection is up.
    fn usable(&self, m: &Member, now_ns: u64, exclude: Tried<'_>) -> bool {
        if exclude.has(&m.state) {
            return false;
        }
        match m.state.health.availability(now_ns) {
            Availability::Available => true,
            Availability::Ejected => false,
            Availability::ProbeDue => m.state.health.claim_probe(now_ns, self.probe_grace),
        }
    }

    /// Some member is ejected or excluded: choose among the others.
    fn pick_slow<'a>(
        &'a self,
        first: &'a Member,
        now: Instant,
        now_ns: u64,
        exclude: Tried<'_>,
    ) -> Option<&'a Member> {
        let mut usable = Vec::with_capacity(self.members.len());
        let mut ejected = 0;
        for (i, m) in self.members.iter().enumerate() {
            if self.usable(m, now_ns, exclude) {
                // A usable member still marked out is a probe claimed for
                // this very request: send it there.
                if m.state.health.is_out() {
                    return Some(m);
                }
                usable.push(i);
            } else if m.state.health.counts_out(now_ns) {
                ejected += 1;
            }
        }
        let n = self.members.len();
        if (n - ejected) * 100 < self.panic_threshold as usize * n {
            // Panic: too few left to carry the load; ignore health. The
            // algorithm's first choice stands unless a retry excludes it.
            if !exclude.has(&first.state) {
                return Some(first);
            }
            let others: Vec<usize> = (0..n)
                .filter(|&i| !exclude.has(&self.members[i].state))
                .collect();
            return (self.pick_from(&others, now, true))
                .or_else(|| self.oldest_tried(exclude))
                .or_else(|| self.members.first());
        }
        if usable.is_empty() {
            // Only endpoints a try failed on are left: retry one rather
            // than fail, the one that failed longest ago.
            return self.oldest_tried(exclude);
        }
        self.pick_from(&usable, now, exclude.is_retry())
    }

    /// The member a try of `tried` failed on longest ago.
    fn oldest_tried(&self, tried: Tried<'_>) -> Option<&Member> {
        (tried.0.iter()).find_map(|t| (self.members.iter()).find(|m| std::ptr::eq(&*m.state, &**t)))
    }

    /// The algorithm restricted to the members at `indices`.
    fn pick_from(&self, indices: &[usize], now: Instant, exclude_retry: bool) -> Option<&Member> {
        match indices.len() {
            0 => None,
            1 => self.members.get(indices[0]),
            k => match self.lb {
                Lb::RoundRobin => {
                    // A first try takes the cursor's member if it is
                    // allowed. A turn of one that is not goes to an allowed
                    // one drawn by weight, so its share spreads over the
                    // others by their weights (walking on to the next
                    // allowed one would hand it all to its successor: 1:1:1
                    // with one out went 1/3 and 2/3). Retries draw so too:
                    // they must not move the rotation on.
                    if !exclude_retry {
                        let position = self.cursor.fetch_add(1, Ordering::Relaxed);
                        let at = self.rotation.at(position, self.cumulative.as_deref());
                        if indices.contains(&at) {
                            return self.members.get(at);
                        }
                    }
                    let drawn = weighted(&self.running_totals(indices));
                    indices.get(drawn).and_then(|&i| self.members.get(i))
                }
                _ => {
                    let (a, b) = match self.cumulative {
                        None => {
                            let a = fastrand::usize(..k);
                            (a, (a + 1 + fastrand::usize(..k - 1)) % k)
                        }
                        Some(_) => {
                            let cum = self.running_totals(indices);
                            (weighted(&cum), weighted(&cum))
                        }
                    };
                    Some(self.cheaper(indices[a], indices[b], now))
                }
            },
        }
    }

    /// Running totals of the weights of the members at `indices`, for a
    /// draw among them: the slow path (ejections, retries) makes them.
    fn running_totals(&self, indices: &[usize]) -> Vec<u64> {
        (indices.iter())
            .scan(0, |sum, &i| {
                *sum += u64::from(self.members[i].weight);
                Some(*sum)
            })
            .collect()
    }

    /// The two members a power-of-two choice is between: two distinct ones
    /// drawn uniformly when every weight is equal; else two drawn by weight,
    /// independently (the same one twice is that one), which keeps each
    /// endpoint's share at its weight's between equals.
    fn two(&self, n: usize) -> (usize, usize) {
        match &self.cumulative {
            None => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                (a, b)
            }
            Some(cum) => (weighted(cum), weighted(cum)),
        }
    }
}

/// A weighted random index from running totals.
fn weighted(cumulative: &[u64]) -> usize {
    let total = cumulative.last().copied().unwrap_or(1);
    let x = fastrand::u64(..total);
    cumulative.partition_point(|&c| c <= x)
}

/// Round robin's order: which member each position of the rotation
/// gives, every member as many positions a round as its weight.
enum Rotation {
    /// A smooth weighted round-robin order (Nginx's algorithm), computed
    /// once: weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
    /// One slot per unit of weight, the weights first divided by their
    /// greatest common divisor.
    Schedule(Vec<u32>),
    /// Weights too heavy for a schedule of [`MAX_SCHEDULE`] slots (which
    /// would have to round the light ones, and did: 1 and 10,000 gave the
    /// light one 1 slot in 4,097): position `p` is the unit of weight
    /// `p * stride % total`, and its member is the one whose run of the
    /// running totals holds it. `stride` and `total` have no common
    /// divisor, so a round of `total` positions takes every unit once:
    /// each member gets exactly its weight. `stride` is near `total / phi`,
    /// so the units a member holds come round evenly spaced (the three-gap
    /// theorem: at most three distinct gaps between them).
    Stride {
        /// Total weight.
        total: u64,
        /// Units of weight from one position to the next.
        stride: u64,
    },
}

impl Rotation {
    /// The rotation of `members`; `cumulative`: their running totals of
    /// weight, `None` when all weigh the same.
    fn new(members: &[Member], cumulative: Option<&[u64]>) -> Rotation {
        let divisor = members
            .iter()
            .fold(0, |g, m| gcd(g, u64::from(m.weight)))
            .max(1);
        let units: u64 = members.iter().map(|m| u64::from(m.weight) / divisor).sum();
        if units <= MAX_SCHEDULE {
            return Rotation::Schedule(schedule(members, divisor, units));
        }
        // Equal weights: one unit per member.
        let total = cumulative
            .and_then(|c| c.last().copied())
            .unwrap_or(members.len() as u64);
        // 1 / phi = 0.618...; the first stride from there with no divisor
        // in common with the total (a few steps at most).
        let mut stride = ((total as f64 * 0.618_033_988_749_895) as u64).max(1);
        while gcd(stride, total) != 1 {
            stride += 1;
        }
        Rotation::Stride { total, stride }
    }

    /// Positions in a round.
    fn len(&self) -> u64 {
        match self {
            Rotation::Schedule(slots) => slots.len() as u64,
            Rotation::Stride { total, .. } => *total,
        }
    }

    /// The member at `position` (taken modulo a round); `cumulative` as
    /// in [`Rotation::new`]. No allocation, no lock: a load, a division
    /// and, for a stride, a binary search over the running totals.
    #[inline]
    fn at(&self, position: u64, cumulative: Option<&[u64]>) -> usize {
        match self {
            Rotation::Schedule(slots) => (position.checked_rem(slots.len() as u64))
                .and_then(|slot| slots.get(slot as usize))
                .map_or(0, |&m| m as usize),
            Rotation::Stride { total, stride } => {
                let round = u128::from(position % total);
                let unit = (round * u128::from(*stride) % u128::from(*total)) as u64;
                match cumulative {
                    Some(c) => c.partition_point(|&sum| sum <= unit),
                    None => unit as usize,
                }
            }
        }
    }
}

/// The greatest common divisor of `a` and `b` (`b` when `a` is 0).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while a != 0 {
        (a, b) = (b % a, a);
    }
    b
}

/// The smooth weighted round-robin order of `members`, their weights
/// divided by `divisor` (`units` in all).
fn schedule(members: &[Member], divisor: u64, units: u64) -> Vec<u32> {
    let weights: Vec<i64> = (members.iter())
        .map(|m| (u64::from(m.weight) / divisor) as i64)
        .collect();
    let total = units as i64;
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(units as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..members.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pool(weights: &[u32], lb: Lb) -> Pool {
        let members = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Member {
                state: Arc::new(EndpointState::new(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    1000 + i as u16,
                )))),
                weight: *w,
                subset: 0,
                local: false,
            })
            .collect();
        Pool::new(members, lb, 0)
    }

    fn counts(pool: &Pool, n: usize) -> HashMap<u16, usize> {
        let now = Instant::now();
        let mut out = HashMap::new();
        for _ in 0..n {
            let m = pool.pick(now, Tried::NONE).expect("non-empty pool");
            *out.entry(m.state.addr.port()).or_default() += 1;
        }
        out
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let p = pool(&[5, 1, 1], Lb::RoundRobin);
        assert!(matches!(&p.rotation, Rotation::Schedule(s) if s == &[0, 0, 1, 0, 2, 0, 0]));
        let c = counts(&p, 700);
        assert_eq!((c[&1000], c[&1001], c[&1002]), (500, 100, 100));
    }

    /// Weights beyond the schedule's 4,096 slots keep their shares: every
    /// endpoint gets exactly its weight in each round of the total weight
    /// (1 and 10,000 had the light one at 1 in 4,097, 2.4x its share; 3
    /// and 7 got the same), its turns spread over the round.
    #[test]
    fn round_robin_keeps_shares_beyond_the_schedule() {
        for weights in [&[1, 10_000][..], &[1, 3, 7, 5_000, 10_000], &[2, 4_095]] {
            let p = pool(weights, Lb::RoundRobin);
            let total: u32 = weights.iter().sum();
            let rounds = 10;
            let now = Instant::now();
            let picks: Vec<usize> = (0..total * rounds)
                .map(|_| usize::from(p.pick(now, Tried::NONE).unwrap().state.addr.port() - 1000))
                .collect();
            for (i, &w) in weights.iter().enumerate() {
                let turns: Vec<usize> = (0..picks.len()).filter(|&k| picks[k] == i).collect();
                assert_eq!(
                    turns.len(),
                    (w * rounds) as usize,
                    "{weights:?}: endpoint {i}"
                );
                // No gap between turns over three times the mean one.
                let mean = f64::from(total) / f64::from(w);
                let gap = turns.windows(2).map(|t| t[1] - t[0]).max().unwrap_or(0);
                assert!(
                    gap as f64 <= 3.0 * mean,
                    "{weights:?}: endpoint {i}: gap {gap}, mean {mean:.0}"
                );
            }
        }
        // A share of 1 in 10,001 over picks that are not whole rounds.
        let c = counts(&pool(&[1, 10_000], Lb::RoundRobin), 1_000_000);
        let light = c.get(&1000).copied().unwrap_or(0);
        assert!((99..=101).contains(&light), "{c:?}");
    }

    /// Weights over 4,096 in total with a common divisor keep the smooth
    /// schedule of their quotients: 5,000, 1,000, 1,000 go round as 5, 1, 1.
    #[test]
    fn round_robin_divides_weights_by_their_common_divisor() {
        let p = pool(&[5_000, 1_000, 1_000], Lb::RoundRobin);
        let now = Instant::now();
        let picks: Vec<u16> = (0..700)
            .map(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port())
            .collect();
        for seven in picks.windows(7) {
            let n = |port| seven.iter().filter(|&&p| p == port).count();
            assert_eq!((n(1000), n(1001), n(1002)), (5, 1, 1), "{seven:?}");
        }
    }

    #[test]
    fn p2c_never_picks_the_same_endpoint_twice_among_equals() {
        for _ in 0..1000 {
            let p = pool(&[1, 1], Lb::P2cEwma);
            let (a, b) = p.two(2);
            assert_ne!(a, b);
        }
    }

    /// Each endpoint's share is within five standard deviations of its
    /// weight's share.
    fn assert_weighted(c: &HashMap<u16, usize>, weights: &[u32], n: usize, what: &str) {
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let p = f64::from(w) / f64::from(total);
            let want = p * n as f64;
            let band = 5.0 * (n as f64 * p * (1.0 - p)).sqrt();
            let got = c.get(&(1000 + i as u16)).copied().unwrap_or(0) as f64;
            assert!(
                (got - want).abs() <= band,
                "{what} {weights:?}: endpoint {i} got {got}, want {want:.0} +- {band:.0}: {c:?}"
            );
        }
    }

    /// Idle endpoints of equal cost share by weight, exactly: the weight is
    /// in the draw of the two, not counted again in the choice between them.
    #[tokio::test(start_paused = true)]
    async fn p2c_honours_weights_when_loads_are_equal() {
        for lb in [Lb::LeastRequest, Lb::P2cEwma] {
            for weights in [
                &[3, 1, 1, 1][..],
                &[1, 10, 10],
                &[9, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                &[3, 1],
            ] {
                let p = pool(weights, lb);
                let c = counts(&p, 20_000);
                assert_weighted(&c, weights, 20_000, &format!("{lb:?}"));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_steers_away_from_a_slow_endpoint() {
        let p = pool(&[1, 1, 1], Lb::P2cEwma);
        let now = Instant::now();
        // Endpoint 0 answers in 200 ms, the others in 1 ms.
        p.members[0]
            .state
            .observe_rtt(now, std::time::Duration::from_millis(200));
        // A few answers each bring the others down from the 30 ms default.
        for m in &p.members[1..] {
            for _ in 0..30 {
                m.state
                    .observe_rtt(now, std::time::Duration::from_millis(1));
            }
        }
        // Odds inverse to cost: the slow one wins 1 pairing in ~200.
        let c = counts(&p, 3000);
        assert!(c.get(&1000).copied().unwrap_or(0) < 60, "{c:?}");
        let (b, c2) = (c[&1001], c[&1002]);
        assert!(b.abs_diff(c2) < 300, "equal endpoints share evenly: {c:?}");
    }

    /// A failure costs five times the peers' latency, at most the cap, or
    /// the try's own time if longer: one fast failure leaves the endpoint
    /// a ninth of the picks among three (1/6 of its pairings), where a
    /// second's penalty against 1 ms peers left it under 0.1 %.
    #[tokio::test(start_paused = true)]
    async fn a_failure_costs_a_few_times_the_peers_latency() {
        use std::time::Duration;
        let p = pool(&[1, 1, 1], Lb::P2cEwma);
        let now = Instant::now();
        let (ms, cap) = (Duration::from_millis(1), Duration::from_secs(1));
        let failing = &p.members[0].state;
        // No peer measured yet: the try's own time.
        assert_eq!(p.failure_rtt(failing, ms / 2, cap, now), ms / 2);
        for m in &p.members {
            m.state.observe_rtt(now, ms);
        }
        assert_eq!(p.failure_rtt(failing, ms / 2, cap, now), 5 * ms);
        // A slow failure (a timeout) counts as what it took.
        let slow = Duration::from_secs(2);
        assert_eq!(p.failure_rtt(failing, slow, cap, now), slow);
        // Peers failing too: the penalty stops at the cap.
        for m in &p.members[1..] {
            m.state.observe_rtt(now, Duration::from_secs(3));
        }
        assert_eq!(p.failure_rtt(failing, ms, cap, now), cap);

        let p = pool(&[1, 1, 1], Lb::P2cEwma);
        for m in &p.members {
            m.state.observe_rtt(now, ms);
        }
        let failing = &p.members[0].state;
        failing.observe_rtt(now, p.failure_rtt(failing, ms / 2, cap, now));
        // 1/9 of 9,000: 1,000 +- 5 sigma (149).
        let c = counts(&p, 9000);
        let got = c.get(&1000).copied().unwrap_or(0);
        assert!((851..=1149).contains(&got), "{c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_prefers_idle_endpoints() {
        let p = pool(&[1, 1], Lb::LeastRequest);
        let _busy = p.members[0].state.start();
        let c = counts(&p, 100);
        assert_eq!(c.get(&1001), Some(&100));
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;
    use crate::upstream::eject::Outlier;
    use almond_config::CircuitBreaker;
    use std::time::Duration;

    fn pool(n: u16, lb: Lb) -> Pool {
        let members = (0..n)
            .map(|i| Member {
                state: Arc::new(EndpointState::new(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    3000 + i,
                )))),
                weight: 1,
                subset: 0,
                local: false,
            })
            .collect();
        Pool::new(members, lb, 0)
    }

    fn eject(p: &Pool, i: usize, now: Instant) {
        let cb = CircuitBreaker {
            consecutive_failures: 1,
            max_ejection_percent: 100,
            ..CircuitBreaker::default()
        };
        let outlier = Outlier::new(&cb, Duration::from_secs(1));
        let metrics = crate::observe::metrics::EjectionMetrics {
            ejections: prometheus::IntCounter::new("e", "e").unwrap(),
            healthy: prometheus::IntGauge::new("h", "h").unwrap(),
            ejected: prometheus::IntGauge::new("x", "x").unwrap(),
        };
        // As the route does: the pool hears of the ejection.
        if let Some(until) =
            outlier.record(&*p.members[i].state, true, false, now, p, &metrics, "s")
        {
            p.note_ejection(until);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_balancer_skips_ejected_endpoints() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = pool(4, lb);
            let now = Instant::now();
            eject(&p, 2, now);
            for _ in 0..500 {
                let m = p.pick(now, Tried::NONE).unwrap();
                assert_ne!(m.state.addr.port(), 3002, "{lb:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn panic_threshold_balances_over_all() {
        // 3 of 4 ejected: 25 % available < 50 %: use all four.
        let p = pool(4, Lb::RoundRobin);
        let now = Instant::now();
        for i in 0..3 {
            eject(&p, i, now);
        }
        let hit: std::collections::HashSet<u16> = (0..100)
            .map(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port())
            .collect();
        assert_eq!(hit.len(), 4);
    }

    /// Endpoints of these weights on ports `base`, `base + 1`, ...; the
    /// first `local` in the local zone.
    fn members(weights: &[u32], local: usize, base: u16) -> Vec<Member> {
        (weights.iter().enumerate())
            .map(|(i, &weight)| Member {
                state: Arc::new(EndpointState::new(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    base + i as u16,
                )))),
                weight,
                subset: 0,
                local: i < local,
            })
            .collect()
    }

    /// `members` zone-aware, `panic_threshold` 50, `zone_min_healthy` 70.
    fn zoned_pool(members: Vec<Member>, lb: Lb, probe_grace: Duration) -> Pool {
        let counter = |name| prometheus::IntCounter::new(name, "z").unwrap();
        Pool::new(members, lb, 0)
            .with_health(50, probe_grace)
            .with_zones(70, || [counter("l"), counter("r")])
    }

    /// Six endpoints in three zones, the first two local, zone-aware.
    fn zoned(lb: Lb) -> Pool {
        zoned_pool(members(&[1; 6], 2, 3000), lb, Duration::from_secs(1))
    }

    #[tokio::test(start_paused = true)]
    async fn zones_keep_first_tries_local_then_spill_over() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = zoned(lb);
            let now = Instant::now();
            let local = |p: &Pool| {
                (0..1000)
                    .filter(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port() < 3002)
                    .count()
            };
            assert_eq!(local(&p), 1000, "{lb:?}");
            // A retry may leave the zone.
            let failed = p.members[0].state.clone();
            let retried = (0..200)
                .filter(|_| {
                    p.pick(now, Tried(std::slice::from_ref(&failed)))
                        .unwrap()
                        .state
                        .addr
                        .port()
                        >= 3002
                })
                .count();
            assert!(retried > 0, "{lb:?}");
            // One local endpoint out: 50 % < 70 %; local keeps (1/5)/(2/6).
            eject(&p, 0, now);
            assert_eq!(
                p.zones
                    .as_ref()
                    .unwrap()
                    .local_permille(crate::clock::nanos_since_epoch(now)),
                600
            );
            // Binomial(1000, 0.6): sigma 15.5, a 5-sigma band.
            let k = local(&p);
            assert!((523..=677).contains(&k), "{lb:?}: {k}");
            // Both out: everything spills over.
            eject(&p, 1, now);
            assert_eq!(local(&p), 0, "{lb:?}");
        }
    }

    /// Panic is judged over the whole pool, not a zone: with three local
    /// endpoints of nine and two of them out, the pool has 78 % available
    /// (over `panic_threshold` 50), so no first try goes to an ejected
    /// endpoint, though the local zone alone has 33 %. With five of nine
    /// out (44 %) the pool panics: health is ignored, zones too.
    #[tokio::test(start_paused = true)]
    async fn zones_judge_panic_over_the_whole_pool() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = zoned_pool(members(&[1; 9], 3, 4000), lb, Duration::from_secs(3600));
            let now = Instant::now();
            eject(&p, 0, now);
            eject(&p, 1, now);
            let picks: Vec<u16> = (0..2000)
                .map(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port())
                .collect();
            assert!(
                picks.iter().all(|&port| port >= 4002),
                "{lb:?}: an ejected one picked"
            );
            assert!(picks.contains(&4002), "{lb:?}: the local zone still serves");
            for i in 3..6 {
                eject(&p, i, now);
            }
            let out = (0..2000)
                .filter(|_| p.pick(now, Tried::NONE).unwrap().state.health.is_out())
                .count();
            assert!(out > 0, "{lb:?}: in panic, health is ignored");
        }
    }

    /// A remote endpoint's ejection ends while the local zone takes every
    /// first try: the next first try is its probe (it was never probed,
    /// and stayed ejected for good). The ejection counts no more once it
    /// is up, for zone shares as for panic.
    #[tokio::test(start_paused = true)]
    async fn zones_probe_a_remote_endpoint_when_its_ejection_ends() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = zoned_pool(members(&[1, 1], 1, 8000), lb, Duration::from_secs(1));
            let now = Instant::now();
            eject(&p, 1, now);
            assert!((0..100).all(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port() == 8000));
            let later = now + Duration::from_secs(60);
            let first = p.pick(later, Tried::NONE).unwrap();
            assert_eq!(first.state.addr.port(), 8001, "{lb:?}: the probe");
            let zones = p.zones.as_ref().unwrap();
            assert_eq!(zones.counters[1].get(), 1, "{lb:?}: counted remote");
            // Its probe out, the others stay local.
            assert!((0..100).all(|_| p.pick(later, Tried::NONE).unwrap().state.addr.port() == 8000));
        }
        // An ejection that is up is not counted against the zone's share.
        let p = zoned(Lb::RoundRobin);
        let now = Instant::now();
        eject(&p, 0, now);
        let zones = p.zones.as_ref().unwrap();
        assert_eq!(zones.share(crate::clock::nanos_since_epoch(now)), 600);
        let later = now + Duration::from_secs(60);
        assert_eq!(zones.share(crate::clock::nanos_since_epoch(later)), 1000);
    }

    /// With an endpoint ejected, the others still share by weight (the
    /// draw among the usable ones is weighted too).
    #[tokio::test(start_paused = true)]
    async fn weights_hold_among_the_endpoints_left() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let members = members(&[3, 1, 1, 1, 1], 0, 5000);
            let p = Pool::new(members, lb, 0).with_health(50, Duration::from_secs(3600));
            let now = Instant::now();
            eject(&p, 4, now);
            let n = 12_000;
            let heavy = (0..n)
                .filter(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port() == 5000)
                .count() as f64;
            // 3 of the 6 weight left: 6,000 +- 5 sigma (274).
            assert!((heavy - 6000.0).abs() < 274.0, "{lb:?}: {heavy}");
        }
    }

    /// Round robin with one of three equal endpoints ejected: the two left
    /// share evenly (its turns went all to the one after it: 1/3, 2/3).
    #[tokio::test(start_paused = true)]
    async fn round_robin_spreads_an_ejected_endpoint_s_turns_evenly() {
        let members = members(&[1, 1, 1], 0, 7000);
        let p = Pool::new(members, Lb::RoundRobin, 0).with_health(50, Duration::from_secs(3600));
        let now = Instant::now();
        eject(&p, 1, now);
        let n = 30_000;
        let first = (0..n)
            .filter(|_| p.pick(now, Tried::NONE).unwrap().state.addr.port() == 7000)
            .count() as f64;
        // 15,000 +- 5 sigma (the ejected one's 10,000 turns, drawn: 250).
        assert!((first - 15_000.0).abs() < 250.0, "{first} of {n}");
    }

    /// A rotation too long for a schedule skips an ejected endpoint too,
    /// and the others keep their shares.
    #[tokio::test(start_paused = true)]
    async fn round_robin_beyond_the_schedule_skips_ejected_endpoints() {
        let members = members(&[1, 10_000, 10_000], 0, 6000);
        let p = Pool::new(members, Lb::RoundRobin, 0).with_health(50, Duration::from_secs(3600));
        let now = Instant::now();
        eject(&p, 2, now);
        let n = 200_000;
        let mut light = 0;
        for _ in 0..n {
            match p.pick(now, Tried::NONE).unwrap().state.addr.port() {
                6000 => light += 1,
                6001 => {}
                port => panic!("{port} is ejected"),
            }
        }
        // 1 in 10,001 of what is left: 20 (the ejected one's turns are
        // drawn by weight among the two left).
        assert!((10..=30).contains(&light), "{light}");
    }

    /// Panic off holds for a pool of one: its ejected endpoint is not
    /// picked but for its probe when the ejection is up (it was picked
    /// whatever its health); with panic on, it gets everything.
    #[tokio::test(start_paused = true)]
    async fn panic_off_leaves_a_lone_ejected_endpoint_out() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = pool(1, lb).with_health(0, Duration::from_secs(1));
            let now = Instant::now();
            assert!(p.pick(now, Tried::NONE).is_some(), "{lb:?}");
            eject(&p, 0, now);
            assert!(
                p.pick(now, Tried::NONE).is_none(),
                "{lb:?}: picked while ejected"
            );
            let only = p.members[0].state.clone();
            assert!(
                p.pick(now, Tried(std::slice::from_ref(&only))).is_some(),
                "{lb:?}: its retry"
            );
            let later = now + Duration::from_secs(60);
            assert!(p.pick(later, Tried::NONE).is_some(), "{lb:?}: its probe");
            assert!(
                p.pick(later, Tried::NONE).is_none(),
                "{lb:?}: its probe is out"
            );

            let p = pool(1, lb).with_health(50, Duration::from_secs(1));
            eject(&p, 0, now);
            assert!(p.pick(now, Tried::NONE).is_some(), "{lb:?}: panic on");
        }
    }

    /// Two tries failed: the third avoids both; with every endpoint
    /// tried, the one that failed longest ago is tried again.
    #[tokio::test(start_paused = true)]
    async fn retries_avoid_every_endpoint_tried() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = pool(3, lb);
            let now = Instant::now();
            let two = [p.members[0].state.clone(), p.members[2].state.clone()];
            for _ in 0..300 {
                let m = p.pick(now, Tried(&two)).unwrap();
                assert_eq!(m.state.addr.port(), 3001, "{lb:?}");
            }
            let all = [2, 0, 1].map(|i| p.members[i].state.clone());
            for _ in 0..30 {
                let m = p.pick(now, Tried(&all)).unwrap();
                assert_eq!(m.state.addr.port(), 3002, "{lb:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_avoid_the_failed_endpoint() {
        for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::P2cEwma] {
            let p = pool(3, lb);
            let now = Instant::now();
            let failed = p.members[1].state.clone();
            for _ in 0..300 {
                let m = p.pick(now, Tried(std::slice::from_ref(&failed))).unwrap();
                assert_ne!(m.state.addr.port(), 3001, "{lb:?}");
            }
        }
    }
}
