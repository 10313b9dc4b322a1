//! The health of one endpoint from its probe outcomes: thresholds, as a pure state machine.
//!
//! Transport failures (connect errors, timeouts, broken streams) count against the unhealthy
//! threshold: they may be a blip. An explicit answer from the server's health service
//! (NOT_SERVING, SERVICE_UNKNOWN) is authoritative and counts at once: the server said so.
//! Successes count toward the healthy threshold before an endpoint that was not Serving is.

use kubegrpc_crds::Health;

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
    successes: u32,
    failures: u32,
    connect_failing: bool,
}

impl HealthTracker {
    /// Starts from `initial`: `Unknown` for a new endpoint, or the health already published in
    /// the status (so a restarted or newly elected operator changes nothing until its own
    /// probes cross a threshold).
    pub fn new(initial: HealthVerdict, thresholds: Thresholds) -> Self {
        Self {
            verdict: initial,
            thresholds: Thresholds {
                healthy: thresholds.healthy.max(1),
                unhealthy: thresholds.unhealthy.max(1),
            },
            successes: 0,
            failures: 0,
            connect_failing: false,
        }
    }

    pub fn verdict(&self) -> &HealthVerdict {
        &self.verdict
    }

    /// Whether the latest outcome was a failure at connect time.
    pub fn connect_failing(&self) -> bool {
        self.connect_failing
    }

    /// Feeds one outcome; returns true when the verdict or `connect_failing` changed.
    pub fn observe(&mut self, outcome: ProbeOutcome) -> bool {
        let before = (self.verdict.clone(), self.connect_failing);
        self.connect_failing = matches!(outcome, ProbeOutcome::Failed(f) if f.at_connect_time());
        match outcome {
            ProbeOutcome::Serving => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if self.verdict.health != Health::Serving && self.successes >= self.thresholds.healthy {
                    self.set(Health::Serving, outcome);
                }
            }
            ProbeOutcome::NotServing(_) => {
                self.successes = 0;
                self.failures = 0;
                if self.verdict.health != Health::NotServing {
                    self.set(Health::NotServing, outcome);
                }
            }
            ProbeOutcome::Failed(_) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.verdict.health != Health::NotServing && self.failures >= self.thresholds.unhealthy {
                    self.set(Health::NotServing, outcome);
                }
            }
        }
        (self.verdict.clone(), self.connect_failing) != before
    }

    fn set(&mut self, health: Health, cause: ProbeOutcome) {
        self.verdict = HealthVerdict {
            health,
            reason: Some(cause.reason().into_owned()),
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
        )
    }

    const CONNECT_FAILED: ProbeOutcome = ProbeOutcome::Failed(Failure::ConnectRefused);
    const NOT_SERVING: ProbeOutcome = ProbeOutcome::NotServing(NotServingAnswer::NotServing);

    #[test]
    fn unknown_becomes_serving_after_the_healthy_threshold() {
        let mut t = tracker(Health::Unknown, 2, 3);
        assert!(!t.observe(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Unknown);
        assert!(t.observe(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Serving);
        assert_eq!(t.verdict().reason.as_deref(), Some("Serving"));
    }

    #[test]
    fn transport_failures_count_against_the_unhealthy_threshold() {
        let mut t = tracker(Health::Serving, 1, 3);
        assert!(!t.observe(ProbeOutcome::Failed(Failure::Timeout)));
        assert!(!t.observe(ProbeOutcome::Failed(Failure::Unstable)));
        assert!(t.observe(ProbeOutcome::Failed(Failure::Timeout)));
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some("Timeout"));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = tracker(Health::Serving, 1, 2);
        t.observe(ProbeOutcome::Failed(Failure::Timeout));
        t.observe(ProbeOutcome::Serving);
        t.observe(ProbeOutcome::Failed(Failure::Timeout));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn an_explicit_not_serving_counts_at_once_whatever_the_threshold() {
        let mut t = tracker(Health::Serving, 1, 100);
        assert!(t.observe(NOT_SERVING));
        assert_eq!(t.verdict().health, Health::NotServing);
        assert_eq!(t.verdict().reason.as_deref(), Some("NotServing"));
        // Back to Serving at the healthy threshold (1).
        assert!(t.observe(ProbeOutcome::Serving));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn a_seeded_verdict_holds_until_a_threshold_is_crossed() {
        // A newly elected leader starts from the published Serving: one failure changes nothing.
        let mut t = tracker(Health::Serving, 1, 3);
        assert!(!t.observe(ProbeOutcome::Serving));
        assert!(!t.observe(ProbeOutcome::Failed(Failure::Timeout)));
        assert_eq!(t.verdict().health, Health::Serving);
    }

    #[test]
    fn the_reason_is_set_when_the_health_changes_only() {
        let mut t = tracker(Health::Serving, 1, 1);
        t.observe(CONNECT_FAILED);
        assert_eq!(t.verdict().reason.as_deref(), Some("ConnectRefused"));
        // Still NotServing for another cause: the published reason stays, nothing to write.
        assert!(!t.observe(ProbeOutcome::Failed(Failure::ConnectTimeout)));
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
        assert!(t.observe(CONNECT_FAILED));
        assert!(t.connect_failing());
        assert!(!t.observe(CONNECT_FAILED));
        assert!(t.observe(ProbeOutcome::Failed(Failure::Timeout)));
        assert!(!t.connect_failing());
    }
}
