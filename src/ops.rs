//! Operator commands: `shift`, `promote`, `rollback`, `status`, `tap`;
//! thin clients of the control plane's API. Exit 0 done, 1 refused or failed
//! (one line on stderr), 2 usage (clap).

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where and how to reach the control plane.
#[derive(Clone)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:4180` or `https://...`.
    pub control: String,
    /// CAs for an `https://` control plane (default: the system's roots).
    pub control_ca: Option<std::path::PathBuf>,
    /// Bearer token for mutations.
    pub token: Option<String>,
    /// Print JSON instead of text.
    pub json: bool,
}

impl Target {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.call_within(method, path, body, Duration::from_secs(10))
            .await
    }

    /// [`Target::call`], waiting at most `limit` for the answer.
    async fn call_within(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
        limit: Duration,
    ) -> anyhow::Result<Value> {
        let client: Client<_, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(self.connector()?);
        let url = format!("{}{path}", self.control.trim_end_matches('/'));
        let mut req = hyper::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Ok(user) = std::env::var("USER") {
            req = req.header("x-almond-user", user);
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))?;
        let resp = tokio::time::timeout(limit, client.request(req))
            .await
            .map_err(|_| {
                anyhow!(
                    "control plane at {} did not answer in {} s",
                    self.control,
                    limit.as_secs()
                )
            })?
            .with_context(|| format!("cannot reach the control plane at {}", self.control))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(self.refused(status, &body).into());
        }
        serde_json::from_slice(&body).context("the control plane sent something that is not JSON")
    }

    /// GET `path` and return the response once its head is in, its body
    /// still streaming; an answer other than 200 is an error with its text.
    async fn open(&self, path: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let client: Client<_, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(self.connector()?);
        let url = format!("{}{path}", self.control.trim_end_matches('/'));
        let mut req = hyper::Request::get(&url);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| anyhow!("control plane at {} did not answer in 10 s", self.control))?
            .with_context(|| format!("cannot reach the control plane at {}", self.control))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(self.refused(status, &body).into());
        }
        Ok(resp)
    }

    /// A refusal (`status`, with `body` as its reason) from this target.
    fn refused(&self, status: http::StatusCode, body: &[u8]) -> Refused {
        Refused {
            status,
            text: String::from_utf8_lossy(body).trim().to_owned(),
            control: self.control.clone(),
        }
    }

    /// HTTP, or HTTPS trusting `control_ca` (else the system's roots).
    fn connector(
        &self,
    ) -> anyhow::Result<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    > {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match &self.control_ca {
            Some(path) => {
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("--control-ca {}", path.display()))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .with_context(|| format!("--control-ca {}", path.display()))?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build())
    }

    /// GET a path and return its JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(http::Method::GET, path, None).await
    }

    fn print(&self, value: &Value, text: impl FnOnce() -> String) {
        if self.json {
            print_line(&value.to_string());
        } else {
            print_line(&text());
        }
    }
}

/// Writes `line` to standard output. A reader that went away (`almond tap
/// | head -1`) ends the command quietly, exit 0, as Unix tools do (Rust
/// ignores `SIGPIPE`: `println!` would panic).
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// An answer of the control plane other than 2xx: its status and its
/// one-line reason (shown as `REASON (STATUS)`).
#[derive(Debug)]
struct Refused {
    status: http::StatusCode,
    text: String,
    /// The `--control` URL, named when the answer gives no reason.
    control: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An almond control plane always says why; an empty answer is
        // something else at that address (a proxy, a wrong port or path).
        if self.text.is_empty() {
            return write!(
                f,
                "{} answered {} with no reason: is it an almond control plane (--control, ALMOND_CONTROL)?",
                self.control, self.status
            );
        }
        write!(f, "{} ({})", self.text, self.status)
    }
}

impl std::error::Error for Refused {}

