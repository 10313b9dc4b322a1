//! The client under faults: the Kubernetes API going away, the operator frozen while a backend
//! dies. Requests flow the whole time; the backends count what they receive.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::Result;
use kubegrpc::{Channel, DiscoveryState};
use kubegrpc_echo::{Backend, BackendOptions};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{BACKEND_PORT, BackendProcess, built_binary, next_backend_ip, start_backend, start_backends},
    load::Load,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    operator::InProcessOperator,
    process::ManagedProcess,
    scenario::{Scenario, wait_snapshot},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn ready(backends: &[Backend]) -> Vec<SliceEndpoint> {
    backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_apiserver_down_the_client_keeps_serving_and_follows_again_after() -> Result<()> {
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "api-down").await?;
    let _operator = InProcessOperator::start(client.clone(), &namespace);
    let mut backends = start_backends(3).await?;
    create_service(&client, &namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(&client, &namespace, "echo", "echo-1", "grpc", &ready(&backends)).await?;
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;

    let channel = Channel::builder(client.clone(), &namespace, "echo").connect().await?;
    wait_snapshot(&channel, "3 in rotation", DEADLINE, |s| {
        s.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;
    let load = Load::start(channel.clone(), 8);
    load.wait_for_more(1000, DEADLINE).await?;

    let before_stop = load.counts.succeeded();
    control_plane.stop_apiserver();
    wait_snapshot(
        &channel,
        "the client to notice the API is gone",
        Duration::from_secs(60),
        |s| matches!(s.discovery, DiscoveryState::Stale { .. }),
    )
    .await?;
    load.wait_for_more(3000, DEADLINE).await?;
    let served_while_down = load.counts.succeeded() - before_stop;
    assert_eq!(
        load.counts.failed(),
        0,
        "failures with the API down: {:?}",
        load.counts.failures()
    );
    assert_eq!(
        channel.snapshot().endpoints.iter().filter(|e| e.in_rotation).count(),
        3,
        "the last known endpoints stay in use"
    );

    control_plane.start_apiserver().await?;
    let joining = start_backend(BackendOptions::default()).await?;
    let joined = joining.address;
    backends.push(joining);
    apply_slice(&client, &namespace, "echo", "echo-1", "grpc", &ready(&backends)).await?;
    wait_snapshot(
        &channel,
        "the new endpoint after the API came back",
        Duration::from_secs(90),
        |s| s.discovery == DiscoveryState::Synced && s.endpoint(&joined).is_some_and(|e| e.in_rotation),
    )
    .await?;
    load.wait_for_more(2000, DEADLINE).await?;
    let counts = load.stop().await;
    assert_eq!(counts.failed(), 0, "failures: {:?}", counts.failures());
    assert!(backends[3].counters.snapshot().requests > 0);
    println!(
        "apiserver stopped and restarted under load: {} requests, {served_while_down} of them served with the API \
         down, 0 failed",
        counts.succeeded()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_operator_frozen_the_client_ejects_a_killed_backend_itself() -> Result<()> {
    let s = Scenario::new("frozen-operator").await?;
    let addresses: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from((next_backend_ip(), BACKEND_PORT)))
        .collect();
    let mut processes = Vec::new();
    for address in &addresses {
        processes.push(BackendProcess::start(*address, &[]).await?);
    }
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let endpoints: Vec<SliceEndpoint> = addresses.iter().map(|a| SliceEndpoint::ready(*a)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    let mut command = Command::new(built_binary("kubegrpc-operator")?);
    command.arg("--kubeconfig").arg(s.control_plane.kubeconfig()).args([
        "--namespace",
        &s.namespace,
        "--metrics-address",
        "127.0.0.1:0",
    ]);
    let log = std::env::temp_dir().join(format!("operator-{}.log", s.namespace));
    let operator = ManagedProcess::start("kubegrpc-operator", command, &log)?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    wait_snapshot(&channel, "3 in rotation", DEADLINE, |snapshot| {
        snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;
    let concurrency = 8;
    let load = Load::start(channel.clone(), concurrency);
    load.wait_for_more(1000, DEADLINE).await?;

    // The operator cannot publish anything now: only the client can notice the dead backend.
    operator.signal(libc::SIGSTOP)?;
    let killed = addresses[0];
    processes[0].process.signal(libc::SIGKILL)?;
    wait_snapshot(
        &channel,
        "the killed backend ejected by the client",
        DEADLINE,
        |snapshot| snapshot.endpoint(&killed).is_some_and(|e| e.ejected && !e.in_rotation),
    )
    .await?;
    let failed_by_ejection = load.counts.failed();
    load.wait_for_more(3000, DEADLINE).await?;
    let counts = load.stop().await;
    operator.signal(libc::SIGCONT)?;

    let snapshot = channel.snapshot();
    let weight_in_status = snapshot.endpoint(&killed).map(|e| e.weight);
    println!(
        "backend killed with the operator frozen: {} requests, {} failed (all before the ejection: {failed_by_ejection}); \
         status still said weight {weight_in_status:?}; failures: {:?}",
        counts.succeeded(),
        counts.failed(),
        counts
            .failures()
            .iter()
            .map(|s| s.message().to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        weight_in_status,
        Some(100),
        "the operator was frozen: the status still lists it usable"
    );
    assert_eq!(
        counts.failed(),
        failed_by_ejection,
        "requests failed after the ejection"
    );
    assert!(
        counts.failed() <= concurrency as u64,
        "only requests in flight on the killed backend may fail, not {}",
        counts.failed()
    );
    Ok(())
}
