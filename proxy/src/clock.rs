//! The clock: one process epoch, so instants fit in atomics as
//! nanoseconds.

use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// The instant all stamps count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `now` in nanoseconds since the process epoch (for atomics).
#[inline]
pub fn nanos_since_epoch(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_nanos() as u64
}

/// The instant `nanos` after the process epoch (a stamp read back).
#[inline]
pub fn instant_at(nanos: u64) -> Instant {
    epoch() + Duration::from_nanos(nanos)
}
