//! The grpc-go kuberesolver client peer (`kuberesolver-client-go`, tests/peers) in its own
//! process: it dials `kubernetes:///SERVICE.NAMESPACE:PORT` through
//! github.com/sercand/kuberesolver/v6, which watches the Service's EndpointSlices on the
//! apiserver itself and feeds grpc-go's `round_robin` (optionally with grpc-go's client-side
//! health checking), sends echo requests at a fixed rate and counts the answering backends, read
//! over the same small HTTP control API as the xDS client peers (plus `/first`).

use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use anyhow::Result;
use serde::Deserialize;

use crate::{
    ControlPlane,
    control_api::{self, start_client_peer},
    netns::assert_private_network,
    peers::peer_executable,
    process::ManagedProcess,
    xds::XdsCounts,
};

/// The executable in the peers directory.
const EXECUTABLE: &str = "kuberesolver-client-go";

/// How to start a kuberesolver client.
#[derive(Clone, Debug)]
pub struct KuberesolverOptions {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The Service port, by name or number.
    pub port: String,
    /// grpc-go's client-side health checking (service config `healthCheckConfig`, service
    /// name ""): each subchannel watches its backend's `grpc.health.v1` status.
    pub health_check: bool,
    /// Requests per second.
    pub rate: u32,
}

/// A failed call of a kuberesolver client.
#[derive(Clone, Debug, Deserialize)]
pub struct Failure {
    /// When it was sent, Unix time in nanoseconds.
    pub sent: i64,
    /// The gRPC code's name.
    pub code: String,
    pub message: String,
}

/// A running grpc-go client resolving through kuberesolver; stopped when dropped.
pub struct KuberesolverClient {
    control: SocketAddr,
    process: ManagedProcess,
}

impl KuberesolverClient {
    /// Starts a client of `options.service` that reaches `control_plane`'s apiserver with the
    /// admin's client certificate, and waits for its control API.
    pub async fn start(control_plane: &ControlPlane, options: KuberesolverOptions) -> Result<Self> {
        assert_private_network();
        let KuberesolverOptions {
            namespace,
            service,
            port,
            health_check,
            rate,
        } = options;
        let executable = peer_executable(EXECUTABLE)?;
        let dir = control_plane.dir();
        let kind = if health_check { "health" } else { "plain" };
        let log = std::env::temp_dir().join(format!("{EXECUTABLE}-{kind}-{namespace}-{service}.log"));
        let mut command = Command::new(&executable);
        command
            .arg("--target")
            .arg(format!("kubernetes:///{service}.{namespace}:{port}"))
            .arg("--apiserver")
            .arg(control_plane.server_url())
            .arg("--ca")
            .arg(dir.join("ca.crt"))
            .arg("--client-cert")
            .arg(dir.join("admin.crt"))
            .arg("--client-key")
            .arg(dir.join("admin.key"))
            .arg("--rate")
            .arg(rate.to_string())
            .arg("--control")
            .arg("10.250.0.1:0");
        if health_check {
            command.arg("--health-check");
        }
        let name = format!("kuberesolver client ({kind}) of {namespace}/{service}");
        let (process, control) = start_client_peer(&name, command, &log, Duration::from_secs(20)).await?;
        Ok(Self { control, process })
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

    /// Per backend, the Unix time in nanoseconds of its first successful reply since the last
    /// reset.
    pub async fn first(&self) -> Result<BTreeMap<String, i64>> {
        control_api::call(self.control, "GET", "/first").await
    }

    /// Every failed call since the start (the first 100000), with the Unix time (ns) it was
    /// sent at.
    pub async fn failures(&self) -> Result<Vec<Failure>> {
        control_api::call(self.control, "GET", "/failures").await
    }

    /// Starts a new counting window (clears `/last` and `/first`); returns the counts of the
    /// window it ends.
    pub async fn reset(&self) -> Result<XdsCounts> {
        control_api::call(self.control, "POST", "/reset").await
    }

    /// The end of the client's log (stderr and stdout).
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
