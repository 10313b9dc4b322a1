//! The operator following EndpointSlices written by the real kube-controller-manager: the test
//! plays the kubelet (a Node, Pods bound to it and marked Running/Ready with 10.250.x.y IPs,
//! real backends at those IPs), the EndpointSlice controller does the rest.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodSpec, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use kubegrpc_crds::{FULL_WEIGHT, Health};
use kubegrpc_echo::BackendOptions;
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{BACKEND_PORT, start_backend},
    kubelet::register_node,
    objects::create_grpc_backend,
    operator::InProcessOperator,
    scenario::endpoint,
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const NODE: &str = "node-1";
const ZONE: &str = "zone-a";

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_follows_slices_written_by_the_endpointslice_controller() -> Result<()> {
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "kcm").await?;
    let _operator = InProcessOperator::start(client.clone(), &namespace);

    register_node(&client, NODE, ZONE).await?;
    let service = Service {
        metadata: ObjectMeta {
            name: Some("echo".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some([("app".to_string(), "echo".to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: 80,
                target_port: Some(IntOrString::String("grpc".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &service)
        .await?;

    let backends = [
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
    ];
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    for (index, backend) in backends.iter().enumerate() {
        run_pod(&pods, &format!("echo-{index}"), backend.address).await?;
    }
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;

    let gbs = Api::<kubegrpc_crds::GrpcBackend>::namespaced(client.clone(), &namespace);
    let wait_status =
        |what: &'static str, accept: Box<dyn Fn(&kubegrpc_crds::GrpcBackendStatus) -> bool + Send + Sync>| {
            let gbs = gbs.clone();
            async move {
                wait::until(what, DEADLINE, || {
                    let gbs = gbs.clone();
                    let accept = &accept;
                    async move {
                        let status = gbs.get("echo").await?.status;
                        Ok(status.filter(|s| accept(s)))
                    }
                })
                .await
            }
        };
    let status = wait_status("3 pods ready in the status", Box::new(|s| s.ready_endpoints == 3)).await?;
    for (index, backend) in backends.iter().enumerate() {
        let published = endpoint(&status, &backend.address).expect("every pod is listed");
        assert_eq!((published.health, published.weight), (Health::Serving, FULL_WEIGHT));
        assert_eq!(
            published.zone.as_deref(),
            Some(ZONE),
            "the controller copies the Node's zone"
        );
        assert_eq!(published.pod.as_deref(), Some(format!("echo-{index}").as_str()));
    }

    // A graceful delete: without a kubelet the pod stays, terminating; the controller marks the
    // endpoint terminating and the operator takes its weight away.
    pods.delete("echo-0", &DeleteParams::default()).await?;
    let leaving = backends[0].address;
    let status = wait_status(
        "echo-0 terminating",
        Box::new(move |s| endpoint(s, &leaving).is_some_and(|e| e.terminating)),
    )
    .await?;
    let terminating = endpoint(&status, &leaving).unwrap();
    assert_eq!(terminating.weight, 0);
    assert_eq!(status.ready_endpoints, 2);

    // Gone for good (what the kubelet does once the containers stopped).
    pods.delete(
        "echo-0",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    let status = wait_status(
        "echo-0 gone",
        Box::new(move |s| s.total_endpoints == 2 && endpoint(s, &leaving).is_none()),
    )
    .await?;
    let remaining: Vec<Option<&str>> = status.endpoints.iter().map(|e| e.pod.as_deref()).collect();
    assert!(remaining.iter().all(|pod| pod.is_some_and(|pod| pod != "echo-0")));
    Ok(())
}

/// Creates a pod of the Service's selector on the test Node and marks it Running and Ready
/// at `address`, as the kubelet would once its container started.
async fn run_pod(pods: &Api<Pod>, name: &str, address: SocketAddr) -> Result<()> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app".to_string(), "echo".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "echo".into(),
                image: Some("kubegrpc/echo-server".into()),
                ports: Some(vec![ContainerPort {
                    name: Some("grpc".into()),
                    container_port: i32::from(BACKEND_PORT),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.create(&PostParams::default(), &pod).await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let ip = address.ip().to_string();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.250.0.1",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
        }})),
    )
    .await?;
    Ok(())
}
