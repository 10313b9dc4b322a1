//! Helpers for the client's unit tests: an in-memory network of endpoints, and statuses
//! applied to a pool.

use std::{
    collections::HashSet,
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
/// server of its own that answers every request at once with a trailers-only gRPC OK (so that
/// warm-ups succeed); a connection to any other address is refused. No socket and no timer:
/// tests on it can run on a paused clock.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Addresses>>,
}

#[derive(Default)]
struct Addresses {
    handed_out: u16,
    answering: HashSet<SocketAddr>,
}

impl MemoryNetwork {
    /// A new address where a server answers.
    pub fn answering(&self) -> SocketAddr {
        let address = self.next_address();
        self.lock().answering.insert(address);
        address
    }

    /// A new address where nothing listens: connections to it are refused.
    pub fn refusing(&self) -> SocketAddr {
        self.next_address()
    }

    /// Connects to `address` (from a Tokio runtime: the server runs in a task of its own).
    pub fn connect(&self, address: SocketAddr) -> io::Result<DuplexStream> {
        if !self.lock().answering.contains(&address) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server));
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

/// An HTTP/2 server on one connection: every request answered at once, trailers-only, OK.
async fn serve(stream: DuplexStream) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        tokio::spawn(async move {
            let mut body = request.into_body();
            while let Some(Ok(_)) = body.data().await {}
            let response = http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", "0")
                .body(())
                .expect("a valid response");
            let _ = respond.send_response(response, true);
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
