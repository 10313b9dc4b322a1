//! Watch fan-out: many watch-only followers of one GrpcBackend of 100 endpoints (what the
//! kubegrpc client's discovery costs the apiserver and how fast a change reaches all of them),
//! against as many watches of the same Service's EndpointSlices by label (what every
//! kuberesolver client costs).
//!
//! One control plane, one headless Service `echo` with one EndpointSlice of 100 endpoints and one
//! GrpcBackend `echo` whose status lists the same 100 endpoints (written here as the operator
//! writes it: server-side apply of the whole status; no operator runs). The followers run in
//! `BENCH_FANOUT_PROCESSES` child processes of this binary, each follower with its own kube
//! `Client` (its own TCP + TLS connection, as a fleet of pods has: kube-rs speaks HTTP/1.1 to the
//! apiserver, so every watch is a connection of its own anyway):
//!   (a) GrpcBackend: the client crate's discovery watch, `watch_object(Api<DynamicObject>,
//!       "echo").default_backoff()` (a field selector `metadata.name=echo`), each read parsed
//!       with `kubegrpc::internals::parse_status`, as `kubegrpc::Channel` does (its discovery is
//!       private and needs connections to the endpoints, so the bench repeats its watch call);
//!   (b) EndpointSlice: a kube-runtime `watcher` of `discovery.k8s.io/v1` EndpointSlices with
//!       the label selector `kubernetes.io/service-name=echo`, what kuberesolver does.
//!
//! Per variant, on a freshly restarted apiserver (so that its memory is that variant's): a
//! window of idle time and `BENCH_FANOUT_FLIPS` flips (one endpoint's health in the status, or
//! its ready/serving conditions in the slice) with no follower (the baseline), then the same
//! window with every follower watching. A flip's latency per follower is from just before the
//! write to the follower's first read of that resourceVersion or a later one. The apiserver's
//! cost is its CPU time (/proc/PID/stat) over the window minus the baseline's, its RSS
//! (VmRSS) and Go heap (`go_memstats_heap_inuse_bytes`) with the followers minus without, and
//! the CPU of establishing the watches (TLS handshakes, the first lists).
//!
//!   cargo build --release --locked -p kubegrpc-tests --bin bench_fanout && \
//!   KUBEGRPC_CONTROLPLANE_BIN=$(tests/controlplane/build.sh) tests/netns-run.sh target/release/bench_fanout
//!
//! Options (environment): BENCH_FANOUT_FOLLOWERS (1000), BENCH_FANOUT_PROCESSES (4),
//! BENCH_FANOUT_FLIPS (10), BENCH_FANOUT_ROUNDS (2: both variants per round, the order swapped
//! every other round), BENCH_FANOUT_QUICK=1 (CI: 20 followers in 2 processes, 2 flips, 1
//! round, short windows).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::{
    api::discovery::v1::EndpointSlice,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc_crds::{GrpcBackend, GrpcBackendStatus, Health, OPERATOR_FIELD_MANAGER};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    bench_support::setting,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    scale::{cpu_ticks, memory_kib, realistic_endpoint, ticks_per_second},
};
use serde_json::json;

const ENDPOINTS: usize = 100;
const NAME: &str = "echo";
const LABEL_SELECTOR: &str = "kubernetes.io/service-name=echo";
/// Child mode: the variant to follow (`GrpcBackend` or `EndpointSlice`).
const CHILD_ENV: &str = "BENCH_FANOUT_CHILD";

fn unix_nanos(time: SystemTime) -> i128 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
#[allow(unsafe_code, reason = "getrlimit/setrlimit: std cannot raise the open-file limit")]
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    GrpcBackend,
    EndpointSlice,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::GrpcBackend => "GrpcBackend",
            Variant::EndpointSlice => "EndpointSlice",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "GrpcBackend" => Ok(Variant::GrpcBackend),
            "EndpointSlice" => Ok(Variant::EndpointSlice),
            other => bail!("{CHILD_ENV}={other:?}: GrpcBackend or EndpointSlice"),
        }
    }
}

