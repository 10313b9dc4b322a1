//! The operator process: flags, logging, the HTTP endpoints and the reconciler, with a
//! graceful shutdown on SIGTERM or SIGINT.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tracing::info;

use crate::{Metrics, Settings, health::tls::ClientIdentity, http, status::DEFAULT_ENDPOINTS_BUDGET};

/// Health-checks the endpoints of GrpcBackends' Services and publishes weighted endpoint lists
/// in their status.
#[derive(Clone, Debug, Parser)]
#[command(name = "kubegrpc-operator", version)]
pub struct Options {
    /// A kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,

    /// Least time between two status writes of one GrpcBackend; changes in between are
    /// coalesced into the next write.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub status_write_interval: Duration,

    /// Most bytes of JSON the endpoint list of one status may take (etcd refuses objects over
    /// 1.5 MiB); past it the list is cut, usable endpoints first, and a condition says so.
    #[arg(long, default_value_t = DEFAULT_ENDPOINTS_BUDGET)]
    pub endpoints_budget_bytes: usize,

    /// Most GrpcBackends reconciled at once.
    #[arg(long, default_value_t = crate::controller::DEFAULT_RECONCILE_CONCURRENCY)]
    pub reconcile_concurrency: u16,

    /// Bind probe connections to this local address (multi-homed hosts); endpoints of the
    /// other address family are connected from the system's choice.
    #[arg(long)]
    pub probe_source_address: Option<std::net::IpAddr>,

    /// The certificate chain (PEM) the health checks present to TLS backends that ask for a
    /// client certificate (mutual TLS; with --tls-client-key). Mount it from a Secret: the
    /// operator reads no Secrets itself. The files are read again when they change, so a
    /// rotation (cert-manager) needs no restart.
    #[arg(long, env = "TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-client-cert.
    #[arg(long, env = "TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,

    /// This replica's name, in Events and the user agent (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Run as one of several replicas: only the holder of the Lease reconciles and writes
    /// status; the others wait, ready to take over.
    #[arg(long)]
    pub leader_elect: bool,

    /// The Lease's name.
    #[arg(long, default_value = "kubegrpc-operator")]
    pub lease_name: String,

    /// The Lease's namespace (default: the pod's namespace, else kubegrpc-system).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a Lease holds without renewal, in seconds: a standby takes over at most this
    /// long after the leader stopped renewing.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// Serve every GrpcBackend over xDS (ADS, state of the world) on this address, for gRPC
    /// clients of any language dialing `xds:///NAME.NAMESPACE`. Every replica serves, leader
    /// or not. Off by default.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<SocketAddr>,

