//! Route rules: the `match` a request is tested against (path, method,
//! headers, cookies) and where a matching request goes (`to`). Shared by
//! static config and the control plane; issue 21's per-route policies
//! reuse [`Match`] and [`check_match`].
//!
//! ```yaml
//! routes:
//!   - match: { path_prefix: /api/v2, method: GET, headers: { x-beta: "1" } }
//!     to: { subset: v2 }
//!   - match: { path_prefix: /static }
//!     to: { service: assets }
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// The most rules a service may have.
pub const MAX_RULES: usize = 10_000;

/// What a request must look like; every condition given must hold, an
/// empty match matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The path starts with these whole segments (`/api` matches `/api`,
    /// `/api/` and `/api/x`, not `/apix`); the query is not part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The path (without the query) is exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// The request method, upper case (`GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Headers: an exact value, or `{ present: true | false }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderMatch>,
    /// Cookies (in the `Cookie` header) with exactly this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cookie: BTreeMap<String, String>,
}

/// One header condition: `name: value` or `name: { present: BOOL }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderMatch {
    /// One of the header's values is exactly this.
    Value(String),
    /// The header is there (`true`) or not (`false`), whatever its value.
    Present(bool),
}

impl Serialize for HeaderMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HeaderMatch::Value(v) => s.serialize_str(v),
            HeaderMatch::Present(p) => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("present", p)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for HeaderMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Presence {
            present: bool,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Value(String),
            Presence(Presence),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Value(v)) => Ok(HeaderMatch::Value(v)),
            Ok(Raw::Presence(p)) => Ok(HeaderMatch::Present(p.present)),
            Err(_) => Err(serde::de::Error::custom(
                "expected a header value (quote numbers: \"1\") or { present: true | false }",
            )),
        }
    }
}

/// Where a matching request goes: a subset of the same service, or another
/// service (whose own split then applies).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTo {
    /// A subset of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Another service, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// One route rule: the first rule whose `match` holds decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// The request's conditions.
    #[serde(rename = "match", default)]
    pub when: Match,
    /// Its destination.
    pub to: RouteTo,
}

/// Traffic mirroring: a share of a service's requests copied to a subset
/// or another service, responses discarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// A subset of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Another service, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Percent of requests copied (0 to 100, fractions allowed).
    pub percent: f64,
    /// Copies in flight at once; more are dropped and counted.
    #[serde(default = "default_mirror_in_flight")]
    pub max_in_flight: u32,
}

fn default_mirror_in_flight() -> u32 {
    100
}

/// Checks a mirror (`subsets`: `None` when subsets come and go); paths
/// are relative (`.mirror.percent`). A `service` is the caller's to check.
pub fn check_mirror(m: &Mirror, subsets: Option<&[&str]>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match (&m.subset, &m.service) {
        (Some(_), Some(_)) | (None, None) => {
            out.push((
                ".mirror".into(),
                "give subset or service, exactly one".into(),
            ));
        }
        (Some(subset), None) => {
            if subsets.is_some_and(|known| !known.contains(&subset.as_str())) {
                out.push((
                    ".mirror.subset".into(),
                    format!("no endpoint has subset {subset:?}"),
                ));
            }
        }
        (None, Some(service)) if service.is_empty() => {
            out.push((".mirror.service".into(), "must not be empty".into()));
        }
        (None, Some(_)) => {}
    }
    if !(0.0..=100.0).contains(&m.percent) {
        out.push((".mirror.percent".into(), "must be between 0 and 100".into()));
    }
    if m.max_in_flight == 0 {
        out.push((".mirror.max_in_flight".into(), "must be 1 or more".into()));
    }
    out
}

/// An HTTP token (header names, cookie names, methods).
fn is_token(s: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !s.is_empty() && s.bytes().all(token)
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{path:?} is not an absolute path like /api"));
    }
    if path.contains(['?', '#']) {
        return Err(format!("{path:?}: a path has no query or fragment"));
    }
    Ok(())
}

