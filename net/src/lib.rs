//! Sockets every almond server shares: binding a listener the way a proxy
//! should, and the one accept loop (with back-off on errors) behind the
//! proxy listeners, the admin listener and the control API, with the
//! congestion control of loopback connections. Also the small
//! helpers both planes need once: [`Backoff`], [`percent_encode`],
//! [`parse_query`], [`Lines`] (a streaming body), [`hostname`], [`now_ms`],
//! [`local_host`] and [`Followed`] (files read again when they change).

mod backoff;
mod encode;
mod error;
mod follow;
mod host;
mod lines;

pub use backoff::Backoff;
pub use encode::{parse_query, percent_decode, percent_encode};
pub use error::error_chain;
pub use follow::{check_until, Followed, FOLLOW_EVERY};
pub use host::{hostname, local_host, now_ms};
pub use lines::Lines;

use socket2::{Domain, SockRef, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Pending connections the kernel may queue per listener.
const BACKLOG: i32 = 1024;

/// Pauses after failed accepts: 5 ms, doubled per failure in a row, to 1 s.
const ACCEPT_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(5), Duration::from_secs(1));

/// The congestion control of loopback connections: `reno`, built into
/// every Linux kernel and the cheapest per ACK. Loopback has no queue to
/// probe and no loss to react to, so the system's choice (often BBR, which
/// models the path on every ACK) only costs CPU there: about 3 % of a
/// process's CPU under HTTP/1.1 load, paid by the peer (on loopback an ACK
/// is processed by the process that sends it, so this proxy's setting
/// saves its clients' and local upstreams' CPU, and theirs its own).
pub const LOOPBACK_CONGESTION: &[u8] = b"reno";

/// Gives `socket`, connected to or from `peer`, [`LOOPBACK_CONGESTION`] if
/// `peer` is a loopback address (IPv4-mapped ones too). Best effort: on an
/// error (a kernel without it) the socket keeps the system's default.
pub fn loopback_congestion(socket: SockRef<'_>, peer: IpAddr) {
    if peer.to_canonical().is_loopback() {
        let _ = set_congestion(socket);
    }
}

#[cfg(any(target_os = "linux", target_os = "freebsd"))]
fn set_congestion(socket: SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_congestion(LOOPBACK_CONGESTION)
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
fn set_congestion(_: SockRef<'_>) -> io::Result<()> {
    Ok(())
}

/// Binds a listening socket: `SO_REUSEADDR`, `SO_REUSEPORT` (a new process
/// can start beside the old one during an upgrade), `TCP_NODELAY`
/// (inherited by accepted sockets on Linux), a backlog of 1024. A listener
/// on a loopback address gets [`LOOPBACK_CONGESTION`] (inherited too).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    loopback_congestion(SockRef::from(&socket), addr.ip());
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts on `listener` until `stop` changes (or its sender is gone),
/// handing each connection (`TCP_NODELAY` set, and a loopback client's
/// [`LOOPBACK_CONGESTION`] on a listener of any address) to `serve`, which must not
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
    // A loopback listener's connections inherit its congestion control.
    let inherits = (listener.local_addr()).is_ok_and(|a| a.ip().to_canonical().is_loopback());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    failures = 0;
                    let _ = stream.set_nodelay(true);
                    if !inherits {
                        loopback_congestion(SockRef::from(&stream), peer.ip());
                    }
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

/// A cap on the connections an operators' listener (the proxy's admin
/// listener, the control plane's API) serves at once, in all and from one
/// client address. Past either a new connection is closed as soon as it
/// is accepted, so a flood of idle or slow clients cannot take every file
/// descriptor the process needs for its real work, and one host's flood
/// leaves room for the others (a health check, Prometheus); a warning says
/// so once for each time a cap is reached.
#[derive(Clone)]
pub struct Slots(Arc<SlotsInner>);

struct SlotsInner {
    listener: &'static str,
    max: usize,
    per_peer: usize,
    /// Connections open, in all and by client address.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    full: AtomicBool,
}

/// One connection's place in its [`Slots`], given back when dropped.
pub struct Slot {
    slots: Arc<SlotsInner>,
    peer: IpAddr,
}

impl Slots {
    /// `max` connections at once on `listener` (named in the warning), at
    /// most `per_peer` of them from one client address.
    pub fn new(listener: &'static str, max: usize, per_peer: usize) -> Slots {
        Slots(Arc::new(SlotsInner {
            listener,
            max,
            per_peer,
            open: Mutex::new((0, HashMap::new())),
            full: AtomicBool::new(false),
        }))
    }

    /// A place for one more connection from `peer`; `None` when the
    /// listener's or the address's places are all taken (the caller closes
    /// the connection).
    pub fn take(&self, peer: IpAddr) -> Option<Slot> {
        let inner = &self.0;
        let peer = peer.to_canonical();
        let refused = {
            let mut open = inner.open.lock().unwrap_or_else(|e| e.into_inner());
            let (total, by_peer) = &mut *open;
            let from_peer = by_peer.get(&peer).copied().unwrap_or(0);
            if *total >= inner.max {
                Some("the listener's")
            } else if from_peer >= inner.per_peer {
                Some("one client address's")
            } else {
                *total += 1;
                by_peer.insert(peer, from_peer + 1);
                None
            }
        };
        match refused {
            None => {
                inner.full.store(false, Ordering::Relaxed);
                Some(Slot {
                    slots: self.0.clone(),
                    peer,
                })
            }
            Some(cap) => {
                if !inner.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        listener = inner.listener,
                        %peer,
                        max = inner.max,
                        per_peer = inner.per_peer,
                        "{cap} connection cap reached: new connections are closed until some end"
                    );
                }
                None
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = (self.slots.open.lock()).unwrap_or_else(|e| e.into_inner());
        let (total, by_peer) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_connections_in_all_and_per_address_and_free_on_drop() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let slots = Slots::new("test", 3, 2);
        let a1 = slots.take(a).expect("first from a");
        let _a2 = slots.take(a).expect("second from a");
        assert!(slots.take(a).is_none(), "a third from one address");
        let _b1 = slots.take(b).expect("another address has room");
        assert!(slots.take(c).is_none(), "the listener's cap");
        drop(a1);
        let c1 = slots.take(c);
        assert!(c1.is_some(), "a place comes back when a connection ends");
        assert!(slots.take(a).is_none(), "c took it");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(
            slots.take(mapped).is_none(),
            "an IPv4-mapped address is the same client"
        );
    }

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

    #[cfg(target_os = "linux")]
    fn congestion(socket: SockRef<'_>) -> Vec<u8> {
        let mut name = socket.tcp_congestion().unwrap();
        name.retain(|b| *b != 0);
        name
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn loopback_connections_get_the_loopback_congestion_control() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(congestion(SockRef::from(&accepted)), LOOPBACK_CONGESTION);

        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let default = congestion(SockRef::from(&socket));
        loopback_congestion(SockRef::from(&socket), "192.0.2.1".parse().unwrap());
        assert_eq!(
            congestion(SockRef::from(&socket)),
            default,
            "not loopback: the system's"
        );
        loopback_congestion(SockRef::from(&socket), "::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(congestion(SockRef::from(&socket)), LOOPBACK_CONGESTION);
    }
}
