//! Request paths as guards compare them: one spelling per resource, so
//! that `almond block` cannot be walked around by writing the path
//! another way that the service still reads as the blocked one.
//!
//! [`normalize_path`] does what Envoy's `normalize_path` and
//! `merge_slashes` do: percent-encoded unreserved characters decoded
//! (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`; `%67` is `g`), the hex digits of
//! the other escapes upper-cased (`%2f` is `%2F`, still an escape: a
//! decoded `/` would be a different path), a `%` that starts no escape
//! written `%25`, runs of `/` merged, and `.` and `..` segments removed
//! (RFC 3986 §5.2.4, after the merge). Normalising twice changes nothing
//! more. It runs on every guarded request, so a path that is already
//! normal (nearly all) is only scanned, never copied. [`canonical_match`]
//! puts a guard's own paths in the same form. [`slashes_unescaped`] is the
//! spelling of a path that services which decode `%2F`, read `\` as `/`
//! or drop `;` path parameters see.

use crate::rules::Match;
use std::borrow::Cow;

/// `path` in normal form (see the module docs); borrowed when it already
/// is. A path that does not start with `/` (`*`, an authority) is left as
/// it is.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normalize_slow(path))
    }
}

/// `normal` (a path in normal form) as many services read it, in normal
/// form again; `None` when that is the same. Escaped slashes (`%2F`) and
/// backslashes (`%5C`, or a raw `\\`) are read as `/`, and each
/// segment's parameters (`;jsessionid=...`) are dropped: nginx decodes
/// `%2F` before it matches a `location`, services that decode the path
/// before routing it read one as a separator, Tomcat and IIS take a
/// backslash for a slash, and Tomcat, Jetty and Spring route without path
/// parameters. A guard matches this spelling too. In normal form every `%`
/// starts an escape, so a `%2F` found is one.
pub fn slashes_unescaped(normal: &str) -> Option<String> {
    let escaped = normal.contains("%2F") || normal.contains("%5C");
    if !escaped && !normal.contains(['\\', ';']) {
        return None;
    }
    let slashed = normal
        .replace("%2F", "/")
        .replace("%5C", "/")
        .replace('\\', "/");
    // Each segment's `;...` dropped.
    let mut read = String::with_capacity(slashed.len());
    for (i, segment) in slashed.split('/').enumerate() {
        if i > 0 {
            read.push('/');
        }
        read.push_str(segment.split(';').next().unwrap_or(""));
    }
    let read = normalize_path(&read).into_owned();
    (read != normal).then_some(read)
}

/// A guard's match with its path in the form requests are compared in:
/// normalised, and a `path_prefix`'s trailing `/` dropped (except for
/// `/`), which matches the same requests (prefixes are whole segments).
/// An exact path keeps its trailing `/`: `/a/` and `/a` are two paths.
pub fn canonical_match(when: &Match) -> Cow<'_, Match> {
    let prefix = when.path_prefix.as_deref().map(canonical_prefix);
    let exact = when.path_exact.as_deref().map(normalize_path);
    if prefix.as_deref() == when.path_prefix.as_deref()
        && exact.as_deref() == when.path_exact.as_deref()
    {
        return Cow::Borrowed(when);
    }
    Cow::Owned(Match {
        path_prefix: prefix.map(Cow::into_owned),
        path_exact: exact.map(Cow::into_owned),
        ..when.clone()
    })
}

fn canonical_prefix(prefix: &str) -> Cow<'_, str> {
    match normalize_path(prefix) {
        Cow::Borrowed(p) if p.len() > 1 => Cow::Borrowed(p.strip_suffix('/').unwrap_or(p)),
        Cow::Owned(mut p) => {
            if p.len() > 1 && p.ends_with('/') {
                p.pop();
            }
            Cow::Owned(p)
        }
        same => same,
    }
}

