//! A running backend: binds, serves the health, `Echo` and (optionally) ORCA services, and
//! stops gracefully or dies at once.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use kubegrpc_orca::{LoadRecorder, OrcaService};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tonic_health::pb::health_server::HealthServer;

use crate::{
    Counters, EchoServer, HealthState, ServingStatus,
    connections::{CountingIncoming, KillSwitch},
    health::HealthService,
    service::EchoService,
};

/// How to run a backend.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// Health service names served besides "" (the whole server).
    pub health_services: Vec<String>,
    /// Serve `Watch` (true) or answer it UNIMPLEMENTED (false).
    pub watch_implemented: bool,
    /// The initial status of every health service.
    pub initially_serving: bool,
    /// Serve TLS with this certificate and key (PEM) instead of plaintext.
    pub tls: Option<(String, String)>,
    /// How many `Echo` requests can work at once (worker slots; more wait for a slot). `None`:
    /// no limit.
    pub capacity: Option<usize>,
    /// How long each `Echo` request works, holding its slot (zero: no work).
    pub work: Duration,
    /// Serve ORCA's out-of-band load reports (`xds.service.orca.v3.OpenRcaService`) from
    /// [`Backend::load`], with capacity `capacity` (1 without one).
    pub orca: bool,
    /// The ORCA streams' minimum reporting interval.
    pub orca_min_report_interval: Duration,
    /// Fail every `Echo` call with this code after its work (counted in `requests` all the
    /// same), for tests of what clients do with failing backends; health is unaffected.
    pub fail_with: Option<tonic::Code>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            health_services: Vec::new(),
            watch_implemented: true,
            initially_serving: true,
            tls: None,
            capacity: None,
            work: Duration::ZERO,
            orca: false,
            orca_min_report_interval: OrcaService::DEFAULT_MIN_INTERVAL,
            fail_with: None,
        }
    }
}

/// How long [`Backend::stop`] waits for requests in flight.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running echo backend: its address, health switch and counters.
pub struct Backend {
    pub address: SocketAddr,
    pub health: HealthState,
    pub counters: Arc<Counters>,
    /// The `Echo` requests' load (requests, and busy time when they work), which ORCA reports
    /// with [`BackendOptions::orca`].
    pub load: LoadRecorder,
    orca: OrcaService,
    stopping: watch::Sender<bool>,
    kill_switch: Arc<KillSwitch>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Backend {
    /// Binds `address` (port 0 picks one) and serves until stopped or dropped.
    pub async fn start(address: SocketAddr, options: BackendOptions) -> std::io::Result<Self> {
        if options.capacity == Some(0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an echo backend's capacity must be at least 1 worker slot",
            ));
        }
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let initial = if options.initially_serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let services: Vec<&str> = options.health_services.iter().map(String::as_str).collect();
        let health = HealthState::new(&services, initial);
        let (stopping, stopping_signal) = watch::channel(false);
        let health_service = HealthService {
            state: health.clone(),
            counters: counters.clone(),
            watch_implemented: options.watch_implemented,
            stopping: stopping_signal.clone(),
        };
        let load = LoadRecorder::with_capacity(options.capacity.unwrap_or(1));
        let orca = OrcaService::new(load.clone()).min_report_interval(options.orca_min_report_interval);
        let echo_service = EchoService {
            address: address.to_string(),
            counters: counters.clone(),
            health: health.clone(),
            load: load.clone(),
            slots: options.capacity.map(|capacity| Arc::new(Semaphore::new(capacity))),
            work: options.work,
            fail_with: options.fail_with,
        };
        let kill_switch = Arc::new(KillSwitch::default());
        let incoming = CountingIncoming::new(listener, counters.clone(), kill_switch.clone());
        let mut shutdown_signal = stopping_signal;
        let mut server = tonic::transport::Server::builder();
        if let Some((cert, key)) = &options.tls {
            server = server
                .tls_config(
                    tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .map_err(std::io::Error::other)?;
        }
        let task = tokio::spawn(
            server
                .add_service(HealthServer::new(health_service))
                .add_service(EchoServer::new(echo_service))
                .add_optional_service(options.orca.then(|| orca.clone().into_server()))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown_signal.wait_for(|stopping| *stopping).await;
                }),
        );
        Ok(Self {
            address,
            health,
            counters,
            load,
            orca,
            stopping,
            kill_switch,
            task,
        })
    }

    /// Stops as a well-behaved server does: stops accepting, ends health Watch and ORCA
    /// streams, lets requests in flight finish (at most `STOP_GRACE`), then closes every
    /// connection.
    /// Ends the ORCA load-report streams open now (a client sees them end and gets no
    /// further reports on them): load reports stopping while the backend keeps serving.
    pub fn end_load_reports(&self) {
        self.orca.end_streams();
    }

    /// Stops gracefully: NOT_SERVING, open ORCA streams ended, requests in flight finished;
    /// whether everything ended within [`STOP_GRACE`] (false: the server was aborted).
    pub async fn stop(mut self) -> bool {
        self.stopping.send_replace(true);
        self.orca.end_streams();
        if tokio::time::timeout(STOP_GRACE, &mut self.task).await.is_err() {
            self.task.abort();
            return false;
        }
        true
    }

    /// Dies as a process killed with SIGKILL does: no NOT_SERVING, no GOAWAY, no grace. Every
    /// open connection is reset at once (requests in flight on it fail, health Watch streams
    /// break) and the port refuses new connections once this returns.
    ///
    /// (Aborting the server's task alone would not do: tonic serves each connection in a task
    /// of its own and shuts them down gracefully, with GOAWAY, when the server goes.)
    pub async fn kill(mut self) {
        self.kill_switch.kill();
        self.task.abort();
        // Once the task is gone, so is its listener: connecting is refused.
        let _ = (&mut self.task).await;
        // The connections' tasks were woken to fail their I/O; wait (briefly) until they closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.kill_switch.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
