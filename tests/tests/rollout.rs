//! Real Deployments changing under load: kube-controller-manager runs the Deployment, the
//! harness' kubelet stand-in runs its Pods as real backends (and drains them on deletion, or
//! kills one as SIGKILL would), the operator health-checks them, and a kubegrpc client sends at
//! a fixed rate throughout.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc::EndpointSnapshot;
use kubegrpc_crds::{EndpointStatus, GrpcBackend, GrpcBackendStatus, Health};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::BACKEND_PORT,
    kubelet::Kubelet,
    load::{RateLoad, RateLoadReport},
    objects::{ECHO_SELECTOR, create_echo_deployment_service, create_grpc_backend, echo_deployment},
    operator::InProcessOperator,
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
/// Five Pods replaced one at a time, each drained for 2 s: well under a minute on 2 cores.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(180);
const RATE: u32 = 200;

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_restart_under_load_fails_no_request_and_every_new_pod_serves() -> Result<()> {
    const REPLICAS: i32 = 5;
    let (cluster, old_pods) = Cluster::start("rollout", REPLICAS).await?;
    let load = start_load(&cluster.channel).await?;

    // What `kubectl rollout restart` does.
    let restarted_at = k8s_openapi::jiff::Timestamp::now().to_string();
    cluster
        .deployments
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": restarted_at
            }}}}})),
        )
        .await?;
    println!("rollout restart at {restarted_at}");

    // Rolled out: every replica updated and ready, and only new Pods left, none terminating
    // (the old ones drained and removed by the kubelet stand-in).
    let old_ref = &old_pods;
    let new_pods = cluster
        .wait_rolled_out("the rollout to complete", REPLICAS, move |names| {
            names.is_disjoint(old_ref)
        })
        .await?;
    println!("rolled out: new pods {new_pods:?}");

    // The operator publishes the new Pods, then the load goes on ~2 s over them.
    cluster
        .wait_status_lists("the 5 new pods, and only them, ready", &new_pods)
        .await?;
    load.wait_for_more(2 * u64::from(RATE), DEADLINE).await?;
    let report = load.stop().await;

    print_report(&report, &cluster.kubelet, &new_pods);
    assert_no_failure(&report);
    assert_every_pod_served(&cluster.kubelet, &new_pods, "new pod");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_3_to_10_to_2_under_load_fails_no_request_and_every_new_pod_serves() -> Result<()> {
    let (cluster, old_pods) = Cluster::start("scaling", 3).await?;
    let load = start_load(&cluster.channel).await?;

    // Scale out to 10: what `kubectl scale --replicas 10` does, through the scale subresource.
    cluster.scale(10).await?;
    let ten = cluster.wait_rolled_out("10 ready replicas", 10, |_| true).await?;
    let new_pods: BTreeSet<String> = ten.difference(&old_pods).cloned().collect();
    ensure!(
        new_pods.len() == 7 && old_pods.is_subset(&ten),
        "scaling out replaced pods: before {old_pods:?}, after {ten:?}"
    );
    cluster.wait_status_lists("the 10 pods, all usable", &ten).await?;
    println!(
        "scaled out to 10 after {} requests: new pods {new_pods:?}",
        load.report().sent
    );

    // Load on until each of the 10 has served requests, as counted at its backend.
    let kubelet = &cluster.kubelet;
    let ten_ref = &ten;
    wait::until("every one of the 10 pods to serve", DEADLINE, move || async move {
        let served = kubelet.served();
        Ok(ten_ref
            .iter()
            .all(|pod| served.get(pod).is_some_and(|count| *count > 0))
            .then_some(()))
    })
    .await?;
    println!("every one of the 10 pods served, after {} requests", load.report().sent);

    // Scale in to 2: the Deployment controller deletes 8 Pods, which drain and are removed.
    cluster.scale(2).await?;
    let two = cluster
        .wait_rolled_out("2 replicas left, the others drained and removed", 2, |_| true)
        .await?;
    ensure!(two.is_subset(&ten), "scaling in started new pods: {two:?}");
    cluster
        .wait_status_lists("the 2 pods left, and only them, usable", &two)
        .await?;
    println!("scaled in to 2 after {} requests: {two:?} left", load.report().sent);
    load.wait_for_more(2 * u64::from(RATE), DEADLINE).await?;
    let report = load.stop().await;

    print_report(&report, &cluster.kubelet, &new_pods);
    assert_no_failure(&report);
    assert_every_pod_served(&cluster.kubelet, &new_pods, "pod of the scale-out");
    Ok(())
}

