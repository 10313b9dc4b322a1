//! The reconciler: wires the watches, the probers and the pure status logic to the API.
//!
//! GrpcBackends drive a kube-runtime Controller; the Service and EndpointSlice watches
//! ([`watches`]) and the probers trigger a reconcile of the GrpcBackends a change concerns.
//! A reconcile looks at the world ([`observe`]: endpoints, their health, their weights),
//! computes the whole desired status from it ([`crate::status`]) and hands it to the status
//! writer ([`writer`]), which writes it (server-side apply) only when it differs from what is
//! published, coalescing writes per GrpcBackend: the first change goes out at once, changes
//! within `status_write_interval` of a write wait for the next slot, and the latest state is
//! what gets written then.

mod observe;
mod routes;
mod tls;
mod watches;
mod writer;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    core::DeserializeGuard,
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, Store},
    },
};
use kubegrpc_crds::{GrpcBackend, OPERATOR_FIELD_MANAGER};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, instrument, warn};

use self::{
    observe::observe,
    routes::{RouteChange, RouteViews},
    tls::{CA_BUNDLE_REFRESH, Resolved, TlsSettings},
    watches::{PodWatch, Watches},
    writer::{StatusWriter, WriteOutcome},
};
use crate::{
    Error,
    health::{
        registry::{ProbeReports, ProberOptions, ProberRegistry},
        tls::ClientIdentity,
    },
    index::ByService,
    key::ObjectKey,
    metrics::Metrics,
    pods::ReportedValue,
    status::{self, Observation, StatusContext},
};

/// Default of [`Settings::reconcile_concurrency`].
pub const DEFAULT_RECONCILE_CONCURRENCY: u16 = 8;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// Least time between two status writes of one GrpcBackend.
    pub status_write_interval: Duration,
    /// Most bytes of JSON the endpoint list of one status may take.
    pub endpoints_budget: usize,
    /// This replica's name, for Events.
    pub identity: String,
    /// Most GrpcBackends reconciled at once: a reconcile of a big one serializes and writes a
    /// status of up to a megabyte, so a burst (a restart, a relist) is bounded in memory.
    pub reconcile_concurrency: u16,
    /// Bind probe connections to this local address: for multi-homed hosts, and for tests that
    /// tell the operator's traffic apart from clients'. Applies to endpoints of its address
    /// family; others are connected from the system's choice.
    pub probe_source_address: Option<std::net::IpAddr>,
    /// The certificate the probers present to TLS backends that ask for one (mutual TLS).
    pub probe_client_identity: Option<Arc<ClientIdentity>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            status_write_interval: Duration::from_secs(1),
            endpoints_budget: status::DEFAULT_ENDPOINTS_BUDGET,
            identity: "kubegrpc-operator".into(),
            reconcile_concurrency: DEFAULT_RECONCILE_CONCURRENCY,
            probe_source_address: None,
            probe_client_identity: None,
        }
    }
}

/// A GrpcBackend as watched: one that cannot be decoded is reconciled too, to say so.
type Backend = DeserializeGuard<GrpcBackend>;

/// What every reconcile shares.
struct Context {
    settings: Settings,
    services: Store<Service>,
    slices: Arc<ByService<EndpointSlice>>,
    /// The GrpcBackends that exist, as the GrpcBackend watch keeps them (see `reconcile_backend`).
    backends: Arc<ByService<Backend>>,
    probers: ProberRegistry,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    writer: StatusWriter,
    /// Failed reconciles in a row, per GrpcBackend, for the error backoff.
    failures: Mutex<HashMap<ObjectKey, u32>>,
    /// The `Static` policy's Pod annotations.
    pods: PodWatch,
    /// Bad `kubegrpc.io/weight` values already reported by an Event, so that each is reported
    /// once rather than at every reconcile.
    bad_annotations: Mutex<HashSet<ReportedValue>>,
    /// `spec.tls` of each GrpcBackend, with its CA bundle.
    tls: TlsSettings,
    /// GRPCRoutes and ReferenceGrants, for the routing tables.
    routes: Arc<RouteViews>,
}

