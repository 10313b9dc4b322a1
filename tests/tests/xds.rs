//! GrpcBackends over xDS to a real grpc-go client (google.golang.org/grpc with its `xds`
//! package, dialing `xds:///echo.<namespace>` through a bootstrap file naming the operator's
//! xDS server on 10.250.0.1). The backends are real; the client counts who answered.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use kube::api::{Patch, PatchParams};
use kubegrpc_echo::ServingStatus;
use kubegrpc_tests::{
    backends::start_backends,
    objects::{SliceEndpoint, apply_slice, create_service, create_weighted_pod},
    operator::InProcessOperator,
    scenario::{Scenario, endpoint},
    xds::{InProcessXds, XdsClient, XdsCounts},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const RATE: u32 = 200;

async fn create_pod(s: &Scenario, name: &str, weight: &str) -> Result<()> {
    create_weighted_pod(&s.client, &s.namespace, name, weight).await
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

/// A raw ADS stream: what a misbehaving client sends, and what it is answered.
struct RawAds {
    requests: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

impl RawAds {
    async fn open(address: SocketAddr) -> Result<Self> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}")).await?;
        let (requests, receiver) = tokio::sync::mpsc::channel(16);
        let responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Self { requests, responses })
    }

    async fn send(&self, request: DiscoveryRequest) -> Result<()> {
        self.requests.send(request).await?;
        Ok(())
    }

    async fn next(&mut self) -> Result<DiscoveryResponse> {
        tokio::time::timeout(DEADLINE, self.responses.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the ADS stream ended"))
    }
}

fn ask(type_url: &str, names: Vec<String>, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_xds_clients_are_bounded_and_others_keep_their_updates() -> Result<()> {
    use kubegrpc_operator::xds::resources::type_url;
    let s = Scenario::new("xds-bad").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(2).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.echo_service(&addresses).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "2 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 2
    })
    .await?;
    let name = format!("echo.{}", s.namespace);

    // A client asking for 10,000 unknown names (and as many more past the cap) gets an answer
    // without them.
    let mut greedy = RawAds::open(xds.address).await?;
    let unknown: Vec<String> = (0..20_000).map(|i| format!("unknown-{i}.{}", s.namespace)).collect();
    greedy.send(ask(type_url::LISTENER, unknown, "")).await?;
    let answer = greedy.next().await?;
    assert_eq!(
        (answer.type_url.as_str(), answer.resources.len()),
        (type_url::LISTENER, 0)
    );

    // A client that rejects what it is sent (a NACK): counted, and it keeps its stream.
    let mut rejecting = RawAds::open(xds.address).await?;
    rejecting.send(ask(type_url::ENDPOINTS, vec![name.clone()], "")).await?;
    let first = rejecting.next().await?;
    assert_eq!(first.resources.len(), 1);
    let mut nack = ask(type_url::ENDPOINTS, vec![name.clone()], &first.nonce);
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "rejected on purpose by the test".into(),
        ..Default::default()
    });
    rejecting.send(nack).await?;
    let nacks = || {
        xds.metrics
            .xds_nacks
            .get_or_create(&kubegrpc_operator::metrics::XdsTypeLabels {
                type_url: type_url::ENDPOINTS.into(),
            })
            .get()
    };
    kubegrpc_tests::wait::until("the NACK counted", DEADLINE, || async {
        Ok((nacks() == 1).then_some(()))
    })
    .await?;

    // A client that never reads after subscribing: it holds at most a few responses.
    let idle = RawAds::open(xds.address).await?;
    idle.send(ask(type_url::ENDPOINTS, vec![name.clone()], "")).await?;

    // Meanwhile a well-behaved grpc-go client keeps receiving updates: a flip reaches it.
    let client = XdsClient::start(&name, xds.address, RATE).await?;
    let counts = window(&client, 500).await?;
    assert!(counts.of(addresses[0]) > 0 && counts.of(addresses[1]) > 0, "{counts:?}");
    for _ in 0..5 {
        // Churn, so that the idle client's queue fills up and stays full.
        backends[1].health.set("", ServingStatus::NotServing);
        s.wait_status("echo", "1 ready", DEADLINE, |status| status.ready_endpoints == 1)
            .await?;
        backends[1].health.set("", ServingStatus::Serving);
        s.wait_status("echo", "2 ready", DEADLINE, |status| status.ready_endpoints == 2)
            .await?;
    }
    backends[1].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "1 ready", DEADLINE, |status| status.ready_endpoints == 1)
        .await?;
    client.wait_for(RATE as u64, DEADLINE).await?;
    let counts = window(&client, 500).await?;
    println!(
        "xDS with a 20,000-name, a rejecting and an idle client beside it: {:?}",
        counts.ok
    );
    assert_eq!(
        counts.of(addresses[1]),
        0,
        "the flip reached the good client: {counts:?}"
    );
    // The rejecting client still gets pushes: the flips changed its endpoints.
    let pushed = rejecting.next().await?;
    assert_eq!(pushed.type_url, type_url::ENDPOINTS);
    drop(idle);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_xds_server_restarted_under_load_loses_no_request_and_the_client_reconnects() -> Result<()> {
    let s = Scenario::new("xds-restart").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let address = xds.address;
    let backends = start_backends(2).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.echo_service(&addresses).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "2 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 2
    })
    .await?;
    let client = XdsClient::start(&format!("echo.{}", s.namespace), address, RATE).await?;
    client.wait_for(200, DEADLINE).await?;
    client.reset().await?;

    // Down and back on the same address, under load.
    drop(xds);
    client.wait_for(200, DEADLINE).await?;
    let xds = InProcessXds::start_on(s.client.clone(), Some(s.namespace.clone()), address).await?;
    // Reconnected: a flip after the restart reaches the client.
    let endpoints_pushed = || {
        xds.metrics
            .xds_responses
            .get_or_create(&kubegrpc_operator::metrics::XdsTypeLabels {
                type_url: kubegrpc_operator::xds::resources::type_url::ENDPOINTS.into(),
            })
            .get()
    };
    let pushed_before_flip = endpoints_pushed();
    backends[1].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "1 ready", DEADLINE, |status| status.ready_endpoints == 1)
        .await?;
    // The client's first push from the new server after the flip carries it (whether it
    // reconnected before the flip or after).
    kubegrpc_tests::wait::until("the flip pushed from the restarted server", DEADLINE, || async {
        Ok((endpoints_pushed() > pushed_before_flip).then_some(()))
    })
    .await?;
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let across = client.counts().await?;
    println!(
        "xDS server restarted under load: {:?}, failed {:?}",
        across.ok, across.failed
    );
    assert_eq!(across.failures(), 0, "failed requests across the restart: {across:?}");
    // From some window on, the flipped backend gets nothing: the new server's push reached it.
    let counts = kubegrpc_tests::wait::until("a window without the flipped backend", DEADLINE, || async {
        let counts = window(&client, 200).await?;
        Ok((counts.of(addresses[1]) == 0).then_some(counts))
    })
    .await?;
    assert_eq!(counts.failures(), 0, "{counts:?}");
    Ok(())
}