fn main() -> Result<()> {
    raise_fd_limit();
    if let Ok(variant) = std::env::var(CHILD_ENV) {
        let variant = Variant::parse(&variant)?;
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(child(variant));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(parent())
}

// ---------------------------------------------------------------------------------------------
// Child: BENCH_FANOUT_CHILD_COUNT followers, numbered from BENCH_FANOUT_CHILD_FIRST, reporting on
// stdout: `ready I`, `seen I RESOURCE_VERSION UNIX_NANOS`, `error I MESSAGE`. Exits when stdin
// closes (or with the parent).

async fn child(variant: Variant) -> Result<()> {
    let count = setting("BENCH_FANOUT_CHILD_COUNT", 0) as usize;
    let first = setting("BENCH_FANOUT_CHILD_FIRST", 0) as usize;
    let namespace = std::env::var("BENCH_FANOUT_NAMESPACE").context("BENCH_FANOUT_NAMESPACE")?;
    let kubeconfig = std::env::var("BENCH_FANOUT_KUBECONFIG").context("BENCH_FANOUT_KUBECONFIG")?;
    let config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig)?, &KubeConfigOptions::default())
            .await?;
    let (lines, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let stdout = std::io::stdout();
        while let Some(line) = outgoing.recv().await {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{line}");
            while let Ok(line) = outgoing.try_recv() {
                let _ = writeln!(out, "{line}");
            }
            if out.flush().is_err() {
                break;
            }
        }
    });
    let mut followers = Vec::with_capacity(count);
    for index in first..first + count {
        // Its own Client: its own connection pool, TLS session and connection, as a pod has.
        let client = Client::try_from(config.clone())?;
        let lines = lines.clone();
        let namespace = namespace.clone();
        followers.push(tokio::spawn(async move {
            match variant {
                Variant::GrpcBackend => follow_grpc_backend(client, &namespace, index, lines).await,
                Variant::EndpointSlice => follow_slices(client, &namespace, index, lines).await,
            }
        }));
    }
    drop(lines);
    // Until the parent closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await?;
    for follower in followers {
        follower.abort();
    }
    writer.abort();
    Ok(())
}

fn seen_line(index: usize, version: Option<&String>) -> String {
    format!(
        "seen {index} {} {}",
        version.map_or("0", String::as_str),
        unix_nanos(SystemTime::now())
    )
}

/// The client crate's discovery watch (client/src/discovery.rs `follow`), without the pool.
async fn follow_grpc_backend(
    client: Client,
    namespace: &str,
    index: usize,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let resource = ApiResource::erase::<GrpcBackend>(&());
    let api = Api::<DynamicObject>::namespaced_with(client, namespace, &resource);
    let mut reads = watcher::watch_object(api, NAME).default_backoff().boxed();
    let mut ready = false;
    while let Some(read) = reads.next().await {
        match read {
            Ok(Some(object)) => {
                let line = seen_line(index, object.metadata.resource_version.as_ref());
                // What the channel does with each read (the pool's work aside).
                std::hint::black_box(kubegrpc::internals::parse_slow_start(object.data.get("spec")));
                std::hint::black_box(kubegrpc::internals::parse_status(object.data.get("status")));
                let _ = lines.send(line);
                if !ready {
                    ready = true;
                    let _ = lines.send(format!("ready {index}"));
                }
            }
            Ok(None) => {}
            Err(error) => {
                let _ = lines.send(format!("error {index} {error}"));
            }
        }
    }
}

