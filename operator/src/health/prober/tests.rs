use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use kubegrpc_crds::Health;
use tonic::Code;
use tonic_health::pb::HealthCheckResponse;

use super::{
    task::{Ended, WATCH_RETRY_POLLS, backoff, call_failure, connect_failure, goaway_end},
    *,
};
use crate::health::{
    connection::{CallEnd, HealthConnection},
    tracker::Failure,
};

#[test]
fn backoff_starts_small_grows_and_never_exceeds_the_interval() {
    let interval = Duration::from_secs(2);
    let delays: Vec<Duration> = backoff(interval).take(20).collect();
    assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(200));
    assert!(
        delays.iter().all(|d| *d <= interval),
        "jitter stays within the interval: {delays:?}"
    );
    assert!(delays[19] >= Duration::from_secs(1), "it grows: {delays:?}");
}

#[test]
fn call_and_connection_ends_have_specific_reasons() {
    let status = |code| CallEnd::Status(code, String::new());
    assert_eq!(
        call_failure(&status(Code::Unavailable)),
        Failure::CallFailed(Code::Unavailable)
    );
    assert_eq!(call_failure(&CallEnd::Reset(7)), Failure::Reset(7));
    assert_eq!(call_failure(&status(Code::Unimplemented)), Failure::Unimplemented);
    assert_eq!(
        call_failure(&status(Code::PermissionDenied)),
        Failure::CallFailed(Code::PermissionDenied)
    );
    assert_eq!(call_failure(&CallEnd::MessageTooLarge), Failure::MessageTooLarge);
    assert_eq!(call_failure(&CallEnd::Malformed("x")), Failure::ProtocolError);
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(connect_failure(&refused), Failure::ConnectRefused);
    let unreachable = std::io::Error::from(std::io::ErrorKind::HostUnreachable);
    assert_eq!(connect_failure(&unreachable), Failure::ConnectFailed);
    assert_eq!(goaway_end(0), Ended::Closed(Failure::GoAway(0)));
    assert_eq!(goaway_end(0xb), Ended::Failed(Failure::GoAway(0xb)));
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_failure() {
    // A port nothing listens on, on loopback: refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let error = HealthConnection::connect(address).await.err().expect("refused");
    assert_eq!(connect_failure(&error), Failure::ConnectRefused);
}

#[tokio::test]
async fn connections_come_from_the_source_address_of_the_targets_family() {
    // 127.0.0.2 is a loopback address distinct from the listener's 127.0.0.1.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let source: IpAddr = "127.0.0.2".parse().unwrap();
    let connect = |source| HealthConnection::connect_from(address, source);
    let _connection = connect(Some(source)).await.unwrap();
    let (_, peer) = listener.accept().await.unwrap();
    assert_eq!(peer.ip(), source);
    // Without a source address, the system's choice.
    let _connection = connect(None).await.unwrap();
    let (_, peer) = listener.accept().await.unwrap();
    assert_eq!(peer.ip(), address.ip());
    // A source of the other family is not used (a bind across families could only fail).
    let _connection = connect(Some("::1".parse().unwrap())).await.unwrap();
    let (_, peer) = listener.accept().await.unwrap();
    assert_eq!(peer.ip(), address.ip());
}

// === A scripted HTTP/2 server over in-memory streams, on paused time ===

/// What a scripted server does on each connection once it has answered the first `Watch`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Script {
    /// Answers every call SERVING and keeps the connection.
    Healthy,
    /// Accepts connections and never answers.
    Silent,
    /// GOAWAY NO_ERROR right after the answer.
    GoAwayAfterAnswer,
    /// GOAWAY ENHANCE_YOUR_CALM "too_many_pings" right after the answer (grpc-go's keepalive
    /// enforcement).
    CalmDownAfterAnswer,
    /// RST_STREAM INTERNAL_ERROR on the Watch right after the answer.
    ResetAfterAnswer,
    /// Closes the connection right after the answer.
    CloseAfterAnswer,
    /// Reads on, answers nothing more.
    SilentAfterAnswer,
    /// A frame header announcing 16 MiB.
    HugeFrameAfterAnswer,
    /// A message prefix announcing 4 GiB.
    HugeMessageAfterAnswer,
    /// An HTTP/1 response.
    Http1AfterAnswer,
    /// Answers every liveness `Check` with this gRPC status.
    CheckFails(Code),
    /// GOAWAY NO_ERROR once the connection is this old (MaxConnectionAge).
    RotateAfter(Duration),
    /// Healthy, with SETTINGS_MAX_CONCURRENT_STREAMS of this many: a call beyond it is refused
    /// (RST_STREAM REFUSED_STREAM). Serves the ORCA stream (it stays open).
    MaxStreams(u32),
    /// Healthy, with SETTINGS_INITIAL_WINDOW_SIZE 0: each call's window is opened by 3 bytes
    /// once its HEADERS arrive, then by 1,000; the connection's by what each DATA took.
    WindowZero,
    /// Healthy, and PINGs the client this often; a PING not acknowledged by the next one
    /// closes the connection (a server's keepalive timeout).
    Pings(Duration),
}

