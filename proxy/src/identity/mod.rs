//! Identity: the proxy's mTLS certificate on both sides of a connection
//! (tls), and which client identities may call (authz). Imports no other
//! module of this crate.

pub mod authz;
pub mod tls;