/// A Pod's backend dies as with SIGKILL (connections reset, no NOT_SERVING, no drain) under
/// load. Asserted: only requests in flight to it at the kill fail (at most the load's in-flight
/// cap); the client takes it out of rotation on its own evidence (consecutive connection
/// failures: ejection) before the status says it is not usable; it is sent nothing once out of
/// rotation; the other backends keep serving. The status comes from the operator's probes
/// (the broken Watch, then three failed connects 100 and 200 ms apart) or from the kubelet, which
/// notices a dead container when it relists (every second; the stand-in waits as long) and marks
/// the Pod Ready=False: hundreds of milliseconds either way, where the client's ejection (five
/// refused connections at ~67 requests/s to that endpoint) takes tens. With a kubelet that
/// reported the death at once, the status would arrive 35-110 ms after the kill and either
/// could win (measured while this test used such a kubelet: client first in 6 of 10 runs).
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_killed_without_drain_loses_only_requests_in_flight_and_the_client_leaves_it_first() -> Result<()> {
    let (cluster, pods) = Cluster::start("kill", 3).await?;
    let channel = cluster.channel.clone();
    wait::until("the client to have the 3 endpoints in rotation", DEADLINE, || async {
        let snapshot = channel.snapshot();
        Ok((snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 3).then_some(()))
    })
    .await?;
    let load = start_load(&channel).await?;

    let victim = pods.first().context("no pod")?.clone();
    let address = *cluster
        .kubelet
        .addresses()
        .get(&victim)
        .context("the victim's backend address")?;
    ensure!(address.port() == BACKEND_PORT, "{victim} at {address}");

    // Two observers, both started before the kill: the client's own view (polled every
    // millisecond), and the GrpcBackend's status as a watch delivers it.
    let client_observer = tokio::spawn(observe_client(channel.clone(), address));
    let (synced, status_synced) = tokio::sync::oneshot::channel();
    let status_observer = tokio::spawn(observe_status(cluster.gbs.clone(), victim.clone(), synced));
    tokio::time::timeout(DEADLINE, status_synced)
        .await
        .context("the GrpcBackend watch never delivered the object")?
        .context("the GrpcBackend watch ended")?;

    let before = endpoint_of(&channel, address)?;
    let load_before = load.report();
    let killed_at = cluster.kubelet.kill(&victim).await?;
    let after = endpoint_of(&channel, address)?;
    let load_after = load.report();
    let served_at_kill = cluster.kubelet.served();
    println!(
        "killed {victim} at {address}: client in flight to it just before {}, just after {} \
         (all backends: {} before, {} after); it had {} requests from the client",
        before.in_flight,
        after.in_flight,
        in_flight(&load_before),
        in_flight(&load_after),
        before.requests
    );

    let client_seen = tokio::time::timeout(DEADLINE, client_observer)
        .await
        .context("the client never took the killed endpoint out of rotation")??;
    let status_seen = tokio::time::timeout(DEADLINE, status_observer)
        .await
        .context("the status never showed the killed endpoint not usable")???;

    // Traffic goes on over the two others.
    load.wait_for_more(2 * u64::from(RATE), DEADLINE).await?;
    let report = load.stop().await;
    let served = cluster.kubelet.served();
    let end = endpoint_of(&channel, address).ok();

    let since_kill = |at: Instant| at.saturating_duration_since(killed_at);
    println!(
        "requests sent {}, succeeded {}, failed {} {:?}; first failures: {:?}",
        report.sent,
        report.succeeded,
        report.failed,
        report.failed_by_code,
        report
            .failures
            .iter()
            .map(|s| s.message().to_string())
            .collect::<Vec<_>>()
    );
    println!(
        "client left it {:?} after the kill (ejected: {}, its status view then: health {:?}, weight {}, \
         Kubernetes-ready {}; {} requests and {} failures counted on it)",
        since_kill(client_seen.left_at),
        client_seen.left.ejected,
        client_seen.left.health,
        client_seen.left.weight,
        client_seen.left.kubernetes_ready,
        client_seen.left.requests,
        client_seen.left.failures,
    );
    println!(
        "client's copy of the status said it not usable {:?} after the kill",
        client_seen.status_at.map(since_kill)
    );
    println!(
        "status watch first showed it not usable {:?} after the kill: {:?}",
        since_kill(status_seen.0),
        status_seen.1
    );
    for (pod, count) in &served {
        let at_kill = served_at_kill.get(pod).copied().unwrap_or(0);
        let role = if *pod == victim { "killed" } else { "other" };
        println!("  {role} pod {pod}: served {at_kill} until the kill, {count} in all");
    }
    if let Some(end) = &end {
        println!(
            "client's counts on it at the end: {} requests, {} failures, {} ejections, in rotation {}",
            end.requests, end.failures, end.ejections, end.in_rotation
        );
    }

    // Only requests in flight to it at the kill may fail: at most the load's in-flight cap.
    assert!(
        report.failed <= RateLoad::MAX_IN_FLIGHT as u64,
        "{} requests failed, more than could be in flight ({}): {:?}",
        report.failed,
        RateLoad::MAX_IN_FLIGHT,
        report.failed_by_code
    );
    assert_eq!(report.sent, report.succeeded + report.failed);
    // Nothing reached the dead backend after the kill; the two others went on serving.
    assert_eq!(
        served.get(&victim),
        served_at_kill.get(&victim),
        "the killed backend served after its kill"
    );
    for pod in pods.iter().filter(|pod| **pod != victim) {
        let (at_kill, total) = (
            served_at_kill.get(pod).copied().unwrap_or(0),
            served.get(pod).copied().unwrap_or(0),
        );
        assert!(total > at_kill, "pod {pod} served nothing after the kill ({at_kill})");
    }
    // What the client guarantees whatever the order: once out of rotation (ejected or
    // removed), it is sent nothing more.
    let requests_at_end = end.as_ref().map_or(client_seen.left.requests, |e| e.requests);
    assert_eq!(
        requests_at_end, client_seen.left.requests,
        "requests went to the dead endpoint after it left the rotation"
    );
    // The client left it first, on its own evidence.
    let ejected_first =
        client_seen.left.ejected && usable_in_client_view(&client_seen.left) && client_seen.left_at < status_seen.0;
    println!(
        "order: out of the client's rotation {:?} after the kill (ejected: {}, {} failures counted on it), not \
         usable in the status watch {:?} after the kill",
        since_kill(client_seen.left_at),
        client_seen.left.ejected,
        client_seen.left.failures,
        since_kill(status_seen.0),
    );
    assert!(
        ejected_first,
        "the client did not eject the dead endpoint before the status said it was not usable"
    );
    Ok(())
}

