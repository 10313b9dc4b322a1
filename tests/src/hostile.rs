//! A hostile gRPC backend: a server that misbehaves on purpose, to show that one bad backend
//! cannot fool the operator's prober, take its memory or slow the others down.
//!
//! It speaks just enough HTTP/2 (RFC 9113) and gRPC by hand, over raw TCP, because the
//! misbehaviours are exactly what a real HTTP/2 library would refuse to produce: a frame header
//! announcing 16 MiB, an invalid header block, a 4 GiB message prefix, HTTP/1 or TLS bytes after
//! an answer, floods of control frames. What it sends when it behaves: SETTINGS, HEADERS
//! (`:status` indexed, the rest HPACK literals without indexing, written here), DATA with
//! gRPC's length-prefixed protobuf (a `grpc.health.v1.HealthCheckResponse` is field 1, a varint:
//! SERVING = 1, NOT_SERVING = 2; an ORCA `OrcaLoadReport` is encoded here too), trailers.
//!
//! One listener per instance on a 10.250.x.y address of the run's network namespace; counters
//! at the server (connections accepted and open, calls, frames and bytes written), so that
//! tests count at the far end.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use kubegrpc_operator::health::hpack;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    backends::{BACKEND_PORT, next_backend_ip},
    netns::assert_private_network,
};

/// How a [`HostileBackend`] behaves. Every behaviour but [`Behaviour::Healthy`] is hostile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    /// A well-behaved server written by hand: `Watch` and `Check` answer SERVING, the ORCA
    /// stream reports an honest load (100 requests per second at utilization 0.5). The baseline.
    Healthy,
    /// Accepts the connection and never sends a byte.
    Silent,
    /// Sends a valid answer one byte every [`TRICKLE_INTERVAL`].
    Slow,
    /// Answers `Watch` SERVING, then sends GOAWAY (NO_ERROR) and closes: on every connection.
    ServingThenGoAway,
    /// Answers SERVING, then a graceful shutdown's two GOAWAYs (the last stream id 2^31-1, then
    /// the real one) and closes: on every connection.
    GoAwayRepeated,
    /// Answers SERVING, then resets the `Watch` stream (RST_STREAM INTERNAL_ERROR).
    ServingThenReset,
    /// Answers SERVING once, then nothing ever (no `Check` answer, no SETTINGS ACK).
    ServingThenSilence,
    /// Answers SERVING, then the next message one byte every [`TRICKLE_INTERVAL`].
    ServingThenTrickle,
    /// Answers SERVING, then a header block HPACK cannot decode.
    ServingThenBadHpack,
    /// Answers SERVING, then a frame header announcing 16 MiB (its length bytes first, the rest
    /// a moment later, so that a reader sees the length before the header is complete).
    ServingThenHugeFrameHeader,
    /// Answers SERVING, then a gRPC message prefix announcing 4 GiB.
    ServingThenHugeMessagePrefix,
    /// Answers SERVING, then an HTTP/1.1 response, and closes.
    ServingThenHttp1,
    /// An HTTP/1.1 server: answers the preface with `400 Bad Request` and closes.
    Http1,
    /// A TLS server: answers the preface with a ServerHello-looking record and an alert.
    TlsBytes,
    /// Answers SERVING, then PINGs as fast as the connection takes them.
    PingFlood,
    /// Answers SERVING, then SETTINGS frames as fast as the connection takes them.
    SettingsFlood,
    /// Answers SERVING, then RST_STREAMs of streams the client never opened.
    RstStreamFlood,
    /// Answers SERVING, then GOAWAYs without ever closing.
    GoAwayFlood,
    /// `Watch` answers SERVING and NOT_SERVING alternately every [`FLAP_INTERVAL`].
    FlappingWatch,
    /// `Watch` answers SERVING once; every `Check` fails with PERMISSION_DENIED.
    CheckAlwaysFails,
    /// `Watch` answers with thousands of 5-byte messages (an empty `HealthCheckResponse`) packed
    /// into each DATA frame, as fast as flow control allows.
    TinyMessagesPacked,
    /// Healthy, but its ORCA reports lie: 10^12 requests per second at utilization 10^-9.
    OrcaLiar,
    /// Healthy, but its ORCA reports carry NaN, infinite and negative figures, then a message
    /// that is not an `OrcaLoadReport` at all.
    OrcaMalformed,
    /// Healthy, but its ORCA report is a valid message of 48 KiB (thousands of named metrics).
    OrcaHuge,
    /// Healthy and strict: SETTINGS_MAX_CONCURRENT_STREAMS 2; a call beyond it is refused
    /// (RST_STREAM REFUSED_STREAM, counted).
    MaxStreamsTwo,
    /// Healthy and strict: SETTINGS_INITIAL_WINDOW_SIZE 0 (from its acknowledgement on); each
    /// call's window is opened by WINDOW_UPDATEs of 3 then 1,000 bytes once its HEADERS
    /// arrive. DATA beyond a window is counted.
    WindowZeroThenUpdate,
    /// Healthy and strict: PINGs the client every [`KEEPALIVE_PING_INTERVAL`] and closes the
    /// connection when one stays unacknowledged for [`KEEPALIVE_TIMEOUT`] (a server's
    /// keepalive).
    KeepalivePings,
}

impl Behaviour {
    /// Every hostile behaviour, in a fixed order.
    pub const HOSTILE: [Behaviour; 23] = [
        Behaviour::Silent,
        Behaviour::Slow,
        Behaviour::ServingThenGoAway,
        Behaviour::GoAwayRepeated,
        Behaviour::ServingThenReset,
        Behaviour::ServingThenSilence,
        Behaviour::ServingThenTrickle,
        Behaviour::ServingThenBadHpack,
        Behaviour::ServingThenHugeFrameHeader,
        Behaviour::ServingThenHugeMessagePrefix,
        Behaviour::ServingThenHttp1,
        Behaviour::Http1,
        Behaviour::TlsBytes,
        Behaviour::PingFlood,
        Behaviour::SettingsFlood,
        Behaviour::RstStreamFlood,
        Behaviour::GoAwayFlood,
        Behaviour::FlappingWatch,
        Behaviour::CheckAlwaysFails,
        Behaviour::TinyMessagesPacked,
        Behaviour::OrcaLiar,
        Behaviour::OrcaMalformed,
        Behaviour::OrcaHuge,
    ];