/// What every connection of a scripted server saw.
#[derive(Default)]
struct ServerCounts {
    connections: AtomicUsize,
    /// When each connection was accepted.
    opened_at: Mutex<Vec<Instant>>,
    checks: AtomicUsize,
    /// `Watch` calls, and those answered SERVING.
    watches: AtomicUsize,
    watches_served: AtomicUsize,
    /// When set, `Watch` is answered UNIMPLEMENTED.
    watch_unimplemented: AtomicBool,
    /// Load-report streams opened.
    load_streams: AtomicUsize,
    /// Calls refused for being beyond SETTINGS_MAX_CONCURRENT_STREAMS.
    refused: AtomicUsize,
    /// DATA frames received beyond a flow-control window.
    overruns: AtomicUsize,
    /// DATA frames received (requests, in parts when windows are small).
    data_frames: AtomicUsize,
    pings: AtomicUsize,
    ping_acks: AtomicUsize,
    /// Connections closed for a PING not acknowledged in time.
    keepalive_closes: AtomicUsize,
}

const SERVING: i32 = 1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    bytes.extend_from_slice(&[kind, flags]);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK field without indexing, with a literal name (short strings only).
fn field(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.push(0);
    block.push(name.len() as u8);
    block.extend_from_slice(name);
    block.push(value.len() as u8);
    block.extend_from_slice(value);
}

/// Response HEADERS (:status 200) and one health message on `stream`.
fn answer_frames(stream: u32, status: i32) -> Vec<u8> {
    let mut bytes = frame(0x1, 0x4, stream, &[0x88]);
    let message = HealthCheckResponse { status }.encode_to_vec();
    let mut data = vec![0, 0, 0, 0, message.len() as u8];
    data.extend_from_slice(&message);
    bytes.extend(frame(0x0, 0, stream, &data));
    bytes
}

/// Trailers (END_STREAM) with `code`, after headers when `headers` (else trailers-only).
fn trailers(stream: u32, code: Code, headers: bool) -> Vec<u8> {
    let mut block = if headers { Vec::new() } else { vec![0x88] };
    field(&mut block, b"grpc-status", (code as i32).to_string().as_bytes());
    frame(0x1, 0x5, stream, &block)
}

/// The calls a scripted server tells apart.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Watch,
    Check,
    LoadReports,
    Other,
}

/// A call open at a scripted server: what it is, its flow-control window for what the client
/// sends.
struct OpenCall {
    call: Call,
    window: i64,
}

