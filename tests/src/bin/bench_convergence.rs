//! Convergence against the peers users would otherwise pick: three clients of one Service, at
//! the same time, on the same control plane, EndpointSlice and backends:
//!   (1) the kubegrpc Rust client (`kubegrpc::Channel`), following the GrpcBackend's status
//!       written by the operator (in process), which health-checks every endpoint;
//!   (2) a grpc-go client resolving through github.com/sercand/kuberesolver/v6 with
//!       `round_robin` (`kuberesolver-client-go`, tests/peers): it watches the EndpointSlices
//!       itself and knows nothing of gRPC health;
//!   (3) the same with grpc-go's client-side health checking on (`healthCheckConfig`): each
//!       client keeps a grpc.health.v1 Watch stream to each backend.
//!
//! Each sends echo requests open loop at `BENCH_CONVERGENCE_RATE` per second (200). There are
//! 4 backends A-D in the slice and a fifth, E, that comes and goes. Per trial
//! (`BENCH_CONVERGENCE_TRIALS`, 100), each step starting at wall time t0:
//!   (a) E added to the slice (ready, and SERVING) -> each client's first reply from E;
//!   (b) E removed from the slice -> each client's last reply from E (clamped at 0 when none
//!       came after t0); "done" once E's last reply is 500 ms older than the latest from A-D;
//!   (c) B flipped NOT_SERVING -> each client's last reply from B, as (b). Plain kuberesolver
//!       never reacts to health: counted as "kept sending" when, read at t0 + 1 s, it still had
//!       a reply from B 500 ms or more after t0;
//!   (c') B SERVING again -> each client's first reply from B (restores the state).
//!
//! Every client's times are cleared just before t0. Each step comes at least the operator's
//! `status_write_interval` (1 s) + 100-300 ms after the previous status write, so that the
//! operator writes it at once rather than coalescing it into a later write (bench_xds_flip does
//! the same). Also printed: t0 -> the status showing the change, as a watch in this process sees
//! it (the operator's part, health verification included, plus one watch delivery).
//!
//!   cargo build --release --locked -p kubegrpc-tests --bin bench_convergence
//!   export KUBEGRPC_CONTROLPLANE_BIN=$(tests/controlplane/build.sh) KUBEGRPC_PEERS_DIR=$(tests/peers/build.sh)
//!   tests/netns-run.sh target/release/bench_convergence
//!
//! Options (environment): BENCH_CONVERGENCE_TRIALS (100), BENCH_CONVERGENCE_RATE (200).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc_crds::GrpcBackend;
use kubegrpc_echo::{EchoClient, EchoRequest, ServingStatus};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::start_backends,
    bench_support::{ms, now_ns, pace, percentile, setting},
    kuberesolver::{Failure, KuberesolverClient, KuberesolverOptions},
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    operator::InProcessOperator,
    wait,
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// A backend counts as no longer sent to once its last reply is this much older than the
/// latest replies from every other backend in use.
const QUIET: Duration = Duration::from_millis(500);
/// How long one step may take before a client counts as not converged in that trial.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// How often the clients' reply times are read while waiting.
const POLL: Duration = Duration::from_millis(20);
const NAME: &str = "echo";
const SLICE: &str = "echo-1";

// === The clients ===

/// Per backend, the Unix times (ns) of the first and latest successful replies since a reset.
#[derive(Default)]
struct Times {
    first: HashMap<String, i64>,
    last: HashMap<String, i64>,
}

