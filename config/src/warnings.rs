//! Settings that are allowed but probably a mistake: `check-config` lists
//! them and the process logs them at start; they never refuse a config.

use std::net::IpAddr;

use crate::{ControlConfig, Direction, Problem, ProxyConfig, Source};

/// A proxy config's warnings, without lines (see [`locate`]).
pub fn proxy_warnings(config: &ProxyConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if l.direction == Direction::Outbound && !l.tls && !l.bind.ip().is_loopback() {
            out.push(warning(
                format!("listeners[{i}].bind"),
                format!(
                    "an outbound listener on {} without `tls` lets any host that reaches it \
                     call {} through this proxy, as this host; bind it to 127.0.0.1, or set \
                     `direction: inbound` with `tls: true`",
                    l.bind.ip(),
                    match &l.service {
                        Some(s) => format!("`{s}`"),
                        None => "every service".into(),
                    }
                ),
            ));
        }
    }
    if config.control.is_none() && config.services.is_empty() {
        out.push(warning(
            "services".into(),
            "none, and no `control` to send any: every request is answered 404 \
             (an empty or truncated file?)"
                .into(),
        ));
    }
    if let Some(url) = &config.control {
        if let Some(host) = cleartext_remote(url) {
            let what = if config.token_env.is_some() {
                "its token (token_env) and the snapshots that say where traffic goes"
            } else {
                "the snapshots that say where traffic goes"
            };
            out.push(warning(
                "control".into(),
                format!("http:// to {host}, off this host: {what} cross the network in cleartext; use https://"),
            ));
        }
    }
    out
}

/// A control config's warnings, without lines (see [`locate`]).
pub fn control_warnings(config: &ControlConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    if config.token_env.is_none() {
        out.push(warning(
            "token_env".into(),
            "not set: anyone who reaches the API can change splits and rollouts".into(),
        ));
    }
    let has_token = config.token_env.is_some() || config.proxy_token_env.is_some();
    if config.tls.is_none() && has_token && !config.listen.ip().is_loopback() {
        out.push(warning(
            "listen".into(),
            format!(
                "{} without `tls`: operators' and proxies' tokens cross the network in cleartext",
                config.listen.ip()
            ),
        ));
    }
    // Allowed (a mount may come later), but nothing is served until then.
    if let Source::File(dir) = &config.source {
        if !dir.is_dir() {
            let why = match std::fs::metadata(dir) {
                Ok(_) => "not a directory".to_owned(),
                Err(e) => e.to_string(),
            };
            out.push(warning(
                "source.file".into(),
                format!(
                    "{}: {why}: the control plane stays unready, serving nothing, until it is \
                     a readable directory",
                    dir.display()
                ),
            ));
        }
    }
    if let Source::Consul(c) = &config.source {
        if let Some(host) = cleartext_remote(&c.addr) {
            out.push(warning(
                "source.consul.addr".into(),
                format!(
                    "http:// to {host}, off this host: the Consul token ({}) and the policies \
                     cross the network in cleartext; use https:// or a local Consul agent",
                    c.token_env
                ),
            ));
        }
    }
    out
}

/// Puts each warning's line in `text` (the file the config came from).
pub fn locate(text: &str, warnings: &mut [Problem]) {
    let index = crate::lines::LineIndex::build(text);
    for w in warnings {
        w.line = index.line_of(&w.path);
    }
}

fn warning(path: String, message: String) -> Problem {
    Problem {
        path,
        line: None,
        message,
    }
}

/// The host of an `http://` URL that is not this machine (`localhost` or
/// a loopback address); `None` for `https://` and local hosts.
fn cleartext_remote(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let local = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!local).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::cleartext_remote;

    #[test]
    fn remote_http_hosts() {
        assert_eq!(cleartext_remote("http://10.0.0.5:9000"), Some("10.0.0.5"));
        assert_eq!(
            cleartext_remote("http://control.internal/x"),
            Some("control.internal")
        );
        assert_eq!(
            cleartext_remote("http://[2001:db8::1]:80"),
            Some("2001:db8::1")
        );
        assert_eq!(cleartext_remote("http://u:p@10.1.1.1:80"), Some("10.1.1.1"));
        for local in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://LOCALHOST",
            "http://[::1]:9000",
            "http://127.8.0.1",
            "https://10.0.0.5:9000",
        ] {
            assert_eq!(cleartext_remote(local), None, "{local}");
        }
    }
}
