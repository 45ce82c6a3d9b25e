//! Rules: an ordered list of `match` conditions (almond_config's `Match`),
//! compiled once per config or snapshot, and the first one a request
//! satisfies. Route rules (route.rs) use it; so can other per-route policy.
//!
//! Path conditions are indexed so that a request's cost grows with its
//! path's depth and the rules whose path fits it, not with the number of
//! rules: `path_prefix` rules hang on a tree of path segments, `path_exact`
//! rules in a hash map, and rules without a path in one list. A request
//! walks the tree once along its segments; each candidate list is in rule
//! order, so only candidates before the best match so far are tested
//! against the other conditions (method, headers, cookies). No allocation.

use almond_config::{HeaderMatch, Match};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use std::collections::HashMap;

/// The compiled rules, each with a `T` (what a match leads to).
pub struct Rules<T> {
    rules: Vec<Rule<T>>,
    /// `path_prefix` rules, by the segments of their prefix.
    tree: Node,
    /// `path_exact` rules, by path.
    exact: HashMap<Box<str>, Vec<u32>>,
    /// Rules with no path condition.
    any_path: Vec<u32>,
}

/// One rule's conditions besides the path, and its outcome.
struct Rule<T> {
    method: Option<Method>,
    /// `method: GET` also holds for `HEAD` (see [`Rules::heads_as_gets`]).
    head_as_get: bool,
    headers: Box<[(HeaderName, Header)]>,
    cookies: Box<[Cookie]>,
    then: T,
}

/// A cookie condition: name and value.
type Cookie = (Box<[u8]>, Box<[u8]>);

enum Header {
    Value(HeaderValue),
    Present(bool),
}

/// A node of the segment tree: the rules whose prefix ends here.
#[derive(Default)]
struct Node {
    here: Vec<u32>,
    children: HashMap<Box<str>, Node>,
}

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Rules {
            rules: Vec::new(),
            tree: Node::default(),
            exact: HashMap::new(),
            any_path: Vec::new(),
        }
    }
}

/// A path's segments after the leading `/` (`/a/b` -> `a`, `b`; a
/// trailing `/` dropped, so `/` has none).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').filter(move |_| !trimmed.is_empty())
}

impl<T> Rules<T> {
    /// These rules' `method: GET` holds for `HEAD` requests too: a server
    /// answers a HEAD with its GET handler (RFC 9110 §9.3.2; as nginx's
    /// `limit_except GET` covers HEAD), so a guard on GET must stop it.
    pub fn heads_as_gets(mut self) -> Self {
        for rule in &mut self.rules {
            rule.head_as_get = true;
        }
        self
    }

    /// Compiles `rules` in order. Conditions that cannot be compiled
    /// (refused by config validation before this) make the rule never
    /// match, rather than match too much.
    pub fn compile<'a>(rules: impl IntoIterator<Item = (&'a Match, T)>) -> Rules<T> {
        let mut out = Rules::default();
        for (index, (when, then)) in rules.into_iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            let mut valid = true;
            let method = when.method.as_deref().and_then(|m| {
                let parsed = Method::from_bytes(m.as_bytes()).ok();
                valid &= parsed.is_some();
                parsed
            });
            let mut headers = Vec::new();
            for (name, cond) in &when.headers {
                let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                    valid = false;
                    continue;
                };
                let cond = match cond {
                    HeaderMatch::Present(p) => Header::Present(*p),
                    HeaderMatch::Value(v) => match HeaderValue::from_str(v) {
                        Ok(v) => Header::Value(v),
                        Err(_) => {
                            valid = false;
                            continue;
                        }
                    },
                };
                headers.push((name, cond));
            }
            let cookies = (when.cookie.iter())
                .map(|(k, v)| (k.as_bytes().into(), v.as_bytes().into()))
                .collect();
            out.rules.push(Rule {
                method,
                head_as_get: false,
                headers: headers.into(),
                cookies,
                then,
            });
            if !valid {
                continue;
            }
            match (&when.path_prefix, &when.path_exact) {
                (_, Some(exact)) => {
                    let list = out.exact.entry(exact.as_str().into()).or_default();
                    list.push(index);
                }
                (Some(prefix), None) => {
                    let mut node = &mut out.tree;
                    for seg in segments(prefix) {
                        node = node.children.entry(seg.into()).or_default();
                    }
                    node.here.push(index);
                }
                (None, None) => out.any_path.push(index),
            }
        }
        out
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The outcome of the first rule `req` satisfies, if any.
    #[inline]
    pub fn first_match<B>(&self, req: &Request<B>) -> Option<&T> {
        if self.rules.is_empty() {
            return None;
        }
        self.first_match_at(req, req.uri().path())
    }

    /// As [`Rules::first_match`], with `path` taken for `req`'s path (the
    /// guards give its normal form, so that another spelling of a path
    /// matches as the path).
    #[inline]
    pub fn first_match_at<B>(&self, req: &Request<B>, path: &str) -> Option<&T> {
        if self.rules.is_empty() {
            return None;
        }
        let mut best = u32::MAX;
        self.scan(&self.any_path, req, &mut best);
        if let Some(list) = self.exact.get(path) {
            self.scan(list, req, &mut best);
        }
        let mut node = &self.tree;
        self.scan(&node.here, req, &mut best);
        for seg in segments(path) {
            match node.children.get(seg) {
                Some(child) => node = child,
                None => break,
            }
            self.scan(&node.here, req, &mut best);
        }
        self.rules.get(best as usize).map(|r| &r.then)
    }

    /// Lowers `best` to the first rule of `list` (in rule order) that is
    /// before it and whose other conditions hold.
    #[inline]
    fn scan<B>(&self, list: &[u32], req: &Request<B>, best: &mut u32) {
        for &i in list {
            if i >= *best {
                return;
            }
            if self.rules.get(i as usize).is_some_and(|r| r.holds(req)) {
                *best = i;
                return;
            }
        }
    }
}

