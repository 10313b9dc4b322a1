//! The status writer: server-side apply of a GrpcBackend's status, only when it changed, at
//! most one write per `status_write_interval` per GrpcBackend (changes in between wait for the
//! next slot, and the latest state is what gets written then), and the recovery of an object
//! whose status cannot be read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use kubegrpc_crds::{GrpcBackend, GrpcBackendStatus, OPERATOR_FIELD_MANAGER, condition, condition::reason};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{Error, key::ObjectKey, metrics::Metrics};

/// What became of a status write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteOutcome {
    /// The status is already published, or the operator's own write of it is.
    Unchanged,
    Written,
    /// Changed, but written too recently: try again after this long.
    Deferred(Duration),
}

/// Writes statuses, remembering its latest write of each GrpcBackend.
pub(super) struct StatusWriter {
    client: Client,
    metrics: Arc<Metrics>,
    /// Least time between two writes of one GrpcBackend.
    interval: Duration,
    writes: Mutex<HashMap<ObjectKey, LastWrite>>,
}

/// The operator's own latest status write of one GrpcBackend.
struct LastWrite {
    at: Instant,
    status: serde_json::Value,
    /// The object's resourceVersion before and after the write: while the store shows either,
    /// it has not seen anybody else's change since.
    before: Option<String>,
    after: Option<String>,
}

impl StatusWriter {
    pub(super) fn new(client: Client, metrics: Arc<Metrics>, interval: Duration) -> Self {
        Self {
            client,
            metrics,
            interval,
            writes: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `desired` as `backend`'s status unless it is published already or the last
    /// write is too recent.
    pub(super) async fn write(
        &self,
        backend: &GrpcBackend,
        key: &ObjectKey,
        desired: &GrpcBackendStatus,
    ) -> Result<WriteOutcome, Error> {
        if backend.status.as_ref() == Some(desired) {
            return Ok(WriteOutcome::Unchanged);
        }
        let desired_json = serde_json::to_value(desired).map_err(Error::Serialize)?;
        let resource_version = backend.resource_version();
        if let Some(wait) = self.must_wait(key, &desired_json, &resource_version) {
            return Ok(wait);
        }
        self.apply(key, &desired_json, desired_json.clone(), resource_version)
            .await?;
        self.metrics.published(&key.namespace, &key.name, desired);
        info!(
            ready = desired.ready_endpoints,
            total = desired.total_endpoints,
            "status written"
        );
        Ok(WriteOutcome::Written)
    }

    /// Publishes the status of an object that cannot be decoded: only `Ready=False/InvalidSpec`
    /// with `message`.
    pub(super) async fn write_unreadable(
        &self,
        key: &ObjectKey,
        generation: Option<i64>,
        resource_version: Option<String>,
        message: &str,
    ) -> Result<WriteOutcome, Error> {
        let condition = Condition {
            type_: condition::READY.into(),
            status: "False".into(),
            reason: reason::INVALID_SPEC.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: Time(
                Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now()),
            ),
        };
        // The transition time is not compared: one write per change of message or object.
        let compared = json!({ "observedGeneration": generation, "conditions": [ { "type": condition.type_, "message": condition.message } ] });
        if let Some(wait) = self.must_wait(key, &compared, &resource_version) {
            return Ok(wait);
        }
        let status = json!({ "observedGeneration": generation, "conditions": [condition] });
        self.apply(key, &status, compared, resource_version).await?;
        warn!(%message, "GrpcBackend cannot be read");
        Ok(WriteOutcome::Written)
    }

    /// The GrpcBackend `key` read again with its status left out, if its spec can be read: an
    /// object whose status only is unreadable (an older shape, a hand edit made while the
    /// schema was relaxed) is reconciled from its spec, and its status written anew.
    pub(super) async fn read_ignoring_status(&self, key: &ObjectKey) -> Option<GrpcBackend> {
        let resource = ApiResource::erase::<GrpcBackend>(&());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &key.namespace, &resource);
        let mut object = match api.get(&key.name).await {
            Ok(object) => object,
            Err(error) => {
                debug!(%error, "cannot read the object again");
                return None;
            }
        };
        if let Some(data) = object.data.as_object_mut() {
            data.remove("status");
        }
        let mut backend: GrpcBackend = serde_json::to_value(object).and_then(serde_json::from_value).ok()?;
        backend.status = None;
        Some(backend)
    }

    /// A GrpcBackend is gone: its write record goes too.
    pub(super) fn forget(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }

    /// Writes `status` with server-side apply (the operator owns every field it writes, so a
    /// hand edit is overwritten), and remembers the write as `compared` (what later
    /// reconciles compare their desired status with).
    async fn apply(
        &self,
        key: &ObjectKey,
        status: &serde_json::Value,
        compared: serde_json::Value,
        resource_version: Option<String>,
    ) -> Result<(), Error> {
        let api: Api<GrpcBackend> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = json!({
            "apiVersion": GrpcBackend::api_version(&()),
            "kind": GrpcBackend::kind(&()),
            "status": status,
        });
        let written = api
            .patch_status(
                &key.name,
                // No field validation: the apiserver would parse the YAML apply body a second
                // time to look for unknown fields (a tenth of its CPU per write at 5,000
                // endpoints), and the body comes from the types the CRD is generated from.
                &PatchParams::apply(OPERATOR_FIELD_MANAGER).force().validation_ignore(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::StatusWrite {
                backend: key.to_string(),
                source,
            })?;
        self.lock().insert(
            key.clone(),
            LastWrite {
                at: Instant::now(),
                status: compared,
                before: resource_version,
                after: written.resource_version(),
            },
        );
        self.metrics.status_written(&key.namespace, &key.name);
        Ok(())
    }

    /// Whether a write of `desired` must wait: `Some(Unchanged)` when the operator already wrote
    /// exactly this and nobody changed the object since (the store has not caught up yet),
    /// `Some(Deferred)` when the last write is too recent.
    fn must_wait(
        &self,
        key: &ObjectKey,
        desired: &serde_json::Value,
        resource_version: &Option<String>,
    ) -> Option<WriteOutcome> {
        let writes = self.lock();
        let last = writes.get(key)?;
        let untouched_since = *resource_version == last.before || *resource_version == last.after;
        if untouched_since && last.status == *desired {
            return Some(WriteOutcome::Unchanged);
        }
        let since = last.at.elapsed();
        self.interval
            .checked_sub(since)
            .filter(|wait| !wait.is_zero())
            .map(WriteOutcome::Deferred)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, LastWrite>> {
        self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
