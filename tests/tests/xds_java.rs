//! GrpcBackends over xDS to a real grpc-java client (io.grpc:grpc-xds, dialing
//! `xds:///echo.<namespace>` through a bootstrap file naming the operator's xDS server on
//! 10.250.0.1): the grpc-java twin of tests/xds.rs. The backends are real; the client counts who
//! answered.
//!
//! grpc-java turns the Cluster's ROUND_ROBIN into `wrr_locality` over `round_robin`, and picks a
//! locality at random by weight for each call: the shares are binomial, so the windows are sized
//! for the 5-point tolerance to sit at four standard deviations or more.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use kube::api::{Patch, PatchParams};
use kubegrpc_crds::Health;
use kubegrpc_echo::ServingStatus;
use kubegrpc_operator::{
    metrics::XdsTypeLabels,
    xds::resources::type_url::{self, ENDPOINTS},
};
use kubegrpc_tests::{
    backends::start_backends,
    objects::{SliceEndpoint, apply_slice, create_service, create_weighted_pod},
    operator::InProcessOperator,
    scenario::{Scenario, endpoint},
    wait,
    xds::{InProcessXds, XdsClient, XdsCounts, XdsPeer},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const RATE: u32 = 200;

/// Each backend's share in percent, for the output.
fn shares(counts: &XdsCounts, addresses: &[SocketAddr]) -> String {
    addresses
        .iter()
        .map(|a| format!("{a} {:.1}% ({})", 100.0 * counts.share(*a), counts.of(*a)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many EDS responses the xDS server sent (this test's client is its only one).
fn endpoints_pushed(xds: &InProcessXds) -> u64 {
    xds.metrics
        .xds_responses
        .get_or_create(&XdsTypeLabels {
            type_url: ENDPOINTS.into(),
        })
        .get()
}

/// Waits until the server pushed endpoints again after `before` pushes, then lets the client
/// apply the push over a window of one second's requests, which must not fail.
async fn wait_pushed(xds: &InProcessXds, client: &XdsClient, before: u64, what: &str) -> Result<()> {
    wait::until(&format!("{what} pushed to the client"), DEADLINE, || async {
        Ok((endpoints_pushed(xds) > before).then_some(()))
    })
    .await?;
    let across = client.window(u64::from(RATE), DEADLINE).await?;
    assert_eq!(
        across.failures(),
        0,
        "failed requests across the push ({what}): {across:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_java_xds_client_spreads_drops_a_flipped_backend_and_follows_static_weights() -> Result<()> {
    let s = Scenario::new("xds-java").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    for (i, weight) in ["1", "3", "1"].iter().enumerate() {
        create_weighted_pod(&s.client, &s.namespace, &format!("echo-{i}"), weight).await?;
    }
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "echo",
        "echo-1",
        "grpc",
        &SliceEndpoint::ready_pods(&addresses),
    )
    .await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "3 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 3
    })
    .await?;

    let client = XdsClient::start_peer(XdsPeer::Java, &format!("echo.{}", s.namespace), xds.address, RATE).await?;
    // Counted from when every backend has answered: before, the localities whose connection is
    // up first take the others' share.
    wait::until("every backend answering the grpc-java client", DEADLINE, || async {
        let counts = client.counts().await?;
        Ok(addresses.iter().all(|a| counts.of(*a) > 0).then_some(()))
    })
    .await?;

    // (a) Spread over the three Serving endpoints, counted by who answered.
    let counts = client.window(1500, DEADLINE).await?;
    println!(
        "xDS, grpc-java client, Equal over 3: {}; failed {:?}",
        shares(&counts, &addresses),
        counts.failed
    );
    for backend in &addresses {
        assert!((counts.share(*backend) - 1.0 / 3.0).abs() < 0.05, "{counts:?}");
    }
    assert_eq!(counts.failures(), 0, "failed requests: {counts:?}");

    // (c) A backend flipped NOT_SERVING receives no requests after the push.
    let before = endpoints_pushed(&xds);
    backends[2].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "the flipped endpoint NotServing", DEADLINE, |status| {
        status.ready_endpoints == 2
            && endpoint(status, &addresses[2]).is_some_and(|e| e.health == Health::NotServing && e.weight == 0)
    })
    .await?;
    wait_pushed(&xds, &client, before, "the flip").await?;
    let counts = client.window(1000, DEADLINE).await?;
    println!(
        "xDS, grpc-java client, backend 2 NotServing: {}; failed {:?}",
        shares(&counts, &addresses),
        counts.failed
    );
    assert_eq!(
        counts.of(addresses[2]),
        0,
        "the NotServing backend got requests: {counts:?}"
    );
    assert_eq!(counts.failures(), 0, "failed requests: {counts:?}");

    // (b) Weights 1:3 (Static, from the Pods' annotations) -> shares 25/75 over the two left.
    let before = endpoints_pushed(&xds);
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
    wait_pushed(&xds, &client, before, "the Static weights").await?;
    let counts = client.window(4000, DEADLINE).await?;
    println!(
        "xDS, grpc-java client, Static 1:3: {}; failed {:?}",
        shares(&counts, &addresses[..2]),
        counts.failed
    );
    assert!((counts.share(addresses[0]) - 0.25).abs() <= 0.05, "{counts:?}");
    assert!((counts.share(addresses[1]) - 0.75).abs() <= 0.05, "{counts:?}");
    assert_eq!(
        counts.of(addresses[2]),
        0,
        "the NotServing backend got requests: {counts:?}"
    );
    assert_eq!(counts.failures(), 0, "failed requests: {counts:?}");

    // grpc-java accepted every push, of every type.
    for type_url in type_url::ALL {
        let nacks = xds
            .metrics
            .xds_nacks
            .get_or_create(&XdsTypeLabels {
                type_url: type_url.into(),
            })
            .get();
        assert_eq!(nacks, 0, "grpc-java NACKed {type_url}");
    }
    Ok(())
}