/// The Rust client under steady open-loop load, recording reply times as the Go clients do.
struct RustLoad {
    times: Arc<Mutex<Times>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    sent: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl RustLoad {
    fn start(channel: kubegrpc::Channel, rate: u32) -> Self {
        let times = Arc::new(Mutex::new(Times::default()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let task = {
            let (times, failures, sent) = (times.clone(), failures.clone(), sent.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                loop {
                    tick.tick().await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let mut client = EchoClient::new(channel.clone());
                    let (times, failures) = (times.clone(), failures.clone());
                    tokio::spawn(async move {
                        let sent_at = now_ns();
                        let request = client.echo(EchoRequest {
                            message: "convergence".into(),
                            ..Default::default()
                        });
                        // The same deadline as the Go clients' calls.
                        match tokio::time::timeout(Duration::from_secs(2), request).await {
                            Ok(Ok(reply)) => {
                                let at = now_ns();
                                let backend = reply.into_inner().backend;
                                let mut times = times.lock().unwrap();
                                times.first.entry(backend.clone()).or_insert(at);
                                times.last.insert(backend, at);
                            }
                            outcome => {
                                let (code, message) = match outcome {
                                    Ok(Err(status)) => (format!("{:?}", status.code()), status.message().to_string()),
                                    _ => ("DeadlineExceeded".into(), "no reply within 2s".into()),
                                };
                                failures.lock().unwrap().push(Failure {
                                    sent: sent_at,
                                    code,
                                    message,
                                });
                            }
                        }
                    });
                }
            })
        };
        Self {
            times,
            failures,
            sent,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

enum Peer {
    Rust(RustLoad),
    Go(KuberesolverClient),
}

/// One of the three clients, with its request totals over the trials.
struct Client {
    label: &'static str,
    peer: Peer,
    sent: u64,
    failed: BTreeMap<String, u64>,
}

impl Client {
    fn new(label: &'static str, peer: Peer) -> Self {
        Self {
            label,
            peer,
            sent: 0,
            failed: BTreeMap::new(),
        }
    }

    async fn first(&self) -> Result<BTreeMap<String, i64>> {
        match &self.peer {
            Peer::Rust(load) => Ok(load.times.lock().unwrap().first.clone().into_iter().collect()),
            Peer::Go(client) => client.first().await,
        }
    }

    async fn last(&self) -> Result<BTreeMap<String, i64>> {
        match &self.peer {
            Peer::Rust(load) => Ok(load.times.lock().unwrap().last.clone().into_iter().collect()),
            Peer::Go(client) => client.last().await,
        }
    }

    /// Clears the reply times (and, for a Go client, adds its window's counts to the totals).
    async fn reset(&mut self) -> Result<()> {
        match &self.peer {
            Peer::Rust(load) => *load.times.lock().unwrap() = Times::default(),
            Peer::Go(client) => {
                let counts = client.reset().await?;
                self.sent += counts.sent;
                for (code, n) in counts.failed {
                    *self.failed.entry(code).or_default() += n;
                }
            }
        }
        Ok(())
    }

    async fn failures(&self) -> Result<Vec<Failure>> {
        match &self.peer {
            Peer::Rust(load) => Ok(load.failures.lock().unwrap().clone()),
            Peer::Go(client) => client.failures().await,
        }
    }

    fn log_tail(&self) -> String {
        match &self.peer {
            Peer::Rust(_) => String::new(),
            Peer::Go(client) => client.log_tail(10),
        }
    }
}

// === The GrpcBackend's status ===

/// The status as a watch in this process sees it: per endpoint (`ip:port`) whether it is
/// usable, and the Unix time (ns) at which the status last changed (a status write).
#[derive(Clone, Default)]
struct Seen {
    usable: BTreeMap<String, bool>,
    status: String,
    changed_at: i64,
}

fn follow_status(api: Api<GrpcBackend>) -> (watch::Receiver<Seen>, AbortOnDropHandle<()>) {
    let (sender, receiver) = watch::channel(Seen::default());
    let task = tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(event) = stream.next().await {
            let Ok(backend) = event else { continue };
            let seen = now_ns();
            let status = serde_json::to_string(&backend.status).unwrap_or_default();
            let usable = backend
                .status
                .iter()
                .flat_map(|s| &s.endpoints)
                .map(|e| (format!("{}:{}", e.address, e.port), e.is_usable()))
                .collect();
            sender.send_if_modified(|state| {
                let changed = state.status != status;
                if changed {
                    *state = Seen {
                        usable,
                        status,
                        changed_at: seen,
                    };
                }
                changed
            });
        }
    });
    (receiver, AbortOnDropHandle::new(task))
}

/// Waits until the status satisfies `check`; returns when this process saw that status.
async fn status_until(status: &mut watch::Receiver<Seen>, what: &str, check: impl Fn(&Seen) -> bool) -> Result<i64> {
    let seen = tokio::time::timeout(STEP_DEADLINE, status.wait_for(|s| check(s)))
        .await
        .with_context(|| format!("{what}: not seen in the status within {STEP_DEADLINE:?}"))??;
    Ok(seen.changed_at)
}

// === Figures ===

/// One client's figures for one measure.
#[derive(Default, Clone)]
struct Figures {
    /// Milliseconds, one per trial that converged.
    values: Vec<f64>,
    /// Trials with no reply from the backend after t0 (a "last reply" clamped at 0).
    clamped: u32,
    /// Trials in which the client did not converge within the step deadline.
    missed: u32,
    /// (c), plain kuberesolver: trials in which it still had replies from B QUIET after t0.
    kept_sending: u32,
}

impl Figures {
    fn sorted(&self) -> Vec<f64> {
        let mut values = self.values.clone();
        values.sort_by(f64::total_cmp);
        values
    }

    fn p50(&self) -> f64 {
        percentile(&self.sorted(), 0.5)
    }

    fn p95(&self) -> f64 {
        percentile(&self.sorted(), 0.95)
    }

    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    fn mean(&self) -> f64 {
        self.values.iter().sum::<f64>() / self.values.len().max(1) as f64
    }
}

/// The clients in order: kubegrpc, kuberesolver, kuberesolver + health checking.
const CLIENTS: usize = 3;
const KUBEGRPC: usize = 0;
const PLAIN: usize = 1;
const HEALTH: usize = 2;

#[derive(Default)]
struct Measure {
    clients: [Figures; CLIENTS],
    /// t0 -> the status showing the change (ms).
    status: Vec<f64>,
}

/// Waits until each client's `done` gives a time for the backend, or the step deadline passes;
/// returns the time per client (None: not converged).
async fn per_client<F>(clients: &[Client], skip: &[usize], mut done: F) -> Result<[Option<i64>; CLIENTS]>
where
    F: AsyncFnMut(usize, &Client) -> Result<Option<i64>>,
{
    let mut found = [None; CLIENTS];
    let give_up = tokio::time::Instant::now() + STEP_DEADLINE;
    loop {
        for (i, client) in clients.iter().enumerate() {
            if found[i].is_none() && !skip.contains(&i) {
                found[i] = done(i, client).await?;
            }
        }
        let pending = (0..CLIENTS).any(|i| found[i].is_none() && !skip.contains(&i));
        if !pending || tokio::time::Instant::now() > give_up {
            return Ok(found);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `last` shows `backend` quiet: its last reply (0 if none) at least [`QUIET`] older
/// than the latest replies from each of `others`. Returns that last reply.
fn quiet(last: &BTreeMap<String, i64>, backend: &str, others: &[&String]) -> Option<i64> {
    let backend_last = last.get(backend).copied().unwrap_or(0);
    let mut oldest_other = i64::MAX;
    for other in others {
        oldest_other = oldest_other.min(last.get(*other).copied()?);
    }
    (oldest_other - backend_last >= QUIET.as_nanos() as i64).then_some(backend_last)
}

#[tokio::main]
async fn main() -> Result<()> {
    let trials = setting("BENCH_CONVERGENCE_TRIALS", 100).max(1) as usize;
    let rate = setting("BENCH_CONVERGENCE_RATE", 200).max(1) as u32;
    eprintln!("starting the control plane, the operator and 5 backends...");
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let kube = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&kube, "bench-convergence").await?;
    let operator = InProcessOperator::start(kube.clone(), &namespace);
    let backends = start_backends(5).await?;
    let addresses: Vec<String> = backends.iter().map(|b| b.address.to_string()).collect();
    let endpoints: Vec<SliceEndpoint> = backends
        .iter()
        .enumerate()
        .map(|(i, backend)| SliceEndpoint {
            pod: Some(format!("echo-{i}")),
            ..SliceEndpoint::ready(backend.address)
        })
        .collect();
    let (four, all) = (&endpoints[..4], &endpoints[..]);
    let b = &addresses[1];
    let e = &addresses[4];
    let a_to_d: Vec<&String> = addresses[..4].iter().collect();
    let not_b: Vec<&String> = [0, 2, 3].iter().map(|i| &addresses[*i]).collect();
    create_service(&kube, &namespace, NAME, &[("grpc", 80)]).await?;
    apply_slice(&kube, &namespace, NAME, SLICE, "grpc", four).await?;
    // Watch mode (the default): a NOT_SERVING flip reaches the prober at once; a quiet stream
    // gets a Check every second.
    let health_check = json!({"mode": "Watch", "interval": "1s", "timeout": "500ms",
                              "healthyThreshold": 1, "unhealthyThreshold": 3});
    create_grpc_backend(
        &kube,
        &namespace,
        NAME,
        json!({"service": NAME, "port": "grpc", "healthCheck": health_check}),
    )
    .await?;
    let api: Api<GrpcBackend> = Api::namespaced(kube.clone(), &namespace);
    let (mut status, _follow) = follow_status(api.clone());
    status_until(&mut status, "4 usable endpoints", |s| {
        a_to_d.iter().all(|a| s.usable.get(*a) == Some(&true))
    })
    .await?;

    // The three clients, at the same time, each at `rate`.
    let channel = kubegrpc::Channel::builder(kube.clone(), &namespace, NAME)
        .connect()
        .await?;
    tokio::time::timeout(STEP_DEADLINE, channel.ready()).await?;
    let go = |health_check| KuberesolverOptions {
        namespace: namespace.clone(),
        service: NAME.into(),
        port: "grpc".into(),
        health_check,
        rate,
    };
    let mut clients = [
        Client::new("kubegrpc", Peer::Rust(RustLoad::start(channel.clone(), rate))),
        Client::new(
            "kuberesolver",
            Peer::Go(KuberesolverClient::start(&control_plane, go(false)).await?),
        ),
        Client::new(
            "kuberesolver+health",
            Peer::Go(KuberesolverClient::start(&control_plane, go(true)).await?),
        ),
    ];
    let warm = now_ns();
    wait::until("replies from A-D to every client", STEP_DEADLINE, || async {
        for client in &clients {
            let last = client.last().await?;
            if !a_to_d.iter().all(|a| last.get(*a).is_some_and(|t| *t > warm)) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let rust_sent_before = match &clients[KUBEGRPC].peer {
        Peer::Rust(load) => load.sent.load(Ordering::Relaxed),
        Peer::Go(_) => 0,
    };
    // Each step's start (t0) and name, to attribute failed calls by the time they were sent.
    let mut steps: Vec<(i64, usize)> = Vec::new();
    for client in &mut clients {
        client.reset().await?;
        client.sent = 0;
        client.failed.clear();
    }

    eprintln!(
        "{trials} trials (A-D {:?}, E {e}, B {b}), 3 clients at {rate}/s each, at the same time",
        &a_to_d
    );
    let mut added = Measure::default();
    let mut removed = Measure::default();
    let mut flipped = Measure::default();
    let mut back = Measure::default();
    let write_interval = kubegrpc_operator::Settings::default().status_write_interval;
    let mut jitter = now_ns() as u64 | 1;
    let mut next_pause = move || {
        // 100-300 ms past the write interval, so that steps do not fall in step with the ticks.
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        write_interval + Duration::from_millis(100 + jitter % 200)
    };
    let started = std::time::Instant::now();
    for trial in 1..=trials {
        // (a) E added -> first reply from E.
        pace(status.borrow().changed_at, next_pause()).await;
        for client in &mut clients {
            client.reset().await?;
        }
        let t0 = now_ns();
        steps.push((t0, 0));
        apply_slice(&kube, &namespace, NAME, SLICE, "grpc", all).await?;
        let seen = status_until(&mut status, "E usable", |s| s.usable.get(e) == Some(&true)).await?;
        added.status.push(ms(seen - t0));
        let firsts = per_client(&clients, &[], async |_, client| {
            Ok(client.first().await?.get(e).copied())
        })
        .await?;
        record_first(&mut added, &clients, firsts, t0, trial, "(a) E added");

        // (b) E removed -> last reply from E.
        pace(status.borrow().changed_at, next_pause()).await;
        for client in &mut clients {
            client.reset().await?;
        }
        let t0 = now_ns();
        steps.push((t0, 1));
        apply_slice(&kube, &namespace, NAME, SLICE, "grpc", four).await?;
        let seen = status_until(&mut status, "E gone", |s| !s.usable.contains_key(e)).await?;
        removed.status.push(ms(seen - t0));
        let lasts = per_client(&clients, &[], async |_, client| {
            Ok(quiet(&client.last().await?, e, &a_to_d))
        })
        .await?;
        record_last(&mut removed, &clients, lasts, t0, trial, "(b) E removed");

        // (c) B NOT_SERVING -> last reply from B (plain kuberesolver never stops: checked below).
        pace(status.borrow().changed_at, next_pause()).await;
        for client in &mut clients {
            client.reset().await?;
        }
        let t0 = now_ns();
        steps.push((t0, 2));
        backends[1].health.set("", ServingStatus::NotServing);
        let seen = status_until(&mut status, "B unusable", |s| s.usable.get(b) == Some(&false)).await?;
        flipped.status.push(ms(seen - t0));
        let lasts = per_client(&clients, &[PLAIN], async |_, client| {
            Ok(quiet(&client.last().await?, b, &not_b))
        })
        .await?;
        record_last(&mut flipped, &clients, lasts, t0, trial, "(c) B NOT_SERVING");
        // Plain kuberesolver: still answered by B well after the others stopped?
        pace(t0, 2 * QUIET).await;
        let plain_b = clients[PLAIN].last().await?.get(b).copied().unwrap_or(0);
        if plain_b - t0 >= QUIET.as_nanos() as i64 {
            flipped.clients[PLAIN].kept_sending += 1;
        } else {
            flipped.clients[PLAIN].values.push(ms((plain_b - t0).max(0)));
        }

        // (c') B SERVING again -> first reply from B.
        pace(status.borrow().changed_at, next_pause()).await;
        for client in &mut clients {
            client.reset().await?;
        }
        let t0 = now_ns();
        steps.push((t0, 3));
        backends[1].health.set("", ServingStatus::Serving);
        let seen = status_until(&mut status, "B usable", |s| s.usable.get(b) == Some(&true)).await?;
        back.status.push(ms(seen - t0));
        // Plain kuberesolver never stopped sending to B: nothing to measure.
        let firsts = per_client(&clients, &[PLAIN], async |_, client| {
            Ok(client.first().await?.get(b).copied())
        })
        .await?;
        record_first(&mut back, &clients, firsts, t0, trial, "(c') B SERVING");

        let cell = |m: &Measure, i: usize| m.clients[i].values.last().copied().unwrap_or(f64::NAN);
        println!(
            "trial {trial:>3}: (a) {:>6.1} {:>6.1} {:>6.1} | (b) {:>6.1} {:>6.1} {:>6.1} | (c) {:>6.1} {:>6} {:>6.1} | status a {:>6.1} b {:>6.1} c {:>6.1}",
            cell(&added, 0),
            cell(&added, 1),
            cell(&added, 2),
            cell(&removed, 0),
            cell(&removed, 1),
            cell(&removed, 2),
            cell(&flipped, 0),
            if flipped.clients[PLAIN].kept_sending as usize == trial - flipped.clients[PLAIN].values.len() {
                "never".to_string()
            } else {
                format!("{:.1}", cell(&flipped, 1))
            },
            cell(&flipped, 2),
            added.status.last().unwrap_or(&f64::NAN),
            removed.status.last().unwrap_or(&f64::NAN),
            flipped.status.last().unwrap_or(&f64::NAN),
        );
    }
    let elapsed = started.elapsed();
    for client in &mut clients {
        client.reset().await?;
    }
    if let Peer::Rust(load) = &clients[KUBEGRPC].peer {
        clients[KUBEGRPC].sent = load.sent.load(Ordering::Relaxed) - rust_sent_before;
    }

    report(
        &clients,
        [&added, &removed, &flipped, &back],
        trials,
        rate,
        elapsed,
        write_interval,
    );
    report_failures(&clients, &steps).await?;
    println!(
        "status writes of the GrpcBackend: {}",
        operator.status_writes(&namespace, NAME)
    );
    drop(clients);
    operator.stop().await;
    Ok(())
}

fn record_first(
    measure: &mut Measure,
    clients: &[Client],
    firsts: [Option<i64>; CLIENTS],
    t0: i64,
    trial: usize,
    step: &str,
) {
    for (i, first) in firsts.into_iter().enumerate() {
        if i == PLAIN && step.starts_with("(c')") {
            continue; // it never stopped sending to B
        }
        match first {
            Some(at) => measure.clients[i].values.push(ms(at - t0)),
            None => {
                measure.clients[i].missed += 1;
                eprintln!(
                    "trial {trial} {step}: {} did not converge within {STEP_DEADLINE:?}\n{}",
                    clients[i].label,
                    clients[i].log_tail()
                );
            }
        }
    }
}

fn record_last(
    measure: &mut Measure,
    clients: &[Client],
    lasts: [Option<i64>; CLIENTS],
    t0: i64,
    trial: usize,
    step: &str,
) {
    for (i, last) in lasts.into_iter().enumerate() {
        if i == PLAIN && step.starts_with("(c)") {
            continue; // judged separately: it never stops
        }
        match last {
            Some(at) => {
                if at < t0 {
                    measure.clients[i].clamped += 1;
                }
                measure.clients[i].values.push(ms((at - t0).max(0)));
            }
            None => {
                measure.clients[i].missed += 1;
                eprintln!(
                    "trial {trial} {step}: {} still sending after {STEP_DEADLINE:?}\n{}",
                    clients[i].label,
                    clients[i].log_tail()
                );
            }
        }
    }
}

const STEP_NAMES: [&str; 4] = ["(a) E added", "(b) E removed", "(c) B NOT_SERVING", "(c') B SERVING"];

/// Failed calls per client and step (by the time each was sent), with the first message of each.
async fn report_failures(clients: &[Client], steps: &[(i64, usize)]) -> Result<()> {
    let first_t0 = steps.first().map_or(i64::MAX, |s| s.0);
    println!();
    println!("| failed calls (by the step they were sent in) | client | count | codes | first message |");
    println!("|---|---|---|---|---|");
    for client in clients {
        let failures = client.failures().await?;
        let mut per_step: BTreeMap<usize, (u64, BTreeMap<String, u64>, String)> = BTreeMap::new();
        let mut before = 0;
        for failure in failures {
            if failure.sent < first_t0 {
                before += 1;
                continue;
            }
            let step = steps.partition_point(|(t0, _)| *t0 <= failure.sent).saturating_sub(1);
            let entry = per_step.entry(steps[step].1).or_default();
            entry.0 += 1;
            *entry.1.entry(failure.code.clone()).or_default() += 1;
            if entry.2.is_empty() {
                entry.2 = failure.message.chars().take(160).collect();
            }
        }
        for (step, (count, codes, message)) in per_step {
            println!(
                "| {} | {} | {count} | {codes:?} | {} |",
                STEP_NAMES[step],
                client.label,
                message.replace('|', "/")
            );
        }
        if before > 0 {
            println!("| before the first trial | {} | {before} | | |", client.label);
        }
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

fn ratio(a: f64, b: f64) -> String {
    if b >= 0.5 {
        format!("{:.2}", a / b)
    } else {
        format!("n/a ({b:.1} ms)")
    }
}

fn report(
    clients: &[Client],
    [added, removed, flipped, back]: [&Measure; 4],
    trials: usize,
    rate: u32,
    elapsed: Duration,
    write_interval: Duration,
) {
    println!();
    println!(
        "{trials} trials in {:.1} min; 4 backends (+1 added and removed) behind one Service and EndpointSlice; \
         3 clients at {rate}/s each at the same time (a backend gets a request about every {:.0} ms from each); \
         operator health check Watch, interval 1s, timeout 500ms, thresholds 1/3; each step >= {:?} + 100-300 ms \
         after the previous status write; quiet = {} ms",
        elapsed.as_secs_f64() / 60.0,
        4000.0 / f64::from(rate),
        write_interval,
        QUIET.as_millis()
    );
    println!("| measure | client | p50 (ms) | p95 (ms) | max (ms) | mean (ms) | notes |");
    println!("|---|---|---|---|---|---|---|");
    let measures = [
        ("(a) endpoint added -> first reply", added),
        ("(b) endpoint removed -> last reply", removed),
        ("(c) NOT_SERVING -> last reply", flipped),
        ("(c') SERVING again -> first reply", back),
    ];
    for (label, measure) in measures {
        let status = Figures {
            values: measure.status.clone(),
            ..Figures::default()
        };
        println!(
            "| {label} | (status seen, operator's part) | {:.1} | {:.1} | {:.1} | {:.1} | |",
            status.p50(),
            status.p95(),
            status.max(),
            status.mean()
        );
        for (i, client) in clients.iter().enumerate() {
            let figures = &measure.clients[i];
            let mut notes = Vec::new();
            if figures.clamped > 0 {
                notes.push(format!("{} trials with no reply after t0 (0 ms)", figures.clamped));
            }
            if figures.missed > 0 {
                notes.push(format!(
                    "{} trials not converged within {STEP_DEADLINE:?}",
                    figures.missed
                ));
            }
            if figures.kept_sending > 0 {
                notes.push(format!(
                    "never stops: still answered by B >= {} ms after t0 in {} of {trials} trials",
                    QUIET.as_millis(),
                    figures.kept_sending
                ));
            }
            if figures.values.is_empty() && label.starts_with("(c')") && i == PLAIN {
                println!(
                    "| {label} | {} | n/a | n/a | n/a | n/a | never stopped sending to B |",
                    client.label
                );
            } else if figures.values.is_empty() {
                println!(
                    "| {label} | {} | never | never | never | never | {} |",
                    client.label,
                    notes.join("; ")
                );
            } else {
                println!(
                    "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    client.label,
                    figures.p50(),
                    figures.p95(),
                    figures.max(),
                    figures.mean(),
                    notes.join("; ")
                );
            }
        }
    }
    println!();
    let (a, b, c) = (&added.clients, &removed.clients, &flipped.clients);
    let missed = |f: &Figures| f.missed == 0;
    println!(
        "goal (a) kubegrpc p95 <= 300 ms (health verified): {:.1} ms -> {}; vs kuberesolver p95 {:.1} ms (no health check), \
         kuberesolver+health p95 {:.1} ms; kubegrpc/kuberesolver p95 {}",
        a[KUBEGRPC].p95(),
        verdict(a[KUBEGRPC].p95() <= 300.0 && missed(&a[KUBEGRPC])),
        a[PLAIN].p95(),
        a[HEALTH].p95(),
        ratio(a[KUBEGRPC].p95(), a[PLAIN].p95())
    );
    println!(
        "goal (b) kubegrpc p95 <= 200 ms: {:.1} ms -> {}; within 2x kuberesolver's p95 ({:.1} ms): ratio {} -> {}; \
         kuberesolver+health p95 {:.1} ms",
        b[KUBEGRPC].p95(),
        verdict(b[KUBEGRPC].p95() <= 200.0 && missed(&b[KUBEGRPC])),
        b[PLAIN].p95(),
        ratio(b[KUBEGRPC].p95(), b[PLAIN].p95()),
        verdict(b[KUBEGRPC].p95() <= 2.0 * b[PLAIN].p95().max(f64::EPSILON)),
        b[HEALTH].p95()
    );
    println!(
        "goal (c) kubegrpc p95 <= 100 ms: {:.1} ms -> {}; no worse than grpc-go health checking's p95 ({:.1} ms): ratio {} -> {}; \
         plain kuberesolver never stops sending to a NOT_SERVING backend ({} of {trials} trials still answered by it >= {} ms after t0)",
        c[KUBEGRPC].p95(),
        verdict(c[KUBEGRPC].p95() <= 100.0 && missed(&c[KUBEGRPC])),
        c[HEALTH].p95(),
        ratio(c[KUBEGRPC].p95(), c[HEALTH].p95()),
        verdict(c[KUBEGRPC].p95() <= c[HEALTH].p95()),
        c[PLAIN].kept_sending,
        QUIET.as_millis()
    );
    for client in clients {
        let failed: u64 = client.failed.values().sum();
        println!(
            "failed requests during the trials: {} {failed} of {} {:?}",
            client.label, client.sent, client.failed
        );
    }
}
