//! The grpc-go and grpc-java peer servers (tests/peers/) against tonic clients: they speak our
//! Echo service and their library's health service, and their counters are exact, including
//! `too_many_pings` (proved by a negative control: the same pinging client with and without the
//! library's default keepalive enforcement) and connection rotation by MaxConnectionAge.
//!
//! Needs `KUBEGRPC_PEERS_DIR` (`make test` sets it) and the network namespace; no control plane.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use kubegrpc_echo::{EchoClient, EchoRequest, StatsReply, StatsRequest};
use kubegrpc_tests::{
    peers::{PeerLanguage, PeerOptions, PeerServer, start_peers},
    wait,
};
use tokio::time::Instant;
use tonic::{
    Code, Streaming,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

// === Echo, health and the counters ===

#[tokio::test]
async fn grpc_go_serves_echo_and_health_with_exact_counters() -> Result<()> {
    echo_health_and_counters(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_serves_echo_and_health_with_exact_counters() -> Result<()> {
    echo_health_and_counters(PeerLanguage::Java).await
}

async fn echo_health_and_counters(language: PeerLanguage) -> Result<()> {
    let peer = start_one(language, &PeerOptions::default()).await?;
    let channel = connect(peer.address).await?;
    let mut echo = EchoClient::new(channel.clone());

    // Echo answers with the server's own address, and Stats counts what was answered.
    let reply = echo.echo(echo_request("hello", 0)).await?.into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.backend, peer.address.to_string(), "{language}: the backend field");
    let started = Instant::now();
    echo.echo(echo_request("slow", 300)).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{language}: delay_ms is honoured"
    );
    assert_eq!(
        stats_on(&channel).await?.requests,
        2,
        "{language}: requests after two Echo calls"
    );

    // A delayed call whose deadline passes is cancelled on the server and never counted. The
    // barrier: a call with the same delay started later has been answered, so the cancelled one
    // would have been answered and counted by then if the server had not cancelled it.
    let mut doomed = tonic::Request::new(echo_request("too late", 1_500));
    doomed.set_timeout(Duration::from_millis(200));
    let error = echo.echo(doomed).await.expect_err("the deadline passes first");
    // tonic enforces the deadline locally too ("Timeout expired", CANCELLED, and resets the
    // stream) and may beat the server's DEADLINE_EXCEEDED.
    assert!(
        matches!(error.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{language}: {error:?}"
    );
    echo.echo(echo_request("barrier", 1_500)).await?;
    assert_eq!(
        stats_on(&channel).await?.requests,
        3,
        "{language}: the cancelled call is not counted"
    );

    // Health/Check and an open Health/Watch see SetHealth at once; both are counted.
    assert_eq!(check(&channel, "").await?, ServingStatus::Serving);
    let mut watch = open_watch(&channel, "").await?;
    assert_eq!(next_status(&mut watch).await?, ServingStatus::Serving);
    wait_for_stats(&channel, "one open health Watch", |s| s.health_watches_open == 1).await?;
    peer.set_serving("", false).await?;
    assert_eq!(
        next_status(&mut watch).await?,
        ServingStatus::NotServing,
        "{language}: the Watch sees the flip"
    );
    assert_eq!(check(&channel, "").await?, ServingStatus::NotServing);
    let named = "kubegrpc.echo.v1.Echo";
    peer.set_serving(named, true).await?;
    assert_eq!(check(&channel, named).await?, ServingStatus::Serving);
    let unknown = check(&channel, "no.such.Service")
        .await
        .expect_err("an unknown service");
    let unknown = unknown.downcast::<tonic::Status>()?;
    assert_eq!(unknown.code(), Code::NotFound, "{language}: {unknown:?}");
    let stats = stats_on(&channel).await?;
    assert_eq!(stats.health_checks, 4, "{language}: Health/Check calls: {stats:?}");
    assert_eq!(stats.health_watches_open, 1, "{language}: {stats:?}");
    drop(watch);
    wait_for_stats(&channel, "the cancelled Watch counted closed", |s| {
        s.health_watches_open == 0
    })
    .await?;

    // Connections: this channel's, plus one per set_serving call (each connects anew); those
    // closed when their clients were dropped.
    let stats = wait_for_stats(&channel, "only this channel's connection open", |s| {
        s.connections_open == 1
    })
    .await?;
    assert_eq!(
        stats.connections_accepted, 3,
        "{language}: connections accepted: {stats:?}"
    );
    assert_eq!(stats.too_many_pings, 0, "{language}: {stats:?}");

    // SIGTERM: every health status NOT_SERVING first, then a graceful stop.
    peer.set_serving("", true).await?;
    let mut watch = open_watch(&channel, "").await?;
    assert_eq!(next_status(&mut watch).await?, ServingStatus::Serving);
    peer.process.signal(libc::SIGTERM)?;
    assert_eq!(
        next_status(&mut watch).await?,
        ServingStatus::NotServing,
        "{language}: SIGTERM sets NOT_SERVING before stopping"
    );
    drop(watch); // the graceful stop waits for open streams
    let status = wait::until("the peer to exit after SIGTERM", Duration::from_secs(15), || async {
        Ok(peer.process.try_exit_status())
    })
    .await?;
    println!("{language}: exited after SIGTERM with {status}");
    Ok(())
}

// === too_many_pings: the keepalive enforcement counter, with its negative control ===

#[tokio::test]
async fn grpc_go_counts_too_many_pings_only_when_enforcing() -> Result<()> {
    too_many_pings(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_counts_too_many_pings_only_when_enforcing() -> Result<()> {
    too_many_pings(PeerLanguage::Java).await
}

/// A tonic channel that pings every 200 ms, with or without calls.
async fn eager_pinger(address: SocketAddr) -> Result<Channel> {
    Ok(endpoint(address)?
        .http2_keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .connect()
        .await?)
}

async fn too_many_pings(language: PeerLanguage) -> Result<()> {
    // The library's default enforcement (pings at most every 5 minutes): the server sends GOAWAY
    // ENHANCE_YOUR_CALM "too_many_pings" after a few pings and closes the connection, ending the
    // Watch stream held on it.
    let strict = start_one(language, &PeerOptions::default()).await?;
    let channel = eager_pinger(strict.address).await?;
    let mut watch = open_watch(&channel, "").await?;
    assert_eq!(next_status(&mut watch).await?, ServingStatus::Serving);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .with_context(|| format!("{language}: the Watch stream outlived the keepalive enforcement"))?;
    println!(
        "{language}, default enforcement: the Watch stream ended after {:?} with {ended:?}",
        started.elapsed()
    );
    ensure!(
        !matches!(ended, Ok(Some(_))),
        "{language}: the Watch stream sent a message instead of ending: {ended:?}"
    );
    let stats = wait::until("too_many_pings >= 1", Duration::from_secs(10), || async {
        let stats = strict.stats().await?;
        Ok((stats.too_many_pings >= 1).then_some(stats))
    })
    .await?;
    // Exact: one pinging connection, one GOAWAY; the channel reconnects only for a new call.
    assert_eq!(stats.too_many_pings, 1, "{language}, default enforcement: {stats:?}");

    // The same client against permissive enforcement: never a GOAWAY, one connection throughout.
    let permissive = start_one(
        language,
        &PeerOptions {
            keepalive_permissive: true,
            ..PeerOptions::default()
        },
    )
    .await?;
    let channel = eager_pinger(permissive.address).await?;
    let mut watch = open_watch(&channel, "").await?;
    assert_eq!(next_status(&mut watch).await?, ServingStatus::Serving);
    // About ten pings; the default enforcement above gave up after three.
    let held = Duration::from_millis(2_500);
    if let Ok(ended) = tokio::time::timeout(held, watch.message()).await {
        bail!("{language}, permissive enforcement: the Watch stream did not stay open: {ended:?}");
    }
    let stats = stats_on(&channel).await?;
    println!("{language}, permissive enforcement after {held:?} of pings: {stats:?}");
    assert_eq!(stats.too_many_pings, 0, "{language}, permissive: {stats:?}");
    assert_eq!(stats.connections_accepted, 1, "{language}, permissive: {stats:?}");
    assert_eq!(stats.health_watches_open, 1, "{language}, permissive: {stats:?}");
    Ok(())
}

// === MaxConnectionAge rotates connections ===

#[tokio::test]
async fn grpc_go_max_connection_age_rotates_connections() -> Result<()> {
    max_connection_age(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_max_connection_age_rotates_connections() -> Result<()> {
    max_connection_age(PeerLanguage::Java).await
}

async fn max_connection_age(language: PeerLanguage) -> Result<()> {
    let options = PeerOptions {
        max_connection_age: Some(Duration::from_secs(1)),
        max_connection_age_grace: Some(Duration::from_secs(1)),
        ..PeerOptions::default()
    };
    let peer = start_one(language, &options).await?;

    // A Watch stream never finishes by itself: the grace ends it, forcefully.
    let watch_channel = connect(peer.address).await?;
    let mut watch = open_watch(&watch_channel, "").await?;
    assert_eq!(next_status(&mut watch).await?, ServingStatus::Serving);
    let watch_started = Instant::now();

    // Echo calls in a loop on one channel; Stats goes through the same channel, so every
    // connection the server accepted is one the loop's channel made.
    let channel = connect(peer.address).await?;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let running = Arc::new(AtomicBool::new(true));
    let caller = tokio::spawn({
        let mut echo = EchoClient::new(channel.clone());
        let (outcomes, running) = (outcomes.clone(), running.clone());
        async move {
            while running.load(Ordering::SeqCst) {
                let result = echo.echo(echo_request("again", 5)).await;
                let mut outcomes = outcomes.lock().unwrap();
                match result {
                    Ok(_) => outcomes.ok += 1,
                    Err(status) => outcomes
                        .errors
                        .push(format!("{:?}: {}", status.code(), status.message())),
                }
            }
        }
    });
    let rotated = wait_for_stats(&channel, "three connections accepted", |s| s.connections_accepted >= 3).await;
    running.store(false, Ordering::SeqCst);
    caller.await?;
    let stats = rotated?;
    let outcomes = outcomes.lock().unwrap().clone();
    println!(
        "{language}, max connection age 1s + grace 1s: {stats:?}; Echo calls: {} ok, {} failed {:?}",
        outcomes.ok,
        outcomes.errors.len(),
        outcomes.errors
    );
    assert!(outcomes.ok > 0, "{language}: no Echo call succeeded");
    // Rotated connections close once their calls are done (at the latest after the grace).
    wait_for_stats(&channel, "the rotated connections closed", |s| s.connections_open == 1).await?;

    let ended = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .with_context(|| format!("{language}: the Watch stream outlived max connection age + grace"))?;
    println!(
        "{language}: the Watch stream ended {:?} after it opened, with {ended:?}",
        watch_started.elapsed()
    );
    ensure!(
        !matches!(ended, Ok(Some(_))),
        "{language}: the Watch stream sent a message instead of ending: {ended:?}"
    );
    Ok(())
}

#[derive(Clone, Debug, Default)]
struct Outcomes {
    ok: u64,
    errors: Vec<String>,
}

// === helpers ===

async fn start_one(language: PeerLanguage, options: &PeerOptions) -> Result<PeerServer> {
    let mut peers = start_peers(language, 1, options).await?;
    peers.pop().context("start_peers started no peer")
}

fn endpoint(address: SocketAddr) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?.connect_timeout(Duration::from_secs(5)))
}

async fn connect(address: SocketAddr) -> Result<Channel> {
    Ok(endpoint(address)?.connect().await?)
}

fn echo_request(message: &str, delay_ms: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        delay_ms,
    }
}

/// Stats through `channel`, so that no new connection is counted.
async fn stats_on(channel: &Channel) -> Result<StatsReply> {
    Ok(EchoClient::new(channel.clone())
        .stats(StatsRequest {})
        .await?
        .into_inner())
}

/// Waits (10 s at most) until the Stats read through `channel` satisfy `done`.
async fn wait_for_stats(channel: &Channel, what: &str, done: impl Fn(&StatsReply) -> bool) -> Result<StatsReply> {
    wait::until(what, Duration::from_secs(10), || async {
        let stats = stats_on(channel).await?;
        Ok(done(&stats).then_some(stats))
    })
    .await
}

async fn check(channel: &Channel, service: &str) -> Result<ServingStatus> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(reply.status())
}

async fn open_watch(channel: &Channel, service: &str) -> Result<Streaming<HealthCheckResponse>> {
    Ok(HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner())
}

/// The next status a Watch stream sends (within 10 s).
async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> Result<ServingStatus> {
    let message = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .context("no health update within 10 s")??
        .context("the Watch stream ended")?;
    Ok(message.status())
}
