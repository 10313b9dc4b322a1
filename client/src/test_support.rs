//! Helpers for the client's unit tests: an in-memory network of endpoints, and statuses
//! applied to a pool.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio::io::DuplexStream;

use crate::{
    connection::Dial,
    outlier::OutlierDetection,
    pool::{Pool, PoolConfig},
    status::parse_status,
};

pub const BACKEND: &str = "default/echo";

/// Endpoints in memory: each connection to an answering address is a duplex pipe to an HTTP/2
/// server of its own that answers every request with its [`Answer`] (by default at once,
/// trailers-only, OK; health Checks always so, so that warm-ups succeed); a connection to any
/// other address is refused. No socket and no timer but the answers' delays: tests on it can
/// run on a paused clock.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Addresses>>,
}

#[derive(Default)]
struct Addresses {
    handed_out: u16,
    answering: HashMap<SocketAddr, (Answer, Arc<Mutex<ServerLog>>)>,
}

/// How a memory server answers calls other than health Checks.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// The call's `grpc-status`.
    pub code: tonic::Code,
    /// How long it works before answering (with `headers_first`, before the message).
    pub delay: Duration,
    /// Response headers at once, then after `delay` a message and the status in trailers (a
    /// committed response); otherwise a Trailers-Only response after `delay`.
    pub headers_first: bool,
    /// A `grpc-retry-pushback-ms` to send with the status.
    pub pushback: Option<&'static str>,
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            code: tonic::Code::Ok,
            delay: Duration::ZERO,
            headers_first: false,
            pushback: None,
        }
    }
}

/// What a memory server saw of the calls other than health Checks.
#[derive(Clone, Debug, Default)]
pub struct ServerLog {
    pub calls: u64,
    /// Calls the client reset before their answer was complete.
    pub cancelled: u64,
    /// Each call's `grpc-timeout`, if it had one.
    pub grpc_timeouts: Vec<Option<String>>,
    /// Each call's `grpc-previous-rpc-attempts`, if it had one.
    pub previous_attempts: Vec<Option<String>>,
}

impl MemoryNetwork {
    /// A new address where a server answers at once, OK.
    pub fn answering(&self) -> SocketAddr {
        self.answering_with(Answer::default())
    }

    /// A new address where a server answers with `answer`.
    pub fn answering_with(&self, answer: Answer) -> SocketAddr {
        let address = self.next_address();
        self.lock().answering.insert(address, (answer, Arc::default()));
        address
    }

    /// What the server at `address` saw.
    pub fn log(&self, address: SocketAddr) -> ServerLog {
        self.lock()
            .answering
            .get(&address)
            .map(|(_, log)| log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    /// A new address where nothing listens: connections to it are refused.
    pub fn refusing(&self) -> SocketAddr {
        self.next_address()
    }

    /// Connects to `address` (from a Tokio runtime: the server runs in a task of its own).
    pub fn connect(&self, address: SocketAddr) -> io::Result<DuplexStream> {
        let Some((answer, log)) = self.lock().answering.get(&address).cloned() else {
            return Err(io::ErrorKind::ConnectionRefused.into());
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, answer, log));
        Ok(client)
    }

    /// A pool configuration whose connections go to this network.
    pub fn config(&self, outlier_detection: OutlierDetection, panic_threshold: u8) -> PoolConfig {
        PoolConfig {
            template: Arc::new(|endpoint| Ok(endpoint.connect_timeout(Duration::from_secs(5)))),
            tls: false,
            outlier_detection: Some(outlier_detection),
            panic_threshold,
            transparent_retry: true,
            dial: Dial::Memory(self.clone()),
        }
    }

    fn next_address(&self) -> SocketAddr {
        let mut addresses = self.lock();
        addresses.handed_out += 1;
        let [high, low] = addresses.handed_out.to_be_bytes();
        SocketAddr::from(([10, 0, high, low], 50051))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Addresses> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An HTTP/2 server on one connection: health Checks answered at once, trailers-only, OK;
/// other calls with `answer`, logged.
async fn serve(stream: DuplexStream, answer: Answer, log: Arc<Mutex<ServerLog>>) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let log = log.clone();
        tokio::spawn(async move {
            let check = request.uri().path() == "/grpc.health.v1.Health/Check";
            let answer = if check { Answer::default() } else { answer };
            if !check {
                let header = |name: &str| {
                    request
                        .headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap_or_default().to_owned())
                };
                let mut log = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                log.calls += 1;
                log.grpc_timeouts.push(header("grpc-timeout"));
                log.previous_attempts.push(header("grpc-previous-rpc-attempts"));
            }
            let mut body = request.into_body();
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
            }
            let headers = http::Response::builder().header(http::header::CONTENT_TYPE, "application/grpc");
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", (answer.code as i32).into());
            if let Some(pushback) = answer.pushback {
                trailers.insert("grpc-retry-pushback-ms", http::HeaderValue::from_static(pushback));
            }
            let cancelled = if answer.headers_first {
                let Ok(mut stream) = respond.send_response(headers.body(()).expect("a valid response"), false) else {
                    return;
                };
                let cancelled = tokio::select! {
                    () = tokio::time::sleep(answer.delay) => false,
                    _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => true,
                };
                if !cancelled {
                    let _ = stream.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), false);
                    let _ = stream.send_trailers(trailers);
                }
                cancelled
            } else {
                let cancelled = tokio::select! {
                    () = tokio::time::sleep(answer.delay) => false,
                    _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => true,
                };
                if !cancelled {
                    let mut response = headers.body(()).expect("a valid response");
                    response.headers_mut().extend(trailers);
                    let _ = respond.send_response(response, true);
                }
                cancelled
            };
            if cancelled {
                log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).cancelled += 1;
            }
        });
    }
}

/// A status entry as the operator writes it (Kubernetes' conditions left to their defaults).
pub fn entry(address: SocketAddr, weight: u32, health: &str) -> Value {
    json!({"address": address.ip().to_string(), "port": address.port(), "weight": weight, "health": health})
}

/// `entry` in `zone`, with `forZones` hints if any.
pub fn zoned(address: SocketAddr, health: &str, zone: &str, for_zones: &[&str]) -> Value {
    let mut entry = entry(address, 100, health);
    entry["zone"] = json!(zone);
    if !for_zones.is_empty() {
        entry["forZones"] = json!(for_zones);
    }
    entry
}

/// `entry`, whose health or readiness last changed at `since` (RFC 3339, to the nanosecond).
pub fn transitioned(address: SocketAddr, weight: u32, health: &str, since: SystemTime) -> Value {
    let mut entry = entry(address, weight, health);
    let since = k8s_openapi::jiff::Timestamp::try_from(since).expect("a time jiff can hold");
    entry["lastTransitionTime"] = json!(since.to_string());
    entry
}

pub fn apply(pool: &Pool, entries: &[Value]) {
    let parsed = parse_status(Some(&json!({ "endpoints": entries })));
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    pool.apply_status(parsed);
}
