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

use crate::{Metrics, Settings, http, status::DEFAULT_ENDPOINTS_BUDGET};

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

    /// This replica's name, in Events and the user agent (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,
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
    };
    info!(%identity, namespace = options.namespace.as_deref().unwrap_or("(all)"), "starting");
    client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API")?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::run(client, settings, metrics, shutdown()).await?;
    server.await??;
    info!("stopped");
    Ok(())
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
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "kubegrpc-operator".into())
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