    /// Well-behaved servers that hold the client to the protocol: a correct client keeps one
    /// connection to each.
    pub const STRICT: [Behaviour; 3] = [
        Behaviour::MaxStreamsTwo,
        Behaviour::WindowZeroThenUpdate,
        Behaviour::KeepalivePings,
    ];

    /// The behaviour's name, as written in this enum.
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// The behaviour named `name` (as [`Behaviour::name`] writes it), if any.
    pub fn parse(name: &str) -> Option<Self> {
        std::iter::once(Behaviour::Healthy)
            .chain(Behaviour::HOSTILE)
            .chain(Behaviour::STRICT)
            .find(|b| b.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether the behaviour lies only in its ORCA load reports: its health is fine, and what
    /// the operator owes clients is a bounded weight rather than NotServing.
    pub fn lies_about_load(self) -> bool {
        matches!(
            self,
            Behaviour::OrcaLiar | Behaviour::OrcaMalformed | Behaviour::OrcaHuge
        )
    }

    /// Whether the ORCA stream is served (with reports of this behaviour's kind); other
    /// behaviours answer it UNIMPLEMENTED, as a server without ORCA does.
    fn reports_load(self) -> bool {
        matches!(self, Behaviour::Healthy) || self.lies_about_load() || Behaviour::STRICT.contains(&self)
    }
}

/// How often [`Behaviour::Slow`] and [`Behaviour::ServingThenTrickle`] send a byte.
pub const TRICKLE_INTERVAL: Duration = Duration::from_secs(2);
/// How often [`Behaviour::KeepalivePings`] PINGs the client.
pub const KEEPALIVE_PING_INTERVAL: Duration = Duration::from_millis(100);
/// How long [`Behaviour::KeepalivePings`] waits for a PING's acknowledgement.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often [`Behaviour::FlappingWatch`] changes its answer.
pub const FLAP_INTERVAL: Duration = Duration::from_millis(50);
/// How often the ORCA stream sends a report (the shortest `reportInterval` a GrpcBackend can
/// ask for).
pub const ORCA_INTERVAL: Duration = Duration::from_secs(1);
/// What [`Behaviour::Healthy`] reports over ORCA: requests per second and utilization.
pub const HONEST_LOAD: (f64, f64) = (100.0, 0.5);
/// What [`Behaviour::OrcaLiar`] reports.
pub const LYING_LOAD: (f64, f64) = (1e12, 1e-9);

/// Counters at the server.
#[derive(Debug, Default)]
pub struct HostileCounters {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    /// Requests (HEADERS frames) received.
    pub calls: AtomicU64,
    pub frames_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// ORCA load reports queued for the client.
    pub load_reports: AtomicU64,
    /// `Check` calls received.
    pub checks: AtomicU64,
    /// Calls refused for being beyond SETTINGS_MAX_CONCURRENT_STREAMS.
    pub refused_streams: AtomicU64,
    /// DATA frames received beyond a flow-control window this server advertised.
    pub flow_control_overruns: AtomicU64,
    pub pings: AtomicU64,
    pub ping_acks: AtomicU64,
    /// Connections closed for a PING not acknowledged within [`KEEPALIVE_TIMEOUT`].
    pub keepalive_closes: AtomicU64,
}

/// A copy of [`HostileCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub connections_accepted: u64,
    pub connections_open: u64,
    pub calls: u64,
    pub frames_written: u64,
    pub bytes_written: u64,
    pub load_reports: u64,
    pub checks: u64,
    pub refused_streams: u64,
    pub flow_control_overruns: u64,
    pub pings: u64,
    pub ping_acks: u64,
    pub keepalive_closes: u64,
}

impl HostileCounters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            connections_open: self.connections_open.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            frames_written: self.frames_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            load_reports: self.load_reports.load(Ordering::Relaxed),
            checks: self.checks.load(Ordering::Relaxed),
            refused_streams: self.refused_streams.load(Ordering::Relaxed),
            flow_control_overruns: self.flow_control_overruns.load(Ordering::Relaxed),
            pings: self.pings.load(Ordering::Relaxed),
            ping_acks: self.ping_acks.load(Ordering::Relaxed),
            keepalive_closes: self.keepalive_closes.load(Ordering::Relaxed),
        }
    }
}

/// A running hostile backend; dropping it closes its listener and every connection.
pub struct HostileBackend {
    pub address: SocketAddr,
    pub behaviour: Behaviour,
    pub counters: Arc<HostileCounters>,
    _accept: AbortOnDropHandle<()>,
}

impl HostileBackend {
    /// Starts a backend of `behaviour` on a fresh 10.250.x.y address and [`BACKEND_PORT`].
    pub async fn start(behaviour: Behaviour) -> Result<Self> {
        Self::start_at(SocketAddr::from((next_backend_ip(), BACKEND_PORT)), behaviour).await
    }

    /// Starts a backend of `behaviour` listening on `address`.
    pub async fn start_at(address: SocketAddr, behaviour: Behaviour) -> Result<Self> {
        assert_private_network();
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for a {behaviour:?} backend"))?;
        let counters = Arc::new(HostileCounters::default());
        let accept = tokio::spawn(accept_loop(listener, behaviour, counters.clone()));
        Ok(Self {
            address,
            behaviour,
            counters,
            _accept: AbortOnDropHandle::new(accept),
        })
    }
}

