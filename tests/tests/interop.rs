//! kubegrpc against real grpc-go and grpc-java servers (tests/peers/), with their libraries'
//! default keepalive enforcement and connection ageing: the operator's prober must not be
//! churned by them, and the client must neither fail requests nor eject backends when they
//! rotate connections. Everything is counted at the servers.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use kubegrpc::{Channel, FailurePercentage, OutlierDetection};
use kubegrpc_crds::{GrpcBackendStatus, Health};
use kubegrpc_echo::StatsReply;
use kubegrpc_tests::{
    load::Load,
    objects::{SliceEndpoint, apply_slice, create_service},
    operator::InProcessOperator,
    peers::{PeerLanguage, PeerOptions, PeerServer, start_peers},
    scenario::{Scenario, assert_unchanged, endpoint, wait_snapshot},
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// Starts 3 grpc-go and 3 grpc-java servers with `options`.
async fn go_and_java_peers(options: &PeerOptions) -> Result<Vec<PeerServer>> {
    let (go, java) = tokio::join!(
        start_peers(PeerLanguage::Go, 3, options),
        start_peers(PeerLanguage::Java, 3, options)
    );
    Ok(go?.into_iter().chain(java?).collect())
}

/// A Service `echo` whose slice lists `peers`, and GrpcBackend `echo` with `health_check`.
async fn balance(s: &Scenario, peers: &[PeerServer], health_check: serde_json::Value) -> Result<()> {
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let endpoints: Vec<SliceEndpoint> = peers.iter().map(|p| SliceEndpoint::ready(p.address)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": health_check}),
    )
    .await?;
    Ok(())
}

fn all_serving(count: i32) -> impl Fn(&GrpcBackendStatus) -> bool {
    move |st| st.ready_endpoints == count && st.endpoints.iter().all(|e| e.health == Health::Serving)
}

/// What the servers counted while the operator probed them.
struct Probed {
    operator: InProcessOperator,
    /// The GrpcBackend's status at the end of the window.
    status: GrpcBackendStatus,
    /// Alive until the test has read the operator's counters: their end is a failure.
    _peers: Vec<PeerServer>,
    servers: Vec<(PeerLanguage, SocketAddr, StatsReply)>,
}

/// The operator probes 3 grpc-go and 3 grpc-java servers started with `options`: once all are
/// Serving, the GrpcBackend must not change for `window` (no status write) when `quiet`, else
/// the test waits out the window; then each server's counters, leaving out the test's own
/// connections.
async fn probe_quietly(
    prefix: &str,
    options: &PeerOptions,
    health_check: serde_json::Value,
    window: Duration,
    quiet: bool,
) -> Result<Probed> {
    let s = Scenario::new(prefix).await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let peers = go_and_java_peers(options).await?;
    let readers = warmed(&peers).await?;
    balance(&s, &peers, health_check).await?;
    let steady = s
        .wait_status("echo", "6 peers Serving", DEADLINE, all_serving(6))
        .await?;
    if quiet {
        let writes = operator.status_writes(&s.namespace, "echo");
        assert_unchanged(
            &s.backends(),
            "echo",
            steady.metadata.resource_version.as_deref().unwrap_or_default(),
            window,
        )
        .await?;
        assert_eq!(operator.status_writes(&s.namespace, "echo"), writes, "no status write");
    } else {
        tokio::time::sleep(window).await;
    }
    let status = s
        .wait_status("echo", "6 peers Serving at the end", DEADLINE, all_serving(6))
        .await?
        .status
        .unwrap_or_default();
    let mut servers = Vec::new();
    for reader in &readers {
        servers.push((reader.peer.language, reader.peer.address, reader.read().await?));
    }
    drop(readers);
    Ok(Probed {
        operator,
        status,
        servers,
        _peers: peers,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn default_grpc_go_and_grpc_java_servers_keep_one_probe_connection_for_a_minute() -> Result<()> {
    // A minute at a probe interval of 1s: the prober of a PING-based liveness would have
    // been sent GOAWAY too_many_pings by each of these servers about three times by now.
    let probed = probe_quietly(
        "peers-quiet",
        &PeerOptions::default(),
        json!({"interval": "1s", "timeout": "500ms"}),
        Duration::from_secs(60),
        true,
    )
    .await?;
    for (language, address, stats) in &probed.servers {
        println!(
            "{language} {address}: connections accepted {}, too_many_pings {}, health checks {}, watches open {}",
            stats.connections_accepted, stats.too_many_pings, stats.health_checks, stats.health_watches_open
        );
        assert_eq!(stats.connections_accepted, 1, "{language} {address}: one connection");
        assert_eq!(stats.too_many_pings, 0, "{language} {address}");
        assert_eq!(stats.health_watches_open, 1, "{language} {address}: one Watch");
        // The liveness mechanism: a Check on that connection each quiet interval.
        assert!(
            stats.health_checks >= 30,
            "{language} {address}: liveness Checks flow ({})",
            stats.health_checks
        );
    }
    Ok(())
}

/// What a routine rotation would be counted as, were it counted: an early end's reasons.
const ROTATION_AS_FAILURE: [&str; 6] = [
    "GoAway(NO_ERROR)",
    "Unstable",
    "Closed",
    "Reset(NO_ERROR)",
    "Reset(CANCEL)",
    "Reset(REFUSED_STREAM)",
];

#[tokio::test(flavor = "multi_thread")]
async fn connection_ageing_is_not_a_probe_failure() -> Result<()> {
    // MaxConnectionAge 2s (grpc-go and grpc-java jitter it by 10%) with a 1s interval: every
    // connection serves at least 1.8s after its first answer, past the interval, so each end is
    // a routine rotation, never an early end. The mechanism is asserted by counting, not by the
    // absence of a status write: on a busy machine a reconnect may be slow enough to time out
    // (a Timeout failure, which the threshold of 3 absorbs), and that is no rotation counted.
    let ageing = PeerOptions {
        max_connection_age: Some(Duration::from_secs(2)),
        max_connection_age_grace: Some(Duration::from_secs(1)),
        ..PeerOptions::default()
    };
    let probed = probe_quietly(
        "peers-age",
        &ageing,
        json!({"interval": "1s", "timeout": "900ms", "unhealthyThreshold": 3}),
        Duration::from_secs(20),
        false,
    )
    .await?;
    for (language, address, stats) in &probed.servers {
        println!(
            "{language} {address} with MaxConnectionAge 2s: connections accepted {} in 20s, too_many_pings {}",
            stats.connections_accepted, stats.too_many_pings
        );
        ensure!(
            stats.connections_accepted >= 4,
            "{language} {address}: the server rotated the prober's connection ({} accepted)",
            stats.connections_accepted
        );
        assert_eq!(stats.too_many_pings, 0);
    }
    let metrics = &probed.operator.metrics;
    let rotations = metrics.probe_connection_rotations.get();
    let early_ends = metrics.probe_connection_early_ends.get();
    let failures: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|line| line.starts_with("kubegrpc_probes_total{") && !line.contains("result=\"Serving\""))
        .map(str::to_owned)
        .collect();
    println!("rotations {rotations}, early ends {early_ends}, failed probes by reason: {failures:?}");
    assert!(rotations >= 6 * 4, "rotations seen by the operator: {rotations}");
    assert_eq!(early_ends, 0, "a rotation was counted as an early end");
    for reason in ROTATION_AS_FAILURE {
        let counted = metrics
            .probes
            .get_or_create(&kubegrpc_operator::metrics::ProbeLabels { result: reason.into() })
            .get();
        assert_eq!(counted, 0, "{counted} rotations counted as failures ({reason})");
    }
    assert!(all_serving(6)(&probed.status));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_peer_is_not_serving_within_the_settings_bound() -> Result<()> {
    let s = Scenario::new("peers-frozen").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let peers = start_peers(PeerLanguage::Go, 1, &PeerOptions::default()).await?;
    let (interval, timeout, unhealthy_threshold) = (Duration::from_secs(1), Duration::from_millis(500), 3u32);
    balance(
        &s,
        &peers,
        json!({"interval": "1s", "timeout": "500ms", "unhealthyThreshold": unhealthy_threshold}),
    )
    .await?;
    let address: SocketAddr = peers[0].address;
    let is = |health: Health| move |st: &GrpcBackendStatus| endpoint(st, &address).is_some_and(|e| e.health == health);
    s.wait_status("echo", "Serving", DEADLINE, is(Health::Serving)).await?;

    // A stopped process keeps its sockets open and answers nothing.
    let stopped = Instant::now();
    peers[0].process.signal(libc::SIGSTOP)?;
    let bound = (interval + timeout) * unhealthy_threshold;
    // The first change of a status is written at once; a watch delivers it in milliseconds.
    let frozen = s
        .watch_status("echo", bound + Duration::from_secs(2), is(Health::NotServing))
        .await?;
    let seen_after = stopped.elapsed();
    println!(
        "SIGSTOP -> NotServing in the status after {seen_after:?} (bound (interval + timeout) x unhealthyThreshold = {bound:?})"
    );
    let reason = endpoint(frozen.status.as_ref().unwrap(), &address).and_then(|e| e.reason.clone());
    assert!(
        matches!(reason.as_deref(), Some("Timeout" | "ConnectTimeout")),
        "reason {reason:?}"
    );

    peers[0].process.signal(libc::SIGCONT)?;
    s.wait_status("echo", "Serving after SIGCONT", DEADLINE, is(Health::Serving))
        .await?;
    Ok(())
}

/// Reads a peer's counters repeatedly: each Stats call opens a connection of its own (too short
/// to be aged), so those are taken out of the connection count.
struct CountersReader<'a> {
    peer: &'a PeerServer,
    calls: std::sync::atomic::AtomicU64,
}

impl<'a> CountersReader<'a> {
    fn new(peer: &'a PeerServer) -> Self {
        Self {
            peer,
            calls: Default::default(),
        }
    }

    async fn read(&self) -> Result<StatsReply> {
        let mut stats = self.peer.stats().await?;
        let calls = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        stats.connections_accepted -= calls;
        Ok(stats)
    }

    /// Warms a freshly started server (a JVM's first health answer can take longer than a
    /// probe timeout) with one health Check and the first answer of a Watch, on a connection
    /// of its own that the counts leave out too.
    async fn warm_up(&self) -> Result<()> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.peer.address))?
            .connect()
            .await?;
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut health = HealthClient::new(channel);
        health.check(HealthCheckRequest::default()).await?;
        let mut watch = health.watch(HealthCheckRequest::default()).await?.into_inner();
        watch.message().await?;
        Ok(())
    }
}

