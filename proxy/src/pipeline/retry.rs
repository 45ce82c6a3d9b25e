//! Retry: when a failed try may be sent again, and how many retries the
//! service can afford.
//!
//! Safe means the request was never sent (a connect failure: any method), or
//! an idempotent method got a retryable outcome and its body was kept. A
//! budget (Linkerd's and Finagle's shape: a percent of requests plus a
//! floor per second, over a 10 s window) keeps a failing service from
//! seeing a retry storm.

use crate::headers::idempotent;
use crate::outcome::ErrorKind;
use almond_config::{Condition, GrpcCode, Retries};
use almond_net::Backoff;
use http::Method;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Seconds the budget remembers.
const WINDOW_SECS: u64 = 10;
/// Pauses before retries: 20 ms doubling to 250 ms, full jitter.
const BACKOFF: Backoff =
    Backoff::doubling(Duration::from_millis(20), Duration::from_millis(250)).with_jitter(1.0);

/// A service's retry policy and budget.
pub struct RetryPolicy {
    /// Most retries per request.
    pub attempts: u32,
    on: Vec<Condition>,
    /// Time allowed to each try.
    pub per_try_timeout: Option<Duration>,
    /// Bodies up to this size are kept for replay.
    pub max_body_bytes: usize,
    budget: Budget,
}

impl RetryPolicy {
    /// The policy of a service's `retries`.
    pub fn new(cfg: &Retries) -> RetryPolicy {
        RetryPolicy {
            attempts: cfg.attempts,
            on: cfg.on.clone(),
            per_try_timeout: cfg.per_try_timeout,
            max_body_bytes: cfg.max_body_bytes,
            budget: Budget::new(cfg.budget_percent, cfg.min_per_second),
        }
    }

    /// Keeps `previous`'s budget account (its deposits and withdrawals of
    /// the last 10 s) under this policy's numbers: a new route table, made
    /// for any change to any service, must not grant a fresh budget in the
    /// middle of an incident.
    pub fn carry_budget(&mut self, previous: &RetryPolicy) {
        self.budget.buckets = previous.budget.buckets.clone();
    }

    /// Are retries on at all?
    pub fn enabled(&self) -> bool {
        self.attempts > 0
    }

    /// Counts a request toward the budget (once per request).
    #[inline]
    pub fn deposit(&self, now: Instant) {
        if self.enabled() {
            self.budget.deposit(now);
        }
    }

    /// May this failed try be retried? `replayable`: the request can be
    /// sent again (its body was kept, or nothing was sent); `room`: there
    /// is time for it (asked only of a try the policy would retry). Takes
    /// from the budget when the answer is yes.
    pub fn allows(
        &self,
        retries_done: u32,
        method: &Method,
        result: Result<u16, ErrorKind>,
        (replayable, room): (bool, impl FnOnce() -> bool),
        now: Instant,
    ) -> bool {
        if retries_done >= self.attempts || !replayable {
            return false;
        }
        let wanted = match result {
            Ok(status) => idempotent(method) && self.on.iter().any(|c| c.matches_status(status)),
            Err(ErrorKind::Connect) | Err(ErrorKind::ConnectTimeout) => {
                self.on.contains(&Condition::Connect)
            }
            Err(ErrorKind::Reset) => idempotent(method) && self.on.contains(&Condition::Reset),
            Err(ErrorKind::Timeout) => idempotent(method) && self.on.contains(&Condition::Timeout),
            Err(_) => false,
        };
        wanted && room() && self.budget.withdraw(now)
    }

    /// Does `on` name a gRPC code (so gRPC request bodies are kept as they
    /// stream, for a retry)?
    pub fn on_grpc(&self) -> bool {
        self.on.iter().any(|c| matches!(c, Condition::Grpc(_)))
    }

    /// May a gRPC call answered with `code` in a trailers-only response be
    /// retried? As in Envoy's and gRPC's own retry policies the method is
    /// not asked (every gRPC call is a POST): naming a code in `on` says
    /// that calls failing with it may go again. `replayable`: the request
    /// body was kept whole. Takes from the budget when the answer is yes.
    pub fn allows_grpc(
        &self,
        retries_done: u32,
        code: GrpcCode,
        (replayable, room): (bool, impl FnOnce() -> bool),
        now: Instant,
    ) -> bool {
        retries_done < self.attempts
            && replayable
            && self.on.contains(&Condition::Grpc(code))
            && room()
            && self.budget.withdraw(now)
    }

    /// The pause before retry number `n` (1-based): full jitter over an
    /// exponential step.
    pub fn backoff(n: u32) -> Duration {
        BACKOFF.pause(n)
    }
}

