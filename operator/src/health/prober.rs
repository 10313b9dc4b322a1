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
//! endpoint in `Check` mode.
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

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kubegrpc_crds::{Health, HealthCheckMode};
use tokio::{sync::watch, time::Instant};
use tokio_util::task::AbortOnDropHandle;
use tonic::Code;
use tonic_health::pb::{HealthCheckResponse, health_check_response::ServingStatus};
use tracing::{debug, info, warn};

use crate::weights::{LoadSample, LoadWeight};

use super::{
    connection::{CallEnd, CallId, ConnectionError, Event, GoAway, HealthConnection, Message, Method, reason},
    tracker::{Failure, HealthTracker, HealthVerdict, NotServingAnswer, ProbeOutcome, Thresholds},
};

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

/// At most this many probe connections of new or healthy endpoints are being opened at once,
/// operator-wide: a restart or a new leader opens one per endpoint, and thousands of handshakes
/// at once would time out probes of healthy endpoints (a false flap that every client sees).
/// Waiting for a turn does not count against the probe timeout.
///
/// Endpoints retrying after a failure take their turns from a separate, smaller limiter
/// ([`MAX_CONCURRENT_RETRIES`]), so that however many endpoints are silent or drop SYNs, they
/// never hold the turns a new or healthy endpoint needs: a new endpoint's first probe starts
/// within one probe timeout whatever failing endpoints do. And a turn is given back once the
/// connection answered, failed, or after [`MAX_TURN`], whichever comes first, so that silent
/// new endpoints pace the others by at most that much each.
pub const MAX_CONCURRENT_CONNECTS: usize = 64;

/// Turns for endpoints retrying after a failure (see [`MAX_CONCURRENT_CONNECTS`]).
pub const MAX_CONCURRENT_RETRIES: usize = 16;

/// The longest a connection attempt holds its turn (less when the probe timeout is shorter).
pub const MAX_TURN: Duration = Duration::from_millis(250);

/// Limits how many probe connections are being opened at once (see
/// [`MAX_CONCURRENT_CONNECTS`]); shared by every prober of an operator.
pub type ConnectLimiter = Arc<tokio::sync::Semaphore>;

/// A limiter of [`MAX_CONCURRENT_CONNECTS`].
pub fn connect_limiter() -> ConnectLimiter {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CONNECTS))
}

/// A limiter of [`MAX_CONCURRENT_RETRIES`].
pub fn retry_limiter() -> ConnectLimiter {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_RETRIES))
}

/// What every prober of an operator shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// Connect turns of new and healthy endpoints (see [`MAX_CONCURRENT_CONNECTS`]).
    pub connects: ConnectLimiter,
    /// Connect turns of endpoints retrying after a failure.
    pub retries: ConnectLimiter,
    /// The local address probe connections are bound to, if any (see
    /// [`HealthConnection::connect_from`]).
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
    let prober = Prober {
        target,
        backoff: backoff(settings.interval),
        settings,
        tracker,
        state: state_tx,
        observer,
        shared,
        load_call: None,
        detail: None,
        last_notice: None,
        notice_pending: false,
        turn: None,
        retrying: false,
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
    shared: Shared,
    /// The load-report stream on the current connection, once started.
    load_call: Option<CallId>,
    /// What the latest failure showed beyond its reason (logged when the verdict changes).
    detail: Option<String>,
    /// When the observer was last told of a change, and whether a change awaits telling.
    last_notice: Option<Instant>,
    notice_pending: bool,
    /// The connect turn held by the attempt in progress, and when it must be given back.
    turn: Option<(tokio::sync::OwnedSemaphorePermit, Instant)>,
    /// The latest attempt failed and no answer has counted since: take turns from the retry
    /// limiter.
    retrying: bool,
}

/// One connection's life, as far as the counting rules need it.
struct Link {
    opened: Instant,
    /// When the health service first answered on it.
    answered: Option<Instant>,
    /// The GOAWAY the server sent on it, if any.
    going_away: Option<u32>,
}