/// A kuberesolver-like watch: the Service's EndpointSlices by label.
async fn follow_slices(
    client: Client,
    namespace: &str,
    index: usize,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let api = Api::<EndpointSlice>::namespaced(client, namespace);
    let mut events = watcher(api, watcher::Config::default().labels(LABEL_SELECTOR))
        .default_backoff()
        .boxed();
    let mut ready = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(slice) | watcher::Event::InitApply(slice)) => {
                let line = seen_line(index, slice.metadata.resource_version.as_ref());
                // What kuberesolver does with it: the ready addresses.
                let ready_addresses = slice
                    .endpoints
                    .iter()
                    .flatten()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .count();
                std::hint::black_box(ready_addresses);
                let _ = lines.send(line);
            }
            Ok(watcher::Event::InitDone) if !ready => {
                ready = true;
                let _ = lines.send(format!("ready {index}"));
            }
            Ok(_) => {}
            Err(error) => {
                let _ = lines.send(format!("error {index} {error}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent.

struct Settings {
    followers: usize,
    processes: usize,
    flips: usize,
    rounds: usize,
    idle: Duration,
    spacing: Duration,
    settle: Duration,
    quick: bool,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("BENCH_FANOUT_QUICK").is_ok_and(|v| v == "1");
        let (followers, processes, flips, rounds) = if quick { (20, 2, 2, 1) } else { (1000, 4, 10, 2) };
        let followers = setting("BENCH_FANOUT_FOLLOWERS", followers).max(1) as usize;
        Settings {
            followers,
            processes: (setting("BENCH_FANOUT_PROCESSES", processes).max(1) as usize).min(followers),
            flips: setting("BENCH_FANOUT_FLIPS", flips).max(1) as usize,
            rounds: setting("BENCH_FANOUT_ROUNDS", rounds).max(1) as usize,
            idle: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(10)
            },
            spacing: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(2)
            },
            settle: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(5)
            },
            quick,
        }
    }

    fn window(&self) -> Duration {
        self.idle + self.spacing * self.flips as u32
    }
}

/// What the followers reported, by follower index.
#[derive(Default)]
struct Reports {
    ready: Vec<bool>,
    /// (resourceVersion, unix nanos) of each read, in the order read.
    seen: Vec<Vec<(u64, i128)>>,
    errors: u64,
    last_error: Option<String>,
}

struct Fleet {
    children: Vec<Child>,
    reports: Arc<Mutex<Reports>>,
}

impl Fleet {
    fn spawn(settings: &Settings, variant: Variant, namespace: &str, kubeconfig: &Path) -> Result<Self> {
        let reports = Arc::new(Mutex::new(Reports {
            ready: vec![false; settings.followers],
            seen: vec![Vec::new(); settings.followers],
            ..Default::default()
        }));
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let per = settings.followers.div_ceil(settings.processes);
        let mut first = 0;
        while first < settings.followers {
            let count = per.min(settings.followers - first);
            let mut command = Command::new(&exe);
            command
                .env(CHILD_ENV, variant.name())
                .env("BENCH_FANOUT_CHILD_COUNT", count.to_string())
                .env("BENCH_FANOUT_CHILD_FIRST", first.to_string())
                .env("BENCH_FANOUT_NAMESPACE", namespace)
                .env("BENCH_FANOUT_KUBECONFIG", kubeconfig)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = kubegrpc_tests::process::spawn_tied(command).context("cannot start a follower process")?;
            let stdout = child.stdout.take().context("no stdout")?;
            let reports = reports.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut parts = line.splitn(4, ' ');
                    let (kind, index) = (parts.next(), parts.next().and_then(|i| i.parse::<usize>().ok()));
                    let (Some(kind), Some(index)) = (kind, index) else {
                        continue;
                    };
                    let mut reports = reports.lock().unwrap();
                    if index >= reports.ready.len() {
                        continue;
                    }
                    match kind {
                        "ready" => reports.ready[index] = true,
                        "seen" => {
                            let version = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                            let at = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                            reports.seen[index].push((version, at));
                        }
                        "error" => {
                            reports.errors += 1;
                            reports.last_error = parts.next().map(str::to_string);
                        }
                        _ => {}
                    }
                }
            });
            children.push(child);
            first += count;
        }
        Ok(Fleet { children, reports })
    }

    fn ready(&self) -> usize {
        self.reports.lock().unwrap().ready.iter().filter(|r| **r).count()
    }

    /// Followers that have read `version` or a later one.
    fn seen_at_least(&self, version: u64) -> usize {
        self.reports
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|reads| reads.iter().any(|(v, _)| *v >= version))
            .count()
    }

    fn stop(mut self) -> Reports {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        std::mem::take(&mut *self.reports.lock().unwrap())
    }
}