// === shared setup ===

/// A control plane with kube-controller-manager, the operator and the kubelet stand-in for one
/// namespace, the echo Service, its GrpcBackend and Deployment, and a ready kubegrpc channel.
/// Fields drop in order: the channel first, the control plane last.
struct Cluster {
    channel: kubegrpc::Channel,
    kubelet: Kubelet,
    _operator: InProcessOperator,
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    gbs: Api<GrpcBackend>,
    _control_plane: ControlPlane,
}

impl Cluster {
    /// Everything up with `replicas` Pods ready in the GrpcBackend's status; returns their names.
    async fn start(prefix: &str, replicas: i32) -> Result<(Self, BTreeSet<String>)> {
        let control_plane = ControlPlane::start(ControlPlaneOptions {
            controller_manager: true,
            ..Default::default()
        })
        .await?;
        let client = control_plane.client().await?;
        let namespace = control_plane.create_namespace(&client, prefix).await?;
        let operator = InProcessOperator::start(client.clone(), &namespace);
        let kubelet = Kubelet::start(client.clone(), &namespace).await?;

        create_echo_deployment_service(&client, &namespace).await?;
        create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;
        let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
        deployments
            .create(&PostParams::default(), &echo_deployment(replicas)?)
            .await?;
        let gbs = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);
        wait_status(&gbs, &format!("{replicas} ready endpoints"), |s| {
            s.ready_endpoints == replicas
        })
        .await?;
        let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
        let names = pod_names(&pods).await?;
        ensure!(names.len() == replicas as usize, "pods at the start: {names:?}");

