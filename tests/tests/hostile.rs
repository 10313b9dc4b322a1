//! The hostile-backend suite (issue 18): healthy tonic backends beside one hand-made backend of
//! each misbehaviour ([`kubegrpc_tests::hostile`]) in one GrpcBackend, against the real
//! apiserver and an in-process operator.
//!
//! What a user relies on: the operator stays up; every hostile endpoint ends NotServing with a
//! reason that says what happened (the ORCA liars, whose health is fine, get a bounded weight),
//! within what its health-check settings promise, and stays there however it reconnects; the
//! healthy endpoints stay Serving and their flips still reach the status; once the hostile
//! endpoints leave, the operator's tasks and descriptors are back where they were.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kubegrpc_crds::{GrpcBackendStatus, Health};
use kubegrpc_echo::{Backend, BackendOptions, ServingStatus};
use kubegrpc_operator::weights::{HYSTERESIS_PERCENT, MAX_TIMES_MEDIAN};
use kubegrpc_tests::{
    backends::start_backend,
    hostile::{Behaviour, CountersSnapshot, HostileBackend, KEEPALIVE_TIMEOUT, descriptor_census, memory_kib},
    operator::InProcessOperator,
    scenario::{Scenario, brief, endpoint},
    wait,
};
use serde_json::json;
use tokio_util::task::AbortOnDropHandle;

/// The GrpcBackend's health-check settings, and what they imply.
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const UNHEALTHY_THRESHOLD: u32 = 2;
/// The operator's default status write interval (coalescing).
const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Beyond the settings' bound: the slice write reaching the operator, the status write reaching
/// the test (two apiserver round trips and a watch), on a busy machine.
const CONTROL_PLANE_ALLOWANCE: Duration = Duration::from_secs(5);
/// For conditions with no bound of their own.
const DEADLINE: Duration = Duration::from_secs(60);

/// The suite and the bench's quick run take turns: each would make the other's machine busier
/// than a test run needs to be.
static ONE_HEAVY_TEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HEALTHY_ECHO: usize = 3;
const HONEST_REPORTERS: usize = 2;
/// Healthy flips timed per phase (half NOT_SERVING, half SERVING).
const FLIPS: usize = 10;

/// A Serving endpoint that breaks is NotServing after `unhealthyThreshold` failed probes, each
/// at most `interval + timeout` apart (a quiet interval, then the liveness Check's timeout),
/// plus one backoff (capped at `interval`) and one coalesced status write.
fn implied_bound() -> Duration {
    UNHEALTHY_THRESHOLD * (INTERVAL + TIMEOUT) + INTERVAL + WRITE_INTERVAL
}

fn spec() -> serde_json::Value {
    json!({
        "service": "echo",
        "port": "grpc",
        "healthCheck": {
            "interval": "1s",
            "timeout": "500ms",
            "unhealthyThreshold": UNHEALTHY_THRESHOLD,
            // Most endpoints here fail on purpose: the suite is about each endpoint's verdict,
            // not the fail-open rule, which would publish them all as usable.
            "panicThreshold": 0,
        },
        "weighting": {"policy": "LoadReport", "loadReport": {"reportInterval": "1s", "blackoutPeriod": "1s"}},
    })
}

