//! Sockets every almond server shares: binding a listener the way a proxy
//! should, and the one accept loop (with back-off on errors) behind the
//! proxy listeners, the admin listener and the control API. Also the small
//! helpers both planes need once: [`Backoff`], [`percent_encode`],
//! [`parse_query`], [`Lines`] (a streaming body), [`hostname`] and [`now_ms`].

mod backoff;
mod encode;
mod error;
mod host;
mod lines;

pub use backoff::Backoff;
pub use encode::{parse_query, percent_decode, percent_encode};
pub use error::error_chain;
pub use host::{hostname, now_ms};
pub use lines::Lines;

use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Pending connections the kernel may queue per listener.
const BACKLOG: i32 = 1024;

/// Pauses after failed accepts: 5 ms, doubled per failure in a row, to 1 s.
const ACCEPT_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(5), Duration::from_secs(1));

/// Binds a listening socket: `SO_REUSEADDR`, `SO_REUSEPORT` (a new process
/// can start beside the old one during an upgrade), `TCP_NODELAY`
/// (inherited by accepted sockets on Linux), a backlog of 1024.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts on `listener` until `stop` changes (or its sender is gone),
/// handing each connection (`TCP_NODELAY` set) to `serve`, which must not
/// block: it spawns. A failed accept (out of file descriptors, out of
/// memory) is logged and backed off, 5 ms doubling to 1 s while failures
/// go on, so the loop never spins on an error that persists.
pub async fn accept_until<F>(
    name: &'static str,
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    let mut failures = 0u32;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    failures = 0;
                    let _ = stream.set_nodelay(true);
                    serve(stream, peer);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = ACCEPT_BACKOFF.pause(failures);
                    tracing::warn!(listener = name, error = %e, pause = ?pause, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_each_connection_and_stops_when_told() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop) = watch::channel(false);
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            accept_until("test", &listener, &mut stop, |_, peer| {
                let _ = seen_tx.send(peer);
            })
            .await;
        });
        for _ in 0..3 {
            let client = TcpStream::connect(addr).await.unwrap();
            let peer = seen.recv().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
        }
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends on stop")
            .unwrap();
    }
}
