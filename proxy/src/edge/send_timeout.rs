//! Send timeout: a client that takes no byte of what the proxy writes for
//! `limits.body_idle` has its connection closed (Nginx's `send_timeout`).
//!
//! The timer is armed only while a write waits on the client, and
//! re-armed only when a wait begins after one that ended: a client that
//! reads as fast as it is sent to costs one branch a write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `io`, whose writes fail with `TimedOut` once one has waited `limit`
/// with no byte taken.
pub struct SendTimeout<IO> {
    io: IO,
    limit: Duration,
    /// Made at the first wait, kept for the next ones.
    stall: Option<Pin<Box<Sleep>>>,
    /// A write is waiting: the timer runs from when it began.
    waiting: bool,
}

impl<IO> SendTimeout<IO> {
    /// Wraps `io`: no wait for the client longer than `limit`.
    pub fn new(io: IO, limit: Duration) -> SendTimeout<IO> {
        SendTimeout {
            io,
            limit,
            stall: None,
            waiting: false,
        }
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// What a write (or flush) polled: done, or waiting on the client no
    /// longer than `limit` since the wait began.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let until = Instant::now() + self.limit;
        let stall = match &mut self.stall {
            Some(stall) => {
                if !self.waiting {
                    stall.as_mut().reset(until);
                }
                stall
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep_until(until))),
        };
        self.waiting = true;
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no byte for limits.body_idle",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing fails the write after the limit, not
    /// before; one that reads keeps it going however long it takes.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_limit() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut io = SendTimeout::new(near, Duration::from_secs(60));
        let start = Instant::now();
        let big = vec![b'x'; 64 * 1024];
        let err = io.write_all(&big).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(60));

        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = SendTimeout::new(near, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut total = 0;
            loop {
                // Slow, but never 60 s without a byte.
                tokio::time::sleep(Duration::from_secs(30)).await;
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        io.write_all(&vec![b'y'; 8 * 1024])
            .await
            .expect("a slow reader is waited for");
        drop(io);
        assert_eq!(reader.await.expect("reader"), 8 * 1024);
    }
}
