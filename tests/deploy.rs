//! The deployment files of `docker/` and `deploy/` are checked by the tools
//! that consume them, and against what almond really exports:
//!
//! - every PromQL query of the Grafana dashboard and of the alerting rules
//!   names only metric families (and labels) that a running proxy and a
//!   running control plane serve at `/metrics` (both started in-process);
//! - every almond config shipped (`docker/almond/*.yaml`, `deploy/*.yaml`)
//!   passes `almond check-config`, the binary;
//! - `promtool` accepts the Prometheus config, the rules and their unit
//!   tests, and parses every dashboard query (needs `promtool` on `PATH`;
//!   skipped without it unless `ALMOND_REQUIRE_PROMETHEUS` or `CI` is set);
//! - `amtool` accepts the Alertmanager config, and a real Alertmanager on
//!   it holds back proxies' disconnects while the control plane is down
//!   (skipped likewise without `prometheus-alertmanager` and `amtool`);
//! - the compose file, the Prometheus targets, the Consul registrations and
//!   the proxy configs agree on addresses, and every file compose mounts
//!   exists;
//! - the systemd units check the config they run, stop after the drain,
//!   and pass `systemd-analyze verify` where that tool is installed;
//! - the PGO build's training run (`deploy/build-pgo.sh`, step 2) passes
//!   against the test build: every answer a 2xx, HTTP/1.1 and HTTP/2,
//!   GET and POST (needs nginx, wrk and h2load; skipped without them
//!   unless `ALMOND_REQUIRE_LOAD_TOOLS` or `CI` is set).
//!
//! Self-contained on purpose: it shares no helpers with the other tests.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// The files of `dir` (relative to the workspace root) whose names end in
/// one of `exts`, sorted, as paths relative to the root.
fn files(dir: &str, exts: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|e| e.expect("directory entry").file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| exts.iter().any(|ext| n.ends_with(ext)))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    out.sort();
    out
}

/// Label names every scraped series has, or that the Prometheus config of
/// docker/ adds to a target (`host`), rather than the exporter.
const TARGET_LABELS: &[&str] = &["job", "instance", "host"];

/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

// ---------------------------------------------------------------------------
// What almond exports

/// Metric family name -> its label names.
type Families = BTreeMap<String, BTreeSet<String>>;

