//! Heterogeneous backends, where load-aware weights matter: 3 echo backends doing the same
//! work per request (`BENCH_WORK_MS`, 10 ms held in a worker slot), two with 3 slots and one
//! with 1 (a third of the others' capacity). Open-loop load at a fixed rate (60% and 80% of the
//! total capacity), latency measured from each request's scheduled send time (so a queue
//! building up is seen, not hidden by a slower sender). Variants, alternating round by round:
//!   (A) kubegrpc, `Equal` policy (context: it overloads the weak backend),
//!   (B) kubegrpc, `LoadReport` policy (ORCA reports from each backend, weights by the operator),
//!   (C) tonic `Channel::balance_list` (p2c over connections of constant load: random),
//!   (D) tower p2c with PeakEwma over 3 tonic Channels (client-local load awareness).
//! Prints p50/p99/p99.9 and each backend's share per variant and load, and the ratios the issue
//! sets goals for: B's p99 against C's and D's.
//!
//!   make bench        (builds in release and runs inside the private network namespace)
//!
//! Options (environment): BENCH_WEIGHTS_SECONDS per round (10), BENCH_WEIGHTS_ROUNDS (5),
//! BENCH_WORK_MS (10).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use kubegrpc_echo::{BackendOptions, EchoClient, EchoRequest};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::start_backend,
    bench_support::setting,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    operator::InProcessOperator,
    wait,
};
use serde_json::json;
use tower::{balance::p2c::Balance, buffer::Buffer, discover::ServiceList, load::PeakEwma};

const SLOTS: [usize; 3] = [3, 3, 1];
const LABELS: [&str; 4] = [
    "A kubegrpc Equal",
    "B kubegrpc LoadReport",
    "C tonic balance_list",
    "D tower p2c PeakEwma",
];

/// What one round measured.
#[derive(Default)]
struct Round {
    latencies: Vec<Duration>,
    by_backend: BTreeMap<String, u64>,
    failures: u64,
}

impl Round {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    fn merge(rounds: &[Round]) -> Round {
        let mut merged = Round::default();
        for round in rounds {
            merged.latencies.extend(&round.latencies);
            for (backend, count) in &round.by_backend {
                *merged.by_backend.entry(backend.clone()).or_default() += count;
            }
            merged.failures += round.failures;
        }
        merged
    }
}

