//! The operator's xDS server in this process, and the grpc-go xDS client peer
//! (`xds-client-go`, tests/peers) in its own: it dials `xds:///NAME.NAMESPACE` through a
//! bootstrap file naming the server, sends echo requests at a fixed rate and counts the
//! answering backends, read over its small HTTP control API.

use std::{collections::BTreeMap, net::SocketAddr, process::Command, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use kube::Client;
use kubegrpc_operator::{Metrics, xds};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;

use crate::{netns::assert_private_network, peers::peers_dir, process::ManagedProcess};

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

    /// On `address` (a restart binds the address it had).
    pub async fn start_on(client: Client, namespace: Option<String>, address: SocketAddr) -> Result<Self> {
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
        tokio::spawn(xds::server::serve_on(listener, cache, metrics.clone(), async move {
            let _ = stopped.await;
        }));
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

    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// A grpc-go xDS client process.
pub struct XdsClient {
    control: SocketAddr,
    _process: ManagedProcess,
}

impl XdsClient {
    /// Starts the client dialing `xds:///{resource_name}` through the server at `xds_server`,
    /// sending `rate` requests per second, and waits for its control API.
    pub async fn start(resource_name: &str, xds_server: SocketAddr, rate: u32) -> Result<Self> {
        assert_private_network();
        let executable = peers_dir()?.join("xds-client-go");
        let dir = std::env::temp_dir();
        let tag = format!("{resource_name}-{}", xds_server.port());
        let bootstrap = dir.join(format!("xds-bootstrap-{tag}.json"));
        std::fs::write(
            &bootstrap,
            serde_json::to_vec_pretty(&serde_json::json!({
                "xds_servers": [{
                    "server_uri": xds_server.to_string(),
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3", "ignore_resource_deletion"],
                }],
                "node": {"id": format!("kubegrpc-test-{tag}"), "locality": {"zone": "zone-a"}},
            }))?,
        )?;
        let log = dir.join(format!("xds-client-{tag}.log"));
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(&executable);
        command
            .arg("--target")
            .arg(format!("xds:///{resource_name}"))
            .arg("--bootstrap")
            .arg(&bootstrap)
            .arg("--rate")
            .arg(rate.to_string())
            .arg("--control")
            .arg("10.250.0.1:0");
        let process = ManagedProcess::start(format!("grpc-go xDS client of {resource_name}"), command, &log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(address) = text
                .lines()
                .find_map(|l| l.strip_prefix("control listening on "))
                .and_then(|a| a.trim().parse().ok())
            {
                return Ok(Self {
                    control: address,
                    _process: process,
                });
            }
            if let Some(status) = process.try_exit_status() {
                bail!("the xDS client exited ({status}): {}", process.log_tail(20));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the xDS client's control API did not start: {}", process.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The counts since the last reset.
    pub async fn counts(&self) -> Result<XdsCounts> {
        serde_json::from_slice(&self.request("GET", "/counts").await?).context("the xDS client's /counts")
    }

    /// Starts a new counting window.
    pub async fn reset(&self) -> Result<()> {
        self.request("POST", "/reset").await.map(|_| ())
    }

    /// Waits until `more` requests succeeded in the current window.
    pub async fn wait_for(&self, more: u64, deadline: Duration) -> Result<XdsCounts> {
        crate::wait::until(&format!("{more} successful xDS client requests"), deadline, || async {
            let counts = self.counts().await?;
            Ok((counts.succeeded() >= more).then_some(counts))
        })
        .await
    }

    async fn request(&self, method: &str, path: &str) -> Result<Vec<u8>> {
        let mut stream = tokio::net::TcpStream::connect(self.control).await?;
        stream
            // HTTP/1.0: the answer is not chunked and the connection closes after it.
            .write_all(format!("{method} {path} HTTP/1.0\r\nHost: control\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no HTTP header end")?;
        let head = String::from_utf8_lossy(&response[..split]);
        if head.split_whitespace().nth(1).is_none_or(|code| code != "200") {
            bail!("{method} {path}: {head}");
        }
        Ok(response[split + 4..].to_vec())
    }
}
