//! The pool: from the GrpcBackend's status to the rotation requests are picked from.
//!
//! The pool keeps one connection per endpoint in rotation and keeps unchanged endpoints'
//! connections across updates (a changed weight does not reconnect). Every change — a new
//! status, an ejection, an ejection's end — builds a new [`Rotation`] and swaps it in
//! atomically; requests read the current rotation without taking a lock.

use std::{
    collections::{HashMap, HashSet, hash_map::RandomState},
    hash::BuildHasher,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak, atomic::Ordering},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use kubegrpc_crds::Health;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    endpoint::{Endpoint, EndpointStats, EndpointTemplate, SendError},
    failure::{Failure, classify},
    outlier::{Ejections, IntervalCounts, OutlierDetection},
    picker::Picker,
    snapshot::{DiscoveryState, EndpointSnapshot, Snapshot},
    status::{ParsedStatus, StatusEndpoint},
};

/// How the pool behaves; from the channel builder.
#[derive(Clone)]
pub struct PoolConfig {
    pub template: EndpointTemplate,
    pub tls: bool,
    pub outlier_detection: OutlierDetection,
    /// In percent: below this share of Kubernetes-ready endpoints usable, spread over all
    /// Kubernetes-ready ones. 0 turns it off.
    pub panic_threshold: u8,
    pub transparent_retry: bool,
}

/// What requests are picked from, rebuilt on every change.
pub struct Rotation {
    pub picker: Picker<Arc<Endpoint>>,
    /// Why nothing can be picked, naming the GrpcBackend, when the picker is empty.
    pub unavailable: String,
    pub panic: bool,
}

/// Whether the GrpcBackend object exists, as far as the watch knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    NotReadYet,
    Found,
    NotFound,
}

struct PoolState {
    presence: Presence,
    status: Vec<StatusEndpoint>,
    connections: HashMap<SocketAddr, Arc<Endpoint>>,
    stats: HashMap<SocketAddr, Arc<EndpointStats>>,
    ejections: Ejections,
    /// Endpoints whose ejection time is up, connecting before they take requests again.
    warming: HashSet<SocketAddr>,
    panic: bool,
}

