//! GRPCRoutes and ReferenceGrants, watched: a store of each for the reconciles, a controller
//! writing each route's status, and triggers for the GrpcBackends whose routing table a change
//! concerns. What a table or a route status holds is decided in [`crate::routes::resolve`].
//!
//! A table is only computed from complete lists: until both watches have listed (or found the
//! Gateway API not installed), a GrpcBackend keeps the table it published, so that an operator
//! restart does not publish "no routes" for a moment. Every change resolves the routes it may
//! concern again (a route; a Service, GrpcBackend or ReferenceGrant a route names), and a
//! route's reconcile triggers the GrpcBackends it attaches to, or was published in.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt, future};
use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        controller::Action,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use kubegrpc_crds::{
    GrpcBackend,
    gateway::{GRPCRoute, ReferenceGrant},
    routes::RouteEntry,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, instrument, warn};

use super::{Backend, watches::Triggers};
use crate::{
    Error,
    index::ByService,
    key::ObjectKey,
    routes::resolve::{self, Balancer, Lookup},
};

/// Where a change asks for routes to be resolved again.
pub(super) type RouteTriggers = mpsc::UnboundedSender<ObjectRef<GRPCRoute>>;

/// The route and grant views, and what each GrpcBackend's published table names.
pub(super) struct RouteViews {
    pub routes: Store<GRPCRoute>,
    grants: Store<ReferenceGrant>,
    routes_listed: AtomicBool,
    grants_listed: AtomicBool,
    backends_listed: AtomicBool,
    /// Asks for every GrpcBackend to be reconciled.
    relisted: mpsc::UnboundedSender<()>,
    /// The routes each GrpcBackend's latest table names: a route that stops attaching to it
    /// (or is deleted) must trigger it, to take the entries out.
    tabled: Mutex<HashMap<ObjectKey, BTreeSet<String>>>,
    route_triggers: RouteTriggers,
    backend_triggers: Triggers,
    backends: Arc<ByService<Backend>>,
    services: Store<Service>,
}

/// The lists the views wait for before any table is computed.
#[derive(Clone, Copy, Debug)]
pub(super) enum Listed {
    Routes,
    Grants,
    /// The GrpcBackends (a table names other GrpcBackends: computed from a partial list, it
    /// would leave backends out).
    Backends,
}

/// What the Service and GrpcBackend watches tell the route views.
#[derive(Clone, Debug)]
pub(super) enum RouteChange {
    /// A Service changed, or a GrpcBackend naming it appeared, went or changed its spec.
    Service(ObjectKey),
    /// The GrpcBackend watch listed every GrpcBackend.
    BackendsListed,
}

/// What [`RouteViews::start`] hands to the route controller.
pub(super) struct RouteController {
    pub views: Arc<RouteViews>,
    pub stream: std::pin::Pin<Box<dyn Stream<Item = Result<GRPCRoute, watcher::Error>> + Send>>,
    pub store: Store<GRPCRoute>,
    pub triggered: mpsc::UnboundedReceiver<ObjectRef<GRPCRoute>>,
    /// The ReferenceGrant watch; it stops when this is dropped.
    pub grants_task: AbortOnDropHandle<()>,
}

