//! One backend endpoint: its connection (a tonic `Channel` to that one address) and counters.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tower::ServiceExt;

use crate::{
    connection::{ConnectionSlot, Dial},
    failure::{Failure, classify},
    outlier::IntervalCounts,
};

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
    /// Requests that failed before a response (any reason).
    pub failures: AtomicU64,
    pub ejections: AtomicU64,
    /// Connections made to this endpoint, and those of them that have ended (fully closed:
    /// nothing more can be written on them). Counted on plaintext connections only, whose
    /// stream this crate wraps.
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    /// Outlier detection's counts for the current interval: responses, and failures that are
    /// evidence against the endpoint (see [`crate::failure`]).
    interval_successes: AtomicU64,
    interval_failures: AtomicU64,
    /// Connection attempts that failed in a row.
    consecutive_connect_failures: AtomicU32,
}

impl EndpointStats {
    /// Takes the current interval's counts and starts the next interval.
    pub fn take_interval(&self) -> IntervalCounts {
        IntervalCounts {
            successes: self.interval_successes.swap(0, Ordering::Relaxed),
            failures: self.interval_failures.swap(0, Ordering::Relaxed),
        }
    }

    fn succeeded(&self) {
        self.interval_successes.fetch_add(1, Ordering::Relaxed);
        // Most requests succeed on an endpoint that connects: do not write the shared line.
        if self.consecutive_connect_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; returns how many connection attempts failed in a row.
    fn failed(&self, failure: Failure) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if failure.is_evidence() {
            self.interval_failures.fetch_add(1, Ordering::Relaxed);
        }
        if failure == Failure::Connect {
            self.consecutive_connect_failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_connect_failures.load(Ordering::Relaxed)
        }
    }
}

/// A request that failed before a response, and what that says about the endpoint.
pub struct SendError {
    pub error: tonic::transport::Error,
    pub failure: Failure,
    /// Connection attempts to this endpoint that failed in a row, this one included.
    pub consecutive_connect_failures: u32,
}

/// A connection to one endpoint. Dropped from the pool when the endpoint leaves rotation;
/// requests in flight keep their own clone of the channel, so they finish (drain).
pub struct Endpoint {
    pub address: SocketAddr,
    connection: Arc<ConnectionSlot>,
    pub stats: Arc<EndpointStats>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("address", &self.address).finish()
    }
}

