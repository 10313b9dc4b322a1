//! A kubelet stand-in for one namespace, so that real Deployments roll out on a control plane
//! that has kube-controller-manager but neither a scheduler nor a kubelet.
//!
//! It registers a Node, binds every unscheduled Pod of the namespace to it (what the scheduler
//! would do), and "runs" each bound Pod as a real in-process echo backend on a fresh 10.250.x.y
//! address: the Pod is marked Running and Ready with that address as its IP, so that the
//! EndpointSlice controller lists it. When a Pod is deleted it drains as a well-behaved gRPC
//! server does on SIGTERM: health NOT_SERVING and Ready=False at once, requests still served for
//! the drain period, then a graceful stop, then the Pod is removed (grace period 0), as the
//! kubelet does once the containers stopped. [`Kubelet::kill`] kills a Pod's backend instead,
//! as SIGKILL (or a crash) would: no NOT_SERVING, no drain, every connection reset at once; the
//! Pod turns Ready=False and stays, as a Pod whose container died does.
//!
//! The run disables the node-lifecycle and pod-GC controllers
//! (`--controllers=*,-nodelifecycle,-podgc`, see [`crate::controlplane`]), so the stand-in
//! neither renews a Lease nor refreshes the Node's Ready condition: nothing evicts or collects
//! its Pods.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc_echo::{BackendOptions, Counters, ServingStatus};
use serde_json::json;
use tokio::{
    sync::{oneshot, watch},
    task::JoinSet,
};
use tokio_util::task::AbortOnDropHandle;

use crate::backends::start_backend;

/// The Node the stand-in registers and binds Pods to.
pub const NODE_NAME: &str = "kubelet-standin";
/// The zone label of that Node (the EndpointSlice controller copies it to every endpoint).
pub const ZONE: &str = "zone-a";
/// How long a deleted Pod keeps serving after it turned NOT_SERVING.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(2);
/// How long a kubelet takes to notice a container that died: its pod lifecycle event
/// generator relists containers every second.
pub const DEFAULT_DEAD_CONTAINER_NOTICED_AFTER: Duration = Duration::from_secs(1);

/// How the stand-in behaves.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// The Node's name.
    pub node: String,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: String,
    /// How long a terminating Pod keeps serving (NOT_SERVING, Ready=False) before it stops.
    /// Keep it well within the Pods' `terminationGracePeriodSeconds`.
    pub drain: Duration,
    /// How long after a [`Kubelet::kill`] the Pod is marked Ready=False (a kubelet learns of a
    /// dead container by relisting, not at once).
    pub dead_container_noticed_after: Duration,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            node: NODE_NAME.into(),
            zone: ZONE.into(),
            drain: DEFAULT_DRAIN,
            dead_container_noticed_after: DEFAULT_DEAD_CONTAINER_NOTICED_AFTER,
        }
    }
}

/// A running kubelet stand-in; its task, and every backend it runs, stop when it is dropped.
pub struct Kubelet {
    shared: Arc<Shared>,
    _task: AbortOnDropHandle<()>,
}

/// What a Pod's backend served, kept after the Pod is gone.
#[derive(Clone, Debug)]
struct Served {
    address: SocketAddr,
    counters: Arc<Counters>,
}

struct Shared {
    namespace: String,
    options: KubeletOptions,
    pods: Api<Pod>,
    started: Instant,
    /// Pod name -> its backend's address and counters, for every Pod ever started.
    served: Mutex<BTreeMap<String, Served>>,
    /// Pod name -> how to kill its running backend ([`Kubelet::kill`]); answered with the
    /// instant the backend was dead.
    kills: Mutex<HashMap<String, oneshot::Sender<oneshot::Sender<Instant>>>>,
}

impl Shared {
    fn log(&self, pod: &str, what: impl std::fmt::Display) {
        println!(
            "[kubelet {:>7.3}s] pod {}/{pod}: {what}",
            self.started.elapsed().as_secs_f64(),
            self.namespace
        );
    }
}

impl Kubelet {
    /// Registers the Node and starts running the Pods of `namespace`, with the default options.
    pub async fn start(client: Client, namespace: &str) -> Result<Kubelet> {
        Self::start_with(client, namespace, KubeletOptions::default()).await
    }

    pub async fn start_with(client: Client, namespace: &str, options: KubeletOptions) -> Result<Kubelet> {
        register_node(&client, &options.node, &options.zone).await?;
        let shared = Arc::new(Shared {
            namespace: namespace.into(),
            options,
            pods: Api::namespaced(client, namespace),
            started: Instant::now(),
            served: Mutex::new(BTreeMap::new()),
            kills: Mutex::new(HashMap::new()),
        });
        let task = AbortOnDropHandle::new(tokio::spawn(run(shared.clone())));
        Ok(Kubelet { shared, _task: task })
    }

