//! The churn soak: a Deployment's Pods deleted one every few seconds under load for ten
//! minutes, against the operator binary in its own process; fails unless the operator's
//! probers, runtime tasks and file descriptors and the client's endpoints and connections
//! return to their baseline. Prints the operator's RSS at the baseline, its peak and after.
//!
//!   make soak         (release build, inside the private network namespace)
//!
//! Options (environment): SOAK_SECONDS (600), SOAK_CHURN_SECONDS (3), SOAK_REPLICAS (4),
//! SOAK_RATE (requests per second, 100).

use std::time::Duration;

use anyhow::{Result, ensure};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    soak::{SoakOptions, run},
};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = SoakOptions {
        duration: Duration::from_secs(env_number("SOAK_SECONDS", 600)),
        churn_every: Duration::from_secs(env_number("SOAK_CHURN_SECONDS", 3)),
        replicas: env_number("SOAK_REPLICAS", 4) as i32,
        rate: env_number("SOAK_RATE", 100) as u32,
    };
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await?;
    let report = run(&control_plane, &options).await?;
    report.print();
    ensure!(report.after == report.baseline, "not back at the baseline");
    Ok(())
}
