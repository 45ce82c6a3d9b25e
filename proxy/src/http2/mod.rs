//! almond's own HTTP/2 codec, below any connection: frames (RFC 9113) and
//! header compression (RFC 7541), tested against the `h2` crate on
//! generated streams. Not yet on the request path, which still runs on
//! `h2`: issue 17's plan (benches/results/2026-12-07-data-path-24.md).

pub mod client;
pub mod frame;
pub mod hpack;
pub mod huffman;

#[cfg(test)]
mod against_h2;
