//! The watches that feed the reconciler, and their indexes.
//!
//! Services and EndpointSlices are watched by tasks of their own that keep a store (Services)
//! and a by-Service index (EndpointSlices), and map each change to the GrpcBackends naming
//! that Service through the operator's own Service -> GrpcBackends index, which the
//! GrpcBackend watch keeps in step ([`backends`]). Pods are watched only while a GrpcBackend
//! uses the `Static` policy ([`PodWatch`]).

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use kubegrpc_crds::GrpcBackend;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::{Backend, routes::RouteChange};
use crate::{
    Error,
    discovery::{self, SERVICE_NAME_LABEL},
    index::ByService,
    key::ObjectKey,
    pods::{self, PodWeights},
};

/// Where watches ask for GrpcBackends to be reconciled.
pub(super) type Triggers = mpsc::UnboundedSender<ObjectRef<Backend>>;

/// The Service and EndpointSlice watches, their views, and the Service -> GrpcBackends index
/// their events are mapped through. The watches stop when this is dropped.
pub(super) struct Watches {
    pub services: Store<Service>,
    pub slices: Arc<ByService<EndpointSlice>>,
    /// Kept by the GrpcBackend watch ([`backends`]).
    pub backends: Arc<ByService<Backend>>,
    slices_ready: watch::Receiver<bool>,
    _tasks: [AbortOnDropHandle<()>; 2],
}

impl Watches {
    /// Starts watching the Services and EndpointSlices of `namespace` (all namespaces when
    /// `None`): each change triggers the GrpcBackends naming its Service, each completed
    /// (re)list sends on `relisted`.
    pub fn start(
        client: &Client,
        namespace: &Option<String>,
        triggers: &Triggers,
        relisted: &mpsc::UnboundedSender<()>,
        route_changes: &mpsc::UnboundedSender<RouteChange>,
    ) -> Self {
        let backends = Arc::new(ByService::<Backend>::new(|backend| {
            backend.0.as_ref().ok().map(|b| b.spec.service.clone())
        }));
        let slices = Arc::new(ByService::<EndpointSlice>::new(|slice| {
            slice.labels().get(SERVICE_NAME_LABEL).cloned()
        }));

        // Services: a store for the reconciler, triggers for the GrpcBackends that name them.
        let (services, services_writer) = reflector::store();
        let services_task = AbortOnDropHandle::new(tokio::spawn({
            let backends = backends.clone();
            let triggers = triggers.clone();
            let relisted = relisted.clone();
            let route_changes = route_changes.clone();
            watcher(scoped::<Service>(client, namespace), watcher::Config::default())
                .default_backoff()
                .modify(discovery::trim_service)
                .reflect(services_writer)
                .for_each(move |event| {
                    match event {
                        Ok(watcher::Event::Apply(service) | watcher::Event::Delete(service)) => {
                            let key = ObjectKey::of(&service);
                            trigger_backends_of(&backends, &triggers, &key);
                            // Routes naming it (as a parent or a backend) resolve again.
                            let _ = route_changes.send(RouteChange::Service(key));
                        }
                        Ok(watcher::Event::InitDone) => {
                            let _ = relisted.send(());
                        }
                        Ok(_) => {}
                        Err(error) => warn!(%error, "watching Services failed; retrying"),
                    }
                    futures::future::ready(())
                })
        }));

        // EndpointSlices: the by-Service index for the reconciler, and triggers.
        let (slices_ready_tx, slices_ready) = watch::channel(false);
        let slices_task = AbortOnDropHandle::new(tokio::spawn({
            let slices = slices.clone();
            let backends = backends.clone();
            let triggers = triggers.clone();
            let relisted = relisted.clone();
            watcher(
                scoped::<EndpointSlice>(client, namespace),
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
            )
            .default_backoff()
            .modify(discovery::trim_slice)
            .for_each(move |event| {
                match event {
                    Ok(event) => {
                        slices.apply(&event);
                        match &event {
                            watcher::Event::Apply(slice) | watcher::Event::Delete(slice) => {
                                if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
                                    let service = ObjectKey::new(slice.namespace().unwrap_or_default(), service);
                                    trigger_backends_of(&backends, &triggers, &service);
                                }
                            }
                            watcher::Event::InitDone => {
                                let _ = slices_ready_tx.send(true);
                                let _ = relisted.send(());
                            }
                            _ => {}
                        }
                    }
                    Err(error) => warn!(%error, "watching EndpointSlices failed; retrying"),
                }
                futures::future::ready(())
            })
        }));

