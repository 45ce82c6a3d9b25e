//! Tokens named by a config (`token_env`, `proxy_token_env`,
//! `admin_token_env`): read from the environment at start, failing closed,
//! and compared in constant time.

use subtle::ConstantTimeEq;

/// A bearer token from the environment. Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The token in environment variable `var`, named by config key `key`,
    /// without the spaces and line ends around it (a file made with `echo`
    /// or a secret store ends in a newline, which no header can carry);
    /// unset, empty, not UTF-8 or holding a control byte is an error naming
    /// both (a configured token that is missing must not mean "no token",
    /// nor one that can never match).
    pub fn from_env(key: &str, var: &str) -> Result<Secret, String> {
        match std::env::var(var) {
            Ok(v) if v.trim().bytes().any(|b| b.is_ascii_control()) => Err(format!(
                "{key}: environment variable {var} holds a control character (a tab or a line end inside the token); set it to the token alone"
            )),
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().as_bytes().into())),
            Ok(_) => Err(format!(
                "{key}: environment variable {var} is empty; set it to the token, or remove {key}"
            )),
            Err(_) => Err(format!(
                "{key}: environment variable {var} is not set; set it to the token, or remove {key}"
            )),
        }
    }

    /// For a config's optional `*_token_env` key.
    pub fn from_config(key: &str, var: Option<&str>) -> Result<Option<Secret>, String> {
        var.map(|var| Secret::from_env(key, var)).transpose()
    }

    /// A token given directly (tests, the CLI's `--token`).
    pub fn new(token: &str) -> Secret {
        Secret(token.as_bytes().into())
    }

    /// Whether `given` is this token, in time that does not depend on
    /// where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        self.0.ct_eq(given).into()
    }

    /// Whether an `Authorization` header value is `Bearer <this token>`.
    /// The scheme's name is matched without regard to case and may be
    /// followed by several spaces (RFC 9110 section 11.1: `bearer` and
    /// `BEARER` are the same scheme, as Envoy and nginx take them).
    pub fn matches_bearer(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, token)) = value.split_at_checked(6) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"Bearer") || token.first() != Some(&b' ') {
            return false;
        }
        let start = token.iter().position(|&b| b != b' ').unwrap_or(token.len());
        self.matches(&token[start..])
    }

    /// The token, for sending it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_variable_is_an_error_naming_it() {
        let err = Secret::from_env("token_env", "ALMOND_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(
            err.contains("ALMOND_TEST_SURELY_UNSET_VAR") && err.contains("not set"),
            "{err}"
        );
        std::env::set_var("ALMOND_TEST_EMPTY_TOKEN_VAR", "  ");
        let err = Secret::from_env("token_env", "ALMOND_TEST_EMPTY_TOKEN_VAR").unwrap_err();
        assert!(err.contains("is empty"), "{err}");
    }

    /// A token file made with `echo` ends in a newline: the token is what
    /// is around it, and it matches; a control byte inside is refused.
    #[test]
    fn spaces_around_a_token_are_not_part_of_it() {
        std::env::set_var("ALMOND_TEST_NEWLINE_TOKEN_VAR", " s3cret\n");
        let s = Secret::from_env("token_env", "ALMOND_TEST_NEWLINE_TOKEN_VAR").unwrap();
        assert!(s.matches_bearer(Some(b"Bearer s3cret")));
        assert_eq!(s.expose(), b"s3cret");
        std::env::set_var("ALMOND_TEST_TAB_TOKEN_VAR", "s3\tcret");
        let err = Secret::from_env("token_env", "ALMOND_TEST_TAB_TOKEN_VAR").unwrap_err();
        assert!(err.contains("ALMOND_TEST_TAB_TOKEN_VAR"), "{err}");
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let s = Secret::new("s3cret");
        assert!(s.matches_bearer(Some(b"Bearer s3cret")));
        assert!(!s.matches_bearer(Some(b"Bearer s3cre")));
        assert!(!s.matches_bearer(Some(b"Bearer s3cret2")));
        assert!(!s.matches_bearer(Some(b"Bearers3cret")));
        assert!(!s.matches_bearer(Some(b"Bearer ")));
        assert!(!s.matches_bearer(Some(b"Basic s3cret")));
        assert!(!s.matches_bearer(Some(b"s3cret")));
        assert!(!s.matches_bearer(None));
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }

    /// The scheme is a case-insensitive name (RFC 9110 section 11.1), and
    /// one or more spaces part it from the token.
    #[test]
    fn the_scheme_is_matched_without_regard_to_case() {
        let s = Secret::new("s3cret");
        assert!(s.matches_bearer(Some(b"bearer s3cret")));
        assert!(s.matches_bearer(Some(b"BEARER s3cret")));
        assert!(s.matches_bearer(Some(b"Bearer   s3cret")));
        assert!(!s.matches_bearer(Some(b"bearer S3CRET")));
    }
}
