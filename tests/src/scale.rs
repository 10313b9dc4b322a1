//! The scale scenario: many endpoints in one GrpcBackend and many small GrpcBackends, against
//! the operator binary in its own process (so that its memory and CPU are its own).
//!
//! Every endpoint is an address of the private network namespace served by one wildcard echo
//! listener: the namespace owns all of 10.250.x.y, so one socket answers for thousands of
//! "pods", and the operator opens one real connection per endpoint.
//!
//! Used by `make scale` (release operator, 10,000 endpoints both ways) and by a short test in
//! the README's test command.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube::{Api, Client, api::ListParams};
use kubegrpc_crds::{EndpointStatus, FULL_WEIGHT, GrpcBackend, Health};
use kubegrpc_echo::BackendOptions;
use serde_json::json;

use crate::{
    ControlPlane,
    backends::next_backend_ip,
    install::{free_local_address, http_get, metric_series},
    netns::assert_private_network,
    objects::{SliceEndpoint, apply_slice, create_grpc_backend, create_service},
    process::ManagedProcess,
    tls::TestCa,
    wait,
};

/// What to build: `backends` GrpcBackends of `endpoints_each` endpoints, served over TLS
/// (`spec.tls` with a CA bundle) when `tls`.
#[derive(Clone, Debug)]
pub struct Shape {
    pub backends: usize,
    pub endpoints_each: usize,
    pub tls: bool,
}

impl Shape {
    /// `BACKENDSxENDPOINTS`, with a `tls` suffix for the TLS shape (e.g. `1x5000tls`).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let (text, tls) = match text.strip_suffix("tls") {
            Some(plain) => (plain, true),
            None => (text, false),
        };
        let (backends, each) = text.split_once('x').context("a shape is BACKENDSxENDPOINTS[tls]")?;
        Ok(Self {
            backends: backends.trim().parse()?,
            endpoints_each: each.trim().parse()?,
            tls,
        })
    }

    pub fn total(&self) -> usize {
        self.backends * self.endpoints_each
    }
}

