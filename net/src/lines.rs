//! A streaming response body of lines handed over a channel, with an empty
//! line after a quiet spell, so a client that went away is noticed (the
//! write fails) and whatever `G` holds open for it is dropped. It ends when
//! every sender is gone.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Lines from `rx`, each a frame, for as long as the client reads; `G`
/// (a guard) is dropped with the body.
pub struct Lines<G> {
    rx: mpsc::Receiver<Bytes>,
    heartbeat: tokio::time::Interval,
    _guard: G,
}

impl<G> Lines<G> {
    /// A body of what `rx` receives, with `\n` alone after `quiet` without
    /// a line; it ends once every sender is dropped and the lines are out.
    pub fn new(rx: mpsc::Receiver<Bytes>, quiet: Duration, guard: G) -> Lines<G> {
        let first = tokio::time::Instant::now() + quiet;
        Lines {
            rx,
            heartbeat: tokio::time::interval_at(first, quiet),
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for Lines<G> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => {
                self.heartbeat.reset();
                return Poll::Ready(Some(Ok(Frame::data(line))));
            }
            // Nothing will come any more: the client is told by the end.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.heartbeat.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\n"))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lines_then_heartbeats_then_the_end() {
        use http_body_util::BodyExt;
        let (tx, rx) = mpsc::channel(4);
        let mut body = Lines::new(rx, Duration::from_secs(5), ());
        tx.send(Bytes::from_static(b"one\n")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"one\n");
        let start = tokio::time::Instant::now();
        let beat = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&beat[..], b"\n");
        assert!(start.elapsed() >= Duration::from_secs(5));
        tx.send(Bytes::from_static(b"last\n")).await.unwrap();
        drop(tx);
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&last[..], b"last\n");
        assert!(
            body.frame().await.is_none(),
            "no sender left: the body ends"
        );
    }
}
