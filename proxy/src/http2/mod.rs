//! almond's own HTTP/2 codec: frames (RFC 9113), header compression (RFC
//! 7541) and the client connection every upstream HTTP/2 request goes on,
//! tested against the `h2` crate. The edge's server still runs on `h2`
//! (issue 17's plan, benches/results/2026-12-07-data-path-25.md).

pub mod client;
pub mod frame;
pub mod hpack;
pub mod huffman;

#[cfg(test)]
mod against_h2;
