//! Weighting policies end to end: the operator publishes weights, the client spreads requests
//! by them, and the backends count what they received.
//!
//! - `Static`: weights from the Pods' `kubegrpc.io/weight` annotations;
//! - slow start: a new endpoint's share climbs over the window, ramped by the client from one
//!   status write;
//! - zones: a client in zone A sends only to zone A while it has Serving endpoints.
//!
//! The `LoadReport` policy has its own file (`load_report.rs`).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use kubegrpc::Channel;
use kubegrpc_crds::{GrpcBackendStatus, WEIGHT_ANNOTATION};
use kubegrpc_echo::{Backend, ServingStatus};
use kubegrpc_tests::{
    backends::start_backends,
    load::RateLoad,
    objects::{SliceEndpoint, apply_slice, create_service, create_weighted_pod},
    operator::InProcessOperator,
    scenario::{Scenario, endpoint, wait_snapshot},
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn requests(backends: &[Backend]) -> Vec<u64> {
    backends.iter().map(|b| b.counters.snapshot().requests).collect()
}

fn connections(backends: &[Backend]) -> Vec<u64> {
    backends
        .iter()
        .map(|b| b.counters.snapshot().connections_accepted)
        .collect()
}

async fn create_pod(s: &Scenario, name: &str, weight: &str) -> Result<()> {
    create_weighted_pod(&s.client, &s.namespace, name, weight).await
}

async fn annotate(s: &Scenario, pod: &str, weight: &str) -> Result<()> {
    Api::<Pod>::namespaced(s.client.clone(), &s.namespace)
        .patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {WEIGHT_ANNOTATION: weight}}})),
        )
        .await?;
    Ok(())
}

fn weight_of(status: &GrpcBackendStatus, address: &SocketAddr) -> Option<u32> {
    endpoint(status, address).map(|e| e.weight)
}

