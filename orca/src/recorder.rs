//! [`LoadRecorder`]: what a server measures about its own load, read by [`crate::OrcaService`].

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::OrcaLoadReport;

/// A server's load measurements, shared by the code that serves requests (which records) and
/// the ORCA streams (which report). Cloning is cheap: clones share the same measurements.
///
/// The counters are cumulative; each ORCA stream reports the rates over its own interval.
/// Busy time is recorded when a piece of work ends, so a request longer than the reporting
/// interval counts entirely in the interval it ends in.
#[derive(Clone, Debug)]
pub struct LoadRecorder {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    created: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
    busy_nanos: AtomicU64,
    set: Mutex<SetMetrics>,
}

/// Values the application sets rather than lets the recorder measure.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SetMetrics {
    pub(crate) application_utilization: Option<f64>,
    pub(crate) cpu_utilization: Option<f64>,
    pub(crate) mem_utilization: Option<f64>,
    pub(crate) named_metrics: HashMap<String, f64>,
}

/// Cumulative totals since a [`LoadRecorder`] was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadTotals {
    /// Requests completed, failed ones included.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Busy time recorded, summed over all worker slots.
    pub busy: Duration,
}

impl LoadTotals {
    fn since(self, earlier: LoadTotals) -> LoadTotals {
        LoadTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            busy: self.busy.saturating_sub(earlier.busy),
        }
    }
}

impl Default for LoadRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadRecorder {
    /// A recorder for a server with one worker slot.
    pub fn new() -> Self {
        Self::with_capacity(1)
    }

