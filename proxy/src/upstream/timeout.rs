//! Per-try timeout: a `tower` layer that ends one try at its deadline, as
//! the inner service's own error type (no boxing), so a retry still sees it.
//! A request deadline reached while the client is still uploading moves
//! on (see [`UploadClock`]).

use crate::body::UploadClock;
use crate::outcome::TimedOut;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Wraps a one-try service in [`TryTimeout`] with a deadline set per try
/// (its start plus the smaller of `retries.per_try_timeout` and what is
/// left of `timeouts.request`: the try's own clock reading, not another),
/// which is why it is not `tower::timeout`: that one fixes the limit per
/// service and boxes every error into a `BoxError`, where a failed try's
/// error carries the unsent request back for a retry.
#[derive(Clone, Debug)]
pub struct TryTimeoutLayer {
    deadline: Instant,
    upload: Option<Box<UploadClock>>,
}

impl TryTimeoutLayer {
    /// A try must end by `deadline`.
    pub fn until(deadline: Instant) -> TryTimeoutLayer {
        TryTimeoutLayer {
            deadline,
            upload: None,
        }
    }

    /// The same, where `deadline` is the request's: it moves on while the
    /// upload `upload` watches is still coming (the request's time counts
    /// from the end of its body, as Envoy's route timeout does).
    pub fn with_upload(mut self, upload: Option<Box<UploadClock>>) -> TryTimeoutLayer {
        self.upload = upload;
        self
    }
}

impl<S> Layer<S> for TryTimeoutLayer {
    type Service = TryTimeout<S>;

    fn layer(&self, inner: S) -> TryTimeout<S> {
        TryTimeout {
            inner,
            deadline: self.deadline,
            upload: self.upload.clone(),
        }
    }
}

/// A service whose calls fail with `E::from(TimedOut)` at the deadline.
#[derive(Clone, Debug)]
pub struct TryTimeout<S> {
    inner: S,
    deadline: Instant,
    upload: Option<Box<UploadClock>>,
}

impl<S, R> Service<R> for TryTimeout<S>
where
    S: Service<R>,
    S::Error: From<TimedOut>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: R) -> Timed<S::Future> {
        // The timer first: the try's future (kilobytes) is then built
        // where it is returned, not moved after a call.
        let sleep = tokio::time::sleep_until(self.deadline);
        Timed {
            sleep,
            upload: self.upload.take(),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// One try under its deadline.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        upload: Option<Box<UploadClock>>,
    }
}

impl<F, T, E> Future for Timed<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<TimedOut>,
{
    type Output = Result<T, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let mut this = self.project();
        if let Poll::Ready(done) = this.inner.poll(cx) {
            return Poll::Ready(done);
        }
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let later = (this.upload.as_ref()).and_then(|u| u.moved_deadline(Instant::now()));
            match later {
                Some(at) => this.sleep.as_mut().reset(at),
                None => return Poll::Ready(Err(E::from(TimedOut))),
            }
        }
    }
}

/// Calls a stack of the request path, whose readiness never waits
/// (`service_fn` is always ready, [`TryTimeout`] is as ready as what it
/// wraps, admission sheds instead of queueing): readiness is polled once,
/// here, with a waker that does nothing, and the call's future is handed
/// back as it is. Not `ServiceExt::oneshot`: its state machine would move
/// the inner future (kilobytes, for the tries) twice more per request.
#[inline]
pub fn call_ready<S: Service<R>, R>(mut svc: S, req: R) -> S::Future {
    let ready = svc.poll_ready(&mut Context::from_waker(Waker::noop()));
    debug_assert!(
        matches!(ready, Poll::Ready(Ok(()))),
        "a stack of the request path was not ready at once"
    );
    svc.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorKind;
    use crate::upstream::connect::SendError;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    /// A try that answers after `wait`.
    async fn answer_after(wait: Duration) -> Result<u16, SendError> {
        tokio::time::sleep(wait).await;
        Ok(200)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_try_ends_as_a_timeout() {
        let limit = Duration::from_millis(100);
        let started = Instant::now();
        let slow = TryTimeoutLayer::until(started + limit).layer(service_fn(answer_after));
        let Err(e) = slow.oneshot(Duration::from_secs(5)).await else {
            panic!("a 5 s try under a 100 ms limit answered");
        };
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.unsent.is_none(), "a timed-out try counts as sent");
        let took = started.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_millis(5),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_within_its_limit_answers() {
        let deadline = Instant::now() + Duration::from_millis(100);
        let quick = TryTimeoutLayer::until(deadline).layer(service_fn(answer_after));
        let answer = quick.oneshot(Duration::from_millis(99)).await;
        assert_eq!(answer.ok(), Some(200));
        // Errors of the try pass through as they are.
        let failing = TryTimeoutLayer::until(deadline).layer(service_fn(|_: ()| async {
            Err::<u16, _>(SendError::sent(ErrorKind::Reset))
        }));
        let e = failing.oneshot(()).await.err().map(|e| e.kind);
        assert_eq!(e, Some(ErrorKind::Reset));
    }
}
