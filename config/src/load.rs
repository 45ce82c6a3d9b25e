//! Parse and check a proxy config: text in, a checked [`ProxyConfig`] or
//! every [`Problem`] out. Used by `check-config`, start-up and reload alike.

use crate::control::{ControlConfig, Source, Store};
use crate::lines::{segment, LineIndex};
use crate::problem::{Problem, Problems};
use crate::proxy::{Condition, ProxyConfig, Service};
use crate::rules::RouteRule;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

/// Reads and checks a proxy config file (YAML; JSON is YAML too).
pub fn load_proxy_file(path: &Path) -> Result<ProxyConfig, Problems> {
    read(path).and_then(|text| load_proxy(&text, &path.display().to_string()))
}

/// Is this config text a control config? Told by its top-level keys:
/// those that only a control config has (`source`, `listen`, `watcher`,
/// ...) against those that only a proxy config has (`admin`, `services`,
/// ...), with `source` deciding a tie. The keys are read as written, so a
/// file whose YAML has errors further on (a key given twice, a misspelled
/// key) is still checked as what it is, and its real problem named.
pub fn is_control_config(text: &str) -> bool {
    let keys = LineIndex::build(text);
    let keys = keys.top_level_keys();
    let control = field_names::<ControlConfig>();
    let proxy = field_names::<ProxyConfig>();
    let only = |mine: &[&str], other: &[&str]| {
        let only = |k: &&String| mine.contains(&k.as_str()) && !other.contains(&k.as_str());
        keys.iter().filter(only).count()
    };
    let (c, p) = (only(control, proxy), only(proxy, control));
    c > p || (c == p && keys.iter().any(|k| k == "source"))
}