/// The families of a Prometheus text exposition, with their label names
/// (`le` of histogram buckets included).
fn families(text: &str) -> Families {
    let mut out = Families::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().expect("a family name");
            out.entry(name.to_owned()).or_default();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).expect("a sample line");
        let sample = &line[..end];
        let family = if out.contains_key(sample) {
            sample
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| sample.strip_suffix(s))
                .filter(|f| out.contains_key(*f))
                .unwrap_or_else(|| panic!("sample of no family: {line}"))
        };
        let labels = out.get_mut(family).expect("family exists");
        if let Some(body) = line[end..].strip_prefix('{') {
            let mut chars = body.chars();
            loop {
                let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
                let name = name.trim().trim_start_matches(',').trim();
                if name.is_empty() || name.starts_with('}') {
                    break;
                }
                labels.insert(name.to_owned());
                assert_eq!(chars.next(), Some('"'), "quoted label value: {line}");
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// The families of a control plane with a Consul source (built, not run:
/// its Consul families are registered from the start).
fn consul_control_metrics() -> String {
    let yaml = "source: { consul: { addr: \"http://127.0.0.1:9\" } }\nstore: consul\n";
    let config = almond_config::load_control(yaml, "deploy test").expect("valid control config");
    let control = almond_control::Control::new(config).expect("control plane");
    let families = control.state().metrics.registry.gather();
    let mut out = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut out)
        .expect("encoded");
    String::from_utf8(out).expect("utf-8")
}

async fn get(url: &str) -> String {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::get(url)
        .body(Empty::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(resp.status(), hyper::StatusCode::OK, "{url}");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8")
}

/// The families a proxy and a control plane serve at `/metrics`, both
/// running in-process on port 0. The proxy has a split and listeners in
/// both directions; the control plane has seen a rollout step, a verdict
/// and a rollback, so that every labelled family has a series.
async fn exported() -> Families {
    // The proxy. Its endpoints are never called: series exist from the start.
    let yaml = "admin: 127.0.0.1:0
listeners:
  - bind: 127.0.0.1:0
  - bind: 127.0.0.1:0
    service: web
    direction: inbound
services:
  web:
    endpoints:
      - { addr: \"127.0.0.1:9\", subset: v1 }
      - { addr: \"127.0.0.1:10\", subset: v2 }
    split: { v1: 90, v2: 10 }
";
    let config = almond_config::load_proxy(yaml, "deploy test").expect("valid proxy config");
    let bound = almond_proxy::Bound::bind(&config).expect("bind port 0");
    let admin = bound.admin_addr().expect("admin address");
    let proxy = almond_proxy::Proxy::new(config).expect("proxy");
    let (stop_proxy, proxy_stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(proxy.run(bound, async {
        let _ = proxy_stopped.await;
    }));

    // The control plane, on a file registry.
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).expect("registry directory");
    std::fs::write(
        registry.join("web.yaml"),
        "web:\n  endpoints:\n    - { addr: \"127.0.0.1:9\", subset: v1 }\n",
    )
    .expect("registry file");
    let control_yaml = format!(
        "source: {{ file: \"{}\" }}\nstore: file\npolicy_file: \"{}\"\n",
        registry.display(),
        dir.path().join("policy.json").display()
    );
    let config =
        almond_config::load_control(&control_yaml, "deploy test").expect("valid control config");
    let control = almond_control::Control::new(config).expect("control plane");
    let metrics = &control.state().metrics;
    metrics.rollout_step("web", 10);
    metrics.verdict("web", "pass");
    metrics.rollback("web");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let api: SocketAddr = listener.local_addr().expect("control address");
    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control = tokio::spawn(control.run(listener, async {
        let _ = control_stopped.await;
    }));

    // A proxy following the control plane: the families of a link to one
    // (a static proxy serves none: nothing to connect to).
    let yaml =
        format!("admin: 127.0.0.1:0\ncontrol: http://{api}\nlisteners:\n  - bind: 127.0.0.1:0\n");
    let config = almond_config::load_proxy(&yaml, "deploy test").expect("valid proxy config");
    let bound = almond_proxy::Bound::bind(&config).expect("bind port 0");
    let follower_admin = bound.admin_addr().expect("admin address");
    let follower = almond_proxy::Proxy::new(config).expect("proxy");
    let (stop_follower, follower_stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(follower.run(bound, async {
        let _ = follower_stopped.await;
    }));

    let mut all = families(&get(&format!("http://{admin}/metrics")).await);
    assert!(
        !all.contains_key("almond_control_connected"),
        "a static proxy serves almond_control_connected"
    );
    let file_control = families(&get(&format!("http://{api}/metrics")).await);
    assert!(
        !file_control.contains_key("almond_control_consul_up"),
        "a control plane with a file source serves almond_control_consul_up"
    );
    for (name, labels) in file_control
        .into_iter()
        .chain(families(
            &get(&format!("http://{follower_admin}/metrics")).await,
        ))
        .chain(families(&consul_control_metrics()))
    {
        all.entry(name).or_default().extend(labels);
    }

    let _ = stop_proxy.send(());
    let _ = stop_follower.send(());
    let _ = stop_control.send(());
    for task in [proxy, follower, control] {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops within 10 s")
            .expect("task");
    }
    all
}

// ---------------------------------------------------------------------------
// Reading PromQL, just enough to name what a query uses

/// A series selector: a metric name and the label names it matches on.
#[derive(Debug)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// What a PromQL expression uses.
#[derive(Debug, Default)]
struct Uses {
    selectors: Vec<Selector>,
    /// Label names of `by`, `without`, `on`, `ignoring`, `group_left` and
    /// `group_right` lists.
    grouping: Vec<String>,
    /// Label names the outermost aggregation keeps (its `by` list), when
    /// the expression is one aggregation (possibly inside functions).
    outer_by: Option<Vec<String>>,
}

const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "inf", "nan", "atan2",
];
/// Aggregation operators: they may be followed by `by (...)` rather than
/// by their parenthesis.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Skips a quoted string starting at `chars[i]`; returns the index after it.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

fn ident_at(chars: &[char], mut i: usize) -> (String, usize) {
    let start = i;
    while i < chars.len() && is_ident(chars[i]) {
        i += 1;
    }
    (chars[start..i].iter().collect(), i)
}

/// The names of a `(a, b)` list at `chars[i]` (after spaces), and the index
/// after it; no list: empty.
fn label_list(chars: &[char], i: usize) -> (Vec<String>, usize) {
    let mut i = skip_space(chars, i);
    if chars.get(i) != Some(&'(') {
        return (Vec::new(), i);
    }
    i += 1;
    let mut names = Vec::new();
    loop {
        i = skip_space(chars, i);
        match chars.get(i) {
            Some(')') => return (names, i + 1),
            Some(',') => i += 1,
            Some(c) if is_ident_start(*c) => {
                let (name, next) = ident_at(chars, i);
                names.push(name);
                i = next;
            }
            other => panic!("unexpected {other:?} in a label list"),
        }
    }
}

/// The label names of a `{a="x", b=~"y"}` matcher block at `chars[i]`, and
/// the index after it.
fn matchers(chars: &[char], mut i: usize) -> (Vec<String>, usize) {
    i += 1;
    let mut names = Vec::new();
    loop {
        i = skip_space(chars, i);
        match chars.get(i) {
            Some('}') => return (names, i + 1),
            Some(',') => i += 1,
            Some(c) if is_ident_start(*c) => {
                let (name, next) = ident_at(chars, i);
                names.push(name);
                i = skip_space(chars, next);
                while matches!(chars.get(i), Some('=' | '!' | '~')) {
                    i += 1;
                }
                i = skip_space(chars, i);
                assert!(
                    matches!(chars.get(i), Some('"' | '\'' | '`')),
                    "a matcher's value must be a string"
                );
                i = skip_string(chars, i);
            }
            other => panic!("unexpected {other:?} in a matcher block"),
        }
    }
}

/// Reads what `expr` uses. Grafana's `$variables` are skipped.
fn promql_uses(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    // The outermost aggregation's `by` list: the first grouping clause
    // seen before any selector, when only functions wrap it.
    let mut seen_selector = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                i = ident_at(&chars, i).1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (`0.99`, `10m`, `1e3`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            let (labels, next) = matchers(&chars, i);
            uses.selectors.push(Selector {
                metric: String::new(),
                labels,
            });
            seen_selector = true;
            i = next;
        } else if is_ident_start(c) {
            let (word, next) = ident_at(&chars, i);
            let after = skip_space(&chars, next);
            if GROUPING.contains(&word.as_str()) {
                let (names, next) = label_list(&chars, next);
                if word == "by" && !seen_selector && uses.outer_by.is_none() {
                    uses.outer_by = Some(names.clone());
                }
                uses.grouping.extend(names);
                i = next;
            } else if KEYWORDS.contains(&word.as_str())
                || AGGREGATIONS.contains(&word.as_str())
                || chars.get(after) == Some(&'(')
            {
                // An operator keyword, or a function or aggregation name.
                i = next;
            } else {
                let (labels, next) = if chars.get(after) == Some(&'{') {
                    matchers(&chars, after)
                } else {
                    (Vec::new(), next)
                };
                uses.selectors.push(Selector {
                    metric: word,
                    labels,
                });
                seen_selector = true;
                i = next;
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// The family a sample name belongs to (histogram suffixes removed).
fn family_of<'a>(metric: &'a str, exported: &Families) -> Option<&'a str> {
    if exported.contains_key(metric) || PROMETHEUS_SERIES.contains(&metric) {
        return Some(metric);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| metric.strip_suffix(s))
        .filter(|f| exported.contains_key(*f))
}

/// Every problem of one query: unknown metrics, labels the metrics do not
/// have, and legend labels the query does not keep.
fn check_query(what: &str, expr: &str, legend: Option<&str>, exported: &Families) -> Vec<String> {
    let uses = promql_uses(expr);
    let mut problems = Vec::new();
    if uses.selectors.is_empty() {
        problems.push(format!("{what}: no metric in `{expr}`"));
    }
    let target: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    let mut known = target.clone();
    for sel in &uses.selectors {
        let Some(family) = family_of(&sel.metric, exported) else {
            problems.push(format!(
                "{what}: `{}` is not a metric almond exports",
                sel.metric
            ));
            continue;
        };
        let labels = exported.get(family).cloned().unwrap_or_default();
        let mut allowed: BTreeSet<String> = labels.union(&target).cloned().collect();
        // Only bucket series have `le`.
        if !sel.metric.ends_with("_bucket") {
            allowed.remove("le");
        }
        for label in &sel.labels {
            if !allowed.contains(label) {
                problems.push(format!(
                    "{what}: `{}` has no label `{label}` (it has {labels:?})",
                    sel.metric
                ));
            }
        }
        known.extend(allowed);
    }
    for label in &uses.grouping {
        if !known.contains(label) {
            problems.push(format!(
                "{what}: grouping by `{label}`, which none of its metrics has"
            ));
        }
    }
    if let Some(legend) = legend {
        let kept: BTreeSet<String> = match &uses.outer_by {
            Some(by) => by.iter().cloned().collect(),
            None => known.clone(),
        };
        for part in legend.split("{{").skip(1) {
            let label = part.split("}}").next().unwrap_or_default().trim();
            if !kept.contains(label) {
                problems.push(format!(
                    "{what}: legend names `{label}`, which the query does not keep"
                ));
            }
        }
    }
    problems
}

#[test]
fn promql_reader_names_what_a_query_uses() {
    let uses = promql_uses(
        r#"histogram_quantile(0.99, sum by (service, le) (rate(almond_request_duration_seconds_bucket{direction="outbound",service=~"$service"}[1m])))
        / on (service) group_left max(up offset 10m) # a comment: not_a_metric
        and {__name__="x"}"#,
    );
    let metrics: Vec<&str> = uses.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        metrics,
        ["almond_request_duration_seconds_bucket", "up", ""]
    );
    assert_eq!(uses.selectors[0].labels, ["direction", "service"]);
    assert_eq!(uses.selectors[2].labels, ["__name__"]);
    assert_eq!(uses.grouping, ["service", "le", "service"]);
    assert_eq!(
        uses.outer_by,
        Some(vec!["service".to_owned(), "le".to_owned()])
    );
}

// ---------------------------------------------------------------------------
// The dashboard and the rules

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// (what, expr, legend) of every query of the dashboard: panel targets and
/// `label_values(metric, label)` variable queries (as `metric`, with
/// `label` as the legend so that it is checked too).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "panel {:?} target {}",
                    panel["title"].as_str().unwrap_or("?"),
                    target["refId"].as_str().unwrap_or("?")
                ),
                target["expr"].as_str().unwrap_or_default().to_owned(),
                target["legendFormat"].as_str().map(str::to_owned),
            ));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or_default();
        let what = format!("variable {:?}", var["name"].as_str().unwrap_or("?"));
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{what}: only label_values(metric, label) is supported"));
        let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        out.push((
            what,
            metric.trim().to_owned(),
            Some(format!("{{{{{}}}}}", label.trim())),
        ));
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("docker/grafana/dashboards/almond.json"))
        .expect("docker/grafana/dashboards/almond.json is JSON")
}

