//! Unary echo throughput and latency at fixed concurrency over 3 backends, alternating:
//!   (A) the kubegrpc channel (following a GrpcBackend on the real control plane),
//!   (B) a tonic `Channel` to one backend (the baseline without any balancing),
//!   (C) tonic's `Channel::balance_list` over the same 3 backends,
//!   (A') the kubegrpc channel with transparent retry off (what retryability costs),
//!   (D) the zero-overhead ideal: 3 tonic `Channel`s to the same backends with an atomic round
//!       robin over them (no discovery, no health, no weights: the least a balancer can cost).
//! Prints each round, then per concurrency the medians of the per-round ratios: throughput A/B,
//! A/C, A/D, CPU per request (whole process) and heap allocations per request (whole process:
//! client and backends, counted by this binary's allocator; the backends' share is the same for
//! every variant, so differences are the clients').
//!
//!   make bench        (builds in release and runs inside the private network namespace)
//!
//! Options (environment): BENCH_SECONDS per round (5), BENCH_ROUNDS (5), BENCH_CONCURRENCY
//! (callers, a comma-separated list: "1,32,128").

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Result;
use kube::api::{Patch, PatchParams};
use kubegrpc_echo::{BackendOptions, EchoClient, EchoRequest};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions, backends::start_backend, bench_support::setting, objects::create_grpc_backend,
};
use serde_json::json;

/// The system allocator, counting allocations (a relaxed increment: cheap next to malloc).
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
#[allow(unsafe_code, reason = "counting allocations needs a GlobalAlloc, an unsafe trait")]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Variant D: an atomic round robin over tonic `Channel`s, each request sent with
/// `oneshot` (ready, then call) on a clone of the chosen channel: no box, no wrapping.
#[derive(Clone)]
struct RoundRobin {
    channels: Arc<[tonic::transport::Channel]>,
    next: Arc<AtomicUsize>,
}

impl tower::Service<http::Request<tonic::body::Body>> for RoundRobin {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tower::util::Oneshot<tonic::transport::Channel, http::Request<tonic::body::Body>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        tower::ServiceExt::oneshot(self.channels[index].clone(), request)
    }
}

struct Round {
    requests: u64,
    failures: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU time of the whole process (client, backends) during the round: steadier than
    /// throughput on a machine shared with other work.
    cpu: Duration,
    /// Heap allocations of the whole process during the round.
    allocations: u64,
}

/// User + system CPU time of this process so far.
#[allow(unsafe_code, reason = "getrusage(2): std has no process CPU time")]
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let time = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    time(usage.ru_utime) + time(usage.ru_stime)
}

impl Round {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_request(&self) -> Duration {
        self.cpu / self.requests.max(1) as u32
    }

    fn allocations_per_request(&self) -> f64 {
        self.allocations as f64 / self.requests.max(1) as f64
    }

    fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us.get(index).copied().unwrap_or(0)))
    }
}

