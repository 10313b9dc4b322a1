//! Weights, as a pure function of an endpoint's state, its policy and the clock.
//!
//! `Equal`: every usable endpoint (Kubernetes-serving, not terminating, gRPC Serving) gets
//! [`FULL_WEIGHT`]; every other endpoint 0. With a slow-start window, an endpoint that just
//! became usable starts at 10% and steps up by 10% every tenth of the window (full weight from
//! nine tenths of the window on), so a cold
//! process is not handed its full share at once. Steps rather than a smooth ramp because every
//! change is a status write that wakes every client.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kubegrpc_crds::{FULL_WEIGHT, WeightingPolicy};

/// Number of slow-start steps from 10% to 100%.
const SLOW_START_STEPS: u32 = 10;

/// An endpoint's weight and when it will change by itself (the next slow-start step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub weight: u32,
    pub changes_in: Option<Duration>,
}

/// The weight of one endpoint.
///
/// `usable_since` is when the endpoint last became usable (its published `lastTransitionTime`),
/// so that a restarted operator continues a ramp where it was.
pub fn weight(
    policy: WeightingPolicy,
    usable: bool,
    usable_since: Timestamp,
    now: Timestamp,
    slow_start_window: Duration,
) -> Weighted {
    match policy {
        WeightingPolicy::Equal => equal(usable, usable_since, now, slow_start_window),
    }
}

fn equal(usable: bool, usable_since: Timestamp, now: Timestamp, window: Duration) -> Weighted {
    if !usable {
        return Weighted {
            weight: 0,
            changes_in: None,
        };
    }
    let step_length = window / SLOW_START_STEPS;
    if step_length.is_zero() {
        return Weighted {
            weight: FULL_WEIGHT,
            changes_in: None,
        };
    }
    // A clock that went backwards counts as no time elapsed.
    let elapsed = Duration::try_from(now.duration_since(usable_since)).unwrap_or(Duration::ZERO);
    let steps_done = (elapsed.as_nanos() / step_length.as_nanos()).min(u128::from(SLOW_START_STEPS)) as u32;
    let step = steps_done + 1;
    if step >= SLOW_START_STEPS {
        return Weighted {
            weight: FULL_WEIGHT,
            changes_in: None,
        };
    }
    Weighted {
        weight: FULL_WEIGHT * step / SLOW_START_STEPS,
        changes_in: Some(step_length * step - elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    const WINDOW: Duration = Duration::from_secs(100);

    #[test]
    fn equal_gives_every_usable_endpoint_full_weight_and_others_zero() {
        let usable = weight(WeightingPolicy::Equal, true, at(0), at(0), Duration::ZERO);
        assert_eq!(
            usable,
            Weighted {
                weight: FULL_WEIGHT,
                changes_in: None
            }
        );
        let unusable = weight(WeightingPolicy::Equal, false, at(0), at(0), WINDOW);
        assert_eq!(
            unusable,
            Weighted {
                weight: 0,
                changes_in: None
            }
        );
    }

    #[test]
    fn slow_start_steps_from_ten_percent_to_full() {
        let w = |elapsed: i64| weight(WeightingPolicy::Equal, true, at(0), at(elapsed), WINDOW);
        assert_eq!(
            w(0),
            Weighted {
                weight: 10,
                changes_in: Some(Duration::from_secs(10))
            }
        );
        assert_eq!(
            w(9),
            Weighted {
                weight: 10,
                changes_in: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(
            w(10),
            Weighted {
                weight: 20,
                changes_in: Some(Duration::from_secs(10))
            }
        );
        assert_eq!(
            w(55),
            Weighted {
                weight: 60,
                changes_in: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(
            w(89),
            Weighted {
                weight: 90,
                changes_in: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(
            w(90),
            Weighted {
                weight: FULL_WEIGHT,
                changes_in: None
            }
        );
        assert_eq!(
            w(1000),
            Weighted {
                weight: FULL_WEIGHT,
                changes_in: None
            }
        );
    }

    #[test]
    fn a_clock_that_went_back_starts_the_ramp_over_rather_than_panicking() {
        let w = weight(WeightingPolicy::Equal, true, at(50), at(0), WINDOW);
        assert_eq!(w.weight, 10);
    }

    #[test]
    fn weights_never_decrease_along_a_ramp() {
        let mut last = 0;
        for elapsed in 0..200 {
            let w = weight(WeightingPolicy::Equal, true, at(0), at(elapsed), WINDOW).weight;
            assert!(w >= last && w > 0);
            last = w;
        }
        assert_eq!(last, FULL_WEIGHT);
    }
}
