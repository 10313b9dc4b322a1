//! The echo backend's ORCA service over a real connection. (The simulated capacity, busy time and
//! report figures are asserted exactly on a paused clock in `echo/src/service.rs`.)

use std::{net::SocketAddr, time::Duration};

use kubegrpc_echo::{Backend, BackendOptions, EchoClient, EchoRequest, SetHealthRequest, StatsRequest};
use kubegrpc_orca::{OpenRcaServiceClient, OrcaLoadReport, OrcaLoadReportRequest};
use tonic::{Streaming, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How long a condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

async fn start(options: BackendOptions) -> Backend {
    Backend::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .unwrap()
}

async fn connect(backend: &Backend) -> Channel {
    Channel::from_shared(format!("http://{}", backend.address))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn echo(channel: &Channel) {
    EchoClient::new(channel.clone())
        .echo(EchoRequest {
            message: "hi".into(),
            delay_ms: 0,
        })
        .await
        .unwrap();
}

async fn orca_stream(channel: &Channel, interval: Duration) -> Streaming<OrcaLoadReport> {
    OpenRcaServiceClient::new(channel.clone())
        .stream_core_metrics(OrcaLoadReportRequest {
            report_interval: Some(interval.into()),
            request_cost_names: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next_report(reports: &mut Streaming<OrcaLoadReport>) -> OrcaLoadReport {
    tokio::time::timeout(DEADLINE, reports.message())
        .await
        .expect("a report within the deadline")
        .unwrap()
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_health_and_orca_calls_are_not_load() {
    let backend = start(BackendOptions {
        orca: true,
        ..BackendOptions::default()
    })
    .await;
    let channel = connect(&backend).await;
    let mut reports = orca_stream(&channel, Duration::from_secs(1)).await;
    next_report(&mut reports).await;
    let mut client = EchoClient::new(channel.clone());
    client.stats(StatsRequest {}).await.unwrap();
    client
        .set_health(SetHealthRequest {
            service: String::new(),
            serving: true,
        })
        .await
        .unwrap();
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(backend.load.totals().requests, 0);
    echo(&channel).await;
    assert_eq!(backend.load.totals().requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_orca_the_service_is_not_served() {
    let backend = start(BackendOptions::default()).await;
    let status = OpenRcaServiceClient::new(connect(&backend).await)
        .stream_core_metrics(OrcaLoadReportRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_open_orca_streams() {
    let backend = start(BackendOptions {
        orca: true,
        ..BackendOptions::default()
    })
    .await;
    let channel = connect(&backend).await;
    let mut reports = orca_stream(&channel, Duration::from_secs(1)).await;
    next_report(&mut reports).await;
    // The open stream does not hold the stop until the grace runs out and the server is
    // aborted: ending the streams is part of stopping.
    assert!(
        backend.stop().await,
        "the stop waited out its grace for the ORCA stream"
    );
    let end = tokio::time::timeout(DEADLINE, reports.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "the stream ended cleanly: {end:?}");
}

#[tokio::test]
async fn a_capacity_of_zero_is_refused() {
    let error = Backend::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        BackendOptions {
            capacity: Some(0),
            ..BackendOptions::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}