    /// Serve xDS over TLS with this certificate chain (PEM; with --xds-tls-key-file). Read at
    /// start: a rotated certificate takes a restart.
    #[arg(
        long,
        env = "XDS_TLS_CERT_FILE",
        requires = "xds_tls_key_file",
        requires = "xds_address"
    )]
    pub xds_tls_cert_file: Option<std::path::PathBuf>,

    /// TLS Clusters served over xDS also name the certificate provider instance
    /// "kubegrpc-identity": the client certificate xDS clients present to backends that require
    /// one (mutual TLS). Every client's bootstrap must then define that instance, or grpc-go
    /// fails the Cluster.
    #[arg(long, env = "XDS_UPSTREAM_CLIENT_IDENTITY", requires = "xds_address")]
    pub xds_upstream_client_identity: bool,

    /// The private key (PEM) of --xds-tls-cert-file.
    #[arg(long, env = "XDS_TLS_KEY_FILE", requires = "xds_tls_cert_file")]
    pub xds_tls_key_file: Option<std::path::PathBuf>,

    /// Mutual TLS on the xDS port: clients must present a certificate that chains to this CA
    /// bundle (PEM); the others are refused.
    #[arg(long, env = "XDS_TLS_CLIENT_CA_FILE", requires = "xds_tls_cert_file")]
    pub xds_tls_client_ca_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration: kube::core::Duration = text.parse().map_err(|e| format!("{e}"))?;
    if duration.is_negative() {
        return Err("must not be negative".into());
    }
    Ok(duration.into())
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let identity = options.identity.clone().unwrap_or_else(host_name);
    let client = client(&options, &identity).await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    let server = tokio::spawn(http::serve(
        options.metrics_address,
        http::Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown(),
    ));
    let xds_tls = match (&options.xds_tls_cert_file, &options.xds_tls_key_file) {
        (Some(certificate), Some(key)) => Some(
            crate::xds::server::XdsTls::read(certificate, key, options.xds_tls_client_ca_file.as_deref())
                .context("cannot read the xDS TLS files")?,
        ),
        _ => None,
    };
    let xds = options.xds_address.map(|address| {
        let cache = Arc::new(
            crate::xds::XdsCache::default().with_upstream_client_identity(options.xds_upstream_client_identity),
        );
        let follower = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::xds::watch::follow(
            client.clone(),
            options.namespace.clone(),
            cache.clone(),
        )));
        let server = tokio::spawn(crate::xds::server::serve(
            address,
            cache,
            metrics.clone(),
            xds_tls,
            shutdown(),
        ));
        (follower, server)
    });
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = stop.send(true);
    });

    let settings = Settings {
        namespace: options.namespace.clone(),
        status_write_interval: options.status_write_interval,
        endpoints_budget: options.endpoints_budget_bytes,
        identity: identity.clone(),
        reconcile_concurrency: options.reconcile_concurrency,
        probe_source_address: options.probe_source_address,
        probe_client_identity: match (&options.tls_client_cert, &options.tls_client_key) {
            (Some(certificate), Some(key)) => Some(Arc::new(
                ClientIdentity::load(certificate, key)
                    .map_err(anyhow::Error::msg)
                    .context("cannot read the probes' client certificate")?,
            )),
            _ => None,
        },
    };
    info!(%identity, namespace = options.namespace.as_deref().unwrap_or("(all)"), "starting");
    client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API")?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    if options.leader_elect {
        lead_then_run(&options, client, settings, metrics, &identity, shutdown).await?;
    } else {
        crate::run(client, settings, metrics, shutdown()).await?;
    }
    server.await??;
    if let Some((_follower, xds_server)) = xds {
        xds_server.await?.context("the xDS server failed")?;
    }
    info!("stopped");
    Ok(())
}

/// Waits for the Lease, reconciles while holding it, and releases it on shutdown. Losing it
/// ends the process with an error: a restart comes back as a standby with a clean state.
async fn lead_then_run<F, Fut>(
    options: &Options,
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    identity: &str,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let namespace = options.lease_namespace.clone().unwrap_or_else(pod_namespace);
    let lease = format!("{namespace}/{}", options.lease_name);
    let duration = options.lease_duration_seconds.max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&namespace)
        .with_identity(identity)
        .with_field_manager(format!("kubegrpc-operator-{identity}"))
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .with_context(|| format!("cannot use Lease {lease}"))?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(%lease, "standing by for the leader Lease");
    let acquired = tokio::select! {
        held = leading.wait_for(|held| *held) => held.map(|_| true).map_err(|_| ()),
        () = shutdown() => Ok(false),
    };
    match acquired {
        Ok(true) => {}
        Ok(false) => {
            drop(leading);
            let _ = lease_task.await;
            return Ok(());
        }
        Err(()) => anyhow::bail!("the manager of Lease {lease} stopped"),
    }
    info!(%lease, "leading: reconciling");
    metrics.leader.set(1);
    let mut losing = leading.clone();
    let shutting_down = shutdown();
    let stop = async move {
        tokio::select! {
            () = shutting_down => {}
            _ = losing.wait_for(|held| !*held) => {}
        }
    };
    crate::run(client, settings, metrics.clone(), stop).await?;
    metrics.leader.set(0);
    if !*leading.borrow() {
        anyhow::bail!("lost the leader Lease {lease}; exiting so that a restart comes back as a standby");
    }
    drop(leading);
    let manager = lease_task.await.context("the Lease manager panicked")??;
    manager
        .release()
        .await
        .with_context(|| format!("cannot release the leader Lease {lease}"))?;
    info!(%lease, "leader Lease released");
    Ok(())
}

/// The pod's namespace, as the service-account mount tells it.
fn pod_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map_or_else(|_| "kubegrpc-system".into(), |n| n.trim().to_string())
}

async fn client(options: &Options, identity: &str) -> anyhow::Result<Client> {
    let mut config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("cannot read {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no Kubernetes configuration found")?,
    };
    // The user agent names the replica, so an audit log tells replicas apart.
    config.headers.push((
        ::http::header::USER_AGENT,
        format!("kubegrpc-operator/{} ({identity})", env!("CARGO_PKG_VERSION")).parse()?,
    ));
    Ok(Client::try_from(config)?)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "kubegrpc-operator".into(), |h| h.trim().to_string())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