/// The keys of a config struct: serde hands its derived field list to
/// `deserialize_struct`, which this deserializer records and refuses.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    type Refused = serde::de::value::Error;
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = Refused;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Refused> {
            Err(Refused::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Refused> {
            *self.0 = fields;
            Err(Refused::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Reads and checks a control config file.
pub fn load_control_file(path: &Path) -> Result<ControlConfig, Problems> {
    read(path).and_then(|text| load_control(&text, &path.display().to_string()))
}

/// Parses and checks control config text.
pub fn load_control(text: &str, source_name: &str) -> Result<ControlConfig, Problems> {
    let index = LineIndex::build(text);
    let fail = |problems| Problems {
        source_name: source_name.to_owned(),
        problems,
    };
    let config: ControlConfig = parse(text, &index).map_err(fail)?;
    let mut problems = Vec::new();
    let mut add = |path: String, message: String| {
        problems.push(Problem {
            line: index.line_of(&path),
            path,
            message,
        })
    };
    if let Err((key, message)) = config.watcher_source() {
        add(join_path("watcher", key), message);
    }
    // Keys whose values would quietly mean "never": no subset or zone is
    // ever found under an empty Meta key, a 0-byte body limit fails every
    // read, and a 0s long-poll answers at once, forever.
    for (key, value) in [
        ("subset_key", &config.subset_key),
        ("zone_key", &config.zone_key),
    ] {
        if let Err(why) = check_meta_key(value) {
            add(key.into(), why);
        }
    }
    if config.max_body_bytes == 0 {
        add("max_body_bytes".into(), "must be 1 or more".into());
    }
    if config.max_wait.is_zero() {
        add("max_wait".into(), "must be more than 0".into());
    }
    for (key, value) in [
        ("token_env", config.token_env.as_deref()),
        ("proxy_token_env", config.proxy_token_env.as_deref()),
        (
            "proxy_admin_token_env",
            config.proxy_admin_token_env.as_deref(),
        ),
    ] {
        if value.is_some_and(|v| v.trim().is_empty()) {
            add(key.into(), "must name an environment variable".into());
        }
    }
    // The admin token goes to every proxy that long-polled; with no
    // credential on snapshot reads, any host can poll as a proxy.
    let credential =
        config.token_env.is_some() || config.proxy_token_env.is_some() || config.tls.is_some();
    if config.proxy_admin_token_env.is_some() && !credential {
        add(
            "proxy_admin_token_env".into(),
            "needs proxy_token_env (or token_env, or tls): without a credential on snapshot \
             reads any host that long-polls counts as a proxy and would be sent this token"
                .into(),
        );
    }
    // Policies live in Consul KV only when endpoints come from Consul:
    // the file source keeps them in `policy_file` (the control plane
    // used that file, with a warning, when given both).
    if config.store == Store::Consul && !matches!(config.source, Source::Consul(_)) {
        add(
            "store".into(),
            "consul needs a consul source; with a file source, policies are kept in \
             policy_file (store: file, the default)"
                .into(),
        );
    }
    for (i, n) in config.notify.iter().enumerate() {
        if !n.url.starts_with("http://") && !n.url.starts_with("https://") {
            let path = format!("notify[{i}].url");
            problems.push(Problem {
                line: index.line_of(&path),
                path,
                message: format!("{:?} is not an http:// or https:// URL", n.url),
            });
        }
    }
    if let Source::Consul(c) = &config.source {
        let https = c.addr.starts_with("https://");
        if !c.addr.starts_with("http://") && !https {
            problems.push(Problem {
                path: "source.consul.addr".into(),
                line: index.line_of("source.consul.addr"),
                message: format!("{:?} is not an http:// or https:// URL", c.addr),
            });
        }
        let tls_keys = [
            ("ca_file", c.ca_file.is_some()),
            ("cert_file", c.cert_file.is_some()),
            ("key_file", c.key_file.is_some()),
        ];
        for (key, set) in tls_keys {
            if set && !https {
                let path = format!("source.consul.{key}");
                problems.push(Problem {
                    line: index.line_of(&path),
                    path,
                    message: "only used with an https:// addr".into(),
                });
            }
        }
        if c.cert_file.is_some() != c.key_file.is_some() {
            let key = if c.cert_file.is_some() {
                "cert_file"
            } else {
                "key_file"
            };
            let path = format!("source.consul.{key}");
            problems.push(Problem {
                line: index.line_of(&path),
                path,
                message: "cert_file and key_file go together".into(),
            });
        }
        for (i, name) in c.services.iter().enumerate() {
            if let Err(why) = crate::proxy::check_service_name(name) {
                let path = format!("source.consul.services[{i}]");
                problems.push(Problem {
                    line: index.line_of(&path),
                    path,
                    message: why,
                });
            }
        }
        if c.wait.is_zero() {
            problems.push(Problem {
                path: "source.consul.wait".into(),
                line: index.line_of("source.consul.wait"),
                message: "must be more than 0".into(),
            });
        }
        // The same checks as a service of the proxy's config: a snapshot
        // the proxies would refuse must not be sent.
        for (name, defaults) in &c.service_defaults {
            let at = format!("source.consul.service_defaults.{name}");
            if name != "*" {
                if let Err(why) = crate::proxy::check_service_name(name) {
                    problems.push(Problem {
                        line: index.line_of(&at),
                        path: at.clone(),
                        message: format!("{why} (or \"*\", for every service)"),
                    });
                }
            }
            let mut svc = Service::default();
            defaults.apply(&mut svc);
            for (rel, message) in check_service(&svc, Strictness::Snapshot) {
                let path = format!("{at}{rel}");
                problems.push(Problem {
                    line: index.line_of(&path),
                    path,
                    message,
                });
            }
        }
        if let Some(i) = &c.intentions {
            if let Err(why) = check_trust_domain(&i.trust_domain) {
                let path = "source.consul.intentions.trust_domain";
                problems.push(Problem {
                    path: path.into(),
                    line: index.line_of(path),
                    message: why,
                });
            }
        }
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(fail(problems))
    }
}

fn join_path(parent: &str, key: &str) -> String {
    if key.is_empty() {
        parent.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A Consul `Meta` key, as Consul allows them: 1 to 128 letters, digits,
/// `_` or `-`; another would never be found on an instance.
fn check_meta_key(key: &str) -> Result<(), String> {
    let ok = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if key.is_empty() || key.len() > 128 || !ok {
        return Err(format!(
            "{key:?} is not a Consul Meta key: 1 to 128 letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// A SPIFFE trust domain (`example.org`): lower-case letters, digits,
/// `.`, `-` and `_`, as the SPIFFE ID standard has it; another would never
/// match a certificate's `spiffe://` URI.
fn check_trust_domain(domain: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if domain.is_empty() || !domain.bytes().all(ok) {
        return Err(format!(
            "{domain:?} is not a SPIFFE trust domain: lower-case letters, digits, '.', '-' \
             and '_', e.g. example.org"
        ));
    }
    Ok(())
}

/// Parses a registry file: a map of service name to service, checked as
/// strictly as static proxy services.
pub fn load_services(text: &str, source_name: &str) -> Result<BTreeMap<String, Service>, Problems> {
    let index = LineIndex::build(text);
    let fail = |problems| Problems {
        source_name: source_name.to_owned(),
        problems,
    };
    let services: BTreeMap<String, Service> = parse(text, &index).map_err(fail)?;
    let mut problems: Vec<Problem> = services
        .iter()
        .flat_map(|(name, svc)| {
            let bad_name = crate::proxy::check_service_name(name).err();
            let bad_name = bad_name.map(|why| (segment(name).to_owned(), why));
            check_service(svc, Strictness::Static)
                .into_iter()
                .chain(crate::tls::check_server_name(name, svc))
                .map(move |(path, message)| (format!("{name}{path}"), message))
                .chain(bad_name)
        })
        .map(|(path, message)| Problem {
            line: index.line_of(&path),
            path,
            message,
        })
        .collect();
    if problems.is_empty() {
        return Ok(services);
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    Err(fail(problems))
}

/// Parses a list of route rules (`almond route set FILE`): each rule's
/// `match` and `to` checked as far as they can be without the service
/// (its subsets and the other services are the control plane's to check).
pub fn load_rules(text: &str, source_name: &str) -> Result<Vec<RouteRule>, Problems> {
    let index = LineIndex::build(text);
    let fail = |problems| Problems {
        source_name: source_name.to_owned(),
        problems,
    };
    let rules: Vec<RouteRule> = parse(text, &index).map_err(fail)?;
    let problems: Vec<Problem> = crate::rules::check_rules(&rules, None)
        .into_iter()
        .map(|(path, message)| {
            // `.routes[0].match.method` -> `[0].match.method`
            let path = path.trim_start_matches(".routes").to_owned();
            Problem {
                line: index.line_of(&path),
                path,
                message,
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(rules)
    } else {
        Err(fail(problems))
    }
}

fn read(path: &Path) -> Result<String, Problems> {
    let source_name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) => Err(Problems {
            source_name,
            problems: vec![Problem {
                path: "(file)".into(),
                line: None,
                message: format!("cannot read: {e}"),
            }],
        }),
    }
}

/// Parses and checks proxy config text; `source_name` names it in errors.
pub fn load_proxy(text: &str, source_name: &str) -> Result<ProxyConfig, Problems> {
    let fail = |problems| Problems {
        source_name: source_name.to_owned(),
        problems,
    };
    let index = LineIndex::build(text);
    let config = parse(text, &index).map_err(fail)?;
    let mut problems = validate_proxy(&config);
    // A file's services with a control plane would serve until the first
    // snapshot, then vanish (a snapshot's, checked by `validate_proxy`
    // when applied, are the control plane's).
    if config.control.is_some() && !config.services.is_empty() {
        problems.push(Problem {
            path: "services".into(),
            line: None,
            message: "only used in static mode: with `control`, the control plane's snapshots give the services (the first would replace these)".into(),
        });
    }
    problems.extend(crate::tls::check_files(&config));
    if problems.is_empty() {
        return Ok(config);
    }
    for p in &mut problems {
        p.line = index.line_of(&p.path);
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    Err(fail(problems))
}

/// Most runtime threads a proxy may ask for (`workers`): far past any
/// machine's cores, and far short of what makes the runtime fail to start.
const MAX_WORKERS: usize = 1024;

/// The YAML parser's limits, for a config as large as the documented
/// limits allow (10,000 route rules a service, a `<<: *base` shared by
/// hundreds of services): its defaults refused a file with 3 anchors used
/// 34 times each (an alias-to-anchor ratio meant for untrusted input) and
/// one of 250,000 nodes. A file whose anchors blow up (a billion laughs)
/// is still stopped, by the caps on aliases and on the events they copy.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            enforce_alias_anchor_ratio: false,
            max_nodes: 20_000_000,
            max_events: 40_000_000,
        },
    }
}

/// Deserializes, reporting the key path and line of the first error; a
/// key given twice, which YAML does not allow, is reported first, each
/// with the mapping's path and the key (serde-saphyr knows neither path).
fn parse<T: DeserializeOwned>(text: &str, index: &LineIndex) -> Result<T, Vec<Problem>> {
    if !index.duplicates().is_empty() {
        return Err(index.duplicates().iter().map(duplicate).collect());
    }
    let mut path = None;
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
            serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
                let at = e.path().to_string();
                // A duplicate the walk did not see (a key that is not a plain
                // string): the path ends at the unknown key, `?`.
                let message = match e.inner().without_snippet() {
                    serde_saphyr::Error::DuplicateMappingKey { key, .. } => {
                        let key = key.as_deref().unwrap_or("?");
                        format!("key {key:?} given twice")
                    }
                    _ => e.into_inner().to_string(),
                };
                path = Some(at);
                <serde_saphyr::Error as serde::de::Error>::custom(message)
            })
        });
    result.map_err(|e| {
        let full = e.without_snippet().to_string();
        let path = path
            .map(|p| p.trim_end_matches('?').trim_end_matches('.').to_owned())
            .filter(|p| !p.is_empty() && p != ".")
            .unwrap_or_else(|| "(document)".into());
        let line = e
            .location()
            .map(|l| l.line() as usize)
            .or_else(|| line_in_message(&full))
            .or_else(|| index.line_of(&path));
        if let serde_saphyr::Error::MultipleDocuments { .. } = e.without_snippet() {
            // serde-saphyr's hint names its own API; say what is wrong.
            let starts = index.documents();
            return vec![Problem {
                path: "(document)".into(),
                line: starts.get(1).copied().or(line),
                message: format!(
                    "a config is one YAML document; found {}",
                    starts.len().max(2)
                ),
            }];
        }
        vec![Problem {
            path,
            line,
            message: first_line(&full),
        }]
    })
}

/// A key given twice, named by its mapping and the key.
fn duplicate(d: &crate::lines::Duplicate) -> Problem {
    Problem {
        path: if d.parent.is_empty() {
            "(top level)".into()
        } else {
            d.parent.clone()
        },
        line: Some(d.line),
        message: format!("key {:?} given twice (first on line {})", d.key, d.first),
    }
}

/// serde-saphyr puts `line L` in its messages when it knows it.
fn line_in_message(text: &str) -> Option<usize> {
    let at = text.find("line ")? + 5;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The error's message without serde-saphyr's `error: line L column C:`
/// prefix and ` at line L, column C` suffix (the line is reported apart).
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or(text);
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let line = match line.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => line,
    };
    match line.rfind(" at line ") {
        Some(cut) => line[..cut].to_owned(),
        None => line.to_owned(),
    }
}

/// The checks serde cannot do: references, sums, duplicates, ranges.
/// Returns problems without lines (the caller adds them).
pub fn validate_proxy(config: &ProxyConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut add = |path: String, message: String| {
        out.push(Problem {
            path,
            line: None,
            message,
        })
    };
    let static_mode = config.control.is_none();

    if config.listeners.is_empty() {
        add("listeners".into(), "at least one listener is needed".into());
    }
    // Keys of the link to a control plane do nothing without one: said,
    // as the control config says of its Consul TLS files without https.
    if static_mode {
        for (key, set) in [
            ("token_env", config.token_env.is_some()),
            ("control_ca", config.control_ca.is_some()),
            ("cache", config.cache.is_some()),
        ] {
            if set {
                add(
                    key.into(),
                    "only used with `control` (a control plane to follow)".into(),
                );
            }
        }
    } else if config.control_ca.is_some()
        && !config
            .control
            .as_deref()
            .is_some_and(|c| c.starts_with("https://"))
    {
        add(
            "control_ca".into(),
            "only used with an https:// control".into(),
        );
    }
    // A 0-byte snapshot limit fails every poll: the proxy never ready.
    if config.control_max_bytes == 0 {
        add("control_max_bytes".into(), "must be 1 or more".into());
    }
    if config.zone_min_healthy > 100 {
        add(
            "zone_min_healthy".into(),
            "must be between 0 and 100".into(),
        );
    }
    if config.zone.as_deref().is_some_and(|z| z.trim().is_empty()) {
        add("zone".into(), "must not be empty".into());
    }
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(other) = config.listeners[..i]
            .iter()
            .find(|o| overlap(o.bind, l.bind))
        {
            add(
                format!("listeners[{i}].bind"),
                format!("{} is bound by another listener ({})", l.bind, other.bind),
            );
        }
        if overlap(l.bind, config.admin) {
            add(
                format!("listeners[{i}].bind"),
                format!(
                    "{} takes the admin address's port ({}); change `admin` or this listener (with no `listeners`, one listens on 127.0.0.1:4140)",
                    l.bind, config.admin
                ),
            );
        }
        // Inbound is other hosts calling this host's service: one routed
        // by `Host` would relay any caller to any service (another host's
        // too) under this proxy's identity, past the allow-lists that
        // trust it. Linkerd's and Envoy's inbound reach the local app only.
        if l.direction == crate::Direction::Inbound && l.service.is_none() {
            add(
                format!("listeners[{i}].service"),
                "an inbound listener serves this host's service: name it (without one, any \
                 caller could reach any service through it, under this proxy's identity)"
                    .into(),
            );
        }
        if let Some(svc) = &l.service {
            if let Err(why) = crate::proxy::check_service_name(svc) {
                add(format!("listeners[{i}].service"), why);
            } else if static_mode && !config.services.contains_key(svc) {
                add(
                    format!("listeners[{i}].service"),
                    format!("no service named {svc:?} in services"),
                );
            }
        }
    }
    for (path, message) in crate::observe::check(&config.tracing, config.access_log.as_ref()) {
        add(path, message);
    }
    for (path, message) in crate::tls::check(config) {
        add(path, message);
    }
    if config.workers == Some(0) {
        add("workers".into(), "must be 1 or more".into());
    } else if config.workers.is_some_and(|w| w > MAX_WORKERS) {
        add(
            "workers".into(),
            format!("must be {MAX_WORKERS} or less (one runtime thread per core is the norm)"),
        );
    }
    for (key, value) in [
        ("token_env", config.token_env.as_deref()),
        ("admin_token_env", config.admin_token_env.as_deref()),
    ] {
        if value.is_some_and(|v| v.trim().is_empty()) {
            add(key.into(), "must name an environment variable".into());
        }
    }
    if config.limits.max_connections == 0 {
        add("limits.max_connections".into(), "must be 1 or more".into());
    }
    for (key, d) in [
        ("keep_alive_interval", config.limits.keep_alive_interval),
        ("keep_alive_timeout", config.limits.keep_alive_timeout),
        ("header_timeout", config.limits.header_timeout),
        ("body_idle", config.limits.body_idle),
        ("idle_timeout", config.limits.idle_timeout),
    ] {
        if d.is_zero() {
            add(format!("limits.{key}"), "must be more than 0".into());
        }
    }
    if config.limits.max_header_bytes < 8192 {
        add(
            "limits.max_header_bytes".into(),
            "must be at least 8192".into(),
        );
    }
    if let Some(url) = &config.control {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            add(
                "control".into(),
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
    }
    let strictness = if static_mode {
        Strictness::Static
    } else {
        Strictness::Snapshot
    };
    for (name, svc) in &config.services {
        // Names written here; a snapshot's come checked by the control
        // plane (a proxy must not refuse a whole snapshot for one name).
        if static_mode {
            if let Err(why) = crate::proxy::check_service_name(name) {
                add(format!("services.{}", segment(name)), why);
            }
        }
        for (path, message) in check_service(svc, strictness) {
            add(format!("services.{name}{path}"), message);
        }
        if static_mode {
            for (i, rule) in svc.routes.iter().enumerate() {
                match &rule.to.service {
                    Some(to) if !config.services.contains_key(to) => add(
                        format!("services.{name}.routes[{i}].to.service"),
                        format!("no service named {to:?} in services"),
                    ),
                    _ => {}
                }
            }
            let mirrored = svc.mirror.as_ref().and_then(|m| m.service.as_ref());
            if let Some(to) = mirrored.filter(|to| !config.services.contains_key(*to)) {
                add(
                    format!("services.{name}.mirror.service"),
                    format!("no service named {to:?} in services"),
                );
            }
        }
    }
    out
}

/// How strictly a service is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Written by a person: every subset named must have endpoints.
    Static,
    /// From the control plane: endpoints come and go with health, so a
    /// service may have none for a while, and a split may name a subset
    /// that has none (traffic then falls back to the others).
    Snapshot,
}

/// Checks one service; paths are relative (`.endpoints[0].weight`).
/// The control plane and the proxy run the same checks on snapshots.
pub fn check_service(svc: &Service, strictness: Strictness) -> Vec<(String, String)> {
    let strict = strictness == Strictness::Static;
    let mut out = Vec::new();
    if let Some(authz) = &svc.authz {
        for (i, id) in authz.allow.iter().enumerate() {
            if let Err(why) = crate::proxy::check_identity(id) {
                out.push((format!(".authz.allow[{i}]"), why));
            }
        }
    }
    if strict && svc.endpoints.is_empty() {
        out.push((
            ".endpoints".into(),
            "a service needs at least one endpoint".into(),
        ));
    }
    let mut seen = HashSet::new();
    for (i, ep) in svc.endpoints.iter().enumerate() {
        if ep.weight == 0 {
            out.push((
                format!(".endpoints[{i}].weight"),
                "must be 1 or more".into(),
            ));
        }
        if ep.weight > 10_000 {
            out.push((
                format!(".endpoints[{i}].weight"),
                "must be 10000 or less".into(),
            ));
        }
        if ep.subset.is_empty() {
            out.push((
                format!(".endpoints[{i}].subset"),
                "must not be empty".into(),
            ));
        }
        // The proxy counts its guards' answers under `subset="guard"`: a
        // real subset of that name would share their series, and hide from
        // the alerts that leave guards out.
        if strict && ep.subset == "guard" {
            out.push((
                format!(".endpoints[{i}].subset"),
                "\"guard\" is reserved: the proxy counts its guards' answers under subset=\"guard\"".into(),
            ));
        }
        if !seen.insert(ep.addr) {
            out.push((
                format!(".endpoints[{i}].addr"),
                format!("{} is listed twice", ep.addr),
            ));
        }
        // A config's own endpoints (a snapshot's come from a registry,
        // whose instances the control plane has checked).
        let ip = ep.addr.ip();
        if strict && (ep.addr.port() == 0 || ip.is_unspecified() || ip.is_multicast()) {
            out.push((
                format!(".endpoints[{i}].addr"),
                format!(
                    "{} cannot be connected to (port 0, or an any or multicast address)",
                    ep.addr
                ),
            ));
        }
    }
    if let Some(split) = &svc.split {
        if let Some(header) = &split.sticky_header {
            if let Err(message) = crate::split::check_sticky_header(header) {
                out.push((".split.sticky_header".into(), message));
            }
        }
        let split = &split.weights;
        let sum: u64 = split.values().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            out.push((
                ".split".into(),
                format!("weights must sum to 100, not {sum}"),
            ));
        }
        for (subset, weight) in split {
            if *weight > 100 {
                out.push((
                    format!(".split.{subset}"),
                    "must be between 0 and 100".into(),
                ));
            }
            if strict && !svc.endpoints.iter().any(|e| &e.subset == subset) {
                out.push((
                    format!(".split.{subset}"),
                    format!("no endpoint has subset {subset:?}"),
                ));
            }
        }
    }
    let subsets: Vec<&str> = svc.endpoints.iter().map(|e| e.subset.as_str()).collect();
    out.extend(crate::rules::check_rules(
        &svc.routes,
        strict.then_some(subsets.as_slice()),
    ));
    out.extend(crate::guards::check_guards_as(&svc.guards, !strict));
    if let Some(m) = &svc.mirror {
        out.extend(crate::rules::check_mirror(
            m,
            strict.then_some(subsets.as_slice()),
        ));
    }
    if svc.timeouts.connect.is_zero() {
        out.push((".timeouts.connect".into(), "must be more than 0".into()));
    }
    if svc.timeouts.request.is_zero() {
        out.push((".timeouts.request".into(), "must be more than 0".into()));
    }
    let cb = &svc.circuit_breaker;
    if cb.max_ejection_percent > 100 {
        out.push((
            ".circuit_breaker.max_ejection_percent".into(),
            "must be between 0 and 100".into(),
        ));
    }
    if cb.max_requests == 0 {
        out.push((
            ".circuit_breaker.max_requests".into(),
            "must be 1 or more".into(),
        ));
    }
    if cb.consecutive_failures == 0 {
        out.push((
            ".circuit_breaker.consecutive_failures".into(),
            "must be 1 or more".into(),
        ));
    }
    if cb.panic_threshold > 100 {
        out.push((
            ".circuit_breaker.panic_threshold".into(),
            "must be between 0 and 100".into(),
        ));
    }
    if cb.max_pending == 0 {
        out.push((
            ".circuit_breaker.max_pending".into(),
            "must be 1 or more".into(),
        ));
    }
    if cb.base_ejection.is_zero() {
        out.push((
            ".circuit_breaker.base_ejection".into(),
            "must be more than 0".into(),
        ));
    }
    if cb.max_ejection < cb.base_ejection {
        // Named where the user wrote: an unwritten max_ejection is its
        // default, which a long base_ejection passes.
        let default = crate::proxy::CircuitBreaker::default().max_ejection;
        out.push(if cb.max_ejection == default {
            (
                ".circuit_breaker.base_ejection".into(),
                format!(
                    "must be at most max_ejection ({}s by default): raise max_ejection too",
                    default.as_secs()
                ),
            )
        } else {
            (
                ".circuit_breaker.max_ejection".into(),
                "must be at least base_ejection".into(),
            )
        });
    }
    if svc.retries.per_try_timeout.is_some_and(|t| t.is_zero()) {
        out.push((
            ".retries.per_try_timeout".into(),
            "must be more than 0".into(),
        ));
    }
    if svc.timeouts.idle.is_zero() {
        out.push((".timeouts.idle".into(), "must be more than 0".into()));
    }
    if svc.timeouts.body_idle.is_zero() {
        out.push((".timeouts.body_idle".into(), "must be more than 0".into()));
    }
    if let Some(hc) = &svc.health_check {
        if hc.interval < std::time::Duration::from_millis(10) {
            out.push((
                ".health_check.interval".into(),
                "must be at least 10ms".into(),
            ));
        }
        if hc.timeout.is_zero() {
            out.push((".health_check.timeout".into(), "must be more than 0".into()));
        }
        if let Some(path) = &hc.path {
            // Also none of what a request target cannot hold (`http`'s
            // rule; a `#` would end it): such a check would fail on every
            // endpoint, with nothing said.
            let unsendable = path.contains(['"', '<', '>', '`', '#']);
            if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) || unsendable {
                out.push((
                    ".health_check.path".into(),
                    format!("{path:?} is not an absolute path like /healthz"),
                ));
            }
        }
        for (key, n) in [("healthy", hc.healthy), ("unhealthy", hc.unhealthy)] {
            if n == 0 {
                out.push((format!(".health_check.{key}"), "must be 1 or more".into()));
            }
        }
    }
    if (svc.retries.on).contains(&Condition::Grpc(crate::GrpcCode::Ok)) {
        out.push((
            ".retries.on".into(),
            "grpc-ok is not a failure: name failing codes like grpc-unavailable".into(),
        ));
    }
    for c in &svc.circuit_breaker.failure_on {
        if let Condition::Grpc(code) = c {
            out.push((
                ".circuit_breaker.failure_on".into(),
                format!(
                    "{} is for retries.on only; gRPC failures count by grpc.failure_codes",
                    code.condition()
                ),
            ));
        }
    }
    if svc.retries.attempts > 10 {
        out.push((".retries.attempts".into(), "must be 10 or less".into()));
    }
    if svc.retries.budget_percent > 100 {
        out.push((
            ".retries.budget_percent".into(),
            "must be between 0 and 100".into(),
        ));
    }
    out
}

/// Do two listening addresses take the same connections? The same port
/// on the same address, or on every address (`0.0.0.0`, `::`) beside
/// another: every socket sets `SO_REUSEPORT`, so both would bind and the
/// kernel would divide the connections between them. Port 0 asks the OS
/// for a free port each time: never a clash.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::WatcherSource;

    fn problems(text: &str) -> Vec<Problem> {
        match load_proxy(text, "t.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    const GOOD: &str = "\
admin: 127.0.0.1:4191
listeners:
  - bind: 127.0.0.1:4140
  - bind: 127.0.0.1:9001
    service: orders
services:
  orders:
    protocol: http2
    lb: p2c_ewma
    endpoints:
      - { addr: 127.0.0.1:8081, subset: v1, weight: 1 }
      - { addr: 127.0.0.1:8082, subset: v2 }
    split: { v1: 90, v2: 10 }
    timeouts: { connect: 1s, request: 10s }
    circuit_breaker: { consecutive_failures: 5, base_ejection: 10s, max_ejection_percent: 50,
                       max_requests: 1024, max_pending: 256 }
    retries: { attempts: 2, budget_percent: 20, on: [connect, reset, \"503\"] }
";

    #[test]
    fn the_contract_example_loads() {
        let cfg = load_proxy(GOOD, "t.yaml").expect("contract example is valid");
        let orders = &cfg.services["orders"];
        assert_eq!(orders.endpoints[1].subset, "v2");
        assert_eq!(orders.endpoints[1].weight, 1);
        assert_eq!(orders.timeouts.request.as_secs(), 10);
        assert_eq!(cfg.listeners[1].service.as_deref(), Some("orders"));
    }

    #[test]
    fn json_round_trips_through_serialize() {
        let cfg = load_proxy(GOOD, "t.yaml").expect("valid");
        let json = serde_json::to_string(&cfg).expect("serializable");
        let again = load_proxy(&json, "t.json").expect("JSON is accepted");
        assert_eq!(cfg, again);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("lb: p2c_ewma", "lbb: p2c_ewma");
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].path, "services.orders.lbb");
        assert_eq!(p[0].line, Some(9));
        assert!(
            p[0].message.contains("unknown field `lbb`"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn grpc_codes_and_conditions_are_checked() {
        let with = |retries_on: &str, extra: &str| {
            GOOD.replace("on: [connect, reset, \"503\"]", retries_on)
                .replace("    split: {", &format!("{extra}    split: {{"))
        };
        let ok = with(
            "on: [connect, grpc-unavailable, grpc-resource-exhausted]",
            "    grpc: { failure_codes: [UNAVAILABLE, ABORTED] }\n",
        );
        let cfg = load_proxy(&ok, "t.yaml").expect("valid");
        let orders = &cfg.services["orders"];
        assert_eq!(
            orders.retries.on[1],
            Condition::Grpc(crate::GrpcCode::Unavailable)
        );
        assert_eq!(orders.grpc.failure_codes.len(), 2);
        let json = serde_json::to_string(&cfg).expect("serializable");
        assert_eq!(load_proxy(&json, "t.json").expect("valid"), cfg);

        let p = problems(&with("on: [grpc-ok]", ""));
        assert_eq!(p[0].path, "services.orders.retries.on", "{p:?}");
        let p = problems(&with("on: [grpc-unavialable]", ""));
        assert_eq!(p[0].path, "services.orders.retries.on[0]", "{p:?}");
        assert!(
            p[0].message.contains("grpc-unavailable"),
            "{}",
            p[0].message
        );
        let p = problems(&with(
            "on: [connect]",
            "    grpc: { failure_codes: [unavailable] }\n",
        ));
        assert_eq!(p[0].path, "services.orders.grpc.failure_codes[0]", "{p:?}");
        assert_eq!(p[0].line, Some(13));
        assert!(p[0].message.contains("UNAVAILABLE"), "{}", p[0].message);
        let p = problems(&GOOD.replace(
            "max_pending: 256 }",
            "max_pending: 256, failure_on: [grpc-internal] }",
        ));
        assert_eq!(p[0].path, "services.orders.circuit_breaker.failure_on");
        assert!(p[0].message.contains("retries.on only"), "{}", p[0].message);
    }

    #[test]
    fn bad_duration_is_named() {
        let p = problems(&GOOD.replace("connect: 1s", "connect: fast"));
        assert_eq!(p[0].path, "services.orders.timeouts.connect");
        assert_eq!(p[0].line, Some(14));
        assert!(
            p[0].message.contains("invalid duration"),
            "{}",
            p[0].message
        );
        // One no deadline can be set from (it panicked connection tasks).
        let p = problems(&GOOD.replace("connect: 1s", "connect: 300000000000y"));
        assert_eq!(p[0].path, "services.orders.timeouts.connect");
        assert!(
            p[0].message.contains("at most 10 years"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn semantic_problems_are_all_reported_with_lines() {
        let text = GOOD
            .replace("bind: 127.0.0.1:9001", "bind: 127.0.0.1:4140")
            .replace("{ v1: 90, v2: 10 }", "{ v1: 90, v3: 20 }");
        let p = problems(&text);
        let got: Vec<(&str, Option<usize>)> = p.iter().map(|p| (p.path.as_str(), p.line)).collect();
        assert_eq!(
            got,
            vec![
                ("listeners[1].bind", Some(4)),
                ("services.orders.split", Some(13)),
                ("services.orders.split.v3", Some(13)),
            ]
        );
    }

    /// A listener on every address beside one on a specific address (or
    /// the admin's) with the same port would share its connections.
    #[test]
    fn a_wildcard_bind_beside_a_specific_one_on_its_port_is_refused() {
        let p = problems(&GOOD.replace("bind: 127.0.0.1:9001", "bind: 0.0.0.0:4140"));
        assert_eq!(p[0].path, "listeners[1].bind", "{p:?}");
        assert!(
            p[0].message.contains("another listener"),
            "{}",
            p[0].message
        );
        let p = problems(&GOOD.replace("bind: 127.0.0.1:9001", "bind: \"[::]:4191\""));
        assert_eq!(p[0].path, "listeners[1].bind", "{p:?}");
        assert!(p[0].message.contains("admin"), "{}", p[0].message);
        assert!(problems(&GOOD.replace("bind: 127.0.0.1:9001", "bind: 0.0.0.0:9001")).is_empty());
    }

    #[test]
    fn sticky_header_loads_inside_split() {
        let text = GOOD.replace(
            "{ v1: 90, v2: 10 }",
            "{ v1: 90, v2: 10, sticky_header: x-user-id }",
        );
        let cfg = load_proxy(&text, "t.yaml").expect("sticky split is valid");
        let split = cfg.services["orders"].split.clone().unwrap_or_default();
        assert_eq!(split.weights.get("v2"), Some(&10));
        assert_eq!(split.sticky_header.as_deref(), Some("x-user-id"));
    }

    #[test]
    fn split_errors_name_key_and_line() {
        let bad_weight = problems(&GOOD.replace("v2: 10 }", "v2: ten }"));
        assert_eq!(bad_weight.len(), 1);
        assert_eq!(bad_weight[0].path, "services.orders.split.v2");
        assert_eq!(bad_weight[0].line, Some(13));
        let bad_header = problems(&GOOD.replace("v2: 10 }", "v2: 10, sticky_header: \"x user\" }"));
        assert_eq!(bad_header[0].path, "services.orders.split.sticky_header");
        assert_eq!(bad_header[0].line, Some(13));
        assert!(bad_header[0].message.contains("not an HTTP header name"));
    }

    /// A YAML alias or merge key stands for a whole value: the keys after
    /// it, and those it brings in, are named at their own lines.
    #[test]
    fn problems_after_aliases_and_merge_keys_name_their_lines() {
        let text = "\
services:
  a:
    timeouts: &t { connect: 1s, request: 5s }
    endpoints: [{ addr: 127.0.0.1:1 }]
  b:
    timeouts: *t
    endpoints:
      - addr: 127.0.0.1:2
      - addr: 127.0.0.1:3
        weight: 0
";
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "services.b.endpoints[1].weight");
        assert_eq!(
            p[0].to_string(),
            "line 10: services.b.endpoints[1].weight: must be 1 or more"
        );

        let text = "\
services:
  a: &base
    timeouts: { connect: 1s }
    endpoints:
      - addr: 127.0.0.1:1
  b:
    <<: *base
    lb: round_robin
    endpoints:
      - addr: 127.0.0.1:2
        weight: 0
  c:
    <<: *base
    timeouts: { connect: 0s }
";
        let got: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "line 11: services.b.endpoints[0].weight: must be 1 or more",
                "line 14: services.c.timeouts.connect: must be more than 0",
            ]
        );

        // A problem a merge key brings in is named at the `<<`.
        let text = "\
services:
  a: &base
    timeouts: { connect: 0s }
    endpoints: [{ addr: 127.0.0.1:1 }]
  b:
    <<: *base
    endpoints: [{ addr: 127.0.0.1:2 }]
";
        let got: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "line 3: services.a.timeouts.connect: must be more than 0",
                "line 6: services.b.timeouts.connect: must be more than 0",
            ]
        );
    }

    /// A key given twice is named by its mapping's path, the key and both
    /// lines; a second document is named as such (not as Rust API advice).
    #[test]
    fn duplicate_keys_and_extra_documents_are_named() {
        let text = "\
admin: 127.0.0.1:4191
services:
  web:
    endpoints: [{ addr: 127.0.0.1:1 }]
    timeouts:
      request: 5s
      connect: 1s
      request: 10s
admin: 127.0.0.1:4192
";
        let got: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "line 8: services.web.timeouts: key \"request\" given twice (first on line 6)",
                "line 9: (top level): key \"admin\" given twice (first on line 1)",
            ]
        );
        let json = "{\"services\": {\"a\": {\"endpoints\": []}, \"a\": {}}}";
        let got: Vec<String> = problems(json).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["line 1: services: key \"a\" given twice (first on line 1)"]
        );
        // The same key in two mappings, and `<<` twice, are no duplicates.
        let text = "services:\n  a: &a\n    endpoints: [{ addr: 127.0.0.1:1 }]\n  b:\n    <<: *a\n    <<: *a\n    endpoints: [{ addr: 127.0.0.1:2 }]\n";
        assert_eq!(problems(text), []);

        let two = "admin: 127.0.0.1:4191\n---\nadmin: 127.0.0.1:4192\n";
        let got: Vec<String> = problems(two).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["line 2: (document): a config is one YAML document; found 2"]
        );
    }

    /// `check-config` tells a control config from a proxy config by the
    /// keys only one of them has, even in a file with errors, so that the
    /// real problem is named.
    #[test]
    fn control_configs_are_told_by_their_keys_even_when_broken() {
        assert!(field_names::<ProxyConfig>().contains(&"services"));
        assert!(field_names::<ControlConfig>().contains(&"source"));
        assert!(is_control_config(
            "source: { file: ./registry }
"
        ));
        assert!(!is_control_config(GOOD));
        assert!(!is_control_config("{}"));
        assert!(!is_control_config(""));

        let twice = "\
listen: 127.0.0.1:4180
source:
  file: ./registry
watcher:
  source: direct
  source: direct
";
        assert!(is_control_config(twice));
        let got = load_control(twice, "c.yaml")
            .map(drop)
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err("c.yaml: line 6: watcher: key \"source\" given twice (first on line 5)".into())
        );

        let misspelled = "listen: 127.0.0.1:4180\nsourse:\n  file: ./registry\n";
        assert!(is_control_config(misspelled));
        let p = load_control(misspelled, "c.yaml")
            .map(drop)
            .unwrap_err()
            .problems;
        assert_eq!((p[0].path.as_str(), p[0].line), ("sourse", Some(2)));
        assert!(
            p[0].message.contains("expected one of listen, source"),
            "{p:?}"
        );

        // Keys before a syntax error still count; JSON is read the same.
        assert!(is_control_config("watcher: { source: direct }\nstore: [\n"));
        assert!(is_control_config(
            "{\"listen\": \"127.0.0.1:1\", \"sourc\": {}}"
        ));
        assert!(!is_control_config("admin: 127.0.0.1:1\nservices: [\n"));
    }

    fn control_problems(text: &str) -> Vec<String> {
        match load_control(text, "c.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    /// A control config's mistakes are refused with the key and line,
    /// rather than ignored (a misspelled watcher key) or taken to mean
    /// "never" (an empty Meta key, a 0s long-poll).
    #[test]
    fn control_config_mistakes_are_named_with_their_lines() {
        let base =
            "listen: 127.0.0.1:4180\nsource:\n  consul: { addr: \"http://127.0.0.1:8500\" }\n";
        let with = |extra: &str| control_problems(&format!("{base}{extra}\n"));
        let one = |extra: &str| {
            let got = with(extra);
            assert_eq!(got.len(), 1, "{extra}: {got:?}");
            got[0].clone()
        };
        let typo = one("watcher: { source: direct, promethues: \"http://127.0.0.1:9090\" }");
        assert!(
            typo.starts_with("line 4: watcher.promethues: unknown field `promethues`"),
            "{typo}"
        );
        let extra = one("watcher:\n  prometheus: \"http://127.0.0.1:9090\"\n  scrape_timeout: 5s");
        assert!(
            extra.starts_with("line 6: watcher.scrape_timeout: unknown field"),
            "{extra}"
        );
        let kind = one("watcher: { source: prometheus }");
        assert!(
            kind.starts_with("line 4: watcher.source: unknown variant"),
            "{kind}"
        );
        assert_eq!(
            one("watcher:\n  source: direct\n  prometheus: \"http://127.0.0.1:9090\""),
            "line 6: watcher.prometheus: give either source: direct or prometheus: URL, not both"
        );
        assert_eq!(
            one("watcher: {}"),
            "line 4: watcher: expected { source: direct } or { prometheus: URL }"
        );
        assert_eq!(
            one("watcher: { prometheus: \"https://prom\" }"),
            "line 4: watcher.prometheus: an http:// URL, e.g. http://127.0.0.1:9090"
        );
        assert_eq!(one("max_wait: 0s"), "line 4: max_wait: must be more than 0");
        assert_eq!(
            one("max_body_bytes: 0"),
            "line 4: max_body_bytes: must be 1 or more"
        );
        assert_eq!(
            one("subset_key: \"\""),
            "line 4: subset_key: \"\" is not a Consul Meta key: 1 to 128 letters, digits, '_' or '-'"
        );
        assert!(one("zone_key: \"az \"").starts_with("line 4: zone_key: \"az \" is not"));
        let text = base.replace(" }", ",\n    intentions: { trust_domain: \"\" } }");
        assert_eq!(
            control_problems(&text),
            ["line 4: source.consul.intentions.trust_domain: \"\" is not a SPIFFE trust domain: \
              lower-case letters, digits, '.', '-' and '_', e.g. example.org"]
        );
        assert_eq!(
            control_problems("source: { file: ./registry }\nstore: consul\n"),
            [
                "line 2: store: consul needs a consul source; with a file source, policies are \
              kept in policy_file (store: file, the default)"
            ]
        );

        // Valid input reads as before.
        let direct = load_control(&format!("{base}watcher: {{ source: direct }}\n"), "c.yaml");
        assert_eq!(
            direct.map(|c| c.watcher_source()),
            Ok(Ok(WatcherSource::Direct))
        );
        let prom = format!("{base}watcher: {{ prometheus: \"http://127.0.0.1:9090/\" }}\n");
        let prom = load_control(&prom, "c.yaml").map(|c| c.watcher_source());
        let url = "http://127.0.0.1:9090".to_owned();
        assert_eq!(prom, Ok(Ok(WatcherSource::Prometheus(url))));
        let text = base.replace(
            " }",
            ",\n    intentions: { trust_domain: 11aa-22bb.consul } }",
        );
        assert_eq!(
            control_problems(&format!("{text}store: consul\nmax_wait: 1s\n")),
            [""; 0]
        );
    }

    /// A service is reached by `Host`, looked up in lower case: a name no
    /// `Host` can reach is refused where it is written, with its line.
    #[test]
    fn service_names_that_no_host_reaches_are_refused() {
        let text = "\
listeners:
  - bind: 127.0.0.1:4140
  - bind: 127.0.0.1:9001
    service: Orders
services:
  Orders:
    endpoints: [{ addr: 127.0.0.1:1 }]
  \"my orders\":
    endpoints: [{ addr: 127.0.0.1:2 }]
  \"\":
    endpoints: [{ addr: 127.0.0.1:3 }]
  orders-v2.internal_1:
    endpoints: [{ addr: 127.0.0.1:4 }]
";
        let got: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "line 4: listeners[1].service: \"Orders\": clients' Host is matched in lower case \
                 (host names are case-insensitive), so name it \"orders\"",
                "line 6: services.Orders: \"Orders\": clients' Host is matched in lower case \
                 (host names are case-insensitive), so name it \"orders\"",
                "line 8: services.my orders: \"my orders\" is not a host name: a service name is \
                 lower-case letters, digits, '-', '_' and '.', as clients send it in Host",
                "line 10: services.\"\": a service name must not be empty",
            ]
        );
        // With a control plane, the listener's name is still this file's.
        let text =
            "control: http://127.0.0.1:4180\nlisteners:\n  - bind: 127.0.0.1:1\n    service: Web\n";
        let p = problems(text);
        assert_eq!(
            (p[0].path.as_str(), p[0].line),
            ("listeners[0].service", Some(4))
        );

        // The file registry and the Consul source's list too.
        let registry = "web:\n  endpoints: [{ addr: 127.0.0.1:1 }]\nWeb:\n  endpoints: [{ addr: 127.0.0.1:2 }]\n";
        let p = load_services(registry, "r.yaml").unwrap_err().problems;
        assert_eq!((p[0].path.as_str(), p[0].line), ("Web", Some(3)), "{p:?}");
        // A registry entry's upstream server name is checked there too:
        // no proxy could connect with it.
        let registry = "other:\n  tls: { server_name: \"other internal\" }\n  endpoints: [{ addr: 127.0.0.1:9 }]\n";
        let p = load_services(registry, "r.yaml").unwrap_err().problems;
        assert_eq!(
            (p[0].path.as_str(), p[0].line),
            ("other.tls.server_name", Some(2)),
            "{p:?}"
        );
        let open = "source:\n  file: /tmp/r\nproxy_admin_token_env: ALMOND_ADMIN_TOKEN\n";
        let got = control_problems(open);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("proxy_admin_token_env"), "{got:?}");
        let closed = format!("{open}proxy_token_env: ALMOND_PROXY_TOKEN\n");
        assert!(control_problems(&closed).is_empty());
        let control = "source:\n  consul:\n    services: [web, Orders]\n";
        let got = control_problems(control);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("line 3: source.consul.services[1]: \"Orders\""),
            "{got:?}"
        );
    }

    #[test]
    fn an_inbound_listener_names_its_service() {
        let text = "listeners:\n  - { bind: 127.0.0.1:4143, direction: inbound }\nservices:\n  a: { endpoints: [{ addr: \"127.0.0.1:1\" }] }\n";
        let err = problems(text);
        assert!(
            err.iter()
                .any(|p| p.path == "listeners[0].service" && p.line == Some(2)),
            "{err:?}"
        );
    }

    #[test]
    fn empty_endpoints_are_refused() {
        let text = "services:\n  a:\n    endpoints: []\n";
        let p = problems(text);
        assert_eq!(p[0].path, "services.a.endpoints");
        assert_eq!(p[0].line, Some(3));
    }

    #[test]
    fn listener_for_a_missing_service_is_refused() {
        let text = "listeners:\n  - bind: 127.0.0.1:1\n    service: nope\n";
        let p = problems(text);
        assert_eq!(p[0].path, "listeners[0].service");
        assert_eq!(p[0].line, Some(3));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let p = problems("services: [\n  a: b\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].line.is_some(), "{:?}", p[0]);
    }

    /// Limits a file may reach but the YAML parser's defaults refused:
    /// anchors shared by many services (an alias-to-anchor ratio over 10),
    /// and more than 250,000 nodes.
    #[test]
    fn anchors_shared_by_many_services_and_large_files_load() {
        let mut text = String::from("services:\n");
        for i in 0..40 {
            let anchors = if i == 0 {
                "timeouts: &t { request: 5s }\n    retries: &r { attempts: 1 }\n    lb: &lb round_robin"
            } else {
                "timeouts: *t\n    retries: *r\n    lb: *lb"
            };
            text.push_str(&format!(
                "  s{i}:\n    {anchors}\n    endpoints: [{{ addr: 127.0.0.1:{} }}]\n",
                1000 + i
            ));
        }
        let cfg = load_proxy(&text, "t.yaml").expect("anchors used 117 times");
        assert_eq!(cfg.services.len(), 40);
        assert_eq!(cfg.services["s39"].retries.attempts, 1);

        let mut big = String::from("services:\n");
        for i in 0..70_000 {
            big.push_str(&format!(
                "  s{i}: {{ endpoints: [{{ addr: 127.0.0.1:{} }}] }}\n",
                1 + i % 60_000
            ));
        }
        let cfg = load_proxy(&big, "t.yaml").expect("280,000 nodes");
        assert_eq!(cfg.services.len(), 70_000);
    }

    /// Values that would make the proxy fail to start (a runtime of more
    /// threads than any machine, a queue too large to allocate), an
    /// endpoint no connection can reach, and an empty variable name are
    /// refused, each naming its key.
    #[test]
    fn values_the_proxy_cannot_start_with_are_refused() {
        let paths =
            |text: &str| -> Vec<String> { problems(text).into_iter().map(|p| p.path).collect() };
        assert_eq!(paths("workers: 18446744073709551615\n"), ["workers"]);
        assert!(paths("workers: 1024\n").is_empty());
        assert_eq!(
            paths("access_log: { queue: 2305843009213693952 }\n"),
            ["access_log.queue"]
        );
        assert_eq!(
            paths("tracing: { otlp: { endpoint: \"http://127.0.0.1:4318/v1/traces\", queue: 1000000000000 } }\n"),
            ["tracing.otlp.queue"]
        );
        for addr in [
            "127.0.0.1:0",
            "0.0.0.0:8080",
            "224.0.0.1:8080",
            "\"[::]:8080\"",
        ] {
            let text = format!("services:\n  a:\n    endpoints: [{{ addr: {addr} }}]\n");
            assert_eq!(paths(&text), ["services.a.endpoints[0].addr"], "{addr}");
        }
        assert_eq!(
            paths("control: http://127.0.0.1:4180\nadmin_token_env: \"\"\n"),
            ["admin_token_env"]
        );
        assert_eq!(
            paths("control: http://127.0.0.1:4180\nservices:\n  legacy: { endpoints: [] }\n"),
            ["services"]
        );
        let got = control_problems("source:\n  file: /tmp/r\ntoken_env: \" \"\n");
        assert!(got.iter().any(|p| p.contains("token_env")), "{got:?}");
    }

    /// A subset named `guard` would share the series of the guards'
    /// answers (and hide from the alerts that leave them out).
    #[test]
    fn the_guard_subset_name_is_reserved() {
        let text =
            "services:\n  a:\n    endpoints: [{ addr: \"127.0.0.1:8080\", subset: guard }]\n";
        let got = problems(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].path, "services.a.endpoints[0].subset");
        assert!(got[0].message.contains("reserved"), "{got:?}");
        assert!(problems(&text.replace("guard", "v2")).is_empty());
    }

    #[test]
    fn defaults_are_filled() {
        let cfg = load_proxy("{}", "t").expect("empty config is valid");
        assert_eq!(cfg.admin.port(), 4191);
        assert_eq!(cfg.listeners[0].bind.port(), 4140);
    }
}
