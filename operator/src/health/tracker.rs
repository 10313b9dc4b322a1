//! The health of one endpoint from its probe outcomes: thresholds, as a pure state machine.
//!
//! Transport failures (connect errors, timeouts, broken streams) count against the unhealthy
//! threshold: they may be a blip. An explicit answer from the server's health service
//! (NOT_SERVING, SERVICE_UNKNOWN) is authoritative and counts at once: the server said so.
//! Successes count toward the healthy threshold before an endpoint that was not Serving is.
//!
//! Failures count across connections. After a connection broke once it had answered, a SERVING
//! answer no longer resets the failure count (nor counts toward the healthy threshold) when it
//! arrives, but once its connection has stayed up for an interval (the prober calls
//! [`HealthTracker::confirm`]): a server that answers SERVING on every new connection and then
//! breaks it reaches the unhealthy threshold as one that refuses connections does.
//!
//! Flap damping, with a window W = the status write interval: when the thresholds' verdict
//! turns back to Serving less than W after the published health turned NotServing, the
//! endpoint is held NotServing with reason `Flapping` until the thresholds have said Serving
//! without a break for the hold (W, doubled by each hold in a row, at most 8 W). Flapping at
//! the probe interval's scale needs no window of its own: after a transport failure on a
//! connection that had answered, Serving comes back only after an interval on a connection
//! (see above). A NotServing verdict is always published at once (with reason `Flapping` while the
//! endpoint served less than twice the hold since its last release). So a flapping endpoint
//! changes its published health at most twice per hold, and a single flap costs one hold.

use std::time::Duration;

use kubegrpc_crds::Health;
use tokio::time::Instant;

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The health service answered SERVING.
    Serving,
    /// The health service answered something other than SERVING.
    NotServing(NotServingAnswer),
    /// The probe failed before the health service answered.
    Failed(Failure),
}

/// A health answer other than SERVING.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotServingAnswer {
    NotServing,
    ServiceUnknown,
    /// The `Check` call said the service does not exist (NOT_FOUND), as the protocol specifies.
    NotFound,
    /// UNKNOWN, or a value this version does not know.
    Unknown,
}

/// How a probe failed. Each kind has a short, stable name (its [`Display`](std::fmt::Display)),
/// published as the endpoint's `reason`; the detail (a GOAWAY's debug data, the protocol error)
/// is logged, not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connection was refused (or reset while opening).
    ConnectRefused,
    /// The TCP connection failed otherwise (unreachable network or host, no such local address).
    ConnectFailed,
    /// No connection within the timeout (a dropped SYN, a frozen host).
    ConnectTimeout,
    /// No answer within the timeout on an open connection.
    Timeout,
    /// The server closed the connection (or TCP reset it) before answering.
    Closed,
    /// The server sent GOAWAY with this HTTP/2 error code before answering, or with an error
    /// code at any time, or with NO_ERROR too soon after answering.
    GoAway(u32),
    /// The server reset the health call (RST_STREAM with this HTTP/2 error code).
    Reset(u32),
    /// The server broke HTTP/2 or gRPC framing (bad frames, header blocks, messages).
    ProtocolError,
    /// A frame or message larger than the prober accepts.
    MessageTooLarge,
    /// The server has no health service (`Check` answered UNIMPLEMENTED).
    Unimplemented,
    /// The health call failed with this gRPC status.
    CallFailed(tonic::Code),
    /// The connection ended too soon after answering (see the prober's early-end rule).
    Unstable,
    /// The TLS handshake failed (a certificate the roots or the name do not accept, ...).
    Tls(crate::health::tls::TlsFailure),
}

