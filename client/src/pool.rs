//! The pool: from the GrpcBackend's status to the rotation requests are picked from.
//!
//! The pool keeps one connection per endpoint in rotation and keeps unchanged endpoints'
//! connections across updates (a changed weight does not reconnect). Every change — a new
//! status, an ejection, an ejection's end — builds a new [`Rotation`] and swaps it in
//! atomically; requests read the current rotation without taking a lock.

use std::{
    collections::{HashMap, hash_map::RandomState},
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
    endpoint::{Endpoint, EndpointStats, EndpointTemplate},
    outlier::{Ejections, OutlierDetection},
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
                panic: false,
            }),
            version: watch::channel(0).0,
            discovery: watch::channel(DiscoveryState::Connecting).0,
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
        let now = Instant::now();
        let before: HashMap<SocketAddr, StatusEndpoint> = state.status.iter().map(|e| (e.address, e.clone())).collect();
        for endpoint in &parsed.endpoints {
            // News about an ejected endpoint from the operator readmits it.
            if before.get(&endpoint.address) != Some(endpoint) {
                state.ejections.readmit(&endpoint.address, now);
            }
        }
        let present: std::collections::HashSet<SocketAddr> = parsed.endpoints.iter().map(|e| e.address).collect();
        state.ejections.retain(|address| present.contains(address));
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

    /// A request to `address` failed at the transport level: eject it if the rules allow.
    pub fn report_transport_failure(self: &Arc<Self>, address: SocketAddr) {
        let mut state = self.lock();
        let now = Instant::now();
        let in_rotation = state.status.iter().filter(|e| e.usable()).count().max(1);
        let Some(until) = state
            .ejections
            .eject(address, in_rotation, now, &self.config.outlier_detection)
        else {
            return;
        };
        if let Some(stats) = state.stats.get(&address) {
            stats.ejections.fetch_add(1, Ordering::Relaxed);
        }
        warn!(backend = %self.backend, %address, ejected_for = ?(until - now), "endpoint ejected after a transport failure");
        self.rebuild(&mut state);
        let shared = Arc::downgrade(self);
        tokio::spawn(readmit_at(shared, until));
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
        let now = Instant::now();
        let in_rotation: std::collections::HashSet<SocketAddr> =
            rotation.picker.items().iter().map(|e| e.address).collect();
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
                    ejected: state.ejections.is_ejected(&entry.address, now),
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
            endpoints,
        }
    }

    fn rebuild(&self, state: &mut PoolState) {
        let now = Instant::now();
        state.ejections.expire(now);
        let kubernetes_ready: Vec<&StatusEndpoint> = state.status.iter().filter(|e| e.kubernetes_ready()).collect();
        let usable: Vec<&StatusEndpoint> = state
            .status
            .iter()
            .filter(|e| e.usable() && !state.ejections.is_ejected(&e.address, now))
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

        let in_status: std::collections::HashSet<SocketAddr> = state.status.iter().map(|e| e.address).collect();
        state.stats.retain(|address, _| in_status.contains(address));
        for address in &in_status {
            state.stats.entry(*address).or_default();
        }
        let mut connections = HashMap::new();
        let mut items = Vec::new();
        let mut weights = Vec::new();
        let mut new_connections = Vec::new();
        for (address, weight) in chosen {
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
            items.push(endpoint);
            weights.push(weight);
        }
        // Connections that left rotation are dropped here; requests in flight on them hold
        // their own handle and finish.
        state.connections = connections;

        let unavailable = self.why_unavailable(state, &kubernetes_ready, now);
        let start = RandomState::new().hash_one(SystemTime::now()) as usize;
        self.rotation.store(Arc::new(Rotation {
            picker: Picker::new(items, &weights, start),
            unavailable,
            panic,
        }));
        self.version.send_modify(|v| *v += 1);
        // Connect to new endpoints now: no request pays for the handshake, and one that cannot
        // be reached is ejected before a request is sent to it.
        for endpoint in new_connections {
            if let Some(shared) = self.me.upgrade() {
                tokio::spawn(async move {
                    if let Err(error) = endpoint.warm_up().await {
                        debug!(backend = %shared.backend, address = %endpoint.address, %error, "cannot connect");
                        shared.report_transport_failure(endpoint.address);
                    }
                });
            }
        }
    }

    fn why_unavailable(&self, state: &PoolState, kubernetes_ready: &[&StatusEndpoint], now: Instant) -> String {
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
        if healthy.iter().all(|e| state.ejections.is_ejected(&e.address, now)) {
            return format!(
                "all {} ready endpoints of GrpcBackend {backend} are ejected after transport failures",
                healthy.len()
            );
        }
        format!("GrpcBackend {backend}: no endpoint can be connected to")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ends ejections that are due and rebuilds.
    fn refresh(&self) {
        let mut state = self.lock();
        self.rebuild(&mut state);
    }
}

async fn readmit_at(shared: Weak<Shared>, until: Instant) {
    tokio::time::sleep_until(until).await;
    if let Some(shared) = shared.upgrade() {
        shared.refresh();
    }
}
