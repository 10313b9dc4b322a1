//! One long-lived prober per endpoint, speaking `grpc.health.v1.Health`.
//!
//! In `Watch` mode the prober keeps one stream open, so a NOT_SERVING flip arrives as it
//! happens. A quiet stream proves nothing about a frozen process or a silent network, so every
//! `interval` without a message on the stream the prober sends one `Check` on the same
//! connection, bounded by `timeout`: no answer in time is a failed probe, and an answer with an
//! error status (PERMISSION_DENIED, UNIMPLEMENTED...) is a failed probe too.
//!
//! Why a `Check` and not HTTP/2 keepalive PINGs: grpc-go and grpc-java servers police PINGs by
//! default (one per 5 minutes while no data flows from the server; two strikes and the server
//! answers GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and closes the connection). A `Check`
//! is a request the server answers with HEADERS and DATA, which every gRPC server accepts at any
//! rate, and it proves more than a PING: the server's health service itself answered. The
//! prober therefore sends no PING at all.
//!
//! A server that answers `Watch` with UNIMPLEMENTED is polled with `Check` instead, as is every
//! endpoint in `Check` mode; `Watch` is asked for again on each new connection and every 30
//! polls, so that a backend that gains it gets it. Between polls the connection is still read
//! (PINGs answered, GOAWAY seen when it comes). The server's SETTINGS_MAX_CONCURRENT_STREAMS is
//! honoured: the liveness `Check` has room first, so a server allowing 2 streams gets `Watch`
//! and `Check` without the ORCA stream, and one allowing 1 is polled.
//!
//! # Connections that end
//!
//! How a connection that answered ends decides what it counts:
//! - **Always a failure**, whatever the connection's age: a protocol error (bad frames, header
//!   blocks or messages, HTTP/1 bytes), a message or frame over the limits (`MessageTooLarge`),
//!   a GOAWAY with an error code (`GoAway(ENHANCE_YOUR_CALM)`...), no answer to the liveness
//!   `Check` within `timeout` (`Timeout`), an error status to it (`CallFailed(..)`,
//!   `Unimplemented`).
//! - **Routine rotation** when it ends gracefully (GOAWAY NO_ERROR, `MaxConnectionAge`, a
//!   close, a reset or ended stream) at least `interval` after its first answer: nothing is
//!   counted and the prober reconnects at once.
//! - **Early end** when it ends that way less than `interval` after its first answer: a failure
//!   (`GoAway(NO_ERROR)`, `Reset(..)`, or `Unstable` for a close or an ended stream).
//!
//! After a connection that had answered fails or ends early, failures count across connections:
//! a SERVING answer on the next connection neither resets the failure count nor counts toward
//! `healthyThreshold` until that connection has stayed up for `interval` (its next liveness
//! tick finds it alive, see [`HealthTracker::confirm`]). A new endpoint with no such history
//! is Serving on its first answer. So a backend that answers SERVING on every new connection
//! and then breaks it (GOAWAY or RST_STREAM right after the answer, silence, a byte now and
//! then, garbage, an oversized frame, HTTP/1 bytes) reaches the unhealthy threshold as one that
//! refuses connections does.
//!
//! # Bounds
//!
//! After a failure the prober retries with exponential backoff (from 100ms, jittered, at most
//! `interval / 2`), so that a blip is retried at once and a dead endpoint is not hammered; a
//! connection that lived at least `interval` is replaced at once. One attempt (connect, then
//! the first answer) is bounded by `timeout` as a whole. With `unhealthyThreshold` N, a Serving
//! endpoint is published NotServing within about N x (`interval` + `timeout`) of when it
//! stopped answering or started misbehaving in any of the ways above: a silent one fails once
//! per `interval + timeout` (a quiet interval, then the liveness Check's timeout), one that
//! breaks its connections after answering fails once per reconnect (at most `interval / 2`
//! apart), one whose liveness Check fails once per `interval`.
//!
//! Under the `LoadReport` policy the prober also opens ORCA's out-of-band load-report stream
//! (`OpenRcaService/StreamCoreMetrics`) on the same connection once the health service has
//! answered, and keeps each report in its state (gRFC A58's weight state, see
//! [`crate::weights::LoadWeight`]). A server without ORCA answers UNIMPLEMENTED: it is not
//! asked again, and gets the mean weight. A reconnect after a failure restarts the blackout,
//! as A58 does on a reconnect; a routine rotation does not (the backend did not restart).
//!
//! The prober ends when its handle is dropped.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use kubegrpc_crds::HealthCheckMode;
use tokio::{sync::watch, time::Instant};
use tokio_util::task::AbortOnDropHandle;

