//! How long a client keeps sending to a backend after it flips NOT_SERVING: the time from the
//! flip (wall time t0, when the backend's health service turns NOT_SERVING) to the client's last
//! reply from that backend, over `BENCH_XDS_FLIPS` flips, for two clients running side by side
//! against the same 3 echo backends and the same GrpcBackend:
//!   (1) the grpc-go xDS client peer (`xds-client-go`, tests/peers), fed over ADS by the
//!       operator's xDS server (in process),
//!   (2) the kubegrpc Rust client (`kubegrpc::Channel`), which watches the GrpcBackend status.
//!
//! Both send echo requests open loop at `BENCH_XDS_RATE` per second each (1000), at the same
//! time. The rate sets the resolution: B gets a request about every 3/rate s from each client and
//! a whole flip takes about 10 ms here, so at 200/s (a request to B every 15 ms) many flips see
//! no reply from B after t0 at all.
//!
//! Per flip of backend B: t0, NOT_SERVING; wait until the status shows B not usable and each
//! client's last reply from B is at least 500 ms older than its latest replies from A and from C
//! (B quiet while traffic went on); the figure is last_reply_from_B - t0, clamped at 0 when no
//! reply from B arrived after t0. Then B is flipped back to SERVING and both clients must have
//! had a reply from B again before the next flip. Each flip (either way) comes at least the
//! operator's `status_write_interval` (1 s) + 100 ms after the previous status write, so that
//! the operator writes it at once instead of coalescing it into a later write. Also printed:
//! t0 -> the status showing B unusable, as a watch in this process sees it (the operator's part
//! plus one watch delivery), and each client's part after that status (last reply from B -
//! status seen).
//!
//!   make bench        (builds in release and runs inside the private network namespace)
//!
//! Needs KUBEGRPC_CONTROLPLANE_BIN (tests/controlplane/build.sh) and KUBEGRPC_PEERS_DIR
//! (tests/peers/build.sh). Options (environment): BENCH_XDS_FLIPS (100), BENCH_XDS_RATE (1000).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
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
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    operator::InProcessOperator,
    scenario::endpoint,
    wait,
    xds::{InProcessXds, XdsClient},
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// B counts as no longer sent to once its last reply is this much older than the latest replies
/// from A and from C.
const QUIET: Duration = Duration::from_millis(500);
/// How long one step (a status change, a client going quiet or back) may take.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// How often the clients' last-reply times are read while waiting.
const POLL: Duration = Duration::from_millis(20);
const NAME: &str = "echo";

