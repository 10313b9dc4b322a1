//! The churn soak: a Deployment whose Pods are deleted one every few seconds (the ReplicaSet
//! replaces each, the kubelet stand-in drains the old one and runs the new one), under load,
//! against the operator binary in its own process. Afterwards everything that follows the
//! endpoints must be back where it started: the operator's probers, runtime tasks and file
//! descriptors, and the client's endpoints and open connections. RSS is reported.
//!
//! Used by `make soak` (10 minutes, release build) and by a one-minute test in the README's
//! test command.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use kubegrpc::Channel;
use kubegrpc_crds::GrpcBackend;
use serde_json::json;

use crate::{
    ControlPlane,
    install::{free_local_address, http_get, metric_series, start_operator_process},
    kubelet::Kubelet,
    load::{RateLoad, RateLoadReport},
    objects::{ECHO_SELECTOR, create_echo_deployment_service, create_grpc_backend, echo_deployment},
    scale::memory_kib,
    wait,
};

const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// How long Pods are churned.
    pub duration: Duration,
    /// One Pod deleted this often.
    pub churn_every: Duration,
    pub replicas: i32,
    /// Requests per second through the client during the whole run.
    pub rate: u32,
}

/// What must return to its baseline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    /// The operator's probers (`kubegrpc_probers`).
    pub probers: i64,
    /// Tasks alive in the operator's runtime (`kubegrpc_runtime_tasks`).
    pub runtime_tasks: i64,
    /// The operator's open file descriptors.
    pub file_descriptors: usize,
    /// Endpoints the client knows, and its connections open to them.
    pub client_endpoints: usize,
    pub client_connections: u64,
}

#[derive(Debug)]
pub struct SoakReport {
    pub churned: usize,
    pub baseline: Counts,
    pub after: Counts,
    /// The operator's RSS at the baseline, its peak (VmHWM) and after the churn, KiB.
    pub rss_baseline_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    pub load: RateLoadReport,
}

impl SoakReport {
    pub fn print(&self) {
        println!(
            "soak: {} pods churned; operator RSS {:.1} MiB at the baseline, peak {:.1} MiB, {:.1} MiB after; \
             counts at the baseline {:?}, after {:?}; load: {} requests sent, {} failed {:?}",
            self.churned,
            self.rss_baseline_kib as f64 / 1024.0,
            self.rss_peak_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0,
            self.baseline,
            self.after,
            self.load.sent,
            self.load.failed,
            self.load.failed_by_code,
        );
    }
}

/// Runs the soak in a new namespace of `control_plane` (which must run the controller manager).
pub async fn run(control_plane: &ControlPlane, options: &SoakOptions) -> Result<SoakReport> {
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "soak").await?;
    let metrics = free_local_address()?;
    let operator = start_operator_process(
        control_plane,
        control_plane.kubeconfig(),
        &namespace,
        "soak",
        metrics,
        &[],
    )?;
    let _kubelet = Kubelet::start(client.clone(), &namespace).await?;
    create_echo_deployment_service(&client, &namespace).await?;
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &echo_deployment(options.replicas)?)
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let backends = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);

    let channel = Channel::builder(client.clone(), &namespace, "echo").connect().await?;
    tokio::time::timeout(DEADLINE, channel.ready())
        .await
        .context("the channel never became ready")?;
    let is_settled = || settled(&pods, &backends, &channel, options.replicas);
    wait::until("every replica serving", DEADLINE, is_settled)
        .await
        .with_context(|| operator.log_tail(20))?;
    let load = RateLoad::start(
        channel.clone(),
        options.rate,
        u64::from(options.rate) * (options.duration.as_secs() + 600),
        options.duration + Duration::from_secs(600),
    );
    load.wait_for_more(u64::from(options.rate), DEADLINE).await?;
    let baseline = steady_counts(operator.pid(), metrics, &channel).await?;
    let rss_baseline_kib = memory_kib(operator.pid(), "VmRSS")?;

    // Churn: the oldest running Pod deleted every `churn_every`.
    let started = Instant::now();
    let mut churned = 0;
    while started.elapsed() < options.duration {
        if let Some(victim) = oldest_running(&pods).await? {
            pods.delete(&victim, &DeleteParams::default()).await?;
            churned += 1;
        }
        tokio::time::sleep(options.churn_every).await; // the churn's cadence
    }

    // Settled again: back to the baseline counts.
    wait::until("every replica serving after the churn", DEADLINE, is_settled)
        .await
        .with_context(|| operator.log_tail(20))?;
    let after = wait::until("the counts back at their baseline", DEADLINE, || async {
        let now = counts(operator.pid(), metrics, &channel).await?;
        Ok((now == baseline).then_some(now))
    })
    .await;
    let report = load.stop().await;
    let after = match after {
        Ok(after) => after,
        Err(error) => bail!(
            "{error:#}: baseline {baseline:?}, now {:?}; the operator's descriptors: {}",
            counts(operator.pid(), metrics, &channel).await?,
            descriptors(operator.pid())
        ),
    };
    let rss_after_kib = memory_kib(operator.pid(), "VmRSS")?;
    let rss_peak_kib = memory_kib(operator.pid(), "VmHWM")?;
    operator.stop(Duration::from_secs(10));
    Ok(SoakReport {
        churned,
        baseline,
        after,
        rss_baseline_kib,
        rss_peak_kib,
        rss_after_kib,
        load: report,
    })
}