/// Parses one `v1=90` (a clap value parser: a bad pair is a usage error).
pub fn parse_pair(p: &str) -> Result<(String, u32), String> {
    let (k, v) = p
        .split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{p:?} is not SUBSET=WEIGHT"))?;
    let v: u32 = v
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("weight {v:?} of {k} is not a whole number"))?;
    Ok((k.to_owned(), v))
}

/// Checks a `--control` URL: `http://HOST:PORT` or `https://HOST:PORT`
/// (a clap value parser).
pub fn parse_control_url(url: &str) -> Result<String, String> {
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
            Ok(url.to_owned())
        }
        _ => Err(format!("{url:?} is not a URL like http://127.0.0.1:4180")),
    }
}

/// Checks a `--sticky-header` name (a clap value parser).
pub fn parse_sticky_header(name: &str) -> Result<String, String> {
    almond_config::check_sticky_header(name)?;
    Ok(name.to_owned())
}

/// Collects pairs into weights; a subset named twice is a usage error.
pub fn weights(pairs: Vec<(String, u32)>) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("subset {k} is given twice"));
        }
    }
    Ok(out)
}

/// `almond shift SERVICE SUBSET=WEIGHT...`
/// `sticky`: `Some(name)` sets the sticky header, `Some("")` turns it
/// off, `None` keeps the one in force.
pub async fn shift(
    t: &Target,
    service: &str,
    weights: BTreeMap<String, u32>,
    allow_empty: Vec<String>,
    sticky: Option<String>,
    action: &str,
) -> anyhow::Result<()> {
    let mut body = json!({ "weights": weights, "allow_empty": allow_empty, "action": action });
    if let Some(header) = sticky {
        body["sticky_header"] = json!(header);
    }
    let path = format!("/v1/services/{service}/split");
    let out = t.call(http::Method::PUT, &path, Some(body)).await?;
    t.print(&out, || {
        let sticky = match out["policy"]["sticky_header"].as_str() {
            Some(h) => format!(", sticky on {h}"),
            None => String::new(),
        };
        format!(
            "{service}: split is now {}{sticky} (version {})",
            show(&out["policy"]["split"]),
            out["policy"]["version"]
        )
    });
    Ok(())
}

/// `almond promote SERVICE SUBSET`: 100 % to SUBSET.
pub async fn promote(t: &Target, service: &str, subset: &str) -> anyhow::Result<()> {
    let current = t
        .call(http::Method::GET, &format!("/v1/services/{service}"), None)
        .await?;
    let mut weights: BTreeMap<String, u32> = BTreeMap::new();
    for e in current["service"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(s) = e["subset"].as_str() {
            weights.insert(s.to_owned(), 0);
        }
    }
    if let Some(split) = current["policy"]["split"].as_object() {
        for k in split.keys() {
            weights.insert(k.clone(), 0);
        }
    }
    weights.insert(subset.to_owned(), 100);
    shift(t, service, weights, Vec::new(), None, "promote").await
}

/// `almond rollback SERVICE`
pub async fn rollback(t: &Target, service: &str) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/rollback");
    let out = t.call(http::Method::POST, &path, Some(json!({}))).await?;
    t.print(&out, || {
        let done = match out["unchanged"].as_bool() {
            Some(true) => "already rolled back, nothing changed",
            _ => "rolled back",
        };
        format!(
            "{service}: {done}; split is now {}",
            show(&out["policy"]["split"])
        )
    });
    Ok(())
}

