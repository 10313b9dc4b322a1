//! A test's own corner of the shared control plane: a namespace, a client, and helpers to wait
//! on a GrpcBackend's status.

use std::time::Duration;

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc_crds::{EndpointStatus, GrpcBackend, GrpcBackendStatus};
use serde_json::Value;

use crate::{
    ControlPlane,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    wait,
};

/// A namespace of the shared control plane and a client for it.
pub struct Scenario {
    pub control_plane: &'static ControlPlane,
    pub client: Client,
    pub namespace: String,
}

impl Scenario {
    /// A fresh namespace named after `prefix`.
    pub async fn new(prefix: &str) -> Result<Self> {
        let control_plane = ControlPlane::shared();
        let client = control_plane.client().await?;
        let namespace = control_plane.create_namespace(&client, prefix).await?;
        Ok(Self {
            control_plane,
            client,
            namespace,
        })
    }

    pub fn backends(&self) -> Api<GrpcBackend> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates the headless Service `echo` with port `grpc` and writes its EndpointSlice
    /// `echo-1` listing `addresses`, all ready.
    pub async fn echo_service(&self, addresses: &[SocketAddr]) -> Result<()> {
        create_service(&self.client, &self.namespace, "echo", &[("grpc", 80)]).await?;
        self.echo_slice(addresses).await
    }

    /// Creates the headless Service `echo` with port `grpc` and lists `addresses`, all ready, in
    /// EndpointSlices `echo-0`, `echo-1`, ... of at most `per_slice` endpoints each, as the
    /// EndpointSlice controller splits a big Service.
    pub async fn echo_service_in_slices(&self, addresses: &[SocketAddr], per_slice: usize) -> Result<()> {
        create_service(&self.client, &self.namespace, "echo", &[("grpc", 80)]).await?;
        for (index, chunk) in addresses.chunks(per_slice.max(1)).enumerate() {
            let endpoints: Vec<SliceEndpoint> = chunk.iter().map(|a| SliceEndpoint::ready(*a)).collect();
            apply_slice(
                &self.client,
                &self.namespace,
                "echo",
                &format!("echo-{index}"),
                "grpc",
                &endpoints,
            )
            .await?;
        }
        Ok(())
    }

    /// Rewrites EndpointSlice `echo-1` of Service `echo` to list `addresses`, all ready.
    pub async fn echo_slice(&self, addresses: &[SocketAddr]) -> Result<()> {
        let endpoints: Vec<SliceEndpoint> = addresses.iter().map(|a| SliceEndpoint::ready(*a)).collect();
        apply_slice(&self.client, &self.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
        Ok(())
    }

    /// Creates GrpcBackend `name` from a raw JSON spec.
    pub async fn grpc_backend(&self, name: &str, spec: Value) -> Result<GrpcBackend> {
        Ok(create_grpc_backend(&self.client, &self.namespace, name, spec).await?)
    }

    /// Writes `name`'s status by hand, as the operator would (no operator needed): one entry
    /// per (address, weight, health), all Kubernetes-ready.
    pub async fn publish_status(&self, name: &str, endpoints: &[(SocketAddr, u32, &str)]) -> Result<()> {
        let entries: Vec<Value> = endpoints
            .iter()
            .map(|(address, weight, health)| {
                serde_json::json!({"address": address.ip().to_string(), "port": address.port(), "weight": weight,
                       "health": health, "serving": true, "terminating": false})
            })
            .collect();
        let ready = endpoints.iter().filter(|(_, w, h)| *w > 0 && *h == "Serving").count();
        self.backends()
            .patch_status(
                name,
                &kube::api::PatchParams::apply("kubegrpc-tests").force(),
                &kube::api::Patch::Apply(
                    serde_json::json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
                    "status": {"endpoints": entries, "readyEndpoints": ready, "totalEndpoints": endpoints.len()}}),
                ),
            )
            .await?;
        Ok(())
    }

    /// [`Scenario::publish_status`] with every address Serving at weight 100.
    pub async fn publish_serving(&self, name: &str, addresses: &[SocketAddr]) -> Result<()> {
        let entries: Vec<(SocketAddr, u32, &str)> = addresses.iter().map(|a| (*a, 100, "Serving")).collect();
        self.publish_status(name, &entries).await
    }

    /// Waits until `name`'s status satisfies `accept`; fails with the last status seen.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        accept: impl Fn(&GrpcBackendStatus) -> bool,
    ) -> Result<GrpcBackend> {
        let api = self.backends();
        wait::until(what, deadline, || {
            let api = api.clone();
            let accept = &accept;
            async move {
                let backend = api.get(name).await?;
                match &backend.status {
                    Some(status) if accept(status) => Ok(Some(backend)),
                    other => Err(anyhow::anyhow!("status is {}", brief(other.as_ref()))),
                }
            }
        })
        .await
    }

    /// Watches `name` and returns when its status satisfies `accept` (no polling delay, for
    /// measuring how fast a change is published).
    pub async fn watch_status(
        &self,
        name: &str,
        deadline: Duration,
        accept: impl Fn(&GrpcBackendStatus) -> bool,
    ) -> Result<GrpcBackend> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = std::pin::pin!(watcher(self.backends(), config).default_backoff().applied_objects());
        let found = tokio::time::timeout(deadline, async {
            while let Some(backend) = stream.next().await {
                let backend = backend?;
                if backend.status.as_ref().is_some_and(&accept) {
                    return Ok::<_, anyhow::Error>(backend);
                }
            }
            bail!("the watch of {name} ended")
        })
        .await
        .with_context(|| format!("{name}: status not seen within {deadline:?}"))??;
        Ok(found)
    }
}