/// Runs the reconciler until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let (triggers, triggered) = mpsc::unbounded_channel();
    let (relisted, relists) = mpsc::unbounded_channel::<()>();
    let (probe_changes, probe_changed) = mpsc::unbounded_channel::<ObjectKey>();

    let (route_changes, route_changed) = mpsc::unbounded_channel::<RouteChange>();
    let mut watches = Watches::start(&client, &settings.namespace, &triggers, &relisted, &route_changes);
    info!("waiting for the Service and EndpointSlice caches");
    watches.ready().await?;
    info!("caches ready; reconciling");
    let route_controller = RouteViews::start(
        &client,
        &settings.namespace,
        watches.backends.clone(),
        watches.services.clone(),
        triggers.clone(),
        relisted.clone(),
    );
    let route_views = route_controller.views.clone();
    let route_controller_grants = route_controller.grants_task;
    // Services and GrpcBackends a route names resolve it again.
    let route_hook = AbortOnDropHandle::new(tokio::spawn({
        let views = route_views.clone();
        UnboundedReceiverStream::new(route_changed).for_each(move |change| {
            views.changed(&change);
            futures::future::ready(())
        })
    }));

    let reporter = Reporter {
        controller: OPERATOR_FIELD_MANAGER.into(),
        instance: Some(settings.identity.clone()),
    };
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        writer: StatusWriter::new(client.clone(), metrics.clone(), settings.status_write_interval),
        services: watches.services.clone(),
        slices: watches.slices.clone(),
        backends: watches.backends.clone(),
        probers: ProberRegistry::new(
            ProbeReports {
                metrics: metrics.clone(),
                changed: probe_changes,
            },
            ProberOptions {
                source_address: settings.probe_source_address,
                write_interval: settings.status_write_interval,
            },
        ),
        metrics,
        failures: Mutex::new(HashMap::new()),
        pods: PodWatch::new(client.clone(), settings.namespace.clone(), triggers.clone()),
        bad_annotations: Mutex::new(HashSet::new()),
        tls: TlsSettings::new(client.clone(), settings.probe_client_identity.clone()),
        routes: route_views.clone(),
        settings,
    });

    let (backends_store, backends_writer) = reflector::store();
    let backends_api: Api<Backend> = watches::scoped(&client, &context.settings.namespace);
    let backends_stream = watches::backends(
        backends_api,
        backends_writer,
        watches.backends.clone(),
        {
            let context = context.clone();
            move |gone| context.forget(gone)
        },
        route_changes,
    );
    let probe_triggers = UnboundedReceiverStream::new(probe_changed).map(|key| key.object_ref::<Backend>());
    let concurrency = context.settings.reconcile_concurrency;
    // Stopped by dropping it: a route status write is a guarded merge patch, safe to cut
    // short, and a route controller whose store never fills (no Gateway API installed) would
    // hold up a graceful shutdown, which waits for the store first.
    let routes_task = AbortOnDropHandle::new(tokio::spawn(
        Controller::for_stream(route_controller.stream, route_controller.store)
            .reconcile_on(UnboundedReceiverStream::new(route_controller.triggered))
            .run(
                routes::reconcile_route,
                routes::route_error_policy,
                Arc::new(routes::RouteContext {
                    client: client.clone(),
                    views: route_views,
                }),
            )
            .for_each(|result| {
                if let Err(error) = result {
                    debug!(%error, "route reconcile request not completed");
                }
                futures::future::ready(())
            }),
    ));
    Controller::for_stream(backends_stream, backends_store)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .reconcile_on(UnboundedReceiverStream::new(triggered))
        .reconcile_on(probe_triggers)
        .reconcile_all_on(UnboundedReceiverStream::new(relists))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            if let Err(error) = result {
                debug!(%error, "reconcile request not completed");
            }
            futures::future::ready(())
        })
        .await;
    drop(routes_task);
    drop(route_hook);
    drop(route_controller_grants);
    drop(triggers);
    Ok(())
}

/// Publishes the status `backend` deserves. Every log line of a reconcile is in this span,
/// which names the GrpcBackend.
#[instrument(skip_all, fields(backend = %ObjectKey::of(backend.as_ref())))]
async fn reconcile(backend: Arc<Backend>, context: Arc<Context>) -> Result<Action, Error> {
    context.metrics.reconciles.inc();
    let _timer = context.metrics.reconcile_timer();
    let key = ObjectKey::of(backend.as_ref());
    let result = match &backend.0 {
        Ok(grpc_backend) => reconcile_backend(grpc_backend, &key, &context).await,
        Err(invalid) => match context.writer.read_ignoring_status(&key).await {
            Some(readable) => {
                warn!(error = %invalid.error, "the status cannot be read; rewriting it from the spec");
                reconcile_backend(&readable, &key, &context).await
            }
            None => {
                context.probers.remove(&key);
                context.pods.set_user(&key, false);
                let message = format!("the object cannot be read: {}", invalid.error);
                let (generation, resource_version) =
                    (invalid.metadata.generation, invalid.metadata.resource_version.clone());
                let written = context
                    .writer
                    .write_unreadable(&key, generation, resource_version, &message)
                    .await?;
                Ok(match written {
                    WriteOutcome::Deferred(wait) => Action::requeue(wait),
                    WriteOutcome::Unchanged | WriteOutcome::Written => Action::await_change(),
                })
            }
        },
    };
    if result.is_ok() {
        context.failures().remove(&key);
    }
    result
}