/// Why a connection's probing ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The server does not implement `Watch`: poll with `Check` on the same connection.
    WatchUnimplemented,
    /// The connection ended the way a rotation does (graceful GOAWAY, close, stream reset or
    /// ended): a rotation if it answered at least an interval ago, else an early end, counted
    /// as this failure (or as [`Failure::Closed`] for [`Failure::Unstable`] before any answer).
    Closed(Failure),
    /// A failure, whatever the connection's age.
    Failed(Failure),
}

impl Prober {
    async fn run(mut self) {
        let mut watch_implemented = self.settings.mode == HealthCheckMode::Watch;
        loop {
            // A turn to connect, held until the connection answered or failed (or MAX_TURN).
            let limiter = if self.retrying {
                self.shared.retries.clone()
            } else {
                self.shared.connects.clone()
            };
            let Ok(turn) = self.attend(limiter.acquire_owned()).await else {
                return;
            };
            self.turn = Some((turn, Instant::now() + MAX_TURN.min(self.settings.timeout)));
            let attempt_deadline = Instant::now() + self.settings.timeout;
            let mut link = Link {
                opened: Instant::now(),
                answered: None,
                going_away: None,
            };
            let ended = match self.connect(attempt_deadline).await {
                Err(failure) => {
                    self.turn = None;
                    Ended::Failed(failure)
                }
                Ok(mut connection) => {
                    self.load_call = None;
                    let ended = if watch_implemented {
                        self.watch(&mut connection, &mut link, attempt_deadline).await
                    } else {
                        self.turn = None;
                        Ended::WatchUnimplemented
                    };
                    if ended == Ended::WatchUnimplemented {
                        watch_implemented = false;
                        self.poll(&mut connection, &mut link).await
                    } else {
                        ended
                    }
                }
            };
            let now = Instant::now();
            let failure = match (ended, link.answered) {
                (Ended::Closed(_), Some(answered))
                    if now.saturating_duration_since(answered) >= self.settings.interval =>
                {
                    // Routine rotation: the connection served its interval.
                    self.confirm(now);
                    self.tracker.connection_ended();
                    self.observer.rotated();
                    continue;
                }
                (Ended::Closed(failure), Some(_)) => {
                    self.observer.ended_early();
                    failure
                }
                (Ended::Closed(Failure::Unstable), None) => Failure::Closed,
                (Ended::Closed(failure) | Ended::Failed(failure), _) => failure,
                (Ended::WatchUnimplemented, _) => unreachable!("handled above"),
            };
            self.turn = None;
            self.retrying = true;
            debug!(
                endpoint = %self.target,
                %failure,
                lived = ?now.saturating_duration_since(link.opened),
                answered = ?link.answered.map(|at| now.saturating_duration_since(at)),
                detail = self.detail.as_deref().unwrap_or_default(),
                "probe failed"
            );
            if link.answered.is_some() {
                self.tracker.connection_broke();
            }
            self.record(ProbeOutcome::Failed(failure), None);
            self.state.send_modify(|state| state.load.restart());
            // A connection that lived an interval is replaced at once (that is one connection
            // per interval at most); one that did not waits for the backoff.
            let lived = now.saturating_duration_since(link.opened);
            if lived < self.settings.interval {
                let delay = self.backoff.next().unwrap_or(self.settings.interval);
                self.attend(tokio::time::sleep(delay.min(self.settings.interval))).await;
            }
        }
    }

