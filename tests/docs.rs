//! The reference pages cannot drift from the code:
//!
//! - `docs/configuration.md` names every key path of the proxy config model
//!   and nothing else (checked against a fully-populated config, built from
//!   `examples/proxy.yaml` and serialized with serde_json);
//! - `docs/metrics.md` names every metric family the proxy exposes, with its
//!   type and labels, and nothing else.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use almond_config::{
    CircuitBreaker, Endpoint, Limits, Listener, ProxyConfig, Retries, Service, Timeouts,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// The rows of every Markdown table in `text` whose header starts with
/// `first_header`: (first cell without backticks, the other cells).
fn table_rows(text: &str, first_header: &str) -> Vec<(String, Vec<String>)> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        if cells[0] == first_header {
            in_table = true;
            continue;
        }
        if !in_table || cells[0].starts_with("---") {
            continue;
        }
        let first = &cells[0];
        assert!(
            first.starts_with('`') && first.ends_with('`') && first.len() > 2,
            "the first cell of a `{first_header}` row must be in backticks: {line}"
        );
        rows.push((first.trim_matches('`').to_owned(), cells[1..].to_vec()));
    }
    rows
}

/// The differences between what the page documents and what the code has.
fn compare(page: &str, documented: &BTreeSet<String>, actual: &BTreeSet<String>) {
    let undocumented: Vec<_> = actual.difference(documented).collect();
    let stale: Vec<_> = documented.difference(actual).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "{page} is out of date.\n  in the code, not on the page: {undocumented:?}\n  \
         on the page, not in the code: {stale:?}"
    );
}

// ---------------------------------------------------------------------------
// docs/configuration.md