/// Warms every peer up; the readers then count only the other connections.
async fn warmed<'a>(peers: &'a [PeerServer]) -> Result<Vec<CountersReader<'a>>> {
    let readers: Vec<CountersReader> = peers.iter().map(CountersReader::new).collect();
    for reader in &readers {
        reader.warm_up().await?;
    }
    Ok(readers)
}

/// 8 callers through a kubegrpc channel over 3 servers that age their connections every 2s:
/// until each server has rotated at least 12 connections (about 30s).
async fn client_over_ageing_servers(language: PeerLanguage) -> Result<()> {
    let s = Scenario::new(&format!("client-age-{}", language.to_string().replace("grpc-", ""))).await?;
    let ageing = PeerOptions {
        max_connection_age: Some(Duration::from_secs(2)),
        max_connection_age_grace: Some(Duration::from_secs(5)),
        ..PeerOptions::default()
    };
    let peers = start_peers(language, 3, &ageing).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let addresses: Vec<SocketAddr> = peers.iter().map(|p| p.address).collect();
    s.publish_serving("echo", &addresses).await?;
    // Evidence-based ejection armed for 3 endpoints: a rotation counted as a failure would
    // eject within an interval.
    let outliers = OutlierDetection {
        interval: Duration::from_secs(1),
        failure_percentage: Some(FailurePercentage {
            threshold: 5,
            minimum_hosts: 3,
            request_volume: 10,
        }),
        ..OutlierDetection::default()
    };
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .outlier_detection(outliers)
        .connect()
        .await?;
    wait_snapshot(&channel, "3 in rotation", DEADLINE, |s| {
        s.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;
    let reading: Vec<CountersReader> = peers.iter().map(CountersReader::new).collect();
    let mut before = Vec::new();
    for peer in &reading {
        before.push(peer.read().await?.requests);
    }

    let load = Load::start(channel.clone(), 8);
    let reading = &reading;
    wait::until(
        "12 connection rotations at every server",
        Duration::from_secs(90),
        || async move {
            let mut done = true;
            for peer in reading {
                done &= peer.read().await?.connections_accepted >= 12;
            }
            Ok(done.then_some(()))
        },
    )
    .await?;
    let counts = load.stop().await;

    let mut served = Vec::new();
    for (peer, before) in reading.iter().zip(before) {
        let stats = peer.read().await?;
        served.push((stats.requests - before, stats.connections_accepted));
    }
    let total: u64 = served.iter().map(|(r, _)| r).sum();
    let snapshot = channel.snapshot();
    println!(
        "{language}, MaxConnectionAge 2s grace 5s, 8 callers: {} succeeded, {} failed; per server (requests, connections): {served:?}; ejections {:?}",
        counts.succeeded(),
        counts.failed(),
        snapshot.endpoints.iter().map(|e| e.ejections).collect::<Vec<_>>()
    );
    assert_eq!(counts.failed(), 0, "failures: {:?}", counts.failures());
    assert!(
        snapshot.endpoints.iter().all(|e| e.ejections == 0),
        "rotation never ejects: {snapshot:?}"
    );
    assert_eq!(total, counts.succeeded(), "every request counted at a server");
    for (requests, _) in &served {
        let share = *requests as f64 / total as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.05,
            "{language}: shares {served:?} should each be within 5 points of a third"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_over_ageing_grpc_go_servers_fails_nothing_and_ejects_nothing() -> Result<()> {
    client_over_ageing_servers(PeerLanguage::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_over_ageing_grpc_java_servers_fails_nothing_and_ejects_nothing() -> Result<()> {
    client_over_ageing_servers(PeerLanguage::Java).await
}
