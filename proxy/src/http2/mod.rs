//! almond's own HTTP/2 codec: frames (RFC 9113), header compression (RFC
//! 7541), heads, and connections on them: the client every upstream
//! HTTP/2 request goes on, and a server (tested, not yet used: the edge
//! still runs on `h2`; issue 17's plan,
//! benches/results/2026-12-07-data-path-25.md). Tested against `h2`.

pub mod client;
pub mod conn;
pub mod frame;
pub mod head;
pub mod hpack;
pub mod huffman;
pub mod server;

#[cfg(test)]
mod against_h2;