/// `examples/proxy.yaml` with every optional key given a value, so that the
/// serialized config has every key the model knows.
///
/// The patterns below name every field of every config struct on purpose: a
/// new field stops this test from compiling until it is documented in
/// docs/configuration.md (and, if it is an `Option`, filled in here).
fn fully_populated() -> ProxyConfig {
    let mut config = almond_config::load_proxy_file(&root().join("examples/proxy.yaml"))
        .expect("examples/proxy.yaml is valid");
    let ProxyConfig {
        admin: _,
        control,
        token_env,
        control_ca,
        control_max_bytes: _,
        admin_token_env,
        proxy_id,
        zone,
        zone_min_healthy,
        cache,
        workers,
        drain_timeout: _,
        listeners,
        limits,
        services,
        tracing,
        access_log,
        tls,
    } = &mut config;
    let almond_config::Tls {
        cert: _,
        key: _,
        ca: _,
    } = tls.get_or_insert_with(|| almond_config::Tls {
        cert: "/etc/almond/tls/cert.pem".into(),
        key: "/etc/almond/tls/key.pem".into(),
        ca: "/etc/almond/tls/ca.pem".into(),
    });
    let almond_config::Otlp {
        endpoint: _,
        queue: _,
        batch: _,
        flush_interval: _,
        timeout: _,
        service_name,
    } = tracing.otlp.get_or_insert_with(|| almond_config::Otlp {
        endpoint: "http://127.0.0.1:4318/v1/traces".to_owned(),
        queue: 2048,
        batch: 512,
        flush_interval: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        service_name: None,
    });
    service_name.get_or_insert_with(|| "web".to_owned());
    access_log.get_or_insert_with(|| almond_config::AccessLog {
        format: almond_config::AccessLogFormat::Json,
        path: Some("/var/log/almond/access.log".into()),
        sample_rate: 1.0,
        max_per_second: 1000,
        queue: 4096,
    });
    control.get_or_insert_with(|| "https://127.0.0.1:4180".to_owned());
    token_env.get_or_insert_with(|| "ALMOND_PROXY_TOKEN".to_owned());
    control_ca.get_or_insert_with(|| "/etc/almond/tls/control-ca.pem".into());
    admin_token_env.get_or_insert_with(|| "ALMOND_ADMIN_TOKEN".to_owned());
    proxy_id.get_or_insert_with(|| "web-1".to_owned());
    zone.get_or_insert_with(|| "us-east-1a".to_owned());
    // Serialized only when not the default.
    *zone_min_healthy = 60;
    cache.get_or_insert_with(|| "/var/lib/almond/snapshot.json".into());
    workers.get_or_insert(2);
    for Listener {
        bind: _,
        service,
        direction: _,
        tls,
        allow,
        trust_routing_headers,
    } in listeners.iter_mut()
    {
        trust_routing_headers.get_or_insert(false);
        service.get_or_insert_with(|| "orders".to_owned());
        *tls = true;
        if allow.is_empty() {
            allow.push("spiffe://example.org/service/web".to_owned());
        }
    }
    let Limits {
        max_header_bytes: _,
        header_timeout: _,
        max_connections: _,
        keep_alive_interval: _,
        keep_alive_timeout: _,
        body_idle: _,
        idle_timeout: _,
    } = limits;
    assert!(!services.is_empty(), "examples/proxy.yaml has a service");
    for Service {
        protocol: _,
        lb: _,
        endpoints,
        split,
        routes,
        guards,
        mirror,
        timeouts,
        circuit_breaker,
        retries,
        health_check,
        tls,
        authz,
        grpc,
    } in services.values_mut()
    {
        // Serialized only when not the default.
        let almond_config::Grpc { failure_codes } = grpc;
        failure_codes.push(almond_config::GrpcCode::Aborted);
        let almond_config::Authz { allow } = authz.get_or_insert_with(Default::default);
        if allow.is_empty() {
            allow.push("spiffe://example.org/service/web".to_owned());
        }
        let almond_config::HealthCheck {
            interval: _,
            timeout: _,
            path,
            healthy: _,
            unhealthy: _,
        } = health_check.get_or_insert_with(Default::default);
        path.get_or_insert_with(|| "/healthz".to_owned());
        let almond_config::UpstreamTls { server_name } = tls.get_or_insert_with(Default::default);
        server_name.get_or_insert_with(|| "orders".to_owned());
        for Endpoint {
            addr: _,
            subset: _,
            weight: _,
            zone,
        } in endpoints.iter_mut()
        {
            zone.get_or_insert_with(|| "us-east-1a".to_owned());
        }
        let almond_config::Split {
            weights,
            sticky_header,
        } = split.get_or_insert_with(Default::default);
        if weights.is_empty() {
            weights.insert(endpoints[0].subset.clone(), 100);
        }
        sticky_header.get_or_insert_with(|| "x-user-id".to_owned());
        if routes.is_empty() {
            let subset = endpoints[0].subset.clone();
            let header = |v: &str| almond_config::HeaderMatch::Value(v.to_owned());
            // Two rules: path_prefix and path_exact (and subset and
            // service) exclude each other.
            let first = almond_config::Match {
                path_prefix: Some("/api".to_owned()),
                path_exact: None,
                method: Some("GET".to_owned()),
                headers: [("x-beta".to_owned(), header("1"))].into(),
                cookie: [("beta".to_owned(), "1".to_owned())].into(),
            };
            let second = almond_config::Match {
                path_exact: Some("/healthz".to_owned()),
                ..Default::default()
            };
            routes.push(almond_config::RouteRule {
                when: first,
                to: almond_config::RouteTo {
                    subset: Some(subset),
                    service: None,
                },
            });
            routes.push(almond_config::RouteRule {
                when: second,
                to: almond_config::RouteTo {
                    subset: None,
                    service: Some("orders".to_owned()),
                },
            });
        }
        {
            let block = almond_config::Match {
                path_prefix: Some("/api/giveaway".to_owned()),
                method: Some("POST".to_owned()),
                ..Default::default()
            };
            guards.push(almond_config::Guard {
                when: block,
                deny: Some(almond_config::Deny {
                    status: 503,
                    body: Some("closed".to_owned()),
                }),
                limit: None,
            });
            guards.push(almond_config::Guard {
                when: almond_config::Match::default(),
                deny: None,
                limit: Some(almond_config::Limit {
                    rate: almond_config::Rate::parse("100/min").unwrap(),
                    burst: Some(20),
                    by: almond_config::LimitBy::Header("x-user-id".to_owned()),
                    scope: almond_config::LimitScope::Fleet,
                    shared_by: None,
                }),
            });
        }
        let almond_config::Mirror {
            subset: _,
            service: _,
            percent: _,
            max_in_flight: _,
        } = mirror.get_or_insert_with(|| almond_config::Mirror {
            subset: None,
            service: Some("orders".to_owned()),
            percent: 1.0,
            max_in_flight: 100,
        });
        let Timeouts {
            connect: _,
            request: _,
            idle,
            body_idle,
        } = timeouts;
        // Serialized only when not the default.
        *idle = Duration::from_secs(30);
        *body_idle = Duration::from_secs(30);
        let CircuitBreaker {
            consecutive_failures: _,
            base_ejection: _,
            max_ejection_percent: _,
            max_ejection: _,
            failure_on: _,
            panic_threshold: _,
            max_requests: _,
            max_pending: _,
        } = circuit_breaker;
        let Retries {
            attempts: _,
            budget_percent: _,
            on: _,
            per_try_timeout,
            max_body_bytes: _,
            min_per_second: _,
        } = retries;
        per_try_timeout.get_or_insert(Duration::from_secs(2));
    }
    // A second service mirrors to the first by name (`mirror.service`),
    // where the first mirrors to a subset of its own.
    let first = services.keys().next().cloned().expect("a service");
    if let Some(svc) = services.get_mut(&first) {
        let subset = svc.endpoints[0].subset.clone();
        if let Some(m) = svc.mirror.as_mut() {
            (m.subset, m.service) = (Some(subset), None);
        }
    }
    let mut second = services[&first].clone();
    if let Some(m) = second.mirror.as_mut() {
        (m.subset, m.service) = (None, Some(first.clone()));
    }
    services.insert(format!("{first}-shadow"), second);
    let problems = almond_config::validate_proxy(&config);
    assert!(
        problems.is_empty(),
        "filled config is invalid: {problems:?}"
    );
    config
}