impl Failure {
    /// Failures before any HTTP/2 exchange: when every endpoint fails that way at once, the
    /// operator's own network is the likelier cause.
    pub fn at_connect_time(self) -> bool {
        matches!(
            self,
            Failure::ConnectRefused | Failure::ConnectFailed | Failure::ConnectTimeout
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ConnectRefused => f.write_str("ConnectRefused"),
            Failure::ConnectFailed => f.write_str("ConnectFailed"),
            Failure::ConnectTimeout => f.write_str("ConnectTimeout"),
            Failure::Timeout => f.write_str("Timeout"),
            Failure::Closed => f.write_str("Closed"),
            Failure::GoAway(code) => write!(f, "GoAway({})", h2_code_name(*code)),
            Failure::Reset(code) => write!(f, "Reset({})", h2_code_name(*code)),
            Failure::ProtocolError => f.write_str("ProtocolError"),
            Failure::MessageTooLarge => f.write_str("MessageTooLarge"),
            Failure::Unimplemented => f.write_str("Unimplemented"),
            Failure::CallFailed(code) => write!(f, "CallFailed({})", grpc_code_name(*code)),
            Failure::Unstable => f.write_str("Unstable"),
            Failure::Tls(failure) => failure.fmt(f),
        }
    }
}

/// An HTTP/2 error code's name (RFC 9113 section 7); codes it does not define are `UNKNOWN`,
/// so that the published reasons stay a fixed set.
pub fn h2_code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

/// A gRPC status code's name, as the gRPC specification spells it.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl ProbeOutcome {
    /// The `reason` published with a health that this outcome caused.
    pub fn reason(self) -> std::borrow::Cow<'static, str> {
        match self {
            ProbeOutcome::Serving => "Serving".into(),
            ProbeOutcome::NotServing(NotServingAnswer::NotServing) => "NotServing".into(),
            ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown) => "ServiceUnknown".into(),
            ProbeOutcome::NotServing(NotServingAnswer::NotFound) => "ServiceNotFound".into(),
            ProbeOutcome::NotServing(NotServingAnswer::Unknown) => "HealthUnknown".into(),
            ProbeOutcome::Failed(failure) => failure.to_string().into(),
        }
    }
}

/// Thresholds from the GrpcBackend's `spec.healthCheck`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub healthy: u32,
    pub unhealthy: u32,
}

/// The published health of an endpoint and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthVerdict {
    pub health: Health,
    pub reason: Option<String>,
}

/// Counts consecutive outcomes and decides when the published health changes.
#[derive(Clone, Debug)]
pub struct HealthTracker {
    verdict: HealthVerdict,
    thresholds: Thresholds,
    interval: Duration,
    successes: u32,
    failures: u32,
    connect_failing: bool,
    /// A connection broke after answering: SERVING answers wait for [`HealthTracker::confirm`].
    probation: bool,
    /// Under probation, since when the answers have been SERVING on the current connection.
    pending_since: Option<Instant>,
    /// What the thresholds say, before flap damping.
    underlying: Health,
    /// Flap damping's window: a change back to Serving within it is a flap.
    damping: Duration,
    /// Holds in a row, each doubling the next (up to [`MAX_FLAP_LEVEL`]).
    flap_level: u32,
    /// Held NotServing (reason Flapping) while the thresholds say Serving: since when they have.
    hold: Option<Option<Instant>>,
    /// When this tracker last published NotServing, and Serving.
    not_serving_since: Option<Instant>,
    serving_since: Option<Instant>,
}

/// Flaps in a row beyond this do not lengthen the hold further (`damping x 2^3`).
const MAX_FLAP_LEVEL: u32 = 4;
/// The published reason while a flapping endpoint is held NotServing.
pub const FLAPPING: &str = "Flapping";

impl HealthTracker {
    /// Starts from `initial`: `Unknown` for a new endpoint, or the health already published in
    /// the status (so a restarted or newly elected operator changes nothing until its own
    /// probes cross a threshold). `interval` is the probe interval: how long a connection must
    /// stay up before a SERVING answer on it counts again after a connection broke. `damping`
    /// is the flap damping window (see the module docs).
    pub fn new(initial: HealthVerdict, thresholds: Thresholds, interval: Duration, damping: Duration) -> Self {
        Self {
            underlying: initial.health,
            damping,
            flap_level: 0,
            hold: None,
            not_serving_since: None,
            serving_since: None,
            verdict: initial,
            thresholds: Thresholds {
                healthy: thresholds.healthy.max(1),
                unhealthy: thresholds.unhealthy.max(1),
            },
            interval,
            successes: 0,
            failures: 0,
            connect_failing: false,
            probation: false,
            pending_since: None,
        }
    }

