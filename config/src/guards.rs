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
    /// `proxy` (the default): every proxy applies the rate as written;
    /// `fleet`: the control plane divides the rate and burst by the
    /// number of live proxies it knows (approximate; a proxy with static
    /// config and no control plane treats it as `proxy`).
    #[serde(default, skip_serializing_if = "LimitScope::is_proxy")]
    pub scope: LimitScope,
    /// Set by the control plane on a `fleet` limit it serves: the number
    /// of proxies the written rate and burst were divided by. Never
    /// written by people (refused in config and by the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_by: Option<u32>,
}

/// Who a limit's rate is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// Each proxy on its own.
    #[default]
    Proxy,
    /// The whole fleet, shared out among the proxies.
    Fleet,
}

impl LimitScope {
    /// Is it the default (`proxy`)?
    pub fn is_proxy(&self) -> bool {
        *self == LimitScope::Proxy
    }
}

impl Limit {
    /// The burst in force.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            let per_second = f64::from(self.rate.count) / self.rate.per.as_secs_f64();
            (per_second.ceil() as u32).max(1)
        })
    }

    /// This limit's share for one of `proxies` proxies: rate and burst
    /// divided (each at least 1; the rate in a finer unit when it does not
    /// divide), `shared_by` set. Only a `fleet` limit is divided; `proxy`
    /// limits and a count of 0 or 1 leave it as it is.
    pub fn shared(&self, proxies: usize) -> Limit {
        let n = u64::try_from(proxies).unwrap_or(u64::MAX);
        if self.scope != LimitScope::Fleet || n <= 1 {
            return self.clone();
        }
        let burst = (u64::from(self.burst()) / n).max(1);
        let mut out = self.clone();
        out.rate = self.rate.divided(n);
        out.burst = Some(u32::try_from(burst).unwrap_or(u32::MAX));
        out.shared_by = Some(u32::try_from(n).unwrap_or(u32::MAX));
        out
    }
}

/// Requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

impl Rate {
    /// This rate divided by `n` (at least 1 per hour), in the coarsest of
    /// s, min, h that holds it exactly after rounding to whole requests
    /// per hour: 20/s by 2 is 10/s, 10/s by 3 is 200/min, 1/min by 2 is
    /// 30/h.
    pub fn divided(&self, n: u64) -> Rate {
        let secs = self.per.as_secs().max(1);
        let per_hour = u64::from(self.count) * (3600 / secs);
        let share = (per_hour / n.max(1)).max(1);
        let (count, per) = if share.is_multiple_of(3600) {
            (share / 3600, 1)
        } else if share.is_multiple_of(60) {
            (share / 60, 60)
        } else {
            (share, 3600)
        };
        Rate {
            count: u32::try_from(count).unwrap_or(u32::MAX),
            per: Duration::from_secs(per),
        }
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
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

/// Checks a service's guards as written by people (config, the API);
/// paths are relative (`.guards[0].deny.status`).
pub fn check_guards(guards: &[Guard]) -> Vec<(String, String)> {
    check_guards_as(guards, false)
}

/// Checks guards; `served`: as the control plane serves them (a fleet
/// limit's `shared_by` is the control plane's to set, so allowed).
pub(crate) fn check_guards_as(guards: &[Guard], served: bool) -> Vec<(String, String)> {
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
                if limit.shared_by.is_some() && !served {
                    out.push((
                        format!("{at}.limit.shared_by"),
                        "set by the control plane only; use scope: fleet".into(),
                    ));
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
            scope: LimitScope::Proxy,
            shared_by: None,
        };
        assert_eq!(limit("10/s").burst(), 10);
        assert_eq!(limit("1/min").burst(), 1);
        assert_eq!(limit("600/min").burst(), 10);
    }

    #[test]
    fn fleet_limits_are_shared_out() {
        let limit = |json: &str| -> Limit { serde_json::from_str(json).unwrap() };
        let fleet = limit(r#"{"rate": "20/s", "burst": 10, "scope": "fleet"}"#);
        let half = fleet.shared(2);
        assert_eq!(
            (half.rate.to_string(), half.burst, half.shared_by),
            ("10/s".to_owned(), Some(5), Some(2))
        );
        assert_eq!(fleet.shared(1), fleet);
        assert_eq!(fleet.shared(0), fleet);
        let third = fleet.shared(3);
        assert_eq!(
            (third.rate.to_string(), third.burst),
            ("400/min".into(), Some(3))
        );
        let many = fleet.shared(100);
        assert_eq!(
            (many.rate.to_string(), many.burst),
            ("12/min".into(), Some(1))
        );
        // 72000/h over 7: rounded down to whole requests per hour.
        assert_eq!(fleet.shared(7).rate.to_string(), "10285/h");
        let slow = limit(r#"{"rate": "1/min", "scope": "fleet"}"#).shared(1000);
        assert_eq!((slow.rate.to_string(), slow.burst), ("1/h".into(), Some(1)));
        let local = limit(r#"{"rate": "20/s"}"#);
        assert_eq!(local.shared(4), local);
        assert_eq!(
            serde_json::to_value(&fleet).unwrap()["scope"],
            serde_json::json!("fleet")
        );
        assert!(serde_json::to_value(&local).unwrap().get("scope").is_none());
        let bad: Result<Limit, _> = serde_json::from_str(r#"{"rate": "1/s", "scope": "all"}"#);
        assert!(bad.unwrap_err().to_string().contains("fleet"));
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
