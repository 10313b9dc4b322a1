//! Kubernetes objects the tests write: headless Services, EndpointSlices written exactly as
//! the EndpointSlice controller writes them, GrpcBackends from raw JSON, and the echo
//! Deployment (with its Service) that the kubelet stand-in runs.

use std::net::SocketAddr;

use anyhow::Result;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use kubegrpc_crds::GrpcBackend;
use serde_json::{Value, json};

const FIELD_MANAGER: &str = "kubegrpc-tests";

/// Creates a headless Service (no cluster IP to allocate) with TCP `ports` (name, number).
pub async fn create_service(client: &Client, namespace: &str, name: &str, ports: &[(&str, i32)]) -> Result<Service> {
    let service = Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port)| ServicePort {
                        name: Some(port_name.to_string()),
                        port: *port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            selector: None,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await?)
}

/// One endpoint of a slice, with its conditions as the EndpointSlice controller sets them.
#[derive(Clone, Debug)]
pub struct SliceEndpoint {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    pub node: Option<String>,
    pub pod: Option<String>,
    /// `hints.forZones`, as the EndpointSlice controller sets them for a Service's
    /// `trafficDistribution`.
    pub for_zones: Vec<String>,
}

impl SliceEndpoint {
    /// A ready endpoint.
    /// Ready endpoints at `addresses`, backed by Pods `echo-0`, `echo-1`, ...
    pub fn ready_pods(addresses: &[SocketAddr]) -> Vec<Self> {
        addresses
            .iter()
            .enumerate()
            .map(|(i, a)| Self {
                pod: Some(format!("echo-{i}")),
                ..Self::ready(*a)
            })
            .collect()
    }

    pub fn ready(address: SocketAddr) -> Self {
        Self {
            address,
            ready: true,
            serving: true,
            terminating: false,
            zone: Some("zone-a".into()),
            node: None,
            pod: None,
            for_zones: Vec::new(),
        }
    }

    /// A ready endpoint as the EndpointSlice controller lists Pod `n` of Deployment
    /// `deployment` on a real cluster: one of three GKE zones, a node per 30 Pods, and a Pod
    /// name of the usual length (the metadata big-Service tests size the status with).
    pub fn deployment_pod(address: SocketAddr, deployment: &str, n: usize) -> Self {
        const ZONES: [&str; 3] = ["us-central1-a", "us-central1-b", "us-central1-c"];
        Self {
            zone: Some(ZONES[n % 3].into()),
            node: Some(format!("gke-prod-default-pool-5e1f{:04x}-{:04x}", n / 30, n / 30)),
            pod: Some(format!("{deployment}-7d9f8c6b5d-{n:05x}")),
            ..Self::ready(address)
        }
    }

    /// A terminating endpoint that still serves (a pod draining during a rolling update).
    pub fn terminating(address: SocketAddr) -> Self {
        Self {
            ready: false,
            serving: true,
            terminating: true,
            ..Self::ready(address)
        }
    }
}

/// Creates or replaces (server-side apply) the EndpointSlice `name` of `service`, with one port
/// named `port_name`; the port number is taken from the first endpoint's address.
pub async fn apply_slice(
    client: &Client,
    namespace: &str,
    service: &str,
    name: &str,
    port_name: &str,
    endpoints: &[SliceEndpoint],
) -> Result<EndpointSlice> {
    let port = endpoints
        .first()
        .map_or(crate::backends::BACKEND_PORT, |e| e.address.port());
    let ipv6 = endpoints.first().is_some_and(|e| e.address.is_ipv6());
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [
                    ("kubernetes.io/service-name".to_string(), service.to_string()),
                    (
                        "endpointslice.kubernetes.io/managed-by".to_string(),
                        "kubegrpc-tests".to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: if ipv6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![e.address.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready),
                        serving: Some(e.serving),
                        terminating: Some(e.terminating),
                    }),
                    zone: e.zone.clone(),
                    hints: (!e.for_zones.is_empty()).then(|| EndpointHints {
                        for_zones: Some(e.for_zones.iter().map(|z| ForZone { name: z.clone() }).collect()),
                        ..Default::default()
                    }),
                    node_name: e.node.clone(),
                    target_ref: e.pod.as_ref().map(|pod| ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: Some(namespace.into()),
                        name: Some(pod.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some(port_name.into()),
            port: Some(port.into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    Ok(Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&slice))
        .await?)
}

/// Creates a GrpcBackend from a raw JSON spec.
pub async fn create_grpc_backend(
    client: &Client,
    namespace: &str,
    name: &str,
    spec: Value,
) -> kube::Result<GrpcBackend> {
    let resource = ApiResource::erase::<GrpcBackend>(&());
    let raw = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubegrpc.io/v1alpha1",
        "kind": "GrpcBackend",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .map_err(kube::Error::SerdeError)?;
    raw.create(&PostParams::default(), &object).await?;
    Api::<GrpcBackend>::namespaced(client.clone(), namespace)
        .get(name)
        .await
}

/// The label selector of [`echo_deployment`]'s Pods.
pub const ECHO_SELECTOR: &str = "app=echo";

/// A headless Service `echo` selecting [`echo_deployment`]'s Pods, port `grpc` by name.
pub async fn create_echo_deployment_service(client: &Client, namespace: &str) -> Result<Service> {
    create_echo_deployment_service_with(client, namespace, None).await
}

/// [`create_echo_deployment_service`] with a `spec.trafficDistribution` (e.g. `PreferClose`).
pub async fn create_echo_deployment_service_with(
    client: &Client,
    namespace: &str,
    traffic_distribution: Option<&str>,
) -> Result<Service> {
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "echo"},
            "ports": [{"name": "grpc", "port": 80, "targetPort": "grpc"}],
            "trafficDistribution": traffic_distribution,
        },
    }))?;
    Ok(Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await?)
}

/// A Deployment `echo` of `replicas` echo servers (run by [`crate::kubelet::Kubelet`]),
/// rolling one Pod at a time without losing capacity (maxSurge 1, maxUnavailable 0).
pub fn echo_deployment(replicas: i32) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "echo"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "echo",
                        "image": "kubegrpc/echo-server",
                        "ports": [{"name": "grpc", "containerPort": crate::backends::BACKEND_PORT}],
                    }],
                },
            },
        },
    }))?)
}

/// A Pod object `name` carrying the `Static` policy's weight annotation. No kubelet runs it:
/// the operator only reads its metadata. Creates the namespace's `default` ServiceAccount
/// first if missing (Pod admission looks it up; only kube-controller-manager would create it).
pub async fn create_weighted_pod(client: &Client, namespace: &str, name: &str, weight: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    if accounts.get_opt("default").await?.is_none() {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {kubegrpc_crds::WEIGHT_ANNOTATION: weight}},
        "spec": {"automountServiceAccountToken": false,
                 "containers": [{"name": "echo", "image": "kubegrpc/echo"}]},
    }))?;
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}
