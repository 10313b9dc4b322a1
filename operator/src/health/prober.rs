//! One long-lived prober per endpoint, speaking `grpc.health.v1.Health`.
//!
//! In `Watch` mode the prober keeps one stream open, so a NOT_SERVING flip arrives as it
//! happens. A quiet stream proves nothing about a frozen process or a silent network, so every
//! `interval` without a message on the stream the prober sends one `Check` on the same
//! connection, bounded by `timeout`: no answer in time is a failed probe.
//!
//! Why a `Check` and not HTTP/2 keepalive PINGs: grpc-go and grpc-java servers police PINGs by
//! default (one per 5 minutes while no data flows from the server; two strikes and the server
//! answers GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and closes the connection). A `Check`
//! is a request the server answers with HEADERS and DATA, which every gRPC server accepts at any
//! rate, and it proves more than a PING: the server's health service itself answered. The
//! prober therefore sends no PING at all.
//!
//! Connection rotation is routine: a server that sends GOAWAY (graceful shutdown of a
//! connection, `MaxConnectionAge`) or closes a connection after its age ends the stream on a
//! connection that answered. The prober reconnects at once and counts nothing; only if the new
//! connection does not answer is a failure counted. A stream that breaks again within one
//! `interval` of the previous rotation is counted as a failure, so a server that answers once
//! and then drops every connection cannot stay Serving.
//!
//! A server that answers `Watch` with UNIMPLEMENTED is polled with `Check` instead, as is every
//! endpoint in `Check` mode.
//!
//! After a failure the prober retries with exponential backoff (from 100ms, jittered, never
//! more than `interval`), so that a blip is retried at once and a dead endpoint is not
//! hammered. One attempt (connect, then the first answer) is bounded by `timeout` as a whole.
//! So a Serving endpoint that stops answering is published NotServing at most
//! `unhealthyThreshold x (interval + timeout)` after it stopped.
//!
//! The prober ends when its handle is dropped.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kubegrpc_crds::HealthCheckMode;
use tokio::{sync::watch, time::Instant};
use tokio_util::task::AbortOnDropHandle;
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus};

use super::tracker::{Failure, HealthTracker, HealthVerdict, NotServingAnswer, ProbeOutcome, Thresholds};

/// How an endpoint is probed: from the GrpcBackend's `spec.healthCheck`. A change restarts the
/// GrpcBackend's probers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub service: String,
    pub mode: HealthCheckMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
}

/// What a prober publishes: the verdict and whether the latest probe failed at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeState {
    pub verdict: HealthVerdict,
    pub connect_failing: bool,
    /// When the prober started, and whether its first probe has ended: a status write may wait
    /// a moment for a new endpoint's first answer rather than publish it as Unknown first.
    pub started: Instant,
    pub probed: bool,
}

/// Where a prober reports its probes (metrics) and its state changes (a reconcile trigger).
pub trait ProbeObserver: Send + Sync + 'static {
    /// A probe ended with `outcome`; `latency` is set when the health service answered.
    fn probed(&self, outcome: ProbeOutcome, latency: Option<Duration>);
    /// The prober's [`ProbeState`] changed.
    fn changed(&self);
    /// The server rotated the prober's connection (GOAWAY, connection age) after answering on
    /// it: the prober reconnected without counting a failure.
    fn rotated(&self) {}
}

/// A running prober; dropping it stops the prober and closes its connection.
pub struct ProberHandle {
    state: watch::Receiver<ProbeState>,
    _task: AbortOnDropHandle<()>,
}

impl ProberHandle {
    pub fn state(&self) -> ProbeState {
        self.state.borrow().clone()
    }
}

/// At most this many probe connections are being opened at once, operator-wide: a restart or
/// a new leader opens one per endpoint, and thousands of handshakes at once would time out
/// probes of healthy endpoints (a false flap that every client sees). Waiting for a turn does
/// not count against the probe timeout.
pub const MAX_CONCURRENT_CONNECTS: usize = 64;

/// Limits how many probe connections are being opened at once (see
/// [`MAX_CONCURRENT_CONNECTS`]); shared by every prober of an operator.
pub type ConnectLimiter = Arc<tokio::sync::Semaphore>;

/// A limiter of [`MAX_CONCURRENT_CONNECTS`].
pub fn connect_limiter() -> ConnectLimiter {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CONNECTS))
}