/// Checks one match; paths are relative (`.path_prefix`).
pub fn check_match(m: &Match) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if m.path_prefix.is_some() && m.path_exact.is_some() {
        out.push((
            ".path_exact".into(),
            "give path_prefix or path_exact, not both".into(),
        ));
    }
    for (key, path) in [
        ("path_prefix", &m.path_prefix),
        ("path_exact", &m.path_exact),
    ] {
        if let Some(Err(why)) = path.as_deref().map(check_path) {
            out.push((format!(".{key}"), why));
        }
    }
    if let Some(method) = &m.method {
        if !is_token(method) || method.bytes().any(|b| b.is_ascii_lowercase()) {
            out.push((
                ".method".into(),
                format!("{method:?} is not an upper-case HTTP method like GET"),
            ));
        }
    }
    for (name, value) in &m.headers {
        if !is_token(name) {
            out.push((
                format!(".headers.{name}"),
                format!("{name:?} is not an HTTP header name"),
            ));
        } else if name.to_ascii_lowercase().starts_with("x-almond-")
            || name.eq_ignore_ascii_case("host")
        {
            out.push((
                format!(".headers.{name}"),
                format!("{name:?} is set by almond or routes already; match an application header"),
            ));
        }
        if let HeaderMatch::Value(v) = value {
            if !v
                .bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
            {
                out.push((
                    format!(".headers.{name}"),
                    format!("{v:?} is not a header value (visible ASCII)"),
                ));
            }
        }
    }
    for (name, value) in &m.cookie {
        if !is_token(name) {
            out.push((
                format!(".cookie.{name}"),
                format!("{name:?} is not a cookie name"),
            ));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
        {
            out.push((
                format!(".cookie.{name}"),
                format!("{value:?} is not a cookie value (visible ASCII, no ; or ,)"),
            ));
        }
    }
    out
}

/// Checks a service's rules against its own subsets (`subsets`: `None`
/// when subsets come and go, as in snapshots). Paths are relative
/// (`.routes[0].to.subset`). Other services named by `to.service` are
/// checked by the caller, who knows them.
pub fn check_rules(rules: &[RouteRule], subsets: Option<&[&str]>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if rules.len() > MAX_RULES {
        out.push((".routes".into(), format!("at most {MAX_RULES} rules")));
    }
    for (i, rule) in rules.iter().enumerate() {
        for (path, why) in check_match(&rule.when) {
            out.push((format!(".routes[{i}].match{path}"), why));
        }
        let to = format!(".routes[{i}].to");
        match (&rule.to.subset, &rule.to.service) {
            (Some(_), Some(_)) | (None, None) => {
                out.push((to, "give subset or service, exactly one".into()));
            }
            (Some(subset), None) => {
                if subsets.is_some_and(|known| !known.contains(&subset.as_str())) {
                    out.push((
                        format!("{to}.subset"),
                        format!("no endpoint has subset {subset:?}"),
                    ));
                }
            }
            (None, Some(service)) => {
                if service.is_empty() {
                    out.push((format!("{to}.service"), "must not be empty".into()));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_conditions_read_as_value_or_presence() {
        let m: Match =
            serde_json::from_str(r#"{"headers": {"x-beta": "1", "x-debug": {"present": true}}}"#)
                .unwrap_or_default();
        assert_eq!(m.headers["x-beta"], HeaderMatch::Value("1".into()));
        assert_eq!(m.headers["x-debug"], HeaderMatch::Present(true));
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"headers":{"x-beta":"1","x-debug":{"present":true}}}"#
        );
    }

    #[test]
    fn bad_rules_are_named() {
        let rule = |json: &str| -> RouteRule { serde_json::from_str(json).unwrap_or_default() };
        let rules = vec![
            rule(r#"{"match": {"path_prefix": "api", "method": "get"}, "to": {"subset": "v9"}}"#),
            rule(r#"{"match": {"headers": {"x-almond-subset": "v1"}}, "to": {}}"#),
            rule(r#"{"match": {"cookie": {"c": "a;b"}}, "to": {"subset": "v1", "service": "b"}}"#),
        ];
        let got: Vec<String> = check_rules(&rules, Some(&["v1"]))
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            got,
            [
                ".routes[0].match.path_prefix",
                ".routes[0].match.method",
                ".routes[0].to.subset",
                ".routes[1].match.headers.x-almond-subset",
                ".routes[1].to",
                ".routes[2].match.cookie.c",
                ".routes[2].to",
            ]
        );
    }
}
