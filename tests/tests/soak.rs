//! The churn soak's one-minute version (`make soak` runs it for ten): Pods of a Deployment
//! deleted one every 3 seconds under load; afterwards the operator's probers, runtime tasks and
//! file descriptors and the client's endpoints and connections are back at their baseline.

use std::time::Duration;

use anyhow::Result;
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    soak::{SoakOptions, run},
};

#[tokio::test(flavor = "multi_thread")]
async fn a_minute_of_pod_churn_under_load_leaves_nothing_behind() -> Result<()> {
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        controller_manager: true,
        ..Default::default()
    })
    .await?;
    let report = run(
        &control_plane,
        &SoakOptions {
            duration: Duration::from_secs(60),
            churn_every: Duration::from_secs(3),
            replicas: 4,
            rate: 100,
        },
    )
    .await?;
    report.print();
    assert_eq!(report.after, report.baseline);
    assert!(report.churned >= 15, "only {} pods churned", report.churned);
    Ok(())
}
