//! Passive outlier detection: an endpoint that the evidence says is failing is taken out of
//! rotation before the operator's next status arrives.
//!
//! Follows gRFC A50. Every `interval` the counts of the interval just ended are examined:
//! with at least `minimum_hosts` endpoints that each saw `request_volume` requests, an
//! endpoint whose failure percentage reached `threshold` is ejected. Independently, an
//! endpoint that could not be connected to `consecutive_connect_failures` times in a row is
//! ejected at once (a dead pod must not wait for the interval). An ejection lasts
//! `base_ejection_time` times the endpoint's multiplier (which grows by one per ejection and
//! shrinks by one per interval without one), capped at `max_ejection_time`; at most
//! `max_ejection_percent` of the endpoints are ejected at once, but always at least one may be.
//!
//! What counts as a failure is decided in [`crate::failure`]: connection rotation and the
//! caller's own deadlines and cancellations never do.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::time::Instant;

/// Outlier detection settings (gRFC A50 defaults, plus consecutive connect failures).
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
    /// The largest share of endpoints ejected at once, in percent; at least one is always
    /// allowed (A50 default 10).
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
    /// Eject an endpoint whose failures reached this percentage of its requests (default 85).
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

impl OutlierDetection {
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
        let allowed = (endpoints * usize::from(config.max_ejection_percent) / 100).max(1);
        if self.ejected_count() >= allowed {
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
                    if c.failures * 100 >= u64::from(rule.threshold) * volume(c)
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

        // Under the threshold (84% < 85%).
        let mut ejections = Ejections::default();
        let under = [
            (address(1), counts(16, 84)),
            (address(2), counts(20, 0)),
            (address(3), counts(20, 0)),
        ];
        assert!(ejections.end_interval(&under, now, &config).ejected.is_empty());
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
