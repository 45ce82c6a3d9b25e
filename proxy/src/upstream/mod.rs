//! Upstream: reaching endpoints -- which one (balance), which are out
//! (eject), the connections to them (connect, their idle pools: pool), the
//! lean HTTP/1.1 client (h1), the HTTP/2 client (h2), the act of sending (send, under its per-try timeout) and an upgrade's tunnel. May import `identity`, `observe` and the leaves, never
//! `pipeline` or `edge`.

pub mod balance;
pub mod connect;
pub mod eject;
pub mod endpoint;
pub mod h1;
pub mod h2;
pub mod pool;
pub mod send;
pub mod timeout;
pub mod tunnel;