/// `almond events SERVICE [--follow]`: one line per rollout or guard event (JSON
/// lines with `-o json`); with `follow`, polls for new ones every second.
pub async fn events(t: &Target, service: &str, follow: bool) -> anyhow::Result<()> {
    let mut since = 0u64;
    loop {
        let path = format!("/v1/services/{service}/events?since={since}");
        let out = t.get(&path).await?;
        let events = out["events"].as_array().map_or(&[][..], Vec::as_slice);
        if events.is_empty() && since == 0 && !follow && !t.json {
            print_line(&format!("no events for {service}"));
        }
        for e in events {
            since = since.max(e["seq"].as_u64().unwrap_or(since));
            t.print(e, || {
                let detail = e["detail"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                let by = e["by"]
                    .as_str()
                    .map(|b| format!(" (by {b})"))
                    .unwrap_or_default();
                let kind = e["kind"].as_str().unwrap_or("?");
                match e["percent"].as_u64() {
                    Some(percent) => format!(
                        "#{} {kind} {} at {percent}%{detail}{by}",
                        e["seq"],
                        e["canary"].as_str().unwrap_or("?"),
                    ),
                    None => format!("#{} {kind}{detail}{by}", e["seq"]),
                }
            });
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `almond tap SERVICE`: prints the live summaries the control plane
/// merges from its proxies, one per line (JSON with `-o json`), until the
/// stream ends, Ctrl-C, or `count` events.
pub async fn tap(
    t: &Target,
    service: &str,
    filter: &[(&str, String)],
    count: Option<u64>,
) -> anyhow::Result<()> {
    let query: Vec<String> = filter
        .iter()
        .map(|(k, v)| format!("{k}={}", almond_net::percent_encode(v)))
        .collect();
    let path = format!(
        "/v1/services/{}/tap?{}",
        almond_net::percent_encode(service),
        query.join("&")
    );
    let resp = t.open(&path).await?;
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue; // heartbeats
            };
            if let Some(why) = event["error"].as_str() {
                let proxy = event["proxy"].as_str().unwrap_or("?");
                eprintln!("almond tap: proxy {proxy}: {why}");
                continue;
            }
            t.print(&event, || tap_line(&event));
            seen += 1;
            if count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
    }
    bail!("the tap stream ended: no proxy's tap stream is open")
}

/// One tap event as a line of text.
fn tap_line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
    let time_ms = e["time_ms"].as_u64().unwrap_or(0);
    let (secs, ms) = (time_ms / 1000, time_ms % 1000);
    let clock = format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    );
    let direction = match e["direction"].as_str() {
        Some("outbound") => "out",
        Some("inbound") => "in",
        _ => "-",
    };
    let mut line = format!(
        "{clock} {} {direction} {} {} {} {} {} {}ms {}",
        s("proxy"),
        s("method"),
        s("path"),
        e["status"],
        s("subset"),
        s("endpoint"),
        e["latency_ms"],
        s("request_id"),
    );
    if let Some(headers) = e["headers"].as_object() {
        for (name, value) in headers {
            line.push_str(&format!("\n    {name}: {}", value.as_str().unwrap_or("")));
        }
    }
    line
}

/// `almond authz SERVICE allow|deny IDENTITY`: changes who may call the
/// service; prints the allow-list in force.
pub async fn authz(t: &Target, service: &str, allow: bool, identity: &str) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/authz");
    let action = if allow { "allow" } else { "deny" };
    let body = json!({ "action": action, "identity": identity });
    let out = t.call(http::Method::PUT, &path, Some(body)).await?;
    t.print(&out, || {
        let list = out["policy"]["authz"]["allow"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if list.is_empty() {
            format!("{service}: nobody may call it")
        } else {
            format!("{service}: may be called by {list}")
        }
    });
    Ok(())
}

/// `almond route list SERVICE`: the rules in force, one line each.
pub async fn routes_list(t: &Target, service: &str) -> anyhow::Result<()> {
    let out = t.get(&format!("/v1/services/{service}/routes")).await?;
    t.print(&out, || describe_routes(service, &out["rules"]));
    Ok(())
}

/// `almond route set SERVICE FILE`: replaces the rules with FILE's
/// (checked here first, with lines; then by the control plane).
pub async fn routes_set(t: &Target, service: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading rules from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let rules = almond_config::load_rules(&text, &file.display().to_string())
        .map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
    let path = format!("/v1/services/{service}/routes");
    let out = (t.call(http::Method::PUT, &path, Some(json!({ "rules": rules })))).await?;
    t.print(&out, || describe_routes(service, &out["policy"]["routes"]));
    Ok(())
}

