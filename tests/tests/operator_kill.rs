//! The only operator replica SIGKILLed and restarted under load, twice. Clients keep the
//! last-known endpoints while it is gone, so no request fails. Restarted with nothing changed,
//! its probers start from the published health and it writes nothing; restarted after changes
//! made while it was down (a backend turned NOT_SERVING, a new endpoint), it catches up, and the
//! clients follow (counted at the backends).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use kubegrpc::Channel;
use kubegrpc_crds::Health;
use kubegrpc_echo::{BackendOptions, ServingStatus};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{addresses_of, start_backend, start_backends},
    install::{apply_deploy, free_local_address, http_get, metric_series, operator_kubeconfig, start_operator_process},
    load::RateLoad,
    process::ManagedProcess,
    scenario::{Scenario, assert_unchanged, endpoint},
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
/// Requests per second through the client, a rate this 2-core machine sustains next to the
/// control plane.
const RATE: u32 = 200;

/// Probes that answered Serving in the operator process behind `metrics`.
async fn serving_probes(metrics: SocketAddr) -> Result<u64> {
    let series = metric_series(&http_get(metrics, "/metrics").await?);
    let serving = series.get("kubegrpc_probes_total{result=\"Serving\"}");
    Ok(serving.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_operator_restarts_under_load_without_a_failed_request_or_a_needless_write() -> Result<()> {
    let control_plane: &'static ControlPlane =
        Box::leak(Box::new(ControlPlane::start(ControlPlaneOptions::default()).await?));
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "opkill").await?;
    let s = Scenario {
        control_plane,
        client: client.clone(),
        namespace: namespace.clone(),
    };
    apply_deploy(control_plane).await?;
    let kubeconfig = operator_kubeconfig(control_plane).await?;

    let mut backends = start_backends(3).await?;
    s.echo_service(&addresses_of(&backends)).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    let metrics = free_local_address()?;
    let start = |generation: u32| -> Result<ManagedProcess> {
        start_operator_process(
            control_plane,
            &kubeconfig,
            &namespace,
            &format!("only-{generation}"),
            metrics,
            &[],
        )
    };
    let mut operator = start(0)?;
    s.wait_status("echo", "3 ready", DEADLINE, |st| st.ready_endpoints == 3)
        .await
        .with_context(|| operator.log_tail(20))?;

    let channel = Channel::builder(client.clone(), &namespace, "echo").connect().await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let load = RateLoad::start(channel.clone(), RATE, u64::from(RATE) * 600, Duration::from_secs(600));
    load.wait_for_more(u64::from(RATE), DEADLINE).await?;

    // 1. Killed and restarted with nothing changed: no write.
    let version = s
        .backends()
        .get("echo")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    operator.kill();
    load.wait_for_more(u64::from(RATE), DEADLINE).await?; // a second of load with no operator
    operator = start(1)?;
    wait::until("every endpoint answered the restarted operator", DEADLINE, || async {
        Ok((serving_probes(metrics).await.unwrap_or(0) >= 3).then_some(()))
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    // Past the status write interval (1 s) after every first answer: a write would show.
    assert_unchanged(&s.backends(), "echo", &version, Duration::from_secs(3))
        .await
        .with_context(|| operator.log_tail(20))?;

    // 2. Killed; while it is gone a backend turns NOT_SERVING and a fourth endpoint joins.
    // The clients keep sending to the three they know (NOT_SERVING still answers).
    operator.kill();
    let flipped = backends[0].address;
    backends[0].health.set("", ServingStatus::NotServing);
    let joining = start_backend(BackendOptions::default()).await?;
    let joined = joining.address;
    backends.push(joining);
    s.echo_slice(&addresses_of(&backends)).await?;
    load.wait_for_more(u64::from(RATE), DEADLINE).await?;
    assert_unchanged(&s.backends(), "echo", &version, Duration::from_secs(1)).await?;

    operator = start(2)?;
    s.wait_status("echo", "the restarted operator catching up", DEADLINE, |st| {
        st.ready_endpoints == 3
            && endpoint(st, &flipped).is_some_and(|e| e.health == Health::NotServing)
            && endpoint(st, &joined).is_some_and(|e| e.health == Health::Serving)
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    // The client follows: the NOT_SERVING backend gets nothing more once the client has the
    // new status and its requests in flight ended, and the new one gets requests.
    wait::until("the client following the new status", DEADLINE, || async {
        let snapshot = channel.snapshot();
        let follows = snapshot.endpoints.iter().any(|e| e.address == joined && e.in_rotation)
            && snapshot
                .endpoints
                .iter()
                .all(|e| e.address != flipped || (!e.in_rotation && e.in_flight == 0));
        Ok(follows.then_some(()))
    })
    .await?;
    let flipped_before = backends[0].counters.snapshot().requests;
    let joined_before = backends[3].counters.snapshot().requests;
    load.wait_for_more(2 * u64::from(RATE), DEADLINE).await?;
    let report = load.stop().await;
    let flipped_after = backends[0].counters.snapshot().requests;
    let joined_after = backends[3].counters.snapshot().requests;
    operator.stop(Duration::from_secs(10));

    println!(
        "operator killed twice under load: {} requests sent, {} failed {:?}; after the catch-up the NOT_SERVING \
         backend served {} more, the new one {}",
        report.sent,
        report.failed,
        report.failed_by_code,
        flipped_after - flipped_before,
        joined_after - joined_before,
    );
    assert_eq!(
        report.failed, 0,
        "failed per code {:?}: {:?}",
        report.failed_by_code, report.failures
    );
    assert_eq!(
        flipped_after, flipped_before,
        "the NOT_SERVING backend still got requests"
    );
    assert!(joined_after > joined_before, "the new backend got no requests");
    Ok(())
}