/// What the status must say of a hostile endpoint in the end, as the prober names it.
fn expected_reason(behaviour: Behaviour) -> &'static str {
    match behaviour {
        Behaviour::Silent | Behaviour::Slow | Behaviour::ServingThenSilence | Behaviour::ServingThenTrickle => {
            "Timeout"
        }
        Behaviour::ServingThenGoAway | Behaviour::GoAwayRepeated | Behaviour::GoAwayFlood => "GoAway(NO_ERROR)",
        Behaviour::ServingThenReset => "Reset(INTERNAL_ERROR)",
        Behaviour::ServingThenHugeMessagePrefix => "MessageTooLarge",
        Behaviour::ServingThenBadHpack
        | Behaviour::ServingThenHugeFrameHeader
        | Behaviour::ServingThenHttp1
        | Behaviour::Http1
        | Behaviour::TlsBytes
        | Behaviour::PingFlood
        | Behaviour::SettingsFlood
        | Behaviour::RstStreamFlood => "ProtocolError",
        Behaviour::FlappingWatch => "Flapping",
        Behaviour::CheckAlwaysFails => "CallFailed(PERMISSION_DENIED)",
        Behaviour::TinyMessagesPacked => "HealthUnknown",
        Behaviour::Healthy
        | Behaviour::OrcaLiar
        | Behaviour::OrcaMalformed
        | Behaviour::OrcaHuge
        | Behaviour::MaxStreamsTwo
        | Behaviour::WindowZeroThenUpdate
        | Behaviour::KeepalivePings => "",
    }
}

/// One endpoint's entry as a watcher of the status saw it change.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    health: Health,
    reason: Option<String>,
    weight: u32,
}

/// Every change of every endpoint's (health, reason, weight) in the status, and every status's
/// weights, as a watch sees them.
#[derive(Clone, Default)]
struct Timeline(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    endpoints: HashMap<SocketAddr, Vec<Seen>>,
    /// Each status seen: every endpoint's health and weight.
    statuses: Vec<HashMap<SocketAddr, (Health, u32)>>,
}

impl Timeline {
    fn follow(&self, s: &Scenario) -> AbortOnDropHandle<()> {
        let timeline = self.clone();
        let api = s.backends();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let config = watcher::Config::default().fields("metadata.name=echo");
            let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
            while let Some(event) = stream.next().await {
                let Ok(backend) = event else { continue };
                if let Some(status) = backend.status {
                    timeline.record(&status);
                }
            }
        }))
    }

    fn record(&self, status: &GrpcBackendStatus) {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap();
        let mut weights = HashMap::new();
        for published in &status.endpoints {
            let Ok(ip) = published.address.parse::<IpAddr>() else {
                continue;
            };
            let Ok(port) = u16::try_from(published.port) else {
                continue;
            };
            let address = SocketAddr::new(ip, port);
            weights.insert(address, (published.health, published.weight));
            let seen = all.endpoints.entry(address).or_default();
            let changed = seen.last().is_none_or(|last| {
                (last.health, &last.reason, last.weight) != (published.health, &published.reason, published.weight)
            });
            if changed {
                seen.push(Seen {
                    at: now,
                    health: published.health,
                    reason: published.reason.clone(),
                    weight: published.weight,
                });
            }
        }
        all.statuses.push(weights);
    }

    fn of(&self, address: &SocketAddr) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .endpoints
            .get(address)
            .cloned()
            .unwrap_or_default()
    }

    fn statuses(&self) -> Vec<HashMap<SocketAddr, (Health, u32)>> {
        self.0.lock().unwrap().statuses.clone()
    }

    /// Whether `address` has been seen NotServing.
    fn was_not_serving(&self, address: &SocketAddr) -> bool {
        self.of(address).iter().any(|e| e.health == Health::NotServing)
    }
}

