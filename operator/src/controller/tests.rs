use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{
    api::core::v1::{ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    ResourceExt,
    client::Body,
    runtime::{reflector::ObjectRef, watcher},
};
use kubegrpc_crds::{
    EndpointStatus, FULL_WEIGHT, GrpcBackendSpec, GrpcBackendStatus, Health, PortRef, WEIGHT_ANNOTATION,
    WeightingPolicy, condition, condition::reason,
};
use serde_json::json;
use tokio::time::timeout;
use tokio_util::task::AbortOnDropHandle;

use super::{watches::index_entries, *};
use crate::discovery::SERVICE_NAME_LABEL;

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
    /// The `Accept` header.
    accept: String,
    body: serde_json::Value,
}

impl ApiCall {
    fn is_event(&self) -> bool {
        self.path.starts_with("/apis/events.k8s.io/")
    }

    fn is_watch(&self) -> bool {
        self.query.split('&').any(|pair| pair == "watch=true")
    }
}

/// The receivers of what a test context sends.
struct Sent {
    /// Reconciles the watches ask for.
    triggered: mpsc::UnboundedReceiver<ObjectRef<Backend>>,
}

impl Context {
    /// A context over a mocked API, with `services` in the Service store and `slices` in
    /// the EndpointSlice index.
    fn for_tests(client: Client, settings: Settings, services: &[Service], slices: &[EndpointSlice]) -> (Self, Sent) {
        let (store, mut writer) = reflector::store();
        for service in services {
            writer.apply_watcher_event(&watcher::Event::Apply(service.clone()));
        }
        let slice_index = ByService::<EndpointSlice>::new(|slice| slice.labels().get(SERVICE_NAME_LABEL).cloned());
        for slice in slices {
            slice_index.apply(&watcher::Event::Apply(slice.clone()));
        }
        let (triggers, triggered) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let (changed, _) = mpsc::unbounded_channel();
        let reporter = Reporter {
            controller: OPERATOR_FIELD_MANAGER.into(),
            instance: Some("test".into()),
        };
        let backends = Arc::new(ByService::<Backend>::new(|backend| {
            backend.0.as_ref().ok().map(|b| b.spec.service.clone())
        }));
        let context = Context {
            routes: Arc::new(routes::RouteViews::detached(
                backends.clone(),
                store.clone(),
                triggers.clone(),
            )),
            recorder: Recorder::new(client.clone(), reporter),
            writer: StatusWriter::new(client.clone(), metrics.clone(), settings.status_write_interval),
            tls: TlsSettings::new(client.clone(), None),
            pods: PodWatch::new(client, Some(NAMESPACE.into()), triggers),
            settings,
            services: store,
            slices: Arc::new(slice_index),
            backends,
            probers: ProberRegistry::new(
                ProbeReports {
                    metrics: metrics.clone(),
                    changed,
                },
                ProberOptions::default(),
            ),
            metrics,
            failures: Mutex::new(HashMap::new()),
            bad_annotations: Mutex::new(HashSet::new()),
        };
        (context, Sent { triggered })
    }
}

/// A context over a mocked API whose every request is recorded and answered by `answer`,
/// Events with 201 and their own body. The task ends, returning the calls, once the
/// context (its client) is dropped.
fn mocked_context(
    services: &[Service],
    answer: impl FnMut(&ApiCall) -> Response<Body> + Send + 'static,
) -> (Arc<Context>, tokio::task::JoinHandle<Vec<ApiCall>>) {
    let (context, api, _) = mocked_context_with(Settings::default(), services, &[], answer);
    (context, api)
}

/// [`mocked_context`] with `settings` and EndpointSlices; also returns what it sends.
fn mocked_context_with(
    settings: Settings,
    services: &[Service],
    slices: &[EndpointSlice],
    answer: impl FnMut(&ApiCall) -> Response<Body> + Send + 'static,
) -> (Arc<Context>, tokio::task::JoinHandle<Vec<ApiCall>>, Sent) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (context, sent) = Context::for_tests(Client::new(service, NAMESPACE), settings, services, slices);
    let api = tokio::spawn(serve(handle, answer));
    (Arc::new(context), api, sent)
}

