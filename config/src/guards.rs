//! Guards: per-route `deny` and rate `limit` (`almond block`, `almond
//! limit`), matched with the route rules' [`Match`]; the first guard whose
//! match holds applies, before the request is routed.
//!
//! ```yaml
//! guards:
//!   - match: { path_prefix: /api/giveaway, method: POST }
//!     deny: { status: 503, body: "closed for now" }
//!   - match: { path_prefix: /api/search }
//!     limit: { rate: 10/s, burst: 20, by: client_ip }
//! ```

use crate::rules::{check_match, Match};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// The most guards a service may have.
pub const MAX_GUARDS: usize = 1000;

/// The longest `deny.body`.
pub const MAX_DENY_BODY: usize = 4096;

/// One guard: a match and what happens to a matching request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// The request's conditions (as route rules').
    #[serde(rename = "match", default)]
    pub when: Match,
    /// Answer at once, never reaching the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Deny>,
    /// Answer 429 over this rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
}

/// The answer a `deny` guard gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deny {
    /// Status, 400 to 599 (default 503).
    #[serde(default = "default_deny_status")]
    pub status: u16,
    /// Body (text), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

fn default_deny_status() -> u16 {
    503
}

impl Default for Deny {
    fn default() -> Deny {
        Deny {
            status: default_deny_status(),
            body: None,
        }
    }
}

/// A token bucket: `rate` with `burst` requests at once, per `by` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// `10/s`, `100/min`, `5/h`.
    pub rate: Rate,
    /// Requests allowed at once after a quiet spell (default: one second's
    /// worth of the rate, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket for all (`none`, the default), per client address
    /// (`client_ip`), or per value of a header (`header NAME`).
    #[serde(default)]
    pub by: LimitBy,
}

impl Limit {
    /// The burst in force.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            let per_second = f64::from(self.rate.count) / self.rate.per.as_secs_f64();
            (per_second.ceil() as u32).max(1)
        })
    }
}

/// Requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests...
    pub count: u32,
    /// ...per this long (1 s, 1 min or 1 h).
    pub per: Duration,
}

impl Rate {
    /// Parses `10/s`, `100/min`, `5/h` (also `sec`, `second`, `m`,
    /// `minute`, `hour`).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("{text:?} is not a rate like 10/s, 100/min or 5/h");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("{text:?}: the count must be 1 or more"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What a limit's buckets are kept per.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LimitBy {
    /// One bucket for every request.
    #[default]
    None,
    /// One per client address (the connection's peer).
    ClientIp,
    /// One per value of this header (requests without it share one).
    Header(String),
}

impl Serialize for LimitBy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LimitBy::None => s.serialize_str("none"),
            LimitBy::ClientIp => s.serialize_str("client_ip"),
            LimitBy::Header(name) => s.serialize_str(&format!("header {name}")),
        }
    }
}

impl<'de> Deserialize<'de> for LimitBy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "none" => Ok(LimitBy::None),
            "client_ip" => Ok(LimitBy::ClientIp),
            other => match other.strip_prefix("header ") {
                Some(name) if !name.trim().is_empty() => {
                    Ok(LimitBy::Header(name.trim().to_ascii_lowercase()))
                }
                _ => Err(serde::de::Error::custom(format!(
                    "{text:?}: use none, client_ip or \"header NAME\""
                ))),
            },
        }
    }
}

/// Checks a service's guards; paths are relative (`.guards[0].deny.status`).
pub fn check_guards(guards: &[Guard]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if guards.len() > MAX_GUARDS {
        out.push((".guards".into(), format!("at most {MAX_GUARDS} guards")));
    }
    for (i, guard) in guards.iter().enumerate() {
        let at = format!(".guards[{i}]");
        for (path, why) in check_match(&guard.when) {
            out.push((format!("{at}.match{path}"), why));
        }
        match (&guard.deny, &guard.limit) {
            (Some(_), Some(_)) | (None, None) => {
                out.push((at.clone(), "give deny or limit, exactly one".into()));
            }
            (Some(deny), None) => {
                if !(400..=599).contains(&deny.status) {
                    out.push((
                        format!("{at}.deny.status"),
                        format!("{} is not an error status (400 to 599)", deny.status),
                    ));
                }
                if deny.body.as_ref().is_some_and(|b| b.len() > MAX_DENY_BODY) {
                    out.push((
                        format!("{at}.deny.body"),
                        format!("at most {MAX_DENY_BODY} bytes"),
                    ));
                }
            }
            (None, Some(limit)) => {
                if limit.burst == Some(0) {
                    out.push((format!("{at}.limit.burst"), "must be 1 or more".into()));
                }
                if let LimitBy::Header(name) = &limit.by {
                    if http_token(name).is_err() {
                        out.push((
                            format!("{at}.limit.by"),
                            format!("{name:?} is not an HTTP header name"),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn http_token(s: &str) -> Result<(), ()> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    (!s.is_empty() && s.bytes().all(token))
        .then_some(())
        .ok_or(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_and_print_alike() {
        for (text, count, secs, shown) in [
            ("10/s", 10, 1, "10/s"),
            ("100/min", 100, 60, "100/min"),
            (" 5 / h ", 5, 3600, "5/h"),
            ("1/minute", 1, 60, "1/min"),
        ] {
            let rate = Rate::parse(text).unwrap();
            assert_eq!((rate.count, rate.per.as_secs()), (count, secs), "{text}");
            assert_eq!(rate.to_string(), shown);
        }
        for bad in ["10", "0/s", "x/s", "10/day", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bursts_default_to_one_seconds_worth() {
        let limit = |rate: &str| Limit {
            rate: Rate::parse(rate).unwrap(),
            burst: None,
            by: LimitBy::None,
        };
        assert_eq!(limit("10/s").burst(), 10);
        assert_eq!(limit("1/min").burst(), 1);
        assert_eq!(limit("600/min").burst(), 10);
    }

    #[test]
    fn bad_guards_are_named() {
        let guard = |json: &str| -> Guard { serde_json::from_str(json).unwrap() };
        let guards = vec![
            guard(r#"{"match": {"path_prefix": "/a"}}"#),
            guard(r#"{"match": {"method": "post"}, "deny": {"status": 200}}"#),
            guard(r#"{"limit": {"rate": "1/s", "burst": 0, "by": "header a b"}}"#),
        ];
        let got: Vec<String> = check_guards(&guards).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            got,
            [
                ".guards[0]",
                ".guards[1].match.method",
                ".guards[1].deny.status",
                ".guards[2].limit.burst",
                ".guards[2].limit.by",
            ]
        );
        let by: Result<Guard, _> =
            serde_json::from_str(r#"{"limit": {"rate": "1/s", "by": "ip"}}"#);
        assert!(by.unwrap_err().to_string().contains("client_ip"));
    }
}
