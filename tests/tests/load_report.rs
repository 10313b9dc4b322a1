//! The `LoadReport` policy end to end: backends of capacities 1:1:2 (worker slots, the same
//! work per request) report their measured load over ORCA's out-of-band stream; the operator
//! turns the reports into weights (gRFC A58) once for every client; the backends count the
//! shares they receive.
//!
//! Each backend reports utilization = its slots' busy time / (elapsed x slots), a measure of
//! load and not a constant: a constant would feed back (more weight, more requests, the same
//! utilization, more weight) and starve the others. With the same work per request,
//! qps / utilization = slots / work, so the weights follow the capacities whatever the shares.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use kubegrpc::Channel;
use kubegrpc_crds::{GrpcBackend, GrpcBackendStatus};
use kubegrpc_echo::{Backend, BackendOptions};
use kubegrpc_tests::{
    backends::start_backend,
    load::RateLoad,
    objects::{SliceEndpoint, apply_slice, create_service},
    operator::InProcessOperator,
    peers::{PeerLanguage, PeerOptions, start_peers},
    scenario::{Scenario, assert_unchanged, endpoint, wait_snapshot},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
/// Worker slots of the three backends, and the time a request holds one.
const SLOTS: [usize; 3] = [1, 1, 2];
const WORK: Duration = Duration::from_millis(20);
/// 60% of the total capacity (200 requests per second).
const RATE: u32 = 120;

fn weights(status: &GrpcBackendStatus, addresses: &[SocketAddr]) -> Vec<u32> {
    addresses
        .iter()
        .map(|a| endpoint(status, a).map_or(0, |e| e.weight))
        .collect()
}

/// The weights converged to the capacities: the strong backend about twice the others.
fn converged(weights: &[u32]) -> bool {
    let ratio = |a: u32, b: u32| f64::from(a) / f64::from(b.max(1));
    weights.len() == 3
        && (ratio(weights[2], weights[0]) - 2.0).abs() < 0.3
        && (ratio(weights[2], weights[1]) - 2.0).abs() < 0.3
}

/// Each backend's share of what the backends counted.
fn shares_of(served: &[u64]) -> Vec<f64> {
    let total: u64 = served.iter().sum();
    served.iter().map(|c| *c as f64 / total.max(1) as f64).collect()
}

fn assert_shares(shares: &[f64]) {
    for (share, expected) in shares.iter().zip([0.25, 0.25, 0.5]) {
        assert!(
            (share - expected).abs() <= 0.05,
            "shares {shares:.3?}, expected 25/25/50% within 5 points"
        );
    }
}

async fn service_of(s: &Scenario, addresses: &[SocketAddr], load_report: serde_json::Value) -> Result<()> {
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let slice: Vec<SliceEndpoint> = addresses.iter().map(|a| SliceEndpoint::ready(*a)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc",
               "weighting": {"policy": "LoadReport", "loadReport": load_report}}),
    )
    .await?;
    Ok(())
}

/// A client's load at [`RATE`] (the load holds the client's channel), once the published weights follow the capacities and the
/// client uses them.
/// Watches GrpcBackend `echo` from `resource_version` for `window` and checks that each status
/// written meanwhile moved some weight of `addresses` by more than 10% from the one published
/// before it (the LoadReport hysteresis); returns how many were written and the latest
/// resourceVersion.
async fn writes_only_past_the_hysteresis(
    s: &Scenario,
    addresses: &[SocketAddr],
    resource_version: &str,
    published: &[u32],
    window: Duration,
) -> Result<(u64, String)> {
    use futures::StreamExt;
    let params = kube::api::WatchParams::default()
        .fields("metadata.name=echo")
        .timeout(window.as_secs().max(1) as u32);
    let mut events = s.backends().watch(&params, resource_version).await?.boxed();
    let mut before = published.to_vec();
    let mut writes = 0;
    let mut latest = resource_version.to_string();
    while let Some(event) = events.next().await {
        match event? {
            kube::api::WatchEvent::Bookmark(_) => {}
            kube::api::WatchEvent::Modified(changed) => {
                let status = changed.status.unwrap_or_default();
                let now = weights(&status, addresses);
                let moved = now
                    .iter()
                    .zip(&before)
                    .any(|(new, old)| u64::from(new.abs_diff(*old)) * 100 > u64::from(*old) * 10);
                anyhow::ensure!(
                    moved,
                    "a status write moved no weight past the 10% hysteresis: {before:?} -> {now:?}"
                );
                println!("a write under steady load, a weight moved more than 10%: {before:?} -> {now:?}");
                before = now;
                writes += 1;
                latest = changed.metadata.resource_version.unwrap_or(latest);
            }
            other => anyhow::bail!("GrpcBackend echo changed: {other:?}"),
        }
    }
    Ok((writes, latest))
}

struct Converged {
    load: RateLoad,
    backend: GrpcBackend,
    published: Vec<u32>,
}

