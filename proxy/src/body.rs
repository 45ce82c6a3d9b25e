//! Bodies on both sides of the proxy; they stream, never buffer whole.
//!
//! [`ResponseBody`] carries the request's [`Finish`](crate::send::Finish) guard to the end of the
//! response stream: dropping it ends the in-flight accounting and, for
//! HTTP/1.1, puts the upstream connection back in its pool.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What the proxy sends upstream: the client's body as it arrives, or a
/// copy kept for replay (retries).
pub enum RequestBody {
    /// Streamed from the client; cannot be sent twice.
    Stream(Incoming),
    /// Held whole (small bodies, when retries are on); `None` once sent.
    Replay(Option<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Stream(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Replay(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(body) => body.is_end_stream(),
            RequestBody::Replay(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(body) => body.size_hint(),
            RequestBody::Replay(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Replay(None) => SizeHint::with_exact(0),
        }
    }
}

/// What the proxy sends downstream.
pub struct ResponseBody {
    kind: Kind,
    /// Runs when the body is done or dropped.
    finish: Option<crate::send::Finish>,
}

enum Kind {
    /// A body made by the proxy (errors, admin pages).
    Full(Option<Bytes>),
    /// The upstream's body, streamed through.
    Upstream(Incoming),
}

impl ResponseBody {
    /// A complete body made by the proxy.
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            finish: None,
        }
    }

    /// An empty body.
    pub fn empty() -> ResponseBody {
        ResponseBody {
            kind: Kind::Full(None),
            finish: None,
        }
    }

    /// The upstream's body; `finish` runs when it ends or is dropped.
    pub fn upstream(body: Incoming, finish: crate::send::Finish) -> ResponseBody {
        let mut body = ResponseBody {
            kind: Kind::Upstream(body),
            finish: Some(finish),
        };
        body.finish_if_done();
        body
    }

    fn finish_if_done(&mut self) {
        if self.is_end_stream() {
            if let Some(finish) = self.finish.take() {
                finish.done(true);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(false);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.finish_if_done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}
