//! Durations in config files: human form (`250ms`, `10s`, `1m`) both ways.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// The longest duration any key takes: beyond it, deadlines (`now +
/// duration`) overflow the clock and nanosecond counts overflow `u64`.
const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Deserializes `"1s"`, `"250ms"`, `"1m 30s"` (at most 10 years).
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let value = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); use a number and a unit, like 250ms, 10s or 1m"
        ))
    })?;
    if value > LONGEST {
        return Err(serde::de::Error::custom(format!(
            "invalid duration {text:?}: at most 10 years"
        )));
    }
    Ok(value)
}

/// Serializes back to the same human form, so `/config` round-trips.
pub(crate) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*value).to_string())
}

/// The same for optional durations.
pub(crate) mod option {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::deserialize")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}
