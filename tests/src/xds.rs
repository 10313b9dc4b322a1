//! The operator's xDS server in this process, and the grpc-go or grpc-java xDS client peer
//! (`xds-client-go`, `xds-client-java`, tests/peers) in its own: it dials
//! `xds:///NAME.NAMESPACE` through a bootstrap file naming the server, sends echo requests at a
//! fixed rate and counts the answering backends, read over its small HTTP control API (the same
//! for both peers).

use std::{collections::BTreeMap, fmt, net::SocketAddr, process::Command, sync::Arc, time::Duration};

use anyhow::Result;
use kube::Client;
use kubegrpc_operator::{Metrics, xds};
use serde::Deserialize;
use tokio_util::task::AbortOnDropHandle;

use crate::{
    control_api::{self, start_client_peer},
    netns::assert_private_network,
    peers::peer_executable,
    process::ManagedProcess,
};

/// The operator's xDS server on 10.250.0.1 (a free port), fed by a watch of GrpcBackends.
/// Dropping it shuts the server down as a stopping operator does: every stream ends (the
/// clients reconnect) and the listener closes.
pub struct InProcessXds {
    pub address: SocketAddr,
    pub metrics: Arc<Metrics>,
    _follow: AbortOnDropHandle<()>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl InProcessXds {
    pub async fn start(client: Client, namespace: Option<String>) -> Result<Self> {
        Self::start_on(client, namespace, "10.250.0.1:0".parse()?).await
    }

    /// Over TLS (mutual TLS when `tls` names a client CA).
    pub async fn start_tls(client: Client, namespace: Option<String>, tls: xds::server::XdsTls) -> Result<Self> {
        Self::start_with(client, namespace, "10.250.0.1:0".parse()?, Some(tls)).await
    }

    /// On `address` (a restart binds the address it had).
    pub async fn start_on(client: Client, namespace: Option<String>, address: SocketAddr) -> Result<Self> {
        Self::start_with(client, namespace, address, None).await
    }

    async fn start_with(
        client: Client,
        namespace: Option<String>,
        address: SocketAddr,
        tls: Option<xds::server::XdsTls>,
    ) -> Result<Self> {
        assert_private_network();
        // A restart binds the address the previous server is releasing.
        let listener = crate::wait::until(&format!("{address} free to bind"), Duration::from_secs(10), || async {
            Ok(tokio::net::TcpListener::bind(address).await.ok())
        })
        .await?;
        let address = listener.local_addr()?;
        let cache = Arc::new(xds::XdsCache::default());
        let metrics = Arc::new(Metrics::default());
        let follow = AbortOnDropHandle::new(tokio::spawn(xds::watch::follow(client, namespace, cache.clone())));
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(xds::server::serve_tls_on(
            listener,
            cache,
            metrics.clone(),
            tls,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            address,
            metrics,
            _follow: follow,
            _shutdown: shutdown,
        })
    }
}

/// What the xDS client counted since its last reset.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct XdsCounts {
    /// Successful requests by answering backend (`ip:port`).
    pub ok: BTreeMap<String, u64>,
    /// Failed requests by gRPC code name.
    pub failed: BTreeMap<String, u64>,
    pub sent: u64,
}

impl XdsCounts {
    pub fn of(&self, backend: SocketAddr) -> u64 {
        self.ok.get(&backend.to_string()).copied().unwrap_or(0)
    }

    pub fn succeeded(&self) -> u64 {
        self.ok.values().sum()
    }

    /// `backend`'s share of the successful requests.
    pub fn share(&self, backend: SocketAddr) -> f64 {
        self.of(backend) as f64 / self.succeeded().max(1) as f64
    }

    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The gRPC library of an xDS client peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdsPeer {
    /// grpc-go with its `xds` package (`xds-client-go`).
    Go,
    /// grpc-java with grpc-xds (`xds-client-java`).
    Java,
}

impl XdsPeer {
    /// The executable in the peers directory.
    fn executable(self) -> &'static str {
        match self {
            Self::Go => "xds-client-go",
            Self::Java => "xds-client-java",
        }
    }

    /// How long the control API may take to listen: a JVM starts slowly, more so beside
    /// others on two cores.
    fn startup_deadline(self) -> Duration {
        match self {
            Self::Go => Duration::from_secs(20),
            Self::Java => Duration::from_secs(60),
        }
    }
}

impl fmt::Display for XdsPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Go => "grpc-go",
            Self::Java => "grpc-java",
        })
    }
}

/// A grpc-go or grpc-java xDS client process.
pub struct XdsClient {
    control: SocketAddr,
    _process: ManagedProcess,
}

/// How to start an xDS client peer.
#[derive(Clone, Debug)]
pub struct XdsClientOptions {
    pub peer: XdsPeer,
    /// Resource names (`NAME.NAMESPACE`), each dialed as `xds:///NAME.NAMESPACE`; the calls take
    /// turns over them.
    pub targets: Vec<String>,
    pub xds_server: SocketAddr,
    /// Requests per second, in total.
    pub rate: u32,
    /// The bootstrap's `channel_creds` (default `[{"type": "insecure"}]`; grpc-go also takes
    /// `tls` with certificate files).
    pub channel_creds: Option<serde_json::Value>,
    /// The bootstrap's `certificate_providers` (gRFC A29), for Clusters of TLS backends.
    pub certificate_providers: Option<serde_json::Value>,
    /// The method the calls are for, `/SERVICE/METHOD` (default Echo's). Another method gets an
    /// empty request and is counted by the peer address that answered.
    pub method: Option<String>,
    /// Metadata (`key`, `value`) sent with every call.
    pub metadata: Vec<(String, String)>,
    /// Each call's deadline (default the peer's, 2 s).
    pub timeout: Option<Duration>,
}