    pub fn verdict(&self) -> &HealthVerdict {
        &self.verdict
    }

    /// Whether the latest outcome was a failure at connect time.
    pub fn connect_failing(&self) -> bool {
        self.connect_failing
    }

    /// Whether SERVING answers wait for their connection to prove stable before they count.
    pub fn on_probation(&self) -> bool {
        self.probation
    }

    /// Feeds one outcome seen at `now`; returns true when the verdict or `connect_failing`
    /// changed.
    pub fn observe(&mut self, outcome: ProbeOutcome, now: Instant) -> bool {
        let before = (self.verdict.clone(), self.connect_failing);
        self.connect_failing = matches!(outcome, ProbeOutcome::Failed(f) if f.at_connect_time());
        match outcome {
            ProbeOutcome::Serving if self.probation => {
                self.pending_since.get_or_insert(now);
            }
            ProbeOutcome::Serving => self.serving(now),
            ProbeOutcome::NotServing(_) => {
                self.pending_since = None;
                self.successes = 0;
                self.failures = 0;
                if self.underlying != Health::NotServing {
                    self.set(Health::NotServing, outcome, now);
                }
            }
            ProbeOutcome::Failed(_) => {
                self.pending_since = None;
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.underlying != Health::NotServing && self.failures >= self.thresholds.unhealthy {
                    self.set(Health::NotServing, outcome, now);
                }
            }
        }
        (self.verdict.clone(), self.connect_failing) != before
    }

    /// A connection broke after answering (an early end, or a failure on a connection that
    /// had answered): from now on SERVING answers count only once their connection has stayed
    /// up for an interval (see [`HealthTracker::confirm`]). Feed the failure itself with
    /// [`HealthTracker::observe`].
    pub fn connection_broke(&mut self) {
        self.probation = true;
        self.pending_since = None;
    }

    /// The current connection ended without a failure (a routine rotation): a SERVING answer
    /// still waiting on it is not carried to the next connection.
    pub fn connection_ended(&mut self) {
        self.pending_since = None;
    }

    /// The current connection showed at `now` that it is alive (a message heard in the past
    /// interval, a liveness `Check` answered, a routine rotation). Under probation, SERVING
    /// answers that have held on it for an interval now count, as one success; returns true
    /// when the verdict changed.
    pub fn confirm(&mut self, now: Instant) -> bool {
        let Some(since) = self.pending_since else {
            return false;
        };
        if !self.probation || now.saturating_duration_since(since) < self.interval {
            return false;
        }
        self.probation = false;
        self.pending_since = None;
        let before = self.verdict.clone();
        self.serving(now);
        self.verdict != before
    }

    /// When a held endpoint is due to be released (see [`HealthTracker::wake`]).
    pub fn deadline(&self) -> Option<Instant> {
        self.hold.flatten().map(|since| since + self.hold_for())
    }

    /// Releases a held endpoint whose thresholds have said Serving for the whole hold; returns
    /// true when the verdict changed.
    pub fn wake(&mut self, now: Instant) -> bool {
        if self.deadline().is_none_or(|due| now < due) {
            return false;
        }
        self.hold = None;
        self.publish(Health::Serving, ProbeOutcome::Serving.reason().into_owned(), now);
        true
    }

    fn serving(&mut self, now: Instant) {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        if self.underlying != Health::Serving && self.successes >= self.thresholds.healthy {
            self.set(Health::Serving, ProbeOutcome::Serving, now);
        }
    }

    /// How long a flapping endpoint is held at the current flap level.
    fn hold_for(&self) -> Duration {
        self.damping * (1 << self.flap_level.clamp(1, MAX_FLAP_LEVEL).saturating_sub(1))
    }

