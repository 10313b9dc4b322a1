//! Real Deployment rollouts under load: kube-controller-manager runs the Deployment, the
//! harness' kubelet stand-in runs its Pods as real backends (and drains them on deletion), the
//! operator health-checks them, and a kubegrpc client sends at a fixed rate throughout.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Service},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use kubegrpc_crds::{GrpcBackend, GrpcBackendStatus};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions, backends::BACKEND_PORT, kubelet::Kubelet, load::RateLoad,
    objects::create_grpc_backend, operator::InProcessOperator, wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
/// Five Pods replaced one at a time, each drained for 2 s: well under a minute on 2 cores.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(180);
const REPLICAS: i32 = 5;
const RATE: u32 = 200;
const SELECTOR: &str = "app=echo";

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_restart_under_load_fails_no_request_and_every_new_pod_serves() -> Result<()> {
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "rollout").await?;
    let _operator = InProcessOperator::start(client.clone(), &namespace);
    let kubelet = Kubelet::start(client.clone(), &namespace).await?;

    create_echo_service(&client, &namespace).await?;
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments.create(&PostParams::default(), &echo_deployment()?).await?;
    let gbs = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);
    wait_status(&gbs, "5 ready endpoints", |s| s.ready_endpoints == REPLICAS).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let old_pods: BTreeSet<String> = pod_names(&pods).await?;
    ensure!(
        old_pods.len() == REPLICAS as usize,
        "pods before the rollout: {old_pods:?}"
    );

    let channel = kubegrpc::Channel::builder(client.clone(), &namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready())
        .await
        .context("the channel never became ready")?;
    let load = RateLoad::start(channel.clone(), RATE, u64::from(RATE) * 600, Duration::from_secs(600));
    load.wait_for_more(u64::from(RATE), DEADLINE).await?;

    // What `kubectl rollout restart` does.
    let restarted_at = k8s_openapi::jiff::Timestamp::now().to_string();
    deployments
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
    let (deployments_ref, pods_ref, old_ref) = (&deployments, &pods, &old_pods);
    let new_pods = wait::until("the rollout to complete", ROLLOUT_DEADLINE, move || async move {
        let (deployments, pods, old_pods) = (deployments_ref, pods_ref, old_ref);
        let deployment = deployments.get("echo").await?;
        let generation = deployment.metadata.generation;
        let status = deployment.status.unwrap_or_default();
        let done = status.observed_generation >= generation
            && status.replicas == Some(REPLICAS)
            && status.updated_replicas == Some(REPLICAS)
            && status.ready_replicas == Some(REPLICAS)
            && status.available_replicas == Some(REPLICAS);
        if !done {
            return Ok(None);
        }
        let names = pod_names(pods).await?;
        Ok((names.len() == REPLICAS as usize && names.is_disjoint(old_pods)).then_some(names))
    })
    .await?;
    println!("rolled out: new pods {new_pods:?}");

    // The operator publishes the new Pods, then the load goes on ~2 s over them.
    let expected = new_pods.clone();
    wait_status(&gbs, "the 5 new pods, and only them, ready", move |s| {
        let usable: BTreeSet<String> = s
            .endpoints
            .iter()
            .filter(|e| e.is_usable())
            .filter_map(|e| e.pod.clone())
            .collect();
        s.total_endpoints == REPLICAS && usable == expected
    })
    .await?;
    load.wait_for_more(2 * u64::from(RATE), DEADLINE).await?;
    let report = load.stop().await;

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

    assert_eq!(
        report.failed, 0,
        "failed requests per code: {:?}; first failures: {:?}",
        report.failed_by_code, report.failures
    );
    assert_eq!(report.sent, report.succeeded);
    for pod in &new_pods {
        let count = served.get(pod).copied().unwrap_or(0);
        assert!(count > 0, "new pod {pod} served no request: {served:?}");
    }
    Ok(())
}

async fn create_echo_service(client: &Client, namespace: &str) -> Result<()> {
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "echo"},
            "ports": [{"name": "grpc", "port": 80, "targetPort": "grpc"}],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

fn echo_deployment() -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": "echo"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "echo",
                        "image": "kubegrpc/echo-server",
                        "ports": [{"name": "grpc", "containerPort": BACKEND_PORT}],
                    }],
                },
            },
        },
    }))?)
}

/// The names of the Deployment's Pods, terminating ones included.
async fn pod_names(pods: &Api<Pod>) -> Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default().labels(SELECTOR))
        .await?
        .items
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect())
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
