//! A real tonic server that reports its load over ORCA, read by the generated client: the
//! reports follow the requests the server handled, at the interval asked for and no faster
//! than the server's minimum, and a stream ends on the server when its client goes away.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use kubegrpc_orca::{
    LoadRecorder, OpenRcaServiceClient, OrcaLoadReport, OrcaLoadReportRequest, OrcaService, RecordLoadLayer,
    STREAM_CORE_METRICS_PATH,
};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Channel, server::TcpIncoming},
};
use tower::Layer;

/// The test service: works (sleeps) `sleep_ms`, then fails if asked to.
mod pb {
    include!(concat!(env!("OUT_DIR"), "/kubegrpc.orca.test.Work.rs"));
}

use pb::{work_client::WorkClient, work_server::WorkServer};

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkRequest {
    #[prost(uint64, tag = "1")]
    pub sleep_ms: u64,
    #[prost(bool, tag = "2")]
    pub fail: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkReply {}

struct Work;

#[tonic::async_trait]
impl pb::work_server::Work for Work {
    async fn work(&self, request: Request<WorkRequest>) -> Result<Response<WorkReply>, Status> {
        let request = request.into_inner();
        tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
        if request.fail {
            return Err(Status::internal("asked to fail"));
        }
        Ok(Response::new(WorkReply {}))
    }
}

/// How long a condition may take to come true before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    address: SocketAddr,
    recorder: LoadRecorder,
    orca: OrcaService,
}

/// Serves `Work` (recorded, busy time measured) and ORCA on 127.0.0.1.
async fn start_server(capacity: usize, min_interval: Duration) -> Server {
    let recorder = LoadRecorder::with_capacity(capacity);
    let orca = OrcaService::new(recorder.clone()).min_report_interval(min_interval);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(
            RecordLoadLayer::new(recorder.clone())
                .measure_busy(true)
                .layer(WorkServer::new(Work)),
        )
        .add_service(orca.clone().into_server());
    // As `Server::serve` would: without it, Nagle and delayed ACKs hold reports back 40 ms.
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))));
    Server {
        address,
        recorder,
        orca,
    }
}

/// The same server over an in-memory connection, for tests on a paused clock: no socket, so
/// the clock only moves when every task waits on a timer, and each report interval, work and
/// arrival time is exact whatever the machine's load.
async fn start_in_memory(capacity: usize, min_interval: Duration) -> (Server, Channel) {
    let recorder = LoadRecorder::with_capacity(capacity);
    let orca = OrcaService::new(recorder.clone()).min_report_interval(min_interval);
    let router = tonic::transport::Server::builder()
        .add_service(
            RecordLoadLayer::new(recorder.clone())
                .measure_busy(true)
                .layer(WorkServer::new(Work)),
        )
        .add_service(orca.clone().into_server());
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(router.serve_with_incoming(futures::stream::iter([Ok::<_, std::io::Error>(server_io)])));
    let mut client_io = Some(client_io);
    let channel = tonic::transport::Endpoint::from_static("http://in-memory")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = client_io.take().map(hyper_util::rt::TokioIo::new);
            async move { io.ok_or_else(|| std::io::Error::other("the in-memory connection is made once")) }
        }))
        .await
        .unwrap();
    let server = Server {
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        recorder,
        orca,
    };
    (server, channel)
}

