//! GrpcBackends over xDS to a real grpc-go client (google.golang.org/grpc with its `xds`
//! package, dialing `xds:///echo.<namespace>` through a bootstrap file naming the operator's
//! xDS server on 10.250.0.1). The backends are real; the client counts who answered.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kubegrpc_echo::ServingStatus;
use kubegrpc_tests::{
    backends::start_backends,
    objects::{SliceEndpoint, apply_slice, create_service, create_weighted_pod},
    operator::InProcessOperator,
    scenario::{Scenario, endpoint},
    xds::{InProcessXds, XdsClient},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
const RATE: u32 = 200;

async fn create_pod(s: &Scenario, name: &str, weight: &str) -> Result<()> {
    create_weighted_pod(&s.client, &s.namespace, name, weight).await
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
        &SliceEndpoint::ready_pods(&addresses[..3]),
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
    let counts = client.window(1500, DEADLINE).await?;
    println!("xDS, grpc-go client, Equal over 3: {:?}", counts.ok);
    for backend in &addresses[..3] {
        assert!((counts.share(*backend) - 1.0 / 3.0).abs() < 0.05, "{counts:?}");
    }

    // A backend flipped NOT_SERVING receives no requests after the push.
    backends[2].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "the flipped endpoint NotServing", DEADLINE, |status| {
        endpoint(status, &addresses[2]).is_some_and(|e| e.weight == 0)
    })
    .await?;
    // The push reaches the client within moments; count from a window that starts after it.
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let counts = client.window(1000, DEADLINE).await?;
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
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let counts = client.window(4000, DEADLINE).await?;
    println!("xDS, Static 1:3: {:?}", counts.ok);
    assert!((counts.share(addresses[0]) - 0.25).abs() <= 0.05, "{counts:?}");
    assert!((counts.share(addresses[1]) - 0.75).abs() <= 0.05, "{counts:?}");

    // A new endpoint receives requests; one removed from the slice receives none.
    let mut slice = SliceEndpoint::ready_pods(&addresses);
    slice.remove(0);
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice).await?;
    s.wait_status("echo", "endpoint 0 gone, endpoint 3 ready", DEADLINE, |status| {
        endpoint(status, &addresses[0]).is_none() && endpoint(status, &addresses[3]).is_some_and(|e| e.weight == 3)
    })
    .await?;
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let counts = client.window(1500, DEADLINE).await?;
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
    let counts = client.window(500, DEADLINE).await?;
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
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let counts = client.window(500, DEADLINE).await?;
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
        let counts = client.window(200, DEADLINE).await?;
        Ok((counts.of(addresses[1]) == 0).then_some(counts))
    })
    .await?;
    assert_eq!(counts.failures(), 0, "{counts:?}");
    Ok(())
}

fn backend_requests(backends: &[kubegrpc_echo::Backend]) -> Vec<u64> {
    backends.iter().map(|b| b.counters.snapshot().requests).collect()
}

/// Every ENDPOINTS push of `name` seen by a raw ADS subscriber of its own: the locality
/// weights by endpoint (`ip:port`), in the order pushed.
async fn observe_endpoint_pushes(
    address: SocketAddr,
    name: String,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<BTreeMap<String, u32>>> {
    use kubegrpc_operator::xds::resources::type_url;
    let mut observer = RawAds::open(address).await?;
    observer.send(ask(type_url::ENDPOINTS, vec![name.clone()], "")).await?;
    let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(response) = observer.next().await {
            let weights = response
                .resources
                .iter()
                .filter_map(|any| <ClusterLoadAssignment as prost::Message>::decode(any.value.as_slice()).ok())
                .flat_map(|assignment| assignment.endpoints)
                .filter_map(|l| Some((l.locality?.sub_zone, l.load_balancing_weight?.value)))
                .collect();
            let ack = ask(type_url::ENDPOINTS, vec![name.clone()], &response.nonce);
            if pushes.send(weights).is_err() || observer.send(ack).await.is_err() {
                break;
            }
        }
    });
    Ok(received)
}

