//! Health checking with the standard gRPC health protocol: one long-lived prober per endpoint.

pub mod connection;
pub mod hpack;
pub mod prober;
pub mod registry;
pub mod tls;
pub mod tracker;