async fn reconcile_backend(backend: &GrpcBackend, key: &ObjectKey, context: &Context) -> Result<Action, Error> {
    let (tls, new_failure) = context.tls.resolve(key, &backend.spec).await;
    if let Resolved::Stale(_, why) = &tls
        && new_failure
    {
        let notice = status::Notice {
            warning: true,
            reason: "CaBundleUnavailable".into(),
            note: format!("{why}; the CA bundle read before stays in use"),
        };
        context.publish_event(backend, notice).await;
    }
    // A CA bundle is read again every refresh: reconcile that often to pick up a rotation.
    let refresh = backend
        .spec
        .tls
        .as_ref()
        .and_then(|tls| tls.ca_bundle.as_ref())
        .map(|_| CA_BUNDLE_REFRESH);
    let observed = observe(backend, key, context, tls);
    // Reconciles run as tasks of their own, beside the watch that handles deletions: one that
    // took the object before it was deleted may start probers or the Pod watch for it after
    // it was forgotten. The watch removes a deleted GrpcBackend from the index before it calls
    // `forget`, so either this sees it gone (no await since `observe`) or `forget` comes after.
    if !context.backends.contains(key) {
        debug!("deleted while reconciled; forgotten again");
        context.forget(key);
        return Ok(Action::await_change());
    }
    if let Some(wait) = observed.first_probes_due {
        // A new endpoint's first answer is moments away: publish it with its health rather than
        // as Unknown now and again in a moment (every write wakes every client).
        return Ok(Action::requeue(wait));
    }
    if observed.awaiting_pods {
        debug!("Static weights wait for the Pod watch's first list");
        return Ok(Action::await_change());
    }
    if !matches!(observed.observation, Observation::Endpoints(_)) {
        context.probers.remove(key);
    }
    for notice in observed.notices {
        context.publish_event(backend, notice).await;
    }
    let status_context = StatusContext {
        namespace: &key.namespace,
        service: &backend.spec.service,
        port: &backend.spec.port,
        generation: backend.metadata.generation,
        slow_start_window: backend.spec.weighting.slow_start_window(),
        now: Timestamp::now(),
        endpoints_budget: context.settings.endpoints_budget,
        panic_threshold: u32::try_from(backend.spec.health_check.panic_threshold).unwrap_or(0),
    };
    let mut desired = status::desired_status(backend.status.as_ref(), &observed.observation, &status_context).status;
    // Until the route views are complete, the published table stays.
    desired.routes = context
        .routes
        .table(backend, key)
        .unwrap_or_else(|| backend.status.as_ref().map(|s| s.routes.clone()).unwrap_or_default());
    let written = context.writer.write(backend, key, &desired).await?;
    if written == WriteOutcome::Written {
        for notice in status::notices(backend.status.as_ref(), &desired) {
            context.publish_event(backend, notice).await;
        }
    }
    let weights_change_in = match (observed.weights_change_in, refresh) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(match (written, weights_change_in) {
        (WriteOutcome::Deferred(wait), Some(next)) => Action::requeue(wait.min(next)),
        (WriteOutcome::Deferred(wait), None) => Action::requeue(wait),
        (_, Some(next)) => Action::requeue(next),
        (_, None) => Action::await_change(),
    })
}

/// A failed reconcile is retried after 1s, doubling per failure in a row, at most 5 minutes.
#[instrument(skip_all, fields(backend = %ObjectKey::of(backend.as_ref())))]
fn error_policy(backend: Arc<Backend>, error: &Error, context: Arc<Context>) -> Action {
    let key = ObjectKey::of(backend.as_ref());
    let failures = {
        let mut failures = context.failures();
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let retry_in = error_backoff(failures);
    warn!(%error, failures, ?retry_in, "reconcile failed; retrying");
    context
        .metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(retry_in)
}

/// The wait before the next try after `failures` failed reconciles in a row.
fn error_backoff(failures: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(MAX_ERROR_BACKOFF)
}

const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(300);

// === impl Context ===

impl Context {
    /// A GrpcBackend is gone: stop its probers, drop its series and records.
    fn forget(&self, key: &ObjectKey) {
        self.probers.remove(key);
        self.pods.set_user(key, false);
        self.metrics.forget(&key.namespace, &key.name);
        self.writer.forget(key);
        self.tls.forget(key);
        self.routes.forget(key);
        self.failures().remove(key);
        info!(backend = %key, "GrpcBackend gone; its probers stopped");
    }

    async fn publish_event(&self, backend: &GrpcBackend, notice: status::Notice) {
        let event = KubeEvent {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason,
            note: Some(notice.note),
            action: "PublishStatus".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &backend.object_ref(&())).await {
            warn!(%error, "cannot publish an Event");
        }
    }

    fn failures(&self) -> MutexGuard<'_, HashMap<ObjectKey, u32>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bad_annotations(&self) -> MutexGuard<'_, HashSet<ReportedValue>> {
        self.bad_annotations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