/// Accepts connections until aborted; the connections are in a `JoinSet`, so aborting this
/// task ends them all.
async fn accept_loop(listener: TcpListener, behaviour: Behaviour, counters: Arc<HostileCounters>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    let open = OpenConnection::new(counters.clone());
                    connections.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let _ = serve(stream, behaviour, &open.0).await;
                        drop(open);
                    });
                }
                // Out of descriptors, say: the operator's retries will come back.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Counts a connection as open for as long as it lives (also when its task is aborted).
struct OpenConnection(Arc<HostileCounters>);

impl OpenConnection {
    fn new(counters: Arc<HostileCounters>) -> Self {
        counters.connections_open.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

// === HTTP/2 by hand ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value: the largest frame either side may send.
const MAX_FRAME: usize = 16_384;
/// SETTINGS_INITIAL_WINDOW_SIZE's initial value (the prober does not change it).
const INITIAL_WINDOW: i64 = 65_535;
const MAX_STREAM_ID: u32 = 0x7fff_ffff;
const SETTINGS_INITIAL_WINDOW_SIZE: [u8; 2] = [0, 4];

mod frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
}

mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// HTTP/2 error codes sent here.
mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
}

const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
const ORCA_PATH: &str = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics";

/// gRPC status codes sent here.
const GRPC_OK: u32 = 0;
const GRPC_PERMISSION_DENIED: u32 = 7;
const GRPC_UNIMPLEMENTED: u32 = 12;

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

const HTTP1_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\
Connection: close\r\n\r\nBad Request";

/// One frame as bytes.
fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FRAME_HEADER + payload.len());
    push_frame(&mut bytes, kind, flags, stream, payload);
    bytes
}

fn push_frame(dst: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    dst.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    dst.push(kind);
    dst.push(flags);
    dst.extend_from_slice(&stream.to_be_bytes());
    dst.extend_from_slice(payload);
}

/// An HPACK integer with a `prefix_bits`-bit prefix after the bits in `first` (RFC 7541 5.1).
fn hpack_integer(dst: &mut Vec<u8>, first: u8, prefix_bits: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        dst.push(first | value as u8);
        return;
    }
    dst.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        dst.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    dst.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_string(dst: &mut Vec<u8>, value: &[u8]) {
    hpack_integer(dst, 0, 7, value.len());
    dst.extend_from_slice(value);
}

/// A header field without indexing whose name is static-table entry `name_index` (RFC 7541
/// 6.2.2), so that nothing enters the client's dynamic table.
fn literal_indexed_name(dst: &mut Vec<u8>, name_index: usize, value: &[u8]) {
    hpack_integer(dst, 0x00, 4, name_index);
    hpack_string(dst, value);
}

/// A header field without indexing with a literal name.
fn literal_new_name(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.push(0x00);
    hpack_string(dst, name);
    hpack_string(dst, value);
}

/// `:status 200` (static entry 8) and `content-type: application/grpc` (name: static 31).
fn response_headers() -> Vec<u8> {
    let mut block = vec![0x80 | 8];
    literal_indexed_name(&mut block, 31, b"application/grpc");
    block
}

fn trailer_fields(block: &mut Vec<u8>, status: u32, message: &str) {
    literal_new_name(block, b"grpc-status", status.to_string().as_bytes());
    if !message.is_empty() {
        literal_new_name(block, b"grpc-message", message.replace(' ', "%20").as_bytes());
    }
}

/// A gRPC message: not compressed, its length, its bytes.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(5 + message.len());
    bytes.push(0);
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}

/// `grpc.health.v1.HealthCheckResponse { status }`: field 1, varint.
fn health_response(status: u8) -> Vec<u8> {
    grpc_message(&[0x08, status])
}

/// A protobuf `double` field.
fn double_field(dst: &mut Vec<u8>, field: u32, value: f64) {
    dst.push(((field << 3) | 1) as u8);
    dst.extend_from_slice(&value.to_le_bytes());
}

/// `xds.data.orca.v3.OrcaLoadReport` with `rps_fractional` (6), `eps` (7),
/// `application_utilization` (9) and `cpu_utilization` (1).
fn orca_report(qps: f64, utilization: f64, eps: f64) -> Vec<u8> {
    let mut report = Vec::with_capacity(40);
    double_field(&mut report, 1, utilization);
    double_field(&mut report, 6, qps);
    double_field(&mut report, 7, eps);
    double_field(&mut report, 9, utilization);
    report
}

/// An honest-looking `OrcaLoadReport` of about `size` bytes: [`HONEST_LOAD`] plus named metrics
/// (field 8, map<string, double>) until it is that big.
fn huge_orca_report(size: usize) -> Vec<u8> {
    let mut report = orca_report(HONEST_LOAD.0, HONEST_LOAD.1, 0.0);
    let mut n = 0;
    while report.len() < size {
        let key = format!("metric_{n:06}");
        let mut entry = Vec::with_capacity(32);
        entry.push(0x0a); // key: field 1, length-delimited
        varint(&mut entry, key.len());
        entry.extend_from_slice(key.as_bytes());
        double_field(&mut entry, 2, f64::from(n));
        report.push(0x42); // named_metrics: field 8, length-delimited
        varint(&mut report, entry.len());
        report.extend_from_slice(&entry);
        n += 1;
    }
    report
}