    /// A recorder for a server that can work on `capacity` requests at once (0 counts as 1):
    /// the application utilization it reports is busy time over `elapsed x capacity`.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                capacity: capacity.max(1),
                created: Instant::now(),
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                busy_nanos: AtomicU64::new(0),
                set: Mutex::new(SetMetrics::default()),
            }),
        }
    }

    /// The number of worker slots.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Counts one completed request, and one error unless `ok`.
    pub fn record_request(&self, ok: bool) {
        self.shared.requests.fetch_add(1, Ordering::SeqCst);
        if !ok {
            self.shared.errors.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Adds time one worker slot spent working.
    pub fn record_busy(&self, busy: Duration) {
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.shared.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Reports `utilization` as the application utilization instead of the measured busy
    /// fraction (`None` goes back to measuring). Negative or non-finite values count as `None`.
    pub fn set_application_utilization(&self, utilization: Option<f64>) {
        self.set(|set| set.application_utilization = valid(utilization));
    }

    /// Reports a CPU utilization (by default none is: clients then use the application
    /// utilization). Negative or non-finite values count as `None`.
    pub fn set_cpu_utilization(&self, utilization: Option<f64>) {
        self.set(|set| set.cpu_utilization = valid(utilization));
    }

    /// Reports a memory utilization. Negative or non-finite values count as `None`.
    pub fn set_mem_utilization(&self, utilization: Option<f64>) {
        self.set(|set| set.mem_utilization = valid(utilization));
    }

    /// Reports a named metric (`None`, or a non-finite value, removes it).
    pub fn set_named_metric(&self, name: impl Into<String>, value: Option<f64>) {
        let name = name.into();
        self.set(|set| match value.filter(|value| value.is_finite()) {
            Some(value) => {
                set.named_metrics.insert(name, value);
            }
            None => {
                set.named_metrics.remove(&name);
            }
        });
    }

    /// The cumulative totals so far.
    pub fn totals(&self) -> LoadTotals {
        // Requests are counted before errors and read after them, so that a report never shows
        // more errors than requests.
        let errors = self.shared.errors.load(Ordering::SeqCst);
        LoadTotals {
            requests: self.shared.requests.load(Ordering::SeqCst),
            errors,
            busy: Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    /// When the recorder was created: the start of a stream's first reporting interval.
    pub(crate) fn created(&self) -> Instant {
        self.shared.created
    }

    pub(crate) fn set_metrics(&self) -> SetMetrics {
        self.shared
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, change: impl FnOnce(&mut SetMetrics)) {
        change(
            &mut self
                .shared
                .set
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }
}

fn valid(utilization: Option<f64>) -> Option<f64> {
    utilization.filter(|value| value.is_finite() && *value >= 0.0)
}

/// The report for an interval of length `elapsed` that began at totals `start` and ended at
/// `end`.
pub(crate) fn load_report(
    start: LoadTotals,
    end: LoadTotals,
    elapsed: Duration,
    capacity: usize,
    set: SetMetrics,
) -> OrcaLoadReport {
    let delta = end.since(start);
    let seconds = elapsed.as_secs_f64();
    let per_second = |amount: f64| if seconds > 0.0 { amount / seconds } else { 0.0 };
    let busy_fraction = per_second(delta.busy.as_secs_f64() / capacity.max(1) as f64);
    OrcaLoadReport {
        rps_fractional: per_second(delta.requests as f64),
        eps: per_second(delta.errors as f64),
        application_utilization: set.application_utilization.unwrap_or(busy_fraction),
        cpu_utilization: set.cpu_utilization.unwrap_or(0.0),
        mem_utilization: set.mem_utilization.unwrap_or(0.0),
        named_metrics: set.named_metrics,
        ..OrcaLoadReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    fn totals(requests: u64, errors: u64, busy_ms: u64) -> LoadTotals {
        LoadTotals {
            requests,
            errors,
            busy: Duration::from_millis(busy_ms),
        }
    }

    #[test]
    fn a_report_gives_the_rates_and_busy_fraction_of_its_interval() {
        let report = load_report(
            totals(10, 1, 100),
            totals(60, 6, 1100),
            Duration::from_millis(500),
            4,
            SetMetrics::default(),
        );
        assert_close(report.rps_fractional, 100.0);
        assert_close(report.eps, 10.0);
        // 1 s busy over 0.5 s x 4 slots.
        assert_close(report.application_utilization, 0.5);
        assert_eq!(report.cpu_utilization, 0.0);
        assert_eq!(
            report.rps, 0,
            "the deprecated integer rate stays unset, as grpc-go leaves it"
        );
    }

    #[test]
    fn the_busy_fraction_may_exceed_one_when_work_overlaps_beyond_capacity() {
        let report = load_report(
            totals(0, 0, 0),
            totals(2, 0, 300),
            Duration::from_millis(100),
            1,
            SetMetrics::default(),
        );
        assert_close(report.application_utilization, 3.0);
    }

    #[test]
    fn an_empty_interval_reports_zero_rather_than_dividing_by_zero() {
        let report = load_report(
            totals(5, 1, 10),
            totals(5, 1, 10),
            Duration::ZERO,
            1,
            SetMetrics::default(),
        );
        assert_eq!(report, OrcaLoadReport::default());
    }

    #[test]
    fn set_values_replace_the_measured_utilization_and_add_cpu_and_named_metrics() {
        let recorder = LoadRecorder::new();
        recorder.set_application_utilization(Some(0.75));
        recorder.set_cpu_utilization(Some(0.5));
        recorder.set_mem_utilization(Some(0.25));
        recorder.set_named_metric("queue", Some(3.0));
        recorder.set_named_metric("gone", Some(1.0));
        recorder.set_named_metric("gone", None);
        let report = load_report(
            totals(0, 0, 0),
            totals(1, 0, 1000),
            Duration::from_secs(1),
            1,
            recorder.set_metrics(),
        );
        assert_eq!(report.application_utilization, 0.75);
        assert_eq!(report.cpu_utilization, 0.5);
        assert_eq!(report.mem_utilization, 0.25);
        assert_eq!(report.named_metrics, HashMap::from([("queue".to_string(), 3.0)]));

        recorder.set_application_utilization(None);
        let measured = load_report(
            totals(0, 0, 0),
            totals(1, 0, 250),
            Duration::from_secs(1),
            1,
            recorder.set_metrics(),
        );
        assert_close(measured.application_utilization, 0.25);
    }

    #[test]
    fn invalid_set_values_are_ignored() {
        let recorder = LoadRecorder::new();
        recorder.set_application_utilization(Some(-0.5));
        recorder.set_cpu_utilization(Some(f64::NAN));
        recorder.set_named_metric("infinite", Some(f64::INFINITY));
        assert_eq!(recorder.set_metrics(), SetMetrics::default());
    }

    #[test]
    fn the_recorder_accumulates_requests_errors_and_busy_time_across_clones() {
        let recorder = LoadRecorder::with_capacity(0);
        assert_eq!(recorder.capacity(), 1, "no capacity counts as one slot");
        let clone = recorder.clone();
        recorder.record_request(true);
        clone.record_request(false);
        clone.record_request(true);
        recorder.record_busy(Duration::from_millis(3));
        clone.record_busy(Duration::from_micros(1500));
        assert_eq!(
            recorder.totals(),
            totals(3, 1, 0).with_busy(Duration::from_micros(4500))
        );
    }

    impl LoadTotals {
        fn with_busy(self, busy: Duration) -> Self {
            Self { busy, ..self }
        }
    }
}
