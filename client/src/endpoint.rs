//! One backend endpoint: its connection (a tonic `Channel` to that one address) and counters.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tower::ServiceExt;

/// A template for the per-endpoint connection settings: given an `Endpoint` for one address,
/// returns it configured (timeouts, keepalive, TLS...).
pub type EndpointTemplate = Arc<
    dyn Fn(tonic::transport::Endpoint) -> Result<tonic::transport::Endpoint, tonic::transport::Error> + Send + Sync,
>;

/// Per-endpoint counters, kept while the endpoint is in the status.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub ejections: AtomicU64,
}

/// A connection to one endpoint. Dropped from the pool when the endpoint leaves rotation;
/// requests in flight keep their own clone of the channel, so they finish (drain).
pub struct Endpoint {
    pub address: SocketAddr,
    channel: tonic::transport::Channel,
    pub stats: Arc<EndpointStats>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("address", &self.address).finish()
    }
}

impl Endpoint {
    /// A connection to `address`, made on first use.
    pub fn new(
        address: SocketAddr,
        tls: bool,
        template: &EndpointTemplate,
        stats: Arc<EndpointStats>,
    ) -> Result<Self, tonic::transport::Error> {
        let scheme = if tls { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))?.tcp_nodelay(true);
        let channel = template(endpoint)?.connect_lazy();
        Ok(Self {
            address,
            channel,
            stats,
        })
    }

    /// Opens the connection now rather than on the first request, with one
    /// `grpc.health.v1.Health/Check` (what gRPC's client-side health checking sends; the answer
    /// does not matter here, the operator owns health). Fails only at the transport level.
    pub async fn warm_up(&self) -> Result<(), tonic::transport::Error> {
        // An empty HealthCheckRequest: the 5-byte gRPC frame header of a 0-byte message.
        let frame = String::from("\0\0\0\0\0");
        let request = http::Request::post("/grpc.health.v1.Health/Check")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Body::new(frame))
            .unwrap_or_default();
        self.channel.clone().oneshot(request).await.map(drop)
    }

    /// Sends one request; counts it in flight until its response body ends or is dropped.
    pub async fn send(&self, request: http::Request<Body>) -> Result<http::Response<Body>, tonic::transport::Error> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(self.stats.clone());
        match self.channel.clone().oneshot(request).await {
            Ok(response) => Ok(response.map(|body| {
                Body::new(TrackedBody {
                    body,
                    _in_flight: in_flight,
                })
            })),
            Err(error) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<EndpointStats>);

impl InFlight {
    fn new(stats: Arc<EndpointStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight until it ends.
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that can be taken back if it was never read: then nothing of the request
/// reached a backend, and it may go to another endpoint (gRPC's transparent retry).
pub struct RecoverableBody {
    slot: Arc<Mutex<Option<Body>>>,
    taken: Option<Body>,
}

impl RecoverableBody {
    /// The body to send, and the handle that gets it back if it was never read.
    pub fn new(body: Body) -> (Self, Unread) {
        let slot = Arc::new(Mutex::new(Some(body)));
        (
            Self {
                slot: slot.clone(),
                taken: None,
            },
            Unread(slot),
        )
    }
}

/// Gives the body back if nothing of it was read.
pub struct Unread(Arc<Mutex<Option<Body>>>);

impl Unread {
    pub fn take(self) -> Option<Body> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl HttpBody for RecoverableBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.taken.is_none() {
            let body = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            match body {
                Some(body) => self.taken = Some(body),
                None => return Poll::Ready(None),
            }
        }
        match self.taken.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(body) => body.is_end_stream(),
            None => self
                .slot
                .lock()
                .map(|slot| slot.as_ref().is_none_or(|b| b.is_end_stream()))
                .unwrap_or(false),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(body) => body.size_hint(),
            None => self
                .slot
                .lock()
                .ok()
                .and_then(|slot| slot.as_ref().map(|b| b.size_hint()))
                .unwrap_or_default(),
        }
    }
}
