//! The reconciler: wires the watches, the probers and the pure status logic to the API.
//!
//! GrpcBackends drive a kube-runtime Controller. Services and EndpointSlices are watched by
//! tasks of their own that keep a store (Services) and a by-Service index (EndpointSlices) and
//! map each change to the GrpcBackends naming that Service, through the operator's own
//! Service -> GrpcBackends index. Probers trigger a reconcile when an endpoint's health changes.
//!
//! A reconcile computes the whole desired status from those in-memory views and writes it
//! (server-side apply) only when it differs from what is published. Writes per GrpcBackend are
//! coalesced: the first change goes out at once, changes within `status_write_interval` of a
//! write wait for the next slot, and the latest state is what gets written then.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use kubegrpc_crds::{
    FULL_WEIGHT, GrpcBackend, GrpcBackendStatus, Health, OPERATOR_FIELD_MANAGER, WEIGHT_ANNOTATION, WeightingPolicy,
    condition, condition::reason,
};
use serde_json::json;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::{
    Error,
    discovery::{self, SERVICE_NAME_LABEL},
    health::{
        prober::ProbeState,
        registry::{ProbeReports, ProberOptions, ProberRegistry},
        tracker::HealthVerdict,
    },
    index::ByService,
    key::ObjectKey,
    metrics::Metrics,
    pods::{self, PodWeights},
    spec,
    status::{self, Observation, ProbedEndpoint, StatusContext},
    weights,
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
        }
    }
}

type Backend = DeserializeGuard<GrpcBackend>;

/// What every reconcile shares.
pub struct Context {
    client: Client,
    settings: Settings,
    services: Store<Service>,
    slices: Arc<ByService<EndpointSlice>>,
    probers: ProberRegistry,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    writes: Mutex<HashMap<ObjectKey, LastWrite>>,
    /// Failed reconciles in a row, per GrpcBackend, for the error backoff.
    failures: Mutex<HashMap<ObjectKey, u32>>,
    /// The `Static` policy's Pod annotations.
    pods: Arc<PodWeights>,
    /// Bad `kubegrpc.io/weight` values already reported by an Event (namespace, Pod, value),
    /// so that each is reported once rather than at every reconcile.
    bad_annotations: Mutex<std::collections::HashSet<pods::ReportedValue>>,
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

/// Runs the reconciler until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let backends_api: Api<Backend> = scoped(&client, &settings.namespace);
    let services_api: Api<Service> = scoped(&client, &settings.namespace);
    let slices_api: Api<EndpointSlice> = scoped(&client, &settings.namespace);

    let backends = Arc::new(ByService::<Backend>::new(|backend| {
        backend.0.as_ref().ok().map(|b| b.spec.service.clone())
    }));
    let slices = Arc::new(ByService::<EndpointSlice>::new(|slice| {
        slice.labels().get(SERVICE_NAME_LABEL).cloned()
    }));
    let (triggers, triggered) = mpsc::unbounded_channel::<ObjectRef<Backend>>();
    let (relisted, relists) = mpsc::unbounded_channel::<()>();
    let (probe_changes, probe_changed) = mpsc::unbounded_channel::<ObjectKey>();