impl XdsClientOptions {
    /// The grpc-go client of `targets` through `xds_server` at `rate`, in plain text.
    pub fn new(targets: &[String], xds_server: SocketAddr, rate: u32) -> Self {
        Self {
            peer: XdsPeer::Go,
            targets: targets.to_vec(),
            xds_server,
            rate,
            channel_creds: None,
            certificate_providers: None,
            method: None,
            metadata: Vec::new(),
            timeout: None,
        }
    }
}

impl XdsClient {
    /// Starts the grpc-go client dialing `xds:///{resource_name}` through the server at
    /// `xds_server`, sending `rate` requests per second, and waits for its control API.
    pub async fn start(resource_name: &str, xds_server: SocketAddr, rate: u32) -> Result<Self> {
        Self::start_peer(XdsPeer::Go, resource_name, xds_server, rate).await
    }

    /// As [`XdsClient::start`], with the client of `peer`'s library.
    pub async fn start_peer(peer: XdsPeer, resource_name: &str, xds_server: SocketAddr, rate: u32) -> Result<Self> {
        Self::start_with(XdsClientOptions {
            peer,
            ..XdsClientOptions::new(&[resource_name.to_string()], xds_server, rate)
        })
        .await
    }

    /// The grpc-go client of several GrpcBackends at once (one ADS stream).
    pub async fn start_targets(targets: &[String], xds_server: SocketAddr, rate: u32) -> Result<Self> {
        Self::start_with(XdsClientOptions::new(targets, xds_server, rate)).await
    }

    /// Starts a client as `options` say and waits for its control API.
    pub async fn start_with(options: XdsClientOptions) -> Result<Self> {
        assert_private_network();
        let XdsClientOptions {
            peer,
            targets,
            xds_server,
            rate,
            channel_creds,
            certificate_providers,
            method,
            metadata,
            timeout,
        } = options;
        let executable = peer_executable(peer.executable())?;
        let names = targets.join("+");
        let dir = std::env::temp_dir();
        // Several clients of one target and server (say, one per kind of call) each get their
        // own bootstrap and log.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{names}-{}-{n}", peer.executable(), xds_server.port());
        let bootstrap = dir.join(format!("xds-bootstrap-{tag}.json"));
        let mut contents = serde_json::json!({
            "xds_servers": [{
                "server_uri": xds_server.to_string(),
                "channel_creds": channel_creds.unwrap_or_else(|| serde_json::json!([{"type": "insecure"}])),
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }],
            "node": {"id": format!("kubegrpc-test-{tag}"), "locality": {"zone": "zone-a"}},
        });
        if let Some(providers) = certificate_providers {
            contents["certificate_providers"] = providers;
        }
        std::fs::write(&bootstrap, serde_json::to_vec_pretty(&contents)?)?;
        let log = dir.join(format!("{tag}.log"));
        let mut command = Command::new(&executable);
        for target in &targets {
            command.arg("--target").arg(format!("xds:///{target}"));
        }
        command
            .arg("--bootstrap")
            .arg(&bootstrap)
            .arg("--rate")
            .arg(rate.to_string())
            .arg("--control")
            .arg("10.250.0.1:0");
        if let Some(method) = &method {
            command.arg("--method").arg(method);
        }
        for (key, value) in &metadata {
            command.arg("--metadata").arg(format!("{key}={value}"));
        }
        if let Some(timeout) = timeout {
            command.arg("--timeout").arg(format!("{}ms", timeout.as_millis()));
        }
        let name = format!("{peer} xDS client of {names}");
        let (process, control) = start_client_peer(&name, command, &log, peer.startup_deadline()).await?;
        Ok(Self {
            control,
            _process: process,
        })
    }

    /// The counts since the last reset.
    pub async fn counts(&self) -> Result<XdsCounts> {
        control_api::call(self.control, "GET", "/counts").await
    }

    /// Per backend (`ip:port`), the Unix time in nanoseconds at which its latest successful
    /// reply arrived (cleared by a reset).
    pub async fn last(&self) -> Result<BTreeMap<String, i64>> {
        control_api::call(self.control, "GET", "/last").await
    }

    /// Every failed call since the start (the first 100,000 for grpc-go; 10,000, messages cut at
    /// 256 characters, for grpc-java): when it was sent, its code and message.
    pub async fn failures(&self) -> Result<Vec<crate::kuberesolver::Failure>> {
        control_api::call(self.control, "GET", "/failures").await
    }

    /// Starts a new counting window.
    pub async fn reset(&self) -> Result<()> {
        control_api::call::<serde::de::IgnoredAny>(self.control, "POST", "/reset")
            .await
            .map(|_| ())
    }

    /// A fresh counting window of `requests` successful requests.
    pub async fn window(&self, requests: u64, deadline: Duration) -> Result<XdsCounts> {
        self.reset().await?;
        self.wait_for(requests, deadline).await
    }

    /// Waits until `more` requests succeeded in the current window.
    pub async fn wait_for(&self, more: u64, deadline: Duration) -> Result<XdsCounts> {
        crate::wait::until(&format!("{more} successful xDS client requests"), deadline, || async {
            let counts = self.counts().await?;
            Ok((counts.succeeded() >= more).then_some(counts))
        })
        .await
    }
}