/// Every key path of a serialized config, with user-chosen names replaced
/// by `<name>` (services) and `<subset>` (split) and list items by `[]`.
fn key_paths(value: &Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                // A service's policy under the control plane's Consul
                // source: the proxy's service keys, documented there.
                if path == "source.consul.service_defaults" {
                    out.insert(format!("{path}.<name>"));
                    continue;
                }
                let key = if path == "services" {
                    "<name>"
                } else if path.ends_with(".split") && key != "sticky_header" {
                    "<subset>"
                } else if path.ends_with(".match.headers") {
                    "<header>"
                } else if path.ends_with(".match.cookie") {
                    "<cookie>"
                } else {
                    key.as_str()
                };
                let child_path = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                key_paths(child, &child_path, out);
                out.insert(child_path);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn configuration_reference_names_every_key_and_nothing_else() {
    let json = serde_json::to_value(fully_populated()).expect("serializable");
    let mut actual = BTreeSet::new();
    key_paths(&json, "", &mut actual);

    let page = read("docs/configuration.md");
    let rows = table_rows(&page, "key");
    let mut documented = BTreeSet::new();
    for (key, cells) in &rows {
        assert_eq!(
            cells.len(),
            3,
            "`{key}`: want key | type | default | meaning"
        );
        assert!(
            cells.iter().all(|c| !c.is_empty()),
            "`{key}`: a cell is empty"
        );
        assert!(
            documented.insert(key.clone()),
            "`{key}` is documented twice"
        );
    }
    compare("docs/configuration.md", &documented, &actual);
}

// ---------------------------------------------------------------------------
// docs/control-configuration.md

/// deploy/control.yaml with every optional key given a value; the patterns
/// name every field, so a new one stops this test from compiling until it
/// is documented.
fn control_configs() -> Vec<almond_config::ControlConfig> {
    let config = almond_config::load_control_file(&root().join("deploy/control.yaml"))
        .expect("deploy/control.yaml is valid");
    let almond_config::ControlConfig {
        listen: _,
        source,
        subset_key: _,
        zone_key: _,
        store: _,
        policy_file: _,
        watcher: _,
        token_env: _,
        proxy_token_env: _,
        proxy_admin_token_env: _,
        tls: _,
        max_body_bytes: _,
        notify: _,
        max_wait: _,
    } = &config;
    let almond_config::Source::Consul(consul) = source else {
        panic!("deploy/control.yaml has a consul source");
    };
    let almond_config::ConsulSource {
        addr: _,
        token_env: _,
        services: _,
        wait: _,
        datacenter: _,
        stale: _,
        ca_file: _,
        cert_file: _,
        key_file: _,
        intentions: _,
        service_defaults: _,
    } = consul;
    let mut full = config.clone();
    full.token_env
        .get_or_insert_with(|| "ALMOND_TOKEN".to_owned());
    full.proxy_admin_token_env
        .get_or_insert_with(|| "ALMOND_PROXY_ADMIN_TOKEN".to_owned());
    full.proxy_token_env
        .get_or_insert_with(|| "ALMOND_PROXY_TOKEN".to_owned());
    full.notify = vec![almond_config::Notify {
        url: "https://hooks.example.org/almond".to_owned(),
        format: almond_config::NotifyFormat::Slack,
    }];
    full.tls.get_or_insert_with(|| almond_config::Tls {
        cert: "/etc/almond/tls/control.pem".into(),
        key: "/etc/almond/tls/control-key.pem".into(),
        ca: "/etc/almond/tls/ca.pem".into(),
    });
    if let almond_config::Source::Consul(c) = &mut full.source {
        c.addr = "https://consul.internal:8501".to_owned();
        c.datacenter = Some("dc1".to_owned());
        c.ca_file = Some("/etc/consul/ca.pem".into());
        c.cert_file = Some("/etc/consul/client.pem".into());
        c.key_file = Some("/etc/consul/client-key.pem".into());
        c.intentions = Some(almond_config::ConsulIntentions {
            trust_domain: "example.org".to_owned(),
            default: almond_config::IntentionDefault::Allow,
        });
        c.service_defaults
            .insert("*".to_owned(), almond_config::ServiceDefaults::default());
    }
    // The two shapes of `watcher`, one in each.
    full.watcher = Some(almond_config::Watcher {
        source: None,
        prometheus: Some("http://127.0.0.1:9090".to_owned()),
    });
    let mut file = config;
    file.source = almond_config::Source::File("/etc/almond/services".into());
    file.store = almond_config::Store::File;
    file.watcher = Some(almond_config::Watcher {
        source: Some(almond_config::WatcherScrape::Direct),
        prometheus: None,
    });
    vec![full, file]
}

#[test]
fn control_configuration_reference_names_every_key_and_nothing_else() {
    let mut actual = BTreeSet::new();
    for config in control_configs() {
        let json = serde_json::to_value(config).expect("serializable");
        key_paths(&json, "", &mut actual);
    }
    let page = read("docs/control-configuration.md");
    let mut documented = BTreeSet::new();
    for (key, cells) in table_rows(&page, "control key") {
        assert_eq!(
            cells.len(),
            3,
            "`{key}`: want key | type | default | meaning"
        );
        assert!(
            documented.insert(key.clone()),
            "`{key}` is documented twice"
        );
    }
    compare("docs/control-configuration.md", &documented, &actual);
}

// ---------------------------------------------------------------------------
// docs/metrics.md

/// A family as the exposition shows it: its type and its label names.
#[derive(Debug, Default, PartialEq, Eq)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// The families of a Prometheus text exposition.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("bad TYPE line: {line}");
            };
            out.entry(name.to_owned()).or_default().kind = kind.to_owned();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..name_end];
        let family = if out.contains_key(sample) {
            sample
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| sample.strip_suffix(s))
                .filter(|f| out.contains_key(*f))
                .unwrap_or_else(|| panic!("sample of no family: {line}"))
        };
        let labels = label_names(&line[name_end..]);
        let entry = out.get_mut(family).expect("family exists");
        entry
            .labels
            .extend(labels.into_iter().filter(|l| l != "le"));
    }
    out
}