        let channel = kubegrpc::Channel::builder(client.clone(), &namespace, "echo")
            .connect()
            .await?;
        tokio::time::timeout(DEADLINE, channel.ready())
            .await
            .context("the channel never became ready")?;
        let cluster = Self {
            channel,
            kubelet,
            _operator: operator,
            deployments,
            pods,
            gbs,
            _control_plane: control_plane,
        };
        Ok((cluster, names))
    }

    /// Sets the Deployment's replicas through its `scale` subresource, as `kubectl scale` does.
    async fn scale(&self, replicas: i32) -> Result<()> {
        self.deployments
            .patch_scale(
                "echo",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await?;
        println!("scaled the Deployment to {replicas}");
        Ok(())
    }

    /// Waits until the Deployment has `replicas` updated, ready and available replicas and
    /// exactly `replicas` Pods exist (none terminating: the kubelet stand-in drained and removed
    /// the others) whose names `accept` takes; returns those names.
    async fn wait_rolled_out(
        &self,
        what: &str,
        replicas: i32,
        accept: impl Fn(&BTreeSet<String>) -> bool,
    ) -> Result<BTreeSet<String>> {
        let (deployments, pods, accept) = (&self.deployments, &self.pods, &accept);
        wait::until(what, ROLLOUT_DEADLINE, move || async move {
            let deployment = deployments.get("echo").await?;
            let generation = deployment.metadata.generation;
            let status = deployment.status.unwrap_or_default();
            let done = status.observed_generation >= generation
                && status.replicas == Some(replicas)
                && status.updated_replicas == Some(replicas)
                && status.ready_replicas == Some(replicas)
                && status.available_replicas == Some(replicas);
            if !done {
                return Ok(None);
            }
            let names = pod_names(pods).await?;
            Ok((names.len() == replicas as usize && accept(&names)).then_some(names))
        })
        .await
    }

    /// Waits until the GrpcBackend's status lists exactly `pods`, every one usable.
    async fn wait_status_lists(&self, what: &str, pods: &BTreeSet<String>) -> Result<GrpcBackendStatus> {
        wait_status(&self.gbs, what, move |s| {
            s.total_endpoints == pods.len() as i32 && usable_pods(s) == *pods
        })
        .await
    }
}

/// Starts the fixed-rate load through `channel` and waits until a second of it succeeded.
async fn start_load(channel: &kubegrpc::Channel) -> Result<RateLoad> {
    let load = RateLoad::start(channel.clone(), RATE, u64::from(RATE) * 600, Duration::from_secs(600));
    load.wait_for_more(u64::from(RATE), DEADLINE).await?;
    Ok(load)
}

fn print_report(report: &RateLoadReport, kubelet: &Kubelet, new_pods: &BTreeSet<String>) {
    let served = kubelet.served();
    let addresses = kubelet.addresses();
    println!(
        "requests sent {}, succeeded {}, failed {} {:?}",
        report.sent, report.succeeded, report.failed, report.failed_by_code
    );
    for (pod, count) in &served {
        let age = if new_pods.contains(pod) { "new" } else { "old" };
        let address = addresses.get(pod).map(ToString::to_string).unwrap_or_default();
        let seen = report.by_backend.get(&address).copied().unwrap_or(0);
        println!("  {age} pod {pod} at {address}: served {count} (client saw {seen} answers)");
    }
    println!("served at the backends in total: {}", served.values().sum::<u64>());
}

/// Every one of `pods` served requests, counted at its backend.
fn assert_every_pod_served(kubelet: &Kubelet, pods: &BTreeSet<String>, what: &str) {
    let served = kubelet.served();
    for pod in pods {
        let count = served.get(pod).copied().unwrap_or(0);
        assert!(count > 0, "{what} {pod} served no request: {served:?}");
    }
}

fn assert_no_failure(report: &RateLoadReport) {
    assert_eq!(
        report.failed, 0,
        "failed requests per code: {:?}; first failures: {:?}",
        report.failed_by_code, report.failures
    );
    assert_eq!(report.sent, report.succeeded);
}