/// `expr:` values of a Prometheus rules file: `expr: X` on one line, or a
/// `expr: |` / `expr: >` block (the more indented lines after it).
fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        for key in ["- alert:", "- record:", "alert:", "record:"] {
            if let Some(n) = trimmed.strip_prefix(key) {
                name = n.trim().to_owned();
            }
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let indent = line.len() - trimmed.len();
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push((name.clone(), block.join("\n")));
            } else {
                out.push((name.clone(), value.to_owned()));
            }
        }
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported().await;
    // The families the dashboard and rules rely on are really there.
    for family in [
        "almond_requests_total",
        "almond_request_duration_seconds",
        "almond_split_weight",
        "almond_endpoint_ejections_total",
        "almond_endpoints",
        "almond_control_connected",
        "almond_rollout_step",
        "almond_rollbacks_total",
        "almond_control_snapshot_index",
    ] {
        assert!(
            exported.contains_key(family),
            "`{family}` is not served by the proxy or the control plane: {:?}",
            exported.keys()
        );
    }

    let mut problems = Vec::new();
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    for (what, expr, legend) in &queries {
        problems.extend(check_query(what, expr, legend.as_deref(), &exported));
    }
    let rules = rule_exprs(&read("docker/prometheus/alerts.yml"));
    assert!(rules.len() >= 4, "alerts.yml: {rules:?}");
    for (alert, expr) in &rules {
        problems.extend(check_query(
            &format!("alerts.yml {alert}"),
            expr,
            None,
            &exported,
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The golden metrics of the issue each have a panel.
    let all: String = queries.iter().map(|(_, e, _)| e.as_str()).collect();
    for needed in [
        "rate(almond_requests_total",
        "outcome=\"success\"",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "almond_request_duration_seconds_bucket",
        "almond_split_weight",
        "almond_endpoint_ejections_total",
        "almond_endpoints",
        "almond_rollout_step",
        "almond_rollbacks_total",
        "almond_control_connected",
    ] {
        assert!(all.contains(needed), "no dashboard query has `{needed}`");
    }
    // And the alerts of the issue exist.
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for alert in [
        "AlmondHighErrorRate",
        "AlmondProxyDisconnected",
        "AlmondEndpointEjections",
        "AlmondRollback",
    ] {
        assert!(
            names.contains(alert),
            "alerts.yml has no {alert}: {names:?}"
        );
    }
}

#[test]
fn dashboard_is_well_formed_and_uses_the_provisioned_datasource() {
    let dashboard = dashboard();
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    // The datasource uid the provisioning file gives.
    let provisioning = read("docker/grafana/provisioning/datasources/prometheus.yml");
    let uid = provisioning
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid:"))
        .map(|u| u.trim().to_owned())
        .expect("the datasource has a uid");
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        for key in ["h", "w", "x", "y"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "panel {title:?}: gridPos.{key}"
            );
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], uid,
            "panel {title:?}: datasource"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], uid,
                "panel {title:?}: target datasource"
            );
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?}: a target without expr"
            );
        }
    }
    // The provider loads the directory compose mounts the dashboards at.
    let provider = read("docker/grafana/provisioning/dashboards/almond.yml");
    let path = provider
        .lines()
        .find_map(|l| l.trim().strip_prefix("path:"))
        .map(|p| p.trim().to_owned())
        .expect("the provider has a path");
    let compose = read("docker/compose.yaml");
    assert!(
        compose.contains(&format!("./grafana/dashboards:{path}")),
        "compose mounts docker/grafana/dashboards at the provider's path {path}"
    );
}

