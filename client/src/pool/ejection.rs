//! Outlier detection in the pool: failed requests and the end of each interval eject endpoints
//! (the rules are in [`crate::outlier`]); an endpoint whose ejection time is up connects again
//! before it takes requests, and news from the operator about an ejected endpoint readmits it.
//!
//! The settings are the GrpcBackend's `spec.outlierDetection`, followed as it changes (no
//! reconnection: the next interval uses them; turning outlier detection off ends every
//! ejection at once), unless the program set its own, which then win.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, instrument, warn};

use super::{Pool, PoolState, addresses};
use crate::{
    endpoint::{Endpoint, SendError},
    failure::{Failure, classify},
    outlier::{Ejections, IntervalCounts, OutlierDetection, ParsedOutlierDetection},
    status::StatusEndpoint,
};

/// The shortest interval the timer runs at (admission allows 100ms; code may set less).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Which endpoints are ejected, and which of them are connecting again.
#[derive(Default)]
pub(super) struct Outliers {
    pub ejections: Ejections,
    /// Ejected endpoints whose ejection time is up, connecting before they take requests again
    /// (they stay ejected until then).
    warming: HashSet<SocketAddr>,
    /// The settings in use: the program's, or the spec's.
    pub config: OutlierDetection,
    /// The last warning about the spec's settings, logged once when it appears.
    spec_warning: Option<String>,
}

impl Outliers {
    /// News from the operator about an ejected endpoint (`before` and `after` are two statuses
    /// read in a row) readmits it; a new zone or the end of its slow start is not news about
    /// its health.
    pub fn readmit_on_news(&mut self, before: &[StatusEndpoint], after: &[StatusEndpoint]) {
        let before: HashMap<SocketAddr, &StatusEndpoint> = before.iter().map(|e| (e.address, e)).collect();
        for endpoint in after {
            let news = before.get(&endpoint.address).is_none_or(|b| !b.same_state(endpoint));
            if news && self.ejections.readmit(&endpoint.address) {
                self.warming.remove(&endpoint.address);
            }
        }
    }

    /// Forgets the endpoints that `listed` no longer lists.
    pub fn forget_absent(&mut self, listed: &[StatusEndpoint]) {
        let present = addresses(listed);
        self.ejections.retain(|address| present.contains(address));
        let Self { ejections, warming, .. } = self;
        warming.retain(|address| ejections.is_ejected(address));
    }

    /// Forgets every endpoint (the GrpcBackend is gone).
    pub fn clear(&mut self) {
        self.ejections.retain(|_| false);
        self.warming.clear();
    }
}

/// The interval timer's period for `config`.
pub(super) fn timer_interval(config: &OutlierDetection) -> Duration {
    config.interval.max(MIN_INTERVAL)
}

impl Pool {
    /// The outlier detection settings in use.
    #[cfg(test)]
    pub fn outlier_detection(&self) -> OutlierDetection {
        self.lock().outliers.config.clone()
    }

    /// The settings read from the GrpcBackend's spec. Ignored when the program set its own;
    /// otherwise the next interval uses them (the timer follows a new interval at once), and
    /// turning outlier detection off ends every ejection.
    pub fn apply_outlier_detection(&self, parsed: ParsedOutlierDetection) {
        if self.config.outlier_detection.is_some() {
            return;
        }
        let mut state = self.lock();
        if parsed.warning != state.outliers.spec_warning {
            if let Some(warning) = &parsed.warning {
                warn!("{warning}");
            }
            state.outliers.spec_warning = parsed.warning;
        }
        if parsed.settings == state.outliers.config {
            return;
        }
        let settings = parsed.settings;
        info!(enabled = settings.enabled, interval = ?settings.interval,
            base_ejection_time = ?settings.base_ejection_time, max_ejection_time = ?settings.max_ejection_time,
            max_ejection_percent = settings.max_ejection_percent,
            consecutive_connect_failures = settings.consecutive_connect_failures,
            failure_percentage = ?settings.failure_percentage, "outlier detection settings from the GrpcBackend");
        let interval = timer_interval(&settings);
        self.outlier_interval.send_if_modified(|current| {
            let changed = *current != interval;
            *current = interval;
            changed
        });
        let off = !settings.enabled;
        state.outliers.config = settings;
        if off {
            // As gRFC A50 says of a config without rules: every ejection ends now.
            state.outliers.warming.clear();
            if state.outliers.ejections.reset() {
                info!("outlier detection off: every ejected endpoint back in rotation");
                self.rebuild(&mut state);
            }
        }
    }

    /// A request to `address` failed: eject it at once after repeated connect failures.
    /// Other evidence waits for the end of the interval ([`Pool::end_interval`]).
    pub fn report_failure(&self, address: SocketAddr, error: &SendError) {
        if error.failure == Failure::Connect {
            self.eject_after_connect_failures(address, error.consecutive_connect_failures);
        }
    }