/// Retries allowed over the last 10 s: `percent` of requests, plus
/// `min_per_second` x 10. One bucket per second, reused as time moves on.
struct Budget {
    percent: u64,
    reserve: u64,
    /// Shared with the next route table's policy for the service (see
    /// [`RetryPolicy::carry_budget`]).
    buckets: Arc<[Bucket; WINDOW_SECS as usize]>,
}

#[derive(Default)]
struct Bucket {
    /// The second (since the process epoch) this bucket counts; +1 so 0
    /// means never used.
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

impl Budget {
    fn new(percent: u32, min_per_second: u32) -> Budget {
        Budget {
            percent: u64::from(percent),
            reserve: u64::from(min_per_second) * WINDOW_SECS,
            buckets: Default::default(),
        }
    }

    fn second(now: Instant) -> u64 {
        crate::clock::nanos_since_epoch(now) / 1_000_000_000 + 1
    }

    /// The bucket of `now`'s second, emptied first if it held an old one.
    /// Two threads racing on a bucket's turn may lose a count; the budget
    /// is an estimate and stays one.
    fn bucket(&self, now: Instant) -> &Bucket {
        let second = Self::second(now);
        let b = &self.buckets[(second % WINDOW_SECS) as usize];
        let seen = b.second.load(Ordering::Relaxed);
        if seen != second
            && b.second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            b.deposits.store(0, Ordering::Relaxed);
            b.withdrawals.store(0, Ordering::Relaxed);
        }
        b
    }

    fn deposit(&self, now: Instant) {
        self.bucket(now).deposits.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self, now: Instant) -> bool {
        let second = Self::second(now);
        let (mut deposits, mut withdrawals) = (0, 0);
        for b in self.buckets.iter() {
            let s = b.second.load(Ordering::Relaxed);
            if s != 0 && second - s.min(second) < WINDOW_SECS {
                deposits += b.deposits.load(Ordering::Relaxed);
                withdrawals += b.withdrawals.load(Ordering::Relaxed);
            }
        }
        if withdrawals * 100 >= deposits * self.percent + self.reserve * 100 {
            return false;
        }
        self.bucket(now).withdrawals.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(percent: u32, floor: u32) -> RetryPolicy {
        RetryPolicy::new(&Retries {
            attempts: 3,
            budget_percent: percent,
            min_per_second: floor,
            ..Retries::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_percent_plus_floor() {
        let p = policy(20, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            p.deposit(now);
        }
        // 20 % of 1000 + 1/s x 10 s = 210 retries.
        let allowed = (0..1000)
            .filter(|_| {
                p.allows(
                    0,
                    &Method::GET,
                    Err(ErrorKind::Connect),
                    (true, || true),
                    now,
                )
            })
            .count();
        assert_eq!(allowed, 210);
        // The window moves on: after 10 s the budget is fresh (floor only).
        let later = now + Duration::from_secs(11);
        let allowed = (0..100)
            .filter(|_| {
                p.allows(
                    0,
                    &Method::GET,
                    Err(ErrorKind::Connect),
                    (true, || true),
                    later,
                )
            })
            .count();
        assert_eq!(allowed, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn only_safe_retries() {
        let p = policy(100, 100);
        let now = Instant::now();
        // A POST may be retried only when nothing was sent.
        assert!(p.allows(
            0,
            &Method::POST,
            Err(ErrorKind::Connect),
            (true, || true),
            now
        ));
        assert!(!p.allows(
            0,
            &Method::POST,
            Err(ErrorKind::Reset),
            (true, || true),
            now
        ));
        assert!(!p.allows(0, &Method::POST, Ok(503), (true, || true), now));
        assert!(p.allows(0, &Method::GET, Ok(503), (true, || true), now));
        assert!(!p.allows(0, &Method::GET, Ok(500), (true, || true), now));
        assert!(!p.allows(0, &Method::GET, Ok(503), (false, || true), now));
        // No time left for a try: no retry (and nothing taken from the budget).
        assert!(!p.allows(0, &Method::GET, Ok(503), (true, || false), now));
        assert!(!p.allows(3, &Method::GET, Ok(503), (true, || true), now));
        // gRPC codes: only those named, only with the body kept.
        assert!(!p.on_grpc());
        let p = RetryPolicy::new(&Retries {
            on: vec![Condition::Grpc(GrpcCode::Unavailable)],
            ..Retries::default()
        });
        assert!(p.on_grpc());
        assert!(p.allows_grpc(0, GrpcCode::Unavailable, (true, || true), now));
        assert!(!p.allows_grpc(0, GrpcCode::Unavailable, (false, || true), now));
        assert!(!p.allows_grpc(0, GrpcCode::Internal, (true, || true), now));
        assert!(!p.allows_grpc(2, GrpcCode::Unavailable, (true, || true), now));
    }
}