#[derive(Clone, Debug)]
pub struct ScaleOptions {
    pub shape: Shape,
    /// The operator binary (release for figures, debug in the short test).
    pub operator: PathBuf,
    /// How long to watch the converged operator for writes and CPU.
    pub idle: Duration,
    pub restarts: usize,
    /// Changes of one endpoint to time (see [`ScaleReport::change_latencies`]).
    pub changes: usize,
    /// The port the wildcard listener takes (one per run in a test process), below the
    /// ephemeral range (32768-60999) that the probe connections' local ports come from.
    pub port: u16,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct ScaleReport {
    pub shape: Shape,
    /// From the operator's start to every GrpcBackend listing all its endpoints Serving.
    pub first_complete: Duration,
    /// Resident memory after convergence, and the peak over the run (VmHWM), KiB.
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// CPU used while idle, as a share of one core.
    pub idle_cpu: f64,
    pub idle_writes: u64,
    /// Status writes seen after each restart (should be 0), and how long until every endpoint
    /// had answered the new process.
    pub restart_writes: Vec<u64>,
    pub restart_answered: Vec<Duration>,
    /// The largest GrpcBackend as served by the apiserver, bytes of JSON.
    pub largest_object_bytes: usize,
    /// One endpoint of the first GrpcBackend changed in its EndpointSlice (terminating, then
    /// not): per change, the time until a watcher of the GrpcBackend saw it in the status.
    pub change_latencies: Vec<Duration>,
    /// The operator's mean reconcile time (computing and applying the status) during the
    /// changes.
    pub change_reconcile: Duration,
}

impl ScaleReport {
    pub fn print(&self) {
        println!(
            "scale {} x {}{} = {} endpoints: first complete status after {:.1?}; RSS {:.1} MiB (peak {:.1} MiB, \
             {:.1} KiB per endpoint); idle CPU {:.1}% of a core, {} status writes while idle; restarts: writes {:?}, \
             all answered after {:?}; largest object {} bytes; one change seen after {:?} (median {:?}), \
             reconcile {:?}",
            self.shape.backends,
            self.shape.endpoints_each,
            if self.shape.tls { " (TLS)" } else { "" },
            self.shape.total(),
            self.first_complete,
            self.rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / self.shape.total() as f64,
            self.idle_cpu * 100.0,
            self.idle_writes,
            self.restart_writes,
            self.restart_answered,
            self.largest_object_bytes,
            self.change_latencies,
            median(&self.change_latencies),
            self.change_reconcile,
        );
    }
}

/// The middle value (the upper one of two).
pub fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// The entry the operator publishes for [`SliceEndpoint::deployment_pod`] `n` (of Deployment
/// `echo`, port 8080) while it is Serving.
pub fn realistic_endpoint(n: usize) -> EndpointStatus {
    let address = SocketAddr::from((
        std::net::Ipv4Addr::new(10, 250, (1 + n / 250) as u8, (1 + n % 250) as u8),
        8080,
    ));
    let slice = SliceEndpoint::deployment_pod(address, "echo", n);
    EndpointStatus {
        address: address.ip().to_string(),
        port: i32::from(address.port()),
        weight: FULL_WEIGHT,
        health: Health::Serving,
        serving: true,
        terminating: false,
        zone: slice.zone,
        for_zones: Vec::new(),
        pod: slice.pod,
        target_ref: None,
        reason: None,
        last_transition_time: None,
        fail_open: false,
    }
}

/// The memory limit `deploy/deployment.yaml` gives the operator, in KiB.
pub fn deploy_memory_limit_kib() -> Result<u64> {
    let path = crate::install::deploy_dir().join("deployment.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let deployment: serde_json::Value = serde_saphyr::from_str(&text).context("deployment.yaml is not YAML")?;
    let limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        .as_str()
        .context("deployment.yaml sets no memory limit")?;
    let (number, unit) = limit.split_at(limit.find(|c: char| !c.is_ascii_digit()).unwrap_or(limit.len()));
    let number: u64 = number.parse().context("memory limit")?;
    Ok(match unit {
        "Ki" => number,
        "Mi" => number * 1024,
        "Gi" => number * 1024 * 1024,
        other => bail!("memory limit unit {other:?} not understood"),
    })
}

/// Runs the scenario in a new namespace of `control_plane`.
pub async fn run(control_plane: &ControlPlane, options: &ScaleOptions) -> Result<ScaleReport> {
    assert_private_network();
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "scale").await?;
    let shape = &options.shape;
    // TLS: one certificate for the name every GrpcBackend verifies, its CA in ConfigMap `ca`.
    let ca = shape.tls.then(|| TestCa::new("kubegrpc scale CA")).transpose()?;
    let tls = match &ca {
        Some(ca) => {
            let cert = ca.server_cert(&[SCALE_SERVER_NAME])?;
            ca.create_bundle_config_map(&client, &namespace, "ca").await?;
            Some((cert.cert_pem, cert.key_pem))
        }
        None => None,
    };
    let _server = kubegrpc_echo::Backend::start(
        SocketAddr::from(([0, 0, 0, 0], options.port)),
        BackendOptions {
            tls,
            ..BackendOptions::default()
        },
    )
    .await?;
    let first_slice = create_objects(&client, &namespace, shape, options.port).await?;
    let api = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);

    let metrics = free_local_address()?;
    let log_dir = control_plane.dir().to_path_buf();
    let start = |generation: usize| -> Result<ManagedProcess> {
        let mut command = Command::new(&options.operator);
        command
            .arg("--kubeconfig")
            .arg(control_plane.kubeconfig())
            .args(["--namespace", &namespace, "--identity", &format!("scale-{generation}")])
            .arg("--metrics-address")
            .arg(metrics.to_string())
            // Every change written at once: the changes timed below come one after the other,
            // and coalescing (1 s by default) would hold each for the interval.
            .args(["--status-write-interval", "0s"])
            .env("RUST_LOG", "info");
        Ok(ManagedProcess::start(
            "kubegrpc-operator (scale)",
            command,
            &log_dir.join(format!("operator-{namespace}-{generation}.log")),
        )?)
    };