/// The next push satisfying `condition`.
async fn next_push(
    pushes: &mut tokio::sync::mpsc::UnboundedReceiver<BTreeMap<String, u32>>,
    what: &str,
    mut condition: impl FnMut(&BTreeMap<String, u32>) -> bool,
) -> Result<BTreeMap<String, u32>> {
    tokio::time::timeout(DEADLINE, async {
        while let Some(weights) = pushes.recv().await {
            if condition(&weights) {
                return Ok(weights);
            }
        }
        anyhow::bail!("the ADS observer stopped before {what}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no push with {what} within {DEADLINE:?}"))?
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_ramps_a_new_endpoint_for_xds_clients_in_pushed_steps() -> Result<()> {
    use kubegrpc_crds::FULL_WEIGHT;
    const WINDOW_SECONDS: u64 = 12;
    let s = Scenario::new("xds-slow-start").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    let name = format!("echo.{}", s.namespace);
    let mut pushes = observe_endpoint_pushes(xds.address, name.clone()).await?;
    s.echo_service(&addresses[..2]).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc",
               "weighting": {"slowStartWindow": format!("{WINDOW_SECONDS}s")}}),
    )
    .await?;
    // The first two ramp too: wait until the server pushes them at their full, unscaled weight.
    next_push(&mut pushes, "the first two at full weight", |weights| {
        weights.len() == 2 && weights.values().all(|w| *w == FULL_WEIGHT)
    })
    .await?;
    let client = XdsClient::start(&name, xds.address, RATE).await?;
    client.wait_for(u64::from(RATE), DEADLINE).await?;
    let writes_before = operator.status_writes(&s.namespace, "echo");
    // Every status write from here on, to read what each one changed.
    let version = s
        .backends()
        .get("echo")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut status_events = s
        .backends()
        .watch(
            &kube::api::WatchParams::default().fields("metadata.name=echo"),
            &version,
        )
        .await?
        .boxed();

    s.echo_slice(&addresses).await?;
    s.wait_status("echo", "3 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 3
    })
    .await?;
    // Per second, the new backend's share of what the three received, counted at the backends.
    let mut shares = Vec::new();
    let mut last = backend_requests(&backends);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for _ in 0..WINDOW_SECONDS + 3 {
        tick.tick().await;
        let now = backend_requests(&backends);
        let delta: Vec<u64> = now.iter().zip(&last).map(|(n, l)| n - l).collect();
        shares.push(delta[2] as f64 / delta.iter().sum::<u64>().max(1) as f64);
        last = now;
    }
    let counts = client.counts().await?;
    println!("xDS slow start {WINDOW_SECONDS}s: the new endpoint's share per second {shares:.3?}");
    assert_eq!(counts.failures(), 0, "failed requests: {counts:?}");

    // The steps are the server's pushes (an xDS client has no ramp of its own): the new
    // endpoint's weight relative to a full one climbs push by push, in at most ten steps,
    // to the plain weights.
    let new_endpoint = addresses[2].to_string();
    let mut steps = Vec::new();
    loop {
        let weights = next_push(&mut pushes, "the new endpoint", |w| w.contains_key(&new_endpoint)).await?;
        let full = weights.values().copied().max().unwrap_or(1);
        steps.push(f64::from(weights[&new_endpoint]) / f64::from(full));
        if weights.values().all(|w| *w == FULL_WEIGHT) {
            break;
        }
    }
    println!("xDS slow start: the new endpoint's pushed weight / a full one, per push: {steps:.2?}");
    assert!(steps[0] <= 0.2, "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert!(steps.len() <= 10, "{} pushes for one ramp: {steps:?}", steps.len());
    // After the last step, a full third (counted over more requests than a second holds).
    let counts = client.window(1500, DEADLINE).await?;
    let settled = counts.share(addresses[2]);
    println!("xDS slow start: after the ramp {:?}", counts.ok);
    let mean = |range: std::ops::Range<usize>| shares[range.clone()].iter().sum::<f64>() / range.len() as f64;
    let (first, middle) = (mean(0..3), mean(5..8));
    assert!(
        first < middle && middle < settled,
        "the share climbs over the window: {shares:?}, then {settled:.3}"
    );
    assert!(first < 0.2, "the ramp starts low: {shares:?}");
    assert!((settled - 1.0 / 3.0).abs() < 0.05, "then a full third: {counts:?}");
    assert_eq!(counts.failures(), 0, "{counts:?}");
    // The ramp is in the pushes, not in the status: every write lists the new endpoint at its
    // full weight. One write adds it; a second one only if its first probe had not answered
    // within the write's wait for it (the probe timeout and a margin, which a loaded machine can
    // pass), listing it Unknown first.
    let written = operator.status_writes(&s.namespace, "echo") - writes_before;
    let mut new_entries = Vec::new();
    while (new_entries.len() as u64) < written {
        let event = tokio::time::timeout(DEADLINE, status_events.next())
            .await?
            .context("the status watch ended")??;
        if let kube::api::WatchEvent::Modified(object) = event {
            let status = object.status.unwrap_or_default();
            new_entries.push(endpoint(&status, &addresses[2]).map(|e| (e.health, e.weight)));
        }
    }
    println!("status writes during the ramp, the new endpoint in each: {new_entries:?}");
    assert!(
        (1..=2).contains(&written),
        "one status write for the new endpoint, not one per step: {new_entries:?}"
    );
    assert!(
        new_entries
            .iter()
            .all(|entry| entry.is_some_and(|(_, weight)| weight == FULL_WEIGHT)),
        "every write lists the new endpoint at its full weight: {new_entries:?}"
    );
    assert_eq!(
        new_entries.last().copied().flatten().map(|(health, _)| health),
        Some(kubegrpc_crds::Health::Serving),
        "{new_entries:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_xds_client_follows_two_grpc_backends_in_two_namespaces() -> Result<()> {
    let first = Scenario::new("xds-two-a").await?;
    let second = Scenario::new("xds-two-b").await?;
    let _operators = [
        InProcessOperator::start(first.client.clone(), &first.namespace),
        InProcessOperator::start(second.client.clone(), &second.namespace),
    ];
    // One server for every namespace, as a cluster-wide operator serves.
    let xds = InProcessXds::start(first.client.clone(), None).await?;
    let backends = start_backends(4).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    for (s, mine) in [(&first, &addresses[..2]), (&second, &addresses[2..])] {
        s.echo_service(mine).await?;
        s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
            .await?;
        s.wait_status("echo", "2 ready endpoints", DEADLINE, |status| {
            status.ready_endpoints == 2
        })
        .await?;
    }
    let targets = [
        format!("echo.{}", first.namespace),
        format!("echo.{}", second.namespace),
    ];
    let client = XdsClient::start_targets(&targets, xds.address, RATE).await?;
    let counts = client.window(2000, DEADLINE).await?;
    println!("xDS, one client, two namespaces: {:?}", counts.ok);
    // The calls alternate between the targets; each target spreads over its own two.
    for backend in &addresses {
        assert!((counts.share(*backend) - 0.25).abs() < 0.05, "{counts:?}");
    }
    assert_eq!(counts.failures(), 0, "{counts:?}");

    // A flip in the second namespace moves the second target only.
    backends[3].health.set("", ServingStatus::NotServing);
    second
        .wait_status("echo", "1 ready endpoint", DEADLINE, |status| {
            status.ready_endpoints == 1
        })
        .await?;
    let counts = kubegrpc_tests::wait::until("a window without the flipped backend", DEADLINE, || async {
        let counts = client.window(1000, DEADLINE).await?;
        Ok((counts.of(addresses[3]) == 0).then_some(counts))
    })
    .await?;
    println!(
        "xDS, two namespaces, one backend of the second NotServing: {:?}",
        counts.ok
    );
    assert!((counts.share(addresses[2]) - 0.5).abs() < 0.06, "{counts:?}");
    for backend in &addresses[..2] {
        assert!((counts.share(*backend) - 0.25).abs() < 0.05, "{counts:?}");
    }
    assert_eq!(counts.failures(), 0, "{counts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn over_mutual_tls_only_clients_with_a_certificate_from_the_ca_are_served() -> Result<()> {
    use kubegrpc_operator::xds::server::XdsTls;
    use kubegrpc_tests::{certs::CertificateAuthority, xds::XdsClientOptions};
    let s = Scenario::new("xds-tls").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let ca = CertificateAuthority::new("kubegrpc-xds-test-ca")?;
    let server = ca.serving("kubegrpc-xds", &["10.250.0.1", "kubegrpc-xds.kubegrpc-system.svc"])?;
    let tls = XdsTls {
        certificate_chain: server.cert_pem.into_bytes(),
        private_key: server.key_pem.into_bytes(),
        client_ca: Some(ca.cert_pem().as_bytes().to_vec()),
    };
    let xds = InProcessXds::start_tls(s.client.clone(), Some(s.namespace.clone()), tls).await?;
    let backends = start_backends(2).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.echo_service(&addresses).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "2 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 2
    })
    .await?;

    // grpc-go's bootstrap "tls" channel credentials, with a client certificate from the CA.
    let dir = tempfile::tempdir()?;
    let client_certificate = ca.client("xds-client", None)?;
    let write = |name: &str, text: &str| -> Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    let channel_creds = json!([{"type": "tls", "config": {
        "ca_certificate_file": write("ca.pem", ca.cert_pem())?,
        "certificate_file": write("client.pem", &client_certificate.cert_pem)?,
        "private_key_file": write("client-key.pem", &client_certificate.key_pem)?,
    }}]);
    let client = XdsClient::start_with(XdsClientOptions {
        channel_creds: Some(channel_creds),
        ..XdsClientOptions::new(&[format!("echo.{}", s.namespace)], xds.address, RATE)
    })
    .await?;
    let counts = client.window(600, DEADLINE).await?;
    println!("xDS over mutual TLS: {:?}", counts.ok);
    assert!(counts.of(addresses[0]) > 0 && counts.of(addresses[1]) > 0, "{counts:?}");
    assert_eq!(counts.failures(), 0, "{counts:?}");

    // Plain text is refused, and so is TLS without a client certificate.
    let plain = async {
        let mut ads = RawAds::open(xds.address).await?;
        ads.send(ask(kubegrpc_operator::xds::resources::type_url::LISTENER, vec![], ""))
            .await?;
        ads.next().await
    };
    assert!(plain.await.is_err(), "a plain-text client was answered");
    let anonymous = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", xds.address))?.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
                .domain_name("kubegrpc-xds.kubegrpc-system.svc"),
        )?;
        let channel = endpoint.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        requests
            .send(ask(kubegrpc_operator::xds::resources::type_url::LISTENER, vec![], ""))
            .await?;
        let mut responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        anyhow::Ok(responses.message().await?)
    };
    assert!(
        anonymous.await.is_err(),
        "a TLS client without a certificate was answered"
    );
    Ok(())
}