/// Watches GrpcBackend `name` from `resource_version` for `window`: fails on any change (a
/// status write shows as one), naming the status it changed to.
pub async fn assert_unchanged(
    api: &Api<GrpcBackend>,
    name: &str,
    resource_version: &str,
    window: Duration,
) -> Result<()> {
    let params = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(window.as_secs().max(1) as u32);
    let mut events = api.watch(&params, resource_version).await?.boxed();
    while let Some(event) = events.next().await {
        match event? {
            kube::api::WatchEvent::Bookmark(_) => {}
            kube::api::WatchEvent::Modified(changed) => {
                bail!("GrpcBackend {name} changed: status {}", brief(changed.status.as_ref()))
            }
            other => bail!("GrpcBackend {name} changed: {other:?}"),
        }
    }
    Ok(())
}

/// The endpoint at `address` in a status.
pub fn endpoint<'a>(status: &'a GrpcBackendStatus, address: &std::net::SocketAddr) -> Option<&'a EndpointStatus> {
    status
        .endpoints
        .iter()
        .find(|e| e.address == address.ip().to_string() && e.port == i32::from(address.port()))
}

/// A one-line summary of a status for failure messages.
pub fn brief(status: Option<&GrpcBackendStatus>) -> String {
    let Some(status) = status else {
        return "absent".into();
    };
    let ready = status
        .condition(kubegrpc_crds::condition::READY)
        .map(|c| format!("{}/{}: {}", c.status, c.reason, c.message))
        .unwrap_or_default();
    let endpoints: Vec<String> = status
        .endpoints
        .iter()
        .take(8)
        .map(|e| format!("{}:{} {} w{}", e.address, e.port, e.health, e.weight))
        .collect();
    format!(
        "ready {}/{} [{ready}] endpoints [{}{}]",
        status.ready_endpoints,
        status.total_endpoints,
        endpoints.join(", "),
        if status.endpoints.len() > 8 { ", ..." } else { "" }
    )
}

/// Waits until a channel's snapshot satisfies `accept`; fails with the last snapshot.
pub async fn wait_snapshot(
    channel: &kubegrpc::Channel,
    what: &str,
    deadline: std::time::Duration,
    accept: impl Fn(&kubegrpc::Snapshot) -> bool,
) -> Result<()> {
    wait::until(what, deadline, || {
        let snapshot = channel.snapshot();
        let accepted = accept(&snapshot);
        async move {
            if accepted {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("snapshot: {snapshot:?}"))
            }
        }
    })
    .await
}