/// The objects and how to flip them.
struct Objects {
    client: Client,
    namespace: String,
    status: GrpcBackendStatus,
    slice: Vec<SliceEndpoint>,
    flips: usize,
}

impl Objects {
    async fn create(client: Client, namespace: String) -> Result<Self> {
        create_service(&client, &namespace, NAME, &[("grpc", 80)]).await?;
        create_grpc_backend(&client, &namespace, NAME, json!({"service": NAME, "port": "grpc"})).await?;
        let endpoints: Vec<_> = (0..ENDPOINTS).map(realistic_endpoint).collect();
        let slice = endpoints
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let address = format!("{}:{}", e.address, e.port).parse().expect("an address");
                SliceEndpoint::deployment_pod(address, NAME, n)
            })
            .collect();
        let status = GrpcBackendStatus {
            observed_generation: Some(1),
            ready_endpoints: ENDPOINTS as i32,
            total_endpoints: ENDPOINTS as i32,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "EndpointsReady".into(),
                message: format!("{ENDPOINTS} of {ENDPOINTS} endpoints ready"),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::from_second(1_700_000_000).expect("a valid time")),
            }],
            endpoints,
            routes: Vec::new(),
        };
        let objects = Objects {
            client,
            namespace,
            status,
            slice,
            flips: 0,
        };
        objects.write_status().await?;
        objects.write_slice().await?;
        Ok(objects)
    }

    /// The operator's status write: server-side apply of the whole status, forced.
    async fn write_status(&self) -> Result<u64> {
        let written = Api::<GrpcBackend>::namespaced(self.client.clone(), &self.namespace)
            .patch_status(
                NAME,
                &PatchParams::apply(OPERATOR_FIELD_MANAGER).force().validation_ignore(),
                &Patch::Apply(json!({
                    "apiVersion": GrpcBackend::api_version(&()),
                    "kind": GrpcBackend::kind(&()),
                    "status": self.status,
                })),
            )
            .await?;
        version(written.metadata.resource_version.as_ref())
    }

    /// The slice as the EndpointSlice controller writes it.
    async fn write_slice(&self) -> Result<u64> {
        let written = apply_slice(&self.client, &self.namespace, NAME, "echo-1", "grpc", &self.slice).await?;
        version(written.metadata.resource_version.as_ref())
    }

    /// One endpoint's health (status) or readiness (slice) flips; returns the new
    /// resourceVersion.
    async fn flip(&mut self, variant: Variant) -> Result<u64> {
        let n = self.flips % ENDPOINTS;
        self.flips += 1;
        match variant {
            Variant::GrpcBackend => {
                let endpoint = &mut self.status.endpoints[n];
                let serving = endpoint.health == Health::Serving;
                endpoint.health = if serving { Health::NotServing } else { Health::Serving };
                endpoint.reason = serving.then(|| "NotServing".into());
                endpoint.last_transition_time = Some(Time(Timestamp::now()));
                self.status.ready_endpoints += if serving { -1 } else { 1 };
                self.write_status().await
            }
            Variant::EndpointSlice => {
                let endpoint = &mut self.slice[n];
                endpoint.ready = !endpoint.ready;
                endpoint.serving = endpoint.ready;
                self.write_slice().await
            }
        }
    }

    /// The object's size as JSON, and that of its managedFields.
    async fn json_bytes(&self, variant: Variant) -> Result<(usize, usize)> {
        let (name, resource) = match variant {
            Variant::GrpcBackend => (NAME, ApiResource::erase::<GrpcBackend>(&())),
            Variant::EndpointSlice => ("echo-1", ApiResource::erase::<EndpointSlice>(&())),
        };
        let object = Api::<DynamicObject>::namespaced_with(self.client.clone(), &self.namespace, &resource)
            .get(name)
            .await?;
        Ok((
            serde_json::to_vec(&object)?.len(),
            serde_json::to_vec(&object.metadata.managed_fields)?.len(),
        ))
    }
}

fn version(text: Option<&String>) -> Result<u64> {
    text.context("no resourceVersion")?
        .parse()
        .context("a resourceVersion that is not a number")
}

