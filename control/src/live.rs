//! Live: the golden metrics of a service's subsets over a short window,
//! for `almond status` (`GET /v1/services/{svc}/live`), from the watcher's
//! source: with `direct`, every proxy's admin `/metrics` scraped twice,
//! `window` apart, counters and histogram buckets diffed; with
//! `prometheus`, `increase` over the last `window`. Both through the
//! watcher's [`collect`] functions.

use crate::watcher::collect;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One subset's traffic over the window (summed over proxies, outbound).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubsetLive {
    /// Requests finished in the window.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Successes / requests; `None` (JSON null) with no requests.
    pub success_rate: Option<f64>,
    /// 99th percentile latency in ms (interpolated within the histogram's
    /// bucket, as Prometheus does); `None` with no requests.
    pub p99_ms: Option<f64>,
}

/// Measures `service` over the last `window` from Prometheus (the
/// watcher's `prometheus` source): one `increase` query each for requests,
/// failures and latency buckets, answered at once. The window should span
/// at least two of Prometheus' scrapes, or subsets show no traffic.
pub async fn from_prometheus(
    base: &str,
    service: &str,
    window: Duration,
    max_body: usize,
) -> BTreeMap<String, SubsetLive> {
    let totals = collect::query_prometheus_over(base, service, Some(window), max_body).await;
    summarize(&collect::sum(&totals), window.as_secs_f64())
}

/// Measures `service` on the proxies at `admins` over `window`. Subsets
/// without traffic are absent; unreachable proxies are skipped.
pub async fn measure(
    admins: &[String],
    service: &str,
    window: Duration,
    max_body: usize,
) -> BTreeMap<String, SubsetLive> {
    let then = collect::scrape(admins, service, max_body).await;
    let started = tokio::time::Instant::now();
    tokio::time::sleep(window).await;
    let now = collect::scrape(admins, service, max_body).await;
    // The second scrape's own time is in the window too.
    let seconds = started.elapsed().as_secs_f64().max(window.as_secs_f64());
    summarize(&collect::delta(&now, &then), seconds)
}

/// Per-subset figures from a window's totals; mirrored copies
/// (`mirror:` subsets) are not the service's traffic and are left out.
pub fn summarize(window: &collect::Totals, seconds: f64) -> BTreeMap<String, SubsetLive> {
    window
        .iter()
        .filter(|(subset, _)| !subset.starts_with(collect::MIRROR_PREFIX))
        .map(|(subset, w)| {
            let has = w.requests > 0;
            let live = SubsetLive {
                requests: w.requests,
                rps: if seconds > 0.0 {
                    w.requests as f64 / seconds
                } else {
                    0.0
                },
                success_rate: has.then(|| 1.0 - w.error_rate()),
                p99_ms: w
                    .quantile(0.99)
                    .filter(|_| has)
                    .map(|d| d.as_secs_f64() * 1000.0),
            };
            (subset.clone(), live)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::judge::Window;

    #[test]
    fn no_traffic_is_no_rate() {
        let totals = collect::Totals::from([
            (
                "v1".to_owned(),
                Window {
                    requests: 200,
                    failures: 10,
                    buckets: vec![(0.01, 150), (0.1, 200), (f64::INFINITY, 200)],
                },
            ),
            ("v2".to_owned(), Window::default()),
            (
                format!("{}v2", collect::MIRROR_PREFIX),
                Window {
                    requests: 50,
                    failures: 50,
                    buckets: vec![],
                },
            ),
        ]);
        let live = summarize(&totals, 2.0);
        assert_eq!(
            live.keys().collect::<Vec<_>>(),
            ["v1", "v2"],
            "mirrored copies are not a subset"
        );
        assert_eq!(live["v1"].rps, 100.0);
        assert_eq!(live["v1"].success_rate, Some(0.95));
        assert!(live["v1"].p99_ms.is_some_and(|p| p > 10.0 && p <= 100.0));
        assert_eq!(live["v2"].success_rate, None);
        assert_eq!(live["v2"].p99_ms, None);
    }
}
