//! Judge: compare a canary with the stable subset over the same window,
//! from golden metrics, and say pass, fail or inconclusive. A pure
//! function: no clock, no I/O.
//!
//! No data never counts as healthy; a stable subset that is failing
//! itself makes the comparison inconclusive rather than blaming the canary.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, DiscreteCDF};
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
    #[serde(with = "bounds")]
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

    /// Adds `w` into this window (counts and buckets); `false`, and
    /// nothing added, when `w`'s bucket bounds differ from this window's
    /// (a proxy of another version): they cannot be zipped.
    pub fn add(&mut self, w: &Window) -> bool {
        if self.buckets.is_empty() {
            self.buckets = w.buckets.clone();
        } else if w.buckets.is_empty() && w.requests == 0 {
            // Nothing to add (a subset without traffic).
        } else if self.buckets.len() != w.buckets.len()
            || self.buckets.iter().zip(&w.buckets).any(|(a, b)| a.0 != b.0)
        {
            return false;
        } else {
            for (a, b) in self.buckets.iter_mut().zip(&w.buckets) {
                a.1 += b.1;
            }
        }
        self.requests += w.requests;
        self.failures += w.failures;
        true
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
                    return Duration::try_from_secs_f64(prev.0).ok();
                }
                let in_bucket = (count - prev.1) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - prev.1 as f64) / in_bucket
                } else {
                    1.0
                };
                // A bound no duration can hold (a proxy's exposition is
                // read, not trusted): no quantile, rather than a panic.
                return Duration::try_from_secs_f64(prev.0 + (bound - prev.0) * frac).ok();
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
    /// Highest canary error rate (0.01 = 1 %): the canary fails when its
    /// rate is above it with confidence (a one-sided binomial test at
    /// `significance`), not when one unlucky request tips it over.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Fewest canary failures an error verdict needs.
    #[serde(default = "default_min_failures")]
    pub min_failures: u64,
    /// The chance a test may wrongly blame a canary as good as stable
    /// (each of the error and latency tests; 0.005 = 0.5 %).
    #[serde(default = "default_significance")]
    pub significance: f64,
    /// How much slower than stable a canary must be to fail on latency:
    /// the probability that a canary request is slower than a stable one,
    /// above one half (0.1: slower in 60 % of pairs). Tested with the
    /// Mann-Whitney U test over the latency histograms, as Kayenta does.
    #[serde(default = "default_latency_effect")]
    pub latency_effect: f64,
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
fn default_min_failures() -> u64 {
    3
}
fn default_significance() -> f64 {
    0.005
}
fn default_latency_effect() -> f64 {
    0.1
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            min_failures: default_min_failures(),
            significance: default_significance(),
            latency_effect: default_latency_effect(),
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
    /// The canary breaks a threshold (why, with the figures).
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

/// P(X >= k) for X ~ Binomial(n, p).
fn binomial_at_least(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    match statrs::distribution::Binomial::new(p.clamp(0.0, 1.0), n) {
        Ok(b) => b.sf(k - 1),
        Err(_) => 1.0,
    }
}

/// Fisher's exact test, one-sided: the chance of `f1` or more failures in
/// the canary's `n1` requests if canary and stable (`f2` of `n2`) failed
/// alike.
///
/// The exact sum takes one term per possible count above `f1`: past
/// 100,000 of them (millions of requests in a window, or counts
/// a broken or hostile `/metrics` made up), the two-proportion z-test
/// stands in, which at such counts agrees with it. Failures above their
/// requests are taken as all of them.
pub fn fisher_worse(f1: u64, n1: u64, f2: u64, n2: u64) -> f64 {
    let (f1, f2) = (f1.min(n1), f2.min(n2));
    if f1 == 0 {
        return 1.0;
    }
    let (Some(n), Some(f)) = (n1.checked_add(n2), f1.checked_add(f2)) else {
        return z_worse(f1, n1, f2, n2);
    };
    if f.min(n1) - f1 > EXACT_TERMS {
        return z_worse(f1, n1, f2, n2);
    }
    match statrs::distribution::Hypergeometric::new(n, f, n1) {
        Ok(h) => h.sf(f1 - 1),
        Err(_) => 1.0,
    }
}

/// Terms the exact Fisher sum may take (well under a millisecond).
const EXACT_TERMS: u64 = 100_000;

/// The one-sided two-proportion z-test of the canary (`f1` of `n1`)
/// failing more than the stable subset (`f2` of `n2`), pooled.
fn z_worse(f1: u64, n1: u64, f2: u64, n2: u64) -> f64 {
    let (f1, n1, f2, n2) = (f1 as f64, n1 as f64, f2 as f64, n2 as f64);
    let pooled = (f1 + f2) / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se.is_nan() || se <= 0.0 {
        return if f1 / n1 > f2 / n2 { 0.0 } else { 1.0 };
    }
    let z = (f1 / n1 - f2 / n2) / se;
    1.0 - statrs::distribution::Normal::standard().cdf(z)
}

/// Mann-Whitney U over two latency histograms (same bucket bounds):
/// (the probability that a canary request is slower than a stable one,
/// ties counting half; the one-sided p-value of "the canary is slower",
/// normal approximation with the tie correction). `None` when the
/// buckets differ or a side is empty.
pub fn mann_whitney_slower(canary: &[(f64, u64)], stable: &[(f64, u64)]) -> Option<(f64, f64)> {
    if canary.len() != stable.len() || canary.iter().zip(stable).any(|(a, b)| a.0 != b.0) {
        return None;
    }
    // Per-bucket counts from the cumulative ones.
    let per = |h: &[(f64, u64)]| {
        let mut prev = 0;
        h.iter()
            .map(|&(_, c)| {
                let n = c.saturating_sub(prev) as f64;
                prev = c.max(prev);
                n
            })
            .collect::<Vec<f64>>()
    };
    let (a, b) = (per(canary), per(stable));
    let (n1, n2): (f64, f64) = (a.iter().sum(), b.iter().sum());
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    let (mut u, mut below, mut ties) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(&b) {
        u += x * (below + y / 2.0);
        below += y;
        let t = x + y;
        ties += t * t * t - t;
    }
    let n = n1 + n2;
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    let effect = u / (n1 * n2);
    if var <= 0.0 {
        return Some((effect, 1.0));
    }
    let z = (u - mean - 0.5) / var.sqrt();
    let normal = statrs::distribution::Normal::standard();
    Some((effect, 1.0 - normal.cdf(z)))
}

/// The figures of a window, for people: the error counts and Fisher's
/// p-value of the canary failing more, and both p99s, e.g.
/// `errors 0/120 vs 1/1080, p = 1.00; p99 5.7ms vs 4.9ms`.
pub fn figures(canary: &Window, stable: &Window) -> String {
    let p = fisher_worse(
        canary.failures,
        canary.requests,
        stable.failures,
        stable.requests,
    );
    let ms = |w: &Window| {
        w.quantile(0.99).map_or("-".to_owned(), |d| {
            format!("{:.1}ms", d.as_secs_f64() * 1e3)
        })
    };
    format!(
        "errors {}/{} vs {}/{}, p = {p:.2}; p99 {} vs {}",
        canary.failures,
        canary.requests,
        stable.failures,
        stable.requests,
        ms(canary),
        ms(stable)
    )
}

/// Judges `canary` against `stable` (same window). Errors fail the canary
/// when it has at least `min_failures` and either fails more than stable
/// (Fisher's exact test) or more than `max_error_rate` (binomial test),
/// each at `significance`; latency fails it when it is slower than stable
/// by `latency_effect` (Mann-Whitney U at `significance`), or over the
/// absolute `max_p99` / relative `max_p99_ratio`.
///
/// Fewer than `min_requests` canary requests are too few for a pass, but
/// not for a failure: failures that are conclusive by the same error tests
/// fail the canary at once (30 failures in 30 requests need no more
/// traffic to tell); otherwise the verdict is inconclusive.
pub fn judge(canary: &Window, stable: &Window, t: &Thresholds) -> Verdict {
    if canary.requests == 0 {
        return Verdict::Inconclusive("no data from the canary".into());
    }
    let errors = judge_errors(canary, stable, t);
    if canary.requests < t.min_requests {
        if let Some(failed @ Verdict::Fail(_)) = errors {
            return failed;
        }
        return Verdict::Inconclusive(format!(
            "too little canary traffic: {} requests, {} needed",
            canary.requests, t.min_requests
        ));
    }
    if let Some(verdict) = errors {
        return verdict;
    }
    let alpha = t.significance;
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
    if stable.requests >= t.min_requests {
        let stable_p99 = stable.quantile(0.99);
        if let Some((effect, p)) = mann_whitney_slower(&canary.buckets, &stable.buckets) {
            if p < alpha && effect - 0.5 >= t.latency_effect {
                return Verdict::Fail(format!(
                    "slower than stable: a canary request is slower in {:.0}% of pairs, p = {p:.2e} < {alpha} (p99 {p99:?} vs {:?})",
                    effect * 100.0,
                    stable_p99.unwrap_or_default()
                ));
            }
        }
        if let Some(ratio) = t.max_p99_ratio {
            let Some(stable_p99) = stable_p99 else {
                return Verdict::Inconclusive("no latency data from stable".into());
            };
            let base = stable_p99.max(P99_FLOOR);
            if p99.as_secs_f64() > base.as_secs_f64() * ratio {
                return Verdict::Fail(format!("p99 {p99:?} > {ratio} x stable p99 {stable_p99:?}"));
            }
        }
    }
    Verdict::Pass
}

/// The error tests of [`judge`]: a failure, an inconclusive verdict (stable
/// failing too), or `None` when the errors do not decide.
fn judge_errors(canary: &Window, stable: &Window, t: &Thresholds) -> Option<Verdict> {
    if canary.failures < t.min_failures {
        return None;
    }
    let alpha = t.significance;
    let figures = format!(
        "errors {}/{} ({:.2}%) vs stable {}/{} ({:.2}%)",
        canary.failures,
        canary.requests,
        canary.error_rate() * 100.0,
        stable.failures,
        stable.requests,
        stable.error_rate() * 100.0
    );
    let p_rel = if stable.requests > 0 {
        fisher_worse(
            canary.failures,
            canary.requests,
            stable.failures,
            stable.requests,
        )
    } else {
        1.0
    };
    if p_rel < alpha {
        return Some(Verdict::Fail(format!(
            "error rate {:.2}% above stable's: {figures}, p = {p_rel:.2e} < {alpha}",
            canary.error_rate() * 100.0
        )));
    }
    let p_abs = binomial_at_least(canary.failures, canary.requests, t.max_error_rate);
    if p_abs >= alpha {
        return None;
    }
    let stable_failing = stable.requests >= t.min_requests
        && binomial_at_least(stable.failures, stable.requests, t.max_error_rate) < alpha;
    if stable_failing {
        return Some(Verdict::Inconclusive(format!(
            "stable is failing too ({:.2}% errors): not the canary's fault alone; {figures}",
            stable.error_rate() * 100.0
        )));
    }
    Some(Verdict::Fail(format!(
        "error rate {:.2}% > {:.2}%: {figures}, p = {p_abs:.2e} < {alpha}",
        canary.error_rate() * 100.0,
        t.max_error_rate * 100.0,
    )))
}

/// Buckets in JSON (a rollout keeps the windows it carries in the policy
/// store): `[[0.005, 12], ["+Inf", 15]]`. JSON has no infinity, and
/// serde would write the `+Inf` bound as `null` and refuse to read it
/// back, leaving the whole policy unreadable.
mod bounds {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Bound {
        Number(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &[(f64, u64)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|&(bound, count)| {
            let bound = if bound.is_finite() {
                Bound::Number(bound)
            } else {
                Bound::Text(format!("{bound:+}").replace("inf", "Inf"))
            };
            (bound, count)
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(f64, u64)>, D::Error> {
        Vec::<(Bound, u64)>::deserialize(d)?
            .into_iter()
            .map(|(bound, count)| match bound {
                Bound::Number(b) => Ok((b, count)),
                // `+Inf`, `-Inf`, `NaN`: Rust reads them, in any case.
                Bound::Text(t) => t
                    .parse()
                    .map(|b| (b, count))
                    .map_err(|_| serde::de::Error::custom(format!("{t:?} is not a bucket bound"))),
            })
            .collect()
    }
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

    /// A bound no duration can hold gives no quantile, not a panic (the
    /// watcher's task would die with it, and every rollout freeze).
    #[test]
    fn a_bound_no_duration_holds_gives_no_quantile() {
        let w = Window {
            requests: 10,
            failures: 0,
            buckets: vec![(1e300, 10), (f64::INFINITY, 10)],
        };
        assert_eq!(w.quantile(0.99), None);
    }

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
            ..Thresholds::default()
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
            matches!(v, Verdict::Fail(ref r) if r.contains("error rate 10.00%") && r.contains("50/500")),
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
            matches!(v, Verdict::Fail(ref r) if r.contains("slower than stable")),
            "{v:?}"
        );
        // The ratio alone: Mann-Whitney needs an effect it cannot see when
        // only a few canary requests are slow.
        let mut t = t();
        t.latency_effect = 1.0;
        let v = judge(&window(500, 0, 0.08), &window(5000, 0, 0.02), &t);
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

    /// Too few requests for a pass are not too few for a failure: a canary
    /// failing all its requests fails at once, not "inconclusive" until
    /// `min_requests` have failed.
    #[test]
    fn conclusive_failures_fail_below_min_requests() {
        let v = judge(&window(30, 30, 0.02), &window(3000, 0, 0.02), &t());
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("30/30")),
            "{v:?}"
        );
        // Against no stable traffic, the ceiling alone decides.
        let v = judge(&window(10, 5, 0.02), &Window::default(), &t());
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("> 1.00%")),
            "{v:?}"
        );
        // Failures that may be bad luck still wait for more traffic: one
        // in 30 is below `min_failures`, and 2 in 40 is no proof of a rate
        // above 5 %.
        let v = judge(&window(30, 1, 0.02), &window(3000, 0, 0.02), &t());
        assert!(
            matches!(v, Verdict::Inconclusive(ref r) if r.contains("too little canary traffic")),
            "{v:?}"
        );
        let lenient = Thresholds {
            max_error_rate: 0.05,
            ..t()
        };
        let v = judge(&window(40, 3, 0.02), &window(3000, 90, 0.02), &lenient);
        assert!(matches!(v, Verdict::Inconclusive(_)), "{v:?}");
    }

    /// A window's buckets survive the policy store: JSON has no infinity.
    #[test]
    fn windows_read_back_from_json() {
        let w = window(10, 1, 0.02);
        let text = serde_json::to_string(&w).unwrap();
        assert!(text.contains(r#"["+Inf",10]"#), "{text}");
        assert_eq!(serde_json::from_str::<Window>(&text).unwrap(), w);
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

    /// The proxy's latency bucket bounds (`+Inf` last).
    const BOUNDS: &[f64] = &[
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
        2.5,
        5.0,
        10.0,
        f64::INFINITY,
    ];

    /// One subset's window: `n` requests, each failing with `error_rate`,
    /// latencies log-normal around `median` seconds (sigma 0.5: p99 about
    /// 3.2 x the median), bucketed like the proxy's histogram.
    fn simulate(rng: &mut fastrand::Rng, n: u64, error_rate: f64, median: f64) -> Window {
        let mut per = vec![0u64; BOUNDS.len()];
        let mut failures = 0;
        for _ in 0..n {
            if rng.f64() < error_rate {
                failures += 1;
            }
            // Box-Muller: one standard normal draw.
            let (u1, u2) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let latency = median * (0.5 * z).exp();
            let at = BOUNDS
                .iter()
                .position(|&b| latency <= b)
                .unwrap_or(BOUNDS.len() - 1);
            per[at] += 1;
        }
        let mut cumulative = 0;
        let buckets = BOUNDS
            .iter()
            .zip(per)
            .map(|(&b, c)| {
                cumulative += c;
                (b, cumulative)
            })
            .collect();
        Window {
            requests: n,
            failures,
            buckets,
        }
    }

    /// Share of `steps` simulated steps with each verdict, for a canary at
    /// 10 % of 200 rps over 10 s (200 requests; stable 1,800).
    fn rates(seed: u64, steps: usize, canary: (f64, f64), stable: (f64, f64)) -> (f64, f64, f64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut pass, mut fail, mut unsure) = (0, 0, 0);
        let t = Thresholds::default();
        for _ in 0..steps {
            let c = simulate(&mut rng, 200, canary.0, canary.1);
            let s = simulate(&mut rng, 1800, stable.0, stable.1);
            match judge(&c, &s, &t) {
                Verdict::Pass => pass += 1,
                Verdict::Fail(_) => fail += 1,
                Verdict::Inconclusive(_) => unsure += 1,
            }
        }
        let n = steps as f64;
        (pass as f64 / n, fail as f64 / n, unsure as f64 / n)
    }

    /// The defaults, by simulation (10,000 steps each, seeded): the table
    /// in docs/operations.md comes from `--nocapture` of this test.
    #[test]
    fn defaults_by_simulation() {
        let steps = 10_000;
        let healthy = rates(1, steps, (0.005, 0.005), (0.005, 0.005));
        let erroring = rates(2, steps, (0.05, 0.005), (0.0, 0.005));
        let slow = rates(3, steps, (0.005, 0.010), (0.005, 0.005));
        let slightly = rates(4, steps / 5, (0.005, 0.0055), (0.005, 0.005));
        let at_ceiling = rates(5, steps / 5, (0.02, 0.005), (0.005, 0.005));
        for (name, (pass, fail, unsure)) in [
            ("identical, 0.5 % errors", healthy),
            ("5 % errors vs 0 %", erroring),
            ("2x latency", slow),
            ("1.1x latency", slightly),
            ("2 % errors vs 0.5 %", at_ceiling),
        ] {
            eprintln!(
                "{name:>24}: pass {:5.2}%  fail {:5.2}%  inconclusive {:5.2}%",
                pass * 100.0,
                fail * 100.0,
                unsure * 100.0
            );
        }
        assert!(healthy.0 >= 0.99, "healthy canaries pass: {healthy:?}");
        assert!(erroring.1 >= 0.99, "erroring canaries fail: {erroring:?}");
        assert!(slow.1 >= 0.99, "2x slower canaries fail: {slow:?}");
    }

    #[test]
    fn figures_read_like_the_demo_narration() {
        let f = figures(&window(120, 0, 0.004), &window(1080, 1, 0.004));
        assert_eq!(f, "errors 0/120 vs 1/1080, p = 1.00; p99 5.0ms vs 5.0ms");
    }

    /// Counts no window of real traffic reaches (made up by a broken or
    /// hostile `/metrics`) are judged at once, not by a sum of 10^17
    /// terms that froze the watcher; at counts the exact test can still
    /// take, the z-test stand-in agrees with it.
    #[test]
    fn huge_counts_are_judged_at_once() {
        // The exact sum here would take 10^17 terms: the test would hang.
        let p = fisher_worse(
            1,
            1_000_000_000_000_000_000,
            500_000_000_000_000_000,
            u64::MAX,
        );
        assert!((0.0..=1.0).contains(&p), "{p}");
        assert_eq!(fisher_worse(u64::MAX, u64::MAX, 0, u64::MAX), 0.0);
        assert_eq!(fisher_worse(10, 5, 0, 10), fisher_worse(5, 5, 0, 10));
        // 2 % against 1 % of 50,000 each: both say the canary is worse.
        let exact = fisher_worse(1_000, 50_000, 500, 50_000);
        let z = z_worse(1_000, 50_000, 500, 50_000);
        assert!(exact < 1e-6 && z < 1e-6, "{exact} {z}");
        // Alike: both far from it.
        let exact = fisher_worse(500, 50_000, 500, 50_000);
        let z = z_worse(500, 50_000, 500, 50_000);
        assert!((exact - z).abs() < 0.05, "{exact} {z}");
    }

    #[test]
    fn the_tests_agree_with_known_values() {
        // Fisher, one-sided: 3/10 vs 0/10 -> p = C(10,3)/C(20,3) = 120/1140.
        assert!((fisher_worse(3, 10, 0, 10) - 120.0 / 1140.0).abs() < 1e-9);
        assert_eq!(fisher_worse(0, 10, 5, 10), 1.0);
        // Binomial: P(X >= 1 | n = 10, p = 0.1) = 1 - 0.9^10.
        assert!((binomial_at_least(1, 10, 0.1) - (1.0 - 0.9f64.powi(10))).abs() < 1e-9);
        // Mann-Whitney: every canary request slower -> effect 1.
        let fast = [(0.01, 100), (0.1, 100), (f64::INFINITY, 100)];
        let slow = [(0.01, 0), (0.1, 100), (f64::INFINITY, 100)];
        let (effect, p) = mann_whitney_slower(&slow, &fast).unwrap();
        assert_eq!(effect, 1.0);
        assert!(p < 1e-6, "{p}");
        let (effect, p) = mann_whitney_slower(&fast, &fast).unwrap();
        assert_eq!(effect, 0.5);
        assert!(p > 0.4, "{p}");
        // Other bucket bounds: refused.
        assert!(mann_whitney_slower(&fast, &[(0.02, 1), (f64::INFINITY, 1)]).is_none());
    }
}