    /// Called from the request path, which has no span of the GrpcBackend's.
    #[instrument(skip_all, fields(backend = %self.backend, endpoint = %address))]
    fn eject_after_connect_failures(&self, address: SocketAddr, failures_in_a_row: u32) {
        let mut state = self.lock();
        let threshold = state.outliers.config.consecutive_connect_failures;
        if threshold > 0
            && failures_in_a_row >= threshold
            && self.eject_locked(&mut state, address, "connection attempts failed in a row")
        {
            self.rebuild(&mut state);
        }
    }

    /// Ejects `address` if the rules allow (called in a span naming the endpoint).
    pub(super) fn eject(&self, address: SocketAddr, why: &str) {
        let mut state = self.lock();
        if self.eject_locked(&mut state, address, why) {
            self.rebuild(&mut state);
        }
    }

    fn eject_locked(&self, state: &mut PoolState, address: SocketAddr, why: &str) -> bool {
        let in_rotation = state.view.endpoints.iter().filter(|e| e.usable()).count().max(1);
        let Some(length) = state
            .outliers
            .ejections
            .eject(address, in_rotation, Instant::now(), &state.outliers.config)
        else {
            return false;
        };
        if let Some(stats) = state.connections.stats.get(&address) {
            stats.ejections.fetch_add(1, Ordering::Relaxed);
        }
        warn!(ejected_for = ?length, "endpoint ejected: {why}");
        true
    }

    /// The end of an outlier-detection interval: ejects on the interval's evidence, and warms
    /// up the endpoints whose ejection time is up before they take requests again.
    pub fn end_interval(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let counts: Vec<(SocketAddr, IntervalCounts)> = state
            .view
            .endpoints
            .iter()
            .filter(|e| e.usable())
            .filter_map(|e| {
                state
                    .connections
                    .stats
                    .get(&e.address)
                    .map(|s| (e.address, s.take_interval()))
            })
            .collect();
        let outcome = state
            .outliers
            .ejections
            .end_interval(&counts, Instant::now(), &state.outliers.config);
        self.outlier_intervals.fetch_add(1, Ordering::Relaxed);
        for address in &outcome.ejected {
            if let Some(stats) = state.connections.stats.get(address) {
                stats.ejections.fetch_add(1, Ordering::Relaxed);
            }
            let (successes, failures) = counts
                .iter()
                .find(|(a, _)| a == address)
                .map_or((0, 0), |(_, c)| (c.successes, c.failures));
            warn!(endpoint = %address, successes, failures,
                "endpoint ejected: failure percentage over the interval");
        }
        let mut warm_ups = Vec::new();
        for address in outcome.due {
            if !state.outliers.warming.insert(address) {
                continue;
            }
            match state.connections.by_address.get(&address) {
                Some(endpoint) => warm_ups.push(endpoint.clone()),
                None => {
                    state.outliers.warming.remove(&address);
                    state.outliers.ejections.readmit(&address);
                }
            }
        }
        if !outcome.ejected.is_empty() || !warm_ups.is_empty() {
            self.rebuild(state);
        }
        drop(guard);
        for endpoint in warm_ups {
            let Some(pool) = self.me.upgrade() else { return };
            tokio::spawn(warm_up_after_ejection(pool, endpoint));
        }
    }

    /// An ejected endpoint's warm-up ended: back in rotation with its connection open, or
    /// ejected again.
    fn warmed_up(&self, address: SocketAddr, result: Result<(), tonic::transport::Error>) {
        let mut state = self.lock();
        if !state.outliers.warming.remove(&address) {
            return;
        }
        state.outliers.ejections.readmit(&address);
        match result {
            Ok(()) => info!("ejection over; endpoint back in rotation"),
            Err(error) if classify(&error).is_evidence() => {
                debug!(%error, "cannot connect after the ejection");
                self.eject_locked(&mut state, address, "still cannot be connected to after its ejection");
            }
            Err(_) => {}
        }
        self.rebuild(&mut state);
    }
}

/// Connects an endpoint whose ejection time is up before it takes requests again.
#[instrument(skip_all, fields(endpoint = %endpoint.address))]
async fn warm_up_after_ejection(pool: Arc<Pool>, endpoint: Arc<Endpoint>) {
    let result = endpoint.warm_up().await;
    pool.warmed_up(endpoint.address, result);
}

/// gRFC A50's interval timer: ends an interval every `interval` of the settings in use (a new
/// interval starts over from its change) until the pool of GrpcBackend `backend` is gone.
#[instrument(name = "outlier_detection", skip_all, fields(backend = %backend))]
pub(crate) async fn outlier_timer(pool: Weak<Pool>, backend: String) {
    let Some(mut interval) = pool.upgrade().map(|pool| pool.outlier_interval.subscribe()) else {
        return;
    };
    loop {
        let period = *interval.borrow_and_update();
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match pool.upgrade() {
                    Some(pool) => pool.end_interval(),
                    None => return,
                },
                changed = interval.changed() => match changed {
                    Ok(()) => break,
                    Err(_) => return,
                },
            }
        }
    }
}

/// The interval sender of a pool whose settings are `config`.
pub(super) fn interval_sender(config: &OutlierDetection) -> watch::Sender<Duration> {
    watch::channel(timer_interval(config)).0
}
