//! # kubegrpc: gRPC load balancing driven by a GrpcBackend
//!
//! The kubegrpc operator health-checks the endpoints of a Service with `grpc.health.v1` and
//! publishes them, weighted, in a `GrpcBackend`'s status. This crate watches that one object
//! and balances a tonic channel over it:
//!
//! - one connection per endpoint in rotation, opened when the endpoint appears, kept across
//!   updates (a new weight does not reconnect), dropped once its in-flight requests finish
//!   when the endpoint leaves;
//! - weighted, deterministic picking, swapped in atomically on each change and read without a
//!   lock per request;
//! - changes apply as they are published, whether or not requests flow; with the API down,
//!   the last known endpoints stay in use;
//! - a request that certainly never reached a backend's application (no connection, a refused
//!   stream, a GOAWAY) is sent again; connection rotation by the server is routine and never
//!   ejects, nor do the caller's own deadlines and cancellations;
//! - passive outlier detection on evidence (gRFC A50's failure percentage over an interval,
//!   and connection attempts failing in a row) ejects an endpoint before the operator's next
//!   status; an ejected endpoint keeps its connection and comes back connected;
//! - with no usable endpoint, a request fails at once with `Unavailable` naming the
//!   GrpcBackend and why.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let kube_client = kube::Client::try_default().await?;
//! let channel = kubegrpc::Channel::builder(kube_client, "default", "echo").connect().await?;
//! // let mut client = EchoClient::new(channel.clone());
//! tokio::time::timeout(std::time::Duration::from_secs(10), channel.ready()).await?;
//! for endpoint in channel.snapshot().endpoints {
//!     println!("{} weight {} requests {}", endpoint.address, endpoint.weight, endpoint.requests);
//! }
//! # Ok(()) }
//! ```
//!
//! The workload needs `get`, `list` and `watch` on `grpcbackends.kubegrpc.io` in its namespace.

mod channel;
mod connection;
mod discovery;
mod endpoint;
pub mod failure;
#[cfg(feature = "prometheus")]
pub mod metrics;
pub mod outlier;
pub mod picker;
mod pool;
mod snapshot;
pub mod status;
#[cfg(test)]
mod test_support;

pub use channel::{Builder, Channel};
pub use outlier::{FailurePercentage, OutlierDetection};
pub use snapshot::{DiscoveryState, EndpointSnapshot, Snapshot};

/// Errors of the channel; each names the GrpcBackend it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read GrpcBackend {backend}: {source}")]
    Discovery {
        backend: String,
        #[source]
        source: kube::runtime::watcher::Error,
    },
    #[error("the watch of GrpcBackend {backend} stopped before its first read")]
    DiscoveryStopped { backend: String },
}
