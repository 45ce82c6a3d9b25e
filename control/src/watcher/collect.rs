//! Collect: golden metrics per subset, scraped from every proxy's admin
//! `/metrics` (the `direct` source), summed across proxies.

use super::judge::Window;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::time::Duration;

/// Counters of one subset, summed over proxies, as read at one moment.
pub type Totals = BTreeMap<String, Window>;

/// Scrapes `admins` (proxy admin addresses) and sums the outbound golden
/// metrics of `service` by subset. Unreachable proxies, and proxies whose
/// answer is not 200 or is over `max_body` bytes, are skipped.
pub async fn scrape(admins: &[String], service: &str, max_body: usize) -> BTreeMap<String, Totals> {
    fetch(admins, max_body)
        .await
        .into_iter()
        .map(|(admin, body)| {
            let totals = parse(&body, service);
            (admin, totals)
        })
        .collect()
}

/// Every proxy's `/metrics` text, by admin address (one scrape serves
/// every service: the dashboard's history parses it once per service).
/// Unreachable proxies, and answers that are not 200 or are over
/// `max_body` bytes, are left out.
pub async fn fetch(admins: &[String], max_body: usize) -> BTreeMap<String, String> {
    fetch_with(admins, max_body, str::to_owned).await
}

/// As [`fetch`], each body read by `read` as soon as it is in, and let go:
/// with many proxies, holding every body until all are in (megabytes
/// each for a large catalog) was the most memory the control plane used.
pub async fn fetch_with<T: Send + 'static>(
    admins: &[String],
    max_body: usize,
    read: fn(&str) -> T,
) -> BTreeMap<String, T> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // Many proxies at once (a slow or gone one costs its timeout once, not
    // once per proxy behind it), but a bounded number of sockets.
    futures_util::stream::iter(admins.to_vec())
        .map(|admin| {
            let client = client.clone();
            async move {
                let req = hyper::Request::get(format!("http://{admin}/metrics"))
                    .body(Empty::new())
                    .ok()?;
                let fetched = tokio::time::timeout(SCRAPE_TIMEOUT, async {
                    let resp = client.request(req).await.ok()?;
                    if !resp.status().is_success() {
                        return None;
                    }
                    let body = Limited::new(resp.into_body(), max_body);
                    body.collect().await.ok().map(|b| b.to_bytes())
                })
                .await;
                match fetched {
                    Ok(Some(body)) => Some((admin, read(&String::from_utf8_lossy(&body)))),
                    _ => {
                        tracing::debug!(proxy = %admin, "metrics scrape failed");
                        None
                    }
                }
            }
        })
        .buffer_unordered(SCRAPES_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Longest one proxy's scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes in flight at once.
const SCRAPES_AT_ONCE: usize = 64;

/// Sums per-proxy totals into per-subset totals.
pub fn sum(per_proxy: &BTreeMap<String, Totals>) -> Totals {
    let mut out: Totals = BTreeMap::new();
    for totals in per_proxy.values() {
        for (subset, w) in totals {
            add(out.entry(subset.clone()).or_default(), w);
        }
    }
    out
}

/// Adds `w` into `into`; a window whose bucket bounds differ from those
/// already summed (proxies of other versions) is refused, not zipped.
fn add(into: &mut Window, w: &Window) {
    if !into.add(w) {
        tracing::warn!("a proxy's latency buckets differ from the others': left out of the sum");
    }
}

/// The key prefix of the Prometheus source's totals, one per scrape
/// target (`prometheus:JOB/INSTANCE`): each proxy's series, summed.
pub const SUMMED: &str = "prometheus";

/// The window between two collections, summed over proxies. A proxy
/// absent from `then` (it came up, or its scrape failed, at the step's
/// start) is no data for this window, not its lifetime counters. A series
/// that went down (requests, failures or any bucket: the proxy restarted)
/// counts from zero, as Prometheus' `increase` does; but a sum over
/// proxies ([`SUMMED`]) that went down lost one proxy's series, and the
/// rest of it is every other proxy's lifetime, so that subset is no data
/// for this window. A subset whose buckets have other bounds than before
/// is left out, with a warning.
pub fn delta(now: &BTreeMap<String, Totals>, then: &BTreeMap<String, Totals>) -> Totals {
    delta_known(now, then, None)
}

/// As [`delta`], where a proxy in `scraped` (read at the window's start)
/// but absent from `then` had no series yet: zero then, not no data.
pub fn delta_known(
    now: &BTreeMap<String, Totals>,
    then: &BTreeMap<String, Totals>,
    scraped: Option<&std::collections::BTreeSet<String>>,
) -> Totals {
    let zero = Totals::new();
    let mut per_proxy = BTreeMap::new();
    for (proxy, totals) in now {
        let before = match then.get(proxy) {
            Some(before) => before,
            None if scraped.is_some_and(|s| s.contains(proxy)) => &zero,
            None => {
                tracing::debug!(%proxy, "not in the window's first scrape: no data this window");
                continue;
            }
        };
        let mut d = Totals::new();
        for (subset, w) in totals {
            let Some(b) = before.get(subset) else {
                // No requests yet when the window began: all of it is new.
                d.insert(subset.clone(), w.clone());
                continue;
            };
            let same_bounds = w.buckets.len() == b.buckets.len()
                && w.buckets.iter().zip(&b.buckets).all(|(x, y)| x.0 == y.0);
            if !same_bounds {
                tracing::warn!(%proxy, %subset, "latency buckets changed within a window: left out");
                continue;
            }
            let reset = b.requests > w.requests
                || b.failures > w.failures
                || w.buckets.iter().zip(&b.buckets).any(|(x, y)| y.1 > x.1);
            if reset && proxy.starts_with(SUMMED) {
                tracing::debug!(%subset, "a proxy's series left the sum: no data this window");
                continue;
            }
            let w = if reset {
                w.clone()
            } else {
                Window {
                    requests: w.requests - b.requests,
                    failures: w.failures - b.failures,
                    buckets: w
                        .buckets
                        .iter()
                        .zip(&b.buckets)
                        .map(|(x, y)| (x.0, x.1 - y.1))
                        .collect(),
                }
            };
            d.insert(subset.clone(), w);
        }
        per_proxy.insert(proxy.clone(), d);
    }
    sum(&per_proxy)
}

/// Key prefix of a subset's mirrored traffic (`direction="mirror"`) in
/// [`Totals`]: `mirror:v2` beside `v2`'s outbound traffic.
pub const MIRROR_PREFIX: &str = "mirror:";

/// Reads `almond_requests_total` and `almond_request_duration_seconds_bucket`
/// of `service` (outbound, and mirrored copies under `mirror:SUBSET`) from
/// a Prometheus text exposition.
pub fn parse(text: &str, service: &str) -> Totals {
    parse_services(text, Some(service))
        .remove(service)
        .unwrap_or_default()
}

/// As [`parse`], for every service in one pass (or only `only`), by
/// service name.
pub fn parse_services(text: &str, only: Option<&str>) -> BTreeMap<String, Totals> {
    let mut all: BTreeMap<String, Totals> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let labels = parse_labels(labels);
        let Some(service) = labels.get("service") else {
            continue;
        };
        let mirrored = match labels.get("direction").map(String::as_str) {
            Some("outbound") => false,
            Some("mirror") => true,
            _ => continue,
        };
        if only.is_some_and(|o| o != service) {
            continue;
        }
        let Some(subset) = labels.get("subset") else {
            continue;
        };
        let subset = &if mirrored {
            format!("{MIRROR_PREFIX}{subset}")
        } else {
            subset.clone()
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let w = all
            .entry(service.clone())
            .or_default()
            .entry(subset.clone())
            .or_default();
        match name {
            "almond_requests_total" => {
                w.requests += value as u64;
                if labels.get("outcome").map(String::as_str) == Some("failure") {
                    w.failures += value as u64;
                }
            }
            "almond_request_duration_seconds_bucket" => {
                let Some(le) = bucket_bound(labels.get("le")) else {
                    continue;
                };
                w.buckets.push((le, value as u64));
            }
            _ => {}
        }
    }
    for w in all.values_mut().flat_map(|t| t.values_mut()) {
        w.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    all
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.insert(
            key.trim_start_matches(',').trim().to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    out
}

/// The same totals from a Prometheus server (the `prometheus` source):
/// instant queries summing every proxy's series by subset. Returned under
/// one key so [`delta`] treats it like one big proxy.
pub async fn query_prometheus(
    base: &str,
    service: &str,
    max_body: usize,
) -> BTreeMap<String, Totals> {
    query_prometheus_over(base, service, None, max_body).await
}

/// As [`query_prometheus`]; with `range`, each series is its `increase`
/// over the last `range` (what `almond status` shows), not its total.
pub async fn query_prometheus_over(
    base: &str,
    service: &str,
    range: Option<Duration>,
    max_body: usize,
) -> BTreeMap<String, Totals> {
    let sel = format!("service=\"{service}\",direction=\"outbound\"");
    let over = |series: String| match range {
        Some(r) => format!("increase({series}[{}ms])", r.as_millis()),
        None => series,
    };
    // By scrape target too: each proxy is then one "proxy" to `delta`, as
    // the direct source's are, so a proxy whose series were missing from
    // the window's first answer (a failed scrape, a new proxy) is no data
    // rather than its lifetime counts added to the window.
    let requests = format!(
        "sum by (subset, instance, job) ({})",
        over(format!("almond_requests_total{{{sel}}}"))
    );
    let failures = format!(
        "sum by (subset, instance, job) ({})",
        over(format!(
            "almond_requests_total{{{sel},outcome=\"failure\"}}"
        ))
    );
    let buckets = format!(
        "sum by (subset, le, instance, job) ({})",
        over(format!("almond_request_duration_seconds_bucket{{{sel}}}"))
    );
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut per_target: BTreeMap<String, Totals> = BTreeMap::new();
    // The three at once: a slow server costs its timeout once, not thrice
    // (the watcher bounds a window's collection).
    let answers = tokio::join!(
        prometheus_vector(&client, base, &requests, max_body),
        prometheus_vector(&client, base, &failures, max_body),
        prometheus_vector(&client, base, &buckets, max_body),
    );
    let queries = [&requests, &failures, &buckets];
    for (i, answer) in [answers.0, answers.1, answers.2].into_iter().enumerate() {
        let Some(result) = answer else {
            tracing::debug!(prometheus = base, query = %queries[i], "prometheus query failed");
            return BTreeMap::new();
        };
        for (labels, value) in result {
            let Some(subset) = labels.get("subset") else {
                continue;
            };
            let label = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
            let target = format!("{SUMMED}:{}/{}", label("job"), label("instance"));
            let totals = per_target.entry(target).or_default();
            let w = totals.entry(subset.clone()).or_default();
            // `increase` extrapolates: round to whole requests.
            let value = value.round();
            match i {
                0 => w.requests = value as u64,
                1 => w.failures = value as u64,
                _ => {
                    let Some(le) = bucket_bound(labels.get("le")) else {
                        continue;
                    };
                    w.buckets.push((le, value as u64));
                }
            }
        }
    }
    for w in per_target.values_mut().flat_map(|t| t.values_mut()) {
        w.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    per_target
}

/// One instant query: (labels, value) per series, or `None` on any error.
async fn prometheus_vector(
    client: &Client<HttpConnector, Empty<Bytes>>,
    base: &str,
    query: &str,
    max_body: usize,
) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
    let uri = format!(
        "{base}/api/v1/query?query={}",
        almond_net::percent_encode(query)
    );
    let req = hyper::Request::get(uri).body(Empty::new()).ok()?;
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), max_body);
        body.collect().await.ok().map(|b| b.to_bytes())
    })
    .await
    .ok()??;
    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let result = json["data"]["result"].as_array()?;
    Some(
        result
            .iter()
            .filter_map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect();
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect(),
    )
}

