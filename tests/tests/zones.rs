//! Zones with the real kube-controller-manager: a Service with `trafficDistribution:
//! PreferClose` gets zone hints (`hints.forZones`) from the EndpointSlice controller; the
//! operator carries them into the status; a client that reads its zone from its Node sends only
//! to its zone's Pods, as kube-proxy would. Pods run on two Nodes of the kubelet stand-in, one
//! per zone, and count what they serve.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, api::PostParams};
use kubegrpc_crds::GrpcBackend;
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    kubelet::{Kubelet, KubeletOptions},
    load::RateLoad,
    objects::{create_echo_deployment_service_with, create_grpc_backend, echo_deployment},
    operator::InProcessOperator,
    scenario::wait_snapshot,
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// Deployment `echo-<zone>` of `replicas` Pods pinned to `node` (no scheduler runs here), all
/// labelled `app: echo` for the Service.
fn pinned_deployment(zone: &str, node: &str, replicas: i32) -> Result<Deployment> {
    let mut deployment = serde_json::to_value(echo_deployment(replicas)?)?;
    deployment["metadata"]["name"] = json!(format!("echo-{zone}"));
    deployment["spec"]["selector"]["matchLabels"]["zone"] = json!(zone);
    deployment["spec"]["template"]["metadata"]["labels"]["zone"] = json!(zone);
    deployment["spec"]["template"]["spec"]["nodeName"] = json!(node);
    Ok(serde_json::from_value(deployment)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_close_hints_keep_a_client_in_its_nodes_zone() -> Result<()> {
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "zones").await?;
    let _operator = InProcessOperator::start(client.clone(), &namespace);
    let kubelet = |node: &str, zone: &str| KubeletOptions {
        node: node.into(),
        zone: zone.into(),
        ..Default::default()
    };
    let kubelet_a = Kubelet::start_with(client.clone(), &namespace, kubelet("node-a", "zone-a")).await?;
    let kubelet_b = Kubelet::start_with(client.clone(), &namespace, kubelet("node-b", "zone-b")).await?;

    create_echo_deployment_service_with(&client, &namespace, Some("PreferClose")).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &pinned_deployment("a", "node-a", 2)?)
        .await?;
    deployments
        .create(&PostParams::default(), &pinned_deployment("b", "node-b", 2)?)
        .await?;
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;

    // The EndpointSlice controller hints each endpoint for its own zone; the status carries it.
    let backends = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);
    wait::until("4 ready endpoints, each hinted for its zone", DEADLINE, || async {
        let status = backends.get("echo").await?.status;
        Ok(status.filter(|s| {
            s.ready_endpoints == 4
                && s.endpoints
                    .iter()
                    .all(|e| e.zone.as_ref().is_some_and(|zone| e.for_zones == [zone.clone()]))
        }))
    })
    .await?;

    let channel = kubegrpc::Channel::builder(client.clone(), &namespace, "echo")
        .zone_from_node("node-a")
        .connect()
        .await?;
    wait_snapshot(&channel, "zone-a's two endpoints in rotation", DEADLINE, |snapshot| {
        snapshot.zone.as_deref() == Some("zone-a")
            && snapshot.endpoints.len() == 4
            && snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 2
            && snapshot.endpoints.iter().filter(|e| e.in_rotation).all(|e| e.local)
    })
    .await?;
    let load = RateLoad::start(channel.clone(), 300, 1500, Duration::from_secs(60));
    let report = load.finished().await;
    let (served_a, served_b) = (kubelet_a.served(), kubelet_b.served());
    println!("PreferClose, client on node-a: served in zone-a {served_a:?}, in zone-b {served_b:?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(served_a.len(), 2, "zone-a's Pods: {served_a:?}");
    assert!(
        served_a.values().all(|n| *n > 0),
        "both zone-a Pods serve: {served_a:?}"
    );
    assert_eq!(served_a.values().sum::<u64>(), 1500, "all 1500 requests in zone-a");
    assert!(
        served_b.values().all(|n| *n == 0),
        "zone-b receives nothing: {served_b:?}"
    );
    Ok(())
}
