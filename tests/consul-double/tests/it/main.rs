//! Integration tests of the Consul double, through a real HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod acl;
mod agent;
mod blocking;
mod common;
mod faults;
mod filters;
mod kv;
mod shapes;