/// Whether [`normalize_slow`] would leave `path` as it is: no escape to
/// decode or upper-case, no `%` that is not an escape, no `//`, no `.` or
/// `..` segment.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return true;
    }
    for (i, &c) in b.iter().enumerate() {
        let rest = b.get(i + 1..).unwrap_or_default();
        match c {
            b'%' => {
                let lower = rest.iter().take(2).any(u8::is_ascii_lowercase);
                if escape_at(b, i).is_none_or(|byte| is_unreserved(byte) || lower) {
                    return false;
                }
            }
            b'/' => {
                // The segment after this `/`: empty (`//`), `.` or `..`.
                let end = rest.iter().position(|&c| c == b'/');
                let segment = &rest[..end.unwrap_or(rest.len())];
                if (segment.is_empty() && end.is_some()) || segment == b"." || segment == b".." {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// The byte `%XY` at `i` stands for, if `X` and `Y` are hex digits.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hex = |c: u8| char::from(c).to_digit(16);
    let hi = hex(*b.get(i + 1)?)?;
    let lo = hex(*b.get(i + 2)?)?;
    u8::try_from(hi * 16 + lo).ok()
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn normalize_slow(path: &str) -> String {
    // Escapes first, so that `%2e%2e` is the `..` segment it stands for.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let next = path[i..].chars().next().unwrap_or_default();
        match (next, escape_at(b, i)) {
            ('%', Some(byte)) if is_unreserved(byte) => {
                decoded.push(char::from(byte));
                i += 3;
            }
            ('%', Some(_)) => {
                let hex = path.get(i + 1..i + 3).unwrap_or_default();
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
                i += 3;
            }
            ('%', None) => {
                // A `%` that is no escape, written as one: else a decoded
                // letter after it (`%a%62`) would make an escape of them.
                decoded.push_str("%25");
                i += 1;
            }
            (c, _) => {
                decoded.push(c);
                i += c.len_utf8().max(1);
            }
        }
    }
    // Then segments: empty ones merged away, `.` dropped, `..` drops the
    // one before; a path that ended on a `/`, `.` or `..` keeps its `/`.
    let mut out = String::with_capacity(decoded.len());
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" | "." => {}
            ".." => {
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
        if last && matches!(segment, "" | "." | "..") {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_slashes_read_as_slashes() {
        for (path, slashed) in [
            ("/api%2Fgiveaway", Some("/api/giveaway")),
            ("/api%5Cgiveaway/claim", Some("/api/giveaway/claim")),
            ("/x/..%2Fapi/giveaway", Some("/api/giveaway")),
            ("/api%2F%2Fgiveaway%2F", Some("/api/giveaway/")),
            // `%25` is a `%`, not the start of an escaped slash.
            ("/api%252Fgiveaway", None),
            ("/api/giveaway", None),
            // A raw backslash, and path parameters.
            ("/api\\giveaway", Some("/api/giveaway")),
            ("/api/giveaway;a=1", Some("/api/giveaway")),
            (
                "/api;x/giveaway;jsessionid=2/claim",
                Some("/api/giveaway/claim"),
            ),
            ("/api/;x", Some("/api/")),
        ] {
            let normal = normalize_path(path);
            assert_eq!(slashes_unescaped(&normal).as_deref(), slashed, "{path}");
        }
    }

    #[test]
    fn other_spellings_of_a_path_are_one() {
        for (path, normal) in [
            ("/api/giveaway", "/api/giveaway"),
            ("/api/%67iveaway", "/api/giveaway"),
            ("/api/%67%49veaway", "/api/gIveaway"),
            ("/%61pi/giveaway%7e", "/api/giveaway~"),
            ("//api/giveaway", "/api/giveaway"),
            ("/api///giveaway", "/api/giveaway"),
            ("/api/./giveaway", "/api/giveaway"),
            ("/api/x/../giveaway", "/api/giveaway"),
            ("/api/x/%2e%2E/giveaway", "/api/giveaway"),
            ("/api/x//../giveaway", "/api/giveaway"),
            ("/../api/giveaway", "/api/giveaway"),
            ("/api/giveaway/", "/api/giveaway/"),
            ("/api/giveaway/.", "/api/giveaway/"),
            ("/api/giveaway/x/..", "/api/giveaway/"),
            ("/api/giveaway//", "/api/giveaway/"),
            ("/", "/"),
            ("//", "/"),
            ("/.", "/"),
            ("/..", "/"),
            // Reserved characters stay escaped (upper case): `%2F` is not a
            // segment break, `%25` not a `%`.
            ("/api%2fgiveaway", "/api%2Fgiveaway"),
            ("/a%252e%252e/b", "/a%252e%252e/b"),
            ("/a%20b", "/a%20b"),
            // Not escapes: a `%` as itself.
            ("/a%zz/%4", "/a%25zz/%254"),
            ("/%a%62", "/%25ab"),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            ("*", "*"),
            ("", ""),
        ] {
            assert_eq!(normalize_path(path), normal, "{path}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        for path in ["/api/giveaway", "/", "/a/b/", "/a%20b/%2F", "/a.b/..c"] {
            assert!(matches!(normalize_path(path), Cow::Borrowed(_)), "{path}");
        }
    }

    /// Every short path over the characters that matter: the scan says
    /// "normal" exactly when normalising changes nothing, and a normal
    /// path stays as it is.
    #[test]
    fn the_scan_agrees_with_normalising() {
        let alphabet = ['/', '.', 'a', '%', '2', 'e', 'E', 'f', '6'];
        let mut paths = vec![String::from("/")];
        let mut all = paths.clone();
        for _ in 0..6 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            all.extend(paths.iter().cloned());
        }
        for path in &all {
            let slow = normalize_slow(path);
            assert_eq!(is_normal(path), slow == *path, "{path} -> {slow}");
            assert_eq!(normalize_slow(&slow), slow, "{path} -> {slow}");
        }
    }

    #[test]
    fn guard_paths_take_the_same_form() {
        let m = |prefix: Option<&str>, exact: Option<&str>| Match {
            path_prefix: prefix.map(str::to_owned),
            path_exact: exact.map(str::to_owned),
            ..Match::default()
        };
        for (prefix, canonical) in [
            ("/api/giveaway/", "/api/giveaway"),
            ("/api//%67iveaway/./", "/api/giveaway"),
            ("/", "/"),
            ("//", "/"),
            ("/api/giveaway", "/api/giveaway"),
        ] {
            let got = canonical_match(&m(Some(prefix), None)).into_owned();
            assert_eq!(got, m(Some(canonical), None), "{prefix}");
        }
        let exact = m(None, Some("/api/%67iveaway/"));
        assert_eq!(
            canonical_match(&exact).into_owned(),
            m(None, Some("/api/giveaway/"))
        );
        let normal = m(Some("/api"), None);
        assert!(matches!(canonical_match(&normal), Cow::Borrowed(_)));
    }
}
