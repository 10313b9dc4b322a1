//! Outlier detection in the pool: failed requests and the end of each interval eject endpoints
//! (the rules are in [`crate::outlier`]); an endpoint whose ejection time is up connects again
//! before it takes requests, and news from the operator about an ejected endpoint readmits it.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};

use super::{Pool, PoolState, addresses};
use crate::{
    endpoint::{Endpoint, SendError},
    failure::{Failure, classify},
    outlier::{Ejections, IntervalCounts},
    status::StatusEndpoint,
};

/// Which endpoints are ejected, and which of them are connecting again.
#[derive(Default)]
pub(super) struct Outliers {
    pub ejections: Ejections,
    /// Ejected endpoints whose ejection time is up, connecting before they take requests again
    /// (they stay ejected until then).
    warming: HashSet<SocketAddr>,
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
        let Self { ejections, warming } = self;
        warming.retain(|address| ejections.is_ejected(address));
    }

    /// Forgets every endpoint (the GrpcBackend is gone).
    pub fn clear(&mut self) {
        self.ejections.retain(|_| false);
        self.warming.clear();
    }
}

impl Pool {
    /// A request to `address` failed: eject it at once after repeated connect failures.
    /// Other evidence waits for the end of the interval ([`Pool::end_interval`]).
    pub fn report_failure(&self, address: SocketAddr, error: &SendError) {
        let threshold = self.config.outlier_detection.consecutive_connect_failures;
        if error.failure == Failure::Connect && threshold > 0 && error.consecutive_connect_failures >= threshold {
            self.eject_after_connect_failures(address);
        }
    }

    /// Called from the request path, which has no span of the GrpcBackend's.
    #[instrument(skip_all, fields(backend = %self.backend, endpoint = %address))]
    fn eject_after_connect_failures(&self, address: SocketAddr) {
        self.eject(address, "connection attempts failed in a row");
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
        let Some(length) =
            state
                .outliers
                .ejections
                .eject(address, in_rotation, Instant::now(), &self.config.outlier_detection)
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
        let config = &self.config.outlier_detection;
        let outcome = state.outliers.ejections.end_interval(&counts, Instant::now(), config);
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

/// gRFC A50's interval timer: ends an interval every `interval` until the pool of GrpcBackend
/// `backend` is gone.
#[instrument(name = "outlier_detection", skip_all, fields(backend = %backend))]
pub(crate) async fn outlier_timer(pool: Weak<Pool>, backend: String, interval: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.end_interval(),
            None => return,
        }
    }
}
