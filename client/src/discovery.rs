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
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::InitApply(object) | watcher::Event::Apply(object)) => {
                listed = true;
                debug!(backend = %shared.backend, "status changed");
                shared.apply_status(parse_status(object.data.get("status")));
                shared.set_discovery(DiscoveryState::Synced);
            }
            Ok(watcher::Event::Delete(_)) => {
                shared.apply_missing();
                shared.set_discovery(DiscoveryState::NotFound);
            }
            Ok(watcher::Event::InitDone) => {
                if listed {
                    shared.set_discovery(DiscoveryState::Synced);
                } else {
                    shared.apply_missing();
                    shared.set_discovery(DiscoveryState::NotFound);
                }
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
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
            }
        }
    }
}
