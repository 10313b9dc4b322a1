//! The `GrpcBackend` API (`kubegrpc.io/v1alpha1`), shared by the kubegrpc operator, which writes
//! its status, and the kubegrpc client, which reads it.
//!
//! A `GrpcBackend` names a Service and one of its ports. The operator follows the Service's
//! EndpointSlices, health-checks every endpoint with `grpc.health.v1`, and publishes the
//! health-checked, weighted endpoint list in `status.endpoints`.
//!
//! The status only changes when something a client acts on changes: no probe timings or
//! "last probed" stamps, because every status write wakes every client watching the object.
//!
//! This crate enables no `k8s-openapi` version feature: the binary that links it chooses one.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod condition;
pub mod gateway;
pub mod routes;
pub mod slow_start;
mod spec;
mod status;

pub use spec::*;
pub use status::*;

/// The API group of every kubegrpc resource.
pub const GROUP: &str = "kubegrpc.io";
/// The API version of [`GrpcBackend`].
pub const VERSION: &str = "v1alpha1";
/// The field manager the operator writes the status with (server-side apply).
pub const OPERATOR_FIELD_MANAGER: &str = "kubegrpc-operator";
/// The weight of a fully ready endpoint under the `Equal` policy. Slow start ramps a new
/// endpoint up to it in steps, so it is a round number with room below it.
pub const FULL_WEIGHT: u32 = 100;

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/grpcbackend.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_saphyr::to_string(&GrpcBackend::crd()).expect("a CRD always serializes to YAML");
    format!("# Generated from the kubegrpc-crds types by `make crds`; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests;
