//! `spec.outlierDetection`, one set of settings for every client kind (issue 21): published in
//! the xDS Cluster (gRFC A50) for real grpc-go and grpc-java xDS clients, and read from the spec
//! by the Rust client. Every count that decides is taken at the backends.
//!
//! The xDS scenario runs the operator and its xDS server in-process against the real apiserver.
//! One of four backends fails every call with INTERNAL while its health service stays SERVING,
//! so the operator keeps it in the endpoints: only the client's outlier detection can take it
//! out. The assertions are mechanisms, not timings: with the defaults (at least 5 hosts) four
//! backends never eject; the published settings (4 hosts, 1s interval) eject it; an ejection of
//! an hour keeps it out even once it serves again; publishing an ejection time of 2s (long
//! past) brings it back.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use kube::api::{Patch, PatchParams};
use kubegrpc::{Channel, FailurePercentage, OutlierDetection};
use kubegrpc_echo::{
    Backend, EchoReply, EchoRequest, SetHealthReply, SetHealthRequest, StatsReply, StatsRequest,
    pb::echo_server::{Echo, EchoServer},
};
use kubegrpc_operator::{metrics::XdsTypeLabels, xds::resources::type_url};
use kubegrpc_tests::{
    backends::{BACKEND_PORT, addresses_of, next_backend_ip, start_backends},
    load::Load,
    operator::InProcessOperator,
    proxy::ResettingProxy,
    scenario::{Scenario, endpoint, wait_snapshot},
    wait,
    xds::{InProcessXds, XdsClient, XdsPeer},
};
use serde_json::{Value, json};
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Response, Status};

const DEADLINE: Duration = Duration::from_secs(90);
/// The xDS client's calls per second, over four backends.
const RATE: u32 = 200;

/// A backend that fails every `Echo` call with INTERNAL while `failing` is set (and answers as
/// the echo backends do otherwise), counting the calls it gets. Its health stays SERVING.
struct FailingBackend {
    address: SocketAddr,
    calls: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    _server: AbortOnDropHandle<Result<(), tonic::transport::Error>>,
}

#[derive(Clone)]
struct FailingEcho {
    address: String,
    calls: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Echo for FailingEcho {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::internal("this backend fails every call, on purpose"));
        }
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            backend: self.address.clone(),
        }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        Ok(Response::new(StatsReply {
            requests: self.calls.load(Ordering::SeqCst),
            ..StatsReply::default()
        }))
    }

    async fn set_health(&self, _: Request<SetHealthRequest>) -> Result<Response<SetHealthReply>, Status> {
        Err(Status::unimplemented("its health stays SERVING"))
    }
}

impl FailingBackend {
    async fn start() -> Result<Self> {
        let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let echo = FailingEcho {
            address: address.to_string(),
            calls: Arc::default(),
            failing: Arc::new(AtomicBool::new(true)),
        };
        let (calls, failing) = (echo.calls.clone(), echo.failing.clone());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(EchoServer::new(echo))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(Self {
            address,
            calls,
            failing,
            _server: AbortOnDropHandle::new(server),
        })
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// `Echo` calls the echo backends served, in total.
fn served(backends: &[Backend]) -> u64 {
    backends
        .iter()
        .map(|b| b.counters.requests.load(Ordering::SeqCst))
        .sum()
}

/// Waits until the echo backends served `more` calls from now (the client sends on schedule,
/// so this is a window of the client's calls, however slow the machine).
async fn served_more(backends: &[Backend], more: u64) -> Result<()> {
    let target = served(backends) + more;
    wait::until(&format!("{more} more calls served"), DEADLINE, || async {
        Ok((served(backends) >= target).then_some(()))
    })
    .await
}

async fn patch_outlier_detection(s: &Scenario, outlier_detection: Value) -> Result<()> {
    s.backends()
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"outlierDetection": outlier_detection}})),
        )
        .await?;
    Ok(())
}