/// Answers each request with `answer` (Events with 201 and their own body; watches never,
/// as an apiserver with nothing to tell), until every client is gone; returns the requests.
async fn serve(mut handle: MockHandle, mut answer: impl FnMut(&ApiCall) -> Response<Body>) -> Vec<ApiCall> {
    let mut calls = Vec::new();
    let mut watches = Vec::new();
    while let Some((request, respond)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.expect("a request body");
        let call = ApiCall {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            accept: parts
                .headers
                .get(http::header::ACCEPT)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        };
        if call.is_watch() {
            watches.push(respond);
            calls.push(call);
            continue;
        }
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
    // As the GrpcBackend watch does before the controller sees the object.
    context.backends.apply(&watcher::Event::Apply((*guarded).clone()));
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
            tls: None,
            outlier_detection: None,
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

/// A tonic health server on loopback, Serving.
async fn health_server() -> (SocketAddr, AbortOnDropHandle<()>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("an address");
    let server = AbortOnDropHandle::new(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    }));
    (address, server)
}

/// The EndpointSlice of Service ns/echo, port `grpc`: `address`, ready, of Pod `pod`.
fn endpoint_slice(address: SocketAddr, pod: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "echo-1", "namespace": NAMESPACE, "labels": {SERVICE_NAME_LABEL: "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": address.port(), "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [address.ip().to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": NAMESPACE},
        }],
    }))
    .expect("an EndpointSlice")
}

/// A status listing `address` (Pod `pod`) as Serving, so that its prober starts from that.
fn serving_status(address: SocketAddr, pod: &str) -> GrpcBackendStatus {
    GrpcBackendStatus {
        endpoints: vec![EndpointStatus {
            address: address.ip().to_string(),
            port: i32::from(address.port()),
            weight: FULL_WEIGHT,
            health: Health::Serving,
            serving: true,
            terminating: false,
            zone: None,
            for_zones: Vec::new(),
            pod: Some(pod.into()),
            target_ref: None,
            reason: None,
            last_transition_time: None,
            fail_open: false,
        }],
        ..Default::default()
    }
}

/// The answer to a list of Pods' metadata in ns: `pods` with their weight annotation.
fn pod_list(pods: &[(&str, &str)]) -> Response<Body> {
    let items: Vec<serde_json::Value> = pods
        .iter()
        .map(|(name, weight)| {
            json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "namespace": NAMESPACE, "annotations": {WEIGHT_ANNOTATION: weight}},
            })
        })
        .collect();
    let list = json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadataList",
        "metadata": {"resourceVersion": "10"},
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

const PODS_PATH: &str = "/api/v1/namespaces/ns/pods";

/// A Static GrpcBackend whose Pods the operator cannot list (no RBAC for Pods) gets a status
/// with the default weight and a Warning Event saying why, instead of waiting forever for a
/// list that never comes.
#[tokio::test]
async fn static_weights_fall_back_to_the_default_when_the_pods_cannot_be_listed() {
    let (address, _server) = health_server().await;
    let mut backend = grpc_backend(PortRef::Name("grpc".into()), Some(serving_status(address, "echo-0")));
    backend.spec.weighting.policy = WeightingPolicy::Static;
    // Published with weight 3 before, so that the default weight is a change to write.
    if let Some(status) = backend.status.as_mut() {
        status.endpoints[0].weight = 3;
    }
    let answered = backend.clone();
    let (context, api, mut sent) = mocked_context_with(
        Settings {
            status_write_interval: Duration::ZERO,
            ..Settings::default()
        },
        &[service("grpc", 80)],
        &[endpoint_slice(address, "echo-0")],
        move |call| {
            if call.path == PODS_PATH {
                let forbidden = json!({
                    "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                    "message": "pods is forbidden: User \"system:serviceaccount:kubegrpc-system:kubegrpc-operator\" cannot list resource \"pods\"",
                });
                return json_response(StatusCode::FORBIDDEN, &forbidden);
            }
            applied(&answered, call)
        },
    );
    let reconciled = reconcile_once(&backend, &context).await.expect("reconciled");
    assert_eq!(reconciled, Action::await_change(), "waits for the Pods' list first");
    let triggered = timeout(WAIT, sent.triggered.recv())
        .await
        .expect("the failing watch wakes its users")
        .expect("a trigger");
    assert_eq!(triggered, ObjectRef::new("echo").within(NAMESPACE));
    reconcile_once(&backend, &context).await.expect("reconciled");

    drop(context);
    let calls = timeout(WAIT, api)
        .await
        .expect("the client was dropped")
        .expect("the mock API ran");
    let weights: Vec<u32> = calls
        .iter()
        .filter(|call| call.method == Method::PATCH && !call.is_event())
        .map(|call| assert_status_apply(call).endpoints[0].weight)
        .collect();
    assert_eq!(weights, [FULL_WEIGHT], "the default weight, once: {calls:#?}");
    let warned = calls
        .iter()
        .filter(|call| call.is_event() && call.body["reason"] == "PodAnnotationsUnavailable")
        .count();
    assert_eq!(warned, 1, "one Warning Event: {calls:#?}");
}

