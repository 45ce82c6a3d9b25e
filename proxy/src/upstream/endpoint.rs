//! Endpoint: what the proxy knows about one endpoint address -- its
//! latency estimate (peak EWMA), requests in flight, ejection state and
//! connections. Keyed by address and carried from one route table to the
//! next, so a config update keeps what the proxy has learnt.

use crate::clock::nanos_since_epoch;
use crate::upstream::connect::Connections;
use crate::upstream::eject::{Ejectable, Health};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Peak-EWMA decay time constant (Linkerd's and Finagle's default).
const DECAY: Duration = Duration::from_secs(10);
/// The stored RTT of an endpoint not measured yet: the balancer gives it
/// the estimate of the endpoint it is compared with, so a new endpoint (or
/// one back from ejection) gets its share at once, neither shunned as
/// Linkerd's pessimistic 30 ms default would nor flooded as 0 would.
const UNMEASURED: f64 = 0.0;
/// The least weight a sample below the estimate gets: a one-off peak is
/// washed out by a few normal answers, not by ten seconds of them.
const MIN_BLEND: f64 = 0.2;

/// What the proxy knows about one endpoint address.
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    in_flight: AtomicU32,
    /// Peak-EWMA RTT estimate, in nanoseconds (f64 bits).
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in ns since [`epoch`].
    stamp_ns: AtomicU64,
    /// Failure accrual and ejection.
    pub health: Health,
    /// Connections to it: the HTTP/1.1 pool, the shared HTTP/2 one.
    pub conns: Connections,
}

/// Decrements an endpoint's in-flight count when dropped.
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    /// The endpoint counted.
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    /// Fresh state for an address never seen before.
    pub fn new(addr: SocketAddr) -> EndpointState {
        EndpointState {
            addr,
            in_flight: AtomicU32::new(0),
            rtt_ns: AtomicU64::new(UNMEASURED.to_bits()),
            stamp_ns: AtomicU64::new(nanos_since_epoch(Instant::now())),
            health: Health::default(),
            conns: Connections::new(addr),
        }
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Open upstream connections now.
    pub fn connections(&self) -> u32 {
        self.conns.open()
    }

    /// Load for `least_request`.
    pub fn in_flight_cost(&self) -> f64 {
        f64::from(self.in_flight() + 1)
    }

    /// The RTT estimate, decayed to `now`, in nanoseconds; 0 when the
    /// endpoint has not been measured yet.
    pub fn rtt_estimate(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        let elapsed = nanos_since_epoch(now).saturating_sub(stamp) as f64;
        rtt * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// Forgets the estimate: the endpoint counts as not measured yet (one
    /// back from ejection: what it measured while failing says nothing now).
    pub fn forget_rtt(&self) {
        self.rtt_ns.store(UNMEASURED.to_bits(), Ordering::Relaxed);
    }

    /// Feeds one measured RTT: a peak is taken at once, a lower value
    /// blends in with weight growing with the time since the last update
    /// (at least `MIN_BLEND`).
    /// Racing updates may lose one sample; the estimate stays sound.
    pub fn observe_rtt(&self, now: Instant, rtt: Duration) {
        let sample = rtt.as_nanos() as f64;
        let now_ns = nanos_since_epoch(now);
        let old = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.swap(now_ns, Ordering::Relaxed);
        let next = if sample > old {
            sample
        } else {
            let elapsed = now_ns.saturating_sub(stamp) as f64;
            let decay = (-elapsed / DECAY.as_nanos() as f64)
                .exp()
                .min(1.0 - MIN_BLEND);
            old * decay + sample * (1.0 - decay)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
    }
}

impl Ejectable for EndpointState {
    fn health(&self) -> &Health {
        &self.health
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn returned(&self) {
        self.forget_rtt();
    }
}