        Self {
            services,
            slices,
            backends,
            slices_ready,
            _tasks: [services_task, slices_task],
        }
    }

    /// Waits until the Service and EndpointSlice views hold a complete list: reconciling
    /// before would publish endpoints as missing.
    pub async fn ready(&mut self) -> Result<(), Error> {
        self.services
            .wait_until_ready()
            .await
            .map_err(|_| Error::CacheNeverReady)?;
        self.slices_ready
            .wait_for(|ready| *ready)
            .await
            .map_err(|_| Error::CacheNeverReady)?;
        Ok(())
    }
}

/// The metadata-only Pod watch the `Static` policy reads weight annotations from.
///
/// It runs only while some GrpcBackend uses `Static`: a cluster-wide cache of Pods that nobody
/// reads costs memory and an apiserver watch, and its first list would hold up every
/// GrpcBackend's first status. The first reconcile of a `Static` GrpcBackend starts it; after
/// the last one leaves (deleted, or another policy) it stops. Its first complete list, and
/// later each change of annotations, triggers the `Static` GrpcBackends concerned.
pub(super) struct PodWatch {
    client: Client,
    namespace: Option<String>,
    triggers: Triggers,
    /// The GrpcBackends using `Static`. Shared with the running watch's task, which triggers
    /// them; locked after `running` when both are.
    users: Arc<Mutex<BTreeSet<ObjectKey>>>,
    running: Mutex<Option<RunningPodWatch>>,
}

struct RunningPodWatch {
    weights: Arc<PodWeights>,
    /// The first list is complete.
    listed: Arc<AtomicBool>,
    /// The watch's latest error while it has not listed, and the users already told of it.
    failing: Arc<Mutex<Failing>>,
    _task: AbortOnDropHandle<()>,
}

#[derive(Default)]
struct Failing {
    error: Option<String>,
    told: BTreeSet<ObjectKey>,
}

impl PodWatch {
    /// Watches the Pods of `namespace` (all namespaces when `None`) once it has users.
    pub fn new(client: Client, namespace: Option<String>, triggers: Triggers) -> Self {
        Self {
            client,
            namespace,
            triggers,
            users: Arc::new(Mutex::new(BTreeSet::new())),
            running: Mutex::new(None),
        }
    }

    /// Records whether `backend` uses the Pods' annotations: the first user starts the watch,
    /// the last one leaving stops it.
    pub fn set_user(&self, backend: &ObjectKey, uses: bool) {
        let mut running = lock(&self.running);
        let no_users = {
            let mut users = lock(&self.users);
            if uses {
                users.insert(backend.clone());
            } else {
                users.remove(backend);
            }
            users.is_empty()
        };
        match (no_users, running.is_some()) {
            (false, false) => {
                info!("a GrpcBackend uses the Static policy: watching Pods (metadata)");
                *running = Some(self.start());
            }
            (true, true) => {
                info!("no GrpcBackend uses the Static policy: Pods no longer watched");
                *running = None;
            }
            _ => {}
        }
    }

    /// The Pods' annotations, once the watch has listed every Pod: `None` before (a `Static`
    /// weight published from a partial list would be written again moments later) and while
    /// the watch does not run.
    pub fn weights(&self) -> Option<Arc<PodWeights>> {
        let running = lock(&self.running);
        let running = running.as_ref()?;
        running.listed.load(Ordering::Acquire).then(|| running.weights.clone())
    }

    /// Why the Pods cannot be listed (the watch fails before its first list: no RBAC for
    /// Pods, a namespaced install), and whether `backend` is told of it for the first time.
    /// Its `Static` weights are then published as the default rather than never.
    pub fn unavailable(&self, backend: &ObjectKey) -> Option<(String, bool)> {
        let running = lock(&self.running);
        let running = running.as_ref()?;
        if running.listed.load(Ordering::Acquire) {
            return None;
        }
        let mut failing = lock(&running.failing);
        let error = failing.error.clone()?;
        let first = failing.told.insert(backend.clone());
        Some((error, first))
    }

