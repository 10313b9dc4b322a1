//! Two operator replicas under their ServiceAccount: only the Lease holder writes status (the
//! apiserver's audit log says who patched, by user agent); when it dies the standby takes over
//! without a visible change, keeps the status following the endpoints, and a client under load
//! sees no failed request.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kubegrpc::Channel;
use kubegrpc_crds::Health;
use kubegrpc_echo::{BackendOptions, ServingStatus};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{start_backend, start_backends},
    install::{OPERATOR_NAMESPACE, apply_deploy, free_local_address, operator_kubeconfig, start_operator_process},
    load::Load,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    scenario::{Scenario, endpoint},
    wait,
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

async fn holder(leases: &Api<Lease>) -> Result<Option<String>> {
    Ok(leases
        .get("kubegrpc-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Status patches of GrpcBackends in `namespace` recorded by the audit log: (user agent,
/// time received).
fn status_patches(audit_log: &std::path::Path, namespace: &str) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(audit_log)?;
    let mut patches = Vec::new();
    for line in text.lines() {
        let entry: Value = serde_json::from_str(line)?;
        let object = &entry["objectRef"];
        if entry["stage"] == "ResponseComplete"
            && entry["verb"] == "patch"
            && object["resource"] == "grpcbackends"
            && object["subresource"] == "status"
            && object["namespace"] == namespace
            && entry["responseStatus"]["code"] == 200
        {
            patches.push((
                entry["userAgent"].as_str().unwrap_or_default().to_string(),
                entry["requestReceivedTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    Ok(patches)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_from_a_killed_leader_invisibly() -> Result<()> {
    let control_plane: &'static ControlPlane = Box::leak(Box::new(
        ControlPlane::start(ControlPlaneOptions {
            audit_log: true,
            ..Default::default()
        })
        .await?,
    ));
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "leader").await?;
    let s = Scenario {
        control_plane,
        client: client.clone(),
        namespace: namespace.clone(),
    };
    apply_deploy(control_plane).await?;
    let kubeconfig = operator_kubeconfig(control_plane).await?;

    let mut backends = start_backends(3).await?;
    create_service(&client, &namespace, "echo", &[("grpc", 80)]).await?;
    let slice = |backends: &[kubegrpc_echo::Backend]| -> Vec<SliceEndpoint> {
        backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect()
    };
    apply_slice(&client, &namespace, "echo", "echo-1", "grpc", &slice(&backends)).await?;
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;

    let election = [
        "--leader-elect",
        "--lease-namespace",
        OPERATOR_NAMESPACE,
        "--lease-duration-seconds",
        "6",
    ];
    let first = start_operator_process(
        control_plane,
        &kubeconfig,
        &namespace,
        "replica-a",
        free_local_address()?,
        &election,
    )?;
    s.wait_status("echo", "3 ready under replica-a", DEADLINE, |st| {
        st.ready_endpoints == 3
    })
    .await
    .with_context(|| first.log_tail(20))?;
    let leases = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    assert_eq!(holder(&leases).await?.as_deref(), Some("replica-a"));
    let second = start_operator_process(
        control_plane,
        &kubeconfig,
        &namespace,
        "replica-b",
        free_local_address()?,
        &election,
    )?;
    wait::until("replica-b standing by", DEADLINE, || async {
        Ok(std::fs::read_to_string(second.log_path())?
            .contains("standing by")
            .then_some(()))
    })
    .await?;

    let channel = Channel::builder(client.clone(), &namespace, "echo").connect().await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let load = Load::start(channel.clone(), 8);
    load.wait_for_more(1000, DEADLINE).await?;

    // The leader follows a change.
    let flipped = backends[0].address;
    backends[0].health.set("", ServingStatus::NotServing);
    s.wait_status("echo", "the flip published by replica-a", DEADLINE, |st| {
        endpoint(st, &flipped).is_some_and(|e| e.health == Health::NotServing)
    })
    .await?;

    // Kill the leader: it cannot hand the Lease back; the standby waits for it to expire.
    let killed_at = Instant::now();
    let killed_at_wall = k8s_openapi::jiff::Timestamp::now();
    first.kill();
    wait::until("replica-b to hold the Lease", DEADLINE, || async {
        Ok((holder(&leases).await?.as_deref() == Some("replica-b")).then_some(()))
    })
    .await?;
    let takeover = killed_at.elapsed();
    wait::until("replica-b reconciling", DEADLINE, || async {
        Ok(std::fs::read_to_string(second.log_path())?
            .contains("caches ready")
            .then_some(()))
    })
    .await?;
    // Its probes confirm what is published: nothing to write (no Unknown flash for clients).
    load.wait_for_more(2000, DEADLINE).await?;
    let audit_log = control_plane.audit_log().context("no audit log")?;
    let before_change = status_patches(audit_log, &namespace)?;
    assert!(
        !before_change.iter().any(|(agent, _)| agent.contains("replica-b")),
        "the new leader rewrote an unchanged status: {before_change:?}"
    );

    // The new leader follows changes: the flipped backend back, and a fourth one.
    backends[0].health.set("", ServingStatus::Serving);
    let joining = start_backend(BackendOptions::default()).await?;
    let joined = joining.address;
    backends.push(joining);
    apply_slice(&client, &namespace, "echo", "echo-1", "grpc", &slice(&backends)).await?;
    s.wait_status("echo", "replica-b publishing the changes", DEADLINE, |st| {
        st.ready_endpoints == 4 && endpoint(st, &joined).is_some_and(|e| e.health == Health::Serving)
    })
    .await
    .with_context(|| second.log_tail(20))?;
    load.wait_for_more(2000, DEADLINE).await?;
    let counts = load.stop().await;

    let patches = status_patches(audit_log, &namespace)?;
    let by_a: Vec<&(String, String)> = patches
        .iter()
        .filter(|(agent, _)| agent.contains("(replica-a)"))
        .collect();
    let by_b: Vec<&(String, String)> = patches
        .iter()
        .filter(|(agent, _)| agent.contains("(replica-b)"))
        .collect();
    assert_eq!(
        by_a.len() + by_b.len(),
        patches.len(),
        "status patched by someone else: {patches:?}"
    );
    assert!(!by_a.is_empty() && !by_b.is_empty(), "{patches:?}");
    let at = |text: &str| {
        text.parse::<k8s_openapi::jiff::Timestamp>()
            .expect("an audit timestamp")
    };
    assert!(
        by_a.iter().all(|(_, t)| at(t) < killed_at_wall),
        "replica-a patched after it was killed: {patches:?}"
    );
    assert!(
        by_b.iter().all(|(_, t)| at(t) > killed_at_wall),
        "replica-b patched while standing by: {patches:?}"
    );
    assert_eq!(counts.failed(), 0, "the client saw failures: {:?}", counts.failures());
    println!(
        "leader killed: replica-b held the Lease {takeover:?} later (Lease duration 6s); status patches: {} by \
         replica-a, {} by replica-b; client: {} requests, 0 failed",
        by_a.len(),
        by_b.len(),
        counts.succeeded()
    );
    second.stop(Duration::from_secs(10));
    Ok(())
}
