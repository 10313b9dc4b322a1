//! Real tonic echo backends on 10.250.x.y: in-process ([`start_backend`]) or as processes of
//! their own ([`BackendProcess`]) when a test must stop, freeze or kill one.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kubegrpc_echo::{Backend, BackendOptions, EchoClient, SetHealthRequest, StatsReply, StatsRequest};
use tonic::transport::Channel;

use crate::{netns::assert_private_network, process::ManagedProcess};

/// The port every test backend listens on: an EndpointSlice gives one port to all its endpoints.
pub const BACKEND_PORT: u16 = 50051;

/// A fresh 10.250.x.y address (never 10.250.0.x, which the control plane uses), unique within
/// the test process so that concurrent tests never share a backend address.
pub fn next_backend_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let third = 1 + n / 250;
    assert!(third < 256, "out of test addresses");
    Ipv4Addr::new(10, 250, third as u8, (1 + n % 250) as u8)
}

/// Starts an in-process echo backend on a fresh address and [`BACKEND_PORT`].
pub async fn start_backend(options: BackendOptions) -> Result<Backend> {
    assert_private_network();
    let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
    Backend::start(address, options)
        .await
        .with_context(|| format!("cannot start a backend on {address}"))
}

/// Starts `count` in-process echo backends, each on a fresh address.
pub async fn start_backends(count: usize) -> Result<Vec<Backend>> {
    let mut backends = Vec::with_capacity(count);
    for _ in 0..count {
        backends.push(start_backend(BackendOptions::default()).await?);
    }
    Ok(backends)
}

/// The addresses of `backends`.
pub fn addresses_of(backends: &[Backend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.address).collect()
}

/// An echo backend in its own process (the `echo-server` binary).
pub struct BackendProcess {
    pub address: SocketAddr,
    pub process: ManagedProcess,
}

impl BackendProcess {
    /// Starts `echo-server --listen ADDRESS ARGS...` and waits until it listens.
    pub async fn start(address: SocketAddr, args: &[&str]) -> Result<Self> {
        assert_private_network();
        let log = std::env::temp_dir().join(format!("echo-server-{address}.log").replace(':', "_"));
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(built_binary("echo-server")?);
        command.arg("--listen").arg(address.to_string()).args(args);
        let process = ManagedProcess::start(format!("echo-server {address}"), command, &log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
            {
                return Ok(Self { address, process });
            }
            if let Some(status) = process.try_exit_status() {
                bail!("echo-server on {address} exited ({status}): {}", process.log_tail(10));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("echo-server on {address} did not start: {}", process.log_tail(10));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client of its Echo service (for Stats and SetHealth).
    pub async fn client(&self) -> Result<EchoClient<Channel>> {
        echo_client(self.address).await
    }

    pub async fn stats(&self) -> Result<StatsReply> {
        Ok(self.client().await?.stats(StatsRequest {}).await?.into_inner())
    }

    pub async fn set_serving(&self, service: &str, serving: bool) -> Result<()> {
        self.client()
            .await?
            .set_health(SetHealthRequest {
                service: service.into(),
                serving,
            })
            .await?;
        Ok(())
    }
}

/// A client of the Echo service at `address`.
pub async fn echo_client(address: SocketAddr) -> Result<EchoClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {address}"))?;
    Ok(EchoClient::new(channel))
}

/// A binary of this workspace, built next to the test executable (`make test` builds every
/// binary before it runs the tests).
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a binary (the demo) from target/<profile>/.
    let mut profile_dir = exe.parent().context("cannot find the target directory")?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().context("cannot find the target directory")?;
    }
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built: run `cargo build --workspace --bins` (make test does) before the tests",
            path.display()
        );
    }
    Ok(path)
}