/// The names of the Deployment's Pods, terminating ones included.
async fn pod_names(pods: &Api<Pod>) -> Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default().labels(ECHO_SELECTOR))
        .await?
        .items
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect())
}

/// The Pods the status lists as usable.
fn usable_pods(status: &GrpcBackendStatus) -> BTreeSet<String> {
    status
        .endpoints
        .iter()
        .filter(|e| e.is_usable())
        .filter_map(|e| e.pod.clone())
        .collect()
}

async fn wait_status(
    gbs: &Api<GrpcBackend>,
    what: &str,
    accept: impl Fn(&GrpcBackendStatus) -> bool,
) -> Result<GrpcBackendStatus> {
    let accept = &accept;
    wait::until(what, DEADLINE, move || async move {
        Ok(gbs.get("echo").await?.status.filter(|s| accept(s)))
    })
    .await
}

// === observing a kill ===

/// Requests the load has in flight (sent, not answered yet).
fn in_flight(report: &RateLoadReport) -> u64 {
    report.sent - report.succeeded - report.failed
}

fn endpoint_of(channel: &kubegrpc::Channel, address: SocketAddr) -> Result<EndpointSnapshot> {
    channel
        .snapshot()
        .endpoint(&address)
        .cloned()
        .with_context(|| format!("the client does not list {address}"))
}

/// Whether the client's copy of the status lets it use the endpoint (its own ejections aside).
fn usable_in_client_view(endpoint: &EndpointSnapshot) -> bool {
    endpoint.health == Health::Serving && endpoint.weight > 0 && endpoint.kubernetes_ready
}

/// What the client did about the killed endpoint.
struct ClientSeen {
    /// When it first was out of rotation (ejected, or no longer usable or listed).
    left_at: Instant,
    /// The endpoint as the client showed it then (the last listing if it was removed).
    left: EndpointSnapshot,
    /// When the client's copy of the status first said it was not usable (or not listed), if
    /// that happened within the deadline.
    status_at: Option<Instant>,
}

/// Polls the client's snapshot every millisecond until `address` left the rotation and its
/// copy of the status said it was not usable (at most [`DEADLINE`] for the latter).
async fn observe_client(channel: kubegrpc::Channel, address: SocketAddr) -> ClientSeen {
    let mut last = None;
    let mut left: Option<(Instant, EndpointSnapshot)> = None;
    let give_up = Instant::now() + DEADLINE;
    loop {
        let snapshot = channel.snapshot();
        let now = Instant::now();
        let endpoint = snapshot.endpoint(&address).cloned();
        if let Some(endpoint) = &endpoint {
            last = Some(endpoint.clone());
        }
        if left.is_none() {
            match &endpoint {
                Some(e) if e.ejected || !e.in_rotation => left = Some((now, e.clone())),
                Some(_) => {}
                None => left = last.clone().map(|e| (now, e)),
            }
        }
        let status_not_usable = endpoint.as_ref().is_none_or(|e| !usable_in_client_view(e));
        if let Some((left_at, left)) = &left
            && (status_not_usable || now >= give_up)
        {
            return ClientSeen {
                left_at: *left_at,
                left: left.clone(),
                status_at: status_not_usable.then_some(now),
            };
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Watches the GrpcBackend until its status lists `pod` not usable (or not at all); returns
/// when that event arrived, and the entry. `synced` is told once the object was first seen.
async fn observe_status(
    gbs: Api<GrpcBackend>,
    pod: String,
    synced: tokio::sync::oneshot::Sender<()>,
) -> Result<(Instant, Option<EndpointStatus>)> {
    let config = watcher::Config::default().fields("metadata.name=echo");
    let mut objects = watcher(gbs, config).applied_objects().boxed();
    let mut synced = Some(synced);
    while let Some(object) = objects.next().await {
        let now = Instant::now();
        if let Some(synced) = synced.take() {
            let _ = synced.send(());
        }
        let Some(status) = object?.status else { continue };
        let entry = status
            .endpoints
            .iter()
            .find(|e| e.pod.as_deref() == Some(pod.as_str()))
            .cloned();
        if entry.as_ref().is_none_or(|e| !e.is_usable()) {
            return Ok((now, entry));
        }
    }
    anyhow::bail!("the GrpcBackend watch ended")
}
