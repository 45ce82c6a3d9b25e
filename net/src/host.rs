//! This host: its name and its wall clock, as every almond process reads
//! them.

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

#[cfg(test)]
mod tests {
    use super::*;

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
