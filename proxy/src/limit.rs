//! Limit: a lock-free count of places that refuses at once when full
//! instead of queueing (a service's `max_requests`, its `max_pending`
//! connects).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Places taken and their limit.
pub struct Admission {
    in_flight: AtomicU32,
    limit: AtomicU32,
}

/// One place; dropping it frees it.
pub struct Permit(Arc<Admission>);

impl Admission {
    /// A limit of `limit` requests in flight.
    pub fn new(limit: u32) -> Admission {
        Admission {
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
        }
    }

    /// Changes the limit (a config update); requests in flight stay.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Admits a request, or `None` when the service is full.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        let prev = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if prev >= limit {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit(self.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_over_the_limit_and_recovers() {
        let a = Arc::new(Admission::new(2));
        let p1 = a.try_acquire();
        let p2 = a.try_acquire();
        assert!(p1.is_some() && p2.is_some());
        assert!(a.try_acquire().is_none());
        drop(p1);
        assert!(a.try_acquire().is_some());
    }
}
