//! Tunnel: an upgraded connection (WebSocket) after its 101, bytes copied
//! both ways until a side closes, it idles `limits.idle_timeout`, or the
//! proxy's drain ends; `forward` opens them on a 101 (each holding its
//! request's places in flight), `Proxy::run` waits for them.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxy's open tunnels: each one a task of its own, outside any
/// connection's (hyper hands the sockets over and is done).
pub struct Tunnels {
    /// `limits.idle_timeout`: no byte either way for this long closes one.
    idle: Duration,
    /// What the drain waits for.
    tasks: TaskTracker,
    /// Cancelled when the drain's time is up.
    closing: CancellationToken,
}

/// An upgrade request's client half, and the tunnels it will join once
/// the upstream answers 101.
pub struct Upgrade {
    /// The client's half, which hyper's server hands over after the 101.
    pub client: OnUpgrade,
    /// Where its tunnel goes.
    pub tunnels: Arc<Tunnels>,
}

impl Tunnels {
    /// No tunnel yet; each one closes after `idle` with no byte moved.
    pub fn new(idle: Duration) -> Tunnels {
        Tunnels {
            idle,
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
        }
    }

    /// Joins both upgraded halves and copies bytes both ways, in a task
    /// of its own, until either side closes, neither sends a byte for the
    /// idle time, or [`close`](Tunnels::close); `hold` (the request's
    /// places in flight) is dropped then.
    pub fn open<H: Send + 'static>(&self, downstream: OnUpgrade, upstream: OnUpgrade, hold: H) {
        // A child token of its own: the task polls it at every wake, and
        // each poll locks the token's node (a shared one would be one lock
        // for every tunnel of every worker).
        let (idle, closing) = (self.idle, self.closing.child_token());
        self.tasks.spawn(async move {
            let _hold = hold;
            tokio::select! {
                () = copy(downstream, upstream, idle) => {}
                () = closing.cancelled() => tracing::debug!("proxy stopped: tunnel closed"),
            }
        });
    }

    /// Resolves once every tunnel has ended by itself. Call it when no
    /// new one can open (the connections are done: upgrades happen on them).
    pub async fn ended(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Closes every tunnel (both sockets), now and any opened later, and
    /// waits for their tasks to end.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The tunnel itself: both halves joined, then copied both ways; dropping
/// them (at the end, or when idle) closes both sockets.
async fn copy(downstream: OnUpgrade, upstream: OnUpgrade, idle: Duration) {
    let (down, up) = match tokio::join!(downstream, upstream) {
        (Ok(down), Ok(up)) => (down, up),
        (down, up) => {
            let (downstream, upstream) = (down.is_ok(), up.is_ok());
            return tracing::debug!(downstream, upstream, "upgrade failed");
        }
    };
    let moved = Moved::new();
    let mut down = Watched {
        io: TokioIo::new(down),
        moved: &moved,
    };
    let mut up = Watched {
        io: TokioIo::new(up),
        moved: &moved,
    };
    let copying = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copying);
    // Armed for the idle time, and re-armed only when it fires: the
    // copy records each move with one store, no timer reset.
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            ended = &mut copying => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upgraded tunnel ended");
                }
                return;
            }
            () = &mut timer => match moved.idle_at(idle) {
                Some(at) => timer.as_mut().reset(at),
                None => return tracing::debug!(?idle, "tunnel idle: closing"),
            },
        }
    }
}

/// When a tunnel last moved a byte, either way.
struct Moved {
    born: Instant,
    /// Nanoseconds after `born`.
    last: AtomicU64,
}

impl Moved {
    fn new() -> Moved {
        Moved {
            born: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ns = self.born.elapsed().as_nanos() as u64;
        self.last.store(ns, Ordering::Relaxed);
    }

    /// When the tunnel will have been idle for `idle`, if nothing moves
    /// first; `None` when it already has.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        let at = self.born + Duration::from_nanos(self.last.load(Ordering::Relaxed)) + idle;
        (at > Instant::now()).then_some(at)
    }
}

/// One half of a tunnel, recording every byte read or written in `moved`.
struct Watched<'a, IO> {
    io: IO,
    moved: &'a Moved,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.touch();
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_is_measured_from_the_last_move() {
        let idle = Duration::from_secs(10);
        let moved = Moved::new();
        let start = Instant::now();
        assert_eq!(moved.idle_at(idle), Some(start + idle));
        tokio::time::advance(Duration::from_secs(4)).await;
        moved.touch();
        assert_eq!(moved.idle_at(idle), Some(start + Duration::from_secs(14)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(moved.idle_at(idle), None);
    }
}
