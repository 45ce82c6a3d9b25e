//! The edge: where a request enters. Accepting connections and serving
//! their requests; may import everything below it (`pipeline` and down).

pub mod conn;
pub mod h1;
pub mod h2;
pub mod listen;
pub mod send_timeout;
pub mod serve;
pub mod stop;
pub mod trust;