/// Serves one connection by `script`: answers each call once its request is whole (its DATA
/// with END_STREAM), counts what the client does at this end.
async fn serve(mut io: DuplexStream, script: Script, counts: Arc<ServerCounts>) {
    counts.connections.fetch_add(1, Ordering::SeqCst);
    let opened = Instant::now();
    counts.opened_at.lock().unwrap().push(opened);
    let mut preface = [0u8; 24];
    if io.read_exact(&mut preface).await.is_err() {
        return;
    }
    let (max_streams, initial_window) = match script {
        Script::MaxStreams(n) => (n as usize, 65_535),
        Script::WindowZero => (usize::MAX, 0),
        _ => (usize::MAX, 65_535),
    };
    if script != Script::Silent {
        let settings = match script {
            Script::MaxStreams(n) => [&[0, 3][..], &n.to_be_bytes()].concat(),
            Script::WindowZero => vec![0, 4, 0, 0, 0, 0],
            _ => Vec::new(),
        };
        if io.write_all(&frame(0x4, 0, 0, &settings)).await.is_err() {
            return;
        }
    }
    let mut connection_window: i64 = 65_535;
    let mut calls: std::collections::HashMap<u32, OpenCall> = std::collections::HashMap::new();
    let mut buffer = Vec::new();
    let mut rotate = match script {
        Script::RotateAfter(age) => Some(Box::pin(tokio::time::sleep_until(opened + age))),
        _ => None,
    };
    let mut pings = match script {
        Script::Pings(every) => Some(tokio::time::interval_at(opened + every, every)),
        _ => None,
    };
    let mut ping_unacknowledged = false;
    // Our SETTINGS apply once acknowledged (RFC 9113 6.5.3): streams opened before get the
    // default window.
    let mut settings_acknowledged = false;
    // WINDOW_UPDATEs sent in answer to this read's frames: what the client read them can only
    // send in a later read, so they count from then on.
    let mut credits: Vec<(u32, i64)> = Vec::new();
    let mut answered = false;
    loop {
        // Whole frames first.
        while buffer.len() >= 9 {
            let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
            if buffer.len() < 9 + length {
                break;
            }
            let frame_bytes: Vec<u8> = buffer.drain(..9 + length).collect();
            let (kind, flags, stream) = (
                frame_bytes[3],
                frame_bytes[4],
                u32::from_be_bytes(frame_bytes[5..9].try_into().unwrap()),
            );
            let payload = &frame_bytes[9..];
            let mut reply = Vec::new();
            match kind {
                0x1 if script != Script::Silent => {
                    let contains = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
                    let call = if contains(b"/Watch") {
                        Call::Watch
                    } else if contains(b"/Check") {
                        Call::Check
                    } else if contains(b"StreamCoreMetrics") {
                        Call::LoadReports
                    } else {
                        Call::Other
                    };
                    if calls.len() >= max_streams {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        reply.extend(frame(0x3, 0, stream, &7u32.to_be_bytes()));
                    } else {
                        let window = if settings_acknowledged { initial_window } else { 65_535 };
                        if script == Script::WindowZero {
                            for increment in [3u32, 1_000] {
                                reply.extend(frame(0x8, 0, stream, &increment.to_be_bytes()));
                                credits.push((stream, i64::from(increment)));
                            }
                        }
                        calls.insert(stream, OpenCall { call, window });
                    }
                }
                0x0 => {
                    counts.data_frames.fetch_add(1, Ordering::SeqCst);
                    let length = payload.len() as i64;
                    connection_window -= length;
                    let Some(open) = calls.get_mut(&stream) else {
                        continue;
                    };
                    open.window -= length;
                    if open.window < 0 || connection_window < 0 {
                        counts.overruns.fetch_add(1, Ordering::SeqCst);
                    }
                    if script == Script::WindowZero && length > 0 {
                        reply.extend(frame(0x8, 0, 0, &(length as u32).to_be_bytes()));
                        connection_window += length;
                    }
                    if flags & 0x1 != 0 {
                        let call = open.call;
                        let (answer, ends) = respond(script, call, stream, &mut answered, &counts);
                        reply.extend(answer);
                        if ends {
                            calls.remove(&stream);
                        }
                    }
                }
                0x3 => {
                    calls.remove(&stream);
                }
                0x4 if flags & 0x1 != 0 && !settings_acknowledged => {
                    settings_acknowledged = true;
                    for open in calls.values_mut() {
                        open.window += initial_window - 65_535;
                    }
                }
                0x6 if flags & 0x1 != 0 => {
                    counts.ping_acks.fetch_add(1, Ordering::SeqCst);
                    ping_unacknowledged = false;
                }
                _ => {}
            }
            if io.write_all(&reply).await.is_err() {
                return;
            }
            if answered && script == Script::CloseAfterAnswer {
                return;
            }
        }
        for (stream, increment) in credits.drain(..) {
            if let Some(open) = calls.get_mut(&stream) {
                open.window += increment;
            }
        }
        let mut chunk = [0u8; 4096];
        tokio::select! {
            read = io.read(&mut chunk) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            },
            () = async { rotate.as_mut().unwrap().await }, if rotate.is_some() => {
                let _ = io.write_all(&frame(0x7, 0, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])).await;
                // The grace period: calls may finish, then the server closes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            _ = async { pings.as_mut().unwrap().tick().await }, if pings.is_some() => {
                if std::mem::replace(&mut ping_unacknowledged, true) {
                    counts.keepalive_closes.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                counts.pings.fetch_add(1, Ordering::SeqCst);
                if io.write_all(&frame(0x6, 0, 0, b"keepaliv")).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A scripted server's answer to a whole request of `call` on `stream`; whether it ends the
/// call.
fn respond(script: Script, call: Call, stream: u32, answered: &mut bool, counts: &ServerCounts) -> (Vec<u8>, bool) {
    if script == Script::Silent {
        return (Vec::new(), false);
    }
    match call {
        Call::Watch => {
            counts.watches.fetch_add(1, Ordering::SeqCst);
            if counts.watch_unimplemented.load(Ordering::SeqCst) {
                return (trailers(stream, Code::Unimplemented, false), true);
            }
            counts.watches_served.fetch_add(1, Ordering::SeqCst);
            let mut reply = answer_frames(stream, SERVING);
            if !std::mem::replace(answered, true) {
                match script {
                    Script::GoAwayAfterAnswer => {
                        reply.extend(frame(0x7, 0, 0, &[0, 0, 0, stream as u8, 0, 0, 0, 0]));
                    }
                    Script::CalmDownAfterAnswer => {
                        let mut goaway = vec![0, 0, 0, stream as u8, 0, 0, 0, 0xb];
                        goaway.extend_from_slice(b"too_many_pings");
                        reply.extend(frame(0x7, 0, 0, &goaway));
                    }
                    Script::ResetAfterAnswer => reply.extend(frame(0x3, 0, stream, &2u32.to_be_bytes())),
                    Script::HugeFrameAfterAnswer => reply.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]),
                    Script::HugeMessageAfterAnswer => {
                        reply.extend(frame(0x0, 0, stream, &[0, 0xff, 0xff, 0xff, 0xff]));
                    }
                    Script::Http1AfterAnswer => reply.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
                    _ => {}
                }
            }
            (reply, false)
        }
        Call::Check => {
            counts.checks.fetch_add(1, Ordering::SeqCst);
            *answered = true;
            match script {
                Script::CheckFails(code) => (trailers(stream, code, false), true),
                Script::SilentAfterAnswer => (Vec::new(), false),
                _ => {
                    let mut reply = answer_frames(stream, SERVING);
                    reply.extend(trailers(stream, Code::Ok, true));
                    (reply, true)
                }
            }
        }
        Call::LoadReports if matches!(script, Script::MaxStreams(_)) => {
            counts.load_streams.fetch_add(1, Ordering::SeqCst);
            (frame(0x1, 0x4, stream, &[0x88]), false)
        }
        Call::LoadReports | Call::Other => (trailers(stream, Code::Unimplemented, false), true),
    }
}

/// What a prober reported.
#[derive(Default)]
struct Reports {
    /// The GrpcBackend it names for the prober's span.
    backend: Option<String>,
    outcomes: Mutex<Vec<ProbeOutcome>>,
    changes: AtomicUsize,
    rotations: AtomicUsize,
    early_ends: AtomicUsize,
}

impl Reports {
    fn failures(&self) -> Vec<ProbeOutcome> {
        let outcomes = self.outcomes.lock().unwrap();
        outcomes
            .iter()
            .copied()
            .filter(|o| matches!(o, ProbeOutcome::Failed(_)))
            .collect()
    }
}

impl ProbeObserver for Reports {
    fn probed(&self, outcome: ProbeOutcome, _latency: Option<Duration>) {
        self.outcomes.lock().unwrap().push(outcome);
    }
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
    fn rotated(&self) {
        self.rotations.fetch_add(1, Ordering::SeqCst);
    }
    fn ended_early(&self) {
        self.early_ends.fetch_add(1, Ordering::SeqCst);
    }
    fn backend(&self) -> Option<&dyn std::fmt::Display> {
        self.backend.as_ref().map(|backend| backend as &dyn std::fmt::Display)
    }
}

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const TARGET: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 250, 0, 9)), 8080);

