//! Timeouts and retries of a routing table's entries (`status.routes[].timeout` and `.retry`,
//! from a GRPCRoute's `kubegrpc.io/...` annotations): the pure parts. What a call does with them
//! is in [`crate::route_call`].
//!
//! As gRPC's xDS clients apply the same settings (gRFC A31's `max_stream_duration`, gRFC A6/A44
//! retries), so that every client kind treats a call alike:
//! - the timeout bounds the whole call, retries and backoffs included; the caller's own deadline
//!   (its `grpc-timeout`) applies when shorter;
//! - a call is retried only while it is not committed: its response was Trailers-Only (the
//!   `grpc-status` in the response headers, no message) with a listed code, or the transport
//!   failed before any response headers (UNAVAILABLE, as gRPC reports it); once the headers of
//!   a response with a body arrive, the call is committed;
//! - the n-th retry waits a random time below `min(backoff x 2^(n-1), maxBackoff)` (gRFC A6's
//!   full jitter), or what the server asked for in `grpc-retry-pushback-ms` (a negative or
//!   malformed value: no retry);
//! - a retry budget (the Rust client's; xDS clients have only the attempt limit) keeps retries
//!   from multiplying an outage: over the last 10 s, retries may be at most
//!   `max(RETRY_BUDGET_MIN_PER_SECOND x 10, budgetPercent % of the calls)`.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use kubegrpc_crds::routes::{RETRY_BUDGET_MIN_PER_SECOND, RouteEntry};
use tonic::Code;

use crate::failure::Failure;

/// The window a retry budget counts over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// The window in whole seconds: one bucket each.
const BUDGET_BUCKETS: usize = 10;
/// The most retries after the first attempt (gRPC clients make at most 5 attempts).
pub const MAX_RETRIES: u8 = 4;

/// What an entry of the table asks of the calls it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPolicy {
    /// The longest a call may take, retries included.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

/// How calls are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The retryable codes, one bit per code (`1 << code`).
    codes: u32,
    /// Retries after the first attempt, 1 to [`MAX_RETRIES`].
    pub retries: u8,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// The share of calls that may be retries, 1 to 100.
    pub budget_percent: u8,
}

impl EntryPolicy {
    /// The entry's timeout and retry policy, if it has either, and what in them could not be
    /// applied as written (left out or brought within bounds, each with a line saying so).
    pub fn of(entry: &RouteEntry) -> (Option<Self>, Vec<String>) {
        let mut notes = Vec::new();
        let timeout = entry.timeout.and_then(|timeout| {
            if timeout.is_negative() || Duration::from(timeout).is_zero() {
                notes.push(format!("timeout {timeout} is not above 0; no timeout applies"));
                None
            } else {
                Some(Duration::from(timeout))
            }
        });
        let retry = entry.retry.as_ref().and_then(|retry| {
            let mut codes = 0;
            for name in &retry.codes {
                match code_named(name) {
                    Some(code) => codes |= 1 << code as i32,
                    None => notes.push(format!("retry code {name:?} is not a gRPC status code; left out")),
                }
            }
            if codes == 0 {
                notes.push("no retry code applies; calls are not retried".into());
                return None;
            }
            let retries = retry.attempts.clamp(1, MAX_RETRIES);
            if retries != retry.attempts {
                notes.push(format!(
                    "{} retries brought to {retries} (1 to {MAX_RETRIES})",
                    retry.attempts
                ));
            }
            let positive = |value: kube::core::Duration, what: &str, default: Duration, notes: &mut Vec<String>| {
                if value.is_negative() || Duration::from(value).is_zero() {
                    notes.push(format!("{what} {value} is not above 0; {default:?} applies"));
                    default
                } else {
                    Duration::from(value)
                }
            };
            let backoff = positive(retry.backoff, "backoff", Duration::from_millis(25), &mut notes);
            let max_backoff = positive(retry.max_backoff, "maxBackoff", backoff * 10, &mut notes).max(backoff);
            let budget_percent = retry.budget_percent.clamp(1, 100);
            if budget_percent != retry.budget_percent {
                notes.push(format!(
                    "budgetPercent {} brought to {budget_percent} (1 to 100)",
                    retry.budget_percent
                ));
            }
            Some(RetryPolicy {
                codes,
                retries,
                backoff,
                max_backoff,
                budget_percent,
            })
        });
        let policy = (timeout.is_some() || retry.is_some()).then_some(Self { timeout, retry });
        (policy, notes)
    }
}