/// Times `FLIPS` flips of `backend` (NOT_SERVING, SERVING, ...) from the backend to a watcher
/// of the status. Each flip starts a write interval after the previous one was seen, so that
/// the test's own flips are not what coalescing holds back.
async fn time_flips(s: &Scenario, backend: &Backend) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(FLIPS);
    for flip in 0..FLIPS {
        tokio::time::sleep(WRITE_INTERVAL + Duration::from_millis(200)).await;
        let (status, health) = if flip % 2 == 0 {
            (ServingStatus::NotServing, Health::NotServing)
        } else {
            (ServingStatus::Serving, Health::Serving)
        };
        let started = Instant::now();
        backend.health.set("", status);
        s.watch_status("echo", DEADLINE, |st| {
            endpoint(st, &backend.address).is_some_and(|e| e.health == health)
        })
        .await
        .with_context(|| {
            format!(
                "flip {flip} of {} to {health:?} never reached the status",
                backend.address
            )
        })?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

fn summary(latencies: &[Duration]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
    format!(
        "p50 {:.0?}, p90 {:.0?}, max {:.0?} over {} flips",
        at(0.5),
        at(0.9),
        sorted[sorted.len() - 1],
        sorted.len()
    )
}

/// Counts panics anywhere in this test process: a panic in a prober's task would not stop the
/// operator, only silently freeze that endpoint's health.
fn count_panics() -> Arc<AtomicUsize> {
    let panics = Arc::new(AtomicUsize::new(0));
    let counted = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    panics
}

/// What the process holds that the hostile endpoints could leak.
#[derive(Clone, Copy, Debug)]
struct Resources {
    /// Descriptors other than the kube client's connections to the apiserver (its pool
    /// decides their number) and connections with hostile addresses.
    descriptors: usize,
    loopback_connections: usize,
    hostile_connections: usize,
    tasks: usize,
    rss_kib: u64,
}

fn resources(hostile: &HashSet<IpAddr>) -> Result<Resources> {
    let census = descriptor_census(hostile)?;
    Ok(Resources {
        descriptors: census.others(),
        loopback_connections: census.loopback_connections,
        hostile_connections: census.connections_with,
        tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        rss_kib: memory_kib(None, "VmRSS")?,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_backends_end_not_serving_and_cost_the_healthy_ones_nothing() -> Result<()> {
    let _turn = ONE_HEAVY_TEST.lock().await;
    let panics = count_panics();
    let s = Scenario::new("hostile").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);

    let mut echo = Vec::new();
    for _ in 0..HEALTHY_ECHO {
        echo.push(start_backend(BackendOptions::default()).await?);
    }
    let mut honest = Vec::new();
    for _ in 0..HONEST_REPORTERS {
        honest.push(HostileBackend::start(Behaviour::Healthy).await?);
    }
    let mut hostile = Vec::new();
    for behaviour in Behaviour::HOSTILE {
        hostile.push(HostileBackend::start(behaviour).await?);
    }
    let healthy: Vec<SocketAddr> = echo
        .iter()
        .map(|b| b.address)
        .chain(honest.iter().map(|b| b.address))
        .collect();
    let hostile_ips: HashSet<IpAddr> = hostile.iter().map(|b| b.address.ip()).collect();

    // Phase 1: the healthy endpoints alone.
    s.echo_service(&healthy).await?;
    s.grpc_backend("echo", spec()).await?;
    s.wait_status("echo", "every healthy endpoint Serving", DEADLINE, |st| {
        healthy
            .iter()
            .all(|a| endpoint(st, a).is_some_and(|e| e.health == Health::Serving))
    })
    .await?;
    let writes = || operator.status_writes(&s.namespace, "echo");
    let writes_before = writes();
    let alone = time_flips(&s, &echo[0]).await?;
    let alone_writes = writes() - writes_before;
    let baseline = resources(&hostile_ips)?;

    // Phase 2: one hostile endpoint of each behaviour beside them.
    let timeline = Timeline::default();
    let follower = timeline.follow(&s);
    let mut all = healthy.clone();
    all.extend(hostile.iter().map(|b| b.address));
    let added = Instant::now();
    s.echo_slice(&all).await?;
    // Flapping endpoints may be NotServing in one status and not the next: each hostile
    // endpoint must have been NotServing once here; whether it stayed so is judged below.
    let waited = wait::until("every hostile endpoint NotServing once", DEADLINE, || async {
        Ok(hostile
            .iter()
            .all(|b| b.behaviour.lies_about_load() || timeline.was_not_serving(&b.address))
            .then_some(()))
    })
    .await;
    if let Err(error) = waited {
        let status = s.backends().get("echo").await?.status;
        let missing: Vec<String> = hostile
            .iter()
            .filter(|b| !b.behaviour.lies_about_load() && !timeline.was_not_serving(&b.address))
            .map(|b| {
                let e = status.as_ref().and_then(|st| endpoint(st, &b.address));
                format!(
                    "{:?} {}: {:?} {:?} ({} connections)",
                    b.behaviour,
                    b.address,
                    e.map(|e| e.health),
                    e.and_then(|e| e.reason.clone()),
                    b.counters.snapshot().connections_accepted
                )
            })
            .collect();
        return Err(error.context(format!("never NotServing: {missing:#?}")));
    }
    println!(
        "every hostile endpoint NotServing {:.1?} after they were added",
        added.elapsed()
    );
    // The ORCA liars have sent what they lie with (the liar: for longer than the blackout)
    // before their weights are judged.
    let reports_to_judge = |behaviour| match behaviour {
        Behaviour::OrcaLiar => 5,
        Behaviour::OrcaMalformed => 7,
        _ => 1,
    };
    wait::until("every ORCA liar sent its reports", DEADLINE, || async {
        let sent: Vec<(Behaviour, u64)> = hostile
            .iter()
            .filter(|b| b.behaviour.lies_about_load())
            .map(|b| (b.behaviour, b.counters.snapshot().load_reports))
            .collect();
        ensure!(
            sent.iter().all(|(b, n)| *n >= reports_to_judge(*b)),
            "reports sent: {sent:?}"
        );
        Ok(Some(()))
    })
    .await?;

    let rss_samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let samples = rss_samples.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                if let Ok(rss) = memory_kib(None, "VmRSS") {
                    samples.lock().unwrap().push(rss);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    };
    let writes_before = writes();
    let beside = time_flips(&s, &echo[0]).await?;
    let beside_writes = writes() - writes_before;
    let with_hostile = resources(&hostile_ips)?;
    drop(sampler);
    drop(follower);
    let status = s.backends().get("echo").await?.status.context("no status")?;

    println!(
        "flip -> status, healthy endpoints alone: {} ({alone_writes} status writes meanwhile)",
        summary(&alone)
    );
    println!(
        "flip -> status, beside {} hostile endpoints: {} ({beside_writes} status writes meanwhile)",
        hostile.len(),
        summary(&beside)
    );
    println!(
        "hostile endpoints added {:.1?} ago; implied bound {:?} (+{:?} for the control plane)",
        added.elapsed(),
        implied_bound(),
        CONTROL_PLANE_ALLOWANCE
    );
    println!(
        "{:<30} {:<30} {:>9} {:>8} {:>7} {:>6} {:>9} {:>11}",
        "behaviour", "reason (published)", "NotServ.", "changes", "conns", "calls", "frames", "bytes"
    );
    let mut failures = Vec::new();
    for backend in &hostile {
        let seen = timeline.of(&backend.address);
        let counters = backend.counters.snapshot();
        let published = endpoint(&status, &backend.address);
        let first_not_serving = seen
            .iter()
            .position(|e| e.health == Health::NotServing)
            .map(|i| (i, seen[i].at.duration_since(added)));
        println!(
            "{:<30} {:<30} {:>9} {:>8} {:>7} {:>6} {:>9} {:>11}",
            backend.behaviour.name(),
            format!(
                "{:?} {}",
                published.map(|e| e.health),
                published.and_then(|e| e.reason.clone()).unwrap_or_default()
            ),
            first_not_serving.map_or("-".into(), |(_, after)| format!("{after:.1?}")),
            seen.len(),
            counters.connections_accepted,
            counters.calls,
            counters.frames_written,
            counters.bytes_written,
        );
        if backend.behaviour.lies_about_load() {
            continue;
        }
        let Some((index, after)) = first_not_serving else {
            failures.push(format!("{:?}: never NotServing ({seen:?})", backend.behaviour));
            continue;
        };
        if after > implied_bound() + CONTROL_PLANE_ALLOWANCE {
            failures.push(format!(
                "{:?}: NotServing only {after:?} after it was added (bound {:?})",
                backend.behaviour,
                implied_bound()
            ));
        }
        if let Some(back) = seen[index..].iter().find(|e| e.health != Health::NotServing) {
            failures.push(format!(
                "{:?}: back to {:?} {:.1?} after it was added, having been NotServing",
                backend.behaviour,
                back.health,
                back.at.duration_since(added)
            ));
        }
        let reason = published.and_then(|e| e.reason.clone()).unwrap_or_default();
        if reason != expected_reason(backend.behaviour) {
            failures.push(format!(
                "{:?}: reason {reason:?}, expected {:?}",
                backend.behaviour,
                expected_reason(backend.behaviour)
            ));
        }
    }
    for address in &healthy {
        let seen = timeline.of(address);
        let flipped = *address == echo[0].address;
        if !flipped && seen.iter().any(|e| e.health != Health::Serving) {
            failures.push(format!("healthy {address}: {seen:?}"));
        }
    }
    check_load_weights(&status, &honest, &hostile, &timeline, &mut failures);

    let peak_rss = rss_samples.lock().unwrap().iter().copied().max().unwrap_or(0);
    println!(
        "this process (operator, backends, test): RSS {} KiB alone, {} KiB beside the hostile endpoints (peak \
         sampled {} KiB: {:+.1} KiB per hostile endpoint); {} tasks -> {}; {} descriptors -> {} (+{} connections \
         with hostile endpoints)",
        baseline.rss_kib,
        with_hostile.rss_kib,
        peak_rss,
        (peak_rss as f64 - baseline.rss_kib as f64) / hostile.len() as f64,
        baseline.tasks,
        with_hostile.tasks,
        baseline.descriptors,
        with_hostile.descriptors,
        with_hostile.hostile_connections,
    );

    // Phase 3: the hostile endpoints leave; what they cost is given back.
    let healthy_count = healthy.len();
    s.echo_slice(&healthy).await?;
    let removed = Instant::now();
    let after = wait::until("the operator's tasks and descriptors back to the baseline", DEADLINE, || {
        let (hostile, hostile_ips, operator) = (&hostile, &hostile_ips, &operator);
        async move {
            let now = resources(hostile_ips)?;
            let open: u64 = hostile.iter().map(|b| b.counters.snapshot().connections_open).sum();
            let probers = operator.metrics.probers.get();
            // The kube client's pool may hold more apiserver connections than at the baseline,
            // each with a task of its own.
            let pooled = now.loopback_connections.saturating_sub(baseline.loopback_connections);
            let back = open == 0
                && now.hostile_connections == 0
                && probers == healthy_count as i64
                && now.descriptors <= baseline.descriptors
                && now.tasks <= baseline.tasks + pooled;
            ensure!(
                back,
                "{open} connections open at the hostile backends, {probers} probers, {now:?} (baseline {baseline:?})"
            );
            Ok(Some(now))
        }
    })
    .await?;
    println!(
        "after removal ({:.1?}): {} tasks (baseline {}), {} descriptors (baseline {}), RSS {} KiB",
        removed.elapsed(),
        after.tasks,
        baseline.tasks,
        after.descriptors,
        baseline.descriptors,
        after.rss_kib
    );

    // The operator still works: a flip after all that is published.
    echo[1].health.set("", ServingStatus::NotServing);
    s.watch_status("echo", DEADLINE, |st| {
        endpoint(st, &echo[1].address).is_some_and(|e| e.health == Health::NotServing)
    })
    .await
    .context("the operator stopped publishing flips")?;
    // Stopped gracefully: dropped, kube-runtime's controller panics on its cancelled reconcile
    // tasks as the runtime shuts down, which would read as the operator's.
    operator.stop().await;

    ensure!(
        panics.load(Ordering::SeqCst) == 0,
        "{} panics in this process (see the output above)",
        panics.load(Ordering::SeqCst)
    );
    ensure!(
        failures.is_empty(),
        "hostile-backend findings:\n{}\nstatus: {}",
        failures.join("\n"),
        brief(Some(&status))
    );
    Ok(())
}

/// Under `LoadReport`, in every status seen, no liar's weight is above the operator's rule:
/// [`MAX_TIMES_MEDIAN`] times the lower median of the valid weights, which here is the honest
/// reporters' (they report the same load, and the liars are fewer than half of the reporters),
/// with the rule's rounding (3) and the hysteresis by which a published weight may be kept. The
/// honest reporters keep a weight throughout.
fn check_load_weights(
    status: &GrpcBackendStatus,
    honest: &[HostileBackend],
    hostile: &[HostileBackend],
    timeline: &Timeline,
    failures: &mut Vec<String>,
) {
    let weight_of = |address: &SocketAddr| endpoint(status, address).map_or(0, |e| e.weight);
    let weights: BTreeMap<String, u32> = honest
        .iter()
        .map(|b| (format!("honest {}", b.address), weight_of(&b.address)))
        .chain(
            hostile
                .iter()
                .filter(|b| b.behaviour.lies_about_load())
                .map(|b| (b.behaviour.name(), weight_of(&b.address))),
        )
        .collect();
    println!("LoadReport weights (rule: at most {MAX_TIMES_MEDIAN} x the lower median): {weights:?}");
    let mut worst: BTreeMap<Behaviour, (u32, u32)> = BTreeMap::new();
    for weights in timeline.statuses() {
        let Some(honest_weight) = honest
            .iter()
            .filter_map(|b| weights.get(&b.address))
            .filter(|(health, weight)| *health == Health::Serving && *weight > 0)
            .map(|(_, weight)| *weight)
            .min()
        else {
            continue;
        };
        let hysteresis = 1.0 + f64::from(HYSTERESIS_PERCENT) / 100.0;
        let bound = f64::from(honest_weight) * MAX_TIMES_MEDIAN * hysteresis + 3.0;
        for liar in hostile.iter().filter(|b| b.behaviour.lies_about_load()) {
            let Some(&(_, weight)) = weights.get(&liar.address) else {
                continue;
            };
            if f64::from(weight) > bound {
                let entry = worst.entry(liar.behaviour).or_default();
                if weight > entry.0 {
                    *entry = (weight, honest_weight);
                }
            }
        }
    }
    for (behaviour, (weight, honest_weight)) in worst {
        failures.push(format!(
            "{behaviour:?}: weight {weight} beside honest reporters at {honest_weight}, over {MAX_TIMES_MEDIAN} x theirs"
        ));
    }
    for backend in honest {
        if endpoint(status, &backend.address).is_none_or(|e| e.weight == 0 || e.health != Health::Serving) {
            failures.push(format!("honest reporter {} lost its weight", backend.address));
        }
    }
}

/// The hand-made HTTP/2 is what a strict implementation (h2, through tonic) accepts: frames,
/// HPACK, trailers, flow control; and each behaviour is counted at the server.
/// Servers that hold the prober to HTTP/2 (issue 20): each is kept on one connection for a
/// minute's worth of probes (at a 1 s interval), counted at the server, in less than a minute
/// (the shortest intervals whose timeouts a busy machine still meets).
/// - SETTINGS_MAX_CONCURRENT_STREAMS 2, and SETTINGS_INITIAL_WINDOW_SIZE 0 with WINDOW_UPDATEs
///   after each call's HEADERS: followed with `Watch`, ORCA wanted, a liveness `Check` every
///   quiet 500 ms interval; 60 Checks on one connection, none refused, no DATA beyond a window.
/// - PINGs every 100 ms, the connection closed when one stays unacknowledged for 500 ms:
///   polled with `Check` every 1 s (longer than that timeout, so that a prober that reads only
///   while it polls loses the connection); 120 PINGs, all acknowledged, on one connection.
#[tokio::test(flavor = "multi_thread")]
async fn servers_that_hold_the_prober_to_http2_keep_one_connection() -> Result<()> {
    let _turn = ONE_HEAVY_TEST.lock().await;
    const CHECKS: u64 = 60;
    const PINGS: u64 = 120;
    async fn serving_on_one_connection(
        s: &Scenario,
        spec: serde_json::Value,
        backends: &[HostileBackend],
        done: impl Fn(&CountersSnapshot) -> bool,
    ) -> Result<()> {
        let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
        s.echo_service(&addresses).await?;
        s.grpc_backend("echo", spec).await?;
        s.wait_status("echo", "every strict endpoint Serving", DEADLINE, |st| {
            addresses
                .iter()
                .all(|a| endpoint(st, a).is_some_and(|e| e.health == Health::Serving))
        })
        .await?;
        for backend in backends {
            let what = format!("{:?}: a minute's worth of probes", backend.behaviour);
            wait::until(&what, DEADLINE, || async {
                let counters = backend.counters.snapshot();
                ensure!(
                    counters.connections_accepted == 1,
                    "{:?}: {counters:?}",
                    backend.behaviour
                );
                Ok(done(&counters).then_some(()))
            })
            .await?;
            let counters = backend.counters.snapshot();
            println!("{:?}: {counters:?}", backend.behaviour);
            assert_eq!(counters.connections_accepted, 1, "{:?}", backend.behaviour);
            assert_eq!(counters.refused_streams, 0, "{:?}", backend.behaviour);
            assert_eq!(counters.flow_control_overruns, 0, "{:?}", backend.behaviour);
            assert_eq!(counters.keepalive_closes, 0, "{:?}", backend.behaviour);
        }
        let status = s.backends().get("echo").await?.status;
        let status = status.as_ref().context("a status")?;
        for address in &addresses {
            assert_eq!(
                endpoint(status, address).map(|e| e.health),
                Some(Health::Serving),
                "{address}: {}",
                brief(Some(status))
            );
        }
        Ok(())
    }

    let s = Scenario::new("strict-watch").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = vec![
        HostileBackend::start(Behaviour::MaxStreamsTwo).await?,
        HostileBackend::start(Behaviour::WindowZeroThenUpdate).await?,
    ];
    let spec = json!({
        "service": "echo",
        "port": "grpc",
        "healthCheck": {"mode": "Watch", "interval": "500ms", "timeout": "450ms", "unhealthyThreshold": 2},
        "weighting": {"policy": "LoadReport", "loadReport": {"reportInterval": "1s"}},
    });
    serving_on_one_connection(&s, spec, &backends, |c| c.checks >= CHECKS).await?;
    // With 2 streams, Watch and the liveness Check: no load-report stream beside them.
    assert_eq!(backends[0].counters.snapshot().load_reports, 0);
    drop((backends, operator));

    let s = Scenario::new("strict-check").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = vec![HostileBackend::start(Behaviour::KeepalivePings).await?];
    let spec = json!({
        "service": "echo",
        "port": "grpc",
        "healthCheck": {"mode": "Check", "interval": "1s", "timeout": "900ms", "unhealthyThreshold": 2},
    });
    assert!(KEEPALIVE_TIMEOUT < Duration::from_secs(1));
    serving_on_one_connection(&s, spec, &backends, |c| c.ping_acks >= PINGS).await?;
    let counters = backends[0].counters.snapshot();
    // Each PING acknowledged before the next (at most the one in flight is not yet).
    assert!(counters.pings - counters.ping_acks <= 1, "{counters:?}");
    assert!(counters.checks >= PINGS / 10 - 2, "{counters:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hand_made_server_speaks_http2_that_h2_accepts() -> Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    async fn client(address: SocketAddr) -> Result<HealthClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        Ok(HealthClient::new(channel))
    }
    /// Each step has a deadline: a server that stops speaking must fail the test, not hang it.
    async fn step<T>(what: &str, future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .with_context(|| format!("{what}: no answer within 10 s"))?
            .with_context(|| what.to_string())
    }
    let request = || HealthCheckRequest { service: String::new() };

    let healthy = HostileBackend::start(Behaviour::Healthy).await?;
    let mut health = step("connect", client(healthy.address)).await?;
    let answer = step("Check", async { Ok(health.check(request()).await?.into_inner()) }).await?;
    assert_eq!(answer.status, 1);
    let first = step("Watch", async {
        let mut watch = health.watch(request()).await?.into_inner();
        watch.message().await?.context("no first answer")
    })
    .await?;
    assert_eq!(first.status, 1);
    let counters = healthy.counters.snapshot();
    assert_eq!((counters.connections_accepted, counters.calls), (1, 2));

    let denied = HostileBackend::start(Behaviour::CheckAlwaysFails).await?;
    let error = step("Check denied", async {
        Ok(client(denied.address).await?.check(request()).await.unwrap_err())
    })
    .await?;
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");

    let flapping = HostileBackend::start(Behaviour::FlappingWatch).await?;
    let statuses = step("flaps", async {
        let mut watch = client(flapping.address).await?.watch(request()).await?.into_inner();
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(watch.message().await?.context("the Watch ended")?.status);
        }
        Ok(statuses)
    })
    .await?;
    assert_eq!(statuses, [1, 2, 1, 2]);

    // More than the 64 KiB initial window of 5-byte messages: the server waits for the
    // client's WINDOW_UPDATEs (h2 would reset the stream on a flow-control violation).
    let packed = HostileBackend::start(Behaviour::TinyMessagesPacked).await?;
    step("30,000 tiny messages", async {
        let mut watch = client(packed.address).await?.watch(request()).await?.into_inner();
        for _ in 0..30_000 {
            assert_eq!(watch.message().await?.context("the Watch ended")?.status, 0);
        }
        Ok(())
    })
    .await?;
    assert!(packed.counters.snapshot().bytes_written > 150_000);
    Ok(())
}

/// `bench_hostile` in its quick mode (20 endpoints of Silent and PingFlood beside the idle,
/// tonic and hand-made healthy baselines, a 2 s window) runs to the end and prints its figures;
/// the figures themselves are for BENCHMARKS.md.
#[test]
fn the_hostile_bench_runs_in_quick_mode() -> Result<()> {
    kubegrpc_tests::netns::assert_private_network();
    let _turn = ONE_HEAVY_TEST.blocking_lock();
    let output = std::process::Command::new(kubegrpc_tests::backends::built_binary("bench_hostile")?)
        .env("BENCH_HOSTILE_QUICK", "1")
        .output()
        .context("cannot run bench_hostile")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    ensure!(
        output.status.success(),
        "bench_hostile failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for row in [
        "| idle (no endpoint) |",
        "| tonic echo (healthy) |",
        "| Healthy |",
        "| Silent |",
        "| PingFlood |",
    ] {
        ensure!(stdout.contains(row), "no row {row:?}:\n{stdout}");
    }
    for label in [
        "healthy (hand-made) per endpoint: memory =",
        "worst memory per endpoint: ",
        "worst CPU per endpoint: ",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(label))
            .with_context(|| format!("no {label:?} line:\n{stdout}"))?;
        let number: f64 = line[label.len()..]
            .split(['=', ' '])
            .find_map(|word| word.parse().ok())
            .with_context(|| format!("no figure in {line:?}"))?;
        // The ratios of a 2 s window of 20 endpoints may divide by a zero difference.
        ensure!(number.is_finite() || label.starts_with("worst"), "{line}");
    }
    Ok(())
}