    /// Echo requests served so far by each Pod's backend (counted at the backend), including
    /// Pods already gone (their final count).
    pub fn served(&self) -> BTreeMap<String, u64> {
        self.shared
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(pod, served)| (pod.clone(), served.counters.snapshot().requests))
            .collect()
    }

    /// The backend address each Pod ran (or runs) at.
    pub fn addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.shared
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(pod, served)| (pod.clone(), served.address))
            .collect()
    }

    /// Kills `pod`'s backend as SIGKILL would: no NOT_SERVING, no drain, no GOAWAY; every
    /// connection is reset at once and its port refuses new ones. Then the Pod is marked as a
    /// kubelet marks a Pod whose container died (ContainersReady and Ready False); it stays (a
    /// later deletion removes it at once: nothing is left to drain). Returns the instant the
    /// backend was dead, before the Pod's status is written.
    pub async fn kill(&self, pod: &str) -> Result<Instant> {
        let kill = self
            .shared
            .kills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(pod)
            .ok_or_else(|| anyhow!("pod {}/{pod} has no running backend to kill", self.shared.namespace))?;
        let (answer, dead) = oneshot::channel();
        kill.send(answer)
            .map_err(|_| anyhow!("pod {}/{pod} stopped before it was killed", self.shared.namespace))?;
        dead.await
            .map_err(|_| anyhow!("pod {}/{pod}: its task ended during the kill", self.shared.namespace))
    }

    /// The Node's name.
    pub fn node(&self) -> &str {
        &self.shared.options.node
    }
}

/// Creates the Node (or finds it) and sets its Ready condition, as a kubelet registers itself.
pub async fn register_node(client: &Client, name: &str, zone: &str) -> Result<()> {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name}},
    }))?;
    let nodes = Api::<Node>::all(client.clone());
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {}
        Err(error) => return Err(error).with_context(|| format!("cannot create Node {name}")),
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
            ]}})),
        )
        .await
        .with_context(|| format!("cannot mark Node {name} Ready"))?;
    Ok(())
}

// === the watch loop ===

/// Follows the namespace's Pods and gives each one (by uid) a task of its own, fed with the
/// Pod's latest state (`None` once deleted).
async fn run(shared: Arc<Shared>) {
    let mut events = watcher(shared.pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut pods: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                let (pod, deleted) = match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => (pod, false),
                    Ok(watcher::Event::Delete(pod)) => (pod, true),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                    Err(error) => {
                        println!("[kubelet] watching Pods of {} failed: {error}", shared.namespace);
                        continue;
                    }
                };
                let Some(uid) = pod.metadata.uid.clone() else { continue };
                if finished.contains(&uid) {
                    continue;
                }
                let latest = (!deleted).then_some(pod);
                if let Some(sender) = pods.get(&uid) {
                    sender.send_replace(latest);
                } else if latest.is_some() {
                    let (sender, receiver) = watch::channel(latest);
                    pods.insert(uid.clone(), sender);
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        run_pod(shared, receiver).await;
                        uid
                    });
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(uid) = done {
                    pods.remove(&uid);
                    finished.insert(uid);
                }
            }
        }
    }
}

// === one Pod's life ===

fn is_deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref())
}

fn is_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|status| status.phase.as_deref() == Some("Running") || status.pod_ip.is_some())
}

/// Binds, runs and, once deleted, drains one Pod. Errors are logged: the Pod's task ends.
async fn run_pod(shared: Arc<Shared>, mut latest: watch::Receiver<Option<Pod>>) {
    let Some(pod) = latest.borrow_and_update().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if let Err(error) = pod_life(&shared, &name, &uid, &mut latest).await {
        shared.log(&name, format_args!("failed: {error:#}"));
    }
}

async fn pod_life(shared: &Shared, name: &str, uid: &str, latest: &mut watch::Receiver<Option<Pod>>) -> Result<()> {
    let node = shared.options.node.as_str();
    // Schedule: bind to the Node unless bound already (to this Node, or elsewhere: not ours).
    loop {
        let Some(pod) = latest.borrow_and_update().clone() else {
            return Ok(());
        };
        if is_deleting(&pod) {
            // Never started: nothing to drain.
            return remove(shared, name, uid).await;
        }
        match node_of(&pod) {
            Some(bound) if bound == node => break,
            Some(_) => return Ok(()),
            None => match bind(shared, name, uid).await {
                Ok(()) => {
                    shared.log(name, format_args!("bound to Node {node}"));
                    break;
                }
                Err(error) => {
                    shared.log(name, format_args!("binding failed, retrying: {error:#}"));
                    let _ = tokio::time::timeout(Duration::from_millis(200), latest.changed()).await;
                }
            },
        }
    }
    if latest.borrow().as_ref().is_some_and(is_running) {
        // Running before this stand-in started: not one of ours.
        return Ok(());
    }

    // Start the container: a real backend at the Pod's own address.
    let backend = start_backend(BackendOptions::default()).await?;
    let address = backend.address;
    shared
        .served
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            name.to_string(),
            Served {
                address,
                counters: backend.counters.clone(),
            },
        );
    let (kill, mut killed) = oneshot::channel();
    shared
        .kills
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(name.to_string(), kill);
    let result = serve(shared, name, uid, latest, backend, address, &mut killed).await;
    shared
        .kills
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(name);
    result
}

