//! Shed: admission as a `tower` layer -- `poll_ready` takes a place under
//! the service's concurrency limit, `call` hands it to the inner service
//! with the request, or answers at once (503) when there was none.

use crate::limit::Admission;
use crate::pipeline::admit::Admitted;
use futures_util::future::Either;
use prometheus::IntGauge;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// A request the proxy can refuse itself: its answer when shed.
pub trait Refuse<Resp> {
    /// The answer to a request shed for want of a place.
    fn refuse(self) -> Resp;
}

/// Wraps a service in [`Shed`] under one service's limit. Not
/// `tower::load_shed` over `tower::limit`: their permit ends with the
/// response future, where ours must live until the response *body* ends
/// (it travels in the body's `Finish`), and their `Overloaded` error is a
/// `BoxError`, where a shed request is an ordinary 503 response here.
#[derive(Clone, Copy)]
pub struct ShedLayer<'a> {
    admission: &'a Arc<Admission>,
    in_flight: &'a IntGauge,
}

impl<'a> ShedLayer<'a> {
    /// Places from `admission`, counted in `in_flight` while held.
    pub fn new(admission: &'a Arc<Admission>, in_flight: &'a IntGauge) -> ShedLayer<'a> {
        ShedLayer {
            admission,
            in_flight,
        }
    }
}

impl<'a, S> Layer<S> for ShedLayer<'a> {
    type Service = Shed<'a, S>;

    fn layer(&self, inner: S) -> Shed<'a, S> {
        Shed {
            inner,
            admission: self.admission,
            in_flight: self.in_flight,
            admitted: None,
        }
    }
}

/// Sheds what finds the service full: always ready (it never queues), a
/// call without a place taken in `poll_ready` is refused. The inner
/// service gets the request with its place, `(R, Admitted)`.
pub struct Shed<'a, S> {
    inner: S,
    admission: &'a Arc<Admission>,
    in_flight: &'a IntGauge,
    /// The place taken by `poll_ready` for the next call.
    admitted: Option<Admitted>,
}

impl<S, R> Service<R> for Shed<'_, S>
where
    S: Service<(R, Admitted)>,
    R: Refuse<S::Response>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.admitted.is_none() {
            self.admitted = Admitted::try_new(self.admission, self.in_flight);
        }
        match self.admitted {
            Some(_) => self.inner.poll_ready(cx),
            // Full: ready all the same, to refuse the call at once.
            None => Poll::Ready(Ok(())),
        }
    }

    #[inline]
    fn call(&mut self, req: R) -> Self::Future {
        match self.admitted.take() {
            Some(admitted) => Either::Left(self.inner.call((req, admitted))),
            None => Either::Right(ready(Ok(req.refuse()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Response, StatusCode};
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::pin::Pin;
    use tower::{service_fn, ServiceExt};

    /// A response body that holds its request's place until it ends.
    struct Held {
        data: Option<Bytes>,
        admitted: Option<Admitted>,
    }

    impl Body for Held {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            let frame = self.data.take();
            if frame.is_none() {
                self.admitted = None;
            }
            Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
        }
    }

    struct Req;

    impl Refuse<Response<Held>> for Req {
        fn refuse(self) -> Response<Held> {
            let mut resp = Response::new(Held {
                data: None,
                admitted: None,
            });
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp
        }
    }

    async fn answer((Req, admitted): (Req, Admitted)) -> Result<Response<Held>, Infallible> {
        Ok(Response::new(Held {
            data: Some(Bytes::from_static(b"hello")),
            admitted: Some(admitted),
        }))
    }

    #[tokio::test]
    async fn sheds_over_the_limit_until_a_body_ends() -> Result<(), Infallible> {
        let admission = Arc::new(Admission::new(1));
        let Ok(gauge) = IntGauge::new("in_flight", "test") else {
            panic!("gauge");
        };
        let stack = || ShedLayer::new(&admission, &gauge).layer(service_fn(answer));

        let first = stack().oneshot(Req).await?;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(gauge.get(), 1);
        // Full: the next request is answered 503 at once, never reaching the inner service.
        let shed = stack().oneshot(Req).await?;
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(gauge.get(), 1);

        // The place is held while the body streams and freed when it ends.
        let mut body = first.into_body();
        let chunk = body.frame().await.and_then(|f| f.ok()?.into_data().ok());
        assert_eq!(chunk.as_deref(), Some(&b"hello"[..]));
        assert_eq!(gauge.get(), 1);
        assert_eq!(
            stack().oneshot(Req).await?.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(body.frame().await.is_none());
        assert_eq!(gauge.get(), 0);
        assert_eq!(stack().oneshot(Req).await?.status(), StatusCode::OK);
        drop(body);
        Ok(())
    }

    #[tokio::test]
    async fn a_place_taken_but_never_used_is_freed() {
        let admission = Arc::new(Admission::new(1));
        let Ok(gauge) = IntGauge::new("in_flight", "test") else {
            panic!("gauge");
        };
        let mut svc = ShedLayer::new(&admission, &gauge).layer(service_fn(answer));
        assert!(svc.ready().await.is_ok());
        assert_eq!(gauge.get(), 1);
        drop(svc);
        assert_eq!(gauge.get(), 0);
        assert!(admission.try_acquire().is_some());
    }
}
