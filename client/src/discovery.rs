//! Discovery: a watch on the one GrpcBackend, in a task of its own, so that changes apply at
//! once whether or not requests flow. When the watch fails the last known endpoints stay in
//! use and the watch retries with backoff (kube-runtime's default: 0.8s growing to 30s).
//!
//! Also the one read of the client's Node for its zone ([`node_zone`]). Everything the task
//! logs is in a `discovery` span naming the GrpcBackend.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::oneshot;
use tracing::{debug, info, instrument, warn};

use crate::{
    outlier::parse_outlier_detection,
    pool::Pool,
    router::Router,
    slow_start::parse_slow_start,
    snapshot::DiscoveryState,
    status::parse_status,
    tls::{SpecTls, TlsResolver, parse_spec_tls},
};

/// The Node label that names its zone (set by the cloud provider or the installer).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How long the Node read may take before the channel runs without a zone.
const NODE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel's discovery task: reads the zone of Node `node` first if given (so that the
/// first rotation, and `connect`'s return, already have it), then follows GrpcBackend `name`
/// until the task is aborted. `first` learns how the first read went. With `tls`, the spec's
/// `tls` decides how the endpoints are connected to (without, the user's settings do). With
/// `router` (the channel's own GrpcBackend), each read's routing table goes to it.
#[instrument(name = "discovery", skip_all, fields(backend = %pool.backend))]
pub async fn run(
    api: Api<DynamicObject>,
    name: String,
    pool: Arc<Pool>,
    node: Option<(Client, String)>,
    tls: Option<TlsResolver>,
    first: Option<oneshot::Sender<Result<(), watcher::Error>>>,
    router: Option<Arc<Router>>,
) {
    if let Some((client, node)) = node {
        pool.set_zone(node_zone(client, &node).await);
    }
    follow(api, name, pool, tls, first, router).await;
}

/// Follows GrpcBackend `name` until the task is aborted. `first` learns how the first read went.
async fn follow(
    api: Api<DynamicObject>,
    name: String,
    pool: Arc<Pool>,
    mut tls: Option<TlsResolver>,
    mut first: Option<oneshot::Sender<Result<(), watcher::Error>>>,
    router: Option<Arc<Router>>,
) {
    let namespace = api.namespace().unwrap_or_default().to_string();
    // The last spec.tls read, for the CA bundle's periodic read.
    let mut spec_tls: Result<Option<SpecTls>, String> = Ok(None);
    // kube-runtime's single-object watch: `Some` on every read of the object (the first list
    // included), `None` when it is deleted or absent from a (re)list.
    let mut reads = watcher::watch_object(api, &name).default_backoff().boxed();
    loop {
        let refresh = tls.as_ref().and_then(TlsResolver::refresh_due);
        let read = tokio::select! {
            read = reads.next() => read,
            () = tokio::time::sleep_until(refresh.unwrap_or_else(tokio::time::Instant::now)), if refresh.is_some() => {
                if let Some(tls) = tls.as_mut() {
                    pool.apply_transport(tls.resolve(&spec_tls).await);
                }
                continue;
            }
        };
        let Some(read) = read else { break };
        match read {
            Ok(Some(object)) => {
                debug!("status changed");
                let spec = object.data.get("spec");
                pool.apply_spec(parse_slow_start(spec));
                pool.apply_outlier_detection(parse_outlier_detection(spec));
                // Before the status: no endpoint is connected to before the client knows how.
                if let Some(tls) = tls.as_mut() {
                    spec_tls = parse_spec_tls(spec, &namespace);
                    pool.apply_transport(tls.resolve(&spec_tls).await);
                }
                pool.apply_status(parse_status(object.data.get("status")));
                pool.set_discovery(DiscoveryState::Synced);
                if let Some(router) = &router {
                    router.apply_routes(object.data.get("status"));
                }
            }
            Ok(None) => {
                pool.apply_missing();
                pool.set_discovery(DiscoveryState::NotFound);
                if let Some(router) = &router {
                    router.apply_routes(None);
                }
            }
            Err(error) => {
                warn!(%error, "watching the GrpcBackend failed; keeping the last known endpoints");
                pool.set_discovery(DiscoveryState::Stale {
                    error: error.to_string(),
                    since: SystemTime::now(),
                });
                if let Some(first) = first.take() {
                    let _ = first.send(Err(error));
                }
                continue;
            }
        }
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
    }
}

/// The zone of Node `node`: its `topology.kubernetes.io/zone` label, read once (metadata only).
/// `None`, with a warning, when it cannot be read (no such Node, no RBAC `get` on nodes, the
/// API unreachable for 10s) or has no such label.
#[instrument(skip(client))]
pub async fn node_zone(client: Client, node: &str) -> Option<String> {
    let why = match read_node_zone(client, node).await {
        Ok(zone) => {
            info!(zone, "client zone from its Node");
            return Some(zone);
        }
        Err(why) => why,
    };
    warn!("{why}; running without a zone");
    None
}

async fn read_node_zone(client: Client, node: &str) -> Result<String, String> {
    if node.is_empty() {
        return Err("no Node name given for the client's zone".into());
    }
    let nodes = ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: "Node".into(),
        plural: "nodes".into(),
    };
    let api = Api::<DynamicObject>::all_with(client, &nodes);
    let meta = match tokio::time::timeout(NODE_READ_TIMEOUT, api.get_metadata(node)).await {
        Ok(Ok(meta)) => meta,
        Ok(Err(error)) => {
            return Err(format!(
                "cannot read Node {node} for the client's zone (does the workload have RBAC get on nodes?): {error}"
            ));
        }
        Err(_) => return Err(format!("reading Node {node} for the client's zone timed out")),
    };
    match meta.metadata.labels.as_ref().and_then(|labels| labels.get(ZONE_LABEL)) {
        Some(zone) if !zone.is_empty() => Ok(zone.clone()),
        _ => Err(format!("Node {node} has no {ZONE_LABEL} label")),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;

    use super::*;

    /// A kube client whose API server answers every request with `status` and `body`.
    fn client_answering(status: u16, body: serde_json::Value) -> (Client, Arc<std::sync::Mutex<Vec<String>>>) {
        let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = paths.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            seen.lock().unwrap().push(request.uri().path().to_string());
            let response = http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(bytes::Bytes::from(body.to_string())))
                .expect("a valid response");
            async move { Ok::<_, Infallible>(response) }
        });
        (Client::new(service, "default"), paths)
    }

    fn node(labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "node-a", "labels": labels}})
    }

    #[tokio::test]
    async fn the_zone_is_the_nodes_zone_label() {
        let (client, paths) = client_answering(200, node(serde_json::json!({ZONE_LABEL: "eu-west-1a"})));
        assert_eq!(node_zone(client, "node-a").await.as_deref(), Some("eu-west-1a"));
        assert_eq!(*paths.lock().unwrap(), ["/api/v1/nodes/node-a"]);
    }

    #[tokio::test]
    async fn no_label_no_node_or_no_permission_is_no_zone() {
        let (client, _) = client_answering(200, node(serde_json::json!({"kubernetes.io/hostname": "node-a"})));
        assert_eq!(node_zone(client, "node-a").await, None);

        let forbidden = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "nodes \"node-a\" is forbidden", "reason": "Forbidden", "code": 403});
        let (client, _) = client_answering(403, forbidden);
        assert_eq!(node_zone(client, "node-a").await, None);

        let (client, paths) = client_answering(200, node(serde_json::json!({})));
        assert_eq!(node_zone(client, "").await, None);
        assert!(paths.lock().unwrap().is_empty(), "nothing to read");
    }
}
