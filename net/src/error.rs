//! Error text: an error with every cause it carries, for logs and answers.

/// An error and its sources, `: `-joined: an HTTP client's own message
/// alone says only "client error (Connect)", not which connection or
/// certificate was refused.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod chain_tests {
    use super::error_chain;

    #[test]
    fn every_cause_is_named() {
        let io = std::io::Error::other("certificate expired");
        let outer = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, io);
        assert_eq!(error_chain(&outer), "certificate expired");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrap(std::io::Error::other("tls: unknown issuer"));
        assert_eq!(
            error_chain(&wrapped),
            "client error (Connect): tls: unknown issuer"
        );
    }
}
