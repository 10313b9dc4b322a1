//! Real grpc-go and grpc-java servers as test peers (tests/peers/): each speaks the same
//! `kubegrpc.echo.v1.Echo` service as our Rust backend and its library's own
//! `grpc.health.v1.Health`, so [`echo_client`] and the Stats/SetHealth helpers work unchanged.
//! Besides the Rust backend's counters they count `too_many_pings`: GOAWAY ENHANCE_YOUR_CALM
//! frames their keepalive enforcement sent.
//!
//! `tests/peers/build.sh` builds them (`make test` does) and prints the directory that
//! `KUBEGRPC_PEERS_DIR` names.

use std::{fmt, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use kubegrpc_echo::{SetHealthRequest, StatsReply, StatsRequest};

use crate::{
    backends::{BACKEND_PORT, echo_client, next_backend_ip},
    netns::assert_private_network,
    process::ManagedProcess,
};

/// The environment variable naming the directory `tests/peers/build.sh` printed.
pub const PEERS_DIR_ENV: &str = "KUBEGRPC_PEERS_DIR";

/// The gRPC implementation a peer is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerLanguage {
    Go,
    Java,
}

impl PeerLanguage {
    /// The server executable in the peers directory.
    fn server_executable(self) -> &'static str {
        match self {
            Self::Go => "peer-server-go",
            Self::Java => "peer-server-java",
        }
    }

    /// How long a server may take to listen: a JVM starts slowly, more so beside others on two
    /// cores.
    fn startup_deadline(self) -> Duration {
        match self {
            Self::Go => Duration::from_secs(20),
            Self::Java => Duration::from_secs(60),
        }
    }
}

impl fmt::Display for PeerLanguage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Go => "grpc-go",
            Self::Java => "grpc-java",
        })
    }
}

/// How to run a peer server; the default is the library's defaults, SERVING.
#[derive(Clone, Debug, Default)]
pub struct PeerOptions {
    /// Keepalive enforcement that allows pings every millisecond, also without calls (instead of
    /// the library's default: at most every 5 minutes, none without calls).
    pub keepalive_permissive: bool,
    /// Close connections gracefully (GOAWAY) after this age (the library adds jitter).
    pub max_connection_age: Option<Duration>,
    /// After the age's GOAWAY, close connections forcefully after this grace.
    pub max_connection_age_grace: Option<Duration>,
    /// Start with the whole server ("") NOT_SERVING.
    pub not_serving: bool,
    /// grpc-go only: Echo worker slots; calls beyond them wait.
    pub capacity: Option<usize>,
    /// grpc-go only: how long each Echo call holds a slot.
    pub work: Option<Duration>,
    /// grpc-go only: serve ORCA out-of-band load reports with grpc-go's `orca` package, from
    /// the slots' busy time over their capacity, at grpc-go's default floor of one report per
    /// 30 s.
    pub orca: bool,
}

impl PeerOptions {
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.keepalive_permissive {
            args.extend(["--keepalive-enforcement".into(), "permissive".into()]);
        }
        if let Some(age) = self.max_connection_age {
            args.extend(["--max-connection-age".into(), duration_arg(age)]);
        }
        if let Some(grace) = self.max_connection_age_grace {
            args.extend(["--max-connection-age-grace".into(), duration_arg(grace)]);
        }
        if self.not_serving {
            args.push("--not-serving".into());
        }
        if let Some(capacity) = self.capacity {
            args.extend(["--capacity".into(), capacity.to_string()]);
        }
        if let Some(work) = self.work {
            args.extend(["--work".into(), duration_arg(work)]);
        }
        if self.orca {
            args.push("--orca".into());
        }
        args
    }
}

/// A duration as both peers parse it (Go's syntax), exact to the millisecond.
fn duration_arg(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// A grpc-go or grpc-java peer server in its own process.
pub struct PeerServer {
    pub language: PeerLanguage,
    pub address: SocketAddr,
    pub process: ManagedProcess,
}

impl PeerServer {
    /// Starts one peer server process on `address`, waits (deadline 60 s for Java) until its log
    /// says `listening on`; error with the log tail otherwise.
    pub async fn start(language: PeerLanguage, address: SocketAddr, options: &PeerOptions) -> Result<Self> {
        assert_private_network();
        if language == PeerLanguage::Java && (options.capacity.is_some() || options.work.is_some() || options.orca) {
            bail!("capacity, work and ORCA reporting are grpc-go peer options only");
        }
        let executable = peer_executable(language.server_executable())?;
        let log = std::env::temp_dir().join(format!("peer-server-{language}-{address}.log").replace(':', "_"));
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(&executable);
        command.arg("--listen").arg(address.to_string()).args(options.args());
        let process = ManagedProcess::start(format!("{language} peer server {address}"), command, &log)?;
        let deadline = tokio::time::Instant::now() + language.startup_deadline();
        loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
            {
                return Ok(Self {
                    language,
                    address,
                    process,
                });
            }
            if let Some(status) = process.try_exit_status() {
                bail!(
                    "the {language} peer server on {address} exited ({status}): {}",
                    process.log_tail(20)
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the {language} peer server on {address} did not listen within {:?}: {}",
                    language.startup_deadline(),
                    process.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its counters, through a connection of its own (which the connection counters include).
    pub async fn stats(&self) -> Result<StatsReply> {
        let reply = echo_client(self.address)
            .await?
            .stats(StatsRequest {})
            .await
            .with_context(|| format!("Stats of the {} peer {}", self.language, self.address))?;
        Ok(reply.into_inner())
    }

    /// Sets the health status of `service` ("" for the whole server).
    pub async fn set_serving(&self, service: &str, serving: bool) -> Result<()> {
        echo_client(self.address)
            .await?
            .set_health(SetHealthRequest {
                service: service.into(),
                serving,
            })
            .await
            .with_context(|| format!("SetHealth on the {} peer {}", self.language, self.address))?;
        Ok(())
    }
}

impl fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServer")
            .field("language", &self.language)
            .field("address", &self.address)
            .field("process", &self.process)
            .finish()
    }
}

/// Starts `count` servers of `language` on fresh addresses
/// ([`next_backend_ip`], [`BACKEND_PORT`]), concurrently.
pub async fn start_peers(language: PeerLanguage, count: usize, options: &PeerOptions) -> Result<Vec<PeerServer>> {
    assert_private_network();
    let starts = (0..count).map(|_| {
        let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
        PeerServer::start(language, address, options)
    });
    futures::future::try_join_all(starts).await
}

/// Built peer `name` (e.g. `xds-client-go`) in the peers directory; an error saying how to
/// build it when it is not there.
pub fn peer_executable(name: &str) -> Result<PathBuf> {
    let executable = peers_dir()?.join(name);
    if !executable.is_file() {
        bail!(
            "{} is missing: {PEERS_DIR_ENV} must name a directory printed by tests/peers/build.sh",
            executable.display()
        );
    }
    Ok(executable)
}

/// The directory of built peers, from `KUBEGRPC_PEERS_DIR`.
pub fn peers_dir() -> Result<PathBuf> {
    match std::env::var_os(PEERS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => bail!(
            "{PEERS_DIR_ENV} is not set: build the grpc-go and grpc-java peers with \
             `tests/peers/build.sh` and export {PEERS_DIR_ENV}=\"$(tests/peers/build.sh)\", \
             or run `make test`, which does both"
        ),
    }
}
