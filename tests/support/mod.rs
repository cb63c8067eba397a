//! Shared harness of the integration tests: the test MongoDB, the bridge process, clients.
#![allow(dead_code)]

pub mod bridge;
pub mod data;
pub mod fuzzer;
pub mod http;
pub mod prometheus;
pub mod puppet;
pub mod store;
pub mod upstream;
pub mod ws;