    /// The thresholds' verdict changed to `health` at `now` because of `cause`: publish it, or
    /// damp it.
    fn set(&mut self, health: Health, cause: ProbeOutcome, now: Instant) {
        self.underlying = health;
        let since = |at: Option<Instant>| at.map(|at| now.saturating_duration_since(at));
        match health {
            Health::NotServing => {
                if let Some(stable_since) = &mut self.hold {
                    *stable_since = None;
                    return;
                }
                // Serving for less than twice the hold after a flap: still flapping.
                let flapping =
                    self.flap_level > 0 && since(self.serving_since).is_some_and(|s| s < self.hold_for() * 2);
                if !flapping {
                    self.flap_level = 0;
                }
                let reason = if flapping {
                    FLAPPING.into()
                } else {
                    cause.reason().into_owned()
                };
                self.publish(Health::NotServing, reason, now);
            }
            Health::Serving => {
                let back_soon = self.verdict.health == Health::NotServing
                    && since(self.not_serving_since).is_some_and(|s| s < self.damping);
                if let Some(stable_since) = &mut self.hold {
                    // Back to Serving during the hold: the hold starts over.
                    *stable_since = Some(now);
                    return;
                }
                if back_soon {
                    self.flap_level = (self.flap_level + 1).min(MAX_FLAP_LEVEL);
                    self.hold = Some(Some(now));
                    if self.verdict.reason.as_deref() != Some(FLAPPING) {
                        self.publish(Health::NotServing, FLAPPING.into(), now);
                    }
                    return;
                }
                self.publish(Health::Serving, cause.reason().into_owned(), now);
            }
            Health::Unknown => {}
        }
    }