    let started = Instant::now();
    let mut operator = start(0)?;
    let total = shape.total();
    let versions = wait::until("every endpoint listed Serving", Duration::from_secs(600), || {
        let api = api.clone();
        async move { all_serving(&api, shape).await }
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    let first_complete = started.elapsed();

    // Idle: nothing changes, so nothing is written, and little CPU is used.
    let cpu_before = cpu_ticks(operator.pid())?;
    let idle_started = Instant::now();
    tokio::time::sleep(options.idle).await;
    let idle_cpu =
        (cpu_ticks(operator.pid())? - cpu_before) as f64 / ticks_per_second() / idle_started.elapsed().as_secs_f64();
    let idle_writes = changed(&api, &versions).await?;
    if idle_writes > 0 {
        println!(
            "scale: {idle_writes} status writes while nothing changed; the operator's log ends with:\n{}",
            operator.log_tail(40)
        );
    }
    let rss_kib = memory_kib(operator.pid(), "VmRSS")?;
    let mut peak_rss_kib = memory_kib(operator.pid(), "VmHWM")?;

    let mut restart_writes = Vec::new();
    let mut restart_answered = Vec::new();
    for generation in 1..=options.restarts {
        // Every write from here on is an event of a watch from this collection version.
        let before_restart = api
            .list(&ListParams::default().limit(1))
            .await?
            .metadata
            .resource_version
            .context("a list without a resourceVersion")?;
        operator.stop(Duration::from_secs(10));
        let restarted = Instant::now();
        operator = start(generation)?;
        wait::until(
            "every endpoint answered the new process",
            Duration::from_secs(600),
            || async move {
                let serving = serving_probes(metrics).await.unwrap_or(0);
                Ok((serving >= total as u64).then_some(()))
            },
        )
        .await
        .with_context(|| operator.log_tail(20))?;
        restart_answered.push(restarted.elapsed());
        // Every status write since the restart, counted as watch events, until three status
        // write intervals (1 s) after every first answer: a write the answers caused is in.
        let writes = writes_since(&api, &before_restart, Duration::from_secs(3)).await?;
        if writes > 0 {
            println!(
                "scale: {writes} status writes after restart {generation}; the operator's log ends with:\n{}",
                operator.log_tail(40)
            );
        }
        restart_writes.push(writes);
        peak_rss_kib = peak_rss_kib.max(memory_kib(operator.pid(), "VmHWM")?);
    }

    let (change_latencies, change_reconcile) =
        changes(&client, &namespace, &api, first_slice, metrics, options.changes).await?;

    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &kube::api::ApiResource::erase::<GrpcBackend>(&()),
    );
    let mut largest_object_bytes = 0;
    for object in raw.list(&ListParams::default()).await? {
        largest_object_bytes = largest_object_bytes.max(serde_json::to_vec(&object)?.len());
    }
    operator.stop(Duration::from_secs(10));
    Ok(ScaleReport {
        shape: shape.clone(),
        first_complete,
        rss_kib,
        peak_rss_kib,
        idle_cpu,
        idle_writes,
        restart_writes,
        restart_answered,
        largest_object_bytes,
        change_latencies,
        change_reconcile,
    })
}

/// Flips `terminating` of the first endpoint of `gb-0`'s first slice `count` times; per flip,
/// the time from the slice write to a watcher seeing it in the status.
async fn changes(
    client: &Client,
    namespace: &str,
    api: &Api<GrpcBackend>,
    mut slice: Vec<SliceEndpoint>,
    metrics: SocketAddr,
    count: usize,
) -> Result<(Vec<Duration>, Duration)> {
    use futures::StreamExt;
    let (sum_before, count_before) = reconcile_time(metrics).await?;
    let mut latencies = Vec::new();
    for _ in 0..count {
        let current = api.get("gb-0").await?;
        let version = current.metadata.resource_version.clone().unwrap_or_default();
        let mut events = api
            .watch(
                &kube::api::WatchParams::default().fields("metadata.name=gb-0"),
                &version,
            )
            .await?
            .boxed();
        let target = slice[0].address;
        let terminating = !slice[0].terminating;
        slice[0].terminating = terminating;
        slice[0].ready = !terminating;
        let started = Instant::now();
        apply_slice(client, namespace, "svc-0", "svc-0-0", "grpc", &slice).await?;
        let seen = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(event) = events.next().await {
                if let kube::api::WatchEvent::Modified(object) = event? {
                    let shown = object.status.as_ref().is_some_and(|s| {
                        s.endpoints.iter().any(|e| {
                            e.address == target.ip().to_string()
                                && e.port == i32::from(target.port())
                                && e.terminating == terminating
                        })
                    });
                    if shown {
                        return Ok::<_, anyhow::Error>(started.elapsed());
                    }
                }
            }
            bail!("the watch ended")
        })
        .await
        .context("the change never showed in the status")??;
        latencies.push(seen);
    }
    let (sum_after, count_after) = reconcile_time(metrics).await?;
    let reconciles = (count_after - count_before).max(1.0);
    Ok((
        latencies,
        Duration::from_secs_f64((sum_after - sum_before) / reconciles),
    ))
}