async fn connect(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn open_stream(channel: Channel, interval: Duration) -> Streaming<OrcaLoadReport> {
    OpenRcaServiceClient::new(channel)
        .stream_core_metrics(OrcaLoadReportRequest {
            report_interval: Some(interval.into()),
            request_cost_names: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next report and when it arrived (tokio's clock: the paused one in paused tests).
async fn next_report(reports: &mut Streaming<OrcaLoadReport>) -> (OrcaLoadReport, tokio::time::Instant) {
    let report = tokio::time::timeout(DEADLINE, reports.message())
        .await
        .expect("a report within the deadline")
        .unwrap()
        .expect("the stream goes on");
    (report, tokio::time::Instant::now())
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_near(what: &str, actual: f64, expected: f64, tolerance: f64) {
    assert!(
        (actual - expected).abs() <= tolerance * expected.abs(),
        "{what}: {actual} is not within {}% of {expected}",
        tolerance * 100.0
    );
}

#[tokio::test(start_paused = true)]
async fn reports_give_the_rates_and_busy_fraction_of_the_requests_served() {
    const CAPACITY: usize = 2;
    const OK_PER_CLIENT: usize = 10;
    const FAILING: usize = 5;
    const WORK: Duration = Duration::from_millis(20);
    const INTERVAL: Duration = Duration::from_millis(200);
    let (server, channel) = start_in_memory(CAPACITY, Duration::from_millis(100)).await;
    let mut reports = open_stream(channel.clone(), INTERVAL).await;
    let (first, mut last_at) = next_report(&mut reports).await;
    assert_eq!((first.rps_fractional, first.eps), (0.0, 0.0), "nothing was served yet");

    // Two clients, one request at a time each, so that the load spans several reports.
    let client = |requests: Vec<bool>| {
        let mut work = WorkClient::new(channel.clone());
        async move {
            for fail in requests {
                let sleep_ms = if fail { 0 } else { WORK.as_millis() as u64 };
                let result = work.work(WorkRequest { sleep_ms, fail }).await;
                assert_eq!(
                    result.map_err(|status| status.code()).err(),
                    fail.then_some(tonic::Code::Internal)
                );
            }
        }
    };
    let done = AtomicBool::new(false);
    let sending = async {
        let mut second = vec![false; OK_PER_CLIENT];
        second.extend([true; FAILING]);
        futures::join!(client(vec![false; OK_PER_CLIENT]), client(second));
        done.store(true, Ordering::SeqCst);
    };
    // Reports are read as they come: on the paused clock, the time between two arrivals is
    // the server's interval.
    let reading = async {
        let mut windows = Vec::new();
        loop {
            let all_sent = done.load(Ordering::SeqCst);
            let (report, at) = next_report(&mut reports).await;
            windows.push((at.duration_since(last_at), report));
            last_at = at;
            if all_sent {
                // This report was made after the last request completed: it counted it.
                return windows;
            }
        }
    };
    let ((), windows) = futures::join!(sending, reading);
    assert!(windows.len() >= 2, "the load spans several reports: {windows:?}");

    // The server counted every request, and measured at least the work's time for each.
    let totals = server.recorder.totals();
    let ok = 2 * OK_PER_CLIENT;
    assert_eq!(
        (totals.requests, totals.errors),
        ((ok + FAILING) as u64, FAILING as u64)
    );
    assert!(totals.busy >= WORK * ok as u32, "busy {:?}", totals.busy);

    // The reports' rates times their intervals add up to what was served, wherever the
    // interval boundaries fell.
    let (mut requests, mut errors, mut busy) = (0.0, 0.0, 0.0);
    for (interval, report) in &windows {
        assert_eq!(*interval, INTERVAL, "each report after the interval asked for");
        assert_eq!(report.cpu_utilization, 0.0, "no CPU utilization was set");
        let seconds = interval.as_secs_f64();
        requests += report.rps_fractional * seconds;
        errors += report.eps * seconds;
        busy += report.application_utilization * seconds * CAPACITY as f64;
    }
    assert_near("requests from the reports", requests, (ok + FAILING) as f64, 1e-9);
    assert_near("errors from the reports", errors, FAILING as f64, 1e-9);
    assert_near("busy seconds from the reports", busy, totals.busy.as_secs_f64(), 1e-9);
}

#[tokio::test(start_paused = true)]
async fn reports_come_no_faster_than_the_servers_minimum() {
    let min_interval = Duration::from_millis(500);
    let (_server, channel) = start_in_memory(1, min_interval).await;
    let mut reports = open_stream(channel, Duration::from_millis(100)).await;
    let (_, mut last_at) = next_report(&mut reports).await;
    for _ in 0..2 {
        let (_, at) = next_report(&mut reports).await;
        assert_eq!(
            at.duration_since(last_at),
            min_interval,
            "100 ms asked, raised to the minimum"
        );
        last_at = at;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_utilizations_replace_the_measured_ones() {
    let server = start_server(1, Duration::from_millis(50)).await;
    server.recorder.set_application_utilization(Some(0.6));
    server.recorder.set_cpu_utilization(Some(0.4));
    server.recorder.set_named_metric("queue_depth", Some(7.0));
    let mut reports = open_stream(connect(server.address).await, Duration::from_millis(50)).await;
    let (report, _) = next_report(&mut reports).await;
    assert_eq!(report.application_utilization, 0.6);
    assert_eq!(report.cpu_utilization, 0.4);
    assert_eq!(report.named_metrics.get("queue_depth"), Some(&7.0));

    server.recorder.set_application_utilization(None);
    server.recorder.record_busy(Duration::from_secs(3600));
    let (report, _) = next_report(&mut reports).await;
    assert!(
        report.application_utilization > 1.0,
        "measured again: {}",
        report.application_utilization
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_on_the_server_when_its_client_goes_away() {
    let server = start_server(1, Duration::from_millis(50)).await;
    let channel = connect(server.address).await;
    let mut kept = open_stream(channel.clone(), Duration::from_millis(50)).await;
    let mut dropped = open_stream(channel.clone(), Duration::from_millis(50)).await;
    next_report(&mut kept).await;
    next_report(&mut dropped).await;
    assert_eq!(server.orca.open_streams(), 2);

    // The client cancels one stream and keeps its connection.
    drop(dropped);
    wait_until("the cancelled stream ends", || server.orca.open_streams() == 1).await;
    next_report(&mut kept).await;

    // The client goes away altogether.
    drop((kept, channel));
    wait_until("the last stream ends", || server.orca.open_streams() == 0).await;
}

/// The operator calls the method by [`STREAM_CORE_METRICS_PATH`] rather than through the
/// generated client: the path must be the one the generated server routes.
#[tokio::test]
async fn the_method_path_constant_is_the_generated_servers_route() {
    let server = start_server(1, Duration::from_millis(50)).await;
    let mut grpc = tonic::client::Grpc::new(connect(server.address).await);
    grpc.ready().await.unwrap();
    let mut reports = grpc
        .server_streaming(
            Request::new(OrcaLoadReportRequest::default()),
            http::uri::PathAndQuery::from_static(STREAM_CORE_METRICS_PATH),
            tonic_prost::ProstCodec::<OrcaLoadReportRequest, OrcaLoadReport>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    next_report(&mut reports).await;
}