impl RouteViews {
    /// Starts the ReferenceGrant watch and prepares the GRPCRoute watch (run by the route
    /// controller). `relisted` asks for every GrpcBackend to be reconciled, once both views
    /// are complete.
    pub fn start(
        client: &Client,
        namespace: &Option<String>,
        backends: Arc<ByService<Backend>>,
        services: Store<Service>,
        backend_triggers: Triggers,
        relisted: mpsc::UnboundedSender<()>,
    ) -> RouteController {
        let (route_triggers, triggered) = mpsc::unbounded_channel();
        let (routes, routes_writer) = reflector::store::<GRPCRoute>();
        let (grants, grants_writer) = reflector::store::<ReferenceGrant>();
        let views = Arc::new(RouteViews::unlisted(
            routes.clone(),
            grants,
            relisted,
            route_triggers,
            backend_triggers,
            backends,
            services,
        ));

        let grants_task = AbortOnDropHandle::new(tokio::spawn({
            let views = views.clone();
            watcher(
                super::watches::scoped::<ReferenceGrant>(client, namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(grants_writer)
            .for_each(move |event| {
                match event {
                    // A grant may admit or refuse any cross-namespace reference: resolve
                    // every route again (routes are few).
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => views.trigger_all_routes(),
                    Ok(watcher::Event::InitDone) => {
                        views.mark_listed(Listed::Grants);
                        views.trigger_all_routes();
                    }
                    Ok(_) => {}
                    Err(error) if not_served(&error) => {
                        if !views.grants_listed.load(Ordering::Acquire) {
                            info!(
                                "ReferenceGrants are not served (Gateway API CRDs not installed): none admit anything"
                            );
                        }
                        views.mark_listed(Listed::Grants);
                    }
                    Err(error) => warn!(%error, "watching ReferenceGrants failed; retrying"),
                }
                future::ready(())
            })
        }));

        let stream = watcher(
            super::watches::scoped::<GRPCRoute>(client, namespace),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(routes_writer)
        .filter_map({
            let views = views.clone();
            move |event| {
                let touched = match event {
                    Ok(watcher::Event::Apply(route)) => {
                        views.trigger_backends_of_route(&route);
                        Some(Ok(route))
                    }
                    Ok(watcher::Event::InitApply(route)) => Some(Ok(route)),
                    Ok(watcher::Event::Delete(route)) => {
                        views.trigger_backends_of_route(&route);
                        None
                    }
                    Ok(watcher::Event::InitDone) => {
                        views.mark_listed(Listed::Routes);
                        None
                    }
                    Ok(watcher::Event::Init) => None,
                    Err(error) if not_served(&error) => {
                        if !views.routes_listed.load(Ordering::Acquire) {
                            info!(
                                "GRPCRoutes are not served (Gateway API CRDs not installed): no routes until they are"
                            );
                        }
                        views.mark_listed(Listed::Routes);
                        None
                    }
                    Err(error) => Some(Err(error)),
                };
                future::ready(touched)
            }
        })
        .boxed();

        RouteController {
            views,
            stream,
            store: routes,
            triggered,
            grants_task,
        }
    }

    /// Views fed by no watch, never complete: every GrpcBackend keeps its published table.
    #[cfg(test)]
    pub fn detached(backends: Arc<ByService<Backend>>, services: Store<Service>, backend_triggers: Triggers) -> Self {
        let (route_triggers, _) = mpsc::unbounded_channel();
        let (relisted, _) = mpsc::unbounded_channel();
        Self::unlisted(
            reflector::store::<GRPCRoute>().0,
            reflector::store::<ReferenceGrant>().0,
            relisted,
            route_triggers,
            backend_triggers,
            backends,
            services,
        )
    }

    /// Views over these stores, none of them listed yet.
    fn unlisted(
        routes: Store<GRPCRoute>,
        grants: Store<ReferenceGrant>,
        relisted: mpsc::UnboundedSender<()>,
        route_triggers: RouteTriggers,
        backend_triggers: Triggers,
        backends: Arc<ByService<Backend>>,
        services: Store<Service>,
    ) -> Self {
        Self {
            routes,
            grants,
            routes_listed: AtomicBool::new(false),
            grants_listed: AtomicBool::new(false),
            backends_listed: AtomicBool::new(false),
            relisted,
            tabled: Mutex::new(HashMap::new()),
            route_triggers,
            backend_triggers,
            backends,
            services,
        }
    }

    /// Whether every view holds a complete list (or knows the API is not there).
    fn listed(&self) -> bool {
        self.routes_listed.load(Ordering::Acquire)
            && self.grants_listed.load(Ordering::Acquire)
            && self.backends_listed.load(Ordering::Acquire)
    }

    /// One list is complete; when it is the last, every route and GrpcBackend is resolved.
    pub fn mark_listed(&self, part: Listed) {
        let flag = match part {
            Listed::Routes => &self.routes_listed,
            Listed::Grants => &self.grants_listed,
            Listed::Backends => &self.backends_listed,
        };
        if !flag.swap(true, Ordering::AcqRel) && self.listed() {
            debug!(?part, "route views complete");
            self.trigger_all_routes();
            let _ = self.relisted.send(());
        }
    }

    /// What the Service and GrpcBackend watches report.
    pub fn changed(&self, change: &RouteChange) {
        match change {
            RouteChange::Service(service) => self.service_changed(service),
            RouteChange::BackendsListed => self.mark_listed(Listed::Backends),
        }
    }

    fn trigger_all_routes(&self) {
        for route in self.routes.state() {
            let _ = self.route_triggers.send(ObjectRef::from_obj(route.as_ref()));
        }
    }

    /// The routing table `backend` deserves, once the views are complete (`None` before: keep
    /// the published one). Records which routes it names.
    pub fn table(&self, backend: &GrpcBackend, key: &ObjectKey) -> Option<Vec<RouteEntry>> {
        if !self.listed() {
            return None;
        }
        let routes: Vec<Arc<GRPCRoute>> = self
            .routes
            .state()
            .into_iter()
            .filter(|route| route.namespace().as_deref() == Some(key.namespace.as_str()))
            .collect();
        let table = if routes.is_empty() {
            Vec::new()
        } else {
            resolve::table_for(&Balancer::of(backend), &routes, &self.lookup())
        };
        let named: BTreeSet<String> = table.iter().map(|entry| entry.route.clone()).collect();
        let mut tabled = self.tabled();
        if named.is_empty() {
            tabled.remove(key);
        } else {
            tabled.insert(key.clone(), named);
        }
        Some(table)
    }

    /// A GrpcBackend is gone.
    pub fn forget(&self, key: &ObjectKey) {
        self.tabled().remove(key);
    }

    /// A Service changed, or a GrpcBackend naming it: the routes naming that Service are
    /// resolved again.
    fn service_changed(&self, service: &ObjectKey) {
        for route in self.routes.state() {
            if resolve::services_named(&route).contains(service) {
                let _ = self.route_triggers.send(ObjectRef::from_obj(route.as_ref()));
            }
        }
    }

    /// Triggers the GrpcBackends a route attaches to and those whose table names it.
    fn trigger_backends_of_route(&self, route: &GRPCRoute) {
        let name = format!("{}/{}", route.namespace().unwrap_or_default(), route.name_any());
        let mut keys: BTreeSet<ObjectKey> = self
            .tabled()
            .iter()
            .filter(|(_, routes)| routes.contains(&name))
            .map(|(key, _)| key.clone())
            .collect();
        for service in resolve::services_named(route) {
            for backend in self.backends.of_service(&service) {
                keys.insert(ObjectKey::of(backend.as_ref()));
            }
        }
        for key in keys {
            let _ = self.backend_triggers.send(key.object_ref());
        }
    }

    fn lookup(&self) -> LiveLookup<'_> {
        LiveLookup {
            services: &self.services,
            backends: &self.backends,
            grants: &self.grants,
        }
    }

    fn tabled(&self) -> MutexGuard<'_, HashMap<ObjectKey, BTreeSet<String>>> {
        self.tabled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The API is not served (the Gateway API CRDs are not installed): a 404 on list or watch. The
/// apiserver answers an unknown group with a plain-text 404 page, not a Status, so the code is
/// what tells.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// The stores, as the resolver reads them.
struct LiveLookup<'a> {
    services: &'a Store<Service>,
    backends: &'a ByService<Backend>,
    grants: &'a Store<ReferenceGrant>,
}

impl Lookup for LiveLookup<'_> {
    fn service(&self, key: &ObjectKey) -> Option<Arc<Service>> {
        self.services.get(&key.object_ref())
    }

    fn backends_of_service(&self, service: &ObjectKey) -> Vec<Balancer> {
        self.backends
            .of_service(service)
            .iter()
            .filter_map(|backend| backend.0.as_ref().ok())
            .map(Balancer::of)
            .collect()
    }

    fn grants_in(&self, namespace: &str) -> Vec<Arc<ReferenceGrant>> {
        self.grants
            .state()
            .into_iter()
            .filter(|grant| grant.namespace().as_deref() == Some(namespace))
            .collect()
    }
}

/// What a route reconcile shares.
pub(super) struct RouteContext {
    pub client: Client,
    pub views: Arc<RouteViews>,
}

/// Writes the status `route` deserves (only when it differs: a merge patch guarded by the
/// resourceVersion read, since other controllers own other entries of the same list), then
/// triggers the GrpcBackends whose table it changes.
#[instrument(skip_all, fields(route = %ObjectKey::of(route.as_ref())))]
pub(super) async fn reconcile_route(route: Arc<GRPCRoute>, context: Arc<RouteContext>) -> Result<Action, Error> {
    let views = &context.views;
    if !views.listed() {
        // Resolved once every view is complete (`mark_listed` triggers every route).
        return Ok(Action::await_change());
    }
    let desired = resolve::route_status(&route, &views.lookup(), Timestamp::now());
    views.trigger_backends_of_route(&route);
    if route.status.as_ref().is_some_and(|current| *current == desired)
        || (route.status.is_none() && desired.parents.is_empty())
    {
        return Ok(Action::await_change());
    }
    let key = ObjectKey::of(route.as_ref());
    let api: Api<GRPCRoute> = Api::namespaced(context.client.clone(), &key.namespace);
    let patch = json!({
        "metadata": {"resourceVersion": route.resource_version()},
        "status": desired,
    });
    match api
        .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            debug!(parents = desired.parents.len(), "route status written");
            Ok(Action::await_change())
        }
        // Changed meanwhile: the watch brings the new version, which is reconciled again.
        Err(kube::Error::Api(status)) if status.is_conflict() => Ok(Action::requeue(Duration::from_secs(1))),
        Err(source) => Err(Error::RouteStatusWrite {
            route: key.to_string(),
            source,
        }),
    }
}

/// A failed route status write is retried in 5 seconds.
pub(super) fn route_error_policy(route: Arc<GRPCRoute>, error: &Error, _context: Arc<RouteContext>) -> Action {
    warn!(route = %ObjectKey::of(route.as_ref()), %error, "writing the route status failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
