//! Failing open: when the operator's health checks are more likely wrong than the backends.
//!
//! One health check for every client means one wrong view for every client: a NetworkPolicy
//! that admits the application's clients but not the operator, or a check that breaks while
//! the service works, would otherwise take every client down at once. So the operator applies
//! Envoy's `healthy_panic_threshold` once, for every client (grpc-go and grpc-java have no
//! panic mode of their own, and the Rust client's is only a second line): below the
//! threshold, the GrpcBackend fails open and every Kubernetes-ready endpoint is published
//! usable.
//!
//! Counted ("candidates"): endpoints Kubernetes calls ready (serving, not terminating) whose
//! weight the policy set above 0, with a concluded health (Serving or NotServing). Endpoints
//! not probed to a conclusion yet (Unknown) and endpoints weighted 0 on purpose are neither
//! counted nor used: a new Pod must pass its first check before it takes traffic, failing open
//! or not.
//!
//! The GrpcBackend fails open when there is a candidate and
//! - every candidate's latest probe failed at connect time, with at least two of them (the
//!   operator's own network path is the likelier cause), or
//! - no candidate passes its check (an empty endpoint list would fail every call, while
//!   Kubernetes says the Pods are ready), or
//! - fewer than `threshold` percent of the candidates pass.

/// What the decision needs of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Kubernetes calls it ready: serving and not terminating.
    pub kubernetes_ready: bool,
    /// The weight the policy gives it above 0.
    pub weighted: bool,
    /// Its health check concluded (Serving or NotServing, not Unknown).
    pub concluded: bool,
    /// It passes its health check (Serving).
    pub passing: bool,
    /// Its latest probe failed at connect time.
    pub connect_failing: bool,
}

impl Checked {
    fn counts(self) -> bool {
        self.kubernetes_ready && self.weighted && self.concluded
    }

    /// Whether clients use it while the GrpcBackend fails open although it does not pass.
    pub fn used_when_failing_open(&self) -> bool {
        self.counts() && !self.passing
    }
}

/// Why a GrpcBackend fails open, with the counts the condition's message gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOpen {
    /// Enough candidates pass: the health checks are trusted.
    No,
    /// Every probe of at least two candidates fails at connect time.
    ProbesFailingToConnect { candidates: usize },
    /// No candidate passes.
    NonePassing { candidates: usize },
    /// Fewer than the threshold pass.
    BelowThreshold {
        passing: usize,
        candidates: usize,
        threshold: u32,
    },
}

impl FailOpen {
    pub fn is_failing_open(&self) -> bool {
        *self != FailOpen::No
    }
}

/// Decides whether a GrpcBackend whose endpoints are `endpoints` fails open, with the panic
/// threshold `threshold` (percent, clamped to 100).
pub fn decide(endpoints: impl IntoIterator<Item = Checked>, threshold: u32) -> FailOpen {
    let threshold = threshold.min(100);
    let (mut candidates, mut passing, mut connect_failing) = (0usize, 0usize, 0usize);
    for endpoint in endpoints.into_iter().filter(|endpoint| endpoint.counts()) {
        candidates += 1;
        passing += usize::from(endpoint.passing);
        connect_failing += usize::from(endpoint.connect_failing);
    }
    if candidates == 0 {
        FailOpen::No
    } else if candidates >= 2 && connect_failing == candidates {
        FailOpen::ProbesFailingToConnect { candidates }
    } else if passing == 0 {
        FailOpen::NonePassing { candidates }
    } else if (passing as u128) * 100 < u128::from(threshold) * (candidates as u128) {
        FailOpen::BelowThreshold {
            passing,
            candidates,
            threshold,
        }
    } else {
        FailOpen::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSING: Checked = Checked {
        kubernetes_ready: true,
        weighted: true,
        concluded: true,
        passing: true,
        connect_failing: false,
    };
    const FAILING: Checked = Checked {
        passing: false,
        ..PASSING
    };
    const UNREACHABLE: Checked = Checked {
        passing: false,
        connect_failing: true,
        ..PASSING
    };

    fn of(passing: usize, failing: usize) -> Vec<Checked> {
        std::iter::repeat_n(PASSING, passing)
            .chain(std::iter::repeat_n(FAILING, failing))
            .collect()
    }

    #[test]
    fn half_passing_is_trusted_below_half_fails_open_at_the_default_threshold() {
        assert_eq!(decide(of(2, 2), 50), FailOpen::No);
        assert_eq!(
            decide(of(1, 2), 50),
            FailOpen::BelowThreshold {
                passing: 1,
                candidates: 3,
                threshold: 50
            }
        );
        assert_eq!(decide(of(3, 0), 50), FailOpen::No);
    }

    #[test]
    fn none_passing_fails_open_whatever_the_threshold() {
        assert_eq!(decide(of(0, 3), 0), FailOpen::NonePassing { candidates: 3 });
        assert_eq!(decide(of(0, 1), 50), FailOpen::NonePassing { candidates: 1 });
        // Threshold 0: only that case and the connect-time one.
        assert_eq!(decide(of(1, 9), 0), FailOpen::No);
    }

    #[test]
    fn every_probe_failing_at_connect_time_fails_open_even_while_still_serving() {
        // Probes fail at connect time before the unhealthy threshold is crossed: the endpoints
        // are still Serving, but the operator cannot reach any of them.
        let reaching_none = Checked {
            connect_failing: true,
            ..PASSING
        };
        assert_eq!(
            decide([reaching_none; 3], 50),
            FailOpen::ProbesFailingToConnect { candidates: 3 }
        );
        assert_eq!(
            decide([UNREACHABLE; 2], 0),
            FailOpen::ProbesFailingToConnect { candidates: 2 }
        );
        // One endpoint refusing connections says nothing about the operator's network.
        assert_eq!(decide([reaching_none], 50), FailOpen::No);
        assert_eq!(decide([reaching_none, reaching_none, PASSING], 50), FailOpen::No);
    }

    #[test]
    fn unknown_not_ready_and_weighted_out_endpoints_are_not_counted() {
        let unknown = Checked {
            concluded: false,
            passing: false,
            ..PASSING
        };
        let not_ready = Checked {
            kubernetes_ready: false,
            ..FAILING
        };
        let weighted_out = Checked {
            weighted: false,
            ..FAILING
        };
        // Three new Pods still unprobed beside one passing: trusted, the new ones wait.
        assert_eq!(decide([PASSING, unknown, unknown, unknown], 50), FailOpen::No);
        assert!(!unknown.used_when_failing_open());
        assert_eq!(decide([PASSING, not_ready, weighted_out], 100), FailOpen::No);
        assert_eq!(decide([unknown, not_ready], 50), FailOpen::No);
        assert!(FAILING.used_when_failing_open() && !PASSING.used_when_failing_open());
    }

    #[test]
    fn threshold_100_fails_open_unless_every_candidate_passes_and_large_counts_do_not_overflow() {
        assert!(decide(of(9, 1), 100).is_failing_open());
        assert_eq!(decide(of(10, 0), 100), FailOpen::No);
        assert_eq!(decide(of(10, 0), 1000), FailOpen::No, "clamped to 100");
        assert!(decide(of(49_999, 50_001), 50).is_failing_open());
        assert!(!decide(of(50_000, 50_000), 50).is_failing_open());
    }
}
