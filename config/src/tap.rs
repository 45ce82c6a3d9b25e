//! Tap filters: which live request summaries an operator asks to see
//! (`almond tap`), as the control plane and every proxy read them from a
//! query string.

use std::collections::HashMap;

/// Events per second one proxy sends to all its watchers together, at
/// most; a watcher may ask for fewer (`rate`).
pub const MAX_PER_SECOND: u32 = 100;

/// Which requests a watcher wants to see.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// The service, exactly.
    pub service: Option<String>,
    /// A prefix of the path.
    pub path_prefix: Option<String>,
    /// The subset that answered, exactly.
    pub subset: Option<String>,
    /// The status: a class (`5xx`) or one code (`503`).
    pub status: Option<Status>,
    /// Whether summaries carry the request's headers (secrets redacted).
    pub headers: bool,
    /// Events per second for this watcher, at most [`MAX_PER_SECOND`].
    pub per_second: u32,
}

/// A status filter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Status {
    /// `1xx` .. `5xx`: the hundreds digit.
    Class(u16),
    /// One status code.
    Code(u16),
}

impl Filter {
    /// The filter a `/tap` query asks for: `service`, `path` (a prefix),
    /// `subset`, `status` (`5xx` or `503`), `headers` (`true`/`1`) and
    /// `rate` (events per second). Unknown keys and bad values are refused.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Filter, String> {
        let mut filter = Filter {
            per_second: MAX_PER_SECOND,
            ..Filter::default()
        };
        for (key, value) in query {
            let value = value.trim();
            match key.as_str() {
                "service" => filter.service = Some(value.to_owned()),
                "path" if value.starts_with('/') => filter.path_prefix = Some(value.to_owned()),
                "path" => return Err(format!("path {value:?}: must start with /")),
                "subset" => filter.subset = Some(value.to_owned()),
                "status" => filter.status = Some(Status::parse(value)?),
                "headers" => {
                    filter.headers = match value {
                        "" | "1" | "true" => true,
                        "0" | "false" => false,
                        other => return Err(format!("headers {other:?}: use true or false")),
                    }
                }
                "rate" => match value.parse::<u32>() {
                    Ok(n) if (1..=MAX_PER_SECOND).contains(&n) => filter.per_second = n,
                    _ => {
                        return Err(format!(
                            "rate {value:?}: events per second, 1 to {MAX_PER_SECOND}"
                        ))
                    }
                },
                other => {
                    return Err(format!(
                        "unknown tap filter {other:?}; use service, path, subset, status, headers, rate"
                    ))
                }
            }
        }
        Ok(filter)
    }
}

impl Status {
    /// `5xx` (any case) or a code such as `503`.
    pub fn parse(value: &str) -> Result<Status, String> {
        let bad = || format!("status {value:?}: use a class such as 5xx or a code such as 503");
        let lower = value.to_ascii_lowercase();
        if let Some(digit) = lower.strip_suffix("xx") {
            return match digit.parse::<u16>() {
                Ok(d) if (1..=5).contains(&d) => Ok(Status::Class(d)),
                _ => Err(bad()),
            };
        }
        match lower.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Ok(Status::Code(code)),
            _ => Err(bad()),
        }
    }

    /// Whether `status` is this one or of this class.
    pub fn matches(self, status: u16) -> bool {
        match self {
            Status::Class(d) => status / 100 == d,
            Status::Code(code) => status == code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn filters_parse_and_refuse_with_the_reason() {
        let f = Filter::from_query(&query(&[
            ("service", "web"),
            ("path", "/api"),
            ("status", "5XX"),
            ("headers", "1"),
            ("rate", "5"),
        ]))
        .unwrap();
        assert_eq!(f.status, Some(Status::Class(5)));
        assert_eq!(f.per_second, 5);
        assert!(f.headers);
        assert_eq!(
            Filter::from_query(&query(&[("status", "503")]))
                .unwrap()
                .status,
            Some(Status::Code(503))
        );
        for (bad, why) in [
            (("status", "6xx"), "status"),
            (("status", "99"), "status"),
            (("path", "api"), "must start with /"),
            (("rate", "0"), "rate"),
            (("rate", "1000"), "rate"),
            (("colour", "red"), "unknown tap filter"),
        ] {
            let err = Filter::from_query(&query(&[bad])).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