/// A reconcile that took a GrpcBackend before its deletion and reaches `observe` after the
/// watch forgot it starts neither probers nor the Pod watch for it (the watch would otherwise
/// run for the process's life: nothing reconciles a deleted object again).
#[tokio::test]
async fn a_reconcile_of_a_grpc_backend_deleted_meanwhile_forgets_it_again() {
    let (address, _server) = health_server().await;
    let mut backend = grpc_backend(PortRef::Name("grpc".into()), Some(serving_status(address, "echo-0")));
    backend.spec.weighting.policy = WeightingPolicy::Static;
    let answered = backend.clone();
    let (context, api, _sent) = mocked_context_with(
        Settings::default(),
        &[service("grpc", 80)],
        &[endpoint_slice(address, "echo-0")],
        move |call| {
            if call.path == PODS_PATH {
                return pod_list(&[("echo-0", "3")]);
            }
            applied(&answered, call)
        },
    );
    let key = ObjectKey::of(&backend);
    // Known, then deleted: the watch takes it out of the index and forgets it, while a
    // reconcile that already holds the object goes on.
    context
        .backends
        .apply(&watcher::Event::Apply(DeserializeGuard(Ok(backend.clone()))));
    context
        .backends
        .apply(&watcher::Event::Delete(DeserializeGuard(Ok(backend.clone()))));
    context.forget(&key);
    let guarded = Arc::new(DeserializeGuard(Ok(backend.clone())));
    let reconciled = timeout(WAIT, reconcile(guarded, context.clone()))
        .await
        .expect("the reconcile finished")
        .expect("reconciled");
    assert_eq!(reconciled, Action::await_change());
    assert!(!context.pods.is_running(), "no Pod watch for a deleted GrpcBackend");
    assert_eq!(context.probers.count(&key), 0, "no probers for a deleted GrpcBackend");
    let calls = api_calls(context, api).await;
    assert!(
        calls.iter().all(|call| call.method != Method::PATCH),
        "nothing written for it: {calls:#?}"
    );
}

