//! Passive outlier detection: an endpoint whose requests fail at the transport level is taken
//! out of rotation at once, before the operator's next status arrives.
//!
//! Follows gRFC A50's ejection rules: the ejection time is the base time times the number of
//! recent ejections, capped at the maximum; at most `max_ejection_percent` of the endpoints are
//! ejected at once, but always at least one may be (so 3 endpoints and 10% still eject one).
//! An ejection ends when its time is up, or when the endpoint's status entry changes (the
//! operator has news about it).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::time::Instant;

/// Outlier detection settings (gRFC A50 defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Eject endpoints whose requests fail at the transport level.
    pub enabled: bool,
    /// The first ejection's length; the n-th recent one lasts n times this.
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts.
    pub max_ejection_time: Duration,
    /// The largest share of endpoints ejected at once, in percent (at least one is allowed).
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            enabled: true,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

#[derive(Clone, Debug)]
struct Record {
    until: Option<Instant>,
    /// Recent ejections; decays to zero after a quiet `max_ejection_time`.
    multiplier: u32,
    last_change: Instant,
}

/// Which endpoints are ejected and until when.
#[derive(Debug, Default)]
pub struct Ejections {
    records: HashMap<SocketAddr, Record>,
}

impl Ejections {
    /// Ejects `address` after a transport failure, if the rules allow; returns until when.
    /// `endpoints` is how many endpoints are in rotation (ejected ones included).
    pub fn eject(
        &mut self,
        address: SocketAddr,
        endpoints: usize,
        now: Instant,
        config: &OutlierDetection,
    ) -> Option<Instant> {
        if !config.enabled || self.is_ejected(&address, now) {
            return None;
        }
        let allowed = (endpoints * usize::from(config.max_ejection_percent) / 100).max(1);
        if self.ejected_count(now) >= allowed {
            return None;
        }
        let record = self.records.entry(address).or_insert(Record {
            until: None,
            multiplier: 0,
            last_change: now,
        });
        if now.saturating_duration_since(record.last_change) > config.max_ejection_time + config.base_ejection_time {
            record.multiplier = 0;
        }
        record.multiplier = record.multiplier.saturating_add(1);
        let length = config
            .base_ejection_time
            .saturating_mul(record.multiplier)
            .min(config.max_ejection_time.max(config.base_ejection_time));
        let until = now + length;
        record.until = Some(until);
        record.last_change = now;
        Some(until)
    }

    pub fn is_ejected(&self, address: &SocketAddr, now: Instant) -> bool {
        self.records
            .get(address)
            .and_then(|r| r.until)
            .is_some_and(|until| until > now)
    }

    pub fn ejected_count(&self, now: Instant) -> usize {
        self.records
            .values()
            .filter(|r| r.until.is_some_and(|u| u > now))
            .count()
    }

    /// Ends ejections whose time is up; returns whether any ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        let mut ended = false;
        for record in self.records.values_mut() {
            if record.until.is_some_and(|u| u <= now) {
                record.until = None;
                record.last_change = now;
                ended = true;
            }
        }
        ended
    }

    /// The operator published news about `address`: it is back in rotation (its multiplier
    /// stays, so a flapping endpoint is ejected for longer next time).
    pub fn readmit(&mut self, address: &SocketAddr, now: Instant) -> bool {
        match self.records.get_mut(address) {
            Some(record) if record.until.is_some() => {
                record.until = None;
                record.last_change = now;
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

    #[tokio::test(start_paused = true)]
    async fn three_endpoints_at_ten_percent_still_eject_one() {
        let config = OutlierDetection::default();
        let mut ejections = Ejections::default();
        let now = Instant::now();
        assert!(ejections.eject(address(1), 3, now, &config).is_some());
        assert!(
            ejections.eject(address(2), 3, now, &config).is_none(),
            "10% of 3 allows only one"
        );
        assert!(ejections.is_ejected(&address(1), now));
        assert!(!ejections.is_ejected(&address(2), now));
    }

    #[tokio::test(start_paused = true)]
    async fn the_percentage_caps_ejections() {
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

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_on_repeat_and_is_capped() {
        let config = OutlierDetection::default();
        let mut ejections = Ejections::default();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..12 {
            let until = ejections.eject(address(1), 3, now, &config).unwrap();
            lengths.push((until - now).as_secs());
            now = until;
            assert!(ejections.expire(now));
        }
        assert_eq!(lengths[..4], [30, 60, 90, 120]);
        assert_eq!(*lengths.last().unwrap(), 300);
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_change_readmits_and_a_quiet_period_resets_the_multiplier() {
        let config = OutlierDetection::default();
        let mut ejections = Ejections::default();
        let now = Instant::now();
        ejections.eject(address(1), 3, now, &config).unwrap();
        assert!(ejections.readmit(&address(1), now));
        assert!(!ejections.is_ejected(&address(1), now));
        let later = now + Duration::from_secs(1000);
        let until = ejections.eject(address(1), 3, later, &config).unwrap();
        assert_eq!((until - later).as_secs(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_ejects() {
        let config = OutlierDetection {
            enabled: false,
            ..OutlierDetection::default()
        };
        let mut ejections = Ejections::default();
        assert!(ejections.eject(address(1), 3, Instant::now(), &config).is_none());
    }
}
