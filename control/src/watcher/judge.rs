//! Judge: compare a canary with the stable subset over the same window,
//! from golden metrics, and say pass, fail or inconclusive. A pure
//! function: no clock, no I/O.
//!
//! No data never counts as healthy; a stable subset that is failing
//! itself makes the comparison inconclusive rather than blaming the canary.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Golden metrics of one subset over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Requests finished.
    pub requests: u64,
    /// Of those, failures (5xx or no response).
    pub failures: u64,
    /// Cumulative histogram: (upper bound in seconds, count <= bound),
    /// ascending, as Prometheus exposes it (`+Inf` last).
    pub buckets: Vec<(f64, u64)>,
}

impl Window {
    /// Failures / requests (0 with no requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }

    /// The `q` quantile (0..1), interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without data.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut prev = (0.0, 0u64);
        for &(bound, count) in &self.buckets {
            if count as f64 >= rank {
                if bound.is_infinite() {
                    // Beyond the last finite bound: report that bound.
                    return Some(Duration::from_secs_f64(prev.0));
                }
                let in_bucket = (count - prev.1) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - prev.1 as f64) / in_bucket
                } else {
                    1.0
                };
                return Some(Duration::from_secs_f64(prev.0 + (bound - prev.0) * frac));
            }
            prev = (bound, count);
        }
        None
    }
}

/// What the canary must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Fewest canary requests a verdict needs.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Highest canary error rate (0.01 = 1 %).
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Highest canary p99, absolute.
    #[serde(default, with = "opt_secs", skip_serializing_if = "Option::is_none")]
    pub max_p99: Option<Duration>,
    /// Highest canary p99 as a multiple of the stable p99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
}

fn default_min_requests() -> u64 {
    50
}
fn default_max_error_rate() -> f64 {
    0.01
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            max_p99: None,
            max_p99_ratio: None,
        }
    }
}

/// Stable p99s below this are compared as this: a ratio over a tiny
/// denominator (a cache hit, 200 us) would fail healthy canaries.
const P99_FLOOR: Duration = Duration::from_millis(5);

/// A judgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// The canary meets every threshold.
    Pass,
    /// The canary breaks a threshold (why).
    Fail(String),
    /// Cannot tell yet (why): too little traffic, no data, stable failing.
    Inconclusive(String),
}

impl Verdict {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
    }
}

/// Judges `canary` against `stable` (same window).
pub fn judge(canary: &Window, stable: &Window, t: &Thresholds) -> Verdict {
    if canary.requests == 0 {
        return Verdict::Inconclusive("no data from the canary".into());
    }
    if canary.requests < t.min_requests {
        return Verdict::Inconclusive(format!(
            "too little canary traffic: {} requests, {} needed",
            canary.requests, t.min_requests
        ));
    }
    let stable_failing =
        stable.requests >= t.min_requests && stable.error_rate() > t.max_error_rate;
    let rate = canary.error_rate();
    if rate > t.max_error_rate {
        if stable_failing {
            return Verdict::Inconclusive(format!(
                "stable is failing too ({:.2}% errors): not the canary's fault alone",
                stable.error_rate() * 100.0
            ));
        }
        return Verdict::Fail(format!(
            "error rate {:.2}% > {:.2}% ({} of {} requests)",
            rate * 100.0,
            t.max_error_rate * 100.0,
            canary.failures,
            canary.requests
        ));
    }
    let Some(p99) = canary.quantile(0.99) else {
        return Verdict::Inconclusive("no latency data from the canary".into());
    };
    if let Some(max) = t.max_p99 {
        if p99 > max {
            return Verdict::Fail(format!("p99 {p99:?} > {max:?}"));
        }
    }
    // Relative checks need a baseline; at a 100 % step stable has no
    // traffic left, and only the absolute thresholds apply.
    if let (Some(ratio), true) = (t.max_p99_ratio, stable.requests >= t.min_requests) {
        let Some(stable_p99) = stable.quantile(0.99) else {
            return Verdict::Inconclusive("no latency data from stable".into());
        };
        let base = stable_p99.max(P99_FLOOR);
        if p99.as_secs_f64() > base.as_secs_f64() * ratio {
            return Verdict::Fail(format!("p99 {p99:?} > {ratio} x stable p99 {stable_p99:?}"));
        }
    }
    Verdict::Pass
}

mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        // A negative or huge number is a client error, not a panic.
        Option::<f64>::deserialize(d)?
            .map(|v| {
                Duration::try_from_secs_f64(v).map_err(|_| {
                    serde::de::Error::custom(format!("{v} seconds is not a valid duration"))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` requests, `failed` failures, all at `latency` seconds (bucketed
    /// like the proxy's histogram).
    fn window(n: u64, failed: u64, latency: f64) -> Window {
        let bounds = [
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            f64::INFINITY,
        ];
        Window {
            requests: n,
            failures: failed,
            buckets: bounds
                .iter()
                .map(|&b| (b, if latency <= b { n } else { 0 }))
                .collect(),
        }
    }

    fn t() -> Thresholds {
        Thresholds {
            min_requests: 50,
            max_error_rate: 0.01,
            max_p99: Some(Duration::from_millis(300)),
            max_p99_ratio: Some(1.5),
        }
    }

    #[test]
    fn healthy_canary_passes() {
        assert_eq!(
            judge(&window(500, 0, 0.02), &window(5000, 1, 0.02), &t()),
            Verdict::Pass
        );
    }

    #[test]
    fn erroring_canary_fails() {
        let v = judge(&window(500, 50, 0.02), &window(5000, 0, 0.02), &t());
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("error rate 10.00%")),
            "{v:?}"
        );
    }

    #[test]
    fn slow_canary_fails_absolute_and_relative() {
        let v = judge(&window(500, 0, 0.4), &window(5000, 0, 0.02), &t());
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("p99")),
            "{v:?}"
        );
        // 80 ms vs 20 ms stable: under 300 ms but 4x stable.
        let v = judge(&window(500, 0, 0.08), &window(5000, 0, 0.02), &t());
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("x stable")),
            "{v:?}"
        );
    }

    #[test]
    fn no_data_and_little_data_are_inconclusive() {
        assert!(matches!(
            judge(&Window::default(), &window(5000, 0, 0.02), &t()),
            Verdict::Inconclusive(_)
        ));
        assert!(matches!(
            judge(&window(10, 0, 0.02), &window(5000, 0, 0.02), &t()),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn without_stable_traffic_only_absolute_thresholds_apply() {
        assert_eq!(
            judge(&window(500, 0, 0.02), &Window::default(), &t()),
            Verdict::Pass
        );
        let v = judge(&window(500, 0, 0.4), &Window::default(), &t());
        assert!(matches!(v, Verdict::Fail(_)), "{v:?}");
    }

    #[test]
    fn failing_stable_makes_it_inconclusive() {
        let v = judge(&window(500, 50, 0.02), &window(5000, 500, 0.02), &t());
        assert!(
            matches!(v, Verdict::Inconclusive(ref r) if r.contains("stable")),
            "{v:?}"
        );
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let w = Window {
            requests: 100,
            failures: 0,
            buckets: vec![(0.1, 50), (0.2, 100), (f64::INFINITY, 100)],
        };
        assert_eq!(w.quantile(0.5), Some(Duration::from_secs_f64(0.1)));
        let p75 = w.quantile(0.75).unwrap().as_secs_f64();
        assert!((p75 - 0.15).abs() < 1e-9);
    }
}
