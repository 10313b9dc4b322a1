//! The long scale suite: 10,000 endpoints in one GrpcBackend, then 500 GrpcBackends of 20
//! endpoints (10,000 probers), each against the operator binary in its own process. Prints,
//! per shape: time to the first complete status, RSS (and per endpoint), idle CPU, writes while
//! idle, writes after each restart, and the largest object. Fails when the operator's peak
//! memory passes the `deploy/` limit or when anything is written while nothing changed.
//!
//!   make scale        (release build, inside the private network namespace)
//!
//! Options (environment): SCALE_SHAPES ("1x10000,500x20"; a `tls` suffix serves the shape over
//! TLS, e.g. "1x5000tls"), SCALE_IDLE_SECONDS (60),
//! SCALE_RESTARTS (5), SCALE_OPERATOR (the operator binary; default: beside this one).

use std::time::Duration;

use anyhow::{Result, ensure};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::built_binary,
    scale::{ScaleOptions, Shape, deploy_memory_limit_kib, run},
};

#[tokio::main]
async fn main() -> Result<()> {
    let shapes = std::env::var("SCALE_SHAPES").unwrap_or_else(|_| "1x10000,500x20".into());
    let idle = std::env::var("SCALE_IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let restarts = std::env::var("SCALE_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let operator = match std::env::var_os("SCALE_OPERATOR") {
        Some(path) => path.into(),
        None => built_binary("kubegrpc-operator")?,
    };
    let limit = deploy_memory_limit_kib()?;
    let control_plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let mut failures = Vec::new();
    for (index, shape) in shapes.split(',').enumerate() {
        let options = ScaleOptions {
            shape: Shape::parse(shape)?,
            operator: operator.clone(),
            idle: Duration::from_secs(idle),
            restarts,
            changes: 5,
            // Below the ephemeral range (32768-60999), which thousands of probe connections use.
            port: 31000 + index as u16,
        };
        let report = run(&control_plane, &options).await?;
        report.print();
        if report.peak_rss_kib > limit {
            failures.push(format!(
                "{shape}: peak RSS {} KiB over the deploy/ limit {limit} KiB",
                report.peak_rss_kib
            ));
        }
        if report.idle_writes > 0 || report.restart_writes.iter().any(|w| *w > 0) {
            failures.push(format!("{shape}: writes while nothing changed"));
        }
    }
    ensure!(failures.is_empty(), "{failures:#?}");
    Ok(())
}