// ---------------------------------------------------------------------------
// deploy/build-pgo.sh

/// The PGO build's training run, with this build's binary for a second a
/// load: the script's nginx backends, proxy configs and loads work, and
/// the proxy answers every request of them 2xx (the script fails on any
/// other answer). Its two builds are not run here.
#[test]
fn the_pgo_training_run_passes_with_the_test_build() {
    let missing: Vec<&str> = ["nginx", "wrk", "h2load", "curl"]
        .into_iter()
        .filter(|tool| on_path(tool).is_none())
        .collect();
    if !missing.is_empty() {
        let required = ["ALMOND_REQUIRE_LOAD_TOOLS", "CI"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        assert!(
            !required,
            "{missing:?} must be on PATH (ALMOND_REQUIRE_LOAD_TOOLS or CI is set); on Debian: \
             apt-get install nginx-light wrk nghttp2-client curl"
        );
        eprintln!("skipped: {missing:?} not on PATH");
        return;
    }
    let out = Command::new("bash")
        .arg(root().join("deploy/build-pgo.sh"))
        .env("PGO_TRAIN_ONLY", env!("CARGO_BIN_EXE_almond"))
        .env("PGO_SECONDS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "build-pgo.sh failed:\n{text}");
    for proto in ["http1", "http2"] {
        assert!(
            text.contains(&format!("{proto} upstream: trained")),
            "{proto} not trained:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// promtool

/// `promtool` on `PATH`, or `None` (skip) when missing and neither
/// `ALMOND_REQUIRE_PROMETHEUS` nor `CI` asks for it.
fn promtool() -> Option<PathBuf> {
    prometheus_tool("promtool", "prometheus")
}

/// `name` (from Debian's `package`) on `PATH`, or `None` (skip) when
/// missing and neither `ALMOND_REQUIRE_PROMETHEUS` nor `CI` asks for it.
fn prometheus_tool(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(path) = on_path(name) {
        return Some(path);
    }
    let required = ["ALMOND_REQUIRE_PROMETHEUS", "CI"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    assert!(
        !required,
        "{name} must be on PATH (ALMOND_REQUIRE_PROMETHEUS or CI is set); on Debian: \
         apt-get install {package}"
    );
    eprintln!("skipped: install {name} (Debian: apt-get install {package}) to run it");
    None
}

fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn promtool_accepts_the_prometheus_files_and_every_dashboard_query() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = root().join("docker/prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts.test.yml"],
    ] {
        let mut cmd = Command::new(&promtool);
        cmd.args(args).current_dir(&dir);
        run(cmd);
    }

    // Every dashboard query through Prometheus's own parser: each becomes a
    // recording rule, Grafana's variables replaced by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr, _)) in dashboard_queries(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$service", ".*");
        assert!(!expr.contains('$'), "an unknown variable in `{expr}`");
        rules.push_str(&format!("      - record: dashboard:query_{n}\n"));
        rules.push_str("        expr: |\n");
        for line in expr.lines() {
            rules.push_str(&format!("          {line}\n"));
        }
    }
    let tmp = tempfile::tempdir().expect("temporary directory");
    let file = tmp.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).expect("write the rules");
    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "rules"]).arg(&file);
    run(cmd);
}