impl Endpoint {
    /// A connection to `address`, made on first use (with `dial`).
    pub fn new(
        address: SocketAddr,
        tls: bool,
        template: &EndpointTemplate,
        dial: &Dial,
        stats: Arc<EndpointStats>,
    ) -> Result<Self, tonic::transport::Error> {
        let scheme = if tls { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))?.tcp_nodelay(true);
        let endpoint = template(endpoint)?;
        // TLS is applied over the stream, so only plaintext frames can be watched for GOAWAY.
        let watch_frames = !tls && endpoint.uri().scheme_str() != Some("https");
        Ok(Self {
            address,
            connection: ConnectionSlot::new(address, endpoint, watch_frames, dial.clone(), stats.clone()),
            stats,
        })
    }

    /// Opens the connection now rather than on the first request, with one
    /// `grpc.health.v1.Health/Check` (what gRPC's client-side health checking sends; the answer
    /// does not matter here, the operator owns health). Fails only at the transport level.
    pub async fn warm_up(&self) -> Result<(), tonic::transport::Error> {
        let channel = self.connection.current().channel.clone();
        warm_up(channel).await
    }

    /// Sends one request; counts it in flight until its response body ends or is dropped.
    pub async fn send(&self, request: http::Request<Body>) -> Result<http::Response<Body>, SendError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(self.stats.clone());
        let connection = self.connection.current().clone();
        match connection.channel.clone().oneshot(request).await {
            Ok(response) => {
                self.stats.succeeded();
                Ok(response.map(|body| {
                    Body::new(TrackedBody {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
            Err(error) => {
                let mut failure = classify(&error);
                if failure == Failure::Transport && connection.is_draining() {
                    // The server is rotating this connection; whether it processed the request
                    // is unknown (its grace period may have cut it).
                    failure = Failure::Drained;
                }
                let consecutive_connect_failures = self.stats.failed(failure);
                Err(SendError {
                    error,
                    failure,
                    consecutive_connect_failures,
                })
            }
        }
    }
}

/// One `grpc.health.v1.Health/Check` on `channel`, to open its connection (what gRPC's
/// client-side health checking sends; the answer does not matter here, the operator owns
/// health). Fails only at the transport level.
pub async fn warm_up(channel: tonic::transport::Channel) -> Result<(), tonic::transport::Error> {
    // An empty HealthCheckRequest: the 5-byte gRPC frame header of a 0-byte message.
    let frame = String::from("\0\0\0\0\0");
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Body::new(frame))
        .unwrap_or_default();
    channel.oneshot(request).await.map(drop)
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

/// How much of a request body is kept for a transparent retry (gRPC's retry buffer; grpc-go
/// keeps 256 KiB per call). A larger body is not retried once the transport has read it.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body that can be sent again: untouched if the transport never read it, or
/// replayed from what it read, up to [`REPLAY_LIMIT`], when it read all of it. A request that
/// certainly never reached the application (a refused stream, a GOAWAY that left it out, no
/// connection) is safe to send again even though its body was read.
pub struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    reading: Option<Body>,
}

#[derive(Default)]
struct ReplayState {
    /// The body until the transport first polls it.
    untouched: Option<Body>,
    /// What was read so far, while it fits: the first chunk apart, so that the usual unary
    /// body (one chunk) costs no allocation to keep.
    first: Option<Bytes>,
    more: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
    size: usize,
    complete: bool,
    overflow: bool,
}

impl ReplayBody {
    /// The body to send, and the handle that gets it back for another attempt.
    pub fn new(body: Body) -> (Self, Replay) {
        let state = Arc::new(Mutex::new(ReplayState {
            untouched: Some(body),
            ..ReplayState::default()
        }));
        (
            Self {
                state: state.clone(),
                reading: None,
            },
            Replay(state),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Gets a request body back for another attempt.
pub struct Replay(Arc<Mutex<ReplayState>>);

impl Replay {
    /// The body, if the transport never read any of it.
    pub fn unread(self) -> Option<Body> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .untouched
            .take()
    }

    /// The body if it was never read, else its copy if it was read whole and fitted the limit.
    pub fn replayable(self) -> Option<Body> {
        let mut state = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(body) = state.untouched.take() {
            return Some(body);
        }
        if !state.complete || state.overflow {
            return None;
        }
        let data = state.first.take().into_iter().chain(std::mem::take(&mut state.more));
        let trailers = state.trailers.take();
        let frames = data
            .map(|bytes| Ok::<_, tonic::Status>(Frame::data(bytes)))
            .chain(trailers.map(|t| Ok(Frame::trailers(t))));
        Some(Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        ))))
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.reading.is_none() {
            let body = self.lock().untouched.take();
            match body {
                Some(body) => self.reading = Some(body),
                None => return Poll::Ready(None),
            }
        }
        let Some(body) = self.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        // hyper stops polling a body that says it has ended after a frame: that is its end.
        let ended = self.reading.as_ref().is_some_and(HttpBody::is_end_stream);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut state = self.lock();
                state.complete |= ended || frame.is_trailers();
                if let Some(data) = frame.data_ref() {
                    state.size += data.len();
                    if state.size > REPLAY_LIMIT {
                        state.overflow = true;
                        state.first = None;
                        state.more = Vec::new();
                    } else if !state.overflow {
                        match state.first {
                            None => state.first = Some(data.clone()),
                            Some(_) => state.more.push(data.clone()),
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                }
            }
            Poll::Ready(None) => self.lock().complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.reading {
            Some(body) => body.is_end_stream(),
            None => self
                .lock()
                .untouched
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reading {
            Some(body) => body.size_hint(),
            None => self
                .lock()
                .untouched
                .as_ref()
                .map(http_body::Body::size_hint)
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn read_all(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn an_unread_body_comes_back_as_it_was() {
        let (_sent, replay) = ReplayBody::new(Body::new(String::from("hello")));
        assert_eq!(read_all(replay.unread().unwrap()).await, b"hello");
    }

    #[tokio::test]
    async fn a_body_read_whole_is_replayed_but_not_given_back_as_unread() {
        let (sent, replay) = ReplayBody::new(Body::new(String::from("hello")));
        assert_eq!(read_all(Body::new(sent)).await, b"hello");
        assert_eq!(read_all(replay.replayable().unwrap()).await, b"hello");

        let (sent, replay) = ReplayBody::new(Body::new(String::from("hello")));
        let _ = read_all(Body::new(sent)).await;
        assert!(replay.unread().is_none(), "read: it may have reached the server");
    }

    #[tokio::test]
    async fn a_body_read_up_to_a_frame_after_which_it_says_it_ended_is_replayed() {
        // hyper sends END_STREAM with the frame after which the body says it has ended, and
        // polls it no more: that body was read whole.
        let (mut sent, replay) = ReplayBody::new(Body::new(http_body_util::Full::new(Bytes::from_static(b"hello"))));
        let first = std::future::poll_fn(|cx| Pin::new(&mut sent).poll_frame(cx)).await;
        assert!(first.is_some_and(|frame| frame.is_ok()));
        assert!(sent.is_end_stream());
        assert_eq!(read_all(replay.replayable().expect("kept whole")).await, b"hello");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_read_in_part_is_not_replayed() {
        let big = "x".repeat(REPLAY_LIMIT + 1);
        let (sent, replay) = ReplayBody::new(Body::new(big));
        let _ = read_all(Body::new(sent)).await;
        assert!(replay.replayable().is_none());

        let chunks = futures::stream::iter([
            Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]);
        let (mut sent, replay) = ReplayBody::new(Body::new(http_body_util::StreamBody::new(chunks)));
        let first = std::future::poll_fn(|cx| Pin::new(&mut sent).poll_frame(cx)).await;
        assert!(first.is_some());
        assert!(replay.replayable().is_none(), "only part of it was read");
    }
}