impl RetryPolicy {
    /// Whether a call that failed with `code` may be retried.
    pub fn retries_on(&self, code: Code) -> bool {
        code != Code::Ok && self.codes & (1 << code as i32) != 0
    }

    /// The longest wait before retry number `retry` (1 for the first) counted since the last
    /// pushback: `backoff x 2^(retry-1)`, at most `max_backoff`.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.backoff.saturating_mul(1 << doublings).min(self.max_backoff)
    }
}

/// gRFC A6's full jitter: a wait uniformly below `cap`, from `random` (any 64 bits).
pub fn jittered(cap: Duration, random: u64) -> Duration {
    // cap x (a fraction in [0, 1) of 64 bits), rounded down: always below the cap.
    let nanos = cap.as_nanos().saturating_mul(u128::from(random)) >> 64;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A random 64-bit number, for jitter and weighted choices (no cryptographic quality needed).
pub fn random() -> u64 {
    use std::{
        hash::BuildHasher,
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// One of the items whose weight is above 0 and that `accept` takes, in proportion to their
/// weights, from `random`; `None` if there is none.
pub fn weighted_choice(weights: &[u32], accept: impl Fn(usize) -> bool, random: u64) -> Option<usize> {
    let total: u64 = weights
        .iter()
        .enumerate()
        .filter(|(i, w)| **w > 0 && accept(*i))
        .map(|(_, w)| u64::from(*w))
        .sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for (i, w) in weights.iter().enumerate() {
        if *w == 0 || !accept(i) {
            continue;
        }
        if point < u64::from(*w) {
            return Some(i);
        }
        point -= u64::from(*w);
    }
    None
}

/// The gRPC code of a response that ends the call at its headers (Trailers-Only: the
/// `grpc-status` is in the headers), or of a non-200 HTTP response without one (gRPC's HTTP to
/// status code mapping). `None`: the response has a body to come, and the call is committed.
pub fn trailers_only_code(status: StatusCode, headers: &HeaderMap) -> Option<Code> {
    if let Some(value) = headers.get("grpc-status") {
        let code = value.to_str().ok().and_then(|v| v.parse::<i32>().ok());
        return Some(code.map_or(Code::Unknown, Code::from_i32));
    }
    if status == StatusCode::OK {
        return None;
    }
    Some(match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    })
}

/// The gRPC code of a request that failed at the transport before any response, as gRPC
/// clients report it (UNAVAILABLE); `None` for the caller's own outcomes (its per-attempt
/// timeout, its request body failing), which are never retried.
pub fn transport_code(failure: Failure) -> Option<Code> {
    match failure {
        Failure::Connect | Failure::Rotation | Failure::Transport | Failure::Drained => Some(Code::Unavailable),
        Failure::Deadline | Failure::Caller => None,
    }
}

/// What the server asked of retries (`grpc-retry-pushback-ms`, gRFC A6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing: the backoff applies.
    None,
    /// Retry after this long (and count backoffs from the first again).
    After(Duration),
    /// Do not retry (a negative or malformed value).
    Stop,
}

impl Pushback {
    pub fn of(headers: &HeaderMap) -> Self {
        let Some(value) = headers.get("grpc-retry-pushback-ms") else {
            return Self::None;
        };
        match value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(ms) => Self::After(Duration::from_millis(ms)),
            None => Self::Stop,
        }
    }
}

