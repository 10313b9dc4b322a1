//! Passive outlier detection: an endpoint that the evidence says is failing is taken out of
//! rotation before the operator's next status arrives.
//!
//! Follows gRFC A50, as grpc-go and grpc-java apply it. Every `interval` the counts of the
//! interval just ended are examined: with at least `minimum_hosts` endpoints that each saw
//! `request_volume` requests, an endpoint whose failure percentage is above `threshold` is
//! ejected. Independently, an endpoint that could not be connected to
//! `consecutive_connect_failures` times in a row is ejected at once (a dead pod must not wait
//! for the interval). An ejection lasts `base_ejection_time` times the endpoint's multiplier
//! (which grows by one per ejection and shrinks by one per interval without one), capped at
//! `max_ejection_time`; ejections stop once `max_ejection_percent` of the endpoints are ejected
//! (so one may always be, unless it is 0).
//!
//! The settings come from the GrpcBackend's `spec.outlierDetection`
//! ([`parse_outlier_detection`]), the same settings the operator publishes to xDS clients,
//! unless the program gave its own.
//!
//! What counts as a failure is decided in [`crate::failure`]: connection rotation and the
//! caller's own deadlines and cancellations never do.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use serde_json::Value;
use tokio::time::Instant;

/// Outlier detection settings (gRFC A50 defaults, plus consecutive connect failures): the
/// GrpcBackend's `spec.outlierDetection` as the client applies it, or the program's own
/// ([`Builder::outlier_detection`](crate::Builder::outlier_detection)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Eject endpoints on evidence.
    pub enabled: bool,
    /// How often the evidence is examined and ejections end (A50 default 10s).
    pub interval: Duration,
    /// The first ejection's length; an endpoint ejected with multiplier n stays out n times
    /// this (A50 default 30s).
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts (A50 default 300s).
    pub max_ejection_time: Duration,
    /// No more ejections once this share of the endpoints, in percent, is ejected (A50 default
    /// 10): rounded up, so one may always be ejected unless it is 0.
    pub max_ejection_percent: u8,
    /// Eject at once after this many connection attempts in a row failed; 0 turns it off
    /// (default 5).
    pub consecutive_connect_failures: u32,
    /// Eject on the failure percentage over an interval; `None` turns it off.
    pub failure_percentage: Option<FailurePercentage>,
}

/// gRFC A50's failure percentage ejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailurePercentage {
    /// Eject an endpoint whose failures are more than this percentage of its requests
    /// (default 85).
    pub threshold: u8,
    /// Only when at least this many endpoints saw `request_volume` requests (default 5).
    pub minimum_hosts: usize,
    /// Only endpoints that saw at least this many requests in the interval (default 50).
    pub request_volume: u64,
}

impl Default for FailurePercentage {
    fn default() -> Self {
        Self {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            consecutive_connect_failures: 5,
            failure_percentage: Some(FailurePercentage::default()),
        }
    }
}

impl From<&kubegrpc_crds::OutlierDetection> for OutlierDetection {
    /// The settings a GrpcBackend's `spec.outlierDetection` gives (out-of-range values, which
    /// admission refuses, clamped).
    fn from(spec: &kubegrpc_crds::OutlierDetection) -> Self {
        let rule = &spec.failure_percentage;
        Self {
            enabled: spec.enabled,
            interval: spec.interval(),
            base_ejection_time: spec.base_ejection_time(),
            max_ejection_time: spec.max_ejection_time(),
            max_ejection_percent: spec.max_ejection_percent(),
            consecutive_connect_failures: spec.consecutive_connect_failures(),
            failure_percentage: rule.enabled.then(|| FailurePercentage {
                threshold: rule.threshold(),
                minimum_hosts: rule.minimum_hosts() as usize,
                request_volume: u64::from(rule.request_volume()),
            }),
        }
    }
}

/// Outlier detection settings read from a spec, and what had to be ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedOutlierDetection {
    /// The settings in use: the spec's, or the defaults (on) when it has none or they cannot
    /// be read.
    pub settings: OutlierDetection,
    /// Why the spec's settings could not be read, if they could not.
    pub warning: Option<String>,
}

/// Reads `outlierDetection` from a GrpcBackend's `spec` value. Never fails: unset gives the
/// defaults (gRFC A50's, on), and so, with a warning, does a value that cannot be read.
pub fn parse_outlier_detection(spec: Option<&Value>) -> ParsedOutlierDetection {
    let Some(value) = spec
        .and_then(|spec| spec.get("outlierDetection"))
        .filter(|v| !v.is_null())
    else {
        return ParsedOutlierDetection::default();
    };
    match serde_json::from_value::<kubegrpc_crds::OutlierDetection>(value.clone()) {
        Ok(spec) => ParsedOutlierDetection {
            settings: OutlierDetection::from(&spec),
            warning: None,
        },
        Err(error) => ParsedOutlierDetection {
            settings: OutlierDetection::default(),
            warning: Some(format!(
                "spec.outlierDetection cannot be read ({error}); using the defaults (gRFC A50's, on)"
            )),
        },
    }
}