    /// Whether the watch runs.
    #[cfg(test)]
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    fn start(&self) -> RunningPodWatch {
        let weights = Arc::new(PodWeights::default());
        let listed = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(Mutex::new(Failing::default()));
        let task = tokio::spawn({
            let weights = weights.clone();
            let listed = listed.clone();
            let failing = failing.clone();
            let users = self.users.clone();
            let triggers = self.triggers.clone();
            watcher(
                scoped::<PartialObjectMeta<Pod>>(&self.client, &self.namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(pods::trim)
            .for_each(move |event| {
                match event {
                    Ok(event) => {
                        lock(&failing).error = None;
                        let changed = weights.apply(&event);
                        let first_list =
                            matches!(event, watcher::Event::InitDone) && !listed.swap(true, Ordering::AcqRel);
                        // Users waited for the first list; later, those of the namespaces where
                        // an annotation changed.
                        for user in lock(&users).iter() {
                            if first_list || changed.contains(&user.namespace) {
                                let _ = triggers.send(user.object_ref());
                            }
                        }
                    }
                    Err(error) => {
                        warn!(%error, "watching Pods (metadata) failed; retrying");
                        // Before the first list the Static users wait for it: wake them to
                        // publish the default weight, once per new error.
                        let error = error.to_string();
                        let mut failing = lock(&failing);
                        if !listed.load(Ordering::Acquire) && failing.error.as_ref() != Some(&error) {
                            failing.error = Some(error);
                            failing.told.clear();
                            for user in lock(&users).iter() {
                                let _ = triggers.send(user.object_ref());
                            }
                        }
                    }
                }
                futures::future::ready(())
            })
        });
        RunningPodWatch {
            weights,
            listed,
            failing,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The GrpcBackend watch, for the Controller: fills `store`, keeps `index` in step, and
/// calls `gone` for each GrpcBackend deleted (or found missing by a relist).
pub(super) fn backends(
    api: Api<Backend>,
    store: reflector::store::Writer<Backend>,
    index: Arc<ByService<Backend>>,
    gone: impl Fn(&ObjectKey) + Send + 'static,
    route_changes: mpsc::UnboundedSender<RouteChange>,
) -> impl Stream<Item = Result<Backend, watcher::Error>> + Send + 'static {
    // The generation each GrpcBackend was last seen at: its status writes (which do not move
    // it) concern no route.
    let mut generations = std::collections::HashMap::<ObjectKey, Option<i64>>::new();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(store)
        .inspect_ok(move |event| {
            for key in index.apply(&index_entries(event)) {
                gone(&key);
            }
            // Routes naming this GrpcBackend's Service resolve again when it appears, goes or
            // changes its spec (it may become, or stop being, a route's backend).
            let (backend, deleted) = match event {
                watcher::Event::Apply(backend) => (backend, false),
                watcher::Event::Delete(backend) => (backend, true),
                watcher::Event::InitApply(backend) => {
                    if let Ok(grpc_backend) = &backend.0 {
                        generations.insert(ObjectKey::of(grpc_backend), grpc_backend.metadata.generation);
                    }
                    return;
                }
                watcher::Event::InitDone => {
                    let _ = route_changes.send(RouteChange::BackendsListed);
                    return;
                }
                watcher::Event::Init => return,
            };
            let Ok(grpc_backend) = &backend.0 else { return };
            let key = ObjectKey::of(grpc_backend);
            let changed = if deleted {
                generations.remove(&key);
                true
            } else {
                generations.insert(key, grpc_backend.metadata.generation) != Some(grpc_backend.metadata.generation)
            };
            if changed {
                let service = ObjectKey::new(
                    grpc_backend.namespace().unwrap_or_default(),
                    grpc_backend.spec.service.clone(),
                );
                let _ = route_changes.send(RouteChange::Service(service));
            }
        })
        .applied_objects()
}

/// What the Service -> GrpcBackends index keeps of a GrpcBackend: its name, namespace and
/// spec. The status (up to a megabyte) stays in the controller's store only.
pub(super) fn index_entries(event: &watcher::Event<Backend>) -> watcher::Event<Backend> {
    let entry = |backend: &Backend| {
        let metadata = kube::api::ObjectMeta {
            name: backend.meta().name.clone(),
            namespace: backend.meta().namespace.clone(),
            ..Default::default()
        };
        DeserializeGuard(match &backend.0 {
            Ok(backend) => Ok(GrpcBackend {
                metadata,
                spec: backend.spec.clone(),
                status: None,
            }),
            Err(invalid) => Err(kube::core::error_boundary::InvalidObject {
                error: invalid.error.clone(),
                metadata,
            }),
        })
    };
    match event {
        watcher::Event::Apply(backend) => watcher::Event::Apply(entry(backend)),
        watcher::Event::Delete(backend) => watcher::Event::Delete(entry(backend)),
        watcher::Event::InitApply(backend) => watcher::Event::InitApply(entry(backend)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// An API for objects of kind `K` in `namespace`, or in all namespaces.
pub(super) fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

fn trigger_backends_of(backends: &ByService<Backend>, triggers: &Triggers, service: &ObjectKey) {
    for backend in backends.of_service(service) {
        let _ = triggers.send(ObjectRef::from_obj(backend.as_ref()));
    }
}
