//! Feeds the [`XdsCache`] from a watch of GrpcBackends (their status is what is served).

use std::{sync::Arc, time::SystemTime};

use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    core::DeserializeGuard,
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc_crds::GrpcBackend;
use tokio::time::{Instant, sleep_until};
use tracing::warn;

use super::{
    XdsCache,
    resources::{BackendSettings, ClusterTls},
};

/// Follows every GrpcBackend in scope (all namespaces, or `namespace`) until dropped.
pub async fn follow(client: Client, namespace: Option<String>, cache: Arc<XdsCache>) {
    let api: Api<DeserializeGuard<GrpcBackend>> = match &namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut next_refresh: Option<Instant> = None;
    loop {
        // While an endpoint ramps (slow start), its stepped weight moves with time alone: look
        // again every tick, however busy the watch is.
        next_refresh = match (cache.ramp_tick(), next_refresh) {
            (None, _) => None,
            (Some(tick), None) => Some(Instant::now() + tick),
            (Some(_), due) => due,
        };
        let event = tokio::select! {
            event = events.next() => event,
            () = sleep_until(next_refresh.unwrap_or_else(Instant::now)), if next_refresh.is_some() => {
                cache.refresh_ramps(SystemTime::now());
                next_refresh = None;
                continue;
            }
        };
        let Some(event) = event else { break };
        match event {
            Ok(watcher::Event::Apply(backend) | watcher::Event::InitApply(backend)) => {
                let namespace = backend.namespace().unwrap_or_default();
                match &backend.0 {
                    Ok(backend) => {
                        let tls = backend.spec.tls_server_name(&namespace).map(|server_name| ClusterTls {
                            server_name,
                            client_identity: cache.upstream_client_identity(),
                        });
                        let settings = BackendSettings {
                            slow_start: backend.spec.weighting.slow_start(),
                            tls,
                            outlier_detection: backend.spec.outlier_detection(),
                        };
                        cache.set_backend_with(
                            &namespace,
                            &backend.name_any(),
                            backend.status.as_ref(),
                            settings,
                            SystemTime::now(),
                        );
                    }
                    // Unreadable: serve nothing for it rather than something wrong.
                    Err(invalid) => {
                        cache.remove_backend(&namespace, &invalid.metadata.name.clone().unwrap_or_default());
                    }
                }
            }
            Ok(watcher::Event::Delete(backend)) => {
                cache.remove_backend(&backend.namespace().unwrap_or_default(), &backend.name_any());
            }
            Ok(watcher::Event::Init) => cache.relist_started(),
            Ok(watcher::Event::InitDone) => cache.relist_done(),
            Err(error) => warn!(%error, "watching GrpcBackends for xDS failed; serving the last known state"),
        }
    }
}