/// Starts probing `target`, starting from `initial` (see [`HealthTracker::new`]).
pub fn spawn(
    target: SocketAddr,
    settings: ProbeSettings,
    initial: HealthVerdict,
    observer: Arc<dyn ProbeObserver>,
    connects: ConnectLimiter,
) -> ProberHandle {
    let tracker = HealthTracker::new(initial.clone(), settings.thresholds);
    let (state_tx, state) = watch::channel(ProbeState {
        verdict: initial,
        connect_failing: false,
        started: Instant::now(),
        probed: false,
    });
    let prober = Prober {
        target,
        backoff: backoff(settings.interval),
        settings,
        tracker,
        state: state_tx,
        observer,
        last_rotation: None,
        connects,
    };
    ProberHandle {
        state,
        _task: AbortOnDropHandle::new(tokio::spawn(prober.run())),
    }
}

struct Prober {
    target: SocketAddr,
    settings: ProbeSettings,
    tracker: HealthTracker,
    state: watch::Sender<ProbeState>,
    observer: Arc<dyn ProbeObserver>,
    backoff: ExponentialBackoff,
    /// When the server last rotated the connection without a failure being counted.
    last_rotation: Option<Instant>,
    connects: ConnectLimiter,
}

/// Why a connection's probing ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The server does not implement `Watch`: poll with `Check` on the same connection.
    WatchUnimplemented,
    /// The connection answered, then the server ended the stream or the connection (GOAWAY,
    /// connection age): reconnect at once.
    Rotated,
    /// Record the failure and reconnect after backoff.
    Failed(Failure),
}

impl Prober {
    async fn run(mut self) {
        let mut watch_implemented = self.settings.mode == HealthCheckMode::Watch;
        loop {
            // A turn to connect, held until the connection answered or failed.
            let Ok(turn) = self.connects.clone().acquire_owned().await else {
                return;
            };
            let attempt_deadline = Instant::now() + self.settings.timeout;
            let mut ended = match self.connect(attempt_deadline).await {
                Err(failure) => {
                    drop(turn);
                    Ended::Failed(failure)
                }
                Ok(mut client) => {
                    let ended = if watch_implemented {
                        self.watch(&mut client, attempt_deadline, turn).await
                    } else {
                        drop(turn);
                        Ended::WatchUnimplemented
                    };
                    if ended == Ended::WatchUnimplemented {
                        watch_implemented = false;
                        self.poll(&mut client).await
                    } else {
                        ended
                    }
                }
            };
            if ended == Ended::Rotated {
                let now = Instant::now();
                let recently = self
                    .last_rotation
                    .is_some_and(|last| now.duration_since(last) < self.settings.interval);
                if recently {
                    ended = Ended::Failed(Failure::StreamBroken);
                } else {
                    self.last_rotation = Some(now);
                    self.observer.rotated();
                    continue;
                }
            }
            if let Ended::Failed(failure) = ended {
                self.record(ProbeOutcome::Failed(failure), None);
            }
            let delay = self.backoff.next().unwrap_or(self.settings.interval);
            tokio::time::sleep(delay.min(self.settings.interval)).await;
        }
    }

    /// A new connection (no HTTP/2 keepalive: see the module docs), by `deadline`.
    async fn connect(&self, deadline: Instant) -> Result<HealthCalls, Failure> {
        connect(self.target, deadline).await
    }