pub use self::limiter::{
    ConnectLimiter, MAX_CONCURRENT_CONNECTS, MAX_CONCURRENT_RETRIES, MAX_TURN, connect_limiter, retry_limiter,
};
use self::{publish::Publisher, task::Prober};
use super::{
    tls::ProbeTls,
    tracker::{HealthTracker, HealthVerdict, ProbeOutcome, Thresholds},
};
use crate::weights::LoadWeight;

mod limiter;
mod publish;
mod task;

/// How an endpoint is probed: from the GrpcBackend's `spec.healthCheck`. A change restarts the
/// GrpcBackend's probers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub service: String,
    pub mode: HealthCheckMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
    /// Under the `LoadReport` policy: the ORCA stream's report interval and when a weight
    /// expires.
    pub load_reports: Option<LoadReportSettings>,
    /// TLS to the endpoints (`spec.tls`); plaintext when `None`.
    pub tls: Option<ProbeTls>,
}

/// What the prober needs of `spec.weighting.loadReport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadReportSettings {
    pub interval: Duration,
    pub weight_expiration_period: Duration,
}

/// What a prober publishes: the verdict and whether the latest probe failed at connect time.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeState {
    pub verdict: HealthVerdict,
    pub connect_failing: bool,
    /// When the prober started, and whether its first probe has ended: a status write may wait
    /// a moment for a new endpoint's first answer rather than publish it as Unknown first.
    pub started: Instant,
    pub probed: bool,
    /// The endpoint's load reports (`LoadReport` policy only).
    pub load: LoadWeight,
    /// The server answered the load-report stream with UNIMPLEMENTED.
    pub load_reports_unimplemented: bool,
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
    /// A connection ended less than an interval after its first answer: counted as a failure.
    fn ended_early(&self) {}
    /// The GrpcBackend the prober works for (`namespace/name`), as the `backend` field of the
    /// prober's log span; the field is left out without one.
    fn backend(&self) -> Option<&dyn std::fmt::Display> {
        None
    }
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

/// What every prober of an operator shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// Connect turns of new and healthy endpoints (see [`MAX_CONCURRENT_CONNECTS`]).
    pub connects: ConnectLimiter,
    /// Connect turns of endpoints retrying after a failure.
    pub retries: ConnectLimiter,
    /// The local address probe connections are bound to, if any (see
    /// [`super::connection::HealthConnection::connect_from`]).
    pub source_address: Option<IpAddr>,
    /// How connections are opened.
    pub connector: Connector,
    /// The least time between two status writes of one GrpcBackend: verdict changes are damped
    /// and notices paced on that scale (see [`HealthTracker`]).
    pub write_interval: Duration,
}

/// How probe connections are opened: TCP, or in-memory streams in tests.
#[derive(Clone, Default)]
pub enum Connector {
    #[default]
    Tcp,
    /// Each connect calls the function with the target (tests of the prober over in-memory
    /// streams, on paused time).
    #[cfg(test)]
    Memory(Arc<dyn Fn(SocketAddr) -> std::io::Result<tokio::io::DuplexStream> + Send + Sync>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Tcp => f.write_str("Tcp"),
            #[cfg(test)]
            Connector::Memory(_) => f.write_str("Memory"),
        }
    }
}

/// Starts probing `target`, starting from `initial` (see [`HealthTracker::new`]).
pub fn spawn(
    target: SocketAddr,
    settings: ProbeSettings,
    initial: HealthVerdict,
    observer: Arc<dyn ProbeObserver>,
    shared: Shared,
) -> ProberHandle {
    let tracker = HealthTracker::new(
        initial.clone(),
        settings.thresholds,
        settings.interval,
        shared.write_interval,
    );
    let (state_tx, state) = watch::channel(ProbeState {
        verdict: initial,
        connect_failing: false,
        started: Instant::now(),
        probed: false,
        load: LoadWeight::default(),
        load_reports_unimplemented: false,
    });
    let publisher = Publisher::new(tracker, state_tx, observer, shared.write_interval);
    let prober = Prober::new(target, settings, publisher, shared);
    ProberHandle {
        state,
        _task: AbortOnDropHandle::new(tokio::spawn(prober.run())),
    }
}

#[cfg(test)]
mod tests;
