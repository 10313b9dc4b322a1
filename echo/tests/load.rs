//! The echo backend's simulated capacity and its ORCA load reports.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use kubegrpc_echo::{Backend, BackendOptions, EchoClient, EchoRequest, STOP_GRACE, SetHealthRequest, StatsRequest};
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
async fn requests_beyond_capacity_wait_for_a_slot_and_their_work_is_busy_time() {
    let work = Duration::from_millis(50);
    let backend = start(BackendOptions {
        capacity: Some(2),
        work,
        ..BackendOptions::default()
    })
    .await;
    let channel = connect(&backend).await;
    let started = Instant::now();
    futures::future::join_all((0..4).map(|_| echo(&channel))).await;
    // Two slots: the four requests worked in two rounds.
    assert!(started.elapsed() >= 2 * work, "4 requests took {:?}", started.elapsed());

    let totals = backend.load.totals();
    assert_eq!((totals.requests, totals.errors), (4, 0));
    // The busy time is the slots' holding time: the work, not the wait for a slot.
    assert!(
        totals.busy >= 4 * work && totals.busy < 4 * work + 4 * work / 2,
        "busy {:?}",
        totals.busy
    );
    assert_eq!(backend.counters.snapshot().requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_capacity_or_work_requests_are_counted_but_not_busy() {
    let backend = start(BackendOptions::default()).await;
    let channel = connect(&backend).await;
    echo(&channel).await;
    let totals = backend.load.totals();
    assert_eq!((totals.requests, totals.busy), (1, Duration::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orca_reports_a_saturated_backend_as_fully_utilized() {
    const CAPACITY: usize = 2;
    let work = Duration::from_millis(20);
    let backend = start(BackendOptions {
        capacity: Some(CAPACITY),
        work,
        orca: true,
        orca_min_report_interval: Duration::from_millis(100),
        ..BackendOptions::default()
    })
    .await;
    let channel = connect(&backend).await;
    // Busy time counts when the work ends, so a report may gain or lose up to one `work` per
    // slot at each end of its interval: a long interval keeps that small.
    let mut reports = orca_stream(&channel, Duration::from_millis(500)).await;
    next_report(&mut reports).await;

    // Twice as many clients as slots, each sending one request after another: a slot never idles.
    let saturate = futures::future::join_all((0..2 * CAPACITY).map(|_| {
        let channel = channel.clone();
        async move {
            loop {
                echo(&channel).await;
            }
        }
    }));
    let report = tokio::select! {
        _ = saturate => unreachable!(),
        report = async {
            // The first report may cover the time before the load started.
            next_report(&mut reports).await;
            next_report(&mut reports).await
        } => report,
    };
    assert!(
        (0.85..=1.15).contains(&report.application_utilization),
        "utilization {} for a saturated backend",
        report.application_utilization
    );
    // Each slot serves one request per `work`.
    let expected_rps = CAPACITY as f64 / work.as_secs_f64();
    assert!(
        (0.7 * expected_rps..=1.1 * expected_rps).contains(&report.rps_fractional),
        "{} requests per second, expected about {expected_rps}",
        report.rps_fractional
    );
    assert_eq!((report.eps, report.cpu_utilization), (0.0, 0.0));
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
    let started = Instant::now();
    backend.stop().await;
    assert!(
        started.elapsed() < STOP_GRACE / 2,
        "the stop waited {:?} for the ORCA stream",
        started.elapsed()
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