/// A flip: when its write started and the resourceVersion it made.
struct Flip {
    started: SystemTime,
    version: u64,
}

/// An idle period and `settings.flips` flips at a fixed spacing: a window of fixed length.
async fn flip_window(settings: &Settings, objects: &mut Objects, variant: Variant) -> Result<Vec<Flip>> {
    let start = tokio::time::Instant::now();
    let mut flips = Vec::new();
    for k in 0..settings.flips {
        tokio::time::sleep_until(start + settings.idle + settings.spacing * k as u32).await;
        let started = SystemTime::now();
        let version = objects.flip(variant).await?;
        flips.push(Flip { started, version });
    }
    tokio::time::sleep_until(start + settings.window()).await;
    Ok(flips)
}

/// What the apiserver uses: CPU ticks, VmRSS (KiB), and from its /metrics the Go heap in use,
/// goroutines and the watches open on the variant's resource.
struct ApiserverState {
    rss_kib: u64,
    heap_bytes: f64,
    goroutines: f64,
    watches: f64,
}

async fn apiserver_state(client: &Client, pid: i32, variant: Variant) -> Result<ApiserverState> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let metrics = client.request_text(request).await?;
    let resource = match variant {
        Variant::GrpcBackend => "resource=\"grpcbackends\"",
        Variant::EndpointSlice => "resource=\"endpointslices\"",
    };
    let sum = |name: &str, filter: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']) && filter.iter().all(|f| rest.contains(f)))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |sum, value| sum + value)
    };
    Ok(ApiserverState {
        rss_kib: memory_kib(pid, "VmRSS")?,
        heap_bytes: sum("go_memstats_heap_inuse_bytes", &[]),
        goroutines: sum("go_goroutines", &[]),
        watches: sum("apiserver_longrunning_requests", &["verb=\"WATCH\"", resource]),
    })
}

fn cpu_seconds(pid: i32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / ticks_per_second())
}

/// What one variant measured in one round.
struct Measured {
    variant: Variant,
    baseline_cpu: f64,
    with_cpu: f64,
    establish_cpu: f64,
    establish_time: Duration,
    before: ApiserverState,
    with: ApiserverState,
    latencies: Vec<Duration>,
    /// Per flip: until the last follower had it.
    all_updated: Vec<Duration>,
    missed: usize,
    errors: u64,
}

impl Measured {
    fn per_follower_cpu(&self, followers: usize) -> f64 {
        (self.with_cpu - self.baseline_cpu) / followers as f64
    }
}