/// A latency bucket's upper bound (`le`): a number of seconds, not
/// negative, or `+Inf`; anything else leaves the bucket out (a proxy's
/// exposition is read, not trusted).
fn bucket_bound(le: Option<&String>) -> Option<f64> {
    let le: f64 = match le.map(String::as_str)? {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    (le >= 0.0).then_some(le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP almond_requests_total Requests handled, by outcome.
almond_requests_total{code_class="2xx",direction="outbound",outcome="success",service="web",subset="v1"} 90
almond_requests_total{code_class="5xx",direction="outbound",outcome="failure",service="web",subset="v2"} 3
almond_requests_total{code_class="2xx",direction="outbound",outcome="success",service="web",subset="v2"} 7
almond_requests_total{code_class="2xx",direction="inbound",outcome="success",service="web",subset="v2"} 1000
almond_requests_total{code_class="2xx",direction="outbound",outcome="success",service="other",subset="v2"} 1000
almond_request_duration_seconds_bucket{direction="outbound",service="web",subset="v2",le="0.01"} 4
almond_request_duration_seconds_bucket{direction="outbound",service="web",subset="v2",le="+Inf"} 10
"#;

    /// A proxy read at the window's start without the service's series
    /// had none of its traffic: what it has now is all the window's. One
    /// not read then (new, or its scrape failed) is no data.
    #[test]
    fn a_proxy_read_before_without_the_service_counts_from_zero() {
        let now = BTreeMap::from([("p".to_owned(), parse(TEXT, "web"))]);
        let then = BTreeMap::new();
        let read = std::collections::BTreeSet::from(["p".to_owned()]);
        let window = delta_known(&now, &then, Some(&read));
        assert_eq!(window["v1"].requests, 90);
        assert!(delta(&now, &then).is_empty());
    }

    #[test]
    fn parses_one_service_by_subset() {
        let t = parse(TEXT, "web");
        assert_eq!(t["v1"].requests, 90);
        assert_eq!((t["v2"].requests, t["v2"].failures), (10, 3));
        assert_eq!(t["v2"].buckets, vec![(0.01, 4), (f64::INFINITY, 10)]);
    }

    /// A bucket bound that is no number of seconds (negative, not a
    /// number) is left out: a proxy's exposition is read, not trusted.
    #[test]
    fn bucket_bounds_that_are_no_duration_are_left_out() {
        let text = TEXT.replace(r#"le="0.01"} 4"#, r#"le="-1"} 4"#);
        assert_eq!(parse(&text, "web")["v2"].buckets, vec![(f64::INFINITY, 10)]);
        let text = TEXT.replace(r#"le="0.01"} 4"#, r#"le="NaN"} 4"#);
        assert_eq!(parse(&text, "web")["v2"].buckets, vec![(f64::INFINITY, 10)]);
    }

    #[test]
    fn one_pass_reads_every_service_as_each_alone() {
        let all = parse_services(TEXT, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all["web"], parse(TEXT, "web"));
        assert_eq!(all["other"], parse(TEXT, "other"));
        assert_eq!(all["other"]["v2"].requests, 1000);
        assert!(parse(TEXT, "nobody").is_empty());
    }

    #[test]
    fn deltas_survive_a_proxy_restart() {
        let then = BTreeMap::from([("p".to_owned(), parse(TEXT, "web"))]);
        let mut later = parse(TEXT, "web");
        later.get_mut("v1").unwrap().requests = 100;
        later.get_mut("v2").unwrap().requests = 4; // restarted: went down
        let now = BTreeMap::from([("p".to_owned(), later)]);
        let d = delta(&now, &then);
        assert_eq!(d["v1"].requests, 10);
        assert_eq!(d["v2"].requests, 4);
    }

    /// The Prometheus source's sum going down is one proxy's series gone:
    /// no data for the subset, not every proxy's lifetime counts.
    #[test]
    fn a_sum_over_proxies_that_went_down_is_no_data() {
        let then = BTreeMap::from([(SUMMED.to_owned(), parse(TEXT, "web"))]);
        let mut later = parse(TEXT, "web");
        later.get_mut("v1").unwrap().requests = 100;
        later.get_mut("v2").unwrap().requests = 4;
        let now = BTreeMap::from([(SUMMED.to_owned(), later)]);
        let d = delta(&now, &then);
        assert_eq!(d["v1"].requests, 10);
        assert!(!d.contains_key("v2"), "{d:?}");
    }

    /// A Prometheus that sums `series` (metric, labels, value) as the
    /// watcher's queries ask: the metric, `outcome="failure"` if asked,
    /// `sum by (LABELS)`. Its series can be changed between queries.
    type Series = Vec<(&'static str, Vec<(&'static str, &'static str)>, f64)>;

    async fn fake_prometheus(series: std::sync::Arc<std::sync::Mutex<Series>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("");
                let q = almond_net::parse_query(target.split_once('?').map_or("", |x| x.1));
                let q = q.get("query").cloned().unwrap_or_default();
                let metric = match q.contains("_bucket") {
                    true => "almond_request_duration_seconds_bucket",
                    false => "almond_requests_total",
                };
                let by: Vec<&str> = q
                    .split_once("by (")
                    .and_then(|(_, r)| r.split_once(')'))
                    .map(|(l, _)| l.split(", ").collect())
                    .unwrap_or_default();
                let mut sums: BTreeMap<Vec<(String, String)>, f64> = BTreeMap::new();
                for (m, labels, v) in series.lock().unwrap().iter() {
                    let failed = labels.contains(&("outcome", "failure"));
                    if *m != metric || (q.contains("failure") && !failed) {
                        continue;
                    }
                    let key = (by.iter())
                        .filter_map(|b| labels.iter().find(|l| l.0 == *b))
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect();
                    *sums.entry(key).or_default() += v;
                }
                let result: Vec<serde_json::Value> = (sums.into_iter())
                    .map(|(k, v)| {
                        let metric: serde_json::Map<String, serde_json::Value> =
                            k.into_iter().map(|(k, v)| (k, v.into())).collect();
                        serde_json::json!({ "metric": metric, "value": [0, v.to_string()] })
                    })
                    .collect();
                let body = serde_json::json!({ "status": "success", "data": { "resultType": "vector", "result": result } }).to_string();
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    /// A proxy whose series Prometheus did not have when the window began
    /// (a failed scrape, a new proxy) is no data for it, not its lifetime
    /// counts (5,000 requests and 100 failures here) added to the window.
    #[tokio::test]
    async fn prometheus_a_target_missing_from_the_baseline_is_no_data() {
        let of = |proxy: &'static str, outcome: &'static str| {
            vec![
                ("subset", "v2"),
                ("instance", proxy),
                ("job", "almond"),
                ("outcome", outcome),
            ]
        };
        let bucket = |proxy: &'static str| {
            vec![
                ("subset", "v2"),
                ("instance", proxy),
                ("job", "almond"),
                ("le", "+Inf"),
            ]
        };
        let series = std::sync::Arc::new(std::sync::Mutex::new(vec![
            ("almond_requests_total", of("a:4191", "success"), 100.0),
            (
                "almond_request_duration_seconds_bucket",
                bucket("a:4191"),
                100.0,
            ),
        ]));
        let base = fake_prometheus(series.clone()).await;
        let then = query_prometheus(&base, "web", 1 << 20).await;
        *series.lock().unwrap() = vec![
            ("almond_requests_total", of("a:4191", "success"), 110.0),
            (
                "almond_request_duration_seconds_bucket",
                bucket("a:4191"),
                110.0,
            ),
            ("almond_requests_total", of("b:4191", "success"), 4900.0),
            ("almond_requests_total", of("b:4191", "failure"), 100.0),
            (
                "almond_request_duration_seconds_bucket",
                bucket("b:4191"),
                5000.0,
            ),
        ];
        let now = query_prometheus(&base, "web", 1 << 20).await;
        let d = delta(&now, &then);
        assert_eq!((d["v2"].requests, d["v2"].failures), (10, 0), "{d:?}");
    }

    #[test]
    fn a_proxy_missing_from_the_baseline_is_no_data() {
        let then = BTreeMap::from([("a".to_owned(), parse(TEXT, "web"))]);
        let now = BTreeMap::from([
            ("a".to_owned(), parse(TEXT, "web")),
            // Came up during the window: its lifetime counters are not this
            // window's traffic.
            ("b".to_owned(), parse(TEXT, "web")),
        ]);
        let d = delta(&now, &then);
        assert_eq!(d["v1"].requests, 0);
        assert_eq!(d["v2"].requests, 0);
    }

    #[test]
    fn a_reset_of_any_series_counts_from_zero() {
        let then = BTreeMap::from([("p".to_owned(), parse(TEXT, "web"))]);
        let mut later = parse(TEXT, "web");
        // Requests went up, but failures and a bucket went down: a restart
        // (and as many requests again since).
        let v2 = later.get_mut("v2").unwrap();
        v2.requests = 12;
        v2.failures = 1;
        v2.buckets = vec![(0.01, 2), (f64::INFINITY, 12)];
        let now = BTreeMap::from([("p".to_owned(), later)]);
        let d = delta(&now, &then);
        assert_eq!((d["v2"].requests, d["v2"].failures), (12, 1));
        assert_eq!(d["v2"].buckets, vec![(0.01, 2), (f64::INFINITY, 12)]);
    }

    #[test]
    fn other_bucket_bounds_are_refused_not_zipped() {
        let mut odd = parse(TEXT, "web");
        odd.get_mut("v2").unwrap().buckets = vec![(0.05, 9), (f64::INFINITY, 10)];
        let per_proxy =
            BTreeMap::from([("a".to_owned(), parse(TEXT, "web")), ("b".to_owned(), odd)]);
        let total = sum(&per_proxy);
        assert_eq!(
            total["v2"].requests, 10,
            "only the first proxy's v2 is summed"
        );
        assert_eq!(total["v2"].buckets, vec![(0.01, 4), (f64::INFINITY, 10)]);
    }
}
