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
    connection::{CallEnd, CallId, ConnectionError, Event, HealthConnection, Message, Method, reason},
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

/// What every prober of an operator shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// Connect turns (see [`MAX_CONCURRENT_CONNECTS`]).
    pub connects: ConnectLimiter,
    /// The local address probe connections are bound to, if any (see
    /// [`HealthConnection::connect_from`]).
    pub source_address: Option<IpAddr>,
}

/// Starts probing `target`, starting from `initial` (see [`HealthTracker::new`]).
pub fn spawn(
    target: SocketAddr,
    settings: ProbeSettings,
    initial: HealthVerdict,
    observer: Arc<dyn ProbeObserver>,
    shared: Shared,
) -> ProberHandle {
    let tracker = HealthTracker::new(initial.clone(), settings.thresholds);
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
        last_rotation: None,
        shared,
        load_call: None,
        detail: None,
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
    shared: Shared,
    /// The load-report stream on the current connection, once started.
    load_call: Option<CallId>,
    /// What the latest failure showed beyond its reason (logged when the verdict changes).
    detail: Option<String>,
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
            let Ok(turn) = self.shared.connects.clone().acquire_owned().await else {
                return;
            };
            let attempt_deadline = Instant::now() + self.settings.timeout;
            let mut ended = match connect(self.target, self.shared.source_address, attempt_deadline).await {
                Err(failure) => {
                    drop(turn);
                    Ended::Failed(failure)
                }
                Ok(mut connection) => {
                    self.load_call = None;
                    let ended = if watch_implemented {
                        self.watch(&mut connection, attempt_deadline, turn).await
                    } else {
                        drop(turn);
                        Ended::WatchUnimplemented
                    };
                    if ended == Ended::WatchUnimplemented {
                        watch_implemented = false;
                        self.poll(&mut connection).await
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
                    ended = Ended::Failed(Failure::Unstable);
                } else {
                    self.last_rotation = Some(now);
                    self.observer.rotated();
                    continue;
                }
            }
            if let Ended::Failed(failure) = ended {
                self.record(ProbeOutcome::Failed(failure), None);
                self.state.send_modify(|state| state.load.restart());
            }
            let delay = self.backoff.next().unwrap_or(self.settings.interval);
            tokio::time::sleep(delay.min(self.settings.interval)).await;
        }
    }

    /// Follows one `Watch` stream, with a liveness `Check` each quiet interval, until it ends.
    async fn watch(
        &mut self,
        connection: &mut HealthConnection,
        deadline: Instant,
        turn: tokio::sync::OwnedSemaphorePermit,
    ) -> Ended {
        let started = Instant::now();
        let Ok(watch) = connection.start(Method::Watch, &self.settings.service) else {
            return Ended::Failed(Failure::GoAway(reason::NO_ERROR));
        };
        let mut going_away = None;
        let first = loop {
            match tokio::time::timeout_at(deadline, connection.next_event()).await {
                Err(_) => return Ended::Failed(Failure::Timeout),
                Ok(Err(error)) => return Ended::Failed(self.connection_failure(&error)),
                Ok(Ok(Event::Message(call, Message::Health(response)))) if call == watch => break response,
                Ok(Ok(Event::Ended(call, CallEnd::Status(Code::Unimplemented, _)))) if call == watch => {
                    return Ended::WatchUnimplemented;
                }
                Ok(Ok(Event::Ended(call, end))) if call == watch => {
                    return Ended::Failed(match going_away {
                        // Refused by the GOAWAY: the GOAWAY is the reason.
                        Some(code) => Failure::GoAway(code),
                        None => self.call_failure(&end),
                    });
                }
                // GOAWAY before the first answer: the Watch may still be answered, or refused.
                Ok(Ok(Event::GoAway(goaway))) => {
                    self.detail = Some(format!("GOAWAY {:?}", goaway.debug));
                    going_away = Some(goaway.code);
                }
                Ok(Ok(_)) => {}
            }
        };
        drop(turn);
        self.answered(answer(&first), started);
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
                    // (GOAWAY: graceful shutdown, connection age), after answering: the server
                    // let the connection go. Whether the endpoint is still there is for the
                    // next connection to say.
                    Ok(Event::Ended(call, _)) if call == watch => return Ended::Rotated,
                    Ok(Event::GoAway(_)) | Err(_) => return Ended::Rotated,
                    Ok(_) => {}
                },
                _ = tick.tick() => {
                    if std::mem::take(&mut heard_since_tick) {
                        continue;
                    }
                    match self.check(connection, Some(watch)).await {
                        Liveness::Answered(outcome, started) => self.answered(outcome, started),
                        // The server answered the call with an error: alive. The Watch stream
                        // carries the health.
                        Liveness::Failed(_) => {}
                        Liveness::Silent => return Ended::Failed(Failure::Timeout),
                        Liveness::ConnectionGone => return Ended::Rotated,
                    }
                }
            }
        }
    }

    /// Polls with `Check` every interval until the connection stops answering.
    async fn poll(&mut self, connection: &mut HealthConnection) -> Ended {
        loop {
            let started = Instant::now();
            match self.check(connection, None).await {
                Liveness::Answered(outcome, started) => {
                    self.answered(outcome, started);
                    self.start_load_reports(connection);
                }
                Liveness::Failed(failure) => self.record(ProbeOutcome::Failed(failure), Some(started.elapsed())),
                Liveness::Silent => return Ended::Failed(Failure::Timeout),
                Liveness::ConnectionGone => return Ended::Rotated,
            }
            tokio::time::sleep_until(started + self.settings.interval).await;
        }
    }

    /// One `Check`, bounded by `timeout`. Messages of the open `watch`, if any, that arrive
    /// meanwhile are recorded; its end means the connection is going.
    async fn check(&mut self, connection: &mut HealthConnection, watch: Option<CallId>) -> Liveness {
        let started = Instant::now();
        let Ok(check) = connection.start(Method::Check, &self.settings.service) else {
            return Liveness::ConnectionGone;
        };
        let deadline = started + self.settings.timeout;
        let mut answer_received = None;
        loop {
            let event = match tokio::time::timeout_at(deadline, connection.next_event()).await {
                Err(_) => return Liveness::Silent,
                Ok(Err(error)) => {
                    self.connection_failure(&error);
                    return Liveness::ConnectionGone;
                }
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
                        (CallEnd::Reset(_) | CallEnd::Status(Code::Unavailable | Code::Cancelled, _), _) => {
                            Liveness::ConnectionGone
                        }
                        (CallEnd::Status(Code::DeadlineExceeded, _), _) => Liveness::Silent,
                        (end, _) => Liveness::Failed(self.call_failure(&end)),
                    };
                }
                Event::Message(call, Message::Health(response)) if Some(call) == watch => {
                    self.record(answer(&response), None)
                }
                ref event if self.load_event(event) => {}
                Event::Ended(call, _) if Some(call) == watch => return Liveness::ConnectionGone,
                // GOAWAY: the Check, if refused, ends as such; if accepted, it is answered.
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

    /// The failure of a connection, its detail kept for the log.
    fn connection_failure(&mut self, error: &ConnectionError) -> Failure {
        self.detail = Some(error.to_string());
        connection_failure(error)
    }

    /// The health service answered a probe that started at `started`.
    fn answered(&mut self, outcome: ProbeOutcome, started: Instant) {
        self.record(outcome, Some(started.elapsed()));
        self.backoff = backoff(self.settings.interval);
    }

    fn record(&mut self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.observer.probed(outcome, latency);
        let before = self.tracker.verdict().clone();
        let changed = self.tracker.observe(outcome);
        let detail = self.detail.take();
        let verdict = self.tracker.verdict();
        if *verdict != before {
            // Once per change, not per probe: the detail of what made it change.
            let (health, reason, detail) = (
                verdict.health,
                verdict.reason.as_deref().unwrap_or(""),
                detail.unwrap_or_default(),
            );
            if verdict.health == Health::Serving {
                info!(endpoint = %self.target, %health, "endpoint health changed");
            } else {
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
            self.observer.changed();
        }
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

/// How a connection that can no longer carry calls failed.
fn connection_failure(error: &ConnectionError) -> Failure {
    match error {
        ConnectionError::Closed | ConnectionError::Io(_) => Failure::Closed,
        ConnectionError::Protocol(_) => Failure::ProtocolError,
        ConnectionError::GoingAway => Failure::GoAway(reason::NO_ERROR),
    }
}

/// A new connection to `target` from `source` (no HTTP/2 keepalive: see the module docs), by
/// `deadline`.
async fn connect(target: SocketAddr, source: Option<IpAddr>, deadline: Instant) -> Result<HealthConnection, Failure> {
    match tokio::time::timeout_at(deadline, HealthConnection::connect_from(target, source)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(match error.kind() {
            std::io::ErrorKind::TimedOut => Failure::ConnectTimeout,
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => Failure::ConnectRefused,
            _ => {
                debug!(%target, %error, "connect failed");
                Failure::ConnectFailed
            }
        }),
        Err(_) => Err(Failure::ConnectTimeout),
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
        assert_eq!(connection_failure(&ConnectionError::Closed), Failure::Closed);
        assert_eq!(
            connection_failure(&ConnectionError::Protocol("x")),
            Failure::ProtocolError
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        // A port nothing listens on, on loopback: refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            connect(address, None, deadline).await.err(),
            Some(Failure::ConnectRefused)
        );
    }

    #[tokio::test]
    async fn connections_come_from_the_source_address_of_the_targets_family() {
        // 127.0.0.2 is a loopback address distinct from the listener's 127.0.0.1.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let source: IpAddr = "127.0.0.2".parse().unwrap();
        let _connection = connect(address, Some(source), deadline).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
        // Without a source address, the system's choice.
        let _connection = connect(address, None, deadline).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), address.ip());
        // A source of the other family is not used (a bind across families could only fail).
        let _connection = connect(address, Some("::1".parse().unwrap()), deadline).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), address.ip());
    }
}
