//! GrpcBackends over xDS to a real grpc-go client (google.golang.org/grpc with its `xds`
//! package, dialing `xds:///echo.<namespace>` through a bootstrap file naming the operator's
//! xDS server on 10.250.0.1). The backends are real; the client counts who answered.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use kubegrpc_crds::WEIGHT_ANNOTATION;
use kubegrpc_echo::ServingStatus;
use kubegrpc_tests::{
    backends::start_backends,
    objects::{SliceEndpoint, apply_slice, create_service},
    operator::InProcessOperator,
    scenario::{Scenario, endpoint},
    xds::{InProcessXds, XdsClient, XdsCounts},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const RATE: u32 = 200;

async fn create_pod(s: &Scenario, name: &str, weight: &str) -> Result<()> {
    let accounts = Api::<ServiceAccount>::namespaced(s.client.clone(), &s.namespace);
    if accounts.get_opt("default").await?.is_none() {
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "default"}}))?,
            )
            .await?;
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {WEIGHT_ANNOTATION: weight}},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "echo", "image": "kubegrpc/echo"}]},
    }))?;
    Api::<Pod>::namespaced(s.client.clone(), &s.namespace)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

fn slice_of(addresses: &[SocketAddr]) -> Vec<SliceEndpoint> {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| SliceEndpoint {
            pod: Some(format!("echo-{i}")),
            ..SliceEndpoint::ready(*a)
        })
        .collect()
}

/// A fresh counting window of `requests` successful requests.
async fn window(client: &XdsClient, requests: u64) -> Result<XdsCounts> {
    client.reset().await?;
    client.wait_for(requests, DEADLINE).await
}

fn share(counts: &XdsCounts, backend: SocketAddr) -> f64 {
    counts.of(backend) as f64 / counts.succeeded().max(1) as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_go_xds_client_follows_spread_flips_weights_and_endpoint_changes() -> Result<()> {
    let s = Scenario::new("xds-go").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(4).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    for (i, weight) in ["1", "3", "1", "3"].iter().enumerate() {
        create_pod(&s, &format!("echo-{i}"), weight).await?;
    }
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "echo",
        "echo-1",
        "grpc",
        &slice_of(&addresses[..3]),
    )
    .await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "3 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 3
    })
    .await?;

    let client = XdsClient::start(&format!("echo.{}", s.namespace), xds.address, RATE).await?;
    // Spread over the three Serving endpoints, counted by who answered.
    let counts = window(&client, 1500).await?;
    println!("xDS, grpc-go client, Equal over 3: {:?}", counts.ok);
    for backend in &addresses[..3] {
        assert!((share(&counts, *backend) - 1.0 / 3.0).abs() < 0.05, "{counts:?}");
    }

    // A backend flipped NOT_SERVING receives no requests after the push.
    backends[2].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "the flipped endpoint NotServing", DEADLINE, |status| {
        endpoint(status, &addresses[2]).is_some_and(|e| e.weight == 0)
    })
    .await?;
    // The push reaches the client within moments; count from a window that starts after it.
    client.wait_for(RATE as u64, DEADLINE).await?;
    let counts = window(&client, 1000).await?;
    println!("xDS, backend 2 NotServing: {:?}", counts.ok);
    assert_eq!(
        counts.of(addresses[2]),
        0,
        "the NotServing backend got requests: {counts:?}"
    );

    // Weights 1:3 (Static, from the Pods' annotations) -> shares 25/75.
    s.backends()
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"weighting": {"policy": "Static"}}})),
        )
        .await?;
    s.wait_status("echo", "weights 1 and 3", DEADLINE, |status| {
        endpoint(status, &addresses[0]).is_some_and(|e| e.weight == 1)
            && endpoint(status, &addresses[1]).is_some_and(|e| e.weight == 3)
    })
    .await?;
    client.wait_for(RATE as u64, DEADLINE).await?;
    let counts = window(&client, 4000).await?;
    println!("xDS, Static 1:3: {:?}", counts.ok);
    assert!((share(&counts, addresses[0]) - 0.25).abs() <= 0.05, "{counts:?}");
    assert!((share(&counts, addresses[1]) - 0.75).abs() <= 0.05, "{counts:?}");

    // A new endpoint receives requests; one removed from the slice receives none.
    let mut slice = slice_of(&addresses);
    slice.remove(0);
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice).await?;
    s.wait_status("echo", "endpoint 0 gone, endpoint 3 ready", DEADLINE, |status| {
        endpoint(status, &addresses[0]).is_none() && endpoint(status, &addresses[3]).is_some_and(|e| e.weight == 3)
    })
    .await?;
    client.wait_for(RATE as u64, DEADLINE).await?;
    let counts = window(&client, 1500).await?;
    println!("xDS, endpoint 0 removed, endpoint 3 added: {:?}", counts.ok);
    assert_eq!(
        counts.of(addresses[0]),
        0,
        "the removed endpoint got requests: {counts:?}"
    );
    assert!(counts.of(addresses[3]) > 0, "the new endpoint got nothing: {counts:?}");
    assert_eq!(counts.failures(), 0, "failed requests: {counts:?}");
    assert_eq!(
        xds.metrics
            .xds_nacks
            .get_or_create(&kubegrpc_operator::metrics::XdsTypeLabels {
                type_url: kubegrpc_operator::xds::resources::type_url::ENDPOINTS.into(),
            })
            .get(),
        0,
        "the client accepted every push"
    );
    Ok(())
}