/// `almond route clear SERVICE`: removes the rules set through the
/// control plane.
pub async fn routes_clear(t: &Target, service: &str) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/routes");
    let out = t.call(http::Method::DELETE, &path, None).await?;
    t.print(&out, || format!("{service}: route rules cleared"));
    Ok(())
}

/// `almond mirror list SERVICE`.
pub async fn mirror_list(t: &Target, service: &str) -> anyhow::Result<()> {
    let out = t.get(&format!("/v1/services/{service}/mirror")).await?;
    t.print(&out, || describe_mirror(service, &out["mirror"]));
    Ok(())
}

/// `almond mirror set SERVICE ...`: `body` is the API's.
pub async fn mirror_set(t: &Target, service: &str, body: Value) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/mirror");
    let out = t.call(http::Method::PUT, &path, Some(body)).await?;
    t.print(&out, || describe_mirror(service, &out["policy"]["mirror"]));
    Ok(())
}

/// `almond mirror clear SERVICE`.
pub async fn mirror_clear(t: &Target, service: &str) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/mirror");
    let out = t.call(http::Method::DELETE, &path, None).await?;
    t.print(&out, || format!("{service}: mirroring off"));
    Ok(())
}

/// `orders: 10% of requests copied to subset v2 (at most 100 in flight)`.
fn describe_mirror(service: &str, m: &Value) -> String {
    if m.is_null() {
        return format!("{service}: no mirroring");
    }
    let to = match (m["subset"].as_str(), m["service"].as_str()) {
        (Some(s), _) => format!("subset {s}"),
        (_, Some(s)) => format!("service {s}"),
        _ => "?".to_owned(),
    };
    format!(
        "{service}: {}% of requests copied to {to} (at most {} in flight)",
        m["percent"].as_f64().unwrap_or(0.0),
        m["max_in_flight"]
    )
}

/// Rules as lines: `1. path_prefix=/api method=GET -> subset v2`.
fn describe_routes(service: &str, rules: &Value) -> String {
    let Some(rules) = rules.as_array().filter(|r| !r.is_empty()) else {
        return format!("{service}: no route rules (every request to the split)");
    };
    let mut out = format!("{service}: {} route rule(s), first match wins", rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let mut conds = Vec::new();
        if let Some(m) = rule["match"].as_object() {
            for (k, v) in m {
                match v {
                    Value::String(s) => conds.push(format!("{k}={s}")),
                    other => conds.push(format!("{k}={other}")),
                }
            }
        }
        if conds.is_empty() {
            conds.push("(every request)".to_owned());
        }
        let to = match (
            rule["to"]["subset"].as_str(),
            rule["to"]["service"].as_str(),
        ) {
            (Some(s), _) => format!("subset {s}"),
            (_, Some(s)) => format!("service {s}"),
            _ => "?".to_owned(),
        };
        out.push_str(&format!("\n  {}. {} -> {to}", i + 1, conds.join(" ")));
    }
    out
}

