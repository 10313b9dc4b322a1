//! The kubegrpc operator: reconciles `GrpcBackend` resources.
//!
//! For each GrpcBackend it follows the named Service's EndpointSlices ([`discovery`]), keeps one
//! `grpc.health.v1` prober per endpoint ([`health`]), weights the endpoints ([`weights`]) and
//! publishes the health-checked, weighted endpoint list in the status ([`status`]), through the
//! reconciler in [`controller`]. Discovery, weights and status are pure functions over plain
//! data; the I/O stays at the edges.

#![forbid(unsafe_code)]

pub mod app;
pub mod controller;
pub mod discovery;
pub mod fail_open;
pub mod health;
pub mod http;
pub mod index;
pub mod key;
pub mod metrics;
pub mod pods;
pub mod routes;
pub mod spec;
pub mod status;
pub mod weights;
pub mod xds;

pub use controller::{Settings, run};
pub use metrics::Metrics;

/// Errors of the operator; each names the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the status of GrpcBackend {backend}: {source}")]
    StatusWrite {
        backend: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the status of GRPCRoute {route}: {source}")]
    RouteStatusWrite {
        route: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot serialize a status: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Start-up waits for these two caches only: the Pod watch runs while a GrpcBackend uses
    /// the `Static` policy, and its first list holds up only those GrpcBackends' statuses.
    #[error("the Service or EndpointSlice watch stopped before its cache was filled")]
    CacheNeverReady,
}

impl Error {
    /// A short label for the `kubegrpc_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::StatusWrite { .. } => "status_write",
            Error::RouteStatusWrite { .. } => "route_status_write",
            Error::Serialize(_) => "serialize",
            Error::CacheNeverReady => "cache",
        }
    }
}
