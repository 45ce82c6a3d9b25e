//! almond's own HTTP/2 codec: frames (RFC 9113), header compression (RFC
//! 7541), heads, and connections on them: the client every upstream
//! HTTP/2 request goes on, and the server every client's HTTP/2
//! connection is served by (`edge/h2.rs`). Tested against `h2`.

pub mod client;
pub mod conn;
pub mod frame;
pub mod head;
pub mod hpack;
pub mod huffman;
pub mod server;

#[cfg(test)]
mod against_h2;