async fn run<S>(service: S, concurrency: usize, length: Duration) -> Round
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu_before = process_cpu();
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = EchoClient::new(service.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                let mut failures = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match client
                        .echo(EchoRequest {
                            message: "bench".into(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(_) => latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                        Err(_) => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    let mut failures = 0;
    for worker in workers {
        let (latencies, failed) = worker.await.expect("bench worker");
        latencies_us.extend(latencies);
        failures += failed;
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    // Counted before sorting, which allocates nothing anyway (in place).
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    latencies_us.sort_unstable();
    Round {
        requests: latencies_us.len() as u64,
        failures,
        elapsed,
        latencies_us,
        cpu,
        allocations,
    }
}

fn merge(rounds: &[Round]) -> Round {
    let mut latencies_us: Vec<u32> = rounds.iter().flat_map(|r| r.latencies_us.iter().copied()).collect();
    latencies_us.sort_unstable();
    Round {
        requests: rounds.iter().map(|r| r.requests).sum(),
        failures: rounds.iter().map(|r| r.failures).sum(),
        elapsed: rounds.iter().map(|r| r.elapsed).sum(),
        latencies_us,
        cpu: rounds.iter().map(|r| r.cpu).sum(),
        allocations: rounds.iter().map(|r| r.allocations).sum(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let length = Duration::from_secs(setting("BENCH_SECONDS", 5));
    let rounds = setting("BENCH_ROUNDS", 5).max(1) as usize;
    let concurrencies: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,32,128".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|c| *c > 0)
        .collect();
    eprintln!("starting the control plane and 3 backends...");
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    bench(&control_plane, length, rounds, &concurrencies).await
}

async fn bench(control_plane: &ControlPlane, length: Duration, rounds: usize, concurrencies: &[usize]) -> Result<()> {
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "bench").await?;
    let backends = [
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
    ];
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    create_grpc_backend(&client, &namespace, "echo", json!({"service": "echo", "port": "grpc"})).await?;
    let entries: Vec<_> = addresses
        .iter()
        .map(|a| {
            json!({"address": a.ip().to_string(), "port": a.port(), "weight": 100, "health": "Serving",
                   "serving": true, "terminating": false})
        })
        .collect();
    kube::Api::<kubegrpc_crds::GrpcBackend>::namespaced(client.clone(), &namespace)
        .patch_status(
            "echo",
            &PatchParams::apply("kubegrpc-bench").force(),
            &Patch::Apply(json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
                                 "status": {"endpoints": entries}})),
        )
        .await?;

    let kubegrpc = kubegrpc::Channel::builder(client.clone(), &namespace, "echo")
        .connect()
        .await?;
    // The same without transparent retry: what keeping each request retryable costs.
    let kubegrpc_no_retry = kubegrpc::Channel::builder(client.clone(), &namespace, "echo")
        .transparent_retry(false)
        .connect()
        .await?;
    tokio::time::timeout(Duration::from_secs(30), kubegrpc.ready()).await?;
    tokio::time::timeout(Duration::from_secs(30), kubegrpc_no_retry.ready()).await?;
    let endpoint = |a: &SocketAddr| tonic::transport::Endpoint::from_shared(format!("http://{a}")).expect("endpoint");
    let single = endpoint(&addresses[0]).connect().await?;
    let balanced = tonic::transport::Channel::balance_list(addresses.iter().map(endpoint));
    let mut channels = Vec::new();
    for address in &addresses {
        channels.push(endpoint(address).connect().await?);
    }
    let round_robin = RoundRobin {
        channels: channels.into(),
        next: Arc::new(AtomicUsize::new(0)),
    };
    for &concurrency in concurrencies {
        let measure = |variant: usize, length: Duration| {
            let (kubegrpc, kubegrpc_no_retry, single, balanced, round_robin) = (
                kubegrpc.clone(),
                kubegrpc_no_retry.clone(),
                single.clone(),
                balanced.clone(),
                round_robin.clone(),
            );
            async move {
                match variant {
                    0 => run(kubegrpc, concurrency, length).await,
                    1 => run(single, concurrency, length).await,
                    2 => run(balanced, concurrency, length).await,
                    3 => run(kubegrpc_no_retry, concurrency, length).await,
                    _ => run(round_robin, concurrency, length).await,
                }
            }
        };
        measure_all(&measure, concurrency, length, rounds).await;
    }
    let per_backend: Vec<u64> = backends.iter().map(|b| b.counters.snapshot().requests).collect();
    println!("requests per backend over the whole run: {per_backend:?}");
    Ok(())
}

const LABELS: [&str; 5] = [
    "A kubegrpc channel",
    "B tonic Channel, 1 backend",
    "C tonic balance_list",
    "A' kubegrpc, no retry",
    "D ideal: 3 Channels, atomic RR",
];

async fn measure_all<F, Fut>(measure: &F, concurrency: usize, length: Duration, rounds: usize)
where
    F: Fn(usize, Duration) -> Fut,
    Fut: std::future::Future<Output = Round>,
{
    // Warm every connection, then alternate the variants so that drift affects each alike.
    for _ in 0..2 {
        for variant in 0..LABELS.len() {
            measure(variant, Duration::from_millis(500)).await;
        }
    }
    let mut results: Vec<Vec<Round>> = (0..LABELS.len()).map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (variant, label) in LABELS.iter().enumerate() {
            let measured = measure(variant, length).await;
            println!(
                "c{concurrency} round {round} {label:<32} {:>9.0} req/s  p50 {:>6}us  p99 {:>6}us  cpu/req {:>5.1}us  allocs/req {:>5.1}  failures {}",
                measured.throughput(),
                measured.percentile(0.5).as_micros(),
                measured.percentile(0.99).as_micros(),
                measured.cpu_per_request().as_secs_f64() * 1e6,
                measured.allocations_per_request(),
                measured.failures
            );
            results[variant].push(measured);
        }
    }
    // Ratios of each round against the baseline measured right next to it, then their median:
    // steadier on a shared machine than ratios of totals.
    let median_ratio = |of: usize, to: usize, measure: &dyn Fn(&Round) -> f64| {
        let mut values: Vec<f64> = results[of]
            .iter()
            .zip(&results[to])
            .map(|(x, y)| measure(x) / measure(y))
            .collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let throughput = |of: usize, to: usize| median_ratio(of, to, &Round::throughput);
    let cpu = |of: usize, to: usize| median_ratio(of, to, &|r: &Round| r.cpu_per_request().as_secs_f64());
    let median_allocations = |of: usize| {
        let mut values: Vec<f64> = results[of].iter().map(Round::allocations_per_request).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!();
    println!("concurrency {concurrency}, {rounds} rounds of {length:?} each, 3 backends in this process");
    for (variant, (label, rounds)) in LABELS.iter().zip(&results).enumerate() {
        let round = merge(rounds);
        println!(
            "{label:<32} {:>9.0} req/s  p50 {:>6}us  p99 {:>6}us  cpu/req {:>5.1}us  allocs/req {:>5.1}  failures {}",
            round.throughput(),
            round.percentile(0.5).as_micros(),
            round.percentile(0.99).as_micros(),
            round.cpu_per_request().as_secs_f64() * 1e6,
            median_allocations(variant),
            round.failures
        );
    }
    println!("(medians of per-round ratios)");
    println!(
        "throughput A/B = {:.2}  A/C = {:.2}  A/D = {:.2}  A'/B = {:.2}",
        throughput(0, 1),
        throughput(0, 2),
        throughput(0, 4),
        throughput(3, 1)
    );
    println!(
        "CPU per request A/D = {:.2} (goal <= 1.03)  A/C = {:.2}  A'/D = {:.2}  C/D = {:.2}  (whole process)",
        cpu(0, 4),
        cpu(0, 2),
        cpu(3, 4),
        cpu(2, 4)
    );
    println!(
        "allocations per request A - D = {:+.1} (goal <= +2)  A' - D = {:+.1}  C - D = {:+.1}  (whole process)",
        median_allocations(0) - median_allocations(4),
        median_allocations(3) - median_allocations(4),
        median_allocations(2) - median_allocations(4)
    );
}
