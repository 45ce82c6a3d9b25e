//! Small helpers reproducing Go's standard-library behaviour where Consul
//! relies on it: `time.ParseDuration`, `url.ParseQuery`, `strconv.ParseBool`,
//! `encoding/json` output (HTML escaping, `MarshalIndent` with 4 spaces).

use std::time::Duration;

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`.
/// Negative durations are returned as `Err(())` only when malformed; a
/// negative value is reported as `Ok(None)` (Consul treats it as "default").
pub(crate) fn parse_go_duration(s: &str) -> Result<Option<Duration>, ()> {
    let mut rest = s;
    let mut negative = false;
    if let Some(r) = rest.strip_prefix('-') {
        negative = true;
        rest = r;
    } else if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    }
    if rest == "0" {
        return Ok(Some(Duration::ZERO));
    }
    if rest.is_empty() {
        return Err(());
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        // number: digits, optional '.', digits (at least one digit overall)
        let bytes = rest.as_bytes();
        let mut i = 0;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_end = i;
        let mut frac_digits = 0;
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_digits = i - start;
        }
        if int_end == 0 && frac_digits == 0 {
            return Err(());
        }
        let number: f64 = rest[..i].parse().map_err(|_| ())?;
        rest = &rest[i..];
        // unit
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map(|(idx, _)| idx)
            .unwrap_or(rest.len());
        if unit_len == 0 {
            // missing unit
            return Err(());
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(()),
        };
        total_nanos += number * mult;
        if total_nanos > 9.223_372_036_854_776e18 {
            return Err(());
        }
    }
    if negative {
        return Ok(None);
    }
    Ok(Some(Duration::from_nanos(total_nanos as u64)))
}

/// Go's `strconv.ParseUint(s, 10, 64)`.
pub(crate) fn parse_go_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`; `plus_is_space` for query components.
/// Returns `None` on a malformed escape (as Go does).
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let h = hex_val(*bytes.get(i + 1)?)?;
                let l = hex_val(*bytes.get(i + 2)?)?;
                out.push(h * 16 + l);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `url.ParseQuery`, keeping order; malformed pairs are skipped.
pub(crate) fn parse_query(raw: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in raw.split('&') {
        if part.is_empty() || part.contains(';') {
            continue;
        }
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k, v),
            None => (part, ""),
        };
        let (Some(k), Some(v)) = (percent_decode(k, true), percent_decode(v, true)) else {
            continue;
        };
        out.push((k, v));
    }
    out
}

/// Go's `url.QueryEscape`.
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Serialises like Go's `encoding/json`: HTML-sensitive characters and
/// U+2028/U+2029 escaped; `pretty` = `MarshalIndent(v, "", "    ")` + "\n".
pub(crate) fn go_json<T: serde::Serialize>(value: &T, pretty: bool) -> Vec<u8> {
    let raw = if pretty {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        if value.serialize(&mut ser).is_err() {
            return b"null".to_vec();
        }
        buf.push(b'\n');
        buf
    } else {
        serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
    };
    let text = String::from_utf8_lossy(&raw);
    if !text.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return raw;
    }
    text.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_go_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(
            parse_go_duration("300000ms"),
            Ok(Some(Duration::from_secs(300)))
        );
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Ok(Some(Duration::from_millis(3_723_500)))
        );
        assert_eq!(parse_go_duration("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_go_duration("-5s"), Ok(None));
        assert_eq!(
            parse_go_duration(".5s"),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_go_duration("10"), Err(()));
        assert_eq!(parse_go_duration("s"), Err(()));
        assert_eq!(parse_go_duration("10x"), Err(()));
        assert_eq!(parse_go_duration(""), Err(()));
        assert_eq!(parse_go_duration("1.s"), Ok(Some(Duration::from_secs(1))));
    }

    #[test]
    fn uints_and_bools() {
        assert_eq!(parse_go_uint("42"), Some(42));
        assert_eq!(parse_go_uint("-1"), None);
        assert_eq!(parse_go_uint("+1"), None);
        assert_eq!(parse_go_uint("abc"), None);
        assert_eq!(parse_go_uint("18446744073709551616"), None);
        assert_eq!(parse_go_bool("T"), Some(true));
        assert_eq!(parse_go_bool("yes"), None);
    }

    #[test]
    fn query_parsing() {
        let q = parse_query("a=1&b&c=x+y%2Fz&bad=%zz");
        assert_eq!(
            q,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), "x y/z".into())
            ]
        );
        assert_eq!(percent_decode("a%2", false), None);
        assert_eq!(percent_decode("a%2f", false).as_deref(), Some("a/"));
    }

    #[test]
    fn json_like_go() {
        let v = serde_json::json!({"a": "<&>"});
        assert_eq!(
            go_json(&v, false),
            br#"{"a":"\u003c\u0026\u003e"}"#.to_vec()
        );
        let v = serde_json::json!([1]);
        assert_eq!(go_json(&v, true), b"[\n    1\n]\n".to_vec());
    }
}