/// A protobuf varint.
fn varint(dst: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        dst.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// The `:path` of a request's header block. Requests are decoded with the operator's HPACK
/// decoder (Huffman strings, the dynamic table), so that a tonic client can also call this
/// server; what the suite puts to the test is what the operator makes of the responses, which
/// are encoded here by hand.
fn request_path(decoder: &mut hpack::Decoder, block: &[u8]) -> Option<String> {
    let mut path = None;
    decoder
        .decode(block, |name, value| {
            if name == b":path" {
                path = Some(String::from_utf8_lossy(value).into_owned());
            }
        })
        .ok()?;
    path
}

/// What the client sent that the script acts on.
#[derive(Debug)]
enum Incoming {
    /// The client's SETTINGS (not an ACK): acknowledged by a responsive server.
    Settings,
    /// A request on `stream` for `path`.
    Call { stream: u32, path: String },
    /// The client reset `stream`.
    Reset(u32),
    /// The client acknowledged a PING.
    PingAck,
}

/// The peer's flow-control windows for what this server sends (connection and streams).
#[derive(Default)]
struct Windows {
    state: Mutex<WindowState>,
    updated: Notify,
}

struct WindowState {
    connection: i64,
    /// A new stream's window: the client's SETTINGS_INITIAL_WINDOW_SIZE.
    initial: i64,
    streams: HashMap<u32, i64>,
}

impl Default for WindowState {
    fn default() -> Self {
        Self {
            connection: INITIAL_WINDOW,
            initial: INITIAL_WINDOW,
            streams: HashMap::new(),
        }
    }
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, stream: u32, increment: u32) {
        let mut state = self.lock();
        if stream == 0 {
            state.connection += i64::from(increment);
        } else {
            let initial = state.initial;
            *state.streams.entry(stream).or_insert(initial) += i64::from(increment);
        }
        drop(state);
        self.updated.notify_one();
    }

    /// The client's SETTINGS_INITIAL_WINDOW_SIZE changes every stream's window by the
    /// difference (RFC 9113 6.9.2).
    fn set_initial(&self, initial: u32) {
        let mut state = self.lock();
        let delta = i64::from(initial) - state.initial;
        state.initial = i64::from(initial);
        for window in state.streams.values_mut() {
            *window += delta;
        }
        drop(state);
        self.updated.notify_one();
    }

    /// How many DATA bytes `stream` may be sent now.
    fn available(&self, stream: u32) -> i64 {
        let state = self.lock();
        state
            .connection
            .min(state.streams.get(&stream).copied().unwrap_or(state.initial))
    }

    fn consume(&self, stream: u32, bytes: usize) {
        let mut state = self.lock();
        state.connection -= bytes as i64;
        let initial = state.initial;
        *state.streams.entry(stream).or_insert(initial) -= bytes as i64;
    }

    fn forget(&self, stream: u32) {
        self.lock().streams.remove(&stream);
    }
}

/// The flow-control windows this server advertises for what the client sends
/// ([`Behaviour::WindowZeroThenUpdate`]): a WINDOW_UPDATE is credited before it is written,
/// so that a correct client never appears to overrun.
struct ReceiveWindows {
    state: Mutex<ReceiveState>,
}

struct ReceiveState {
    connection: i64,
    /// A new stream's window: the default until the client acknowledges our SETTINGS, then 0.
    initial: i64,
    streams: HashMap<u32, i64>,
}