/// `almond status [SERVICE]`: per service and subset, the weight,
/// endpoints healthy/total, and live rps / success rate / p99 measured by
/// the control plane over `window` (four services at a time; `None`: the
/// control plane's default for its watcher source).
pub async fn status(
    t: &Target,
    service: Option<&str>,
    window: Option<Duration>,
) -> anyhow::Result<()> {
    let names: Vec<String> = match service {
        Some(s) => vec![s.to_owned()],
        None => {
            let all = t.call(http::Method::GET, "/v1/services", None).await?;
            all["services"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        }
    };
    let views = views(t, &names, window).await?;
    let out = Value::Array(views.clone());
    t.print(&out, || {
        if views.is_empty() {
            return format!(
                "no services: the control plane at {} serves none",
                t.control
            );
        }
        views
            .iter()
            .map(table)
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_owned()
    });
    Ok(())
}

/// `GET .../live` calls in flight at once: the control plane runs at most
/// this many measurements (`LIVE_AT_ONCE` in its API) and refuses more
/// with 429.
const LIVE_AT_ONCE: usize = 4;

/// `GET /v1/services/{name}` for each name, each with a `live` field: its
/// `GET .../live` answer. The live windows run [`LIVE_AT_ONCE`] at a time.
/// A service whose measurement the control plane refused as busy (429:
/// another client's measurements fill its slots) gets `live:
/// {"unavailable": REASON}` and is shown without live figures; any other
/// failed call fails the whole (exit 1, with its reason).
pub async fn views(
    t: &Target,
    names: &[String],
    window: Option<Duration>,
) -> anyhow::Result<Vec<Value>> {
    // The control plane answers after the window (and its scrapes); its
    // own default is 1 s when it waits (Prometheus is asked at once).
    let limit = window.unwrap_or(Duration::from_secs(1)) + Duration::from_secs(10);
    let calls = names.iter().enumerate().map(|(i, name)| {
        let path = match window {
            Some(w) => format!("/v1/services/{name}/live?window={}ms", w.as_millis()),
            None => format!("/v1/services/{name}/live"),
        };
        async move {
            let answer = t.call_within(http::Method::GET, &path, None, limit).await;
            (i, answer)
        }
    });
    let live = async {
        let mut answers = Vec::new();
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(LIVE_AT_ONCE);
        while let Some((i, answer)) = calls.next().await {
            let answer = match answer {
                Err(e) => match e.downcast_ref::<Refused>() {
                    Some(r) if r.status == http::StatusCode::TOO_MANY_REQUESTS => {
                        json!({ "unavailable": r.text })
                    }
                    _ => return Err(e),
                },
                Ok(v) => v,
            };
            answers.push((i, answer));
        }
        anyhow::Ok(answers)
    };
    let read = async {
        let mut views = Vec::new();
        for name in names {
            views.push(t.get(&format!("/v1/services/{name}")).await?);
        }
        anyhow::Ok(views)
    };
    let (views, live) = tokio::join!(read, live);
    let (mut views, live) = (views?, live?);
    for (i, answer) in live {
        if let Some(v) = views.get_mut(i) {
            v["live"] = answer;
        }
    }
    Ok(views)
}

/// One service's status table.
pub fn table(v: &Value) -> String {
    let name = v["name"].as_str().unwrap_or("?");
    let split = &v["service"]["split"];
    let mut s = format!(
        "{name} (index {}, split version {}",
        v["index"], v["policy"]["version"]
    );
    if let Some(h) = split["sticky_header"].as_str() {
        s.push_str(&format!(", sticky on {h}"));
    }
    s.push_str(")\n");
    let live = &v["live"]["subsets"];
    let mut subsets: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for map in [&v["subsets"], split, live] {
        subsets.extend(
            map.as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.clone()),
        );
    }
    subsets.remove("sticky_header");
    s.push_str(&format!(
        "  {:<12} {:>7} {:>10} {:>9} {:>8} {:>9}\n",
        "SUBSET", "WEIGHT", "ENDPOINTS", "RPS", "SUCCESS", "P99"
    ));
    for subset in subsets {
        let weight = match split.get(&subset) {
            Some(w) => format!("{w}%"),
            None if split.is_null() => "by weight".into(),
            None => "0%".into(),
        };
        let counts = &v["subsets"][&subset];
        let endpoints = format!(
            "{}/{}",
            counts["healthy"].as_u64().unwrap_or(0),
            counts["total"].as_u64().unwrap_or(0)
        );
        let l = &live[&subset];
        let dash = || "-".to_owned();
        let rps = l["rps"]
            .as_f64()
            .filter(|_| l["requests"].as_u64() > Some(0))
            .map_or_else(dash, |r| format!("{r:.1}"));
        let success = l["success_rate"]
            .as_f64()
            .map_or_else(dash, |r| format!("{:.2}%", r * 100.0));
        let p99 = l["p99_ms"]
            .as_f64()
            .map_or_else(dash, |p| format!("{p:.1}ms"));
        s.push_str(&format!(
            "  {subset:<12} {weight:>7} {endpoints:>10} {rps:>9} {success:>8} {p99:>9}\n"
        ));
    }
    if let Some(why) = v["live"]["unavailable"].as_str() {
        s.push_str(&format!("  (no live figures: {why})\n"));
    } else if v["live"]["proxies"].as_u64() == Some(0) {
        s.push_str("  (no proxy has polled the control plane lately: no live figures)\n");
    }
    for guard in v["service"]["guards"].as_array().into_iter().flatten() {
        s.push_str(&format!("  guard: {}\n", guard_line(guard)));
    }
    s
}

