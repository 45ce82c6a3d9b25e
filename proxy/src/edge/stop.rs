//! Stop: the proxy's stop signal as a connection watches it, polled on
//! every wake of the connection's task without taking a shared lock; and
//! the cut that ends the connections a drain left.

use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::sync::watch;

pin_project! {
    /// Resolves once the stop signal changes (or its sender is gone), as
    /// `stop.changed()` does. A connection's task polls it at every wake
    /// (every read, every answer): `changed()` takes the channel's waiter
    /// lock, one for every connection of every worker, at each poll;
    /// this reads one atomic while nothing changed and the task's waker is
    /// the one already registered.
    pub struct Stopping<F> {
        #[pin]
        changed: F,
        peek: watch::Receiver<bool>,
        registered: Option<Waker>,
    }
}

/// Watches `stop` (a connection's copy of the proxy's stop signal).
pub fn stopping(stop: watch::Receiver<bool>) -> Stopping<impl Future<Output = ()>> {
    let peek = stop.clone();
    let changed = async move {
        let mut stop = stop;
        // A sender gone is a stop too.
        let _ = stop.changed().await;
    };
    Stopping {
        changed,
        peek,
        registered: None,
    }
}

impl<F: Future<Output = ()>> Future for Stopping<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let quiet = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
            && matches!(this.peek.has_changed(), Ok(false));
        if quiet {
            return Poll::Pending;
        }
        match this.changed.poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                *this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Runs the connection `conn` until it ends, or until `cut` changes (the
/// drain's time is up): then `conn` is dropped, with the requests still in
/// it, while the runtime runs (their access log lines are written).
pub async fn unless_cut<F: Future<Output = ()>>(cut: watch::Receiver<bool>, conn: F) {
    let conn = std::pin::pin!(conn);
    let cut = std::pin::pin!(stopping(cut));
    // The connection first: the cut is one atomic read a wake.
    futures_util::future::select(conn, cut).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A counting waker, and its count.
    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn resolves_when_the_signal_changes_and_wakes_the_last_waker() {
        let (tx, rx) = watch::channel(false);
        let mut stop = pin!(stopping(rx));
        let (first, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(stop.as_mut().poll(&mut cx).is_pending());
        assert!(stop.as_mut().poll(&mut cx).is_pending());
        // Polled from another task now: that task's waker is the one woken.
        let (second, other) = counting();
        assert!(stop
            .as_mut()
            .poll(&mut Context::from_waker(&other))
            .is_pending());
        tx.send_replace(true);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert!(stop.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_sender_gone_is_a_stop() {
        let (tx, rx) = watch::channel(false);
        let mut stop = pin!(stopping(rx));
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(stop.as_mut().poll(&mut cx).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(stop.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_signal_changed_before_the_first_poll_is_seen() {
        let (tx, rx) = watch::channel(false);
        let mut stop = pin!(stopping(rx));
        tx.send_replace(true);
        let waker = Waker::noop();
        assert!(stop
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready());
    }
}