impl ReceiveWindows {
    fn new() -> Self {
        Self {
            state: Mutex::new(ReceiveState {
                connection: INITIAL_WINDOW,
                initial: INITIAL_WINDOW,
                streams: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiveState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Our SETTINGS_INITIAL_WINDOW_SIZE 0 applies from the client's acknowledgement on.
    fn settings_acknowledged(&self) {
        let mut state = self.lock();
        let delta = -state.initial;
        state.initial = 0;
        for window in state.streams.values_mut() {
            *window += delta;
        }
    }

    fn opened(&self, stream: u32) {
        let mut state = self.lock();
        let initial = state.initial;
        state.streams.entry(stream).or_insert(initial);
    }

    fn credit(&self, stream: u32, increment: u32) {
        let mut state = self.lock();
        if stream == 0 {
            state.connection += i64::from(increment);
        } else if let Some(window) = state.streams.get_mut(&stream) {
            *window += i64::from(increment);
        }
    }

    /// `length` DATA bytes on `stream`: whether they were within both windows.
    fn received(&self, stream: u32, length: usize) -> bool {
        let mut state = self.lock();
        let length = length as i64;
        state.connection -= length;
        let initial = state.initial;
        let window = state.streams.entry(stream).or_insert(initial);
        *window -= length;
        *window >= 0 && state.connection >= 0
    }
}

/// Reads the client's preface and frames until it closes; forwards what the script acts on.
async fn read_frames(
    mut read: OwnedReadHalf,
    incoming: mpsc::Sender<Incoming>,
    windows: Arc<Windows>,
    receive_windows: Option<Arc<ReceiveWindows>>,
    counters: &HostileCounters,
) -> io::Result<()> {
    let mut preface = [0u8; PREFACE.len()];
    read.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client"));
    }
    let mut payload = Vec::with_capacity(MAX_FRAME);
    let mut decoder = hpack::Decoder::default();
    loop {
        let mut header = [0u8; FRAME_HEADER];
        match read.read_exact(&mut header).await {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        if length > MAX_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a frame over 16 KiB"));
        }
        payload.resize(length, 0);
        read.read_exact(&mut payload).await?;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & MAX_STREAM_ID;
        let forward = match kind {
            frame::SETTINGS if flags & flag::ACK == 0 => {
                for setting in payload.chunks_exact(6) {
                    if setting[..2] == SETTINGS_INITIAL_WINDOW_SIZE {
                        windows.set_initial(u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]));
                    }
                }
                Some(Incoming::Settings)
            }
            frame::SETTINGS => {
                if let Some(receive_windows) = &receive_windows {
                    receive_windows.settings_acknowledged();
                }
                None
            }
            frame::DATA => {
                if let Some(receive_windows) = &receive_windows
                    && !receive_windows.received(stream, length)
                {
                    counters.flow_control_overruns.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            frame::PING if flags & flag::ACK != 0 => Some(Incoming::PingAck),
            frame::HEADERS => {
                counters.calls.fetch_add(1, Ordering::Relaxed);
                let mut block = payload.as_slice();
                if flags & flag::PADDED != 0 {
                    let padding = usize::from(*block.first().unwrap_or(&0));
                    block = block.get(1..block.len().saturating_sub(padding)).unwrap_or_default();
                }
                if flags & flag::PRIORITY != 0 {
                    block = block.get(5..).unwrap_or_default();
                }
                let path = request_path(&mut decoder, block).unwrap_or_default();
                Some(Incoming::Call { stream, path })
            }
            frame::RST_STREAM => Some(Incoming::Reset(stream)),
            frame::WINDOW_UPDATE if payload.len() == 4 => {
                let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_STREAM_ID;
                windows.update(stream, increment);
                None
            }
            // PINGs, GOAWAY: nothing to do.
            _ => None,
        };
        if let Some(forward) = forward {
            // The script always drains this channel; if it has ended, so has the connection.
            if incoming.send(forward).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Frames queued for the client, counted when written.
struct Out<'a> {
    write: OwnedWriteHalf,
    buffer: Vec<u8>,
    frames: u64,
    counters: &'a HostileCounters,
}

impl Out<'_> {
    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        push_frame(&mut self.buffer, kind, flags, stream, payload);
        self.frames += 1;
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.write.write_all(&self.buffer).await?;
        self.counters
            .bytes_written
            .fetch_add(self.buffer.len() as u64, Ordering::Relaxed);
        self.counters.frames_written.fetch_add(self.frames, Ordering::Relaxed);
        self.frames = 0;
        self.buffer.clear();
        if self.buffer.capacity() > 4 * MAX_FRAME {
            self.buffer.shrink_to(MAX_FRAME);
        }
        Ok(())
    }
}

/// What the script does with the connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answers calls (as the behaviour answers them).
    Normal,
    /// Reads and ignores everything.
    Ignore,
    /// Sends the bytes in `trickle` one every [`TRICKLE_INTERVAL`], ignoring everything else.
    Trickle,
    /// Answers calls, and floods the connection with the behaviour's frames in between.
    Flood,
    /// Closes the connection.
    Close,
}

async fn serve(stream: TcpStream, behaviour: Behaviour, counters: &HostileCounters) -> io::Result<()> {
    let (read, write) = stream.into_split();
    let (incoming_tx, incoming) = mpsc::channel(256);
    let windows = Arc::new(Windows::default());
    let receive_windows = (behaviour == Behaviour::WindowZeroThenUpdate).then(|| Arc::new(ReceiveWindows::new()));
    let mut script = Script {
        out: Out {
            write,
            buffer: Vec::with_capacity(1024),
            frames: 0,
            counters,
        },
        incoming,
        behaviour,
        windows: windows.clone(),
        mode: Mode::Normal,
        watch: None,
        serving: true,
        orca: None,
        orca_reports_sent: 0,
        trickle: VecDeque::new(),
        flooded: 0,
        receive_windows: receive_windows.clone(),
        open_calls: Vec::new(),
        ping_unacknowledged_since: None,
    };
    // Whichever ends first ends the connection: the client closed it, or the script did.
    tokio::select! {
        result = read_frames(read, incoming_tx, windows, receive_windows, counters) => result,
        result = script.run() => result,
    }
}

/// One connection's server side, as its behaviour scripts it.
struct Script<'a> {
    out: Out<'a>,
    incoming: mpsc::Receiver<Incoming>,
    behaviour: Behaviour,
    windows: Arc<Windows>,
    mode: Mode,
    /// The `Watch` stream, while open.
    watch: Option<u32>,
    /// What the `Watch` (and `Check`) says now ([`Behaviour::FlappingWatch`] alternates).
    serving: bool,
    /// The ORCA stream, while open.
    orca: Option<u32>,
    orca_reports_sent: u32,
    trickle: VecDeque<u8>,
    /// Frames sent by the flood so far (stream ids and PING payloads vary with it).
    flooded: u64,
    /// The windows advertised for what the client sends ([`Behaviour::WindowZeroThenUpdate`]).
    receive_windows: Option<Arc<ReceiveWindows>>,
    /// Calls open (counted against [`Behaviour::MaxStreamsTwo`]'s limit): from their HEADERS
    /// until this server ends them or the client resets them.
    open_calls: Vec<u32>,
    /// When the oldest PING not yet acknowledged was sent ([`Behaviour::KeepalivePings`]).
    ping_unacknowledged_since: Option<tokio::time::Instant>,
}

impl Script<'_> {
    async fn run(&mut self) -> io::Result<()> {
        match self.behaviour {
            Behaviour::Silent => self.mode = Mode::Ignore,
            Behaviour::Slow => {
                // The whole answer a healthy server gives to the first `Watch` (stream 1).
                let mut answer = frame_bytes(frame::SETTINGS, 0, 0, &[]);
                answer.extend(frame_bytes(frame::HEADERS, flag::END_HEADERS, 1, &response_headers()));
                answer.extend(frame_bytes(frame::DATA, 0, 1, &health_response(SERVING)));
                self.trickle = answer.into();
                self.mode = Mode::Trickle;
            }
            Behaviour::Http1 | Behaviour::TlsBytes => {
                // Answer once the client has spoken (its SETTINGS follows the preface).
                if self.incoming.recv().await.is_none() {
                    return Ok(());
                }
                if self.behaviour == Behaviour::Http1 {
                    self.out.raw(HTTP1_RESPONSE);
                } else {
                    self.out.raw(&server_hello_and_alert());
                }
                return self.out.flush().await;
            }
            _ => {
                let settings: &[u8] = match self.behaviour {
                    Behaviour::MaxStreamsTwo => &[0, 3, 0, 0, 0, 2],
                    Behaviour::WindowZeroThenUpdate => &[0, 4, 0, 0, 0, 0],
                    _ => &[],
                };
                self.out.frame(frame::SETTINGS, 0, 0, settings);
                self.out.flush().await?;
            }
        }
        let mut ping_tick = tokio::time::interval(KEEPALIVE_PING_INTERVAL);
        let mut orca_tick = tokio::time::interval(ORCA_INTERVAL);
        let mut flap_tick = tokio::time::interval(FLAP_INTERVAL);
        let mut trickle_tick = tokio::time::interval(TRICKLE_INTERVAL);
        for tick in [&mut orca_tick, &mut flap_tick, &mut trickle_tick, &mut ping_tick] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            if self.mode == Mode::Close {
                return self.out.flush().await;
            }
            let flooding = self.mode == Mode::Flood;
            let can_flood = flooding && self.flood_window_open();
            let flapping =
                self.behaviour == Behaviour::FlappingWatch && self.watch.is_some() && self.mode == Mode::Normal;
            let reporting = self.orca.is_some() && self.mode == Mode::Normal;
            let pinging = self.behaviour == Behaviour::KeepalivePings && self.mode == Mode::Normal;
            tokio::select! {
                biased;
                incoming = self.incoming.recv() => match incoming {
                    None => return Ok(()),
                    Some(incoming) => self.on_incoming(incoming).await?,
                },
                _ = trickle_tick.tick(), if self.mode == Mode::Trickle => {
                    match self.trickle.pop_front() {
                        Some(byte) => self.out.raw(&[byte]),
                        None => self.mode = Mode::Ignore,
                    }
                }
                _ = flap_tick.tick(), if flapping => {
                    self.serving = !self.serving;
                    if let Some(watch) = self.watch {
                        let status = if self.serving { SERVING } else { NOT_SERVING };
                        self.data(watch, &health_response(status));
                    }
                }
                _ = orca_tick.tick(), if reporting => self.send_load_report(),
                _ = ping_tick.tick(), if pinging => self.keepalive_ping(),
                () = self.windows.updated.notified(), if flooding && !can_flood => {}
                () = std::future::ready(()), if can_flood => self.flood(),
            }
            self.out.flush().await?;
        }
    }

    async fn on_incoming(&mut self, incoming: Incoming) -> io::Result<()> {
        let responsive = matches!(self.mode, Mode::Normal | Mode::Flood);
        match incoming {
            Incoming::Settings if responsive => self.out.frame(frame::SETTINGS, flag::ACK, 0, &[]),
            Incoming::Call { stream, path } if responsive => self.on_call(stream, &path).await?,
            Incoming::PingAck => {
                self.out.counters.ping_acks.fetch_add(1, Ordering::Relaxed);
                self.ping_unacknowledged_since = None;
            }
            Incoming::Reset(stream) => {
                self.open_calls.retain(|open| *open != stream);
                self.windows.forget(stream);
                if self.watch == Some(stream) {
                    self.watch = None;
                    if self.behaviour == Behaviour::TinyMessagesPacked {
                        self.mode = Mode::Normal;
                    }
                }
                if self.orca == Some(stream) {
                    self.orca = None;
                }
            }
            Incoming::Settings | Incoming::Call { .. } => {}
        }
        Ok(())
    }

    async fn on_call(&mut self, stream: u32, path: &str) -> io::Result<()> {
        if self.behaviour == Behaviour::MaxStreamsTwo && self.open_calls.len() >= 2 {
            self.out.counters.refused_streams.fetch_add(1, Ordering::Relaxed);
            self.out
                .frame(frame::RST_STREAM, 0, stream, &code::REFUSED_STREAM.to_be_bytes());
            return Ok(());
        }
        self.open_calls.push(stream);
        if let Some(receive_windows) = &self.receive_windows {
            receive_windows.opened(stream);
            for (window, increment) in [(stream, 3), (stream, 1_000), (0, 1_003)] {
                receive_windows.credit(window, increment);
                self.out
                    .frame(frame::WINDOW_UPDATE, 0, window, &increment.to_be_bytes());
            }
        }
        if path == CHECK_PATH {
            self.out.counters.checks.fetch_add(1, Ordering::Relaxed);
        }
        match path {
            WATCH_PATH => {
                self.out
                    .frame(frame::HEADERS, flag::END_HEADERS, stream, &response_headers());
                self.watch = Some(stream);
                if self.behaviour == Behaviour::TinyMessagesPacked {
                    self.mode = Mode::Flood;
                    return Ok(());
                }
                self.data(stream, &health_response(SERVING));
                self.after_serving(stream).await?;
            }
            CHECK_PATH if self.behaviour == Behaviour::CheckAlwaysFails => {
                self.trailers_only(stream, GRPC_PERMISSION_DENIED, "permission denied");
            }
            CHECK_PATH => {
                self.out
                    .frame(frame::HEADERS, flag::END_HEADERS, stream, &response_headers());
                let status = if self.serving { SERVING } else { NOT_SERVING };
                self.data(stream, &health_response(status));
                let mut trailers = Vec::new();
                trailer_fields(&mut trailers, GRPC_OK, "");
                self.out
                    .frame(frame::HEADERS, flag::END_HEADERS | flag::END_STREAM, stream, &trailers);
                self.open_calls.retain(|open| *open != stream);
            }
            ORCA_PATH if self.behaviour.reports_load() => {
                self.out
                    .frame(frame::HEADERS, flag::END_HEADERS, stream, &response_headers());
                self.orca = Some(stream);
                self.send_load_report();
            }
            _ => self.trailers_only(stream, GRPC_UNIMPLEMENTED, "unknown method"),
        }
        Ok(())
    }

    /// What the behaviour does right after its `Watch` answered SERVING.
    async fn after_serving(&mut self, watch: u32) -> io::Result<()> {
        match self.behaviour {
            Behaviour::ServingThenGoAway => {
                self.goaway(watch, code::NO_ERROR);
                self.mode = Mode::Close;
            }
            Behaviour::GoAwayRepeated => {
                self.goaway(MAX_STREAM_ID, code::NO_ERROR);
                self.goaway(watch, code::NO_ERROR);
                self.mode = Mode::Close;
            }
            Behaviour::ServingThenReset => {
                self.out
                    .frame(frame::RST_STREAM, 0, watch, &code::INTERNAL_ERROR.to_be_bytes());
                self.watch = None;
            }
            Behaviour::ServingThenSilence => self.mode = Mode::Ignore,
            Behaviour::ServingThenTrickle => {
                self.trickle = frame_bytes(frame::DATA, 0, watch, &health_response(SERVING)).into();
                self.mode = Mode::Trickle;
            }
            Behaviour::ServingThenBadHpack => {
                // Index 126: past the static table, into a dynamic table that is empty.
                self.out.frame(
                    frame::HEADERS,
                    flag::END_HEADERS | flag::END_STREAM,
                    watch,
                    &[0x80 | 126],
                );
            }
            Behaviour::ServingThenHugeFrameHeader => {
                // The 24-bit length first (2^24 - 1), the rest of the header a moment later.
                self.out.raw(&[0xff, 0xff, 0xff]);
                self.out.flush().await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.out.raw(&[frame::DATA, 0]);
                self.out.raw(&watch.to_be_bytes());
                self.out.raw(&[0; 1024]);
                self.mode = Mode::Ignore;
            }
            Behaviour::ServingThenHugeMessagePrefix => {
                let mut payload = vec![0, 0xff, 0xff, 0xff, 0xff];
                payload.extend_from_slice(&[0; 1024]);
                self.windows.consume(watch, payload.len());
                self.out.frame(frame::DATA, 0, watch, &payload);
            }
            Behaviour::ServingThenHttp1 => {
                self.out.raw(HTTP1_RESPONSE);
                self.mode = Mode::Close;
            }
            Behaviour::PingFlood | Behaviour::SettingsFlood | Behaviour::RstStreamFlood | Behaviour::GoAwayFlood => {
                self.mode = Mode::Flood;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the flood may send now (only DATA waits for flow control).
    fn flood_window_open(&self) -> bool {
        match (self.behaviour, self.watch) {
            (Behaviour::TinyMessagesPacked, Some(watch)) => self.windows.available(watch) >= TINY_FRAME as i64,
            (Behaviour::TinyMessagesPacked, None) => false,
            _ => true,
        }
    }

    /// One batch of the behaviour's flood.
    fn flood(&mut self) {
        const BATCH: u64 = 64;
        for _ in 0..BATCH {
            self.flooded += 1;
            let n = self.flooded;
            match self.behaviour {
                Behaviour::PingFlood => self.out.frame(frame::PING, 0, 0, &n.to_be_bytes()),
                Behaviour::SettingsFlood => {
                    // SETTINGS_MAX_CONCURRENT_STREAMS 100.
                    self.out.frame(frame::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
                }
                Behaviour::RstStreamFlood => {
                    // Client-side (odd) stream ids far above any the prober opened.
                    let stream = 0x7000_0001 + 2 * (n % 0x0800_0000) as u32;
                    self.out
                        .frame(frame::RST_STREAM, 0, stream, &code::CANCEL.to_be_bytes());
                }
                Behaviour::GoAwayFlood => self.goaway(MAX_STREAM_ID, code::NO_ERROR),
                Behaviour::TinyMessagesPacked => {
                    let Some(watch) = self.watch else { return };
                    if self.windows.available(watch) < TINY_FRAME as i64 {
                        return;
                    }
                    self.windows.consume(watch, TINY_FRAME);
                    self.out.frame(frame::DATA, 0, watch, &TINY_MESSAGES);
                }
                _ => return,
            }
        }
    }

    fn send_load_report(&mut self) {
        let Some(stream) = self.orca else { return };
        let n = self.orca_reports_sent;
        self.orca_reports_sent += 1;
        let report = match self.behaviour {
            Behaviour::OrcaLiar => orca_report(LYING_LOAD.0, LYING_LOAD.1, 0.0),
            Behaviour::OrcaMalformed => {
                const BAD: [(f64, f64, f64); 6] = [
                    (f64::INFINITY, 0.5, 0.0),
                    (f64::NAN, 0.5, 0.0),
                    (100.0, f64::NAN, 0.0),
                    (100.0, -1.0, 0.0),
                    (-100.0, 0.5, 0.0),
                    (100.0, 0.5, f64::NEG_INFINITY),
                ];
                match BAD.get(n as usize) {
                    Some(&(qps, utilization, eps)) => orca_report(qps, utilization, eps),
                    // Not an OrcaLoadReport: a field 1 of wire type 7, which does not exist.
                    None => vec![0x0f, 0xff, 0xff, 0xff],
                }
            }
            Behaviour::OrcaHuge if n == 0 => huge_orca_report(48 * 1024),
            Behaviour::OrcaHuge => return,
            _ => orca_report(HONEST_LOAD.0, HONEST_LOAD.1, 0.0),
        };
        self.out.counters.load_reports.fetch_add(1, Ordering::Relaxed);
        let message = grpc_message(&report);
        for chunk in message.chunks(MAX_FRAME) {
            self.windows.consume(stream, chunk.len());
            self.out.frame(frame::DATA, 0, stream, chunk);
        }
    }

    fn data(&mut self, stream: u32, payload: &[u8]) {
        self.windows.consume(stream, payload.len());
        self.out.frame(frame::DATA, 0, stream, payload);
    }

    fn trailers_only(&mut self, stream: u32, status: u32, message: &str) {
        let mut block = response_headers();
        trailer_fields(&mut block, status, message);
        self.out
            .frame(frame::HEADERS, flag::END_HEADERS | flag::END_STREAM, stream, &block);
        self.open_calls.retain(|open| *open != stream);
    }

    /// A keepalive PING, or the connection's end if the last one went unacknowledged for
    /// [`KEEPALIVE_TIMEOUT`].
    fn keepalive_ping(&mut self) {
        let now = tokio::time::Instant::now();
        if self
            .ping_unacknowledged_since
            .is_some_and(|since| now.duration_since(since) >= KEEPALIVE_TIMEOUT)
        {
            self.out.counters.keepalive_closes.fetch_add(1, Ordering::Relaxed);
            self.mode = Mode::Close;
            return;
        }
        self.ping_unacknowledged_since.get_or_insert(now);
        self.out.counters.pings.fetch_add(1, Ordering::Relaxed);
        self.out.frame(frame::PING, 0, 0, b"keepaliv");
    }

    fn goaway(&mut self, last_stream: u32, error: u32) {
        let mut payload = last_stream.to_be_bytes().to_vec();
        payload.extend_from_slice(&error.to_be_bytes());
        self.out.frame(frame::GOAWAY, 0, 0, &payload);
    }
}

/// The DATA payload of [`Behaviour::TinyMessagesPacked`]: 3,276 empty messages (16,380 bytes).
const TINY_FRAME: usize = 5 * (MAX_FRAME / 5);
static TINY_MESSAGES: [u8; TINY_FRAME] = [0; TINY_FRAME];

/// A TLS 1.2 ServerHello-looking handshake record, then a fatal `handshake_failure` alert.
fn server_hello_and_alert() -> Vec<u8> {
    let mut hello = vec![0x02, 0x00, 0x00, 0x26, 0x03, 0x03];
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.extend_from_slice(&[0x00, 0xc0, 0x2f, 0x00]); // no session id, a cipher suite, no compression
    let mut record = vec![0x16, 0x03, 0x03];
    record.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    record.extend_from_slice(&hello);
    record.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    record
}

// === What a process holds ===

/// This process's file descriptors, sorted by what they are (read from /proc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorCensus {
    pub total: usize,
    /// TCP connections to or from loopback: the kube client's connections to the apiserver,
    /// whose number its connection pool decides.
    pub loopback_connections: usize,
    /// TCP connections (not listeners) with one of the addresses asked about at either end.
    pub connections_with: usize,
}

impl DescriptorCensus {
    /// Descriptors that are neither loopback connections nor connections with the addresses
    /// asked about.
    pub fn others(&self) -> usize {
        self.total - self.loopback_connections - self.connections_with
    }
}

/// Counts this process's descriptors, and among them its TCP connections with `addresses`.
pub fn descriptor_census(addresses: &std::collections::HashSet<std::net::IpAddr>) -> io::Result<DescriptorCensus> {
    let mut sockets = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some((inode, socket)) = parse_tcp_line(line) {
                sockets.insert(inode, socket);
            }
        }
    }
    let mut census = DescriptorCensus::default();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        census.total += 1;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(socket) = sockets.get(&inode) else {
            continue;
        };
        if socket.listening {
            continue;
        }
        if addresses.contains(&socket.local.ip()) || addresses.contains(&socket.remote.ip()) {
            census.connections_with += 1;
        } else if socket.remote.ip().is_loopback() {
            census.loopback_connections += 1;
        }
    }
    Ok(census)
}

