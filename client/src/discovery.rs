//! Discovery: a watch on the one GrpcBackend, in a task of its own, so that changes apply at
//! once whether or not requests flow. When the watch fails the last known endpoints stay in
//! use and the watch retries with backoff (kube-runtime's default: 0.8s growing to 30s).

use std::{sync::Arc, time::SystemTime};

use futures::StreamExt;
use kube::{
    Api,
    api::DynamicObject,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::{pool::Shared, snapshot::DiscoveryState, status::parse_status};

/// Follows GrpcBackend `name` until the task is aborted. `first` learns how the first read went.
pub async fn follow(
    api: Api<DynamicObject>,
    name: String,
    shared: Arc<Shared>,
    mut first: Option<oneshot::Sender<Result<(), watcher::Error>>>,
) {
    // kube-runtime's single-object watch: `Some` on every read of the object (the first list
    // included), `None` when it is deleted or absent from a (re)list.
    let mut reads = watcher::watch_object(api, &name).default_backoff().boxed();
    while let Some(read) = reads.next().await {
        match read {
            Ok(Some(object)) => {
                debug!(backend = %shared.backend, "status changed");
                shared.apply_status(parse_status(object.data.get("status")));
                shared.set_discovery(DiscoveryState::Synced);
            }
            Ok(None) => {
                shared.apply_missing();
                shared.set_discovery(DiscoveryState::NotFound);
            }
            Err(error) => {
                warn!(backend = %shared.backend, %error, "watching the GrpcBackend failed; keeping the last known endpoints");
                shared.set_discovery(DiscoveryState::Stale {
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