#[tokio::test(flavor = "multi_thread")]
async fn static_weights_from_pod_annotations_are_the_shares_the_backends_see() -> Result<()> {
    let s = Scenario::new("static").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(2).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    create_pod(&s, "echo-0", "1").await?;
    create_pod(&s, "echo-1", "3").await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let slice: Vec<SliceEndpoint> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| SliceEndpoint {
            pod: Some(format!("echo-{i}")),
            ..SliceEndpoint::ready(*a)
        })
        .collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "weighting": {"policy": "Static"}}),
    )
    .await?;
    s.wait_status("echo", "weights 1 and 3 from the annotations", DEADLINE, |status| {
        weight_of(status, &addresses[0]) == Some(1) && weight_of(status, &addresses[1]) == Some(3)
    })
    .await?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    wait_snapshot(&channel, "both endpoints in rotation", DEADLINE, |snapshot| {
        snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 2
    })
    .await?;
    let report = RateLoad::start(channel.clone(), 1000, 8000, Duration::from_secs(60))
        .finished()
        .await;
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let counts = requests(&backends);
    let total: u64 = counts.iter().sum();
    let shares: Vec<f64> = counts.iter().map(|c| *c as f64 / total as f64).collect();
    println!("Static 1:3 -> requests per backend {counts:?}, shares {shares:?}");
    for (share, expected) in shares.iter().zip([0.25, 0.75]) {
        assert!((share - expected).abs() <= 0.02, "shares {shares:?}, expected 25/75%");
    }

    // A new annotation value: the weight follows over the same connection. A bad value falls
    // back to the default weight with a Warning Event naming the Pod.
    annotate(&s, "echo-0", "3").await?;
    s.wait_status("echo", "the new annotation's weight", DEADLINE, |status| {
        weight_of(status, &addresses[0]) == Some(3)
    })
    .await?;
    annotate(&s, "echo-1", "heavy").await?;
    s.wait_status("echo", "the default weight for a bad value", DEADLINE, |status| {
        weight_of(status, &addresses[1]) == Some(kubegrpc_crds::FULL_WEIGHT)
    })
    .await?;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.client.clone(), &s.namespace);
    wait::until("a Warning Event about the bad annotation", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidWeightAnnotation"))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter(|e| {
                e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("echo-1") && n.contains("heavy"))
            }))
    })
    .await?;
    // Each backend accepted two connections: the operator's prober and the client.
    assert_eq!(connections(&backends), [2, 2], "weight changes never reconnect");
    assert!(channel.snapshot().endpoints.iter().all(|e| e.connections_opened == 1));
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_start_ramps_a_new_endpoint_from_one_status_write() -> Result<()> {
    const WINDOW_SECONDS: u64 = 10;
    let s = Scenario::new("slow-start").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.echo_service(&addresses[..2]).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc",
               "weighting": {"slowStartWindow": format!("{WINDOW_SECONDS}s")}}),
    )
    .await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    // The first two are new too: wait until they are past their own ramp.
    wait_snapshot(&channel, "two endpoints at full weight", DEADLINE, |snapshot| {
        snapshot
            .endpoints
            .iter()
            .filter(|e| e.in_rotation && e.effective_weight == e.weight)
            .count()
            == 2
    })
    .await?;

    let load = RateLoad::start(channel.clone(), 400, u64::MAX, Duration::from_secs(120));
    load.wait_for_more(200, DEADLINE).await?;
    let writes_before = operator.status_writes(&s.namespace, "echo");
    s.echo_slice(&addresses).await?;
    wait_snapshot(&channel, "the new endpoint in rotation", DEADLINE, |snapshot| {
        snapshot.endpoint(&addresses[2]).is_some_and(|e| e.in_rotation)
    })
    .await?;
    // Per second, the new backend's share of what the three received.
    let mut shares = Vec::new();
    let mut last = requests(&backends);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for _ in 0..WINDOW_SECONDS + 2 {
        tick.tick().await;
        let now = requests(&backends);
        let delta: Vec<u64> = now.iter().zip(&last).map(|(n, l)| n - l).collect();
        let total: u64 = delta.iter().sum();
        shares.push(delta[2] as f64 / total.max(1) as f64);
        last = now;
    }
    let report = load.stop().await;
    println!("slow start {WINDOW_SECONDS}s: the new endpoint's share per second {shares:.3?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let first: f64 = shares[..3].iter().sum::<f64>() / 3.0;
    let middle: f64 = shares[4..7].iter().sum::<f64>() / 3.0;
    let settled = shares[shares.len() - 1];
    assert!(
        first < middle && middle < settled,
        "the share climbs over the window: {shares:?}"
    );
    assert!(first < 0.2, "the ramp starts low: {shares:?}");
    assert!((settled - 1.0 / 3.0).abs() < 0.05, "then a full third: {shares:?}");
    let status = s.backends().get_status("echo").await?.status.context("no status")?;
    assert!(
        endpoint(&status, &addresses[2]).is_some_and(|e| e.weight == kubegrpc_crds::FULL_WEIGHT),
        "the status carries the full weight"
    );
    assert_eq!(
        operator.status_writes(&s.namespace, "echo") - writes_before,
        1,
        "one status write for the new endpoint, not one per step"
    );
    // Each backend accepted two connections: the operator's prober and the client.
    assert_eq!(connections(&backends), [2, 2, 2], "the ramp never reconnects");
    assert!(channel.snapshot().endpoints.iter().all(|e| e.connections_opened == 1));
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_in_zone_a_stays_in_zone_a_while_it_has_serving_endpoints() -> Result<()> {
    let s = Scenario::new("zones").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(4).await?;
    let zone_of = |i: usize| if i < 2 { "zone-a" } else { "zone-b" };
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let slice: Vec<SliceEndpoint> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| SliceEndpoint {
            zone: Some(zone_of(i).into()),
            ..SliceEndpoint::ready(b.address)
        })
        .collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .zone("zone-a")
        .connect()
        .await?;
    wait_snapshot(&channel, "zone A's two endpoints in rotation", DEADLINE, |snapshot| {
        snapshot.endpoints.len() == 4 && snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 2
    })
    .await?;

    let load = RateLoad::start(channel.clone(), 400, u64::MAX, Duration::from_secs(120));
    load.wait_for_more(1000, DEADLINE).await?;
    let counts = requests(&backends);
    println!("client in zone-a, both zones Serving: per backend {counts:?}");
    assert!(counts[0] > 0 && counts[1] > 0, "zone A shares its traffic: {counts:?}");
    assert_eq!(&counts[2..], [0, 0], "zone B receives nothing while A serves");

    // Zone A goes NotServing under load: traffic moves to B, nothing fails.
    for backend in &backends[..2] {
        backend.health.set("", ServingStatus::NotServing);
    }
    wait_snapshot(&channel, "zone B in rotation", DEADLINE, |snapshot| {
        let in_rotation: Vec<SocketAddr> = snapshot
            .endpoints
            .iter()
            .filter(|e| e.in_rotation)
            .map(|e| e.address)
            .collect();
        in_rotation == [backends[2].address, backends[3].address]
            || in_rotation == [backends[3].address, backends[2].address]
    })
    .await?;
    // Requests picked before the move may still be on their way to zone A: count from when
    // those have been answered (200 more requests later; each takes milliseconds).
    load.wait_for_more(200, DEADLINE).await?;
    let at_move = requests(&backends);
    load.wait_for_more(1000, DEADLINE).await?;
    let report = load.stop().await;
    let after = requests(&backends);
    let moved: BTreeMap<usize, u64> = (0..4).map(|i| (i, after[i] - at_move[i])).collect();
    println!("zone A NotServing: requests since per backend {moved:?}; {report:?}");
    assert_eq!(
        (moved[&0], moved[&1]),
        (0, 0),
        "zone A receives nothing once NotServing"
    );
    assert!(moved[&2] > 0 && moved[&3] > 0, "zone B takes the traffic: {moved:?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    Ok(())
}