struct TcpSocket {
    local: SocketAddr,
    remote: SocketAddr,
    listening: bool,
}

/// One line of /proc/net/tcp or tcp6: its inode and socket.
fn parse_tcp_line(line: &str) -> Option<(u64, TcpSocket)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = parse_proc_address(fields.get(1)?)?;
    let remote = parse_proc_address(fields.get(2)?)?;
    let listening = *fields.get(3)? == "0A";
    let inode = fields.get(9)?.parse().ok()?;
    Some((
        inode,
        TcpSocket {
            local,
            remote,
            listening,
        },
    ))
}

/// `0100FA0A:C383`: the address as the kernel's 32-bit words in host order, then the port.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..address.len() / 8)
        .map(|i| u32::from_str_radix(&address[8 * i..8 * i + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            v6.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`); `pid` None is this process.
pub fn memory_kib(pid: Option<i32>, field: &str) -> io::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)?
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc status")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_path_is_read_from_a_literal_header_block() {
        let mut block = vec![0x83, 0x86];
        literal_indexed_name(&mut block, 4, WATCH_PATH.as_bytes());
        literal_indexed_name(&mut block, 1, b"10.250.1.1:50051");
        let mut decoder = hpack::Decoder::default();
        assert_eq!(request_path(&mut decoder, &block).as_deref(), Some(WATCH_PATH));
        let mut block = vec![0x83];
        literal_new_name(&mut block, b":path", CHECK_PATH.as_bytes());
        assert_eq!(request_path(&mut decoder, &block).as_deref(), Some(CHECK_PATH));
        assert_eq!(request_path(&mut decoder, &[0x83, 0x86]), None);
    }

    #[test]
    fn behaviours_parse_from_their_names() {
        for behaviour in std::iter::once(Behaviour::Healthy)
            .chain(Behaviour::HOSTILE)
            .chain(Behaviour::STRICT)
        {
            assert_eq!(Behaviour::parse(&behaviour.name()), Some(behaviour));
        }
        assert_eq!(Behaviour::parse("nope"), None);
    }

    #[test]
    fn a_huge_orca_report_is_as_big_as_asked_and_starts_with_the_honest_load() {
        let report = huge_orca_report(48 * 1024);
        assert!((48 * 1024..48 * 1024 + 64).contains(&report.len()), "{}", report.len());
        assert_eq!(
            &report[..9],
            &{
                let mut field = Vec::new();
                double_field(&mut field, 1, HONEST_LOAD.1);
                field
            }[..]
        );
    }
}