/// The operator's reconcile duration histogram: sum of seconds and count.
async fn reconcile_time(metrics: SocketAddr) -> Result<(f64, f64)> {
    let series = metric_series(&http_get(metrics, "/metrics").await?);
    let value = |name: &str| series.get(name).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok((
        value("kubegrpc_reconcile_duration_seconds_sum"),
        value("kubegrpc_reconcile_duration_seconds_count"),
    ))
}

/// Services of `endpoints_each` endpoints in slices of at most 100, each with a GrpcBackend,
/// with what a real EndpointSlice carries (zone, node, Pod). Returns `svc-0`'s first slice.
/// The name the TLS shape's certificate is for and its GrpcBackends verify.
const SCALE_SERVER_NAME: &str = "echo.scale.svc";

async fn create_objects(client: &Client, namespace: &str, shape: &Shape, port: u16) -> Result<Vec<SliceEndpoint>> {
    let mut first_slice = Vec::new();
    let mut pod = 0usize;
    for backend in 0..shape.backends {
        let service = format!("svc-{backend}");
        create_service(client, namespace, &service, &[("grpc", 80)]).await?;
        let endpoints: Vec<SliceEndpoint> = (0..shape.endpoints_each)
            .map(|_| {
                pod += 1;
                SliceEndpoint::deployment_pod(SocketAddr::from((next_backend_ip(), port)), &service, pod)
            })
            .collect();
        for (index, chunk) in endpoints.chunks(100).enumerate() {
            apply_slice(
                client,
                namespace,
                &service,
                &format!("{service}-{index}"),
                "grpc",
                chunk,
            )
            .await?;
            if backend == 0 && index == 0 {
                first_slice = chunk.to_vec();
            }
        }
        let spec = if shape.tls {
            json!({"service": service, "port": "grpc",
                   "tls": {"serverName": SCALE_SERVER_NAME, "caBundle": {"configMap": "ca"}}})
        } else {
            json!({"service": service, "port": "grpc"})
        };
        create_grpc_backend(client, namespace, &format!("gb-{backend}"), spec).await?;
    }
    Ok(first_slice)
}

/// The resource version of every GrpcBackend once all list all their endpoints Serving.
async fn all_serving(api: &Api<GrpcBackend>, shape: &Shape) -> Result<Option<BTreeMap<String, String>>> {
    let list = api.list(&ListParams::default()).await?;
    let complete = list.items.len() == shape.backends
        && list.items.iter().all(|b| {
            b.status.as_ref().is_some_and(|s| {
                s.ready_endpoints as usize == shape.endpoints_each && s.endpoints.len() == shape.endpoints_each
            })
        });
    Ok(complete.then(|| {
        list.items
            .iter()
            .map(|b| {
                (
                    b.metadata.name.clone().unwrap_or_default(),
                    b.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    }))
}

/// How many GrpcBackends changed since `versions` was taken.
async fn changed(api: &Api<GrpcBackend>, versions: &BTreeMap<String, String>) -> Result<u64> {
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|b| {
            versions.get(b.metadata.name.as_deref().unwrap_or_default()) != b.metadata.resource_version.as_ref()
        })
        .count() as u64)
}

/// The GrpcBackend writes since the collection version `since` (each one a watch event, none
/// missed however close together), replayed and then followed for `window`.
async fn writes_since(api: &Api<GrpcBackend>, since: &str, window: Duration) -> Result<u64> {
    use futures::StreamExt;
    let params = kube::api::WatchParams::default().timeout(window.as_secs().max(1) as u32);
    let mut events = api.watch(&params, since).await?.boxed();
    let mut writes = 0;
    while let Some(event) = events.next().await {
        match event? {
            kube::api::WatchEvent::Modified(_) => writes += 1,
            kube::api::WatchEvent::Bookmark(_) => {}
            kube::api::WatchEvent::Error(error) => bail!("the watch of GrpcBackend writes failed: {error}"),
            other => bail!("a GrpcBackend was added or deleted during a restart: {other:?}"),
        }
    }
    Ok(writes)
}

/// Probes that answered Serving so far, from the operator's /metrics.
async fn serving_probes(metrics: SocketAddr) -> Result<u64> {
    let series = metric_series(&http_get(metrics, "/metrics").await?);
    let serving = series.get("kubegrpc_probes_total{result=\"Serving\"}");
    Ok(serving.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64)
}

pub fn memory_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for process {pid}"))
}

/// User + system CPU of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

#[allow(unsafe_code, reason = "sysconf(3): /proc CPU times are in clock ticks")]
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
