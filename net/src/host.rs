//! This host: its name and its wall clock, as every almond process reads
//! them, and whether a `Host` header names it locally (the loopback
//! listeners' answer to DNS rebinding).

use std::time::SystemTime;

/// This host's name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else
/// `default` (a name that says which kind of process this is).
pub fn hostname(default: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| default.to_owned())
}

/// Wall-clock now, in milliseconds since the Unix epoch (0 for a clock
/// set before 1970). For timestamps that outlive the process; measure
/// intervals with tokio's clock instead.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Is `host` (a `Host` header) this machine by a local name: `localhost`
/// or a loopback address, with or without a port? A listener on loopback
/// trusts who reaches it, but only when asked by such a name: a page in a
/// browser on this host whose own name was rebound to 127.0.0.1 (DNS
/// rebinding) sends that name.
pub fn local_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // `[::1]:4191`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_are_localhost_and_loopback_addresses() {
        for host in [
            "localhost",
            "LOCALHOST:4180",
            "127.0.0.1",
            "127.0.0.1:4180",
            "127.1.2.3:80",
            "[::1]:4180",
            "[::1]",
        ] {
            assert!(local_host(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:4180",
            "localhost.evil.example",
            "10.0.0.1:4180",
            "[::2]:4180",
            "",
        ] {
            assert!(!local_host(host.as_bytes()), "{host}");
        }
        assert!(!local_host(b"\xff:80"));
    }

    #[test]
    fn a_host_always_has_a_name() {
        let name = hostname("fallback");
        assert!(!name.is_empty());
        assert_eq!(name, name.trim());
        if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            if !kernel.trim().is_empty() {
                assert_eq!(name, kernel.trim());
            }
        }
    }

    #[test]
    fn now_is_after_2020_in_milliseconds() {
        let now = now_ms();
        // 2020-01-01 and 2100-01-01, in ms.
        assert!(now > 1_577_836_800_000 && now < 4_102_444_800_000, "{now}");
    }
}