/// The label names of `{a="x",b="y"} 1`.
fn label_names(rest: &str) -> Vec<String> {
    let Some(body) = rest.strip_prefix('{') else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.trim().is_empty() {
            break;
        }
        names.push(name.trim().trim_start_matches(',').to_owned());
        // Skip the quoted value, honouring backslash escapes.
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value must be quoted: {rest}"
        );
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        match chars.peek() {
            Some(',') => {
                chars.next();
            }
            _ => break,
        }
    }
    names
}

// The process_* families exist on Linux only.
#[cfg(target_os = "linux")]
#[test]
fn metrics_reference_names_every_family_and_nothing_else() {
    let mut config = almond_config::load_proxy_file(&root().join("examples/proxy.yaml"))
        .expect("examples/proxy.yaml is valid");
    // Zone-aware pools, whose counters appear with them, need a zone and
    // endpoints both in it and outside it.
    config.zone = Some("a".to_owned());
    for svc in config.services.values_mut() {
        for (i, e) in svc.endpoints.iter_mut().enumerate() {
            e.zone = Some(if i == 0 { "a" } else { "b" }.to_owned());
        }
    }
    // Families with labels appear once they have a series: a mirror's.
    if let Some(svc) = config.services.values_mut().next() {
        svc.mirror = Some(almond_config::Mirror {
            subset: Some(svc.endpoints[0].subset.clone()),
            service: None,
            percent: 1.0,
            max_in_flight: 100,
        });
    }
    let proxy = almond_proxy::Proxy::new(config).expect("proxy");
    let exposition = String::from_utf8(proxy.shared().metrics.encode()).expect("UTF-8");
    let mut exposed = families(&exposition);
    // A proxy that follows a control plane serves its link's families too
    // (a static one has nothing to connect to).
    let yaml = "control: http://127.0.0.1:9\nlisteners:\n  - bind: 127.0.0.1:0\n";
    let following = almond_config::load_proxy(yaml, "following").expect("valid proxy config");
    let following = almond_proxy::Proxy::new(following).expect("proxy");
    let exposition = String::from_utf8(following.shared().metrics.encode()).expect("UTF-8");
    exposed.extend(families(&exposition));

    check_families(&exposed, "name");
}

