//! The short version of `make scale`, in the README's test command: the same scenario at sizes
//! this 2-core machine runs next to the other tests, against the debug operator binary (which
//! uses more memory than the release one, so the limit check is conservative).

use std::time::Duration;

use anyhow::Result;
use kubegrpc_tests::{
    ControlPlane,
    backends::built_binary,
    scale::{ScaleOptions, Shape, deploy_memory_limit_kib, run},
};

async fn check(shape: Shape, port: u16) -> Result<()> {
    let report = run(
        ControlPlane::shared(),
        &ScaleOptions {
            shape,
            operator: built_binary("kubegrpc-operator")?,
            idle: Duration::from_secs(10),
            restarts: 2,
            changes: 3,
            port,
        },
    )
    .await?;
    report.print();
    let limit = deploy_memory_limit_kib()?;
    assert!(
        report.peak_rss_kib < limit,
        "the operator's peak RSS ({} KiB) passes the deploy/ memory limit ({limit} KiB): it would be OOM-killed",
        report.peak_rss_kib
    );
    assert_eq!(report.idle_writes, 0, "status writes while nothing changed");
    assert_eq!(
        report.restart_writes,
        [0, 0],
        "status writes after restarts with nothing changed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_endpoints_in_one_grpc_backend_stay_bounded_and_quiet() -> Result<()> {
    check(
        Shape {
            backends: 1,
            endpoints_each: 2000,
            tls: false,
        },
        30910,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_grpc_backends_of_twenty_stay_bounded_and_quiet() -> Result<()> {
    check(
        Shape {
            backends: 100,
            endpoints_each: 20,
            tls: false,
        },
        30911,
    )
    .await
}

/// The same over TLS (`spec.tls` with a CA bundle): a handshake per endpoint, a TLS session per
/// connection, and still within the limit and quiet (a restart re-reads the bundle and
/// re-handshakes without a write).
#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_tls_endpoints_stay_bounded_and_quiet() -> Result<()> {
    check(
        Shape {
            backends: 1,
            endpoints_each: 500,
            tls: true,
        },
        30912,
    )
    .await
}
