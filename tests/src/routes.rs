//! GRPCRoutes in tests: three echo Services each balanced by a GrpcBackend, routes applied as
//! users write them (JSON, server-side apply), and waits on a route's status and a GrpcBackend's
//! routing table.

use std::time::Duration;

use anyhow::{Result, anyhow};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use kubegrpc_crds::{
    gateway::{CONTROLLER_NAME, GRPCRoute, RouteParentStatus},
    routes::RouteEntry,
};
use kubegrpc_echo::Backend;
use serde_json::{Value, json};

use crate::{
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    scenario::Scenario,
    wait,
};

/// The Service port every routed Service exposes (its EndpointSlice carries the backend's).
pub const SERVICE_PORT: i32 = 80;

/// Creates Service `name` (port `grpc`/[`SERVICE_PORT`]), its EndpointSlice listing `backends`,
/// and a GrpcBackend `name` balancing it.
pub async fn balanced_service(scenario: &Scenario, name: &str, backends: &[&Backend]) -> Result<()> {
    create_service(&scenario.client, &scenario.namespace, name, &[("grpc", SERVICE_PORT)]).await?;
    let endpoints: Vec<SliceEndpoint> = backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect();
    apply_slice(
        &scenario.client,
        &scenario.namespace,
        name,
        &format!("{name}-1"),
        "grpc",
        &endpoints,
    )
    .await?;
    create_grpc_backend(
        &scenario.client,
        &scenario.namespace,
        name,
        json!({"service": name, "port": "grpc"}),
    )
    .await?;
    Ok(())
}

/// Applies (server-side) the GRPCRoute `name` with `spec`, as `kubectl apply` would.
pub async fn apply_route(client: &Client, namespace: &str, name: &str, spec: Value) -> Result<()> {
    apply_annotated_route(client, namespace, name, &[], spec).await
}

/// As [`apply_route`], with `annotations` (the route's timeout and retry policy, say); an
/// annotation applied before and left out now is removed, as `kubectl apply` does.
pub async fn apply_annotated_route(
    client: &Client,
    namespace: &str,
    name: &str,
    annotations: &[(&str, &str)],
    spec: Value,
) -> Result<()> {
    let resource = ApiResource::erase::<GRPCRoute>(&());
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(key, value)| ((*key).to_string(), Value::from(*value)))
        .collect();
    let object = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("kubegrpc-tests").force(),
        &Patch::Apply(&object),
    )
    .await?;
    Ok(())
}

/// A parentRef to Service `name` on [`SERVICE_PORT`].
pub fn service_parent(name: &str) -> Value {
    json!({"group": "", "kind": "Service", "name": name, "port": SERVICE_PORT})
}

/// A backendRef to Service `name` on [`SERVICE_PORT`] with `weight`.
pub fn service_backend(name: &str, weight: i32) -> Value {
    json!({"name": name, "port": SERVICE_PORT, "weight": weight})
}

/// Waits until the route's status has kubegrpc's entry for `parent` and it satisfies `accept`.
pub async fn wait_route_parent(
    client: &Client,
    namespace: &str,
    route: &str,
    parent: &str,
    deadline: Duration,
    accept: impl Fn(&RouteParentStatus) -> bool,
) -> Result<RouteParentStatus> {
    let api = Api::<GRPCRoute>::namespaced(client.clone(), namespace);
    wait::until(&format!("GRPCRoute {route}'s status for {parent}"), deadline, || {
        let api = api.clone();
        let accept = &accept;
        async move {
            let route = api.get(route).await?;
            let ours = route
                .status
                .iter()
                .flat_map(|s| s.parents.iter())
                .find(|p| p.controller_name == CONTROLLER_NAME && p.parent_ref.name == parent)
                .cloned();
            match ours {
                Some(entry) if accept(&entry) => Ok(Some(entry)),
                other => Err(anyhow!("kubegrpc's entry is {other:?}")),
            }
        }
    })
    .await
}

/// The `type` condition's (status, reason) in a route parent entry.
pub fn condition(entry: &RouteParentStatus, type_: &str) -> Option<(String, String)> {
    entry
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// `(backend name, weight)` of each backend of a table entry.
pub fn weights(entry: &RouteEntry) -> Vec<(String, u32)> {
    entry.backends.iter().map(|b| (b.name.clone(), b.weight)).collect()
}