/// State shared by every clone of a channel and its discovery task.
pub struct Shared {
    /// Itself, for the tasks it spawns (which must not keep it alive).
    me: Weak<Shared>,
    pub backend: String,
    pub config: PoolConfig,
    rotation: ArcSwap<Rotation>,
    state: Mutex<PoolState>,
    version: watch::Sender<u64>,
    discovery: watch::Sender<DiscoveryState>,
    outlier_intervals: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn new(backend: String, config: PoolConfig) -> Arc<Self> {
        let unavailable = format!("GrpcBackend {backend}: its status has not been read yet");
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            rotation: ArcSwap::from_pointee(Rotation {
                picker: Picker::new(Vec::new(), &[], 0),
                unavailable,
                panic: false,
            }),
            backend,
            config,
            state: Mutex::new(PoolState {
                presence: Presence::NotReadYet,
                status: Vec::new(),
                connections: HashMap::new(),
                stats: HashMap::new(),
                ejections: Ejections::default(),
                warming: HashSet::new(),
                panic: false,
            }),
            version: watch::channel(0).0,
            discovery: watch::channel(DiscoveryState::Connecting).0,
            outlier_intervals: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The current rotation (lock-free).
    pub fn rotation(&self) -> arc_swap::Guard<Arc<Rotation>> {
        self.rotation.load()
    }

    /// A new status was read.
    pub fn apply_status(self: &Arc<Self>, parsed: ParsedStatus) {
        for warning in &parsed.warnings {
            warn!(backend = %self.backend, "{warning}");
        }
        let mut state = self.lock();
        let before: HashMap<SocketAddr, StatusEndpoint> = state.status.iter().map(|e| (e.address, e.clone())).collect();
        for endpoint in &parsed.endpoints {
            // News about an ejected endpoint from the operator readmits it.
            if before.get(&endpoint.address) != Some(endpoint) {
                state.ejections.readmit(&endpoint.address);
            }
        }
        let present: HashSet<SocketAddr> = parsed.endpoints.iter().map(|e| e.address).collect();
        state.ejections.retain(|address| present.contains(address));
        state.warming.retain(|address| present.contains(address));
        state.status = parsed.endpoints;
        state.presence = Presence::Found;
        self.rebuild(&mut state);
    }

    /// The GrpcBackend does not exist (deleted, or not created yet).
    pub fn apply_missing(self: &Arc<Self>) {
        let mut state = self.lock();
        state.status.clear();
        state.presence = Presence::NotFound;
        state.ejections.retain(|_| false);
        state.warming.clear();
        self.rebuild(&mut state);
    }

    /// Sets the discovery state if its kind changed (so a `Stale` state keeps its first
    /// error and when it began).
    pub fn set_discovery(&self, discovery: DiscoveryState) {
        self.discovery.send_if_modified(|current| {
            let changed = std::mem::discriminant(current) != std::mem::discriminant(&discovery);
            if changed {
                *current = discovery;
            }
            changed
        });
    }

    pub fn discovery(&self) -> DiscoveryState {
        self.discovery.borrow().clone()
    }

    /// A request to `address` failed: eject it at once after repeated connect failures.
    /// Other evidence waits for the end of the interval ([`Shared::end_interval`]).
    pub fn report_failure(self: &Arc<Self>, address: SocketAddr, error: &SendError) {
        let threshold = self.config.outlier_detection.consecutive_connect_failures;
        if error.failure == Failure::Connect && threshold > 0 && error.consecutive_connect_failures >= threshold {
            self.eject(address, "connection attempts failed in a row");
        }
    }

    /// Ejects `address` if the rules allow.
    fn eject(self: &Arc<Self>, address: SocketAddr, why: &str) {
        let mut state = self.lock();
        if self.eject_locked(&mut state, address, why) {
            self.rebuild(&mut state);
        }
    }

    fn eject_locked(&self, state: &mut PoolState, address: SocketAddr, why: &str) -> bool {
        let in_rotation = state.status.iter().filter(|e| e.usable()).count().max(1);
        let Some(length) = state
            .ejections
            .eject(address, in_rotation, Instant::now(), &self.config.outlier_detection)
        else {
            return false;
        };
        if let Some(stats) = state.stats.get(&address) {
            stats.ejections.fetch_add(1, Ordering::Relaxed);
        }
        warn!(backend = %self.backend, %address, ejected_for = ?length, "endpoint ejected: {why}");
        true
    }

    /// The end of an outlier-detection interval: ejects on the interval's evidence, and warms
    /// up the endpoints whose ejection time is up before they take requests again.
    pub fn end_interval(self: &Arc<Self>) {
        let mut state = self.lock();
        let counts: Vec<(SocketAddr, IntervalCounts)> = state
            .status
            .iter()
            .filter(|e| e.usable())
            .filter_map(|e| state.stats.get(&e.address).map(|s| (e.address, s.take_interval())))
            .collect();
        let config = &self.config.outlier_detection;
        let outcome = state.ejections.end_interval(&counts, Instant::now(), config);
        self.outlier_intervals.fetch_add(1, Ordering::Relaxed);
        for address in &outcome.ejected {
            if let Some(stats) = state.stats.get(address) {
                stats.ejections.fetch_add(1, Ordering::Relaxed);
            }
            let (successes, failures) = counts
                .iter()
                .find(|(a, _)| a == address)
                .map_or((0, 0), |(_, c)| (c.successes, c.failures));
            warn!(backend = %self.backend, %address, successes, failures,
                "endpoint ejected: failure percentage over the interval");
        }
        let mut warm_ups = Vec::new();
        for address in outcome.due {
            if !state.warming.insert(address) {
                continue;
            }
            match state.connections.get(&address) {
                Some(endpoint) => warm_ups.push(endpoint.clone()),
                None => {
                    state.warming.remove(&address);
                    state.ejections.readmit(&address);
                }
            }
        }
        if !outcome.ejected.is_empty() || !warm_ups.is_empty() {
            self.rebuild(&mut state);
        }
        drop(state);
        for endpoint in warm_ups {
            let shared = self.clone();
            tokio::spawn(async move {
                let result = endpoint.warm_up().await;
                shared.warmed_up(endpoint.address, result);
            });
        }
    }

    /// An ejected endpoint's warm-up ended: back in rotation with its connection open, or
    /// ejected again.
    fn warmed_up(self: &Arc<Self>, address: SocketAddr, result: Result<(), tonic::transport::Error>) {
        let mut state = self.lock();
        if !state.warming.remove(&address) {
            return;
        }
        state.ejections.readmit(&address);
        match result {
            Ok(()) => info!(backend = %self.backend, %address, "ejection over; endpoint back in rotation"),
            Err(error) if classify(&error).is_evidence() => {
                debug!(backend = %self.backend, %address, %error, "cannot connect after the ejection");
                self.eject_locked(&mut state, address, "still cannot be connected to after its ejection");
            }
            Err(_) => {}
        }
        self.rebuild(&mut state);
    }

    /// Waits until a request can be picked.
    pub async fn ready(&self) {
        let mut version = self.version.subscribe();
        loop {
            if !self.rotation().picker.is_empty() {
                return;
            }
            if version.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A read-only copy of the pool's state.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let rotation = self.rotation();
        let in_rotation: HashSet<SocketAddr> = rotation.picker.items().iter().map(|e| e.address).collect();
        let endpoints = state
            .status
            .iter()
            .map(|entry| {
                let stats = state.stats.get(&entry.address);
                let count = |f: fn(&EndpointStats) -> u64| stats.map_or(0, |s| f(s));
                EndpointSnapshot {
                    address: entry.address,
                    weight: entry.weight,
                    health: entry.health,
                    kubernetes_ready: entry.kubernetes_ready(),
                    ejected: state.ejections.is_ejected(&entry.address) || state.warming.contains(&entry.address),
                    in_rotation: in_rotation.contains(&entry.address),
                    in_flight: count(|s| s.in_flight.load(Ordering::Relaxed)),
                    requests: count(|s| s.requests.load(Ordering::Relaxed)),
                    failures: count(|s| s.failures.load(Ordering::Relaxed)),
                    ejections: count(|s| s.ejections.load(Ordering::Relaxed)),
                }
            })
            .collect();
        Snapshot {
            backend: self.backend.clone(),
            discovery: self.discovery(),
            panic: rotation.panic,
            unavailable: rotation.picker.is_empty().then(|| rotation.unavailable.clone()),
            outlier_intervals: self.outlier_intervals.load(Ordering::Relaxed),
            endpoints,
        }
    }

    fn rebuild(&self, state: &mut PoolState) {
        let kubernetes_ready: Vec<&StatusEndpoint> = state.status.iter().filter(|e| e.kubernetes_ready()).collect();
        let usable: Vec<&StatusEndpoint> = state
            .status
            .iter()
            .filter(|e| e.usable() && !state.ejections.is_ejected(&e.address) && !state.warming.contains(&e.address))
            .collect();
        let threshold = usize::from(self.config.panic_threshold);
        let panic = !kubernetes_ready.is_empty() && usable.len() * 100 < threshold * kubernetes_ready.len();
        // Panic: the operator's view (or the ejections) left too few; spread evenly over what
        // Kubernetes considers ready rather than overload the few or fail everything.
        let chosen: Vec<(SocketAddr, u32)> = if panic {
            kubernetes_ready.iter().map(|e| (e.address, 1)).collect()
        } else {
            usable.iter().map(|e| (e.address, e.weight)).collect()
        };
        if panic != state.panic {
            if panic {
                warn!(backend = %self.backend, usable = usable.len(), ready = kubernetes_ready.len(),
                    "panic mode: too few usable endpoints; spreading over every Kubernetes-ready endpoint");
            } else {
                info!(backend = %self.backend, "panic mode over");
            }
            state.panic = panic;
        }

        let in_status: HashSet<SocketAddr> = state.status.iter().map(|e| e.address).collect();
        state.stats.retain(|address, _| in_status.contains(address));
        for address in &in_status {
            state.stats.entry(*address).or_default();
        }
        // Ejected endpoints keep their connection (gRFC A50), so they come back warm.
        let ejected: Vec<(SocketAddr, u32)> = if panic {
            Vec::new()
        } else {
            state
                .status
                .iter()
                .filter(|e| {
                    e.usable() && (state.ejections.is_ejected(&e.address) || state.warming.contains(&e.address))
                })
                .map(|e| (e.address, 0))
                .collect()
        };
        let mut connections = HashMap::new();
        let mut items = Vec::new();
        let mut weights = Vec::new();
        let mut new_connections = Vec::new();
        for (address, weight) in chosen.into_iter().chain(ejected) {
            let endpoint = match state.connections.get(&address) {
                Some(existing) => existing.clone(),
                None => {
                    let stats = state.stats.get(&address).cloned().unwrap_or_default();
                    match Endpoint::new(address, self.config.tls, &self.config.template, stats) {
                        Ok(endpoint) => {
                            let endpoint = Arc::new(endpoint);
                            new_connections.push(endpoint.clone());
                            endpoint
                        }
                        Err(error) => {
                            warn!(backend = %self.backend, %address, %error, "cannot configure a connection; endpoint left out");
                            continue;
                        }
                    }
                }
            };
            connections.insert(address, endpoint.clone());
            if weight > 0 {
                items.push(endpoint);
                weights.push(weight);
            }
        }
        // Connections that left rotation are dropped here; requests in flight on them hold
        // their own handle and finish.
        state.connections = connections;

        let unavailable = self.why_unavailable(state, &kubernetes_ready);
        let start = RandomState::new().hash_one(SystemTime::now()) as usize;
        self.rotation.store(Arc::new(Rotation {
            picker: Picker::new(items, &weights, start),
            unavailable,
            panic,
        }));
        self.version.send_modify(|v| *v += 1);
        // Connect to new endpoints now: no request pays for the handshake, and one that cannot
        // be reached at all is ejected before a request is sent to it.
        for endpoint in new_connections {
            if let Some(shared) = self.me.upgrade() {
                tokio::spawn(async move {
                    if let Err(error) = endpoint.warm_up().await {
                        debug!(backend = %shared.backend, address = %endpoint.address, %error, "cannot connect");
                        if classify(&error).is_evidence() {
                            shared.eject(endpoint.address, "a new endpoint that cannot be connected to");
                        }
                    }
                });
            }
        }
    }

    fn why_unavailable(&self, state: &PoolState, kubernetes_ready: &[&StatusEndpoint]) -> String {
        let backend = &self.backend;
        match state.presence {
            Presence::NotReadYet => return format!("GrpcBackend {backend}: its status has not been read yet"),
            Presence::NotFound => return format!("GrpcBackend {backend} not found"),
            Presence::Found => {}
        }
        if state.status.is_empty() {
            return format!("GrpcBackend {backend} lists no endpoints");
        }
        let healthy: Vec<&StatusEndpoint> = state.status.iter().filter(|e| e.usable()).collect();
        if healthy.is_empty() {
            let not_serving = state.status.iter().filter(|e| e.health == Health::NotServing).count();
            return format!(
                "GrpcBackend {backend} has no ready endpoints ({} listed, {} Kubernetes-ready, {not_serving} NotServing)",
                state.status.len(),
                kubernetes_ready.len()
            );
        }
        if healthy
            .iter()
            .all(|e| state.ejections.is_ejected(&e.address) || state.warming.contains(&e.address))
        {
            return format!(
                "all {} ready endpoints of GrpcBackend {backend} are ejected after connection failures",
                healthy.len()
            );
        }
        format!("GrpcBackend {backend}: no endpoint can be connected to")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// gRFC A50's interval timer: ends an interval every `interval` until the pool is gone.
pub async fn outlier_timer(shared: Weak<Shared>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.upgrade() {
            Some(shared) => shared.end_interval(),
            None => return,
        }
    }
}
