//! `make demo`: kubegrpc end to end on a local control plane, in a private network namespace.
//!
//! Starts etcd and kube-apiserver, the operator, three echo backends (processes of their own
//! on 10.250.1.x), writes their EndpointSlice, applies a GrpcBackend, runs the example client
//! and prints where its requests went next to each backend's own count; then flips one backend
//! NOT_SERVING and adds a fourth, and shows the status and the client's spread follow. Stops
//! everything on the way out. Exits non-zero if what the client saw and what the backends
//! served disagree.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use kubegrpc_crds::{GrpcBackend, Health};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{BackendProcess, built_binary},
    objects::{SliceEndpoint, apply_slice, create_service},
    process::ManagedProcess,
    wait,
};

const NAMESPACE: &str = "demo";
const REQUESTS: usize = 300;

const GRPC_BACKEND: &str = r#"apiVersion: kubegrpc.io/v1alpha1
kind: GrpcBackend
metadata:
  name: echo
  namespace: demo
spec:
  service: echo
  port: grpc
  healthCheck:
    mode: Watch
    interval: 5s
    timeout: 1s
"#;

fn step(started: Instant, text: &str) {
    println!("\n[{:>5.1}s] == {text}", started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    step(
        started,
        "starting a local control plane: etcd and kube-apiserver (a few seconds)",
    );
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    println!(
        "kube-apiserver at {}, kubeconfig {}",
        control_plane.server_url(),
        control_plane.kubeconfig().display()
    );

    step(started, "starting the kubegrpc operator");
    let log_dir = control_plane.dir().to_path_buf();
    let mut operator = Command::new(built_binary("kubegrpc-operator")?);
    operator
        .arg("--kubeconfig")
        .arg(control_plane.kubeconfig())
        .args(["--metrics-address", "127.0.0.1:0"]);
    let operator = ManagedProcess::start("kubegrpc-operator", operator, &log_dir.join("operator.log"))?;
    println!("operator pid {}, log {}", operator.pid(), operator.log_path().display());

    step(started, "starting three echo backends, each a process of its own");
    let mut backends = Vec::new();
    for host in 1..=3 {
        let address: SocketAddr = format!("10.250.1.{host}:50051").parse()?;
        backends.push(BackendProcess::start(address, &[]).await?);
        println!("echo-server listening on {address}");
    }

    step(
        started,
        "Service echo (port grpc) and its EndpointSlice, as the EndpointSlice controller writes them",
    );
    control_plane
        .kubectl_output(&["create", "namespace", NAMESPACE])
        .await?;
    create_service(&client, NAMESPACE, "echo", &[("grpc", 80)]).await?;
    write_slice(&client, &backends).await?;
    print!(
        "{}",
        control_plane
            .kubectl_output(&["get", "endpointslices", "-n", NAMESPACE, "-o", "wide"])
            .await?
    );

    step(started, "applying a GrpcBackend");
    print!("{GRPC_BACKEND}");
    let manifest = log_dir.join("grpcbackend.yaml");
    std::fs::write(&manifest, GRPC_BACKEND)?;
    print!(
        "{}",
        control_plane
            .kubectl_output(&["apply", "-f", manifest.to_str().unwrap_or_default()])
            .await?
    );
    let gbs = Api::<GrpcBackend>::namespaced(client.clone(), NAMESPACE);
    wait_for(&gbs, "3 ready endpoints", |status| status.ready_endpoints == 3).await?;
    show_status(&control_plane).await?;

    step(
        started,
        &format!("the example client sends {REQUESTS} requests through a kubegrpc channel"),
    );
    let before = served(&backends).await?;
    let seen = run_client(&control_plane).await?;
    let after = served(&backends).await?;
    compare(&backends, &seen, &before, &after, None)?;

    step(
        started,
        "flipping 10.250.1.3 NOT_SERVING and adding a fourth backend, 10.250.1.4",
    );
    let flipped = backends[2].address;
    backends[2].set_serving("", false).await?;
    let fourth: SocketAddr = "10.250.1.4:50051".parse()?;
    backends.push(BackendProcess::start(fourth, &[]).await?);
    write_slice(&client, &backends).await?;
    wait_for(&gbs, "10.250.1.3 NotServing and 10.250.1.4 Serving", |status| {
        let health = |address: &SocketAddr| {
            status
                .endpoints
                .iter()
                .find(|e| e.address == address.ip().to_string())
                .map(|e| e.health)
        };
        health(&flipped) == Some(Health::NotServing) && health(&fourth) == Some(Health::Serving)
    })
    .await?;
    show_status(&control_plane).await?;

    step(started, &format!("the example client sends {REQUESTS} requests again"));
    let before = served(&backends).await?;
    let seen = run_client(&control_plane).await?;
    let after = served(&backends).await?;
    compare(&backends, &seen, &before, &after, Some(flipped))?;

    step(started, "stopping everything");
    operator.stop(Duration::from_secs(10));
    for backend in &backends {
        backend.process.stop(Duration::from_secs(5));
    }
    control_plane.shutdown();
    println!("\ndemo OK in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn write_slice(client: &kube::Client, backends: &[BackendProcess]) -> Result<()> {
    let endpoints: Vec<SliceEndpoint> = backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect();
    apply_slice(client, NAMESPACE, "echo", "echo-demo", "grpc", &endpoints).await?;
    Ok(())
}

async fn wait_for(
    gbs: &Api<GrpcBackend>,
    what: &str,
    accept: impl Fn(&kubegrpc_crds::GrpcBackendStatus) -> bool,
) -> Result<()> {
    println!("waiting for the operator: {what} ...");
    wait::until(what, Duration::from_secs(60), || async {
        Ok(gbs.get("echo").await?.status.filter(|s| accept(s)).map(|_| ()))
    })
    .await
}

async fn show_status(control_plane: &ControlPlane) -> Result<()> {
    println!("$ kubectl get gb -n {NAMESPACE} -o wide");
    print!(
        "{}",
        control_plane
            .kubectl_output(&["get", "gb", "-n", NAMESPACE, "-o", "wide"])
            .await?
    );
    println!("$ kubectl get gb echo -n {NAMESPACE} -o yaml   # its status");
    let yaml = control_plane
        .kubectl_output(&["get", "gb", "echo", "-n", NAMESPACE, "-o", "yaml"])
        .await?;
    // The status part: what the operator publishes (what is as usual is left out of entries).
    let status = yaml.find("\nstatus:").map_or(yaml.as_str(), |at| &yaml[at + 1..]);
    print!("{status}");
    Ok(())
}

/// Runs the example client as its own process and returns its count per backend.
async fn run_client(control_plane: &ControlPlane) -> Result<BTreeMap<String, u64>> {
    let output = tokio::process::Command::new(built_binary("echo-client")?)
        .arg("--kubeconfig")
        .arg(control_plane.kubeconfig())
        .args([
            "--namespace",
            NAMESPACE,
            "--backend",
            "echo",
            "--requests",
            &REQUESTS.to_string(),
        ])
        .output()
        .await
        .context("cannot run echo-client")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    ensure!(
        output.status.success(),
        "echo-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut counts = BTreeMap::new();
    for line in stdout.lines().skip(1) {
        let mut fields = line.split_whitespace();
        if let (Some(backend), Some(count)) = (fields.next(), fields.next()) {
            counts.insert(backend.to_string(), count.parse()?);
        }
    }
    Ok(counts)
}

/// Each backend's own count of Echo requests served.
async fn served(backends: &[BackendProcess]) -> Result<Vec<u64>> {
    let mut counts = Vec::new();
    for backend in backends {
        counts.push(backend.stats().await?.requests);
    }
    Ok(counts)
}

/// Prints the client's count per backend next to the backend's own, and checks they agree.
fn compare(
    backends: &[BackendProcess],
    seen: &BTreeMap<String, u64>,
    before: &[u64],
    after: &[u64],
    flipped: Option<SocketAddr>,
) -> Result<()> {
    println!("{:<20} {:>14} {:>16}", "backend", "client counted", "backend served");
    let mut problems = Vec::new();
    for (index, backend) in backends.iter().enumerate() {
        let address = backend.address.to_string();
        let counted = seen.get(&address).copied().unwrap_or(0);
        let served = after[index] - before.get(index).copied().unwrap_or(0);
        let note = if Some(backend.address) == flipped {
            "  (NOT_SERVING)"
        } else {
            ""
        };
        println!("{address:<20} {counted:>14} {served:>16}{note}");
        if counted != served {
            problems.push(format!(
                "{address}: the client counted {counted}, the backend served {served}"
            ));
        }
        match Some(backend.address) == flipped {
            true if served > 0 => problems.push(format!("{address} is NOT_SERVING but served {served}")),
            false if served == 0 => problems.push(format!("{address} is serving but got no request")),
            _ => {}
        }
    }
    let failed: u64 = seen
        .iter()
        .filter(|(k, _)| k.starts_with("failed"))
        .map(|(_, v)| v)
        .sum();
    if failed > 0 {
        problems.push(format!("{failed} requests failed"));
    }
    if !problems.is_empty() {
        bail!("the demo's checks failed: {}", problems.join("; "));
    }
    println!("client and backends agree; every serving backend got requests");
    Ok(())
}