/// The xDS scenario of the module docs, with the xDS client of `peer`'s library.
async fn an_xds_client_ejects_per_the_published_settings(peer: XdsPeer) -> Result<()> {
    let s = Scenario::new(&format!("xds-outliers-{}", format!("{peer:?}").to_lowercase())).await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(3).await?;
    let failing = FailingBackend::start().await?;
    let mut addresses = addresses_of(&backends);
    addresses.push(failing.address);
    s.echo_service(&addresses).await?;
    // No outlierDetection: on, with gRFC A50's defaults, which need 5 hosts with 50 calls each.
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "4 ready endpoints", DEADLINE, |status| {
        status.ready_endpoints == 4
    })
    .await?;
    let client = XdsClient::start_peer(peer, &format!("echo.{}", s.namespace), xds.address, RATE).await?;
    wait::until(
        &format!("every backend called by the {peer} client"),
        DEADLINE,
        || async {
            let every = backends.iter().all(|b| b.counters.requests.load(Ordering::SeqCst) > 0) && failing.calls() > 0;
            Ok(every.then_some(()))
        },
    )
    .await?;

    // (a) With the defaults, four hosts are fewer than the 5 the rule needs: the failing backend
    // keeps its share (a quarter of the calls: about 260 while the others serve 800).
    let before = failing.calls();
    served_more(&backends, 800).await?;
    let during_defaults = failing.calls() - before;
    println!(
        "{peer}, defaults (5 hosts needed, 4 listed): the failing backend got {during_defaults} calls while the others served 800"
    );
    assert!(
        during_defaults >= 100,
        "the failing backend kept its share under the defaults: {during_defaults} calls"
    );

    // (b) Published: 4 hosts with 10 calls each per 1s interval, ejections of an hour. The
    // failing backend is ejected: a window of 400 calls to the others with none to it.
    patch_outlier_detection(
        &s,
        json!({"interval": "1s", "baseEjectionTime": "1h", "maxEjectionTime": "1h", "maxEjectionPercent": 50,
               "failurePercentage": {"minimumHosts": 4, "requestVolume": 10}}),
    )
    .await?;
    let ejected_at = wait::until(
        "the failing backend ejected (no call while the others serve 400)",
        DEADLINE,
        || async {
            let calls = failing.calls();
            served_more(&backends, 400).await?;
            Ok((failing.calls() == calls).then_some(calls))
        },
    )
    .await?;
    println!("{peer}: ejected after {ejected_at} calls to it");

    // (c) The ejection lasts its published hour: the backend recovers (it would answer now) and
    // still gets nothing over 2,000 calls (about ten intervals), while the operator keeps it
    // listed Serving: only the client's outlier detection holds it out.
    failing.failing.store(false, Ordering::SeqCst);
    let window = client.window(2000, DEADLINE).await?;
    println!("{peer}, ejected for 1h: {:?}, failed {:?}", window.ok, window.failed);
    assert_eq!(
        failing.calls(),
        ejected_at,
        "calls reached the ejected backend: {window:?}"
    );
    assert_eq!(window.failures(), 0, "{window:?}");
    let status = s.backends().get("echo").await?.status.context("a status")?;
    let listed = endpoint(&status, &failing.address).context("the failing backend listed")?;
    assert!(listed.is_usable(), "the operator keeps it usable: {listed:?}");

    // (d) Publishing a 2s ejection time, long past: it returns at the next interval, and takes
    // its share of calls, all answered.
    patch_outlier_detection(&s, json!({"baseEjectionTime": "2s", "maxEjectionTime": "2s"})).await?;
    wait::until("calls to the backend again", DEADLINE, || async {
        Ok((failing.calls() > ejected_at).then_some(()))
    })
    .await?;
    let at_return = failing.calls();
    let window = client.window(1000, DEADLINE).await?;
    println!(
        "{peer}, back after the ejection time: {:?}, failed {:?}",
        window.ok, window.failed
    );
    let share = window.share(failing.address);
    assert!(
        (share - 0.25).abs() <= 0.1,
        "its share is back: {share:.3} of {window:?}"
    );
    assert!(
        failing.calls() - at_return >= window.of(failing.address),
        "counted at the backend"
    );
    assert_eq!(window.failures(), 0, "{window:?}");

    let nacks = xds
        .metrics
        .xds_nacks
        .get_or_create(&XdsTypeLabels {
            type_url: type_url::CLUSTER.into(),
        })
        .get();
    assert_eq!(nacks, 0, "the {peer} client accepted every Cluster");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_go_xds_client_ejects_a_failing_backend_per_the_published_settings_and_takes_it_back() -> Result<()> {
    an_xds_client_ejects_per_the_published_settings(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_java_xds_client_ejects_a_failing_backend_per_the_published_settings_and_takes_it_back() -> Result<()> {
    an_xds_client_ejects_per_the_published_settings(XdsPeer::Java).await
}

/// The Rust client, given no settings in code, applies the spec's and follows a change without
/// reconnecting. The status is written by hand (no operator), so that only the client reacts;
/// one endpoint is a proxy that resets connections (the Rust client's evidence is transport
/// failures, not the calls' status codes).
#[tokio::test(flavor = "multi_thread")]
async fn the_rust_client_applies_the_specs_outlier_detection_and_follows_its_changes() -> Result<()> {
    let s = Scenario::new("spec-outliers").await?;
    let backends = start_backends(3).await?;
    let proxy = ResettingProxy::start(SocketAddr::from((next_backend_ip(), BACKEND_PORT)), backends[0].address).await?;
    let listed = [proxy.address, backends[1].address, backends[2].address];
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "outlierDetection": {
            "interval": "500ms", "baseEjectionTime": "1h", "maxEjectionTime": "1h", "maxEjectionPercent": 50,
            "consecutiveConnectFailures": 0, "failurePercentage": {"minimumHosts": 3, "requestVolume": 10}}}),
    )
    .await?;
    s.publish_serving("echo", &listed).await?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    let published = OutlierDetection {
        enabled: true,
        interval: Duration::from_millis(500),
        base_ejection_time: Duration::from_secs(3600),
        max_ejection_time: Duration::from_secs(3600),
        max_ejection_percent: 50,
        consecutive_connect_failures: 0,
        failure_percentage: Some(FailurePercentage {
            threshold: 85,
            minimum_hosts: 3,
            request_volume: 10,
        }),
    };
    assert_eq!(channel.snapshot().outlier_detection, published, "the spec's settings");
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let load = Load::start(channel.clone(), 4);
    load.wait_for_more(300, DEADLINE).await?;

    // Resetting: ejected on the interval's evidence, as the spec says.
    proxy.set_resetting(true);
    // Ejected, and the requests picked before (failing on reset connections) are over.
    wait_snapshot(
        &channel,
        "the resetting endpoint ejected, none in flight",
        DEADLINE,
        |snapshot| {
            snapshot
                .endpoint(&proxy.address)
                .is_some_and(|e| e.ejected && e.in_flight == 0)
        },
    )
    .await?;
    // It recovers, and an hour's ejection keeps it out: nothing reaches its backend.
    proxy.set_resetting(false);
    let behind_proxy = || backends[0].counters.requests.load(Ordering::SeqCst);
    let at_ejection = behind_proxy();
    load.wait_for_more(1000, DEADLINE).await?;
    assert_eq!(behind_proxy(), at_ejection, "requests reached the ejected endpoint");

    // The spec turns outlier detection off: the ejection ends at once (gRFC A50), the endpoint
    // takes requests again, and no other endpoint was connected to again.
    let accepted = |b: &Backend| b.counters.connections_accepted.load(Ordering::SeqCst);
    let connections_before = [accepted(&backends[1]), accepted(&backends[2])];
    patch_outlier_detection(&s, json!({"enabled": false})).await?;
    wait_snapshot(&channel, "outlier detection off", DEADLINE, |snapshot| {
        !snapshot.outlier_detection.enabled
    })
    .await?;
    wait::until("requests behind the proxy again", DEADLINE, || async {
        Ok((behind_proxy() > at_ejection).then_some(()))
    })
    .await?;
    assert_eq!(
        [accepted(&backends[1]), accepted(&backends[2])],
        connections_before,
        "a spec change reconnects nothing"
    );
    let snapshot = channel.snapshot();
    println!("spec outlier detection off: {:?}", snapshot.endpoint(&proxy.address));
    assert!(
        snapshot
            .endpoint(&proxy.address)
            .is_some_and(|e| !e.ejected && e.in_rotation)
    );
    let counts = load.stop().await;
    println!(
        "Rust client: {} requests succeeded, {} failed (in flight on reset connections)",
        counts.succeeded(),
        counts.failed()
    );
    Ok(())
}
