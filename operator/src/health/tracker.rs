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

/// How a probe failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The TCP or HTTP/2 connection was refused or reset.
    ConnectFailed,
    /// No connection within the timeout (a dropped SYN, a frozen process).
    ConnectTimeout,
    /// No answer within the timeout on an open connection.
    Timeout,
    /// An open Watch stream or its connection broke (keepalive unanswered, reset, closed).
    StreamBroken,
    /// The call failed with another gRPC status.
    CallFailed,
}

impl Failure {
    /// Failures at connect time: when every endpoint fails that way at once, the operator's
    /// own network is the likelier cause.
    pub fn at_connect_time(self) -> bool {
        matches!(self, Failure::ConnectFailed | Failure::ConnectTimeout)
    }
}

impl ProbeOutcome {
    /// The `reason` published with a health that this outcome caused.
    pub fn reason(self) -> &'static str {
        match self {
            ProbeOutcome::Serving => "Serving",
            ProbeOutcome::NotServing(NotServingAnswer::NotServing) => "NotServing",
            ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown) => "ServiceUnknown",
            ProbeOutcome::NotServing(NotServingAnswer::NotFound) => "ServiceNotFound",
            ProbeOutcome::NotServing(NotServingAnswer::Unknown) => "HealthUnknown",
            ProbeOutcome::Failed(Failure::ConnectFailed) => "ConnectFailed",
            ProbeOutcome::Failed(Failure::ConnectTimeout) => "ConnectTimeout",
            ProbeOutcome::Failed(Failure::Timeout) => "Timeout",
            ProbeOutcome::Failed(Failure::StreamBroken) => "StreamBroken",
            ProbeOutcome::Failed(Failure::CallFailed) => "CallFailed",
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
            reason: Some(cause.reason().to_string()),
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

    const CONNECT_FAILED: ProbeOutcome = ProbeOutcome::Failed(Failure::ConnectFailed);
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
        assert!(!t.observe(ProbeOutcome::Failed(Failure::StreamBroken)));
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
        assert_eq!(t.verdict().reason.as_deref(), Some("ConnectFailed"));
        // Still NotServing for another cause: the published reason stays, nothing to write.
        assert!(!t.observe(ProbeOutcome::Failed(Failure::ConnectTimeout)));
        assert_eq!(t.verdict().reason.as_deref(), Some("ConnectFailed"));
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