fn settings(mode: HealthCheckMode, unhealthy: u32) -> ProbeSettings {
    ProbeSettings {
        service: String::new(),
        mode,
        interval: INTERVAL,
        timeout: TIMEOUT,
        thresholds: Thresholds { healthy: 1, unhealthy },
        load_reports: None,
        tls: None,
    }
}

/// A shared state whose connector opens in-memory connections to a server playing `script`.
fn scripted(script: Script) -> (Shared, Arc<ServerCounts>) {
    let counts = Arc::new(ServerCounts::default());
    let server_counts = counts.clone();
    let connector = Connector::Memory(Arc::new(move |_| {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, script, server_counts.clone()));
        Ok(client)
    }));
    let shared = Shared {
        connects: connect_limiter(),
        retries: retry_limiter(),
        source_address: None,
        connector,
        write_interval: Duration::from_secs(1),
    };
    (shared, counts)
}

fn unknown() -> HealthVerdict {
    HealthVerdict {
        health: Health::Unknown,
        reason: None,
    }
}

/// Starts a prober against `script`; returns it once its first answer made it Serving.
async fn serving_prober(script: Script, settings: ProbeSettings) -> (ProberHandle, Arc<Reports>, Arc<ServerCounts>) {
    let (shared, counts) = scripted(script);
    let reports = Arc::new(Reports::default());
    let mut handle = spawn(TARGET, settings, unknown(), reports.clone(), shared);
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(60),
        handle.state.wait_for(|s| s.verdict.health == Health::Serving),
    )
    .await
    .expect("Serving within a minute")
    .unwrap();
    // No failure history: the first answer counts at once.
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "{script:?}: Serving after {:?}",
        started.elapsed()
    );
    (handle, reports, counts)
}