/// The Deployment's `replicas` Pods all running, none terminating, the status listing exactly
/// them as usable, and the client holding one connection to each.
async fn settled(pods: &Api<Pod>, backends: &Api<GrpcBackend>, channel: &Channel, replicas: i32) -> Result<Option<()>> {
    let listed = pods.list(&ListParams::default().labels(ECHO_SELECTOR)).await?.items;
    let running = listed
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .count();
    if listed.len() != replicas as usize || running != replicas as usize {
        return Ok(None);
    }
    let status = backends.get("echo").await?.status.unwrap_or_default();
    let usable = status.endpoints.iter().filter(|e| e.is_usable()).count();
    if status.endpoints.len() != replicas as usize || usable != replicas as usize {
        return Ok(None);
    }
    let snapshot = channel.snapshot();
    let connected = snapshot.endpoints.len() == replicas as usize
        && snapshot
            .endpoints
            .iter()
            .all(|e| e.in_rotation && e.connections_opened.saturating_sub(e.connections_closed) == 1);
    Ok(connected.then_some(()))
}

/// The counts once two samples a second apart agree (nothing in flight).
async fn steady_counts(pid: i32, metrics: SocketAddr, channel: &Channel) -> Result<Counts> {
    let deadline = Instant::now() + DEADLINE;
    let mut previous = counts(pid, metrics, channel).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await; // the sampling period
        let now = counts(pid, metrics, channel).await?;
        if now == previous {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("the counts never held still: {previous:?}, then {now:?}");
        }
        previous = now;
    }
}

async fn counts(pid: i32, metrics: SocketAddr, channel: &Channel) -> Result<Counts> {
    let series = metric_series(&http_get(metrics, "/metrics").await?);
    let gauge = |name: &str| -> Result<i64> {
        series
            .get(name)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as i64)
            .with_context(|| format!("no {name} in /metrics"))
    };
    let snapshot = channel.snapshot();
    Ok(Counts {
        probers: gauge("kubegrpc_probers")?,
        runtime_tasks: gauge("kubegrpc_runtime_tasks")?,
        file_descriptors: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        client_endpoints: snapshot.endpoints.len(),
        client_connections: snapshot
            .endpoints
            .iter()
            .map(|e| e.connections_opened.saturating_sub(e.connections_closed))
            .sum(),
    })
}

/// What each of a process's descriptors is (for a failure report).
fn descriptors(pid: i32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let kind = target.split(':').next().unwrap_or_default().to_string();
            *kinds.entry(kind).or_default() += 1;
        }
    }
    format!("{kinds:?}")
}

/// The oldest Pod of the Deployment that runs and is not being deleted.
async fn oldest_running(pods: &Api<Pod>) -> Result<Option<String>> {
    let mut running: Vec<Pod> = pods
        .list(&ListParams::default().labels(ECHO_SELECTOR))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .collect();
    running.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(running.first().and_then(|p| p.metadata.name.clone()))
}
