//! Percent-encoding of one URL component (a path segment or a query
//! value) that almond puts in a URL it builds.

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

#[cfg(test)]
mod tests {
    use super::*;

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
