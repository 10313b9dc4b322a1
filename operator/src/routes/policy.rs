//! Timeouts and retries of a route: GRPCRoute has no fields for them, so, as Linkerd does, they
//! are annotations of the route, applying to every rule of it (a rule needing other settings
//! goes in a route of its own):
//!
//! | annotation | value | default |
//! |---|---|---|
//! | `kubegrpc.io/timeout` | a duration (`200ms`, `5s`), 1ms to 1h: the whole call, retries included | none |
//! | `kubegrpc.io/retry-on` | gRPC codes, comma-separated: `unavailable`, `resource-exhausted`, `internal`, `deadline-exceeded`, `cancelled` | no retries |
//! | `kubegrpc.io/retry-limit` | retries after the first attempt, 1 to 4 | 2 |
//! | `kubegrpc.io/retry-backoff` | the first backoff, 1ms to 10s; later ones double, at most 10 times it | 25ms |
//! | `kubegrpc.io/retry-budget` | retries over 10 s may reach this share of the calls (or 10 a second, whichever is more), `1%` to `100%` | 20% |
//!
//! A value that does not parse is left out (the others still apply) and reported in the route's
//! status (`kubegrpc.io/PolicyValid=False`).

use std::{collections::BTreeMap, time::Duration as StdDuration};

use kube::core::Duration;
use kubegrpc_crds::routes::RetryPolicy;

pub const TIMEOUT: &str = "kubegrpc.io/timeout";
pub const RETRY_ON: &str = "kubegrpc.io/retry-on";
pub const RETRY_LIMIT: &str = "kubegrpc.io/retry-limit";
pub const RETRY_BACKOFF: &str = "kubegrpc.io/retry-backoff";
pub const RETRY_BUDGET: &str = "kubegrpc.io/retry-budget";

/// The codes gRPC clients retry on (gRFC A44's `retry_on` values grpc-go and grpc-java accept).
const RETRYABLE: [&str; 5] = [
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
];

/// A route's timeout and retry policy, and what could not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub problems: Vec<String>,
}

/// Reads the policy annotations of a route.
pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Policy {
    let mut policy = Policy::default();
    let mut problems = Vec::new();
    let get = |key: &str| annotations.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());

    if let Some(value) = get(TIMEOUT) {
        match duration_within(value, StdDuration::from_millis(1), StdDuration::from_secs(3600)) {
            Ok(timeout) => policy.timeout = Some(timeout),
            Err(why) => problems.push(format!("{TIMEOUT}: {why}")),
        }
    }

    let codes = get(RETRY_ON).map(|value| {
        let mut codes = Vec::new();
        for code in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let canonical = code.to_ascii_uppercase().replace('-', "_");
            if RETRYABLE.contains(&canonical.as_str()) {
                if !codes.contains(&canonical) {
                    codes.push(canonical);
                }
            } else {
                problems.push(format!(
                    "{RETRY_ON}: {code:?} is not a code gRPC clients retry on (one of: unavailable, resource-exhausted, internal, deadline-exceeded, cancelled)"
                ));
            }
        }
        codes
    });
    let attempts = match get(RETRY_LIMIT).map(str::parse::<u8>) {
        None => 2,
        Some(Ok(limit)) if (1..=4).contains(&limit) => limit,
        Some(_) => {
            problems.push(format!("{RETRY_LIMIT}: must be a number from 1 to 4"));
            2
        }
    };
    let backoff = match get(RETRY_BACKOFF) {
        None => StdDuration::from_millis(25),
        Some(value) => match duration_within(value, StdDuration::from_millis(1), StdDuration::from_secs(10)) {
            Ok(backoff) => backoff.into(),
            Err(why) => {
                problems.push(format!("{RETRY_BACKOFF}: {why}"));
                StdDuration::from_millis(25)
            }
        },
    };
    let budget_percent = match get(RETRY_BUDGET).map(|v| v.strip_suffix('%').unwrap_or(v).trim().parse::<u8>()) {
        None => 20,
        Some(Ok(percent)) if (1..=100).contains(&percent) => percent,
        Some(_) => {
            problems.push(format!("{RETRY_BUDGET}: must be a percentage from 1% to 100%"));
            20
        }
    };
    match codes {
        Some(codes) if !codes.is_empty() => {
            policy.retry = Some(RetryPolicy {
                codes,
                attempts,
                backoff: backoff.into(),
                max_backoff: (backoff * 10).into(),
                budget_percent,
            });
        }
        Some(_) => {}
        None => {
            for key in [RETRY_LIMIT, RETRY_BACKOFF, RETRY_BUDGET] {
                if get(key).is_some() {
                    problems.push(format!("{key} has no effect without {RETRY_ON}"));
                }
            }
        }
    }
    policy.problems = problems;
    policy
}