/// A caller's `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit), if valid.
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    let unit = text.chars().last()?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `remaining` as a `grpc-timeout` value: the finest unit that holds it in 8 digits, rounded
/// down (a server must not think it has longer than the caller waits).
pub fn grpc_timeout_value(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = remaining.as_nanos();
    let (amount, unit) = if nanos <= MAX {
        (nanos, 'n')
    } else if nanos / 1_000 <= MAX {
        (nanos / 1_000, 'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos / 1_000_000, 'm')
    } else if u128::from(remaining.as_secs()) <= MAX {
        (u128::from(remaining.as_secs()), 'S')
    } else if u128::from(remaining.as_secs() / 60) <= MAX {
        (u128::from(remaining.as_secs() / 60), 'M')
    } else {
        ((u128::from(remaining.as_secs() / 3600)).min(MAX), 'H')
    };
    HeaderValue::from_str(&format!("{amount}{unit}")).unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

/// Calls and retries over the last [`BUDGET_WINDOW`], in buckets of one second: what a retry
/// budget decides on. Times are whole seconds on any monotonic clock.
#[derive(Debug, Default)]
pub struct BudgetWindow {
    /// Indexed by second modulo the window: (the second it counts, calls, retries).
    buckets: [(u64, u64, u64); BUDGET_BUCKETS],
}

impl BudgetWindow {
    /// A call started at `second`.
    pub fn record_call(&mut self, second: u64) {
        self.bucket(second).1 += 1;
    }

    /// Whether a retry at `second` fits the budget (`percent` of the calls, or the minimum);
    /// if so it is counted.
    pub fn try_retry(&mut self, second: u64, percent: u8) -> bool {
        let (calls, retries) = self.counts(second);
        if retries >= allowance(calls, percent) {
            return false;
        }
        self.bucket(second).2 += 1;
        true
    }

    /// (calls, retries) in the window ending at `second`.
    pub fn counts(&self, second: u64) -> (u64, u64) {
        let oldest = second.saturating_sub(BUDGET_BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|(at, _, _)| (oldest..=second).contains(at))
            .fold((0, 0), |(c, r), (_, calls, retries)| (c + calls, r + retries))
    }

    fn bucket(&mut self, second: u64) -> &mut (u64, u64, u64) {
        let bucket = &mut self.buckets[(second % BUDGET_BUCKETS as u64) as usize];
        if bucket.0 != second {
            *bucket = (second, 0, 0);
        }
        bucket
    }
}

/// The retries a window with `calls` calls allows.
pub fn allowance(calls: u64, percent: u8) -> u64 {
    let minimum = u64::from(RETRY_BUDGET_MIN_PER_SECOND) * BUDGET_WINDOW.as_secs();
    minimum.max(calls * u64::from(percent) / 100)
}

/// A gRPC status code from its name as the table writes it (`UNAVAILABLE`; case and `-`/`_`
/// do not matter).
fn code_named(name: &str) -> Option<Code> {
    let canonical = name.trim().to_ascii_uppercase().replace('-', "_");
    Some(match canonical.as_str() {
        "CANCELLED" => Code::Cancelled,
        "UNKNOWN" => Code::Unknown,
        "INVALID_ARGUMENT" => Code::InvalidArgument,
        "DEADLINE_EXCEEDED" => Code::DeadlineExceeded,
        "NOT_FOUND" => Code::NotFound,
        "ALREADY_EXISTS" => Code::AlreadyExists,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "FAILED_PRECONDITION" => Code::FailedPrecondition,
        "ABORTED" => Code::Aborted,
        "OUT_OF_RANGE" => Code::OutOfRange,
        "UNIMPLEMENTED" => Code::Unimplemented,
        "INTERNAL" => Code::Internal,
        "UNAVAILABLE" => Code::Unavailable,
        "DATA_LOSS" => Code::DataLoss,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(extra: serde_json::Value) -> RouteEntry {
        let mut value = json!({"route": "default/r", "rule": 0, "backends": [{"name": "v1", "weight": 1}]});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).expect("an entry")
    }

    fn retry(codes: &[&str], retries: u8, backoff_ms: u64, max_backoff_ms: u64, budget_percent: u8) -> RetryPolicy {
        let (policy, notes) = EntryPolicy::of(&entry(json!({"retry": {
            "codes": codes, "attempts": retries, "backoff": format!("{backoff_ms}ms"),
            "maxBackoff": format!("{max_backoff_ms}ms"), "budgetPercent": budget_percent}})));
        assert!(notes.is_empty(), "{notes:?}");
        policy.and_then(|p| p.retry).expect("a retry policy")
    }

    #[test]
    fn an_entry_without_timeout_or_retry_has_no_policy() {
        assert_eq!(EntryPolicy::of(&entry(json!({}))), (None, vec![]));
    }

    #[test]
    fn the_tables_settings_are_read_as_written() {
        let (policy, notes) = EntryPolicy::of(&entry(json!({"timeout": "200ms", "retry": {
            "codes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"], "attempts": 3, "backoff": "25ms",
            "maxBackoff": "250ms", "budgetPercent": 20}})));
        assert!(notes.is_empty(), "{notes:?}");
        let policy = policy.expect("a policy");
        assert_eq!(policy.timeout, Some(Duration::from_millis(200)));
        let retry = policy.retry.expect("a retry policy");
        assert_eq!(
            (retry.retries, retry.backoff, retry.max_backoff, retry.budget_percent),
            (3, Duration::from_millis(25), Duration::from_millis(250), 20)
        );
        assert!(retry.retries_on(Code::Unavailable) && retry.retries_on(Code::ResourceExhausted));
        assert!(!retry.retries_on(Code::Internal) && !retry.retries_on(Code::Ok));

        let (policy, notes) = EntryPolicy::of(&entry(json!({"timeout": "1s"})));
        assert_eq!(
            policy,
            Some(EntryPolicy {
                timeout: Some(Duration::from_secs(1)),
                retry: None
            })
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn settings_out_of_bounds_are_brought_within_them_saying_so() {
        let (policy, notes) = EntryPolicy::of(&entry(json!({"timeout": "0s", "retry": {
            "codes": ["unavailable", "NO_SUCH_CODE"], "attempts": 9, "backoff": "0s",
            "maxBackoff": "1ms", "budgetPercent": 0}})));
        let policy = policy.expect("the retry policy still applies");
        assert_eq!(policy.timeout, None);
        let retry = policy.retry.expect("UNAVAILABLE is a code");
        assert!(retry.retries_on(Code::Unavailable));
        assert_eq!(
            (retry.retries, retry.backoff, retry.max_backoff, retry.budget_percent),
            (4, Duration::from_millis(25), Duration::from_millis(25), 1)
        );
        assert_eq!(notes.len(), 5, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("NO_SUCH_CODE")), "{notes:?}");

        let (policy, notes) = EntryPolicy::of(&entry(json!({"retry": {
            "codes": ["SOMETIMES"], "attempts": 2, "backoff": "25ms", "maxBackoff": "250ms", "budgetPercent": 20}})));
        assert_eq!(policy, None, "no code left: no retries, and nothing else");
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    fn backoffs_double_up_to_the_cap_and_are_jittered_below_it() {
        let retry = retry(&["UNAVAILABLE"], 4, 25, 150, 20);
        let caps: Vec<u64> = (1..=6).map(|n| retry.backoff_cap(n).as_millis() as u64).collect();
        assert_eq!(caps, [25, 50, 100, 150, 150, 150]);
        assert_eq!(retry.backoff_cap(u32::MAX), Duration::from_millis(150), "no overflow");

        let cap = Duration::from_millis(100);
        assert_eq!(jittered(cap, 0), Duration::ZERO);
        assert!(jittered(cap, u64::MAX) < cap);
        assert_eq!(jittered(cap, 1 << 63), Duration::from_millis(50));
        // Spread over the whole range: 1000 draws land in each tenth of it.
        let mut tenths = [0; 10];
        for _ in 0..1000 {
            let wait = jittered(cap, random());
            assert!(wait < cap);
            tenths[(wait.as_millis() / 10) as usize] += 1;
        }
        assert!(tenths.iter().all(|n| *n > 40), "{tenths:?}");
    }

    #[test]
    fn weighted_choices_follow_the_weights_of_the_accepted_items() {
        let weights = [70, 30, 0];
        let mut counts = [0; 3];
        for random in 0..100 {
            counts[weighted_choice(&weights, |_| true, random).unwrap()] += 1;
        }
        assert_eq!(counts, [70, 30, 0]);
        assert_eq!(weighted_choice(&weights, |i| i != 0, 12345), Some(1));
        assert_eq!(
            weighted_choice(&weights, |i| i == 2, 7),
            None,
            "weight 0 is never chosen"
        );
        assert_eq!(weighted_choice(&[], |_| true, 7), None);
    }

    #[test]
    fn a_response_that_ends_at_its_headers_says_its_code() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        let ok = StatusCode::OK;
        assert_eq!(
            trailers_only_code(ok, &headers(&[("grpc-status", "14")])),
            Some(Code::Unavailable)
        );
        assert_eq!(
            trailers_only_code(ok, &headers(&[("grpc-status", "0")])),
            Some(Code::Ok)
        );
        assert_eq!(
            trailers_only_code(ok, &headers(&[("grpc-status", "fourteen")])),
            Some(Code::Unknown)
        );
        assert_eq!(
            trailers_only_code(ok, &headers(&[("content-type", "application/grpc")])),
            None,
            "a body follows: committed"
        );
        assert_eq!(
            trailers_only_code(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()),
            Some(Code::Unavailable)
        );
        assert_eq!(
            trailers_only_code(StatusCode::NOT_FOUND, &HeaderMap::new()),
            Some(Code::Unimplemented)
        );
        assert_eq!(
            trailers_only_code(StatusCode::IM_A_TEAPOT, &HeaderMap::new()),
            Some(Code::Unknown)
        );
    }

    #[test]
    fn transport_failures_are_unavailable_but_the_callers_own_are_not_retried() {
        for failure in [
            Failure::Connect,
            Failure::Rotation,
            Failure::Transport,
            Failure::Drained,
        ] {
            assert_eq!(transport_code(failure), Some(Code::Unavailable), "{failure:?}");
        }
        assert_eq!(transport_code(Failure::Deadline), None);
        assert_eq!(transport_code(Failure::Caller), None);
    }

    #[test]
    fn pushback_is_a_delay_or_a_refusal() {
        let with = |value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert("grpc-retry-pushback-ms", HeaderValue::from_static(value));
            Pushback::of(&map)
        };
        assert_eq!(Pushback::of(&HeaderMap::new()), Pushback::None);
        assert_eq!(with("300"), Pushback::After(Duration::from_millis(300)));
        assert_eq!(with("-1"), Pushback::Stop);
        assert_eq!(with("soon"), Pushback::Stop);
    }

    #[test]
    fn grpc_timeouts_are_read_and_written_in_their_wire_form() {
        let parse = |value: &'static str| parse_grpc_timeout(&HeaderValue::from_static(value));
        assert_eq!(parse("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse("30000000u"), Some(Duration::from_secs(30)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "12x", "1.5S", "-1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        for (duration, wire) in [
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_millis(200), "200000u"),
            (Duration::from_micros(123_456_789), "123456m"),
            (Duration::from_secs(3600), "3600000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(u64::MAX), "99999999H"),
        ] {
            assert_eq!(grpc_timeout_value(duration), wire, "{duration:?}");
            assert!(parse_grpc_timeout(&grpc_timeout_value(duration)).unwrap() <= duration);
        }
    }

    #[test]
    fn the_budget_allows_its_minimum_or_its_share_of_the_calls() {
        let minimum = u64::from(RETRY_BUDGET_MIN_PER_SECOND) * 10;
        assert_eq!(allowance(0, 20), minimum);
        assert_eq!(allowance(1000, 20), 200);
        assert_eq!(allowance(499, 20), minimum.max(99));

        // Few calls: the minimum, and no more.
        let mut window = BudgetWindow::default();
        window.record_call(0);
        let allowed = (0..1000).filter(|_| window.try_retry(0, 20)).count() as u64;
        assert_eq!(allowed, minimum);

        // Many calls: their share.
        let mut window = BudgetWindow::default();
        for _ in 0..2000 {
            window.record_call(3);
        }
        let allowed = (0..1000).filter(|_| window.try_retry(5, 20)).count();
        assert_eq!(allowed, 400);
        assert_eq!(window.counts(5), (2000, 400));
    }

    #[test]
    fn the_budget_forgets_what_left_the_window() {
        let mut window = BudgetWindow::default();
        for second in 0..10 {
            for _ in 0..100 {
                window.record_call(second);
            }
        }
        // 1000 calls in the window at 50%: 500 retries, spent at second 9.
        let allowed = (0..1000).filter(|_| window.try_retry(9, 50)).count();
        assert_eq!(allowed, 500);
        assert!(!window.try_retry(9, 50));
        // At second 10 the calls of second 0 left, and the retries are all still in.
        assert_eq!(window.counts(10), (900, 500));
        assert!(!window.try_retry(10, 50));
        // At second 19 the retries of second 9 left with its calls: no calls, the minimum.
        assert_eq!(window.counts(19), (0, 0));
        let allowed = (0..1000).filter(|_| window.try_retry(19, 50)).count() as u64;
        assert_eq!(allowed, u64::from(RETRY_BUDGET_MIN_PER_SECOND) * 10);
        // A long silence: nothing left of before.
        assert_eq!(window.counts(1000), (0, 0));
    }
}
