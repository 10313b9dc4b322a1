//! An echo backend in its own process: answers `Echo` with its own address, serves
//! `grpc.health.v1`, and can be switched NOT_SERVING with `Echo/SetHealth`.
//!
//!   echo-server --listen 10.250.1.1:50051 [--health-service NAME]... [--check-only] [--not-serving]
//!               [--capacity N] [--work 5ms] [--orca [--orca-min-interval 1s]]
//!
//! With --capacity and --work each Echo request holds one of N worker slots for the work's
//! time; with --orca the backend reports that load over ORCA (application utilization: busy
//! time over elapsed time x capacity).
//!
//! Prints `listening on ADDRESS` once it accepts connections. On SIGTERM it drains as a
//! well-behaved backend does: NOT_SERVING first, then `--drain` later it stops.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use kubegrpc_echo::ServingStatus;
use kubegrpc_echo::{Backend, BackendOptions};

#[derive(Parser)]
#[command(name = "echo-server", about = "kubegrpc's example echo backend")]
struct Options {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Health service names to serve besides "" (the whole server).
    #[arg(long = "health-service")]
    health_services: Vec<String>,
    /// Answer health Watch with UNIMPLEMENTED (a Check-only server).
    #[arg(long)]
    check_only: bool,
    /// Start NOT_SERVING.
    #[arg(long)]
    not_serving: bool,
    /// Serve TLS with this certificate (PEM file; with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The TLS certificate's private key (PEM file).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// How many Echo requests work at once (worker slots); by default, no limit.
    #[arg(long)]
    capacity: Option<usize>,
    /// How long each Echo request works, holding a slot (e.g. 5ms).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    work: Duration,
    /// Serve ORCA out-of-band load reports (xds.service.orca.v3.OpenRcaService).
    #[arg(long)]
    orca: bool,
    /// The ORCA streams' minimum reporting interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "orca")]
    orca_min_interval: Duration,
    /// How long to keep serving NOT_SERVING after SIGTERM before stopping.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    drain: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let millis = if let Some(ms) = text.strip_suffix("ms") {
        ms.parse::<u64>().map_err(|e| e.to_string())?
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse::<u64>().map_err(|e| e.to_string())? * 1000
    } else {
        return Err(format!("{text:?} is not a duration like 500ms or 2s"));
    };
    Ok(Duration::from_millis(millis))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let options = Options::parse();
    let backend = Backend::start(
        options.listen,
        BackendOptions {
            health_services: options.health_services,
            watch_implemented: !options.check_only,
            initially_serving: !options.not_serving,
            tls: match (&options.tls_cert, &options.tls_key) {
                (Some(cert), Some(key)) => Some((std::fs::read_to_string(cert)?, std::fs::read_to_string(key)?)),
                _ => None,
            },
            capacity: options.capacity,
            work: options.work,
            orca: options.orca,
            orca_min_report_interval: options.orca_min_interval,
            fail_with: None,
        },
    )
    .await?;
    println!("listening on {}", backend.address);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    backend.health.set_all(ServingStatus::NotServing);
    tokio::time::sleep(options.drain).await;
    let stats = backend.counters.snapshot();
    backend.stop().await;
    println!("stopped after {} requests", stats.requests);
    Ok(())
}
