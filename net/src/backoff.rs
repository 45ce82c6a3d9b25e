//! Back-off: how long to pause after the n-th failure in a row, growing to
//! a cap, with optional jitter. Every retry loop takes its pauses from here.

use std::time::Duration;

/// How the pause grows with the number of failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growth {
    /// `base × n`.
    Linear,
    /// `base × n²` (Consul's own watch loop: `5 s × failures²`).
    Squared,
    /// `base × 2ⁿ⁻¹`.
    Doubling,
}

/// A back-off schedule: `base` for the first failure, growing (linearly,
/// squared or doubling) to at most `max`, then shortened by up to
/// `jitter` of itself at random, so that clients that failed together do
/// not all come back at the same moment.
///
/// It holds no state: the caller counts its failures in a row and asks for
/// the pause after each ([`Backoff::pause`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
    growth: Growth,
}

impl Backoff {
    /// `base`, `2 × base`, `4 × base`, ... up to `max`; no jitter.
    pub const fn doubling(base: Duration, max: Duration) -> Backoff {
        Backoff::new(base, max, Growth::Doubling)
    }

    /// `base`, `4 × base`, `9 × base`, ... up to `max`; no jitter.
    pub const fn squared(base: Duration, max: Duration) -> Backoff {
        Backoff::new(base, max, Growth::Squared)
    }

    /// `base`, `2 × base`, `3 × base`, ... up to `max`; no jitter.
    pub const fn linear(base: Duration, max: Duration) -> Backoff {
        Backoff::new(base, max, Growth::Linear)
    }

    const fn new(base: Duration, max: Duration, growth: Growth) -> Backoff {
        Backoff {
            base,
            max,
            jitter: 0.0,
            growth,
        }
    }

    /// This schedule with each pause drawn uniformly from
    /// `[(1 - fraction) × step, step)`: 0.5 keeps at least half of each
    /// step, 1.0 is "full jitter" (anything up to the step). Clamped to
    /// 0..=1.
    pub const fn with_jitter(mut self, fraction: f64) -> Backoff {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The pause after `failures` failures in a row, before jitter: 0 for
    /// none, `base` for the first, never more than `max`.
    pub fn step(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = match self.growth {
            Growth::Linear => failures,
            Growth::Squared => failures.saturating_mul(failures),
            // Past 2³¹ every step is at the cap anyway.
            Growth::Doubling => 1u32 << (failures - 1).min(31),
        };
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The pause after `failures` failures in a row, jittered.
    pub fn pause(&self, failures: u32) -> Duration {
        let step = self.step(failures);
        if self.jitter == 0.0 {
            return step;
        }
        step.mul_f64((1.0 - self.jitter) + self.jitter * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_grow_from_base_to_the_cap() {
        let doubling = Backoff::doubling(5 * MS, 1000 * MS);
        let steps: Vec<_> = (0..10).map(|n| doubling.step(n).as_millis()).collect();
        assert_eq!(steps, [0, 5, 10, 20, 40, 80, 160, 320, 640, 1000]);
        let squared = Backoff::squared(1000 * MS, 60_000 * MS);
        let steps: Vec<_> = (1..10).map(|n| squared.step(n).as_secs()).collect();
        assert_eq!(steps, [1, 4, 9, 16, 25, 36, 49, 60, 60]);
        let linear = Backoff::linear(1000 * MS, 30_000 * MS);
        let steps: Vec<_> = [1, 2, 29, 30, 31]
            .map(|n| linear.step(n).as_secs())
            .to_vec();
        assert_eq!(steps, [1, 2, 29, 30, 30]);
    }

    #[test]
    fn huge_failure_counts_stay_at_the_cap() {
        for b in [
            Backoff::doubling(MS, 10 * MS),
            Backoff::squared(MS, 10 * MS),
            Backoff::linear(MS, 10 * MS),
        ] {
            assert_eq!(b.step(u32::MAX), 10 * MS);
            assert_eq!(b.pause(u32::MAX), 10 * MS, "no jitter: the step itself");
        }
        let big = Backoff::doubling(Duration::MAX, Duration::MAX);
        assert_eq!(big.step(40), Duration::MAX);
    }

    #[test]
    fn jitter_shortens_a_pause_by_at_most_its_fraction() {
        let half = Backoff::doubling(100 * MS, 10_000 * MS).with_jitter(0.5);
        let full = Backoff::doubling(100 * MS, 10_000 * MS).with_jitter(1.0);
        for _ in 0..1000 {
            let p = half.pause(3);
            assert!(p >= 200 * MS && p <= 400 * MS, "{p:?}");
            assert!(full.pause(3) <= 400 * MS);
        }
        // Not always the same value (1000 draws of a 200 ms range).
        let draws: std::collections::HashSet<_> = (0..1000).map(|_| half.pause(3)).collect();
        assert!(draws.len() > 1);
        assert_eq!(half.pause(0), Duration::ZERO);
        assert_eq!(
            Backoff::linear(MS, MS).with_jitter(7.0),
            Backoff::linear(MS, MS).with_jitter(1.0),
            "clamped"
        );
    }
}
