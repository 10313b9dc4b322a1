//! The pool read for introspection: a [`Snapshot`] of its view, its rotation and its counters.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::atomic::Ordering,
};

use super::{Pool, plan::Chosen};
use crate::{
    endpoint::EndpointStats,
    slow_start::shown_weight,
    snapshot::{EndpointSnapshot, Snapshot},
};

impl Pool {
    /// A read-only copy of the pool's state.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let rotation = self.rotation();
        let in_rotation: HashSet<SocketAddr> = rotation.picker.items().iter().map(|e| e.address).collect();
        let chosen: HashMap<SocketAddr, &Chosen> = state.built.chosen.iter().map(|c| (c.address, c)).collect();
        let zone = state.zone.as_deref();
        let endpoints = state
            .view
            .endpoints
            .iter()
            .map(|entry| {
                let stats = state.connections.stats.get(&entry.address);
                let count = |f: fn(&EndpointStats) -> u64| stats.map_or(0, |s| f(s));
                let used = chosen
                    .get(&entry.address)
                    .filter(|_| in_rotation.contains(&entry.address));
                EndpointSnapshot {
                    address: entry.address,
                    weight: entry.weight,
                    effective_weight: used.map_or(0, |c| shown_weight(c.weight, c.percent)),
                    slow_start_percent: used.and_then(|c| c.percent),
                    last_transition_time: entry.last_transition_time,
                    zone: entry.zone.clone(),
                    for_zones: entry.for_zones.clone(),
                    local: zone.is_some_and(|zone| entry.is_for_zone(zone)),
                    health: entry.health,
                    kubernetes_ready: entry.kubernetes_ready(),
                    ejected: state.outliers.ejections.is_ejected(&entry.address),
                    in_rotation: in_rotation.contains(&entry.address),
                    in_flight: count(|s| s.in_flight.load(Ordering::Relaxed)),
                    requests: count(|s| s.requests.load(Ordering::Relaxed)),
                    failures: count(|s| s.failures.load(Ordering::Relaxed)),
                    ejections: count(|s| s.ejections.load(Ordering::Relaxed)),
                    connections_opened: count(|s| s.connections_opened.load(Ordering::Relaxed)),
                    connections_closed: count(|s| s.connections_closed.load(Ordering::Relaxed)),
                }
            })
            .collect();
        Snapshot {
            backend: self.backend.clone(),
            discovery: self.discovery(),
            panic: rotation.panic,
            unavailable: rotation.picker.is_empty().then(|| rotation.unavailable.clone()),
            outlier_intervals: self.outlier_intervals.load(Ordering::Relaxed),
            outlier_detection: state.outliers.config.clone(),
            zone: state.zone.clone(),
            zone_fallback: state.built.zone_fallback,
            endpoints,
            routing: None,
        }
    }
}