/// One guard in words: `POST /api/giveaway* denied 503`.
pub fn guard_line(g: &Value) -> String {
    let m = &g["match"];
    let method = m["method"].as_str().unwrap_or("any method");
    let path = match (m["path_prefix"].as_str(), m["path_exact"].as_str()) {
        (Some(p), _) => format!("{p}*"),
        (None, Some(p)) => p.to_owned(),
        (None, None) => "any path".to_owned(),
    };
    let what = if g["deny"].is_object() {
        format!("denied {}", g["deny"]["status"].as_u64().unwrap_or(503))
    } else {
        let l = &g["limit"];
        let by = match l["by"].as_str() {
            Some("none") | None => String::new(),
            Some(by) => format!(" per {by}"),
        };
        let scope = match (l["scope"].as_str(), l["shared_by"].as_u64()) {
            (Some("fleet"), Some(n)) => {
                format!(
                    " per proxy, burst {} (fleet-wide, shared by {n} proxies)",
                    l["burst"]
                )
            }
            (Some("fleet"), None) => " fleet-wide".to_owned(),
            _ => String::new(),
        };
        format!(
            "limited to {}{by}{scope}",
            l["rate"].as_str().unwrap_or("?")
        )
    };
    format!("{method} {path} {what}")
}

/// What `almond block`, `almond limit` and `almond unblock` send.
pub struct GuardChange {
    /// The path prefix.
    pub path: String,
    /// Only this method (any when `None`).
    pub method: Option<String>,
    /// `deny` (block), `limit`, or `None` to remove (unblock).
    pub action: Option<Value>,
}

