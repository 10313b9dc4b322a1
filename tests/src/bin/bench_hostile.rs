//! What one misbehaving backend costs the operator, per endpoint, against a healthy one.
//!
//! The operator binary runs in its own process (so that its memory and CPU are its own) against
//! the real apiserver, probing `BENCH_HOSTILE_ENDPOINTS` endpoints of one behaviour at a time,
//! each endpoint a listener of its own on a 10.250.x.y address of the private network namespace
//! (the backends live in this process; only the operator is measured). Phases, each with a
//! fresh operator process and a GrpcBackend of its own (interval 1s, timeout 500ms,
//! unhealthyThreshold 2, panicThreshold 0, LoadReport with 1 s reports, so that the prober
//! opens every stream it can):
//!   - idle: the GrpcBackend with no endpoint (the operator's own cost, subtracted below);
//!   - tonic: tonic echo backends (`kubegrpc-echo`), the healthy baseline users run;
//!   - Healthy: the hand-made server behaving well (the baseline of the hand-made ones);
//!   - then each hostile behaviour of `kubegrpc_tests::hostile::Behaviour`.
//!
//! Per phase: the time until every endpoint was judged (NotServing, or Serving for the
//! healthy ones and the ORCA liars), then, after a warm-up, a fixed window: the operator's CPU
//! time (/proc/PID/stat), its resident memory at the end and at its peak (VmRSS, VmHWM),
//! connections the backends accepted and status writes in the window. Memory and CPU per
//! endpoint are over the idle phase's, and each is also given as a ratio to the hand-made
//! healthy baseline measured in the same run.
//!
//!   cargo build --release --locked -p kubegrpc-tests -p kubegrpc-operator --bins && \
//!   KUBEGRPC_CONTROLPLANE_BIN=$(tests/controlplane/build.sh) tests/netns-run.sh target/release/bench_hostile
//!
//! Options (environment): BENCH_HOSTILE_ENDPOINTS (200), BENCH_HOSTILE_WINDOW_SECONDS (30),
//! BENCH_HOSTILE_BEHAVIOURS (all; a comma-separated list of names, `tonic` and `Healthy` are
//! always measured first), BENCH_HOSTILE_QUICK=1 (what the tests run: 20 endpoints, a 2 s
//! window, Silent and PingFlood; about 40 s with the control plane's start).
//!
//! The backends take addresses from 10.250.200.1 up, away from those the test harness hands out
//! from 10.250.1.1, so that the quick run can share a test process's network namespace.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use kube::{Api, Client};
use kubegrpc_crds::{GrpcBackend, Health};
use kubegrpc_echo::{Backend, BackendOptions};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::{BACKEND_PORT, built_binary},
    bench_support::setting,
    hostile::{Behaviour, HostileBackend, memory_kib},
    install::{free_local_address, http_get, metric_series},
    netns::assert_private_network,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    process::ManagedProcess,
    scale::{cpu_ticks, ticks_per_second},
    wait,
};
use serde_json::json;

/// What runs behind the endpoints of one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backends {
    None,
    Tonic,
    Hand(Behaviour),
}

impl Backends {
    fn name(self) -> String {
        match self {
            Backends::None => "idle (no endpoint)".into(),
            Backends::Tonic => "tonic echo (healthy)".into(),
            Backends::Hand(behaviour) => behaviour.name(),
        }
    }

    /// What the status should end up saying of every endpoint.
    fn judged_as(self) -> Health {
        match self {
            Backends::Hand(b) if b != Behaviour::Healthy && !b.lies_about_load() => Health::NotServing,
            _ => Health::Serving,
        }
    }
}

/// The backends of one phase, kept alive while it is measured.
enum Running {
    Tonic(Vec<Backend>),
    Hand(Vec<HostileBackend>),
}