impl<T> Rule<T> {
    /// Method, headers and cookies (the path was matched by the index).
    fn holds<B>(&self, req: &Request<B>) -> bool {
        if let Some(m) = &self.method {
            let head = self.head_as_get && m == Method::GET && req.method() == Method::HEAD;
            if m != req.method() && !head {
                return false;
            }
        }
        let headers = req.headers();
        let headers_hold = self.headers.iter().all(|(name, cond)| match cond {
            Header::Present(p) => headers.contains_key(name) == *p,
            Header::Value(v) => headers.get_all(name).iter().any(|got| got == v),
        });
        headers_hold && (self.cookies.iter()).all(|(name, value)| has_cookie(headers, name, value))
    }
}

/// Whether a `Cookie` header has `name=value` (RFC 6265 `; ` separated).
fn has_cookie(headers: &HeaderMap, name: &[u8], value: &[u8]) -> bool {
    headers.get_all(http::header::COOKIE).iter().any(|line| {
        line.as_bytes().split(|b| *b == b';').any(|pair| {
            let pair = pair.trim_ascii();
            match pair.iter().position(|b| *b == b'=') {
                Some(eq) => &pair[..eq] == name && pair[eq + 1..].trim_ascii() == value,
                None => false,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> Rules<usize> {
        let matches: Vec<Match> = serde_json::from_str(json).unwrap_or_default();
        Rules::compile(matches.iter().enumerate().map(|(i, m)| (m, i)))
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap_or_default()
    }

    fn first(
        r: &Rules<usize>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<usize> {
        r.first_match(&req(method, path, headers)).copied()
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let r = rules(
            r#"[{"path_prefix": "/api/v2/"}, {"path_prefix": "/api"}, {"path_prefix": "/"}]"#,
        );
        assert_eq!(first(&r, "GET", "/api/v2/x?q=1", &[]), Some(0));
        assert_eq!(first(&r, "GET", "/api/v2", &[]), Some(0));
        assert_eq!(first(&r, "GET", "/api/v20", &[]), Some(1));
        assert_eq!(first(&r, "GET", "/api", &[]), Some(1));
        assert_eq!(first(&r, "GET", "/apix", &[]), Some(2));
        assert_eq!(first(&r, "GET", "/", &[]), Some(2));
    }

    #[test]
    fn the_first_rule_in_order_wins_across_kinds() {
        let r = rules(r#"[{"method": "POST"}, {"path_exact": "/a/b"}, {"path_prefix": "/a"}, {}]"#);
        assert_eq!(first(&r, "POST", "/a/b", &[]), Some(0));
        assert_eq!(first(&r, "GET", "/a/b", &[]), Some(1));
        assert_eq!(first(&r, "GET", "/a/b/", &[]), Some(2));
        assert_eq!(first(&r, "GET", "/z", &[]), Some(3));
        let r = rules(r#"[{"path_prefix": "/a", "method": "PUT"}, {"path_exact": "/a"}]"#);
        assert_eq!(first(&r, "GET", "/a", &[]), Some(1));
        assert_eq!(first(&r, "PUT", "/a", &[]), Some(0));
        assert_eq!(first(&r, "GET", "/b", &[]), None);
    }

    #[test]
    fn headers_and_cookies() {
        let r = rules(
            r#"[{"headers": {"x-beta": "1", "x-debug": {"present": false}}},
                {"cookie": {"canary": "yes"}},
                {"headers": {"X-Debug": {"present": true}}}]"#,
        );
        assert_eq!(first(&r, "GET", "/", &[("x-beta", "1")]), Some(0));
        assert_eq!(first(&r, "GET", "/", &[("x-beta", "2")]), None);
        assert_eq!(
            first(&r, "GET", "/", &[("x-beta", "1"), ("x-debug", "")]),
            Some(2)
        );
        assert_eq!(
            first(&r, "GET", "/", &[("cookie", "a=b; canary=yes")]),
            Some(1)
        );
        assert_eq!(first(&r, "GET", "/", &[("cookie", "canary=yesno")]), None);
        assert_eq!(first(&r, "GET", "/", &[("cookie", "xcanary=yes")]), None);
        assert_eq!(
            first(
                &r,
                "GET",
                "/",
                &[("cookie", "a=1"), ("cookie", "canary=yes")]
            ),
            Some(1)
        );
    }

    #[test]
    fn many_prefix_rules_find_the_right_one() {
        let json: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"path_prefix": "/svc{i}/items"}}"#))
            .collect();
        let r = rules(&format!("[{}]", json.join(",")));
        assert_eq!(r.len(), 1000);
        assert_eq!(first(&r, "GET", "/svc737/items/9", &[]), Some(737));
        assert_eq!(first(&r, "GET", "/svc737/other", &[]), None);
    }
}