/// `almond block|limit|unblock SERVICE --path P`: sets or removes a guard
/// through the control plane; prints the guards in force.
pub async fn guard(t: &Target, service: &str, change: GuardChange) -> anyhow::Result<()> {
    let path = format!(
        "/v1/services/{}/guards",
        almond_net::percent_encode(service)
    );
    let mut when = json!({ "path_prefix": change.path });
    if let Some(method) = change.method {
        when["method"] = Value::String(method.to_ascii_uppercase());
    }
    let mut body = json!({ "match": when });
    match change.action {
        Some(action) => {
            let key = if action.get("rate").is_some() {
                "limit"
            } else {
                "deny"
            };
            body[key] = action;
        }
        None => body["remove"] = Value::Bool(true),
    }
    let out = t.call(http::Method::PUT, &path, Some(body)).await?;
    t.print(&out, || {
        let guards = out["policy"]["guards"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut text = format!(
            "{service}: {} guard(s) in force (index {}); proxies apply it within a second",
            guards.len(),
            out["index"]
        );
        for g in &guards {
            text.push_str(&format!("\n  {}", guard_line(g)));
        }
        text
    });
    Ok(())
}

fn show(split: &Value) -> String {
    match split.as_object() {
        Some(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => "all subsets by endpoint weight".into(),
    }
}

/// What `almond rollout` was asked to do.
pub enum RolloutAction {
    /// Start one.
    Start(Value),
    /// Pass the manual gate.
    Approve,
    /// Stop and roll back.
    Abort,
    /// Show it.
    Show,
}

/// `almond rollout SERVICE ...`
pub async fn rollout(t: &Target, service: &str, action: RolloutAction) -> anyhow::Result<()> {
    let path = format!("/v1/services/{service}/rollouts");
    let out = match action {
        RolloutAction::Start(spec) => {
            t.call(http::Method::POST, &path, Some(spec)).await?["policy"]["rollout"].clone()
        }
        RolloutAction::Approve => t
            .call(
                http::Method::POST,
                &format!("{path}/approve"),
                Some(json!({})),
            )
            .await?["policy"]["rollout"]
            .clone(),
        RolloutAction::Abort => {
            t.call(http::Method::DELETE, &path, Some(json!({}))).await?["policy"]["rollout"].clone()
        }
        RolloutAction::Show => t.call(http::Method::GET, &path, None).await?,
    };
    t.print(&out, || describe_rollout(service, &out));
    Ok(())
}

fn describe_rollout(service: &str, r: &Value) -> String {
    let steps: Vec<String> = r["spec"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{s}%"))
        .collect();
    let step = r["step"].as_u64().unwrap_or(0) as usize;
    let mut s = format!(
        "{service}: rollout of {} over {} is {} at step {}/{} ({})",
        r["spec"]["canary"].as_str().unwrap_or("?"),
        r["stable"].as_str().unwrap_or("?"),
        r["phase"].as_str().unwrap_or("?"),
        step + 1,
        steps.len(),
        steps.get(step).cloned().unwrap_or_default(),
    );
    if let Some(reason) = r["reason"].as_str() {
        s.push_str(&format!(": {reason}"));
    }
    // The record keeps the newest verdicts only; say how many went.
    let kept = r["history"].as_array().map_or(0, Vec::len) as u64;
    let dropped = r["verdicts"].as_u64().unwrap_or(0).saturating_sub(kept);
    if dropped > 0 {
        s.push_str(&format!("\n  ({dropped} earlier verdicts not kept)"));
    }
    for j in r["history"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n  {:>3}%  {:<12} canary {} req, stable {} req  {}",
            j["percent"],
            j["verdict"]["verdict"].as_str().unwrap_or("?"),
            j["canary_requests"],
            j["stable_requests"],
            j["verdict"]["reason"].as_str().unwrap_or(""),
        ));
    }
    s
}

/// Checks a guard's `--rate` (`10/s`, `100/min`, `5/h`) as the control
/// plane will, so a bad one is a usage error, not a refusal quoting the
/// request body (a clap value parser; the text goes on as written).
pub fn parse_guard_rate(text: &str) -> Result<String, String> {
    almond_config::Rate::parse(text).map(|_| text.to_owned())
}

/// Checks a guard's `--by` (`none`, `client_ip`, `header NAME`) as the
/// control plane will (a clap value parser).
pub fn parse_guard_by(text: &str) -> Result<String, String> {
    serde_json::from_value::<almond_config::LimitBy>(serde_json::Value::from(text))
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

/// Parses `1%`, `0.5%` or `0.01` into a fraction (a clap value parser).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let v = match text.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a rate like 1% or 0.01"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{text:?} is not between 0% and 100%"));
    }
    Ok(v)
}

/// Parses `30s`, `500ms`, `2m` into seconds (a clap value parser).
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s"))?;
    Ok(match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?} is not a duration like 30s, 500ms, 2m or 1h"
            ))
        }
    })
}

/// Parses a live window, 1ms to 1h (a clap value parser; the control
/// plane allows up to 10s when it scrapes the proxies itself).
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let seconds = parse_seconds(text)?;
    if !(0.001..=3600.0).contains(&seconds) {
        return Err(format!("{text:?} is not between 1ms and 1h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}
