//! The clock: one process epoch, so instants fit in atomics as
//! nanoseconds.

use std::sync::OnceLock;
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