/// The Rust client under steady open-loop load, recording per backend the Unix time (ns) of
/// its latest successful reply, as the grpc-go client's `/last` does.
struct RustLoad {
    last: Arc<Mutex<HashMap<String, i64>>>,
    failures: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl RustLoad {
    fn start(channel: kubegrpc::Channel, rate: u32) -> Self {
        let last = Arc::new(Mutex::new(HashMap::new()));
        let failures = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let task = {
            let (last, failures, sent) = (last.clone(), failures.clone(), sent.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                loop {
                    tick.tick().await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let mut client = EchoClient::new(channel.clone());
                    let (last, failures) = (last.clone(), failures.clone());
                    tokio::spawn(async move {
                        let request = client.echo(EchoRequest {
                            message: "flip".into(),
                            ..Default::default()
                        });
                        // The same deadline as the grpc-go client's calls.
                        match tokio::time::timeout(Duration::from_secs(2), request).await {
                            Ok(Ok(reply)) => {
                                let at = now_ns();
                                last.lock().unwrap().insert(reply.into_inner().backend, at);
                            }
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            })
        };
        Self {
            last,
            failures,
            sent,
            _task: AbortOnDropHandle::new(task),
        }
    }

    fn last(&self) -> BTreeMap<String, i64> {
        self.last.lock().unwrap().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Follows the GrpcBackend with a watch: whether B is usable in its status, and the Unix time
/// (ns) at which this process saw that change.
fn follow_b(api: Api<GrpcBackend>, b: SocketAddr) -> (watch::Receiver<(bool, i64)>, AbortOnDropHandle<()>) {
    let (sender, receiver) = watch::channel((false, 0));
    let task = tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(event) = stream.next().await {
            let Ok(backend) = event else { continue };
            let usable = backend
                .status
                .as_ref()
                .and_then(|s| endpoint(s, &b))
                .is_some_and(kubegrpc_crds::EndpointStatus::is_usable);
            let seen = now_ns();
            sender.send_if_modified(|state| {
                let changed = state.0 != usable;
                if changed {
                    *state = (usable, seen);
                }
                changed
            });
        }
    });
    (receiver, AbortOnDropHandle::new(task))
}

/// Waits for B's usability in the status to become `usable`; returns when this process saw it.
async fn status_becomes(status: &mut watch::Receiver<(bool, i64)>, usable: bool) -> Result<i64> {
    let seen = tokio::time::timeout(STEP_DEADLINE, status.wait_for(|(u, _)| *u == usable))
        .await
        .with_context(|| format!("B usable={usable} not seen in the status within {STEP_DEADLINE:?}"))??;
    Ok(seen.1)
}

/// Whether a client's last replies show B quiet: its last reply from B at least [`QUIET`] older
/// than its latest replies from A and from C.
fn quiet(last: &BTreeMap<String, i64>, a: &str, b: &str, c: &str) -> Option<i64> {
    let b_last = last.get(b).copied().unwrap_or(0);
    let others = last.get(a).copied()?.min(last.get(c).copied()?);
    (others - b_last >= QUIET.as_nanos() as i64).then_some(b_last)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Prints one table row: p50, p95, max and mean of `values`, then `extra` cells.
fn row(label: &str, values: &[f64], extra: &str) {
    let s = sorted(values);
    println!(
        "| {label} | {:.1} | {:.1} | {:.1} | {:.1} {extra}",
        percentile(&s, 0.5),
        percentile(&s, 0.95),
        s.last().copied().unwrap_or(f64::NAN),
        mean(&s)
    );
}

/// One client's measurements over the flips.
#[derive(Default)]
struct Figures {
    /// last reply from B - t0, clamped at 0 (ms).
    after_flip: Vec<f64>,
    /// last reply from B - the status seen (ms, may be negative).
    after_status: Vec<f64>,
    /// last reply from B - t0, not clamped (ms).
    signed: Vec<f64>,
    /// Flips where no reply from B arrived after t0 (clamped to 0).
    clamped: u32,
    /// t0 of the flip back -> the first reply from B seen again (ms, within a poll).
    back: Vec<f64>,
}

impl Figures {
    fn record(&mut self, b_last: i64, t0: i64, status_at: i64) {
        let after = b_last - t0;
        if after < 0 {
            self.clamped += 1;
        }
        self.after_flip.push(ms(after.max(0)));
        self.signed.push(ms(after));
        self.after_status.push(ms(b_last - status_at));
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let flips = setting("BENCH_XDS_FLIPS", 100).max(1) as usize;
    let rate = setting("BENCH_XDS_RATE", 1000).max(1) as u32;
    eprintln!("starting the control plane, the operator, the xDS server and 3 backends...");
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "bench-xds-flip").await?;
    let operator = InProcessOperator::start(client.clone(), &namespace);
    let xds = InProcessXds::start(client.clone(), Some(namespace.clone())).await?;
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    let [a, b, c] = [0, 1, 2].map(|i| addresses[i].to_string());
    create_service(&client, &namespace, NAME, &[("grpc", 80)]).await?;
    let slice: Vec<SliceEndpoint> = addresses
        .iter()
        .enumerate()
        .map(|(i, address)| SliceEndpoint {
            pod: Some(format!("echo-{i}")),
            ..SliceEndpoint::ready(*address)
        })
        .collect();
    apply_slice(&client, &namespace, NAME, "echo-1", "grpc", &slice).await?;
    // Watch mode (the default): a NOT_SERVING flip reaches the prober at once; a quiet stream
    // gets a Check every second. One GrpcBackend, so both clients see the same status.
    let health_check = json!({"mode": "Watch", "interval": "1s", "timeout": "500ms",
                              "healthyThreshold": 1, "unhealthyThreshold": 3});
    create_grpc_backend(
        &client,
        &namespace,
        NAME,
        json!({"service": NAME, "port": "grpc", "healthCheck": health_check}),
    )
    .await?;
    let api: Api<GrpcBackend> = Api::namespaced(client.clone(), &namespace);
    wait::until("3 ready endpoints", STEP_DEADLINE, || async {
        let backend = api.get(NAME).await?;
        Ok(backend.status.is_some_and(|s| s.ready_endpoints == 3).then_some(()))
    })
    .await?;
    let (mut status, _follow) = follow_b(api.clone(), addresses[1]);
    status_becomes(&mut status, true).await?;

    // Both clients, at the same time, each at `rate`.
    let channel = kubegrpc::Channel::builder(client.clone(), &namespace, NAME)
        .connect()
        .await?;
    tokio::time::timeout(STEP_DEADLINE, channel.ready()).await?;
    let rust = RustLoad::start(channel.clone(), rate);
    let go = XdsClient::start(&format!("{NAME}.{namespace}"), xds.address, rate).await?;
    let warm = now_ns();
    wait::until("replies from every backend to both clients", STEP_DEADLINE, || async {
        let go_last = go.last().await?;
        let rust_last = rust.last();
        let all = |last: &BTreeMap<String, i64>| [&a, &b, &c].iter().all(|k| last.get(*k).is_some_and(|t| *t > warm));
        Ok((all(&go_last) && all(&rust_last)).then_some(()))
    })
    .await?;
    go.reset().await?;
    let rust_failures_before = rust.failures.load(Ordering::Relaxed);
    let rust_sent_before = rust.sent.load(Ordering::Relaxed);
    let b_connections_before = backends[1].counters.snapshot().connections_accepted;

    eprintln!("{flips} flips of {b} (A {a}, C {c}), both clients at {rate}/s each, running at the same time");
    let mut go_figures = Figures::default();
    let mut rust_figures = Figures::default();
    let mut status_figures = Vec::new();
    // The operator writes a GrpcBackend's status at most once per `status_write_interval` and
    // defers a change that comes sooner: each flip waits until that long after the last write
    // was seen, so that every figure is a change going out at once (not a deferred one).
    let write_interval = kubegrpc_operator::Settings::default().status_write_interval;
    let mut last_write = now_ns();
    let mut jitter = now_ns() as u64 | 1;
    let started = std::time::Instant::now();
    for flip in 1..=flips {
        // A pause of 0-200 ms more, so that flips do not fall in step with the request ticks.
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        pace(last_write, write_interval + Duration::from_millis(100 + jitter % 200)).await;
        // Down: t0, NOT_SERVING.
        let t0 = now_ns();
        backends[1].health.set("", ServingStatus::NotServing);
        let status_at = status_becomes(&mut status, false).await?;
        status_figures.push(ms(status_at - t0));
        last_write = status_at;
        let give_up = tokio::time::Instant::now() + STEP_DEADLINE;
        let (go_b, rust_b) = loop {
            let go_last = go.last().await?;
            let rust_last = rust.last();
            if let (Some(go_b), Some(rust_b)) = (quiet(&go_last, &a, &b, &c), quiet(&rust_last, &a, &b, &c)) {
                break (go_b, rust_b);
            }
            if tokio::time::Instant::now() > give_up {
                bail!(
                    "flip {flip}: B not quiet within {STEP_DEADLINE:?} after t0 {t0}: grpc-go last {go_last:?}, \
                     kubegrpc last {rust_last:?}"
                );
            }
            tokio::time::sleep(POLL).await;
        };
        go_figures.record(go_b, t0, status_at);
        rust_figures.record(rust_b, t0, status_at);

        // Back: SERVING, and both clients reach B again.
        pace(last_write, write_interval + Duration::from_millis(100)).await;
        let t1 = now_ns();
        backends[1].health.set("", ServingStatus::Serving);
        last_write = status_becomes(&mut status, true).await?;
        let (mut go_back, mut rust_back) = (None, None);
        let give_up = tokio::time::Instant::now() + STEP_DEADLINE;
        while go_back.is_none() || rust_back.is_none() {
            if go_back.is_none() {
                go_back = go.last().await?.get(&b).copied().filter(|t| *t > t1);
            }
            if rust_back.is_none() {
                rust_back = rust.last().get(&b).copied().filter(|t| *t > t1);
            }
            if tokio::time::Instant::now() > give_up {
                bail!(
                    "flip {flip}: a client did not reach B again within {STEP_DEADLINE:?} (grpc-go {go_back:?}, kubegrpc {rust_back:?})"
                );
            }
            tokio::time::sleep(POLL).await;
        }
        go_figures.back.push(ms(go_back.unwrap_or(t1) - t1));
        rust_figures.back.push(ms(rust_back.unwrap_or(t1) - t1));
        println!(
            "flip {flip:>3}: status {:>6.1}ms  grpc-go last from B {:>7.1}ms  kubegrpc last from B {:>7.1}ms",
            status_figures[flip - 1],
            go_figures.after_flip[flip - 1],
            rust_figures.after_flip[flip - 1],
        );
    }
    let elapsed = started.elapsed();
    let go_counts = go.counts().await?;
    let rust_failures = rust.failures.load(Ordering::Relaxed) - rust_failures_before;
    let rust_sent = rust.sent.load(Ordering::Relaxed) - rust_sent_before;

    println!();
    println!(
        "{flips} NOT_SERVING flips of 1 of 3 backends in {:.1} min; both clients at {rate}/s each, at the same time; \
         health check Watch, interval 1s, timeout 500ms; quiet = {} ms; each flip >= {:?} after the previous \
         status write (the operator's status_write_interval)",
        elapsed.as_secs_f64() / 60.0,
        QUIET.as_millis(),
        write_interval
    );
    println!(
        "| figure (ms) | p50 | p95 | max | mean | flips with nothing from B after t0 (clamped at 0) | p50 unclamped |"
    );
    println!("|---|---|---|---|---|---|---|");
    row(
        "t0 -> status shows B unusable (watch in the bench)",
        &status_figures,
        "| | |",
    );
    for (client, figures) in [
        ("grpc-go xDS client", &go_figures),
        ("kubegrpc Rust client", &rust_figures),
    ] {
        let unclamped = percentile(&sorted(&figures.signed), 0.5);
        let extra = format!("| {} | {unclamped:.1} |", figures.clamped);
        row(
            &format!("{client}: t0 -> last reply from B"),
            &figures.after_flip,
            &extra,
        );
    }
    for (client, figures) in [("grpc-go", &go_figures), ("kubegrpc", &rust_figures)] {
        row(
            &format!("{client}: status seen -> last reply from B"),
            &figures.after_status,
            "| | |",
        );
    }
    for (client, figures) in [("grpc-go", &go_figures), ("kubegrpc", &rust_figures)] {
        let label = format!("{client}: SERVING again -> a reply from B (+-{} ms)", POLL.as_millis());
        row(&label, &figures.back, "| | |");
    }
    // B gets a request about every 3/rate s from each client: figures under that gap are often 0.
    let ratio = |of: fn(&[f64]) -> f64| {
        let (go, rust) = (of(&go_figures.after_flip), of(&rust_figures.after_flip));
        if rust >= 0.5 {
            format!("{:.2}", go / rust)
        } else {
            format!("n/a (kubegrpc {rust:.1} ms)")
        }
    };
    println!(
        "grpc-go / kubegrpc: p50 {}, p95 {}, mean {} (B gets a request about every {:.0} ms from each client)",
        ratio(|v| percentile(&sorted(v), 0.5)),
        ratio(|v| percentile(&sorted(v), 0.95)),
        ratio(mean),
        3000.0 / f64::from(rate)
    );
    println!(
        "failed requests during the flips: grpc-go {} of {} ({:?}), kubegrpc {rust_failures} of {rust_sent}",
        go_counts.failures(),
        go_counts.sent,
        go_counts.failed
    );
    println!(
        "connections B accepted during the flips (both clients and the operator's prober): {}",
        backends[1].counters.snapshot().connections_accepted - b_connections_before
    );
    println!(
        "status writes of the GrpcBackend: {}",
        operator.status_writes(&namespace, NAME)
    );
    drop(go);
    drop(rust);
    operator.stop().await;
    Ok(())
}
