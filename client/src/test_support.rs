//! Helpers for the client's unit tests: loopback servers and statuses applied to a pool.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::{
    outlier::OutlierDetection,
    pool::{Pool, PoolConfig},
    status::parse_status,
};

pub const BACKEND: &str = "default/echo";

/// A loopback address where an HTTP/2 server answers every request at once with a
/// trailers-only gRPC response, so that warm-ups succeed. It serves until the test ends.
pub async fn answering() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
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
            });
        }
    });
    address
}

/// A loopback address where nothing listens: connections to it are refused.
pub fn refusing() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local address")
}

pub fn config(outlier_detection: OutlierDetection, panic_threshold: u8) -> PoolConfig {
    PoolConfig {
        template: Arc::new(|endpoint| Ok(endpoint.connect_timeout(Duration::from_secs(5)))),
        tls: false,
        outlier_detection,
        panic_threshold,
        transparent_retry: true,
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