fn duration_within(value: &str, min: StdDuration, max: StdDuration) -> Result<Duration, String> {
    let parsed: Duration = value
        .parse()
        .map_err(|_| format!("{value:?} is not a duration such as 200ms or 5s"))?;
    let std: StdDuration = if parsed.is_negative() {
        StdDuration::ZERO
    } else {
        parsed.into()
    };
    if std < min || std > max {
        return Err(format!("{value:?} must be from {min:?} to {max:?}"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn no_annotations_no_policy() {
        assert_eq!(from_annotations(&BTreeMap::new()), Policy::default());
    }

    #[test]
    fn retry_on_with_defaults_and_a_timeout() {
        let policy = from_annotations(&annotations(&[
            (TIMEOUT, "200ms"),
            (RETRY_ON, "unavailable, Resource-Exhausted,unavailable"),
        ]));
        assert_eq!(policy.timeout, Some(StdDuration::from_millis(200).into()));
        let retry = policy.retry.unwrap();
        assert_eq!(retry.codes, vec!["UNAVAILABLE", "RESOURCE_EXHAUSTED"]);
        assert_eq!(retry.attempts, 2);
        assert_eq!(StdDuration::from(retry.backoff), StdDuration::from_millis(25));
        assert_eq!(StdDuration::from(retry.max_backoff), StdDuration::from_millis(250));
        assert_eq!(retry.budget_percent, 20);
        assert!(policy.problems.is_empty());
    }

    #[test]
    fn every_setting_is_read() {
        let policy = from_annotations(&annotations(&[
            (RETRY_ON, "internal"),
            (RETRY_LIMIT, "4"),
            (RETRY_BACKOFF, "100ms"),
            (RETRY_BUDGET, "50%"),
        ]));
        let retry = policy.retry.unwrap();
        assert_eq!((retry.attempts, retry.budget_percent), (4, 50));
        assert_eq!(StdDuration::from(retry.max_backoff), StdDuration::from_secs(1));
    }

    #[test]
    fn bad_values_are_reported_and_left_out() {
        let policy = from_annotations(&annotations(&[
            (TIMEOUT, "soon"),
            (RETRY_ON, "unavailable,not-found"),
            (RETRY_LIMIT, "9"),
            (RETRY_BACKOFF, "1h"),
            (RETRY_BUDGET, "0%"),
        ]));
        assert_eq!(policy.timeout, None);
        let retry = policy.retry.unwrap();
        assert_eq!(retry.codes, vec!["UNAVAILABLE"]);
        assert_eq!(retry.attempts, 2, "the default stands in");
        assert_eq!(policy.problems.len(), 5, "{:?}", policy.problems);
        assert!(policy.problems.iter().any(|p| p.contains("\"not-found\"")));

        let orphan = from_annotations(&annotations(&[(RETRY_LIMIT, "3")]));
        assert_eq!(orphan.retry, None);
        assert_eq!(
            orphan.problems,
            vec![format!("{RETRY_LIMIT} has no effect without {RETRY_ON}")]
        );
        assert!(
            !from_annotations(&annotations(&[(TIMEOUT, "0s")])).problems.is_empty(),
            "a zero timeout would fail every call"
        );
    }
}
