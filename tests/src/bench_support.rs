//! Small pieces the benchmark binaries share: settings from the environment, Unix time in
//! nanoseconds (the clock of the client peers' `/first` and `/last`), pacing and percentiles.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable `name` as a number, else `default`.
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The Unix time in nanoseconds.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Nanoseconds as milliseconds.
pub fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

/// Sleeps until `after` past `since` (Unix ns).
pub async fn pace(since: i64, after: Duration) {
    let left = since + after.as_nanos() as i64 - now_ns();
    if left > 0 {
        tokio::time::sleep(Duration::from_nanos(left as u64)).await;
    }
}

/// Nearest-rank percentile of a sorted slice (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