    // Services: a store for the reconciler, triggers for the GrpcBackends that name them.
    let (services, services_writer) = reflector::store();
    let _services_task = AbortOnDropHandle::new(tokio::spawn({
        let backends = backends.clone();
        let triggers = triggers.clone();
        let relisted = relisted.clone();
        watcher(services_api, watcher::Config::default())
            .default_backoff()
            .modify(discovery::trim_service)
            .reflect(services_writer)
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::Apply(service) | watcher::Event::Delete(service)) => {
                        trigger_backends_of(&backends, &triggers, &service_key(&service, service.name_any()));
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
    let (slices_ready_tx, mut slices_ready) = tokio::sync::watch::channel(false);
    let _slices_task = AbortOnDropHandle::new(tokio::spawn({
        let slices = slices.clone();
        let backends = backends.clone();
        let triggers = triggers.clone();
        let relisted = relisted.clone();
        watcher(slices_api, watcher::Config::default().labels(SERVICE_NAME_LABEL))
            .default_backoff()
            .modify(discovery::trim_slice)
            .for_each(move |event| {
                match event {
                    Ok(event) => {
                        slices.apply(&event);
                        match &event {
                            watcher::Event::Apply(slice) | watcher::Event::Delete(slice) => {
                                if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
                                    trigger_backends_of(&backends, &triggers, &service_key(slice, service.clone()));
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

    // Pods, metadata only: the Static policy's weight annotations.
    let pod_weights = Arc::new(PodWeights::default());
    let (pods_ready_tx, mut pods_ready) = tokio::sync::watch::channel(false);
    let _pods_task = AbortOnDropHandle::new(tokio::spawn({
        let pod_weights = pod_weights.clone();
        let backends = backends.clone();
        let triggers = triggers.clone();
        watcher(
            scoped::<PartialObjectMeta<Pod>>(&client, &settings.namespace),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(pods::trim)
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    for namespace in pod_weights.apply(&event) {
                        for backend in backends.in_namespace(&namespace) {
                            let is_static = backend
                                .0
                                .as_ref()
                                .is_ok_and(|b| b.spec.weighting.policy == WeightingPolicy::Static);
                            if is_static {
                                let _ = triggers.send(ObjectRef::from_obj(backend.as_ref()));
                            }
                        }
                    }
                    if matches!(event, watcher::Event::InitDone) {
                        let _ = pods_ready_tx.send(true);
                    }
                }
                Err(error) => warn!(%error, "watching Pods (metadata) failed; retrying"),
            }
            futures::future::ready(())
        })
    }));

    // Reconciling before both views are complete would publish endpoints as missing.
    info!("waiting for the Service and EndpointSlice caches");
    services.wait_until_ready().await.map_err(|_| Error::CacheNeverReady)?;
    slices_ready
        .wait_for(|ready| *ready)
        .await
        .map_err(|_| Error::CacheNeverReady)?;
    // Static weights published before the Pods are read would be written twice.
    pods_ready
        .wait_for(|ready| *ready)
        .await
        .map_err(|_| Error::CacheNeverReady)?;
    info!("caches ready; reconciling");

    let reporter = Reporter {
        controller: OPERATOR_FIELD_MANAGER.into(),
        instance: Some(settings.identity.clone()),
    };
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        services,
        slices,
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
        settings,
        metrics,
        writes: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        pods: pod_weights,
        bad_annotations: Mutex::new(Default::default()),
    });

    let (backends_store, backends_writer) = reflector::store();
    let backends_stream = watcher(backends_api, watcher::Config::default())
        .default_backoff()
        .reflect(backends_writer)
        .inspect_ok({
            let backends = backends.clone();
            let context = context.clone();
            move |event| {
                for gone in backends.apply(&index_entries(event)) {
                    context.forget(&gone);
                }
            }
        })
        .applied_objects();

    let probe_triggers = UnboundedReceiverStream::new(probe_changed).map(|key: ObjectKey| key.object_ref::<Backend>());
    let concurrency = context.settings.reconcile_concurrency;
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
    drop(triggers);
    Ok(())
}

/// What the Service -> GrpcBackends index keeps of a GrpcBackend: its name, namespace and
/// spec. The status (up to a megabyte) stays in the controller's store only.
fn index_entries(event: &watcher::Event<Backend>) -> watcher::Event<Backend> {
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

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The key of Service `service` in `object`'s namespace.
fn service_key<K: Resource>(object: &K, service: String) -> ObjectKey {
    ObjectKey::new(object.namespace().unwrap_or_default(), service)
}

fn trigger_backends_of(
    backends: &ByService<Backend>,
    triggers: &mpsc::UnboundedSender<ObjectRef<Backend>>,
    service: &ObjectKey,
) {
    for backend in backends.of_service(service) {
        let _ = triggers.send(ObjectRef::from_obj(backend.as_ref()));
    }
}

async fn reconcile(backend: Arc<Backend>, context: Arc<Context>) -> Result<Action, Error> {
    context.metrics.reconciles.inc();
    let _timer = context.metrics.reconcile_timer();
    let key = ObjectKey::of(backend.as_ref());
    let result = match &backend.0 {
        Ok(grpc_backend) => reconcile_backend(grpc_backend, &context).await,
        Err(invalid) => match read_ignoring_status(&context.client, &key).await {
            // Only the status is unreadable (an older shape, a hand edit made while the schema
            // was relaxed): reconcile from the spec and write the status anew, once.
            Some(readable) => {
                warn!(backend = %key, error = %invalid.error,
                    "the status cannot be read; rewriting it from the spec");
                reconcile_backend(&readable, &context).await
            }
            None => {
                context.probers.remove(&key);
                let message = format!("the object cannot be read: {}", invalid.error);
                let resource_version = invalid.metadata.resource_version.clone();
                write_invalid(&context, &key, invalid.metadata.generation, resource_version, &message).await
            }
        },
    };
    if result.is_ok() {
        context.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
    result
}

/// The GrpcBackend `key` read again with its status left out, if its spec can be read.
async fn read_ignoring_status(client: &Client, key: &ObjectKey) -> Option<GrpcBackend> {
    let resource = ApiResource::erase::<GrpcBackend>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.namespace, &resource);
    let mut object = match api.get(&key.name).await {
        Ok(object) => object,
        Err(error) => {
            debug!(backend = %key, %error, "cannot read the object again");
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

/// A failed reconcile is retried after 1s, doubling per failure in a row, at most 5 minutes.
fn error_policy(backend: Arc<Backend>, error: &Error, context: Arc<Context>) -> Action {
    let key = ObjectKey::of(backend.as_ref());
    let failures = {
        let mut failures = context.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let retry_in = error_backoff(failures);
    warn!(backend = %key, %error, failures, ?retry_in, "reconcile failed; retrying");
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

async fn reconcile_backend(backend: &GrpcBackend, context: &Context) -> Result<Action, Error> {
    let key = ObjectKey::of(backend);
    let observed = observe(backend, &key, context);
    if let Some(wait) = observed.first_probes_due {
        // A new endpoint's first answer is moments away: publish it with its health rather than
        // as Unknown now and again in a moment (every write wakes every client).
        return Ok(Action::requeue(wait));
    }
    if !matches!(observed.observation, Observation::Endpoints(_)) {
        context.probers.remove(&key);
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
    let desired = status::desired_status(backend.status.as_ref(), &observed.observation, &status_context);
    let written = write_status(context, backend, &key, &desired.status).await?;
    Ok(match (written, observed.weights_change_in) {
        (WriteOutcome::Deferred(wait), Some(next)) => Action::requeue(wait.min(next)),
        (WriteOutcome::Deferred(wait), None) => Action::requeue(wait),
        (_, Some(next)) => Action::requeue(next),
        (_, None) => Action::await_change(),
    })
}

/// What the reconciler sees for one GrpcBackend, its probers synced to it.
struct Observed {
    observation: Observation,
    /// Endpoints new to the status still await their first probe: wait this long at most.
    first_probes_due: Option<Duration>,
    /// The weights may change by themselves (new load reports, a blackout ending, a weight
    /// expiring): look again after this long.
    weights_change_in: Option<Duration>,
    /// Events to publish (a bad weight annotation).
    notices: Vec<status::Notice>,
}

fn observe(backend: &GrpcBackend, key: &ObjectKey, context: &Context) -> Observed {
    let observed = |observation| Observed {
        observation,
        first_probes_due: None,
        weights_change_in: None,
        notices: Vec::new(),
    };
    let settings = match spec::probe_settings(&backend.spec) {
        Ok(settings) => settings,
        Err(why) => return observed(Observation::InvalidSpec(why)),
    };
    let policy = match weighting_policy(&backend.spec) {
        Ok(policy) => policy,
        Err(why) => return observed(Observation::InvalidSpec(why)),
    };
    let service_ref = ObjectRef::<Service>::new(&backend.spec.service).within(&key.namespace);
    let Some(service) = context.services.get(&service_ref) else {
        return observed(Observation::ServiceNotFound);
    };
    let port = match discovery::resolve_port(&backend.spec.port, &service) {
        Ok(port) => port,
        Err(missing) => return observed(Observation::PortNotFound(missing)),
    };
    let slices = context
        .slices
        .of_service(&ObjectKey::new(&key.namespace, &backend.spec.service));
    let set = discovery::endpoints_from_slices(slices.iter().map(|s| s.as_ref()), &port);
    for skipped in &set.skipped {
        debug!(backend = %key, slice = %skipped.slice,
            address = %skipped.address, why = skipped.why, "endpoint skipped");
    }

    let published: HashMap<SocketAddr, (HealthVerdict, u32)> = backend
        .status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            let ip = e.address.parse().ok()?;
            let port = u16::try_from(e.port).ok()?;
            Some((
                SocketAddr::new(ip, port),
                (
                    HealthVerdict {
                        health: e.health,
                        reason: e.reason.clone(),
                    },
                    e.weight,
                ),
            ))
        })
        .collect();
    let targets: Vec<SocketAddr> = set.endpoints.iter().map(|e| e.address).collect();
    let states: HashMap<SocketAddr, ProbeState> = context.probers.sync(key, &settings, &targets, |target| {
        published
            .get(&target)
            .map(|(verdict, _)| verdict.clone())
            .unwrap_or(HealthVerdict {
                health: Health::Unknown,
                reason: None,
            })
    });
    let first_probes_due = states
        .iter()
        .filter(|(target, state)| !state.probed && !published.contains_key(target))
        .map(|(_, state)| {
            (state.started + settings.timeout + FIRST_PROBE_MARGIN).saturating_duration_since(Instant::now())
        })
        .filter(|wait| !wait.is_zero())
        .max();
    let mut probed: Vec<(ProbedEndpoint, &ProbeState)> = set
        .endpoints
        .into_iter()
        .filter_map(|endpoint| {
            let state = states.get(&endpoint.address)?;
            let probed = ProbedEndpoint {
                endpoint,
                verdict: state.verdict.clone(),
                connect_failing: state.connect_failing,
                weight: FULL_WEIGHT,
            };
            Some((probed, state))
        })
        .collect();

    if policy == weights::Policy::Static {
        // Reported values whose Pod is gone or changed its annotation are forgotten here,
        // before new ones are added: the set never holds more than the annotated Pods.
        context
            .pods
            .retain_carried(&mut context.bad_annotations.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let pod_of = |endpoint: &ProbedEndpoint| {
        let pod = endpoint.endpoint.pod.as_ref()?;
        Some(ObjectKey::new(&key.namespace, pod))
    };
    let facts: Vec<weights::EndpointFacts> = probed
        .iter()
        .map(|(endpoint, state)| weights::EndpointFacts {
            usable: endpoint.endpoint.kubernetes_ready() && endpoint.verdict.health == Health::Serving,
            annotation: match policy {
                weights::Policy::Static => pod_of(endpoint).and_then(|pod| context.pods.annotation(&pod)),
                _ => None,
            },
            load: state.load,
            prober_started: state.started,
            published: published.get(&endpoint.endpoint.address).map(|(_, weight)| *weight),
        })
        .collect();
    let weighed = weights::weigh(&policy, &facts, Instant::now());
    let mut notices = Vec::new();
    for (index, why) in weighed.invalid_annotations {
        let Some(pod) = pod_of(&probed[index].0) else { continue };
        let value = facts[index].annotation.clone().unwrap_or_default();
        let first = context
            .bad_annotations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((pod.clone(), value));
        if first {
            notices.push(status::Notice {
                warning: true,
                reason: "InvalidWeightAnnotation".into(),
                note: format!(
                    "Pod {}: {WEIGHT_ANNOTATION} {why}; the endpoint gets the default weight {FULL_WEIGHT}",
                    pod.name
                ),
            });
        }
    }
    for ((endpoint, _), weight) in probed.iter_mut().zip(weighed.weights) {
        endpoint.weight = weight;
    }
    let probed = probed.into_iter().map(|(endpoint, _)| endpoint).collect();
    let weights_change_in = weighed.change_in;
    Observed {
        observation: Observation::Endpoints(probed),
        first_probes_due,
        weights_change_in,
        notices,
    }
}

/// The spec's weighting policy with its settings.
fn weighting_policy(spec: &kubegrpc_crds::GrpcBackendSpec) -> Result<weights::Policy, String> {
    Ok(match spec.weighting.policy {
        WeightingPolicy::Equal => weights::Policy::Equal,
        WeightingPolicy::Static => weights::Policy::Static,
        WeightingPolicy::LoadReport => weights::Policy::LoadReport {
            settings: spec::load_settings(spec)?,
            report_interval: spec.weighting.load_report().report_interval(),
        },
    })
}

/// Beyond the probe timeout, how long a write waits for a new endpoint's first probe.
const FIRST_PROBE_MARGIN: Duration = Duration::from_millis(100);

enum WriteOutcome {
    Unchanged,
    Written,
    /// Changed, but written too recently: try again after this long.
    Deferred(Duration),
}

async fn write_status(
    context: &Context,
    backend: &GrpcBackend,
    key: &ObjectKey,
    desired: &GrpcBackendStatus,
) -> Result<WriteOutcome, Error> {
    if backend.status.as_ref() == Some(desired) {
        return Ok(WriteOutcome::Unchanged);
    }
    let desired_json = serde_json::to_value(desired).map_err(Error::Serialize)?;
    let resource_version = backend.resource_version();
    if let Some(wait) = context.must_wait(key, &desired_json, &resource_version) {
        return Ok(wait);
    }
    context
        .apply_status(key, &desired_json, desired_json.clone(), resource_version)
        .await?;
    context.metrics.published(&key.namespace, &key.name, desired);
    info!(backend = %key, ready = desired.ready_endpoints,
        total = desired.total_endpoints, "status written");
    for notice in status::notices(backend.status.as_ref(), desired) {
        context.publish_event(backend, notice).await;
    }
    Ok(WriteOutcome::Written)
}

/// The status of an object that cannot be decoded: only `Ready=False/InvalidSpec`.
async fn write_invalid(
    context: &Context,
    key: &ObjectKey,
    generation: Option<i64>,
    resource_version: Option<String>,
    message: &str,
) -> Result<Action, Error> {
    let condition = Condition {
        type_: condition::READY.into(),
        status: "False".into(),
        reason: reason::INVALID_SPEC.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now())),
    };
    // The transition time is not compared: one write per change of message or object.
    let desired = json!({ "observedGeneration": generation, "conditions": [ { "type": condition.type_, "message": condition.message } ] });
    match context.must_wait(key, &desired, &resource_version) {
        Some(WriteOutcome::Deferred(wait)) => return Ok(Action::requeue(wait)),
        Some(_) => return Ok(Action::await_change()),
        None => {}
    }
    let status = json!({ "observedGeneration": generation, "conditions": [condition] });
    context.apply_status(key, &status, desired, resource_version).await?;
    warn!(backend = %key, %message, "GrpcBackend cannot be read");
    Ok(Action::await_change())
}

// === impl Context ===

impl Context {
    /// Writes `status` with server-side apply (the operator owns every field it writes, so a
    /// hand edit is overwritten), and remembers the write as `compared` (what later
    /// reconciles compare their desired status with).
    async fn apply_status(
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
        self.remember_write(key, compared, resource_version, written.resource_version());
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
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let last = writes.get(key)?;
        let untouched_since = *resource_version == last.before || *resource_version == last.after;
        if untouched_since && last.status == *desired {
            return Some(WriteOutcome::Unchanged);
        }
        let since = last.at.elapsed();
        (since < self.settings.status_write_interval)
            .then(|| WriteOutcome::Deferred(self.settings.status_write_interval - since))
    }

    fn remember_write(
        &self,
        key: &ObjectKey,
        status: serde_json::Value,
        before: Option<String>,
        after: Option<String>,
    ) {
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        writes.insert(
            key.clone(),
            LastWrite {
                at: Instant::now(),
                status,
                before,
                after,
            },
        );
    }

    /// A GrpcBackend is gone: stop its probers, drop its series and write record.
    fn forget(&self, key: &ObjectKey) {
        self.probers.remove(key);
        self.metrics.forget(&key.namespace, &key.name);
        self.writes.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
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
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::client::Body;
    use kubegrpc_crds::{GrpcBackendSpec, PortRef};
    use tokio::time::timeout;

    use super::*;

    type MockHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// The longest a test waits for the reconciler or the mocked API: a bug fails, never hangs.
    const WAIT: Duration = Duration::from_secs(5);
    const NAMESPACE: &str = "ns";
    const STATUS_PATH: &str = "/apis/kubegrpc.io/v1alpha1/namespaces/ns/grpcbackends/echo/status";

    /// One request the reconciler sent to the mocked API.
    #[derive(Debug)]
    struct ApiCall {
        method: Method,
        path: String,
        query: String,
        body: serde_json::Value,
    }

    impl ApiCall {
        fn is_event(&self) -> bool {
            self.path.starts_with("/apis/events.k8s.io/")
        }
    }

    impl Context {
        /// A context over a mocked API, with `services` in the Service store and no
        /// EndpointSlices. Also returns the receiver of the probers' change notices.
        fn for_tests(client: Client, services: &[Service]) -> (Self, mpsc::UnboundedReceiver<ObjectKey>) {
            let (store, mut writer) = reflector::store();
            for service in services {
                writer.apply_watcher_event(&watcher::Event::Apply(service.clone()));
            }
            let slices = ByService::<EndpointSlice>::new(|slice| slice.labels().get(SERVICE_NAME_LABEL).cloned());
            let metrics = Arc::new(Metrics::default());
            let (changed, probe_changes) = mpsc::unbounded_channel();
            let reporter = Reporter {
                controller: OPERATOR_FIELD_MANAGER.into(),
                instance: Some("test".into()),
            };
            let context = Context {
                recorder: Recorder::new(client.clone(), reporter),
                client,
                settings: Settings::default(),
                services: store,
                slices: Arc::new(slices),
                probers: ProberRegistry::new(
                    ProbeReports {
                        metrics: metrics.clone(),
                        changed,
                    },
                    ProberOptions::default(),
                ),
                metrics,
                writes: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                pods: Arc::new(PodWeights::default()),
                bad_annotations: Mutex::new(Default::default()),
            };
            (context, probe_changes)
        }
    }

    /// A context over a mocked API whose every request is recorded and answered by `answer`,
    /// Events with 201 and their own body. The task ends, returning the calls, once the
    /// context (its client) is dropped.
    fn mocked_context(
        services: &[Service],
        answer: impl FnMut(&ApiCall) -> Response<Body> + Send + 'static,
    ) -> (Arc<Context>, tokio::task::JoinHandle<Vec<ApiCall>>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (context, probe_changes) = Context::for_tests(Client::new(service, NAMESPACE), services);
        let api = tokio::spawn(serve(handle, answer, probe_changes));
        (Arc::new(context), api)
    }

    async fn serve(
        mut handle: MockHandle,
        mut answer: impl FnMut(&ApiCall) -> Response<Body>,
        _probe_changes: mpsc::UnboundedReceiver<ObjectKey>,
    ) -> Vec<ApiCall> {
        let mut calls = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.expect("a request body");
            let call = ApiCall {
                method: parts.method,
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            };
            let response = if call.is_event() {
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from(body.to_vec()))
                    .expect("a response")
            } else {
                answer(&call)
            };
            respond.send_response(response);
            calls.push(call);
        }
        calls
    }

    /// Reconciles `backend` once, bounded by [`WAIT`].
    async fn reconcile_once(backend: &GrpcBackend, context: &Arc<Context>) -> Result<Action, Error> {
        let guarded = Arc::new(DeserializeGuard(Ok(backend.clone())));
        timeout(WAIT, reconcile(guarded, context.clone()))
            .await
            .expect("the reconcile finished")
    }

    /// Drops the context (so the client) and returns every request the reconciler sent but
    /// Events.
    async fn api_calls(context: Arc<Context>, api: tokio::task::JoinHandle<Vec<ApiCall>>) -> Vec<ApiCall> {
        drop(context);
        let calls = timeout(WAIT, api)
            .await
            .expect("the client was dropped")
            .expect("the mock API ran");
        calls.into_iter().filter(|call| !call.is_event()).collect()
    }

    /// The API server's answer to a status apply: `backend` with the applied status.
    fn applied(backend: &GrpcBackend, call: &ApiCall) -> Response<Body> {
        let mut object = serde_json::to_value(backend).expect("a GrpcBackend serializes");
        object["status"] = call.body["status"].clone();
        object["metadata"]["resourceVersion"] = "2".into();
        json_response(StatusCode::OK, &object)
    }

    fn internal_error() -> Response<Body> {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500,
        });
        json_response(StatusCode::INTERNAL_SERVER_ERROR, &status)
    }

    fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("JSON")))
            .expect("a response")
    }

    /// GrpcBackend ns/echo for Service echo, port `port`.
    fn grpc_backend(port: PortRef, status: Option<GrpcBackendStatus>) -> GrpcBackend {
        let mut backend = GrpcBackend::new(
            "echo",
            GrpcBackendSpec {
                service: "echo".into(),
                port,
                health_check: Default::default(),
                weighting: Default::default(),
            },
        );
        backend.metadata.namespace = Some(NAMESPACE.into());
        backend.metadata.generation = Some(1);
        backend.metadata.resource_version = Some("1".into());
        backend.status = status;
        backend
    }

    /// Service ns/echo with one TCP port `name`/`port`.
    fn service(name: &str, port: i32) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some("echo".into()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    name: Some(name.into()),
                    port,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Asserts `call` is one server-side apply of the status, as the operator's field manager
    /// taking the fields over; returns the applied status.
    fn assert_status_apply(call: &ApiCall) -> GrpcBackendStatus {
        assert_eq!(call.method, Method::PATCH);
        assert_eq!(call.path, STATUS_PATH);
        let query: Vec<&str> = call.query.split('&').collect();
        assert!(
            query.contains(&"fieldManager=kubegrpc-operator"),
            "query: {}",
            call.query
        );
        assert!(query.contains(&"force=true"), "query: {}", call.query);
        assert!(query.contains(&"fieldValidation=Ignore"), "query: {}", call.query);
        assert_eq!(call.body["apiVersion"], "kubegrpc.io/v1alpha1");
        assert_eq!(call.body["kind"], "GrpcBackend");
        serde_json::from_value(call.body["status"].clone()).expect("the body carries a GrpcBackendStatus")
    }

    fn ready(status: &GrpcBackendStatus) -> &Condition {
        status.condition(condition::READY).expect("a Ready condition")
    }

    /// Reconciles a GrpcBackend whose Service is missing; returns the one status it applied.
    async fn status_of_missing_service(backend: &GrpcBackend) -> GrpcBackendStatus {
        let answered = backend.clone();
        let (context, api) = mocked_context(&[], move |call| applied(&answered, call));
        let result = reconcile_once(backend, &context).await;
        assert!(result.is_ok(), "reconcile failed: {result:?}");
        let calls = api_calls(context, api).await;
        assert_eq!(calls.len(), 1, "exactly one status write: {calls:#?}");
        assert_status_apply(&calls[0])
    }

    #[tokio::test]
    async fn a_missing_service_is_published_as_ready_false_service_not_found() {
        let backend = grpc_backend(PortRef::Name("grpc".into()), None);
        let status = status_of_missing_service(&backend).await;
        let ready = ready(&status);
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, reason::SERVICE_NOT_FOUND);
        assert_eq!(ready.message, "Service ns/echo not found");
        assert_eq!(ready.observed_generation, Some(1));
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!((status.ready_endpoints, status.total_endpoints), (0, 0));
        assert!(status.endpoints.is_empty());
    }

    #[tokio::test]
    async fn a_status_already_published_is_not_written_again() {
        let published = status_of_missing_service(&grpc_backend(PortRef::Name("grpc".into()), None)).await;
        // A new context, as after an operator restart: nothing remembered of the write.
        let backend = grpc_backend(PortRef::Name("grpc".into()), Some(published));
        let (context, api) = mocked_context(&[], |call| panic!("unexpected request {call:?}"));
        let result = reconcile_once(&backend, &context).await;
        assert!(result.is_ok(), "reconcile failed: {result:?}");
        drop(context);
        let calls = timeout(WAIT, api)
            .await
            .expect("the client was dropped")
            .expect("the mock API ran");
        assert!(calls.is_empty(), "no request at all, Events included: {calls:#?}");
    }

    #[tokio::test]
    async fn a_failed_status_write_is_an_error_retried_with_a_doubling_backoff_reset_by_a_success() {
        let backend = grpc_backend(PortRef::Name("grpc".into()), None);
        let answered = backend.clone();
        let mut writes = 0;
        let (context, api) = mocked_context(&[], move |call| {
            writes += 1;
            if writes <= 3 {
                internal_error()
            } else {
                applied(&answered, call)
            }
        });
        let guarded = Arc::new(DeserializeGuard(Ok(backend.clone())));

        let mut retries = Vec::new();
        let mut last_error = None;
        for _ in 0..3 {
            let error = reconcile_once(&backend, &context).await.expect_err("the write failed");
            match &error {
                Error::StatusWrite { backend, source } => {
                    assert_eq!(backend, "ns/echo");
                    assert!(
                        matches!(source, kube::Error::Api(status) if status.code == 500),
                        "{source:?}"
                    );
                }
                other => panic!("not a status write error: {other:?}"),
            }
            retries.push(error_policy(guarded.clone(), &error, context.clone()));
            last_error = Some(error);
        }
        let secs = |n| Action::requeue(Duration::from_secs(n));
        assert_eq!(retries, [secs(1), secs(2), secs(4)]);

        assert!(
            reconcile_once(&backend, &context).await.is_ok(),
            "the fourth write succeeds"
        );
        let error = last_error.expect("an error");
        assert_eq!(
            error_policy(guarded, &error, context.clone()),
            secs(1),
            "a success resets the backoff"
        );

        let calls = api_calls(context, api).await;
        assert_eq!(calls.len(), 4, "three failed writes and one success: {calls:#?}");
        for call in &calls {
            assert_status_apply(call);
        }
    }

    #[tokio::test]
    async fn a_port_name_the_service_lacks_is_published_as_port_not_found() {
        let backend = grpc_backend(PortRef::Name("grpc".into()), None);
        let answered = backend.clone();
        let (context, api) = mocked_context(&[service("http", 8080)], move |call| applied(&answered, call));
        let result = reconcile_once(&backend, &context).await;
        assert!(result.is_ok(), "reconcile failed: {result:?}");
        let calls = api_calls(context, api).await;
        assert_eq!(calls.len(), 1, "exactly one status write: {calls:#?}");
        let status = assert_status_apply(&calls[0]);
        let ready = ready(&status);
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, reason::PORT_NOT_FOUND);
        assert_eq!(
            ready.message,
            "Service ns/echo: the Service has no TCP port named \"grpc\" (its TCP ports: http/8080)"
        );
        assert_eq!(status.total_endpoints, 0);
    }

    #[test]
    fn error_backoff_doubles_from_a_second_and_stops_at_five_minutes() {
        let waits: Vec<u64> = (1..=12).map(|n| error_backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(error_backoff(u32::MAX), MAX_ERROR_BACKOFF);
    }

    #[test]
    fn the_service_index_keeps_a_backends_name_and_spec_not_its_status() {
        let status = GrpcBackendStatus {
            ready_endpoints: 1,
            ..Default::default()
        };
        let full = grpc_backend(PortRef::Name("grpc".into()), Some(status));
        let event = index_entries(&watcher::Event::Apply(DeserializeGuard(Ok(full.clone()))));
        let watcher::Event::Apply(DeserializeGuard(Ok(entry))) = event else {
            panic!("an Apply of a readable backend stays one");
        };
        assert_eq!(entry.status, None);
        assert_eq!(entry.spec, full.spec);
        assert_eq!(ObjectKey::of(&entry), ObjectKey::of(&full));
        assert!(entry.metadata.resource_version.is_none());
    }
}