    /// Follows one `Watch` stream, with a liveness `Check` each quiet interval, until it ends.
    async fn watch(
        &mut self,
        client: &mut HealthCalls,
        deadline: Instant,
        turn: tokio::sync::OwnedSemaphorePermit,
    ) -> Ended {
        let started = Instant::now();
        let mut stream = match tokio::time::timeout_at(deadline, client.watch(self.request())).await {
            Err(_) => return Ended::Failed(Failure::Timeout),
            Ok(Err(status)) if status.code() == Code::Unimplemented => return Ended::WatchUnimplemented,
            Ok(Err(status)) => return Ended::Failed(call_failure(&status)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let first = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return Ended::Failed(Failure::Timeout),
            Ok(Err(status)) if status.code() == Code::Unimplemented => return Ended::WatchUnimplemented,
            Ok(Err(status)) => return Ended::Failed(call_failure(&status)),
            Ok(Ok(None)) => return Ended::Failed(Failure::StreamBroken),
            Ok(Ok(Some(first))) => first,
        };
        drop(turn);
        self.answered(answer(&first), started);

        let mut heard_since_tick = false;
        let mut tick = tokio::time::interval_at(Instant::now() + self.settings.interval, self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        heard_since_tick = true;
                        self.record(answer(&response), None);
                    }
                    // The stream ended on a connection that answered: the server let it go
                    // (GOAWAY, connection age, a graceful stop). Whether the endpoint is still
                    // there is for the next connection to say.
                    Ok(None) | Err(_) => return Ended::Rotated,
                },
                _ = tick.tick() => {
                    if std::mem::take(&mut heard_since_tick) {
                        continue;
                    }
                    match self.check(client).await {
                        Liveness::Answered(outcome, started) => self.answered(outcome, started),
                        // The server answered the call with an error: alive. The Watch stream
                        // carries the health.
                        Liveness::Alive => {}
                        Liveness::Silent => return Ended::Failed(Failure::Timeout),
                        Liveness::ConnectionGone => return Ended::Rotated,
                    }
                }
            }
        }
    }

    /// Polls with `Check` every interval until the connection stops answering.
    async fn poll(&mut self, client: &mut HealthCalls) -> Ended {
        loop {
            let started = Instant::now();
            match self.check(client).await {
                Liveness::Answered(outcome, started) => self.answered(outcome, started),
                Liveness::Alive => self.record(ProbeOutcome::Failed(Failure::CallFailed), Some(started.elapsed())),
                Liveness::Silent => return Ended::Failed(Failure::Timeout),
                Liveness::ConnectionGone => return Ended::Rotated,
            }
            tokio::time::sleep_until(started + self.settings.interval).await;
        }
    }

    /// One `Check`, bounded by `timeout`.
    async fn check(&self, client: &mut HealthCalls) -> Liveness {
        let started = Instant::now();
        match tokio::time::timeout(self.settings.timeout, client.check(self.request())).await {
            Err(_) => Liveness::Silent,
            Ok(Ok(response)) => Liveness::Answered(answer(response.get_ref()), started),
            // The protocol: Check on an unknown service answers NOT_FOUND.
            Ok(Err(status)) if status.code() == Code::NotFound => {
                Liveness::Answered(ProbeOutcome::NotServing(NotServingAnswer::NotFound), started)
            }
            Ok(Err(status)) => match call_failure(&status) {
                Failure::StreamBroken => Liveness::ConnectionGone,
                Failure::Timeout => Liveness::Silent,
                _ => Liveness::Alive,
            },
        }
    }

    fn request(&self) -> HealthCheckRequest {
        HealthCheckRequest {
            service: self.settings.service.clone(),
        }
    }

    /// The health service answered a probe that started at `started`.
    fn answered(&mut self, outcome: ProbeOutcome, started: Instant) {
        self.record(outcome, Some(started.elapsed()));
        self.backoff = backoff(self.settings.interval);
    }

    fn record(&mut self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.observer.probed(outcome, latency);
        let changed = self.tracker.observe(outcome);
        let first = !self.state.borrow().probed;
        if changed || first {
            let started = self.state.borrow().started;
            self.state.send_replace(ProbeState {
                verdict: self.tracker.verdict().clone(),
                connect_failing: self.tracker.connect_failing(),
                started,
                probed: true,
            });
            self.observer.changed();
        }
    }
}

/// What one `Check` showed about the connection.
enum Liveness {
    /// The health service answered (started at the instant given).
    Answered(ProbeOutcome, Instant),
    /// The server answered with another error: it is alive.
    Alive,
    /// No answer within the timeout.
    Silent,
    /// The connection is gone (closed, GOAWAY, reset).
    ConnectionGone,
}

fn answer(response: &HealthCheckResponse) -> ProbeOutcome {
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => ProbeOutcome::Serving,
        Ok(ServingStatus::NotServing) => ProbeOutcome::NotServing(NotServingAnswer::NotServing),
        Ok(ServingStatus::ServiceUnknown) => ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown),
        Ok(ServingStatus::Unknown) | Err(_) => ProbeOutcome::NotServing(NotServingAnswer::Unknown),
    }
}

/// A failed call: transport-level codes mean the connection is gone.
fn call_failure(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal => Failure::StreamBroken,
        Code::DeadlineExceeded => Failure::Timeout,
        _ => Failure::CallFailed,
    }
}

/// A new bare HTTP/2 connection to `target` (no keepalive PINGs), by `deadline`.
async fn connect(target: SocketAddr, deadline: Instant) -> Result<HealthCalls, Failure> {
    let connected = tokio::time::timeout_at(deadline, async {
        let stream = tokio::net::TcpStream::connect(target).await.map_err(|error| {
            if error.kind() == std::io::ErrorKind::TimedOut {
                Failure::ConnectTimeout
            } else {
                Failure::ConnectFailed
            }
        })?;
        stream.set_nodelay(true).map_err(|_| Failure::ConnectFailed)?;
        let (send, connection) = h2::client::handshake(stream)
            .await
            .map_err(|_| Failure::ConnectFailed)?;
        // The connection runs until the server closes it or `send` and every call are
        // dropped (the prober's connection ends with it).
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(send)
    })
    .await;
    match connected {
        Ok(Ok(send)) => HealthCalls::new(send, target).map_err(|_| Failure::ConnectFailed),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(Failure::ConnectTimeout),
    }
}