/// Runs a started Pod's backend until the Pod is deleted (then drains it) or it is killed.
async fn serve(
    shared: &Shared,
    name: &str,
    uid: &str,
    latest: &mut watch::Receiver<Option<Pod>>,
    backend: kubegrpc_echo::Backend,
    address: SocketAddr,
    killed: &mut oneshot::Receiver<oneshot::Sender<Instant>>,
) -> Result<()> {
    mark_running(shared, name, address).await?;
    shared.log(name, format_args!("running, Ready, backend at {address}"));

    // Serve until the Pod is deleted, or the backend is killed.
    let mut killable = true;
    loop {
        match latest.borrow_and_update().as_ref() {
            None => {
                shared.log(name, "deleted at once: backend killed");
                return Ok(());
            }
            Some(pod) if is_deleting(pod) => break,
            Some(_) => {}
        }
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            answer = &mut *killed, if killable => {
                let Ok(answer) = answer else {
                    killable = false;
                    continue;
                };
                let served = backend.counters.snapshot().requests;
                backend.kill().await;
                let _ = answer.send(Instant::now());
                shared.log(name, format_args!("backend killed (SIGKILL) after {served} requests"));
                return dead(shared, name, uid, latest).await;
            }
        }
    }

    // SIGTERM: NOT_SERVING (the operator's health Watch sees it at once), readiness probe
    // failing (Ready=False), still serving for the drain period, then a graceful stop.
    backend.health.set_all(ServingStatus::NotServing);
    shared.log(
        name,
        format_args!("terminating: NOT_SERVING, draining for {:?}", shared.options.drain),
    );
    if let Err(error) = mark_not_ready(shared, name).await {
        shared.log(name, format_args!("cannot mark not Ready: {error:#}"));
    }
    let gone = latest.wait_for(std::option::Option::is_none);
    let _ = tokio::time::timeout(shared.options.drain, gone).await;
    let served = backend.counters.snapshot().requests;
    backend.stop().await;
    shared.log(name, format_args!("backend stopped after {served} requests"));
    remove(shared, name, uid).await
}

/// A Pod whose container died and is not restarted: Ready=False as the kubelet reports it,
/// kept until deleted, then removed at once (nothing left to drain).
async fn dead(shared: &Shared, name: &str, uid: &str, latest: &mut watch::Receiver<Option<Pod>>) -> Result<()> {
    // Noticed at the next relist, not at once (the operator's probes may be quicker).
    tokio::time::sleep(shared.options.dead_container_noticed_after).await;
    if let Err(error) = mark_not_ready(shared, name).await {
        shared.log(name, format_args!("cannot mark not Ready: {error:#}"));
    } else {
        shared.log(name, "container dead: Ready=False");
    }
    let deleted = latest
        .wait_for(|pod| pod.as_ref().is_none_or(is_deleting))
        .await
        .map(|pod| pod.is_some());
    match deleted {
        Ok(true) => remove(shared, name, uid).await,
        _ => Ok(()),
    }
}

/// What the scheduler does: a Binding to the Node, through the Pod's `binding` subresource.
async fn bind(shared: &Shared, name: &str, uid: &str) -> Result<()> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(shared.namespace.clone()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(shared.options.node.clone()),
            ..Default::default()
        },
    };
    let _: serde_json::Value = shared
        .pods
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await
        .with_context(|| format!("cannot bind Pod {}/{name}", shared.namespace))?;
    Ok(())
}

/// What the kubelet reports once the container started and the readiness probe passed.
async fn mark_running(shared: &Shared, name: &str, address: SocketAddr) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let ip = address.ip().to_string();
    shared
        .pods
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "hostIP": "10.250.0.1", "hostIPs": [{"ip": "10.250.0.1"}], "startTime": now,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ],
            }})),
        )
        .await
        .with_context(|| format!("cannot mark Pod {}/{name} Running", shared.namespace))?;
    Ok(())
}

/// What the kubelet reports when the readiness probe fails (the server answers NOT_SERVING).
async fn mark_not_ready(shared: &Shared, name: &str) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    shared
        .pods
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
            ]}})),
        )
        .await
        .with_context(|| format!("cannot mark Pod {}/{name} not Ready", shared.namespace))?;
    Ok(())
}

/// What the kubelet does once the containers stopped: removes the Pod for good.
async fn remove(shared: &Shared, name: &str, uid: &str) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match shared.pods.delete(name, &params).await {
        Ok(_) => {
            shared.log(name, "removed");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove Pod {}/{name}", shared.namespace)),
    }
}
