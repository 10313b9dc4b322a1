//! The xDS server: every GrpcBackend served over the Aggregated Discovery Service to gRPC
//! clients of any language (`xds:///NAME.NAMESPACE`), from the GrpcBackend statuses this
//! replica watches. Every replica serves, leader or not. Off unless `--xds-address` is set.

pub mod cache;
pub mod resources;
pub mod routes;
pub mod server;
pub mod watch;

pub use cache::XdsCache;