impl Running {
    fn connections_accepted(&self) -> u64 {
        match self {
            Running::Tonic(backends) => backends
                .iter()
                .map(|b| {
                    b.counters
                        .connections_accepted
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .sum(),
            Running::Hand(backends) => backends
                .iter()
                .map(|b| b.counters.snapshot().connections_accepted)
                .sum(),
        }
    }
}

/// What one phase measured.
#[derive(Clone, Debug)]
struct Phase {
    backends: Backends,
    endpoints: usize,
    /// Until every endpoint was judged, and how many were.
    judged_after: Duration,
    judged: usize,
    rss_kib: u64,
    peak_rss_kib: u64,
    /// Share of one core over the window.
    cpu: f64,
    connections_per_second: f64,
    status_writes: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    raise_fd_limit();
    assert_private_network();
    let quick = setting("BENCH_HOSTILE_QUICK", 0) == 1;
    let endpoints = setting("BENCH_HOSTILE_ENDPOINTS", if quick { 20 } else { 200 }) as usize;
    let window = Duration::from_secs(setting("BENCH_HOSTILE_WINDOW_SECONDS", if quick { 2 } else { 30 }));
    let warm_up = if quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let chosen: Vec<Behaviour> = match std::env::var("BENCH_HOSTILE_BEHAVIOURS") {
        Ok(list) => list
            .split(',')
            .filter(|name| !name.trim().is_empty())
            .map(|name| Behaviour::parse(name).with_context(|| format!("no behaviour named {name:?}")))
            .collect::<Result<_>>()?,
        Err(_) if quick => vec![Behaviour::Silent, Behaviour::PingFlood],
        Err(_) => Behaviour::HOSTILE.to_vec(),
    };
    let mut phases = vec![Backends::None, Backends::Tonic, Backends::Hand(Behaviour::Healthy)];
    phases.extend(
        chosen
            .into_iter()
            .filter(|b| *b != Behaviour::Healthy)
            .map(Backends::Hand),
    );

    let operator = built_binary("kubegrpc-operator")?;
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    println!(
        "bench_hostile: {endpoints} endpoints per behaviour, {window:?} window after a {warm_up:?} warm-up, \
         operator {}",
        operator.display()
    );
    let mut results = Vec::new();
    for backends in phases {
        let phase = run_phase(
            &control_plane,
            &client,
            &operator,
            backends,
            if backends == Backends::None { 0 } else { endpoints },
            warm_up,
            window,
        )
        .await
        .with_context(|| format!("phase {}", backends.name()))?;
        println!(
            "  {}: judged {}/{} after {:.1?}, RSS {:.1} MiB (peak {:.1}), CPU {:.1}% of a core",
            phase.backends.name(),
            phase.judged,
            phase.endpoints,
            phase.judged_after,
            phase.rss_kib as f64 / 1024.0,
            phase.peak_rss_kib as f64 / 1024.0,
            phase.cpu * 100.0
        );
        results.push(phase);
    }
    print_table(&results, window);
    control_plane.shutdown();
    Ok(())
}

async fn run_phase(
    control_plane: &ControlPlane,
    client: &Client,
    operator: &std::path::Path,
    backends: Backends,
    endpoints: usize,
    warm_up: Duration,
    window: Duration,
) -> Result<Phase> {
    let namespace = control_plane.create_namespace(client, "bench-hostile").await?;
    let running = match backends {
        Backends::None => Running::Hand(Vec::new()),
        Backends::Tonic => {
            let mut started = Vec::with_capacity(endpoints);
            for _ in 0..endpoints {
                started.push(Backend::start(next_address(), BackendOptions::default()).await?);
            }
            Running::Tonic(started)
        }
        Backends::Hand(behaviour) => {
            let mut started = Vec::with_capacity(endpoints);
            for _ in 0..endpoints {
                started.push(HostileBackend::start_at(next_address(), behaviour).await?);
            }
            Running::Hand(started)
        }
    };
    let addresses: Vec<SocketAddr> = match &running {
        Running::Tonic(b) => b.iter().map(|b| b.address).collect(),
        Running::Hand(b) => b.iter().map(|b| b.address).collect(),
    };
    create_service(client, &namespace, "bench", &[("grpc", 80)]).await?;
    let slices: Vec<Vec<SliceEndpoint>> = if addresses.is_empty() {
        vec![Vec::new()]
    } else {
        addresses
            .chunks(100)
            .map(|chunk| chunk.iter().map(|a| SliceEndpoint::ready(*a)).collect())
            .collect()
    };
    for (index, slice) in slices.iter().enumerate() {
        apply_slice(client, &namespace, "bench", &format!("bench-{index}"), "grpc", slice).await?;
    }
    create_grpc_backend(
        client,
        &namespace,
        "bench",
        json!({"service": "bench", "port": "grpc",
               "healthCheck": {"interval": "1s", "timeout": "500ms", "unhealthyThreshold": 2, "panicThreshold": 0},
               "weighting": {"policy": "LoadReport", "loadReport": {"reportInterval": "1s", "blackoutPeriod": "1s"}}}),
    )
    .await?;

    let metrics = free_local_address()?;
    let mut command = Command::new(operator);
    command
        .arg("--kubeconfig")
        .arg(control_plane.kubeconfig())
        .args(["--namespace", &namespace, "--identity", &namespace])
        .arg("--metrics-address")
        .arg(metrics.to_string())
        .env("RUST_LOG", "info");
    let log = control_plane.dir().join(format!("operator-{namespace}.log"));
    let process = ManagedProcess::start(format!("kubegrpc-operator {namespace}"), command, &log)?;
    let started = Instant::now();

    // Judged: every endpoint listed with the health its behaviour earns. A phase whose
    // endpoints are not all judged by the deadline is measured anyway, and says so.
    let api = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);
    let expected = backends.judged_as();
    let judged_count = || async {
        let backend = api.get("bench").await?;
        let status = backend.status.unwrap_or_default();
        let judged = status.endpoints.iter().filter(|e| e.health == expected).count();
        let listed = status.endpoints.len() == endpoints && status.observed_generation.is_some();
        Ok::<_, anyhow::Error>((listed, judged))
    };
    let all_judged = wait::until("every endpoint judged", Duration::from_secs(120), || async {
        let (listed, judged) = judged_count().await?;
        Ok((listed && judged == endpoints).then_some(()))
    })
    .await;
    let judged_after = started.elapsed();
    if let Err(error) = all_judged {
        println!("  {}: {error:#}", backends.name());
    }
    let (_, judged) = judged_count().await?;

    tokio::time::sleep(warm_up).await;
    let pid = process.pid();
    let writes_before = status_writes(metrics).await?;
    let connections_before = running.connections_accepted();
    let cpu_before = cpu_ticks(pid)?;
    let measuring = Instant::now();
    let mut peak_rss_kib = 0;
    while measuring.elapsed() < window {
        peak_rss_kib = peak_rss_kib.max(memory_kib(Some(pid), "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = measuring.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second() / elapsed;
    let rss_kib = memory_kib(Some(pid), "VmRSS")?;
    let phase = Phase {
        backends,
        endpoints,
        judged_after,
        judged,
        rss_kib,
        peak_rss_kib: peak_rss_kib.max(memory_kib(Some(pid), "VmHWM")?),
        cpu,
        connections_per_second: (running.connections_accepted() - connections_before) as f64 / elapsed,
        status_writes: status_writes(metrics).await? - writes_before,
    };
    if process.try_exit_status().is_some() {
        anyhow::bail!("the operator exited during the phase: {}", process.log_tail(20));
    }
    process.stop(Duration::from_secs(10));
    drop(running);
    Ok(phase)
}

/// A fresh address from 10.250.200.1 up (see the module docs).
fn next_address() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let third = 200 + n / 250;
    assert!(third < 256, "out of bench addresses");
    SocketAddr::from((Ipv4Addr::new(10, 250, third as u8, (1 + n % 250) as u8), BACKEND_PORT))
}

/// Status writes so far, from the operator's /metrics.
async fn status_writes(metrics: SocketAddr) -> Result<u64> {
    let series = metric_series(&http_get(metrics, "/metrics").await?);
    Ok(series
        .iter()
        .filter(|(name, _)| name.starts_with("kubegrpc_status_writes_total"))
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn print_table(results: &[Phase], window: Duration) {
    let idle = results.iter().find(|p| p.backends == Backends::None);
    let per_endpoint = |phase: &Phase| -> (f64, f64) {
        let Some(idle) = idle else { return (f64::NAN, f64::NAN) };
        let n = phase.endpoints.max(1) as f64;
        (
            (phase.rss_kib as f64 - idle.rss_kib as f64) / n,
            (phase.cpu - idle.cpu) * 1000.0 / n,
        )
    };
    let healthy = results
        .iter()
        .find(|p| p.backends == Backends::Hand(Behaviour::Healthy))
        .map(per_endpoint);
    println!();
    println!(
        "| backends | endpoints | judged | judged after | RSS MiB (peak) | RSS per endpoint KiB | x healthy | \
         CPU % of a core | CPU per endpoint ms/s | x healthy | connections/s | status writes in {window:?} |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut worst_memory: Option<(String, f64)> = None;
    let mut worst_cpu: Option<(String, f64)> = None;
    for phase in results {
        let (memory, cpu) = per_endpoint(phase);
        let (memory_ratio, cpu_ratio) = match (healthy, phase.backends) {
            (_, Backends::None) | (None, _) => (f64::NAN, f64::NAN),
            (Some((healthy_memory, healthy_cpu)), _) => (memory / healthy_memory, cpu / healthy_cpu),
        };
        if matches!(phase.backends, Backends::Hand(b) if b != Behaviour::Healthy) {
            if worst_memory.as_ref().is_none_or(|(_, r)| memory_ratio > *r) {
                worst_memory = Some((phase.backends.name(), memory_ratio));
            }
            if worst_cpu.as_ref().is_none_or(|(_, r)| cpu_ratio > *r) {
                worst_cpu = Some((phase.backends.name(), cpu_ratio));
            }
        }
        let (memory, cpu) = if phase.backends == Backends::None {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{memory:.1}"), format!("{cpu:.3}"))
        };
        println!(
            "| {} | {} | {} | {:.1?} | {:.1} ({:.1}) | {memory} | {memory_ratio:.2} | {:.1} | {cpu} | {cpu_ratio:.2} | {:.1} | {} |",
            phase.backends.name(),
            phase.endpoints,
            phase.judged,
            phase.judged_after,
            phase.rss_kib as f64 / 1024.0,
            phase.peak_rss_kib as f64 / 1024.0,
            phase.cpu * 100.0,
            phase.connections_per_second,
            phase.status_writes,
        );
    }
    if let Some((healthy_memory, healthy_cpu)) = healthy {
        println!("healthy (hand-made) per endpoint: memory = {healthy_memory:.1} KiB, CPU = {healthy_cpu:.3} ms/s");
    }
    if let (Some((memory_name, memory_ratio)), Some((cpu_name, cpu_ratio))) = (worst_memory, worst_cpu) {
        println!("worst memory per endpoint: {memory_name} = {memory_ratio:.2} x healthy");
        println!("worst CPU per endpoint: {cpu_name} = {cpu_ratio:.2} x healthy");
    }
}

/// Raises this process's open-file limit to its hard limit: a phase holds a listener and a
/// connection per endpoint.
#[allow(unsafe_code, reason = "getrlimit/setrlimit: std cannot raise the open-file limit")]
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}