#[tokio::test]
async fn the_pod_watch_runs_only_while_a_grpc_backend_is_static_and_its_first_list_gates_static_weights() {
    let (address, _server) = health_server().await;
    let (pod_lists_tx, mut pod_lists) = mpsc::unbounded_channel();
    let mut backend = grpc_backend(PortRef::Name("grpc".into()), Some(serving_status(address, "echo-0")));
    let answered = backend.clone();
    let settings = Settings {
        status_write_interval: Duration::ZERO,
        ..Settings::default()
    };
    let (context, api, mut sent) = mocked_context_with(
        settings,
        &[service("grpc", 80)],
        &[endpoint_slice(address, "echo-0")],
        move |call| {
            if call.path == PODS_PATH {
                let _ = pod_lists_tx.send(call.accept.clone());
                return pod_list(&[("echo-0", "3")]);
            }
            applied(&answered, call)
        },
    );

    // Static from the first reconcile: had it written with the default weight before the Pods'
    // list (no gate), the PATCHes would start with 100.
    assert!(!context.pods.is_running());
    backend.spec.weighting.policy = WeightingPolicy::Static;
    let reconciled = reconcile_once(&backend, &context).await.expect("reconciled");
    assert_eq!(
        reconciled,
        Action::await_change(),
        "waits for the Pods' list, written after"
    );
    assert!(
        context.pods.is_running(),
        "the first Static GrpcBackend starts the watch"
    );
    let accept = timeout(WAIT, pod_lists.recv())
        .await
        .expect("the Pods were listed")
        .expect("an Accept header");
    assert!(
        accept.contains("as=PartialObjectMetadataList"),
        "metadata only: {accept}"
    );
    let triggered = timeout(WAIT, sent.triggered.recv())
        .await
        .expect("the complete list triggers the Static GrpcBackends")
        .expect("a trigger");
    assert_eq!(triggered, ObjectRef::new("echo").within(NAMESPACE));
    assert!(context.pods.weights().is_some(), "listed");
    let reconciled = reconcile_once(&backend, &context).await.expect("reconciled");
    assert_eq!(reconciled, Action::await_change());

    backend.spec.weighting.policy = WeightingPolicy::Equal;
    reconcile_once(&backend, &context).await.expect("reconciled");
    assert!(!context.pods.is_running(), "stopped after the last Static GrpcBackend");

    let calls = api_calls(context, api).await;
    let pod_lists: Vec<&ApiCall> = calls.iter().filter(|c| c.path == PODS_PATH && !c.is_watch()).collect();
    assert_eq!(pod_lists.len(), 1, "one list: {calls:#?}");
    let weights: Vec<u32> = calls
        .iter()
        .filter(|call| call.method == Method::PATCH)
        .map(|call| assert_status_apply(call).endpoints[0].weight)
        .collect();
    assert_eq!(
        weights,
        [3, FULL_WEIGHT],
        "Static from the annotation (nothing written before the list), then Equal"
    );
}

#[tokio::test]
async fn the_reconciler_starts_without_listing_pods_when_no_grpc_backend_is_static() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (paths_tx, mut paths) = mpsc::unbounded_channel();
    let api = tokio::spawn(serve(handle, move |call| {
        let _ = paths_tx.send(call.path.clone());
        let (api_version, kind) = match call.path.as_str() {
            "/api/v1/namespaces/ns/services" => ("v1", "ServiceList"),
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices" => ("discovery.k8s.io/v1", "EndpointSliceList"),
            "/apis/kubegrpc.io/v1alpha1/namespaces/ns/grpcbackends" => ("kubegrpc.io/v1alpha1", "GrpcBackendList"),
            _ => {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "not served by this test", "reason": "NotFound", "code": 404,
                });
                return json_response(StatusCode::NOT_FOUND, &status);
            }
        };
        let list = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []});
        json_response(StatusCode::OK, &list)
    }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        namespace: Some(NAMESPACE.into()),
        ..Settings::default()
    };
    let operator = tokio::spawn(run(
        Client::new(service, NAMESPACE),
        settings,
        Arc::new(Metrics::default()),
        async {
            let _ = stopped.await;
        },
    ));
    // The GrpcBackend watch starts once the caches the reconciler waits for are complete.
    timeout(WAIT, async {
        while let Some(path) = paths.recv().await {
            if path.ends_with("/grpcbackends") {
                return;
            }
        }
    })
    .await
    .expect("the GrpcBackends were listed");
    let _ = stop.send(());
    let ran = timeout(WAIT, operator).await.expect("the reconciler stopped");
    assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
    let calls = timeout(WAIT, api)
        .await
        .expect("every client was dropped")
        .expect("the mock API ran");
    let pods: Vec<&ApiCall> = calls.iter().filter(|call| call.path.contains("/pods")).collect();
    assert!(pods.is_empty(), "no GrpcBackend uses Static: no Pod request {pods:#?}");
}