/// Sends at `rate` per second for `length`, one task per request (open loop), and waits for
/// every answer.
async fn run<S>(service: S, rate: u32, length: Duration) -> Round
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let round = Arc::new(Mutex::new(Round::default()));
    let period = Duration::from_secs(1) / rate;
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(start, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let count = (length.as_secs_f64() * f64::from(rate)) as u64;
    for _ in 0..count {
        let scheduled = tick.tick().await;
        let mut client = EchoClient::new(service.clone());
        let round = round.clone();
        tasks.spawn(async move {
            let answer = client
                .echo(EchoRequest {
                    message: "x".into(),
                    ..Default::default()
                })
                .await;
            let latency = scheduled.elapsed();
            let mut round = round.lock().unwrap();
            match answer {
                Ok(reply) => {
                    round.latencies.push(latency);
                    *round.by_backend.entry(reply.into_inner().backend).or_default() += 1;
                }
                Err(_) => round.failures += 1,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(round)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let length = Duration::from_secs(setting("BENCH_WEIGHTS_SECONDS", 10));
    let rounds = setting("BENCH_WEIGHTS_ROUNDS", 5).max(1) as usize;
    let work = Duration::from_millis(setting("BENCH_WORK_MS", 10));
    eprintln!("starting the control plane, the operator and 3 backends...");
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "bench-weights").await?;
    let operator = InProcessOperator::start(client.clone(), &namespace);
    let mut backends = Vec::new();
    for slots in SLOTS {
        backends.push(
            start_backend(BackendOptions {
                capacity: Some(slots),
                work,
                orca: true,
                ..Default::default()
            })
            .await?,
        );
    }
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    create_service(&client, &namespace, "echo", &[("grpc", 80)]).await?;
    let slice: Vec<SliceEndpoint> = addresses.iter().map(|a| SliceEndpoint::ready(*a)).collect();
    apply_slice(&client, &namespace, "echo", "echo-1", "grpc", &slice).await?;
    create_grpc_backend(&client, &namespace, "equal", json!({"service": "echo", "port": "grpc"})).await?;
    create_grpc_backend(
        &client,
        &namespace,
        "load",
        json!({"service": "echo", "port": "grpc", "weighting": {"policy": "LoadReport",
               "loadReport": {"reportInterval": "1s", "blackoutPeriod": "5s"}}}),
    )
    .await?;

    let equal = kubegrpc::Channel::builder(client.clone(), &namespace, "equal")
        .connect()
        .await?;
    let load = kubegrpc::Channel::builder(client.clone(), &namespace, "load")
        .connect()
        .await?;
    tokio::time::timeout(Duration::from_secs(30), equal.ready()).await?;
    tokio::time::timeout(Duration::from_secs(30), load.ready()).await?;
    let endpoint = |a: &SocketAddr| tonic::transport::Endpoint::from_shared(format!("http://{a}")).expect("endpoint");
    let balanced = tonic::transport::Channel::balance_list(addresses.iter().map(endpoint));
    let mut ewma = Vec::new();
    for address in &addresses {
        // tower's defaults as linkerd uses them: 30 ms initial RTT estimate, 10 s decay.
        ewma.push(PeakEwma::new(
            endpoint(address).connect().await?,
            Duration::from_millis(30),
            Duration::from_secs(10).as_nanos() as f64,
            tower::load::CompleteOnResponse::default(),
        ));
    }
    let p2c_ewma = Buffer::new(Balance::new(ServiceList::new(ewma)), 1024);

    let capacity: f64 = SLOTS.iter().map(|s| *s as f64 / work.as_secs_f64()).sum();
    // Warm up (and let the LoadReport weights through their blackout): the weights come from
    // load, so send some.
    eprintln!("warming up: {capacity:.0} req/s of total capacity; waiting for the LoadReport weights");
    let warm = (capacity * 0.5) as u32;
    run(load.clone(), warm, Duration::from_secs(8)).await;
    wait::until("LoadReport weights published", Duration::from_secs(60), || {
        let load = load.clone();
        async move {
            let snapshot = load.snapshot();
            let weights: Vec<u32> = snapshot.endpoints.iter().map(|e| e.weight).collect();
            Ok((weights.len() == 3 && weights.iter().any(|w| *w != 100)).then_some(weights))
        }
    })
    .await
    .map(|weights| eprintln!("LoadReport weights {weights:?} for slots {SLOTS:?}"))?;

    let writes_at_start = operator.status_writes(&namespace, "load");
    let started = std::time::Instant::now();
    let mut table = Vec::new();
    for fraction in [0.6, 0.8] {
        let rate = (capacity * fraction) as u32;
        let mut results: Vec<Vec<Round>> = (0..LABELS.len()).map(|_| Vec::new()).collect();
        for round in 1..=rounds {
            for (variant, label) in LABELS.iter().enumerate() {
                let measured = match variant {
                    0 => run(equal.clone(), rate, length).await,
                    1 => run(load.clone(), rate, length).await,
                    2 => run(balanced.clone(), rate, length).await,
                    _ => run(p2c_ewma.clone(), rate, length).await,
                };
                println!(
                    "load {:.0}% round {round} {label:<24} p50 {:>7.1}ms p99 {:>8.1}ms p99.9 {:>8.1}ms failures {}",
                    fraction * 100.0,
                    measured.percentile(0.5).as_secs_f64() * 1e3,
                    measured.percentile(0.99).as_secs_f64() * 1e3,
                    measured.percentile(0.999).as_secs_f64() * 1e3,
                    measured.failures
                );
                // `run` waited for every answer: no queue is left for the next variant.
                results[variant].push(measured);
            }
        }
        // Per-round p99 ratios against the variant measured right next to it, then their median:
        // one bad round (a client-local balancer lagging a queue) moves the pooled p99 a lot.
        let median_ratio = |of: usize, to: usize| {
            let mut ratios: Vec<f64> = results[of]
                .iter()
                .zip(&results[to])
                .map(|(x, y)| x.percentile(0.99).as_secs_f64() / y.percentile(0.99).as_secs_f64())
                .collect();
            ratios.sort_by(f64::total_cmp);
            ratios[ratios.len() / 2]
        };
        let medians = (median_ratio(1, 2), median_ratio(1, 3));
        table.push((
            fraction,
            rate,
            results.iter().map(|r| Round::merge(r)).collect::<Vec<_>>(),
            medians,
        ));
    }

    println!();
    println!(
        "3 backends, {work:?} of work per request, slots {SLOTS:?} (capacity {capacity:.0} req/s); {rounds} rounds of {length:?} per variant and load"
    );
    println!(
        "| load | variant | p50 ms | p99 ms | p99.9 ms | shares (slots {}) | failures |",
        SLOTS.map(|s| s.to_string()).join("/")
    );
    println!("|---|---|---|---|---|---|---|");
    for (fraction, rate, merged, (median_c, median_d)) in &table {
        for (label, round) in LABELS.iter().zip(merged) {
            let total: u64 = round.by_backend.values().sum();
            let shares: Vec<String> = addresses
                .iter()
                .map(|a| {
                    let count = round.by_backend.get(&a.to_string()).copied().unwrap_or(0);
                    format!("{:.0}%", count as f64 * 100.0 / total.max(1) as f64)
                })
                .collect();
            println!(
                "| {:.0}% ({rate}/s) | {label} | {:.1} | {:.1} | {:.1} | {} | {} |",
                fraction * 100.0,
                round.percentile(0.5).as_secs_f64() * 1e3,
                round.percentile(0.99).as_secs_f64() * 1e3,
                round.percentile(0.999).as_secs_f64() * 1e3,
                shares.join(" "),
                round.failures
            );
        }
        let p99 = |i: usize| merged[i].percentile(0.99).as_secs_f64();
        println!(
            "load {:.0}%: p99 LoadReport / balance_list = {:.2} (goal <= 0.5), LoadReport / PeakEwma = {:.2} (goal <= 1.2); \
             median of per-round p99 ratios: {median_c:.2} and {median_d:.2}",
            fraction * 100.0,
            p99(1) / p99(2),
            p99(1) / p99(3)
        );
    }
    // A busy GrpcBackend: load on and off, at two rates, for the whole run.
    let writes = operator.status_writes(&namespace, "load") - writes_at_start;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "status writes of the LoadReport GrpcBackend during the measured rounds: {writes} in {minutes:.1} min \
         ({:.2} per minute)",
        writes as f64 / minutes
    );
    operator.stop().await;
    Ok(())
}
