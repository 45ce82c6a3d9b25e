//! Percent-encoding of one URL component (a path segment or a query
//! value) that almond puts in a URL it builds, and the decoding of a query
//! string almond is sent.

use std::collections::HashMap;

/// `s` with every byte but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) written as `%XX`: safe as a path segment and
/// as a query key or value alike (`/`, `&`, `=`, `:`, `+` all escaped).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `key=value` pairs of a query string (`application/x-www-form-urlencoded`:
/// `%XX` and `+` decoded; a key without `=` has an empty value; the last of
/// a repeated key wins).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// `s` with `%XX` and `+` (a space) decoded; a `%` not followed by two hex
/// digits is kept as it is; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_as_forms_do() {
        let q = parse_query("path=%2Fapi%2Fgive+away&status=5xx&headers&bad=%zz&end=%41");
        assert_eq!(q["path"], "/api/give away");
        assert_eq!(q["status"], "5xx");
        assert_eq!(q["headers"], "");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["end"], "A");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode(&percent_encode("a b/c?é")), "a b/c?é");
    }

    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(percent_encode("Az09-._~"), "Az09-._~");
        assert_eq!(
            percent_encode("a b/c?d&e=f+g:h%"),
            "a%20b%2Fc%3Fd%26e%3Df%2Bg%3Ah%25"
        );
        assert_eq!(percent_encode("10.0.0.1:4191"), "10.0.0.1%3A4191");
        // UTF-8, byte by byte, upper-case hex.
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode(""), "");
    }
}