async fn load_until_converged(
    s: &Scenario,
    addresses: &[SocketAddr],
    what: &str,
    deadline: Duration,
) -> Result<Converged> {
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    wait_snapshot(&channel, "3 endpoints in rotation", DEADLINE, |snapshot| {
        snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;
    // Load at 60% of the capacity: reports carry it, the weights follow after the blackout.
    let load = RateLoad::start(channel.clone(), RATE, u64::MAX, Duration::from_secs(300));
    let backend = s
        .wait_status("echo", what, deadline, |status| converged(&weights(status, addresses)))
        .await?;
    let published = weights(backend.status.as_ref().expect("a status"), addresses);
    wait_snapshot(&channel, "the client on the new weights", DEADLINE, |snapshot| {
        addresses
            .iter()
            .zip(&published)
            .all(|(a, w)| snapshot.endpoint(a).is_some_and(|e| e.weight == *w))
    })
    .await?;
    Ok(Converged {
        load,
        backend,
        published,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn tonic_backends_reporting_their_load_get_shares_by_capacity_and_a_steady_load_writes_nothing() -> Result<()> {
    let s = Scenario::new("load-report").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let mut backends: Vec<Backend> = Vec::new();
    for slots in SLOTS {
        backends.push(
            start_backend(BackendOptions {
                capacity: Some(slots),
                work: WORK,
                orca: true,
                ..Default::default()
            })
            .await?,
        );
    }
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    service_of(
        &s,
        &addresses,
        json!({"reportInterval": "1s", "blackoutPeriod": "2s", "weightExpirationPeriod": "5s"}),
    )
    .await?;
    let Converged {
        load,
        backend,
        published,
    } = load_until_converged(&s, &addresses, "weights by capacity (about 1:1:2)", DEADLINE).await?;
    let served_before: Vec<u64> = backends.iter().map(|b| b.counters.snapshot().requests).collect();
    let writes_before = operator.status_writes(&s.namespace, "echo");
    let resource_version = backend.metadata.resource_version.clone().unwrap_or_default();

    // 60 s of the same load with the same capacities. The reports are measurements and a busy
    // machine makes them noisy, so what is asserted is the mechanism: the operator writes only
    // when some weight moved more than its 10% hysteresis from the published one (on a quiet
    // machine, that is never: no write at all).
    let (moves, resource_version) =
        writes_only_past_the_hysteresis(&s, &addresses, &resource_version, &published, Duration::from_secs(60)).await?;
    let served: Vec<u64> = backends
        .iter()
        .zip(&served_before)
        .map(|(b, before)| b.counters.snapshot().requests - before)
        .collect();
    let shares = shares_of(&served);
    println!(
        "LoadReport, tonic backends of slots {SLOTS:?}: weights {published:?}, shares over 60 s {shares:.3?}, \
         {} status writes",
        operator.status_writes(&s.namespace, "echo") - writes_before
    );
    assert_shares(&shares);
    assert_eq!(
        operator.status_writes(&s.namespace, "echo") - writes_before,
        moves,
        "every write in the window moved a weight past the hysteresis"
    );

    // The operator restarts under the same load: its new probers have no valid weight for a
    // blackout, meanwhile the published weights stand (not the mean), and then they agree with
    // the new reports: no write at all.
    operator.stop().await;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    assert_unchanged(&s.backends(), "echo", &resource_version, Duration::from_secs(10)).await?;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);

    // Reports stop (the backends end their ORCA streams and the load stops, so nothing new is
    // reported): the weights expire and every endpoint gets the mean again.
    for backend in &backends {
        backend.end_load_reports();
    }
    s.wait_status("echo", "weights expired to the mean", DEADLINE, |status| {
        weights(status, &addresses) == [100, 100, 100]
    })
    .await?;
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_backends_reporting_through_their_orca_package_get_the_same_shares() -> Result<()> {
    let s = Scenario::new("load-report-go").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let mut peers = Vec::new();
    for slots in SLOTS {
        let options = PeerOptions {
            capacity: Some(slots),
            work: Some(WORK),
            orca: true,
            ..Default::default()
        };
        peers.extend(start_peers(PeerLanguage::Go, 1, &options).await?);
    }
    let addresses: Vec<SocketAddr> = peers.iter().map(|p| p.address).collect();
    // grpc-go's orca package sends at most one report per 30 s: the weights need one report
    // made under load, so the expiration must outlast the gap.
    service_of(&s, &addresses, json!({"reportInterval": "1s", "blackoutPeriod": "2s"})).await?;
    let Converged { load, published, .. } = load_until_converged(
        &s,
        &addresses,
        "weights by capacity from grpc-go's reports (one per 30 s)",
        Duration::from_secs(120),
    )
    .await?;
    let mut served_before = Vec::new();
    for peer in &peers {
        served_before.push(peer.stats().await?.requests);
    }
    let before = load.report();
    load.wait_for_more(u64::from(RATE) * 20, DEADLINE).await?;
    let report = load.stop().await;
    let mut served = Vec::new();
    for (peer, before) in peers.iter().zip(&served_before) {
        served.push(peer.stats().await?.requests - before);
    }
    let shares = shares_of(&served);
    println!(
        "LoadReport, grpc-go backends of slots {SLOTS:?}: weights {published:?}, shares counted by the peers {shares:.3?}"
    );
    assert_shares(&shares);
    assert_eq!(report.failed, before.failed, "failures: {:?}", report.failures);
    Ok(())
}
