//! mTLS checks of a proxy config: what `tls` listeners and services need
//! ([`check`], pure, part of `validate_proxy`) and whether the PEM files
//! can be read ([`check_files`], run by `load_proxy`, so `check-config`
//! and start-up refuse a missing key before any socket is bound).

use crate::problem::Problem;
use crate::proxy::ProxyConfig;
use std::path::Path;

/// The name a `tls` service's upstream certificate is checked against
/// (and sent as SNI) must be one rustls accepts, or every connection would
/// fail: `(path under the service, message)` if not. Also checked in
/// registry files, which have no proxy identity to check against.
pub fn check_server_name(name: &str, svc: &crate::proxy::Service) -> Option<(String, String)> {
    let tls = svc.tls.as_ref()?;
    let (key, server_name) = match tls.server_name.as_deref() {
        Some(given) => (".tls.server_name", given),
        None => (".tls", name),
    };
    if server_name.is_empty() {
        return Some((key.into(), "must not be empty".into()));
    }
    if rustls_pki_types::ServerName::try_from(server_name).is_err() {
        let whose = match tls.server_name {
            Some(_) => "",
            None => " (the service's name, the default server_name; set tls.server_name)",
        };
        return Some((
            key.into(),
            format!("{server_name:?} is not a DNS name or IP address{whose}"),
        ));
    }
    None
}

/// Problems of the `tls` keys that need no file system: `(path, message)`.
pub fn check(config: &ProxyConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let has_identity = config.tls.is_some();
    for (i, l) in config.listeners.iter().enumerate() {
        if l.tls && !has_identity {
            out.push((
                format!("listeners[{i}].tls"),
                "needs the proxy-level `tls` (cert, key, ca)".into(),
            ));
        }
        if !l.allow.is_empty() && !l.tls {
            out.push((
                format!("listeners[{i}].allow"),
                "needs `tls: true`: identities come from client certificates".into(),
            ));
        }
        for (j, id) in l.allow.iter().enumerate() {
            if let Err(why) = crate::proxy::check_identity(id) {
                out.push((format!("listeners[{i}].allow[{j}]"), why));
            }
        }
    }
    for (name, svc) in &config.services {
        if svc.tls.is_some() && !has_identity {
            out.push((
                format!("services.{name}.tls"),
                "needs the proxy-level `tls` (cert, key, ca)".into(),
            ));
        }
        out.extend(
            check_server_name(name, svc).map(|(key, why)| (format!("services.{name}{key}"), why)),
        );
    }
    out
}

/// Each of `tls.cert`, `tls.key` and `tls.ca` must be a readable PEM file.
/// (The proxy parses them at start; this catches the common mistakes with
/// the key path named.)
pub fn check_files(config: &ProxyConfig) -> Vec<Problem> {
    let Some(tls) = &config.tls else {
        return Vec::new();
    };
    [
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
        ("tls.ca", &tls.ca),
    ]
    .into_iter()
    .filter_map(|(path, file)| {
        problem_of(file).map(|message| Problem {
            path: path.into(),
            line: None,
            message,
        })
    })
    .collect()
}

/// Why `file` is not a usable PEM file, if it is not.
fn problem_of(file: &Path) -> Option<String> {
    match std::fs::read(file) {
        Err(e) => Some(format!("cannot read {}: {e}", file.display())),
        Ok(bytes) if !bytes.windows(11).any(|w| w == b"-----BEGIN ") => {
            Some(format!("{} is not a PEM file", file.display()))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::load_proxy;

    fn paths(text: &str) -> Vec<String> {
        match load_proxy(text, "t.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| p.path).collect(),
        }
    }

    #[test]
    fn tls_listener_needs_the_proxy_identity() {
        let text = "listeners:\n  - bind: 127.0.0.1:1\n    tls: true\n    allow: [\"dns:a\"]\n";
        assert_eq!(paths(text), vec!["listeners[0].tls"]);
    }

    #[test]
    fn allow_needs_a_tls_listener() {
        let text = "listeners:\n  - bind: 127.0.0.1:1\n    allow: [\"dns:a\"]\n";
        assert_eq!(paths(text), vec!["listeners[0].allow"]);
    }

    #[test]
    fn service_tls_takes_a_flag_or_a_name() {
        let base = "services:\n  a:\n    endpoints: [{ addr: 127.0.0.1:1 }]\n    tls: ";
        assert_eq!(paths(&format!("{base}true\n")), vec!["services.a.tls"]);
        assert_eq!(paths(&format!("{base}false\n")), Vec::<String>::new());
        assert_eq!(
            paths(&format!("{base}{{ server_name: b }}\n")),
            vec!["services.a.tls"]
        );
        assert_eq!(paths(&format!("{base}7\n")), vec!["services.a.tls"]);
    }

    #[test]
    fn the_upstream_server_name_must_be_one_tls_accepts() {
        let with = |name: &str, tls: &str| {
            let text = format!(
                "tls: {{ cert: c.pem, key: k.pem, ca: ca.pem }}\nservices:\n  {name}:\n    endpoints: [{{ addr: 127.0.0.1:1 }}]\n    tls: {tls}\n"
            );
            match load_proxy(&text, "t.yaml") {
                Ok(_) => Vec::new(),
                Err(e) => (e.problems.into_iter())
                    .filter(|p| p.path.starts_with("services."))
                    .map(|p| (p.path, p.message))
                    .collect(),
            }
        };
        let bad = with("a", "{ server_name: \"api .internal\" }");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0, "services.a.tls.server_name");
        assert!(bad[0].1.contains("not a DNS name"), "{}", bad[0].1);
        // The default is the service's name: one that is no DNS name says
        // so (beside the name's own problem, in a static config).
        let bad = with("\"a b\"", "true");
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].0, "services.a b");
        assert_eq!(bad[1].0, "services.a b.tls");
        assert!(bad[1].1.contains("set tls.server_name"), "{}", bad[1].1);
        // Names and addresses rustls takes pass.
        assert_eq!(with("a", "{ server_name: api.internal }"), vec![]);
        assert_eq!(with("a", "{ server_name: 10.0.0.7 }"), vec![]);
        assert_eq!(with("my_svc", "true"), vec![]);
    }

    #[test]
    fn unreadable_files_are_named_by_key() {
        let text =
            "tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem, ca: /nonexistent/ca.pem }\n";
        assert_eq!(paths(text), vec!["tls.cert", "tls.key", "tls.ca"]);
    }
}
