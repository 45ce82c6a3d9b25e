//! A service's traffic split: percent by subset, and optionally a sticky
//! header. Written flat, as CONTRACT.md shows it:
//!
//! ```yaml
//! split: { v1: 90, v2: 10, sticky_header: x-user-id }
//! ```
//!
//! Every key but `sticky_header` names a subset, so (de)serialization is
//! by hand: `#[serde(flatten)]` would buffer the map and lose the key path
//! that config errors name (`services.orders.split.v2`).

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// The key that is not a subset.
pub const STICKY_KEY: &str = "sticky_header";

/// Percent of traffic by subset name (a split's sum to 100).
pub type Weights = BTreeMap<String, u32>;

/// Percent of traffic per subset, and the header that keeps a user on one
/// side of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Percent by subset name (summing to 100).
    pub weights: Weights,
    /// When a request carries this header, its value (hashed) picks the
    /// subset, so one user stays on one side while the weights hold.
    /// Requests without it are split at random.
    pub sticky_header: Option<String>,
}

impl Split {
    /// A split without stickiness.
    pub fn new(weights: Weights) -> Split {
        Split {
            weights,
            sticky_header: None,
        }
    }
}

impl Serialize for Split {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let extra = usize::from(self.sticky_header.is_some());
        let mut map = s.serialize_map(Some(self.weights.len() + extra))?;
        for (subset, weight) in &self.weights {
            map.serialize_entry(subset, weight)?;
        }
        if let Some(header) = &self.sticky_header {
            map.serialize_entry(STICKY_KEY, header)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Split {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Split, D::Error> {
        struct Flat;
        impl<'de> Visitor<'de> for Flat {
            type Value = Split;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of subset to percent, and optionally sticky_header")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Split, A::Error> {
                let mut split = Split::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == STICKY_KEY {
                        split.sticky_header = Some(map.next_value()?);
                    } else {
                        let weight: u32 = map.next_value()?;
                        if split.weights.insert(key.clone(), weight).is_some() {
                            return Err(serde::de::Error::custom(format!(
                                "subset {key:?} is listed twice"
                            )));
                        }
                    }
                }
                Ok(split)
            }
        }
        d.deserialize_map(Flat)
    }
}

/// Checks that a split may name `subset`: not `sticky_header`, which the
/// flat shape reads as the sticky header (a split to it would be read
/// back as a header name, and every proxy would refuse the snapshot).
pub fn check_split_subset(subset: &str) -> Result<(), String> {
    if subset == STICKY_KEY {
        return Err(format!(
            "a subset named {STICKY_KEY:?} cannot be in a split: a split's {STICKY_KEY:?} key is its sticky header; rename the subset"
        ));
    }
    Ok(())
}

/// Checks a sticky header name: an HTTP header token, not one of almond's
/// own routing headers (those are removed before upstream).
pub fn check_sticky_header(name: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?} is not an HTTP header name"));
    }
    if name.to_ascii_lowercase().starts_with("x-almond-") {
        return Err(format!(
            "{name:?} is an almond routing header; use an application header like x-user-id"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_shape_round_trips() {
        let split: Split =
            serde_json::from_str(r#"{"v1": 90, "v2": 10, "sticky_header": "x-user-id"}"#)
                .unwrap_or_default();
        assert_eq!(split.weights.get("v2"), Some(&10));
        assert_eq!(split.sticky_header.as_deref(), Some("x-user-id"));
        let json = serde_json::to_string(&split).unwrap_or_default();
        assert_eq!(json, r#"{"v1":90,"v2":10,"sticky_header":"x-user-id"}"#);
        let plain = serde_json::to_string(&Split::new(split.weights.clone())).unwrap_or_default();
        assert_eq!(plain, r#"{"v1":90,"v2":10}"#);
    }

    #[test]
    fn header_names_are_checked() {
        assert!(check_sticky_header("x-user-id").is_ok());
        assert!(check_sticky_header("X-User-Id").is_ok());
        assert!(check_sticky_header("").is_err());
        assert!(check_sticky_header("x user").is_err());
        assert!(check_sticky_header("x-almond-subset").is_err());
    }
}