/// How long `handle` takes to be NotServing, at most `limit`; its reason.
async fn until_not_serving(handle: &mut ProberHandle, limit: Duration) -> (Duration, Option<String>) {
    let started = Instant::now();
    let state = tokio::time::timeout(limit, handle.state.wait_for(|s| s.verdict.health == Health::NotServing))
        .await
        .expect("NotServing in time")
        .unwrap()
        .clone();
    (started.elapsed(), state.verdict.reason)
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_breaks_every_connection_after_answering_is_not_serving_within_the_bound() {
    const N: u32 = 3;
    let bound = (INTERVAL + TIMEOUT) * N;
    let cases = [
        (Script::GoAwayAfterAnswer, "GoAway(NO_ERROR)"),
        // The GOAWAY's error code reaches the status (its debug data, the log).
        (Script::CalmDownAfterAnswer, "GoAway(ENHANCE_YOUR_CALM)"),
        (Script::ResetAfterAnswer, "Reset(INTERNAL_ERROR)"),
        (Script::CloseAfterAnswer, "Unstable"),
        (Script::SilentAfterAnswer, "Timeout"),
        (Script::HugeFrameAfterAnswer, "ProtocolError"),
        (Script::HugeMessageAfterAnswer, "MessageTooLarge"),
        (Script::Http1AfterAnswer, "ProtocolError"),
        (
            Script::CheckFails(Code::PermissionDenied),
            "CallFailed(PERMISSION_DENIED)",
        ),
        (Script::CheckFails(Code::Unimplemented), "Unimplemented"),
    ];
    for (script, reason) in cases {
        let (mut handle, reports, counts) = serving_prober(script, settings(HealthCheckMode::Watch, N)).await;
        let (took, published) = until_not_serving(&mut handle, bound * 2).await;
        println!(
            "{script:?}: NotServing after {took:?} ({reason}), {} connections",
            counts.connections.load(Ordering::SeqCst)
        );
        assert!(took <= bound, "{script:?}: {took:?} > {bound:?}");
        assert_eq!(published.as_deref(), Some(reason), "{script:?}");
        assert_eq!(reports.failures().len(), N as usize, "{script:?}: exactly N failures");
        assert_eq!(reports.rotations.load(Ordering::SeqCst), 0, "{script:?}");
        // And it stays NotServing: its SERVING answers never hold long enough to count.
        tokio::time::sleep(INTERVAL * 20).await;
        assert_eq!(handle.state().verdict.health, Health::NotServing, "{script:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_liveness_check_is_a_failure_in_check_mode_too() {
    let (mut handle, reports, _) =
        serving_prober(Script::CheckFails(Code::Ok), settings(HealthCheckMode::Watch, 2)).await;
    // A Check answered OK without a message breaks gRPC's framing.
    let (took, reason) = until_not_serving(&mut handle, INTERVAL * 10).await;
    assert_eq!(reason.as_deref(), Some("ProtocolError"));
    assert!(took <= (INTERVAL + TIMEOUT) * 2, "{took:?}");
    assert_eq!(reports.failures().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn routine_rotation_counts_nothing_and_reconnects_at_once() {
    // MaxConnectionAge 2s with a 1s interval: every connection served its interval.
    let (handle, reports, counts) =
        serving_prober(Script::RotateAfter(INTERVAL * 2), settings(HealthCheckMode::Watch, 1)).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(handle.state().verdict.health, Health::Serving);
    assert_eq!(reports.failures(), [], "no failure counted");
    assert_eq!(reports.early_ends.load(Ordering::SeqCst), 0);
    let rotations = reports.rotations.load(Ordering::SeqCst);
    // One connection per 2s (+ the 100ms grace), reconnected at once.
    assert!(rotations >= 13, "{rotations} rotations");
    assert_eq!(counts.connections.load(Ordering::SeqCst), rotations + 1);
    assert_eq!(
        reports.changes.load(Ordering::SeqCst),
        1,
        "one change: the first answer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_healthy_backend_keeps_one_connection_and_answers_its_liveness_checks() {
    let (handle, reports, counts) = serving_prober(Script::Healthy, settings(HealthCheckMode::Watch, 1)).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(handle.state().verdict.health, Health::Serving);
    assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
    let checks = counts.checks.load(Ordering::SeqCst);
    assert!(
        (29..=30).contains(&checks),
        "one liveness Check per quiet interval: {checks}"
    );
    assert_eq!(reports.failures(), []);
}

fn with_load_reports(mut settings: ProbeSettings) -> ProbeSettings {
    settings.load_reports = Some(LoadReportSettings {
        interval: INTERVAL,
        weight_expiration_period: Duration::from_secs(180),
    });
    settings
}

/// Asserts that a prober kept one connection to a healthy server for 30 quiet intervals and
/// made its liveness Check (or poll) each of them, without a failure.
async fn kept_one_connection_for_30_intervals(script: Script, settings: ProbeSettings) -> Arc<ServerCounts> {
    let (handle, reports, counts) = serving_prober(script, settings.clone()).await;
    tokio::time::sleep(INTERVAL * 30).await;
    let label = format!("{script:?} in {:?} mode", settings.mode);
    assert_eq!(handle.state().verdict.health, Health::Serving, "{label}");
    assert_eq!(reports.failures(), [], "{label}");
    assert_eq!(counts.connections.load(Ordering::SeqCst), 1, "{label}: one connection");
    let checks = counts.checks.load(Ordering::SeqCst);
    assert!((29..=31).contains(&checks), "{label}: a Check per interval: {checks}");
    counts
}

#[tokio::test(start_paused = true)]
async fn a_server_allowing_two_streams_gets_watch_and_its_liveness_check_and_no_load_reports() {
    // Watch, the load-report stream and the liveness Check would be three: the Check, which
    // proves the endpoint alive, wins over the load reports.
    let counts = kept_one_connection_for_30_intervals(
        Script::MaxStreams(2),
        with_load_reports(settings(HealthCheckMode::Watch, 1)),
    )
    .await;
    assert_eq!(counts.refused.load(Ordering::SeqCst), 0, "no call beyond the limit");
    assert_eq!(counts.watches_served.load(Ordering::SeqCst), 1);
    assert_eq!(counts.load_streams.load(Ordering::SeqCst), 0);
    // With room for all three, the load reports come too.
    let counts = kept_one_connection_for_30_intervals(
        Script::MaxStreams(3),
        with_load_reports(settings(HealthCheckMode::Watch, 1)),
    )
    .await;
    assert_eq!(counts.refused.load(Ordering::SeqCst), 0);
    assert_eq!(counts.load_streams.load(Ordering::SeqCst), 1);
    // Polling, two streams are the Check and the load reports.
    let counts = kept_one_connection_for_30_intervals(
        Script::MaxStreams(2),
        with_load_reports(settings(HealthCheckMode::Check, 1)),
    )
    .await;
    assert_eq!(counts.refused.load(Ordering::SeqCst), 0);
    assert_eq!(counts.load_streams.load(Ordering::SeqCst), 1);
    // One stream: the Watch gives way to polling with Check on the same connection.
    let counts = kept_one_connection_for_30_intervals(
        Script::MaxStreams(1),
        with_load_reports(settings(HealthCheckMode::Watch, 1)),
    )
    .await;
    assert_eq!(counts.refused.load(Ordering::SeqCst), 0);
    assert_eq!(counts.load_streams.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn requests_wait_for_a_server_that_opens_its_windows_after_advertising_zero() {
    for mode in [HealthCheckMode::Watch, HealthCheckMode::Check] {
        let counts = kept_one_connection_for_30_intervals(Script::WindowZero, settings(mode, 1)).await;
        assert_eq!(
            counts.overruns.load(Ordering::SeqCst),
            0,
            "{mode:?}: no DATA beyond a window"
        );
        // Each request went in two parts, the 3 bytes first opened then the rest, but the
        // first, sent before the server's SETTINGS arrived.
        let (data, calls) = (
            counts.data_frames.load(Ordering::SeqCst),
            counts.checks.load(Ordering::SeqCst) + counts.watches.load(Ordering::SeqCst),
        );
        assert_eq!(data, 2 * calls - 1, "{mode:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn in_check_mode_the_connection_is_driven_between_polls() {
    // A server PINGing every 300 ms, closing when a PING is not acknowledged by the next:
    // answered between polls 1 s apart, it keeps the connection.
    let counts = kept_one_connection_for_30_intervals(
        Script::Pings(Duration::from_millis(300)),
        settings(HealthCheckMode::Check, 1),
    )
    .await;
    assert_eq!(counts.keepalive_closes.load(Ordering::SeqCst), 0);
    let (pings, acks) = (
        counts.pings.load(Ordering::SeqCst),
        counts.ping_acks.load(Ordering::SeqCst),
    );
    assert!(pings >= 99, "{pings} PINGs in 30 s");
    assert_eq!(acks, pings, "every PING acknowledged when it came");

    // A GOAWAY between polls is seen when it comes: the next connection opens at once, not
    // at the next poll.
    let age = INTERVAL * 5 / 2;
    let (_handle, reports, counts) =
        serving_prober(Script::RotateAfter(age), settings(HealthCheckMode::Check, 1)).await;
    tokio::time::sleep(INTERVAL * 4).await;
    let opened = counts.opened_at.lock().unwrap().clone();
    assert!(opened.len() >= 2, "{opened:?}");
    let reconnected = opened[1] - opened[0];
    assert!(
        reconnected < age + Duration::from_millis(50),
        "reconnected {reconnected:?} after the first connection (GOAWAY at {age:?})"
    );
    assert_eq!(reports.failures(), [], "a rotation");
}

#[tokio::test(start_paused = true)]
async fn watch_is_tried_again_after_a_reconnect_and_after_a_number_of_polls() {
    // A backend without Watch, upgraded in place after 2 s; its connections live 5 s.
    let (shared, counts) = scripted(Script::RotateAfter(INTERVAL * 5));
    counts.watch_unimplemented.store(true, Ordering::SeqCst);
    let mut handle = spawn(
        TARGET,
        settings(HealthCheckMode::Watch, 1),
        unknown(),
        Arc::new(Reports::default()),
        shared,
    );
    handle
        .state
        .wait_for(|s| s.verdict.health == Health::Serving)
        .await
        .unwrap();
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(counts.watches_served.load(Ordering::SeqCst), 0);
    assert!(counts.checks.load(Ordering::SeqCst) >= 2, "polled meanwhile");
    counts.watch_unimplemented.store(false, Ordering::SeqCst);
    // The next connection (at 5 s) asks for Watch first, and gets it.
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(counts.connections.load(Ordering::SeqCst), 2);
    assert_eq!(counts.watches_served.load(Ordering::SeqCst), 1);
    drop(handle);

    // On one connection that lives on: Watch again after WATCH_RETRY_POLLS polls.
    let (shared, counts) = scripted(Script::Healthy);
    counts.watch_unimplemented.store(true, Ordering::SeqCst);
    let _handle = spawn(
        TARGET,
        settings(HealthCheckMode::Watch, 1),
        unknown(),
        Arc::new(Reports::default()),
        shared,
    );
    tokio::time::sleep(INTERVAL * 2).await;
    counts.watch_unimplemented.store(false, Ordering::SeqCst);
    tokio::time::sleep(INTERVAL * (WATCH_RETRY_POLLS - 4)).await;
    assert_eq!(
        counts.watches.load(Ordering::SeqCst),
        1,
        "not before {WATCH_RETRY_POLLS} polls"
    );
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(counts.watches.load(Ordering::SeqCst), 2);
    assert_eq!(counts.watches_served.load(Ordering::SeqCst), 1);
    assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
    // Then it follows the Watch: a liveness Check per quiet interval, as polling did.
    let checks = counts.checks.load(Ordering::SeqCst);
    tokio::time::sleep(INTERVAL * 10).await;
    let more = counts.checks.load(Ordering::SeqCst) - checks;
    assert!((9..=11).contains(&more), "{more}");
}

#[tokio::test(start_paused = true)]
async fn a_new_endpoints_first_probe_starts_within_a_timeout_beside_a_thousand_failing_endpoints() {
    let (silent, silent_counts) = scripted(Script::Silent);
    let reports = Arc::new(Reports::default());
    let address = |i: u16| SocketAddr::from(([10, 250, 1, 1], 1_000 + i));
    let _failing: Vec<ProberHandle> = (0..1_000)
        .map(|i| {
            spawn(
                address(i),
                settings(HealthCheckMode::Watch, 1),
                unknown(),
                reports.clone(),
                silent.clone(),
            )
        })
        .collect();
    // Every silent endpoint has failed (timed out) and retries, again and again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        reports.failures().len() >= 1_000,
        "{} failures",
        reports.failures().len()
    );
    assert!(silent_counts.connections.load(Ordering::SeqCst) > 1_000);

    // A new healthy endpoint, sharing the operator's turns with them.
    let (healthy, _) = scripted(Script::Healthy);
    let shared = Shared {
        connector: healthy.connector,
        ..silent.clone()
    };
    let started = Instant::now();
    let mut handle = spawn(
        TARGET,
        settings(HealthCheckMode::Watch, 1),
        unknown(),
        Arc::new(Reports::default()),
        shared,
    );
    tokio::time::timeout(TIMEOUT, handle.state.wait_for(|s| s.verdict.health == Health::Serving))
        .await
        .expect("Serving within one probe timeout")
        .unwrap();
    println!(
        "beside 1,000 silent endpoints, a new one was Serving after {:?}",
        started.elapsed()
    );
    // The silent ones kept retrying meanwhile, on their own turns.
    assert!(silent.retries.available_permits() < MAX_CONCURRENT_RETRIES);
}

/// What a log subscriber wrote.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tracing_subscriber::fmt::MakeWriter<'_> for Logs {
    type Writer = Logs;
    fn make_writer(&self) -> Logs {
        self.clone()
    }
}

/// Set for [`spans_in_a_process_of_their_own`] by the test that runs it.
const SPANS_CHILD: &str = "KUBEGRPC_PROBER_SPANS_CHILD";

/// Runs [`spans_in_a_process_of_their_own`] in a process of its own. Tracing caches whether a
/// log line is enabled per call site, process-wide, and with a single scoped subscriber it asks
/// the subscriber of the thread that reaches the line first (tracing-core's `has_just_one` fast
/// path): another test's prober logging first, on another thread, disables the line here.
#[test]
fn every_log_line_of_a_prober_is_in_a_span_naming_its_backend_and_endpoint() {
    let test = module_path!().split_once("::").unwrap().1.to_owned() + "::spans_in_a_process_of_their_own";
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([&test, "--exact", "--ignored", "--nocapture"])
        .env(SPANS_CHILD, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}

#[tokio::test(start_paused = true)]
#[ignore = "run in a process of its own by every_log_line_of_a_prober_is_in_a_span_naming_its_backend_and_endpoint"]
async fn spans_in_a_process_of_their_own() {
    if std::env::var_os(SPANS_CHILD).is_none() {
        // Run with other tests (--include-ignored): see the test that runs it.
        return;
    }
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // The test's runtime runs the prober's task on this thread.
    let _default = tracing::subscriber::set_default(subscriber);
    let (shared, _) = scripted(Script::Silent);
    let named = Arc::new(Reports {
        backend: Some("default/echo".into()),
        ..Reports::default()
    });
    let mut handle = spawn(
        TARGET,
        settings(HealthCheckMode::Watch, 1),
        unknown(),
        named,
        shared.clone(),
    );
    until_not_serving(&mut handle, INTERVAL * 10).await;
    let unnamed = SocketAddr::from(([10, 250, 0, 10], 8080));
    let mut handle = spawn(
        unnamed,
        settings(HealthCheckMode::Watch, 1),
        unknown(),
        Arc::new(Reports::default()),
        shared,
    );
    until_not_serving(&mut handle, INTERVAL * 10).await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines = |what: &str| -> Vec<&str> { logs.lines().filter(|line| line.contains(what)).collect() };
    let changed = lines("endpoint health changed");
    assert_eq!(changed.len(), 2, "{logs}");
    assert!(
        changed[0].contains("prober{backend=default/echo endpoint=10.250.0.9:8080}:"),
        "{}",
        changed[0]
    );
    assert!(changed[0].contains("health=NotServing"), "{}", changed[0]);
    // Named once, by the span, not again in the message.
    assert_eq!(changed[0].matches("endpoint=").count(), 1, "{}", changed[0]);
    // Without a backend from its observer, the span names the endpoint only.
    assert!(
        changed[1].contains("prober{endpoint=10.250.0.10:8080}:"),
        "{}",
        changed[1]
    );
    let failed = lines("probe failed");
    assert!(!failed.is_empty(), "{logs}");
    assert!(failed.iter().all(|line| line.contains(" prober{")), "{logs}");
}