// ---------------------------------------------------------------------------
// Alertmanager

/// `POST url` with a JSON body; the status.
async fn post_json(url: &str, body: &Value) -> hyper::StatusCode {
    let client: Client<_, http_body_util::Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .expect("request");
    tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .status()
}

/// A real Alertmanager on `docker/prometheus/alertmanager.yml`: with no
/// control plane replica answering, every proxy's
/// `AlmondProxyDisconnected` is held back (one page for the cause), other
/// alerts are not, and the proxies' alerts come back once a replica is;
/// one replica down of several holds nothing back.
#[tokio::test]
async fn alertmanager_holds_proxy_disconnects_while_no_control_plane_answers() {
    let Some(amtool) = prometheus_tool("amtool", "prometheus-alertmanager") else {
        return;
    };
    let Some(alertmanager) = prometheus_tool("prometheus-alertmanager", "prometheus-alertmanager")
    else {
        return;
    };
    let config = root().join("docker/prometheus/alertmanager.yml");
    let mut cmd = Command::new(&amtool);
    cmd.arg("check-config").arg(&config);
    run(cmd);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let storage = tempfile::tempdir().expect("temporary directory");
    let mut child = tokio::process::Command::new(&alertmanager)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", storage.path().display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        // No cluster: it would listen on every address.
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start alertmanager");
    let base = format!("http://127.0.0.1:{port}");
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let ready = async {
        loop {
            let req = hyper::Request::get(format!("{base}/-/ready"))
                .body(Empty::new())
                .expect("request");
            if let Ok(resp) = client.request(req).await {
                if resp.status() == hyper::StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("alertmanager ready within 30 s");

    let alert = |name: &str, instance: &str, ends: Option<&str>| {
        let mut a = serde_json::json!({
            "labels": {"alertname": name, "instance": instance, "severity": "warning"}
        });
        if let Some(ends) = ends {
            a["endsAt"] = Value::from(ends);
        }
        a
    };
    let post = |alerts: Vec<Value>| {
        let url = format!("{base}/api/v2/alerts");
        async move {
            let status = post_json(&url, &Value::Array(alerts)).await;
            assert_eq!(status, hyper::StatusCode::OK, "POST {url}");
        }
    };
    // The states of the alerts Alertmanager holds, by alert name and instance.
    let states = || async {
        let text = get(&format!("{base}/api/v2/alerts")).await;
        let all: Value = serde_json::from_str(&text).expect("JSON");
        all.as_array()
            .expect("a list")
            .iter()
            .map(|a| {
                let key = format!(
                    "{} {}",
                    a["labels"]["alertname"].as_str().unwrap_or(""),
                    a["labels"]["instance"].as_str().unwrap_or("")
                );
                (key, a["status"]["state"].as_str().unwrap_or("").to_owned())
            })
            .collect::<BTreeMap<String, String>>()
    };
    let wait_for = |want: BTreeMap<String, String>| async move {
        let mut last = BTreeMap::new();
        for _ in 0..200 {
            last = states().await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("alertmanager's alerts: {last:?}, wanted {want:?}");
    };
    let want = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    };

    // A proxy cut off on its own is reported.
    post(vec![alert("AlmondProxyDisconnected", "host1:4191", None)]).await;
    wait_for(want(&[("AlmondProxyDisconnected host1:4191", "active")])).await;

    // One replica of several goes down: nothing is held back (its proxies
    // move to the others; one that cannot is reported).
    post(vec![alert(
        "AlmondControlPlaneDown",
        "control-a:9190",
        None,
    )])
    .await;
    wait_for(want(&[
        ("AlmondControlPlaneDown control-a:9190", "active"),
        ("AlmondProxyDisconnected host1:4191", "active"),
    ]))
    .await;

    // No replica answers: every proxy's disconnect is held back, the
    // control plane's own alerts and unrelated ones are not.
    post(vec![
        alert("AlmondControlPlaneUnavailable", "", None),
        alert("AlmondProxyDisconnected", "host2:4191", None),
        alert("AlmondEndpointEjections", "host2:4191", None),
    ])
    .await;
    wait_for(want(&[
        ("AlmondControlPlaneDown control-a:9190", "active"),
        ("AlmondControlPlaneUnavailable ", "active"),
        ("AlmondEndpointEjections host2:4191", "active"),
        ("AlmondProxyDisconnected host1:4191", "suppressed"),
        ("AlmondProxyDisconnected host2:4191", "suppressed"),
    ]))
    .await;

    // A replica is back; a proxy still cut off is reported again.
    let ended = Some("2000-01-01T00:00:00Z");
    post(vec![
        alert("AlmondControlPlaneUnavailable", "", ended),
        alert("AlmondControlPlaneDown", "control-a:9190", ended),
    ])
    .await;
    wait_for(want(&[
        ("AlmondEndpointEjections host2:4191", "active"),
        ("AlmondProxyDisconnected host1:4191", "active"),
        ("AlmondProxyDisconnected host2:4191", "active"),
    ]))
    .await;
    child.kill().await.expect("stop alertmanager");
}

// ---------------------------------------------------------------------------
// almond configs

#[test]
fn every_shipped_almond_config_passes_check_config() {
    let mut configs = files("docker/almond", &[".yaml", ".yml"]);
    configs.extend(files("deploy", &[".yaml", ".yml"]));
    for expected in [
        "docker/almond/control.yaml",
        "docker/almond/proxy-host1.yaml",
        "docker/almond/proxy-host2.yaml",
        "deploy/proxy.yaml",
        "deploy/control.yaml",
    ] {
        assert!(
            configs.iter().any(|c| c == expected),
            "{expected} is missing"
        );
    }
    for config in &configs {
        let out = Command::new(env!("CARGO_BIN_EXE_almond"))
            .arg("check-config")
            .arg(config)
            .current_dir(root())
            .output()
            .expect("run almond check-config");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": ok ("),
            "almond check-config {config}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// docker/: the pieces agree

#[test]
fn compose_prometheus_consul_and_proxies_agree() {
    let compose = read("docker/compose.yaml");
    let prometheus = read("docker/prometheus/prometheus.yml");

    // Every file or directory compose mounts from docker/ exists (a missing
    // one would be created as an empty directory).
    let mut mounts = 0;
    for line in compose.lines() {
        if let Some(rest) = line.trim().strip_prefix("- ./") {
            let path = rest.split(':').next().expect("a host path");
            assert!(
                root().join("docker").join(path).exists(),
                "docker/compose.yaml mounts ./{path}, which does not exist"
            );
            mounts += 1;
        }
    }
    assert!(
        mounts >= 6,
        "docker/compose.yaml mounts only {mounts} files"
    );
    assert!(compose.contains("dockerfile: docker/Dockerfile"));
    assert!(root().join("docker/Dockerfile").exists());

    // Each proxy's admin address: on its host's fixed address, scraped by
    // Prometheus, and its container's health check.
    let proxies = files("docker/almond", &[".yaml"])
        .into_iter()
        .filter(|f| f.contains("/proxy-"))
        .collect::<Vec<_>>();
    assert_eq!(proxies.len(), 2, "two hosts: {proxies:?}");
    let mut host_ips = BTreeSet::new();
    for file in &proxies {
        let config =
            almond_config::load_proxy_file(&root().join(file)).expect("a valid proxy config");
        let admin = config.admin;
        assert!(config.control.is_some(), "{file} follows the control plane");
        assert!(
            prometheus.contains(&format!("\"{admin}\"")),
            "docker/prometheus/prometheus.yml does not scrape {file}'s admin {admin}"
        );
        assert!(
            compose.contains(&format!("ipv4_address: {}\n", admin.ip())),
            "docker/compose.yaml gives no container {file}'s admin address {}",
            admin.ip()
        );
        assert!(
            compose.contains(&format!("\"almond-healthcheck\", \"{admin}\"")),
            "docker/compose.yaml does not health-check {file} on {admin}"
        );
        host_ips.insert(admin.ip().to_string());
    }

    // Consul registers `demo` in two versions on each host's address.
    let consul: Value = serde_json::from_str(&read("docker/consul/demo-services.json"))
        .expect("docker/consul/demo-services.json is JSON");
    let mut seen = BTreeSet::new();
    for service in consul["services"].as_array().expect("services") {
        assert_eq!(service["name"], "demo");
        let address = service["address"].as_str().expect("address");
        assert!(
            host_ips.contains(address),
            "{address} is no host's address ({host_ips:?})"
        );
        let version = service["meta"]["version"].as_str().expect("meta.version");
        assert!(service["port"].is_u64(), "port");
        assert!(
            service["checks"][0]["http"]
                .as_str()
                .is_some_and(|u| u.contains(address)),
            "{address}: a health check on the instance"
        );
        seen.insert((address.to_owned(), version.to_owned()));
    }
    for ip in &host_ips {
        for version in ["v1", "v2"] {
            assert!(
                seen.contains(&(ip.clone(), version.to_owned())),
                "no demo {version} on {ip}"
            );
        }
    }
    let control = read("docker/almond/control.yaml");
    assert!(control.contains("store: consul") && control.contains("http://consul:8500"));
}

// ---------------------------------------------------------------------------
// deploy/systemd

/// The values of `key=` lines of a unit file.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// Seconds of a systemd time span like `45s` or `1min 30s`.
fn seconds(span: &str) -> u64 {
    span.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().expect("a number");
            match &part[digits.len()..] {
                "" | "s" | "sec" => n,
                "m" | "min" => n * 60,
                other => panic!("unit {other:?}"),
            }
        })
        .sum()
}

#[test]
fn systemd_units_check_their_config_and_outlast_the_drain() {
    let units = files("deploy/systemd", &[".service"]);
    assert_eq!(
        units,
        [
            "deploy/systemd/almond-control.service",
            "deploy/systemd/almond-proxy.service"
        ]
    );
    for file in &units {
        let unit = read(file);
        let start = unit_values(&unit, "ExecStart");
        let pre = unit_values(&unit, "ExecStartPre");
        assert_eq!(start.len(), 1, "{file}: one ExecStart");
        let config = start[0]
            .split_once("--config ")
            .map(|(_, c)| c.trim())
            .expect("ExecStart has --config");
        assert_eq!(
            pre,
            [format!("/usr/local/bin/almond check-config {config}")],
            "{file}: ExecStartPre checks the config ExecStart runs"
        );
        // The sample config of that path ships in deploy/ and is valid.
        let sample = Path::new(config).file_name().expect("a file name");
        let sample = root().join("deploy").join(sample);
        assert!(sample.exists(), "{file}: no sample {}", sample.display());
        for (key, want) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("AmbientCapabilities", ""),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("LimitNOFILE", "65536"),
            ("KillSignal", "SIGTERM"),
            ("Restart", "on-failure"),
            ("DynamicUser", "yes"),
        ] {
            assert_eq!(unit_values(&unit, key), [want], "{file}: {key}");
        }
        assert_eq!(unit_values(&unit, "StateDirectory").len(), 1, "{file}");
        if file.ends_with("almond-proxy.service") {
            assert_eq!(unit_values(&unit, "StateDirectory"), ["almond"]);
            assert_eq!(
                unit_values(&unit, "ExecReload"),
                [
                    format!("/usr/local/bin/almond check-config {config}"),
                    "/bin/kill -HUP $MAINPID".to_owned()
                ],
                "{file}: a reload checks the file, then sends SIGHUP"
            );
            let proxy =
                almond_config::load_proxy_file(&sample).expect("deploy/proxy.yaml is valid");
            let cache = proxy.cache.expect("deploy/proxy.yaml sets cache");
            assert!(cache.starts_with("/var/lib/almond/"), "{}", cache.display());
            let stop = seconds(unit_values(&unit, "TimeoutStopSec")[0]);
            assert!(
                stop > proxy.drain_timeout.as_secs(),
                "{file}: TimeoutStopSec={stop}s is not above drain_timeout {:?}",
                proxy.drain_timeout
            );
        }
    }

    // The real verifier, where it is installed, with the binary path
    // pointed at the one cargo built (verify wants it to exist).
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed; the units were not verified");
        return;
    };
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut cmd = Command::new(analyze);
    cmd.arg("verify");
    for file in &units {
        let text = read(file).replace("/usr/local/bin/almond", env!("CARGO_BIN_EXE_almond"));
        let name = Path::new(file).file_name().expect("file name");
        let copy = tmp.path().join(name);
        std::fs::write(&copy, text).expect("write unit copy");
        cmd.arg(copy);
    }
    let out = run(cmd);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("almond-proxy") || l.contains("almond-control"))
        .collect();
    assert!(
        about_ours.is_empty(),
        "systemd-analyze verify:\n{}",
        about_ours.join("\n")
    );
}

/// `name` in a `PATH` directory, if it is an executable file there.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