    fn publish(&mut self, health: Health, reason: String, now: Instant) {
        if health == Health::NotServing && self.verdict.health != Health::NotServing {
            self.not_serving_since = Some(now);
        }
        if health == Health::Serving {
            self.serving_since = Some(now);
        }
        self.verdict = HealthVerdict {
            health,
            reason: Some(reason),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(initial: Health, healthy: u32, unhealthy: u32) -> HealthTracker {
        HealthTracker::new(
            HealthVerdict {
                health: initial,
                reason: None,
            },
            Thresholds { healthy, unhealthy },
            INTERVAL,
            Duration::ZERO,
        )
    }

    const INTERVAL: Duration = Duration::from_secs(1);

    impl HealthTracker {
        fn see(&mut self, outcome: ProbeOutcome) -> bool {
            self.observe(outcome, Instant::now())
        }
    }

    const CONNECT_FAILED: ProbeOutcome = ProbeOutcome::Failed(Failure::ConnectRefused);
    const NOT_SERVING: ProbeOutcome = ProbeOutcome::NotServing(NotServingAnswer::NotServing);

    #[test]
    fn unknown_becomes_serving_after_the_healthy_threshold() {
        let mut t = tracker(Health::Unknown, 2, 3);
        assert!(!t.see(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Unknown);
        assert!(t.see(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Serving);
        assert_eq!(t.verdict().reason.as_deref(), Some("Serving"));
    }

    #[test]
    fn transport_failures_count_against_the_unhealthy_threshold() {
        let mut t = tracker(Health::Serving, 1, 3);
        assert!(!t.see(ProbeOutcome::Failed(Failure::Timeout)));
        assert!(!t.see(ProbeOutcome::Failed(Failure::Unstable)));
        assert!(t.see(ProbeOutcome::Failed(Failure::Timeout)));
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some("Timeout"));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = tracker(Health::Serving, 1, 2);
        t.see(ProbeOutcome::Failed(Failure::Timeout));
        t.see(ProbeOutcome::Serving);
        t.see(ProbeOutcome::Failed(Failure::Timeout));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn an_explicit_not_serving_counts_at_once_whatever_the_threshold() {
        let mut t = tracker(Health::Serving, 1, 100);
        assert!(t.see(NOT_SERVING));
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some("NotServing"));
        // Back to Serving at the healthy threshold (1).
        assert!(t.see(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn a_seeded_verdict_holds_until_a_threshold_is_crossed() {
        // A newly elected leader starts from the published Serving: one failure changes nothing.
        let mut t = tracker(Health::Serving, 1, 3);
        assert!(!t.see(ProbeOutcome::Serving));
        assert!(!t.see(ProbeOutcome::Failed(Failure::Timeout)));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn the_reason_is_set_when_the_health_changes_only() {
        let mut t = tracker(Health::Serving, 1, 1);
        t.see(CONNECT_FAILED);
        assert_eq!(t.verdict().reason.as_deref(), Some("ConnectRefused"));
        // Still NotServing for another cause: the published reason stays, nothing to write.
        assert!(!t.see(ProbeOutcome::Failed(Failure::ConnectTimeout)));
        assert_eq!(t.verdict().reason.as_deref(), Some("ConnectRefused"));
    }

    #[test]
    fn reasons_are_short_names_from_a_fixed_vocabulary() {
        let reason = |failure| ProbeOutcome::Failed(failure).reason().into_owned();
        assert_eq!(reason(Failure::GoAway(0xb)), "GoAway(ENHANCE_YOUR_CALM)");
        assert_eq!(reason(Failure::GoAway(0)), "GoAway(NO_ERROR)");
        assert_eq!(reason(Failure::Reset(0x8)), "Reset(CANCEL)");
        // Codes HTTP/2 does not define do not widen the vocabulary.
        assert_eq!(reason(Failure::Reset(0xdead)), "Reset(UNKNOWN)");
        assert_eq!(
            reason(Failure::CallFailed(tonic::Code::PermissionDenied)),
            "CallFailed(PERMISSION_DENIED)"
        );
        assert_eq!(reason(Failure::MessageTooLarge), "MessageTooLarge");
        assert_eq!(
            ProbeOutcome::NotServing(NotServingAnswer::NotFound).reason(),
            "ServiceNotFound"
        );
        let connect_time: Vec<Failure> = [
            Failure::ConnectRefused,
            Failure::ConnectFailed,
            Failure::ConnectTimeout,
            Failure::Timeout,
            Failure::Closed,
            Failure::GoAway(0),
            Failure::ProtocolError,
            Failure::Unstable,
        ]
        .into_iter()
        .filter(|f| f.at_connect_time())
        .collect();
        assert_eq!(
            connect_time,
            [Failure::ConnectRefused, Failure::ConnectFailed, Failure::ConnectTimeout]
        );
    }

    #[test]
    fn connect_failing_follows_the_latest_outcome() {
        let mut t = tracker(Health::NotServing, 1, 1);
        assert!(t.see(CONNECT_FAILED));
        assert!(t.connect_failing());
        assert!(!t.see(CONNECT_FAILED));
        assert!(t.see(ProbeOutcome::Failed(Failure::Timeout)));
        assert!(!t.connect_failing());
    }

    const UNSTABLE: ProbeOutcome = ProbeOutcome::Failed(Failure::Unstable);

    #[test]
    fn after_a_broken_connection_serving_answers_count_only_once_their_connection_held() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut t = tracker(Health::Serving, 1, 3);
        // Each connection answers SERVING and breaks 100 ms later: the answers never count.
        for (i, ms) in [0u64, 300, 700].into_iter().enumerate() {
            assert!(!t.observe(ProbeOutcome::Serving, at(ms)), "connection {i}");
            assert!(!t.confirm(at(ms + 50)), "not held for an interval yet");
            t.connection_broke();
            t.observe(UNSTABLE, at(ms + 100));
        }
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some("Unstable"));
        // A connection that holds for an interval counts its answer once, then as usual.
        assert!(!t.observe(ProbeOutcome::Serving, at(2_000)));
        assert!(!t.confirm(at(2_999)));
        assert!(t.confirm(at(3_000)));
        assert_eq!(t.verdict().health, Health::Serving);
        assert!(!t.on_probation());
    }

    #[test]
    fn a_confirmed_answer_resets_the_failure_count() {
        let start = Instant::now();
        let mut t = tracker(Health::Serving, 1, 2);
        t.connection_broke();
        t.observe(UNSTABLE, start);
        t.observe(ProbeOutcome::Serving, start);
        assert!(
            !t.confirm(start + INTERVAL),
            "confirming a Serving verdict changes nothing"
        );
        t.observe(UNSTABLE, start + INTERVAL * 2);
        assert_eq!(
            t.verdict().health,
            Health::Serving,
            "one failure since the confirmation"
        );
    }

    #[test]
    fn a_failure_or_a_rotation_drops_an_answer_waiting_for_confirmation() {
        let start = Instant::now();
        let mut t = tracker(Health::NotServing, 1, 1);
        t.connection_broke();
        t.observe(ProbeOutcome::Serving, start);
        t.connection_ended();
        assert!(
            !t.confirm(start + INTERVAL * 2),
            "the rotated connection's answer is gone"
        );
        t.observe(ProbeOutcome::Serving, start + INTERVAL * 2);
        t.observe(ProbeOutcome::Failed(Failure::Timeout), start + INTERVAL * 3);
        assert!(!t.confirm(start + INTERVAL * 4));
        assert_eq!(t.verdict().health, Health::NotServing);
    }

    #[test]
    fn under_probation_explicit_answers_still_count_at_once_and_new_endpoints_are_not_delayed() {
        let now = Instant::now();
        let mut t = tracker(Health::Serving, 1, 5);
        t.connection_broke();
        assert!(t.observe(NOT_SERVING, now));
        // No failure history: the first answer counts at once.
        let mut fresh = tracker(Health::Unknown, 1, 3);
        assert!(fresh.observe(ProbeOutcome::Serving, now));
    }

    const W: Duration = Duration::from_secs(2);

    fn damped(initial: Health) -> HealthTracker {
        let verdict = HealthVerdict {
            health: initial,
            reason: None,
        };
        HealthTracker::new(
            verdict,
            Thresholds {
                healthy: 1,
                unhealthy: 1,
            },
            INTERVAL,
            W,
        )
    }

    #[test]
    fn a_quick_return_to_serving_is_held_as_flapping_until_stable_for_the_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut t = damped(Health::Serving);
        assert!(t.observe(NOT_SERVING, at(0)));
        assert_eq!(t.verdict().reason.as_deref(), Some("NotServing"));
        assert!(t.observe(ProbeOutcome::Serving, at(300)));
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some(FLAPPING));
        assert_eq!(t.deadline(), Some(at(2_300)));
        assert!(!t.wake(at(2_299)));
        assert!(t.wake(at(2_300)));
        assert_eq!(t.verdict().health, Health::Serving);
        assert_eq!(t.deadline(), None);
        // A return after the window is no flap.
        let mut t = damped(Health::Serving);
        t.observe(NOT_SERVING, at(0));
        assert!(t.observe(ProbeOutcome::Serving, at(2_000)));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn a_flapping_endpoint_changes_its_published_health_at_most_twice_per_hold() {
        let start = Instant::now();
        let mut t = damped(Health::Serving);
        let mut changes = Vec::new();
        // SERVING and NOT_SERVING alternating every 100 ms for a minute, releases included.
        for step in 0..600u64 {
            let now = start + Duration::from_millis(step * 100);
            if t.wake(now) {
                changes.push((now, t.verdict().clone()));
            }
            let outcome = if step % 2 == 0 {
                NOT_SERVING
            } else {
                ProbeOutcome::Serving
            };
            if t.observe(outcome, now) {
                changes.push((now, t.verdict().clone()));
            }
        }
        assert_eq!(changes.len(), 2, "NotServing, then held as Flapping: {changes:?}");
        assert_eq!(t.verdict().reason.as_deref(), Some(FLAPPING));

        // NotServing for 0.5 s, then Serving for 1 s once released, repeatedly: the hold
        // doubles up to 8 W.
        let mut t = damped(Health::Serving);
        let mut changes = 0;
        let mut now = start;
        let mut last_release = None;
        for _ in 0..40 {
            changes += usize::from(t.observe(NOT_SERVING, now));
            now += Duration::from_millis(500);
            changes += usize::from(t.observe(ProbeOutcome::Serving, now));
            let mut served = Duration::ZERO;
            while served < Duration::from_secs(1) || t.verdict().health != Health::Serving {
                now += Duration::from_millis(100);
                served += Duration::from_millis(100);
                if t.wake(now) {
                    changes += 1;
                    if let Some(last) = last_release {
                        assert!(now - last >= W, "releases at least a window apart");
                    }
                    last_release = Some(now);
                }
            }
            now += Duration::from_secs(1);
        }
        let elapsed = now - start;
        let per_window = changes as f64 / (elapsed.as_secs_f64() / W.as_secs_f64());
        assert!(
            per_window <= 1.0,
            "{changes} changes in {elapsed:?}: {per_window} per window"
        );
        assert_eq!(t.hold_for(), W * 8, "the hold grew to its maximum");
    }
}