impl OutlierDetection {
    /// How many of `endpoints` may be ejected at once: ejections go on while the ejected share
    /// is below `max_ejection_percent` (gRFC A50, as grpc-go and grpc-java count).
    fn ejection_allowance(&self, endpoints: usize) -> usize {
        (endpoints * usize::from(self.max_ejection_percent.min(100))).div_ceil(100)
    }

    /// How long an ejection with `multiplier` lasts.
    fn ejection_time(&self, multiplier: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(multiplier)
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }
}

/// One endpoint's requests over the interval just ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalCounts {
    pub successes: u64,
    pub failures: u64,
}

#[derive(Clone, Debug, Default)]
struct Record {
    ejected_at: Option<Instant>,
    multiplier: u32,
}

/// What an interval decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IntervalOutcome {
    /// Ejected on the interval's evidence.
    pub ejected: Vec<SocketAddr>,
    /// Whose ejection time is up: back in rotation once connected again.
    pub due: Vec<SocketAddr>,
}

/// Which endpoints are ejected, and their multipliers.
#[derive(Debug, Default)]
pub struct Ejections {
    records: HashMap<SocketAddr, Record>,
}

impl Ejections {
    /// Ejects `address` if the percentage cap allows; `endpoints` is how many endpoints are in
    /// rotation (ejected ones included). Returns the ejection's length.
    pub fn eject(
        &mut self,
        address: SocketAddr,
        endpoints: usize,
        now: Instant,
        config: &OutlierDetection,
    ) -> Option<Duration> {
        if !config.enabled || self.is_ejected(&address) {
            return None;
        }
        if self.ejected_count() >= config.ejection_allowance(endpoints) {
            return None;
        }
        let record = self.records.entry(address).or_default();
        record.multiplier = record.multiplier.saturating_add(1);
        record.ejected_at = Some(now);
        Some(config.ejection_time(record.multiplier))
    }

    pub fn is_ejected(&self, address: &SocketAddr) -> bool {
        self.records.get(address).is_some_and(|r| r.ejected_at.is_some())
    }

    pub fn ejected_count(&self) -> usize {
        self.records.values().filter(|r| r.ejected_at.is_some()).count()
    }

    /// The multiplier the next ejection of `address` builds on.
    #[cfg(test)]
    pub fn multiplier(&self, address: &SocketAddr) -> u32 {
        self.records.get(address).map_or(0, |r| r.multiplier)
    }

    /// The end of an interval (gRFC A50's timer): ejects on the failure percentage of `counts`
    /// (every endpoint in rotation, ejected ones included), lowers the multiplier of endpoints
    /// not ejected, and reports the ejections whose time is up (they stay ejected until
    /// [`Ejections::readmit`]).
    pub fn end_interval(
        &mut self,
        counts: &[(SocketAddr, IntervalCounts)],
        now: Instant,
        config: &OutlierDetection,
    ) -> IntervalOutcome {
        let mut outcome = IntervalOutcome::default();
        if !config.enabled {
            return outcome;
        }
        if let Some(rule) = &config.failure_percentage {
            let volume = |c: &IntervalCounts| c.successes + c.failures;
            let qualified: Vec<&(SocketAddr, IntervalCounts)> = counts
                .iter()
                .filter(|(_, c)| volume(c) >= rule.request_volume.max(1))
                .collect();
            if qualified.len() >= rule.minimum_hosts {
                for (address, c) in qualified {
                    if c.failures * 100 > u64::from(rule.threshold) * volume(c)
                        && self.eject(*address, counts.len(), now, config).is_some()
                    {
                        outcome.ejected.push(*address);
                    }
                }
            }
        }
        for (address, record) in &mut self.records {
            match record.ejected_at {
                None => record.multiplier = record.multiplier.saturating_sub(1),
                Some(at) if now.saturating_duration_since(at) >= config.ejection_time(record.multiplier) => {
                    outcome.due.push(*address);
                }
                Some(_) => {}
            }
        }
        self.records.retain(|_, r| r.ejected_at.is_some() || r.multiplier > 0);
        outcome.due.sort();
        outcome
    }

    /// Ends `address`'s ejection (its time is up and it is connected, or the operator has news
    /// about it). Its multiplier stays: a flapping endpoint is ejected for longer next time.
    pub fn readmit(&mut self, address: &SocketAddr) -> bool {
        match self.records.get_mut(address) {
            Some(record) if record.ejected_at.is_some() => {
                record.ejected_at = None;
                true
            }
            _ => false,
        }
    }

