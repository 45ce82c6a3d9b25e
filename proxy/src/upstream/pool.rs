//! Pool: an endpoint's idle HTTP/1.1 connections (hyper's and the lean
//! client's), most recently used last -- a stack: the next request takes
//! the warmest one, the coldest age out. The lock is per endpoint and held
//! for one push or pop.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A connection that can wait in a [`Pool`].
pub trait Reusable {
    /// Is it still fit to carry a request (not closed, nothing arrived
    /// unasked while it was idle)?
    fn usable(&self) -> bool;

    /// It goes idle now, its response all read: is it still fit
    /// (nothing came past the response)?
    fn parked(&mut self) -> bool {
        true
    }
}

/// A boxed connection is as reusable as what it holds.
impl<T: Reusable> Reusable for Box<T> {
    fn usable(&self) -> bool {
        (**self).usable()
    }

    fn parked(&mut self) -> bool {
        (**self).parked()
    }
}

/// Idle connections of one kind to one endpoint.
pub struct Pool<T> {
    idle: Mutex<Vec<(T, Instant)>>,
    max: usize,
}

impl<T: Reusable> Pool<T> {
    /// A pool keeping at most `max` idle connections (more are closed).
    pub fn new(max: usize) -> Pool<T> {
        Pool {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    /// The most recently used idle connection still usable and idle for
    /// less than `idle_timeout`; older and unusable ones are closed.
    pub fn pop(&self, now: Instant, idle_timeout: Duration) -> Option<T> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < idle_timeout && conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose response is complete, idle `since` (an
    /// unusable one, or one over `max`, is closed).
    pub fn push(&self, mut conn: T, since: Instant) {
        if !conn.parked() || !conn.usable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max {
            idle.push((conn, since));
        }
    }

    /// Closes the connections idle `idle_timeout` or more, or no longer
    /// usable; returns how many are left.
    pub fn close_idle(&self, now: Instant, idle_timeout: Duration) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(conn, since)| {
            now.saturating_duration_since(*since) < idle_timeout && conn.usable()
        });
        idle.len()
    }
}