    /// Follows one `Watch` stream, with a liveness `Check` each quiet interval, until it ends.
    async fn watch(&mut self, connection: &mut HealthConnection, link: &mut Link, deadline: Instant) -> Ended {
        let started = Instant::now();
        let Ok(watch) = connection.start(Method::Watch, &self.settings.service) else {
            return Ended::Failed(Failure::GoAway(reason::NO_ERROR));
        };
        let first = loop {
            match self
                .attend(tokio::time::timeout_at(deadline, connection.next_event()))
                .await
            {
                Err(_) => return Ended::Failed(Failure::Timeout),
                Ok(Err(error)) => return self.connection_gone(&error, link),
                Ok(Ok(Event::Message(call, Message::Health(response)))) if call == watch => break response,
                Ok(Ok(Event::Ended(call, CallEnd::Status(Code::Unimplemented, _)))) if call == watch => {
                    return Ended::WatchUnimplemented;
                }
                Ok(Ok(Event::Ended(call, end))) if call == watch => {
                    return match link.going_away {
                        // Refused by the GOAWAY: the GOAWAY is the reason.
                        Some(code) => Ended::Failed(Failure::GoAway(code)),
                        None => Ended::Failed(self.call_failure(&end)),
                    };
                }
                // GOAWAY before the first answer: the Watch may still be answered, or refused.
                Ok(Ok(Event::GoAway(goaway))) => self.going_away(&goaway, link),
                Ok(Ok(_)) => {}
            }
        };
        self.turn = None;
        link.answered = Some(Instant::now());
        self.answered(answer(&first), started);
        if let Some(code) = link.going_away {
            // The server announced the connection's end before it answered.
            return goaway_end(code);
        }
        self.start_load_reports(connection);

        let mut heard_since_tick = false;
        let mut tick = tokio::time::interval_at(Instant::now() + self.settings.interval, self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = connection.next_event() => match event {
                    Ok(Event::Message(call, Message::Health(response))) if call == watch => {
                        heard_since_tick = true;
                        self.record(answer(&response), None);
                    }
                    Ok(event) if self.load_event(&event) => {}
                    // The stream or the connection ended, or the server announced its end
                    // (GOAWAY: graceful shutdown, connection age), after answering: a rotation
                    // or an early end, by the connection's age.
                    Ok(Event::Ended(call, end)) if call == watch => return self.stream_end(&end, link),
                    Ok(Event::GoAway(goaway)) => {
                        self.going_away(&goaway, link);
                        return goaway_end(goaway.code);
                    }
                    Err(error) => return self.connection_gone(&error, link),
                    Ok(_) => {}
                },
                () = until(self.wake_at()) => self.wake(),
                _ = tick.tick() => {
                    if std::mem::take(&mut heard_since_tick) {
                        // The stream spoke within the interval: the connection is alive.
                        self.confirm(Instant::now());
                        continue;
                    }
                    match self.check(connection, link, Some(watch)).await {
                        Liveness::Answered(outcome, started) => {
                            self.confirm(Instant::now());
                            self.answered(outcome, started);
                        }
                        Liveness::Failed(failure) => {
                            self.tracker.connection_broke();
                            self.record(ProbeOutcome::Failed(failure), None);
                        }
                        Liveness::Silent => return Ended::Failed(Failure::Timeout),
                        Liveness::Ended(ended) => return ended,
                    }
                }
            }
        }
    }

    /// Polls with `Check` every interval until the connection stops answering.
    async fn poll(&mut self, connection: &mut HealthConnection, link: &mut Link) -> Ended {
        loop {
            let started = Instant::now();
            match self.check(connection, link, None).await {
                Liveness::Answered(outcome, started) => {
                    self.confirm(Instant::now());
                    link.answered.get_or_insert_with(Instant::now);
                    self.answered(outcome, started);
                    self.start_load_reports(connection);
                }
                Liveness::Failed(failure) => {
                    if link.answered.is_some() {
                        self.tracker.connection_broke();
                    }
                    self.record(ProbeOutcome::Failed(failure), Some(started.elapsed()));
                }
                Liveness::Silent => return Ended::Failed(Failure::Timeout),
                Liveness::Ended(ended) => return ended,
            }
            self.attend(tokio::time::sleep_until(started + self.settings.interval))
                .await;
        }
    }

    /// One `Check`, bounded by `timeout`. Messages of the open `watch`, if any, that arrive
    /// meanwhile are recorded; its end means the connection is going.
    async fn check(&mut self, connection: &mut HealthConnection, link: &mut Link, watch: Option<CallId>) -> Liveness {
        let started = Instant::now();
        let Ok(check) = connection.start(Method::Check, &self.settings.service) else {
            return Liveness::Ended(goaway_end(link.going_away.unwrap_or(reason::NO_ERROR)));
        };
        let deadline = started + self.settings.timeout;
        let mut answer_received = None;
        loop {
            let event = match self
                .attend(tokio::time::timeout_at(deadline, connection.next_event()))
                .await
            {
                Err(_) => return Liveness::Silent,
                Ok(Err(error)) => return Liveness::Ended(self.connection_gone(&error, link)),
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Message(call, Message::Health(response)) if call == check => answer_received = Some(response),
                Event::Ended(call, end) if call == check => {
                    return match (end, answer_received) {
                        (CallEnd::Status(Code::Ok, _), Some(response)) => {
                            Liveness::Answered(answer(&response), started)
                        }
                        // The protocol: Check on an unknown service answers NOT_FOUND.
                        (CallEnd::Status(Code::NotFound, _), _) => {
                            Liveness::Answered(ProbeOutcome::NotServing(NotServingAnswer::NotFound), started)
                        }
                        (CallEnd::Status(Code::Ok, _), None) => {
                            self.detail = Some("a Check answered OK without a message".into());
                            Liveness::Failed(Failure::ProtocolError)
                        }
                        // Refused by a GOAWAY: the connection is going.
                        (CallEnd::Reset(reason::REFUSED_STREAM), _) => {
                            Liveness::Ended(goaway_end(link.going_away.unwrap_or(reason::NO_ERROR)))
                        }
                        (end, _) => Liveness::Failed(self.call_failure(&end)),
                    };
                }
                Event::Message(call, Message::Health(response)) if Some(call) == watch => {
                    self.record(answer(&response), None)
                }
                ref event if self.load_event(event) => {}
                Event::Ended(call, ref end) if Some(call) == watch => {
                    return Liveness::Ended(self.stream_end(end, link));
                }
                // GOAWAY: the Check, if refused, ends as such; if accepted, it is answered.
                Event::GoAway(ref goaway) => self.going_away(goaway, link),
                _ => {}
            }
        }
    }

    /// Opens the load-report stream on `connection` if the policy wants reports, the server
    /// has not refused them, and it is not open yet.
    fn start_load_reports(&mut self, connection: &mut HealthConnection) {
        let Some(settings) = self.settings.load_reports else {
            return;
        };
        if self.load_call.is_some() || self.state.borrow().load_reports_unimplemented {
            return;
        }
        self.load_call = connection.start_load_reports(settings.interval).ok();
    }

    /// Takes `event` if it belongs to the load-report stream.
    fn load_event(&mut self, event: &Event) -> bool {
        let Some(load_call) = self.load_call else {
            return false;
        };
        match event {
            Event::Message(call, Message::LoadReport(report)) if *call == load_call => {
                let sample = LoadSample::from_report(report);
                let expiration = self
                    .settings
                    .load_reports
                    .map_or(Duration::MAX, |s| s.weight_expiration_period);
                self.state
                    .send_modify(|state| state.load.update(sample, expiration, Instant::now()));
                true
            }
            Event::Ended(call, end) if *call == load_call => {
                if matches!(end, CallEnd::Status(Code::Unimplemented, _)) {
                    debug!(target = %self.target, "no ORCA load reports (UNIMPLEMENTED): the endpoint gets the mean weight");
                    self.state.send_modify(|state| state.load_reports_unimplemented = true);
                } else {
                    debug!(target = %self.target, ?end, "the load-report stream ended; reopened on the next connection");
                }
                true
            }
            _ => false,
        }
    }

    /// The failure of a health call, its detail kept for the log.
    fn call_failure(&mut self, end: &CallEnd) -> Failure {
        self.detail = match end {
            CallEnd::Status(_, message) if !message.is_empty() => Some(format!("grpc-message {message:?}")),
            CallEnd::Malformed(why) => Some((*why).to_string()),
            _ => None,
        };
        call_failure(end)
    }

    /// How the `Watch` stream's end after its first answer counts.
    fn stream_end(&mut self, end: &CallEnd, link: &Link) -> Ended {
        match end {
            CallEnd::MessageTooLarge | CallEnd::Malformed(_) => Ended::Failed(self.call_failure(end)),
            CallEnd::Reset(reason::REFUSED_STREAM) | CallEnd::Status(..) if link.going_away.is_some() => {
                goaway_end(link.going_away.unwrap_or(reason::NO_ERROR))
            }
            CallEnd::Reset(code) => Ended::Closed(Failure::Reset(*code)),
            CallEnd::Status(..) => {
                self.call_failure(end);
                Ended::Closed(Failure::Unstable)
            }
        }
    }

    /// How a connection that can no longer carry calls counts, its detail kept for the log.
    fn connection_gone(&mut self, error: &ConnectionError, link: &Link) -> Ended {
        self.detail = Some(error.to_string());
        match error {
            ConnectionError::Protocol(_) => Ended::Failed(Failure::ProtocolError),
            ConnectionError::Closed | ConnectionError::Io(_) | ConnectionError::GoingAway => match link.going_away {
                Some(code) => goaway_end(code),
                None => Ended::Closed(Failure::Unstable),
            },
        }
    }

    fn going_away(&mut self, goaway: &GoAway, link: &mut Link) {
        link.going_away.get_or_insert(goaway.code);
        if !goaway.debug.is_empty() {
            self.detail = Some(format!("GOAWAY debug data {:?}", goaway.debug));
        }
    }

    /// A new connection (no HTTP/2 keepalive: see the module docs), by `deadline`.
    async fn connect(&mut self, deadline: Instant) -> Result<HealthConnection, Failure> {
        let connecting = async {
            match &self.shared.connector {
                Connector::Tcp => HealthConnection::connect_from(self.target, self.shared.source_address).await,
                #[cfg(test)]
                Connector::Memory(open) => open(self.target).map(|io| HealthConnection::handshake(io, "test")),
            }
        };
        match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => {
                self.detail = Some(error.to_string());
                Err(connect_failure(&error))
            }
            Err(_) => Err(Failure::ConnectTimeout),
        }
    }

    /// The health service answered a probe that started at `started`.
    fn answered(&mut self, outcome: ProbeOutcome, started: Instant) {
        self.record(outcome, Some(started.elapsed()));
        if !self.tracker.on_probation() {
            self.backoff = backoff(self.settings.interval);
            self.retrying = false;
        }
    }

    /// The current connection is alive at `now` (see [`HealthTracker::confirm`]).
    fn confirm(&mut self, now: Instant) {
        let before = self.tracker.verdict().clone();
        if self.tracker.confirm(now) {
            self.backoff = backoff(self.settings.interval);
            self.retrying = false;
            self.publish(&before, true);
        }
    }

    fn record(&mut self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.observer.probed(outcome, latency);
        let before = self.tracker.verdict().clone();
        let changed = self.tracker.observe(outcome, Instant::now());
        self.publish(&before, changed);
    }

    /// Publishes the tracker's state if it `changed` (or on the first probe), and logs a
    /// change of verdict from `before`, with the detail of what caused it, once.
    fn publish(&mut self, before: &HealthVerdict, changed: bool) {
        let detail = self.detail.take();
        let verdict = self.tracker.verdict();
        if verdict != before {
            let (health, reason) = (verdict.health, verdict.reason.as_deref().unwrap_or_default());
            if health == Health::Serving {
                info!(endpoint = %self.target, %health, "endpoint health changed");
            } else {
                let detail = detail.unwrap_or_default();
                warn!(endpoint = %self.target, %health, reason, detail, "endpoint health changed");
            }
        }
        let first = !self.state.borrow().probed;
        if changed || first {
            let started = self.state.borrow().started;
            self.state.send_modify(|state| {
                state.verdict = self.tracker.verdict().clone();
                state.connect_failing = self.tracker.connect_failing();
                state.started = started;
                state.probed = true;
            });
            self.notify();
        }
    }

    /// Tells the observer the state changed: at once, unless it was told less than a status
    /// write interval ago (then once that interval has passed), so that a flapping endpoint
    /// drives at most one notice per write interval.
    fn notify(&mut self) {
        let now = Instant::now();
        let due = self.last_notice.map(|last| last + self.shared.write_interval);
        if due.is_none_or(|due| now >= due) {
            self.last_notice = Some(now);
            self.notice_pending = false;
            self.observer.changed();
        } else {
            self.notice_pending = true;
        }
    }

    /// The next instant something is due: a held verdict's release, a deferred notice, giving
    /// back a connect turn.
    fn wake_at(&self) -> Option<Instant> {
        let notice = self
            .last_notice
            .filter(|_| self.notice_pending)
            .map(|last| last + self.shared.write_interval);
        let turn = self.turn.as_ref().map(|(_, until)| *until);
        self.tracker.deadline().into_iter().chain(notice).chain(turn).min()
    }

    /// Does what is due now (see [`Prober::wake_at`]).
    fn wake(&mut self) {
        if self.turn.as_ref().is_some_and(|(_, until)| Instant::now() >= *until) {
            self.turn = None;
        }
        let before = self.tracker.verdict().clone();
        if self.tracker.wake(Instant::now()) {
            self.publish(&before, true);
        }
        if self.notice_pending {
            self.notify();
        }
    }

    /// Awaits `future` (which must not need the prober), doing what falls due meanwhile.
    async fn attend<T>(&mut self, future: impl Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return output,
                () = until(self.wake_at()) => self.wake(),
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What one `Check` showed about the connection.
enum Liveness {
    /// The health service answered (started at the instant given).
    Answered(ProbeOutcome, Instant),
    /// The server answered with an error: it is alive, the call failed.
    Failed(Failure),
    /// No answer within the timeout.
    Silent,
    /// The connection ended (closed, GOAWAY, the Watch stream ended, a protocol error).
    Ended(Ended),
}

/// How a GOAWAY counts: an error code is a failure; NO_ERROR, a graceful end.
fn goaway_end(code: u32) -> Ended {
    if code == reason::NO_ERROR {
        Ended::Closed(Failure::GoAway(code))
    } else {
        Ended::Failed(Failure::GoAway(code))
    }
}

fn answer(response: &HealthCheckResponse) -> ProbeOutcome {
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => ProbeOutcome::Serving,
        Ok(ServingStatus::NotServing) => ProbeOutcome::NotServing(NotServingAnswer::NotServing),
        Ok(ServingStatus::ServiceUnknown) => ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown),
        Ok(ServingStatus::Unknown) | Err(_) => ProbeOutcome::NotServing(NotServingAnswer::Unknown),
    }
}

/// How a health call that did not answer failed.
fn call_failure(end: &CallEnd) -> Failure {
    match end {
        CallEnd::Reset(code) => Failure::Reset(*code),
        CallEnd::MessageTooLarge => Failure::MessageTooLarge,
        CallEnd::Malformed(_) => Failure::ProtocolError,
        CallEnd::Status(Code::Unimplemented, _) => Failure::Unimplemented,
        CallEnd::Status(code, _) => Failure::CallFailed(*code),
    }
}

/// How opening a connection failed.
fn connect_failure(error: &std::io::Error) -> Failure {
    match error.kind() {
        std::io::ErrorKind::TimedOut => Failure::ConnectTimeout,
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => Failure::ConnectRefused,
        _ => Failure::ConnectFailed,
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
mod tests;