    /// Ends every ejection and forgets every multiplier (outlier detection was turned off);
    /// whether any endpoint was ejected.
    pub fn reset(&mut self) -> bool {
        let any = self.ejected_count() > 0;
        self.records.clear();
        any
    }

    /// Forgets endpoints no longer in the status.
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        self.records.retain(|address, _| keep(address));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    fn counts(successes: u64, failures: u64) -> IntervalCounts {
        IntervalCounts { successes, failures }
    }

    fn three_hosts() -> OutlierDetection {
        OutlierDetection {
            failure_percentage: Some(FailurePercentage {
                minimum_hosts: 3,
                request_volume: 10,
                ..FailurePercentage::default()
            }),
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn three_endpoints_at_ten_percent_still_eject_one() {
        let config = OutlierDetection::default();
        let mut ejections = Ejections::default();
        let now = Instant::now();
        assert!(ejections.eject(address(1), 3, now, &config).is_some());
        assert!(
            ejections.eject(address(2), 3, now, &config).is_none(),
            "10% of 3 allows only one"
        );
        assert!(ejections.is_ejected(&address(1)));
        assert!(!ejections.is_ejected(&address(2)));
    }

    #[test]
    fn the_percentage_is_rounded_up_as_grpc_counts_and_zero_ejects_none() {
        // grpc-go and grpc-java eject while ejected / endpoints x 100 < max_ejection_percent.
        let allowance = |percent: u8, endpoints: usize| {
            OutlierDetection {
                max_ejection_percent: percent,
                ..OutlierDetection::default()
            }
            .ejection_allowance(endpoints)
        };
        assert_eq!(allowance(10, 3), 1);
        assert_eq!(allowance(25, 10), 3, "20% < 25%: a third one");
        assert_eq!(allowance(50, 4), 2);
        assert_eq!(allowance(100, 4), 4);
        assert_eq!(allowance(0, 4), 0);
        let none = OutlierDetection {
            max_ejection_percent: 0,
            ..OutlierDetection::default()
        };
        assert!(
            Ejections::default()
                .eject(address(1), 3, Instant::now(), &none)
                .is_none()
        );
    }

    #[test]
    fn reset_ends_every_ejection_and_multiplier() {
        let config = OutlierDetection::default();
        let mut ejections = Ejections::default();
        let now = Instant::now();
        ejections.eject(address(1), 3, now, &config);
        assert!(ejections.reset());
        assert!(!ejections.is_ejected(&address(1)));
        assert_eq!(ejections.multiplier(&address(1)), 0);
        assert!(!ejections.reset(), "nothing ejected any more");
    }

    #[test]
    fn the_spec_gives_the_settings_and_unset_or_unreadable_gives_the_defaults() {
        use serde_json::json;

        let spec = json!({"service": "echo", "port": "grpc", "outlierDetection": {
            "interval": "1s", "baseEjectionTime": "3s", "maxEjectionTime": "1h",
            "maxEjectionPercent": 50, "consecutiveConnectFailures": 0,
            "failurePercentage": {"threshold": 60, "minimumHosts": 3, "requestVolume": 10}}});
        let parsed = parse_outlier_detection(Some(&spec));
        assert_eq!(parsed.warning, None);
        assert_eq!(
            parsed.settings,
            OutlierDetection {
                enabled: true,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(3),
                max_ejection_time: Duration::from_secs(3600),
                max_ejection_percent: 50,
                consecutive_connect_failures: 0,
                failure_percentage: Some(FailurePercentage {
                    threshold: 60,
                    minimum_hosts: 3,
                    request_volume: 10,
                }),
            }
        );

        let off = json!({"outlierDetection": {"enabled": false}});
        assert!(!parse_outlier_detection(Some(&off)).settings.enabled);
        let connect_only = json!({"outlierDetection": {"failurePercentage": {"enabled": false}}});
        let connect_only = parse_outlier_detection(Some(&connect_only)).settings;
        assert_eq!(
            (
                connect_only.failure_percentage,
                connect_only.consecutive_connect_failures
            ),
            (None, 5)
        );

        for unset in [
            None,
            Some(json!({"service": "echo"})),
            Some(json!({"outlierDetection": null})),
        ] {
            assert_eq!(
                parse_outlier_detection(unset.as_ref()),
                ParsedOutlierDetection::default()
            );
        }
        assert_eq!(ParsedOutlierDetection::default().settings, OutlierDetection::default());
        let unreadable = json!({"outlierDetection": {"interval": "soon"}});
        let parsed = parse_outlier_detection(Some(&unreadable));
        assert_eq!(parsed.settings, OutlierDetection::default());
        assert!(
            parsed
                .warning
                .as_deref()
                .is_some_and(|w| w.contains("spec.outlierDetection")),
            "{parsed:?}"
        );
    }

    #[test]
    fn the_percentage_caps_ejections() {
        let config = OutlierDetection {
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        };
        let mut ejections = Ejections::default();
        let now = Instant::now();
        let ejected = (1..=10)
            .filter(|n| ejections.eject(address(*n), 10, now, &config).is_some())
            .count();
        assert_eq!(ejected, 5);
    }

    #[test]
    fn the_failure_percentage_ejects_only_with_enough_hosts_and_volume() {
        let config = three_hosts();
        let now = Instant::now();
        let failing = [
            (address(1), counts(1, 19)),
            (address(2), counts(20, 0)),
            (address(3), counts(20, 0)),
        ];
        let mut ejections = Ejections::default();
        assert_eq!(ejections.end_interval(&failing, now, &config).ejected, vec![address(1)]);

        // Below the request volume on one host: only two hosts qualify, fewer than the minimum.
        let mut ejections = Ejections::default();
        let thin = [
            (address(1), counts(1, 19)),
            (address(2), counts(20, 0)),
            (address(3), counts(5, 0)),
        ];
        assert!(ejections.end_interval(&thin, now, &config).ejected.is_empty());

        // At the threshold, not above it (85% is not more than 85%: gRFC A50's rule).
        let mut ejections = Ejections::default();
        let at = [
            (address(1), counts(15, 85)),
            (address(2), counts(20, 0)),
            (address(3), counts(20, 0)),
        ];
        assert!(ejections.end_interval(&at, now, &config).ejected.is_empty());
        let above = [
            (address(1), counts(14, 86)),
            (address(2), counts(20, 0)),
            (address(3), counts(20, 0)),
        ];
        assert_eq!(ejections.end_interval(&above, now, &config).ejected, vec![address(1)]);
    }

    #[test]
    fn the_default_needs_five_hosts() {
        let mut ejections = Ejections::default();
        let now = Instant::now();
        let failing: Vec<_> = (1..=4).map(|n| (address(n), counts(0, 100))).collect();
        assert!(
            ejections
                .end_interval(&failing, now, &OutlierDetection::default())
                .ejected
                .is_empty()
        );
    }

    #[test]
    fn an_ejection_is_due_after_base_times_multiplier_and_ends_on_readmit() {
        let config = three_hosts();
        let mut ejections = Ejections::default();
        let start = Instant::now();
        assert_eq!(
            ejections.eject(address(1), 3, start, &config),
            Some(Duration::from_secs(30))
        );
        let early = ejections.end_interval(&[], start + Duration::from_secs(20), &config);
        assert!(early.due.is_empty());
        let due = ejections.end_interval(&[], start + Duration::from_secs(30), &config);
        assert_eq!(due.due, vec![address(1)]);
        assert!(ejections.is_ejected(&address(1)), "stays out until readmitted");
        assert!(ejections.readmit(&address(1)));
        assert!(!ejections.is_ejected(&address(1)));
    }

    #[test]
    fn the_multiplier_grows_per_ejection_and_decays_per_quiet_interval() {
        let config = three_hosts();
        let mut ejections = Ejections::default();
        let now = Instant::now();
        assert_eq!(
            ejections.eject(address(1), 3, now, &config),
            Some(Duration::from_secs(30))
        );
        ejections.readmit(&address(1));
        assert_eq!(
            ejections.eject(address(1), 3, now, &config),
            Some(Duration::from_secs(60))
        );
        ejections.readmit(&address(1));
        assert_eq!(ejections.multiplier(&address(1)), 2);
        // One interval without an ejection lowers it by one, not to zero.
        ejections.end_interval(&[], now, &config);
        assert_eq!(ejections.multiplier(&address(1)), 1);
        assert_eq!(
            ejections.eject(address(1), 3, now, &config),
            Some(Duration::from_secs(60))
        );
        ejections.readmit(&address(1));
        ejections.end_interval(&[], now, &config);
        ejections.end_interval(&[], now, &config);
        assert_eq!(ejections.multiplier(&address(1)), 0);
    }

    #[test]
    fn ejection_time_is_capped() {
        let config = OutlierDetection::default();
        assert_eq!(config.ejection_time(4), Duration::from_secs(120));
        assert_eq!(config.ejection_time(50), Duration::from_secs(300));
    }

    #[test]
    fn disabled_never_ejects() {
        let config = OutlierDetection {
            enabled: false,
            ..three_hosts()
        };
        let mut ejections = Ejections::default();
        let now = Instant::now();
        assert!(ejections.eject(address(1), 3, now, &config).is_none());
        let failing: Vec<_> = (1..=3).map(|n| (address(n), counts(0, 100))).collect();
        assert_eq!(
            ejections.end_interval(&failing, now, &config),
            IntervalOutcome::default()
        );
    }
}