async fn measure(
    settings: &Settings,
    control_plane: &ControlPlane,
    objects: &mut Objects,
    variant: Variant,
) -> Result<Measured> {
    // A fresh apiserver: its memory and caches are this variant's alone.
    control_plane.stop_apiserver();
    control_plane.start_apiserver().await?;
    let pid = control_plane.apiserver_pid().context("no apiserver")?;
    let client = &objects.client.clone();
    // The admin client reconnects; one request warms it and the watch caches.
    let mut tries = 0;
    while let Err(error) = objects.json_bytes(variant).await {
        tries += 1;
        if tries > 20 {
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(settings.settle).await;

    let cpu = cpu_seconds(pid)?;
    flip_window(settings, objects, variant).await?;
    let baseline_cpu = cpu_seconds(pid)? - cpu;
    let before = apiserver_state(client, pid, variant).await?;

    let establish_started = Instant::now();
    let cpu = cpu_seconds(pid)?;
    let fleet = Fleet::spawn(settings, variant, &objects.namespace, control_plane.kubeconfig())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last_print = Instant::now();
    loop {
        let ready = fleet.ready();
        if ready == settings.followers {
            break;
        }
        if Instant::now() > deadline {
            let reports = fleet.stop();
            bail!(
                "only {ready} of {} {} followers read the object within 300 s ({} errors, last: {:?})",
                settings.followers,
                variant.name(),
                reports.errors,
                reports.last_error
            );
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("  {ready} of {} followers ready", settings.followers);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let establish_time = establish_started.elapsed();
    // The idle rate of the baseline, taken out of the establishing CPU.
    let establish_cpu =
        (cpu_seconds(pid)? - cpu) - baseline_cpu * establish_time.as_secs_f64() / settings.window().as_secs_f64();
    tokio::time::sleep(settings.settle).await;
    let with = apiserver_state(client, pid, variant).await?;

    let cpu = cpu_seconds(pid)?;
    let flips = flip_window(settings, objects, variant).await?;
    let with_cpu = cpu_seconds(pid)? - cpu;
    // Stragglers of the last flip (not part of the CPU window).
    let last = flips.last().map_or(0, |f| f.version);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.seen_at_least(last) < settings.followers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reports = fleet.stop();

    let mut latencies = Vec::new();
    let mut all_updated = Vec::new();
    let mut missed = 0;
    for flip in &flips {
        let started = unix_nanos(flip.started);
        let mut slowest = Duration::ZERO;
        for reads in &reports.seen {
            match reads.iter().find(|(v, _)| *v >= flip.version) {
                Some((_, at)) => {
                    let latency = Duration::from_nanos((at - started).max(0) as u64);
                    slowest = slowest.max(latency);
                    latencies.push(latency);
                }
                None => missed += 1,
            }
        }
        all_updated.push(slowest);
    }
    latencies.sort();
    all_updated.sort();
    Ok(Measured {
        variant,
        baseline_cpu,
        with_cpu,
        establish_cpu,
        establish_time,
        before,
        with,
        latencies,
        all_updated,
        missed,
        errors: reports.errors,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The middle value, or the mean of the two middle ones.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn parent() -> Result<()> {
    let settings = Settings::from_env();
    eprintln!(
        "starting the control plane; {} followers in {} processes, {} flips, {} rounds{}",
        settings.followers,
        settings.processes,
        settings.flips,
        settings.rounds,
        if settings.quick { " (quick)" } else { "" }
    );
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "fanout").await?;
    let mut objects = Objects::create(client.clone(), namespace).await?;
    let sizes: BTreeMap<&str, (usize, usize)> = [
        ("GrpcBackend", objects.json_bytes(Variant::GrpcBackend).await?),
        ("EndpointSlice", objects.json_bytes(Variant::EndpointSlice).await?),
    ]
    .into();

    let followers = settings.followers;
    let mut results: Vec<Measured> = Vec::new();
    for round in 1..=settings.rounds {
        let order = if round % 2 == 1 {
            [Variant::GrpcBackend, Variant::EndpointSlice]
        } else {
            [Variant::EndpointSlice, Variant::GrpcBackend]
        };
        for variant in order {
            eprintln!("round {round}: {} ...", variant.name());
            let m = measure(&settings, &control_plane, &mut objects, variant).await?;
            println!(
                "round {round} {:<13} flip -> seen p50 {:>6.1} ms p95 {:>6.1} ms max {:>6.1} ms (missed {}, watch errors {}); \
                 apiserver CPU over {:.0?}: {:.2} s without followers, {:.2} s with; establishing {:.2} s CPU in {:.1?}; \
                 RSS {:.0} -> {:.0} MiB, heap {:.0} -> {:.0} MiB, goroutines {:.0} -> {:.0}, watches {:.0} -> {:.0}",
                variant.name(),
                ms(percentile(&m.latencies, 0.5)),
                ms(percentile(&m.latencies, 0.95)),
                ms(percentile(&m.latencies, 1.0)),
                m.missed,
                m.errors,
                settings.window(),
                m.baseline_cpu,
                m.with_cpu,
                m.establish_cpu,
                m.establish_time,
                m.before.rss_kib as f64 / 1024.0,
                m.with.rss_kib as f64 / 1024.0,
                m.before.heap_bytes / 1048576.0,
                m.with.heap_bytes / 1048576.0,
                m.before.goroutines,
                m.with.goroutines,
                m.before.watches,
                m.with.watches,
            );
            results.push(m);
        }
    }

    println!();
    println!(
        "{followers} watch-only followers in {} processes (one kube Client and connection each) of one object of \
         {ENDPOINTS} endpoints (GrpcBackend {} bytes of JSON, {} of them managedFields; EndpointSlice {} bytes, {} \
         managedFields); {} rounds; per round and \
         variant a fresh apiserver, then a window of {:?} idle + {} flips every {:?}, without and with the followers",
        settings.processes,
        sizes["GrpcBackend"].0,
        sizes["GrpcBackend"].1,
        sizes["EndpointSlice"].0,
        sizes["EndpointSlice"].1,
        settings.rounds,
        settings.idle,
        settings.flips,
        settings.spacing,
    );
    println!(
        "| followers of | flip -> seen p50 | p95 | max | all {followers} updated (median flip, worst flip) | apiserver CPU per follower per window | establishing CPU per follower | RSS per follower | heap per follower |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut summary: BTreeMap<&str, (f64, f64, f64, f64)> = BTreeMap::new();
    for variant in [Variant::GrpcBackend, Variant::EndpointSlice] {
        let of: Vec<&Measured> = results.iter().filter(|m| m.variant == variant).collect();
        let mut latencies: Vec<Duration> = of.iter().flat_map(|m| m.latencies.iter().copied()).collect();
        latencies.sort();
        let mut all_updated: Vec<Duration> = of.iter().flat_map(|m| m.all_updated.iter().copied()).collect();
        all_updated.sort();
        let mut cpu: Vec<f64> = of.iter().map(|m| m.per_follower_cpu(followers)).collect();
        let mut establish: Vec<f64> = of.iter().map(|m| m.establish_cpu / followers as f64).collect();
        let mut rss: Vec<f64> = of
            .iter()
            .map(|m| (m.with.rss_kib as f64 - m.before.rss_kib as f64) / followers as f64)
            .collect();
        let mut heap: Vec<f64> = of
            .iter()
            .map(|m| (m.with.heap_bytes - m.before.heap_bytes) / 1024.0 / followers as f64)
            .collect();
        let (cpu, establish, rss, heap) = (
            median(&mut cpu),
            median(&mut establish),
            median(&mut rss),
            median(&mut heap),
        );
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms, {:.1} ms | {:.2} ms | {:.2} ms | {:.1} KiB | {:.1} KiB |",
            variant.name(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.95)),
            ms(percentile(&latencies, 1.0)),
            ms(percentile(&all_updated, 0.5)),
            ms(percentile(&all_updated, 1.0)),
            cpu * 1e3,
            establish * 1e3,
            rss,
            heap,
        );
        println!(
            "{} followers: flip -> seen p50 = {:.1} ms, p95 = {:.1} ms, max = {:.1} ms",
            variant.name(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.95)),
            ms(percentile(&latencies, 1.0)),
        );
        summary.insert(variant.name(), (cpu, establish, rss, heap));
    }
    let mut baselines: Vec<f64> = results.iter().map(|m| m.baseline_cpu).collect();
    println!(
        "baseline (no followers): apiserver CPU over the window = {:.2} s (median of {} windows)",
        median(&mut baselines),
        results.len()
    );
    let (a, b) = (summary["GrpcBackend"], summary["EndpointSlice"]);
    println!(
        "per follower, GrpcBackend / EndpointSlice: apiserver CPU (window) = {:.2}, establishing CPU = {:.2}, RSS = {:.2}, heap = {:.2}",
        a.0 / b.0,
        a.1 / b.1,
        a.2 / b.2,
        a.3 / b.3,
    );
    let mut p95: Vec<Duration> = results
        .iter()
        .filter(|m| m.variant == Variant::GrpcBackend)
        .flat_map(|m| m.latencies.iter().copied())
        .collect();
    p95.sort();
    let p95 = percentile(&p95, 0.95);
    println!(
        "goals: GrpcBackend p95 {:.1} ms (goal <= 1000 ms: {}); apiserver CPU per follower GrpcBackend / EndpointSlice {:.2} \
         (goal <= 1: {})",
        ms(p95),
        if p95 <= Duration::from_secs(1) {
            "met"
        } else {
            "NOT met"
        },
        a.0 / b.0,
        if a.0 <= b.0 { "met" } else { "NOT met" },
    );
    Ok(())
}