/// The control plane's families against the `control metric` table.
#[cfg(target_os = "linux")]
#[test]
fn metrics_reference_names_every_control_plane_family() {
    let state = almond_control::state::State::new().expect("control state");
    // Families with labels appear once they have a series.
    state.metrics.rollout_step("web", 10);
    state.metrics.verdict("web", "pass");
    state.metrics.rollback("web");
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &state.metrics.registry.gather(),
        &mut out,
    )
    .expect("encode");
    let exposed = families(&String::from_utf8(out).expect("UTF-8"));
    check_families(&exposed, "control metric");
}

/// Compares the exposed families with the docs/metrics.md table whose first
/// header is `header`: same names, types and labels.
fn check_families(exposed: &BTreeMap<String, Family>, header: &str) {
    let page = read("docs/metrics.md");
    let mut documented = BTreeMap::new();
    for (name, cells) in table_rows(&page, header) {
        assert_eq!(
            cells.len(),
            3,
            "`{name}`: want name | type | labels | meaning"
        );
        let labels = cells[1]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let family = Family {
            kind: cells[0].clone(),
            labels,
        };
        assert!(
            documented.insert(name.clone(), family).is_none(),
            "`{name}` is documented twice"
        );
    }

    let names = |m: &BTreeMap<String, Family>| m.keys().cloned().collect::<BTreeSet<_>>();
    compare("docs/metrics.md", &names(&documented), &names(exposed));
    for (name, family) in exposed {
        assert_eq!(
            &documented[name], family,
            "docs/metrics.md: `{name}` has another type or other labels in the code"
        );
    }
}

// ---------------------------------------------------------------------------
// docs/architecture.md

/// The `.rs` files under `dir`, recursively (relative to the workspace root).
fn sources(dir: &str) -> Vec<String> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(root().join(dir)).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
    for entry in entries {
        let entry = entry.expect("readable entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = format!("{dir}/{name}");
        if entry.file_type().expect("file type").is_dir() {
            files.extend(sources(&path));
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn architecture_map_names_every_source_file_and_nothing_else() {
    let page = read("docs/architecture.md");
    let documented: BTreeSet<String> = table_rows(&page, "file")
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    let missing: Vec<&String> = documented
        .iter()
        .filter(|p| !root().join(p).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names files that do not exist: {missing:?}"
    );
    let actual: BTreeSet<String> = ["src", "config/src", "proxy/src", "control/src"]
        .iter()
        .flat_map(|dir| sources(dir))
        .collect();
    let undocumented: Vec<&String> = actual.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "docs/architecture.md does not say what these files own: {undocumented:?}"
    );
}

/// The converted example of docs/migration-from-nginx.md loads as written.
#[test]
fn the_nginx_migration_example_loads() {
    let page = read("docs/migration-from-nginx.md");
    let section = page
        .split("### Converted end to end")
        .nth(1)
        .expect("the converted example");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block");
    let config = almond_config::load_proxy(yaml, "migration-from-nginx.md")
        .unwrap_or_else(|e| panic!("the example is refused:\n{e}"));
    assert_eq!(config.services["shop"].routes.len(), 3);
}