/// `grpc.health.v1.Health` calls on one connection, with small codec buffers: tonic's
/// generated client allocates 8 KiB per call and keeps it for a `Watch` stream's whole life,
/// once per endpoint, for messages of a few bytes. The connection is a bare h2 one: tonic's
/// `Channel` adds a request buffer (its first block is allocated at once), a reconnect layer
/// and tasks that a prober, which reconnects by itself, does not use.
struct HealthCalls {
    grpc: tonic::client::Grpc<Http2Connection>,
}

/// Bytes a health call's encode and decode buffers start with (they grow if a message needs).
const HEALTH_CODEC_BUFFER: usize = 256;

impl HealthCalls {
    fn new(send: h2::client::SendRequest<bytes::Bytes>, target: SocketAddr) -> Result<Self, http::uri::InvalidUri> {
        let origin: http::Uri = format!("http://{target}").parse()?;
        Ok(Self {
            grpc: tonic::client::Grpc::with_origin(Http2Connection(send), origin),
        })
    }

    async fn check(&mut self, request: HealthCheckRequest) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
        self.grpc
            .unary(tonic::Request::new(request), path, SmallBuffers::default())
            .await
    }

    async fn watch(
        &mut self,
        request: HealthCheckRequest,
    ) -> Result<tonic::Response<tonic::Streaming<HealthCheckResponse>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Watch");
        self.grpc
            .server_streaming(tonic::Request::new(request), path, SmallBuffers::default())
            .await
    }

    /// As tonic's generated clients do: a connection that cannot take a call is UNKNOWN.
    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|error| Status::unknown(format!("Service was not ready: {error}")))
    }
}

/// One h2 connection as the tower service tonic's `Grpc` drives, each request sent with the
/// prober's user agent. h2 without hyper's client on top: hyper adds a request channel per
/// connection (8.5 KiB, allocated at once) and a task, for a connection that carries one Watch
/// stream and a Check now and then. A health request is one small message: its body is read
/// whole and sent with the headers.
struct Http2Connection(h2::client::SendRequest<bytes::Bytes>);

impl tower::Service<http::Request<tonic::body::Body>> for Http2Connection {
    type Response = http::Response<ResponseBody>;
    type Error = tonic::codegen::StdError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut send = self.0.clone();
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            parts.headers.insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static(concat!("kubegrpc-operator/", env!("CARGO_PKG_VERSION"))),
            );
            let data = http_body_util::BodyExt::collect(body).await?.to_bytes();
            let (response, mut stream) = send.send_request(http::Request::from_parts(parts, ()), data.is_empty())?;
            if !data.is_empty() {
                stream.send_data(data, true)?;
            }
            Ok(response.await?.map(ResponseBody::new))
        })
    }
}

/// An h2 response body as an `http_body::Body`: its data, then its trailers (where gRPC puts
/// the call's status). Received data is given back to flow control as it is read.
struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl ResponseBody {
    fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(error)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = std::task::ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(http_body::Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The prost codec with [`HEALTH_CODEC_BUFFER`]-byte buffers.
struct SmallBuffers<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(tonic::codec::BufferSettings::new(HEALTH_CODEC_BUFFER, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(tonic::codec::BufferSettings::new(HEALTH_CODEC_BUFFER, 32 * 1024))
    }
}

/// Reconnect delays: from 100ms, doubling, with jitter (so that the probers of many endpoints
/// do not retry in lockstep); the caller caps each at the probe interval.
fn backoff(interval: Duration) -> ExponentialBackoff {
    let min = Duration::from_millis(100).min(interval);
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay((interval / 2).max(min))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn transport_codes_mean_the_connection_is_gone() {
        assert_eq!(call_failure(&Status::unavailable("goaway")), Failure::StreamBroken);
        assert_eq!(call_failure(&Status::deadline_exceeded("slow")), Failure::Timeout);
        assert_eq!(call_failure(&Status::permission_denied("no")), Failure::CallFailed);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        // A port nothing listens on, on loopback: refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(connect(address, deadline).await.err(), Some(Failure::ConnectFailed));
    }

    #[tokio::test]
    async fn check_and_watch_are_answered_on_one_bare_connection() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _server = AbortOnDropHandle::new(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut calls = connect(address, deadline).await.unwrap();
        let request = || HealthCheckRequest { service: String::new() };
        let checked = calls.check(request()).await.unwrap().into_inner();
        assert_eq!(checked.status, ServingStatus::Serving as i32);
        let mut stream = calls.watch(request()).await.unwrap().into_inner();
        assert_eq!(
            stream.message().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32
        );
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(
            stream.message().await.unwrap().unwrap().status,
            ServingStatus::NotServing as i32
        );
        let unknown = calls
            .check(HealthCheckRequest { service: "nope".into() })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
    }
}
