//! Real grpc-go and grpc-java servers as test peers (tests/peers/): each speaks the same
//! `kubegrpc.echo.v1.Echo` service as our Rust backend and its library's own
//! `grpc.health.v1.Health`, so [`echo_client`] and the Stats/SetHealth helpers work unchanged.
//! Besides the Rust backend's counters they count `too_many_pings`: GOAWAY ENHANCE_YOUR_CALM
//! frames their keepalive enforcement sent.
//!
//! With [`PeerOptions::tls`] they serve TLS, or mutual TLS, with certificates of a
//! [`TestCa`](crate::tls::TestCa); they log the serial number of each client certificate they
//! accept ([`PeerServer::client_certificate_serials`]).
//!
//! `tests/peers/build.sh` builds them (`make test` does) and prints the directory that
//! `KUBEGRPC_PEERS_DIR` names.

use std::{fmt, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use kubegrpc_echo::{EchoClient, SetHealthRequest, StatsReply, StatsRequest};
use tonic::transport::Channel;

use crate::{
    backends::{BACKEND_PORT, echo_client, next_backend_ip},
    netns::assert_private_network,
    process::ManagedProcess,
    tls::{ClientTls, IssuedCert, TestCa, tls_channel},
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
    /// Serve TLS (or mutual TLS) instead of plaintext.
    pub tls: Option<PeerTls>,
}

/// TLS for a peer server: the certificate it serves and, for mutual TLS, the CA its clients'
/// certificates must be signed by.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub server_cert: IssuedCert,
    pub mutual: Option<MutualTls>,
}

/// Mutual TLS: client certificates are required and verified against `client_ca`.
#[derive(Clone, Debug)]
pub struct MutualTls {
    /// The CA certificate (PEM file).
    pub client_ca: PathBuf,
    /// The harness's own client certificate from that CA, for [`PeerServer::stats`] and
    /// [`PeerServer::set_serving`]; its serial shows in [`PeerServer::client_certificate_serials`]
    /// like any client's.
    pub harness_cert: IssuedCert,
}

impl PeerTls {
    /// TLS with `server_cert`, any client.
    pub fn server(server_cert: &IssuedCert) -> Self {
        Self {
            server_cert: server_cert.clone(),
            mutual: None,
        }
    }

    /// Mutual TLS: serves `server_cert` and requires client certificates signed by `client_ca`
    /// (which issues the harness its own, common name `kubegrpc-test-harness`).
    pub fn mutual(server_cert: &IssuedCert, client_ca: &TestCa) -> Result<Self> {
        Ok(Self {
            server_cert: server_cert.clone(),
            mutual: Some(MutualTls {
                client_ca: client_ca.cert_path().to_path_buf(),
                harness_cert: client_ca.client_cert("kubegrpc-test-harness")?,
            }),
        })
    }

    /// How the harness connects for Stats and SetHealth: whatever certificate the peer serves
    /// (expired, for another name...), with the harness's client certificate for mutual TLS.
    fn harness_client(&self, address: SocketAddr) -> ClientTls {
        let client = ClientTls::unverified(address);
        match &self.mutual {
            Some(mutual) => client.with_client_cert(&mutual.harness_cert),
            None => client,
        }
    }
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
        if let Some(tls) = &self.tls {
            args.push("--tls-cert".into());
            args.push(tls.server_cert.cert_path.display().to_string());
            args.push("--tls-key".into());
            args.push(tls.server_cert.key_path.display().to_string());
            if let Some(mutual) = &tls.mutual {
                args.push("--client-ca".into());
                args.push(mutual.client_ca.display().to_string());
            }
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
    tls: Option<PeerTls>,
}

/// What a peer logs for each client certificate it accepts, before the serial number.
const CLIENT_SERIAL_LOG: &str = "client certificate serial ";

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
                    tls: options.tls.clone(),
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
        let reply = self
            .control_client()
            .await?
            .stats(StatsRequest {})
            .await
            .with_context(|| format!("Stats of the {} peer {}", self.language, self.address))?;
        Ok(reply.into_inner())
    }

    /// Sets the health status of `service` ("" for the whole server).
    pub async fn set_serving(&self, service: &str, serving: bool) -> Result<()> {
        self.control_client()
            .await?
            .set_health(SetHealthRequest {
                service: service.into(),
                serving,
            })
            .await
            .with_context(|| format!("SetHealth on the {} peer {}", self.language, self.address))?;
        Ok(())
    }

    /// The serial numbers (lowercase hexadecimal, as [`IssuedCert::serial_hex`]) of the client
    /// certificates of the TLS connections it accepted, in order, one per connection: the
    /// harness's own Stats and SetHealth connections to a mutual-TLS peer included. Read from
    /// its log, where it writes each before it serves the connection.
    pub fn client_certificate_serials(&self) -> Result<Vec<String>> {
        let log = std::fs::read_to_string(self.process.log_path())
            .with_context(|| format!("cannot read the log of the {} peer {}", self.language, self.address))?;
        Ok(log
            .lines()
            .filter_map(|line| line.split_once(CLIENT_SERIAL_LOG))
            .filter_map(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// An Echo client on a new connection, with TLS when the peer serves it.
    async fn control_client(&self) -> Result<EchoClient<Channel>> {
        match &self.tls {
            None => echo_client(self.address).await,
            Some(tls) => {
                let channel = tls_channel(self.address, &tls.harness_client(self.address))
                    .await
                    .with_context(|| {
                        format!("cannot connect to the {} peer {} over TLS", self.language, self.address)
                    })?;
                Ok(EchoClient::new(channel))
            }
        }
    }
}

impl fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServer")
            .field("language", &self.language)
            .field("address", &self.address)
            .field("process", &self.process)
            .field("tls", &self.tls)
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
