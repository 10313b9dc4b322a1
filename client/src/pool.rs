//! The pool: from the GrpcBackend's status to the rotation requests are picked from.
//!
//! The pool keeps one connection per endpoint in rotation and keeps unchanged endpoints'
//! connections across updates (a changed weight does not reconnect). Every change — a new
//! status, an ejection, an ejection's end, a step of slow start — builds a new [`Rotation`]
//! and swaps it in atomically; requests read the current rotation without taking a lock.
//!
//! What the rotation holds is decided in [`Shared::plan`] (panic mode, the client's zone, slow
//! start) and built in [`Shared::install`].

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
    slow_start::{ParsedSlowStart, SlowStart, picker_weights, ramp_percent, ramp_start, shown_weight},
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
    /// Ejected endpoints whose ejection time is up, connecting before they take requests again
    /// (they stay ejected until then).
    warming: HashSet<SocketAddr>,
    panic: bool,
    /// From the spec; applies from the next rebuild.
    slow_start: SlowStart,
    /// The last spec read's warnings, so that each is logged when it appears rather than at
    /// every status write.
    spec_warnings: Vec<String>,
    /// Usable endpoints with a recent `lastTransitionTime`, and where their ramp starts.
    ramps: HashMap<SocketAddr, Ramp>,
    /// The client's zone, if it has one.
    zone: Option<String>,
    /// The client has a zone and nothing usable is for it: every zone is in rotation.
    zone_fallback: bool,
    /// What the current rotation was built from.
    in_use: Vec<Chosen>,
    /// The slow-start timer runs.
    ramp_timer: bool,
}

/// A usable endpoint's slow start: the published transition time, and the monotonic instant it
/// stands for (fixed when first read, so that a wall-clock step does not move the ramp).
struct Ramp {
    since: SystemTime,
    start: Instant,
}

/// An endpoint chosen for the rotation, with its weight (published, or 1 in panic mode) and its
/// slow-start percentage while it ramps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chosen {
    address: SocketAddr,
    weight: u32,
    percent: Option<u32>,
}

/// What a rotation is built from.
struct Plan {
    panic: bool,
    zone_fallback: bool,
    chosen: Vec<Chosen>,
    /// Ejected endpoints in scope, whose connections are kept.
    ejected: Vec<SocketAddr>,
    /// Counts for the logs.
    usable: usize,
    kubernetes_ready: usize,
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
    /// Slow-start timers started so far (one runs at a time, only while something ramps).
    ramp_timers: std::sync::atomic::AtomicU64,
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
                slow_start: SlowStart::default(),
                spec_warnings: Vec::new(),
                ramps: HashMap::new(),
                zone: None,
                zone_fallback: false,
                in_use: Vec::new(),
                ramp_timer: false,
            }),
            version: watch::channel(0).0,
            discovery: watch::channel(DiscoveryState::Connecting).0,
            outlier_intervals: std::sync::atomic::AtomicU64::new(0),
            ramp_timers: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The current rotation (lock-free).
    pub fn rotation(&self) -> arc_swap::Guard<Arc<Rotation>> {
        self.rotation.load()
    }

    /// The client's zone (`None` or "": none): a rotation of the usable endpoints for it while
    /// there is one.
    pub fn set_zone(self: &Arc<Self>, zone: Option<String>) {
        let mut state = self.lock();
        state.zone = zone.filter(|zone| !zone.is_empty());
        self.rebuild(&mut state);
    }

    /// The spec's slow-start settings, read with the object; they apply from the next rebuild
    /// (discovery applies the status right after).
    pub fn apply_spec(&self, parsed: ParsedSlowStart) {
        let mut state = self.lock();
        if parsed.warnings != state.spec_warnings {
            for warning in &parsed.warnings {
                warn!(backend = %self.backend, "{warning}");
            }
            state.spec_warnings = parsed.warnings;
        }
        if parsed.settings != state.slow_start {
            let settings = &parsed.settings;
            info!(backend = %self.backend, window = ?settings.window, aggression = settings.aggression,
                min_weight_percent = settings.min_weight_percent, "slow start settings");
            state.slow_start = parsed.settings;
        }
    }

    /// A new status was read.
    pub fn apply_status(self: &Arc<Self>, parsed: ParsedStatus) {
        for warning in &parsed.warnings {
            warn!(backend = %self.backend, "{warning}");
        }
        let mut state = self.lock();
        let before: HashMap<SocketAddr, StatusEndpoint> = state.status.iter().map(|e| (e.address, e.clone())).collect();
        for endpoint in &parsed.endpoints {
            // News about an ejected endpoint from the operator readmits it (a new zone or the
            // end of its slow start is not news about its health).
            let news = before.get(&endpoint.address).is_none_or(|b| !b.same_state(endpoint));
            if news && state.ejections.readmit(&endpoint.address) {
                state.warming.remove(&endpoint.address);
            }
        }
        // Slow start ramps usable endpoints from their published transition time, turned into
        // a monotonic instant once (kept while the time stays the same).
        let (now_wall, now) = (SystemTime::now(), Instant::now());
        let mut ramps = HashMap::new();
        for endpoint in parsed.endpoints.iter().filter(|e| e.usable()) {
            let Some(since) = endpoint.last_transition_time else {
                continue;
            };
            let start = match state.ramps.get(&endpoint.address) {
                Some(ramp) if ramp.since == since => Some(ramp.start),
                _ => ramp_start(since, now_wall, now),
            };
            if let Some(start) = start {
                ramps.insert(endpoint.address, Ramp { since, start });
            }
        }
        state.ramps = ramps;
        let present: HashSet<SocketAddr> = parsed.endpoints.iter().map(|e| e.address).collect();
        state.ejections.retain(|address| present.contains(address));
        let PoolState { ejections, warming, .. } = &mut *state;
        warming.retain(|address| ejections.is_ejected(address));
        state.status = parsed.endpoints;
        state.presence = Presence::Found;
        self.rebuild(&mut state);
    }

    /// The GrpcBackend does not exist (deleted, or not created yet).
    pub fn apply_missing(self: &Arc<Self>) {
        let mut state = self.lock();
        state.status.clear();
        state.ramps.clear();
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
        let in_use: HashMap<SocketAddr, &Chosen> = state.in_use.iter().map(|c| (c.address, c)).collect();
        let zone = state.zone.as_deref();
        let endpoints = state
            .status
            .iter()
            .map(|entry| {
                let stats = state.stats.get(&entry.address);
                let count = |f: fn(&EndpointStats) -> u64| stats.map_or(0, |s| f(s));
                let used = in_use
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
                    ejected: state.ejections.is_ejected(&entry.address),
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
            zone: state.zone.clone(),
            zone_fallback: state.zone_fallback,
            endpoints,
        }
    }

    /// Builds and swaps in the rotation for the current state.
    fn rebuild(&self, state: &mut PoolState) {
        let plan = self.plan(state, Instant::now());
        self.install(state, plan);
    }

    /// What the rotation should hold at `now`: which endpoints, with which weights.
    ///
    /// Panic mode is decided over every zone, as without zones, and ignores zones: it means the
    /// health view (the operator's or the ejections') left too few endpoints to trust it, and
    /// then spreading over every Kubernetes-ready endpoint in every zone loads each one least
    /// (Envoy likewise routes zone-aware only outside panic mode). Otherwise a client with a
    /// zone uses the usable endpoints for its zone while there is one, else every usable one;
    /// slow start shapes the weights of whatever is in rotation.
    fn plan(&self, state: &PoolState, now: Instant) -> Plan {
        // A Serving endpoint of weight 0 was weighted out on purpose (a `Static` annotation of
        // 0, a drain): it is neither counted against the threshold nor used in panic.
        let kubernetes_ready: Vec<&StatusEndpoint> = state
            .status
            .iter()
            .filter(|e| e.kubernetes_ready() && !(e.health == Health::Serving && e.weight == 0))
            .collect();
        let usable: Vec<&StatusEndpoint> = state
            .status
            .iter()
            .filter(|e| e.usable() && !state.ejections.is_ejected(&e.address))
            .collect();
        let threshold = usize::from(self.config.panic_threshold);
        let panic = !kubernetes_ready.is_empty() && usable.len() * 100 < threshold * kubernetes_ready.len();
        // Panic: the operator's view (or the ejections) left too few; spread evenly over what
        // Kubernetes considers ready rather than overload the few or fail everything.
        if panic {
            return Plan {
                panic,
                zone_fallback: false,
                chosen: kubernetes_ready
                    .iter()
                    .map(|e| Chosen {
                        address: e.address,
                        weight: 1,
                        percent: None,
                    })
                    .collect(),
                ejected: Vec::new(),
                usable: usable.len(),
                kubernetes_ready: kubernetes_ready.len(),
            };
        }
        let zone = state.zone.as_deref();
        let local = |e: &StatusEndpoint| zone.is_some_and(|zone| e.is_for_zone(zone));
        let stay_local = usable.iter().any(|e| local(e));
        let in_scope = |e: &StatusEndpoint| !stay_local || local(e);
        let chosen = usable
            .iter()
            .filter(|e| in_scope(e))
            .map(|e| Chosen {
                address: e.address,
                weight: e.weight,
                percent: ramp_percent(&state.slow_start, state.ramps.get(&e.address).map(|r| r.start), now),
            })
            .collect();
        // Ejected endpoints keep their connection (gRFC A50), so they come back warm.
        let ejected = state
            .status
            .iter()
            .filter(|e| e.usable() && state.ejections.is_ejected(&e.address) && in_scope(e))
            .map(|e| e.address)
            .collect();
        Plan {
            panic,
            zone_fallback: zone.is_some() && !stay_local && !usable.is_empty(),
            chosen,
            ejected,
            usable: usable.len(),
            kubernetes_ready: kubernetes_ready.len(),
        }
    }

    /// Swaps in a rotation built from `plan`, keeping the connections of the endpoints it keeps.
    fn install(&self, state: &mut PoolState, plan: Plan) {
        if plan.panic != state.panic {
            if plan.panic {
                warn!(backend = %self.backend, usable = plan.usable, ready = plan.kubernetes_ready,
                    "panic mode: too few usable endpoints; spreading over every Kubernetes-ready endpoint");
            } else {
                info!(backend = %self.backend, "panic mode over");
            }
            state.panic = plan.panic;
        }
        if plan.zone_fallback != state.zone_fallback {
            let zone = state.zone.as_deref().unwrap_or_default();
            if plan.zone_fallback {
                warn!(backend = %self.backend, zone, "no usable endpoint for the client's zone; sending to every zone");
            } else {
                info!(backend = %self.backend, zone, "requests stay in the client's zone again");
            }
            state.zone_fallback = plan.zone_fallback;
        }

        let in_status: HashSet<SocketAddr> = state.status.iter().map(|e| e.address).collect();
        state.stats.retain(|address, _| in_status.contains(address));
        for address in &in_status {
            state.stats.entry(*address).or_default();
        }
        let weighted: Vec<(u32, Option<u32>)> = plan.chosen.iter().map(|c| (c.weight, c.percent)).collect();
        let chosen = plan.chosen.iter().map(|c| c.address).zip(picker_weights(&weighted));
        let mut connections = HashMap::new();
        let mut items = Vec::new();
        let mut weights = Vec::new();
        let mut new_connections = Vec::new();
        for (address, weight) in chosen.chain(plan.ejected.iter().map(|address| (*address, 0))) {
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
        state.in_use = plan.chosen;

        let unavailable = self.why_unavailable(state);
        let start = RandomState::new().hash_one(SystemTime::now()) as usize;
        self.rotation.store(Arc::new(Rotation {
            picker: Picker::new(items, &weights, start),
            unavailable,
            panic: plan.panic,
        }));
        self.version.send_modify(|v| *v += 1);
        if state.in_use.iter().any(|c| c.percent.is_some()) {
            self.start_ramp_timer(state);
        }
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

    /// Starts the slow-start timer unless it runs: while an endpoint in rotation ramps, it
    /// recomputes the shares every [`SlowStart::tick`] and swaps in a new rotation when one
    /// changed (the connections stay; requests in flight are not touched). It ends at the first
    /// tick where nothing ramps, and a later ramp starts a new one.
    fn start_ramp_timer(&self, state: &mut PoolState) {
        if state.ramp_timer {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!(backend = %self.backend, "no Tokio runtime to ramp slow-starting endpoints on");
            return;
        };
        state.ramp_timer = true;
        self.ramp_timers.fetch_add(1, Ordering::Relaxed);
        let me = self.me.clone();
        let mut tick = state.slow_start.tick();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                // The pool is not kept alive by its timer.
                let Some(shared) = me.upgrade() else { return };
                match shared.ramp_tick() {
                    Some(next) => tick = next,
                    None => return,
                }
            }
        });
    }

    /// One tick of the slow-start timer: a new rotation if a share changed. Returns when to
    /// tick next, or `None` (and marks the timer stopped) when nothing in rotation ramps.
    fn ramp_tick(&self) -> Option<std::time::Duration> {
        let mut state = self.lock();
        let plan = self.plan(&state, Instant::now());
        if plan.chosen != state.in_use {
            self.install(&mut state, plan);
        }
        if state.in_use.iter().any(|c| c.percent.is_some()) {
            Some(state.slow_start.tick())
        } else {
            state.ramp_timer = false;
            None
        }
    }

    fn why_unavailable(&self, state: &PoolState) -> String {
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
                state.status.iter().filter(|e| e.kubernetes_ready()).count()
            );
        }
        if healthy.iter().all(|e| state.ejections.is_ejected(&e.address)) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        snapshot::Snapshot,
        test_support::{BACKEND, answering, apply, config, entry, refusing, transitioned, zoned},
    };

    /// A pool with the default outlier detection and no panic mode.
    fn pool() -> Arc<Shared> {
        Shared::new(BACKEND.into(), config(OutlierDetection::default(), 0))
    }

    /// How often each endpoint is picked over one cycle of the rotation.
    fn picks_per_cycle(shared: &Shared) -> HashMap<SocketAddr, usize> {
        let rotation = shared.rotation();
        let mut picks = HashMap::new();
        for _ in 0..rotation.picker.cycle_len() {
            let endpoint = rotation.picker.pick().expect("a non-empty rotation");
            *picks.entry(endpoint.address).or_default() += 1;
        }
        picks
    }

    fn connection(shared: &Shared, address: SocketAddr) -> Arc<Endpoint> {
        let rotation = shared.rotation();
        let endpoint = rotation.picker.items().iter().find(|e| e.address == address);
        endpoint.expect("the endpoint is in rotation").clone()
    }

    /// Waits (at most 10s) until the snapshot satisfies `condition`, woken by each rebuild.
    async fn wait_until(shared: &Shared, what: &str, condition: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let mut version = shared.version.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let snapshot = shared.snapshot();
                if condition(&snapshot) {
                    return snapshot;
                }
                version.changed().await.expect("the pool is alive");
            }
        });
        match waited.await {
            Ok(snapshot) => snapshot,
            Err(_) => panic!("timed out waiting until {what}: {:#?}", shared.snapshot()),
        }
    }

    /// A real transport error: a request through a tonic channel to an address that refuses.
    async fn connect_error() -> tonic::transport::Error {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", refusing()))
            .expect("a valid URI")
            .connect_lazy();
        let request = http::Request::post("/grpc.health.v1.Health/Check")
            .body(tonic::body::Body::empty())
            .expect("a valid request");
        channel.oneshot(request).await.expect_err("the connection is refused")
    }

    async fn send_error(failure: Failure, consecutive_connect_failures: u32) -> SendError {
        SendError {
            error: connect_error().await,
            failure,
            consecutive_connect_failures,
        }
    }

    #[tokio::test]
    async fn only_usable_endpoints_are_in_rotation_with_their_weights() {
        let [light, heavy, not_serving, unknown, weightless, not_ready, terminating] = [
            answering().await,
            answering().await,
            answering().await,
            answering().await,
            answering().await,
            answering().await,
            answering().await,
        ];
        let shared = pool();
        let mut not_ready_entry = entry(not_ready, 100, "Serving");
        not_ready_entry["serving"] = json!(false);
        let mut terminating_entry = entry(terminating, 100, "Serving");
        terminating_entry["terminating"] = json!(true);
        apply(
            &shared,
            &[
                entry(light, 100, "Serving"),
                entry(heavy, 300, "Serving"),
                entry(not_serving, 100, "NotServing"),
                entry(unknown, 100, "Unknown"),
                entry(weightless, 0, "Serving"),
                not_ready_entry,
                terminating_entry,
            ],
        );

        assert_eq!(picks_per_cycle(&shared), HashMap::from([(light, 1), (heavy, 3)]));
        let snapshot = shared.snapshot();
        assert_eq!(snapshot.unavailable, None);
        assert!(!snapshot.panic);
        let in_rotation: Vec<SocketAddr> = snapshot
            .endpoints
            .iter()
            .filter(|e| e.in_rotation)
            .map(|e| e.address)
            .collect();
        assert_eq!(in_rotation, [light, heavy]);
        assert_eq!(snapshot.endpoints.len(), 7, "every listed endpoint is shown");
        assert!(!snapshot.endpoint(&not_ready).unwrap().kubernetes_ready);
        assert!(!snapshot.endpoint(&terminating).unwrap().kubernetes_ready);
    }

    #[tokio::test]
    async fn with_no_usable_endpoint_the_reason_names_the_backend() {
        let shared = pool();
        assert_eq!(
            shared.snapshot().unavailable.as_deref(),
            Some("GrpcBackend default/echo: its status has not been read yet")
        );

        apply(&shared, &[]);
        assert_eq!(
            shared.snapshot().unavailable.as_deref(),
            Some("GrpcBackend default/echo lists no endpoints")
        );

        let [not_serving, weightless] = [answering().await, answering().await];
        apply(
            &shared,
            &[entry(not_serving, 100, "NotServing"), entry(weightless, 0, "Serving")],
        );
        assert!(shared.rotation().picker.is_empty());
        assert_eq!(
            shared.snapshot().unavailable.as_deref(),
            Some("GrpcBackend default/echo has no ready endpoints (2 listed, 2 Kubernetes-ready, 1 NotServing)")
        );
    }

    #[tokio::test]
    async fn a_missing_backend_empties_the_rotation_and_says_not_found() {
        let shared = pool();
        apply(&shared, &[entry(answering().await, 100, "Serving")]);
        assert!(!shared.rotation().picker.is_empty());

        shared.apply_missing();
        let snapshot = shared.snapshot();
        assert!(shared.rotation().picker.is_empty());
        assert!(snapshot.endpoints.is_empty());
        assert_eq!(
            snapshot.unavailable.as_deref(),
            Some("GrpcBackend default/echo not found")
        );
    }

    #[tokio::test]
    async fn a_weight_change_keeps_the_connection() {
        let [first, second] = [answering().await, answering().await];
        let shared = pool();
        apply(&shared, &[entry(first, 100, "Serving"), entry(second, 100, "Serving")]);
        let before = connection(&shared, first);

        apply(&shared, &[entry(first, 300, "Serving"), entry(second, 100, "Serving")]);
        assert!(Arc::ptr_eq(&before, &connection(&shared, first)), "not reconnected");
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(first, 3), (second, 1)]));
        assert_eq!(shared.snapshot().endpoint(&first).unwrap().weight, 300);
    }

    #[tokio::test]
    async fn below_the_panic_threshold_every_kubernetes_ready_endpoint_is_in_rotation() {
        let [serving, not_serving, unknown, weightless, terminating] = [
            answering().await,
            answering().await,
            answering().await,
            answering().await,
            answering().await,
        ];
        let shared = Shared::new(BACKEND.into(), config(OutlierDetection::default(), 50));
        let mut terminating_entry = entry(terminating, 100, "Serving");
        terminating_entry["terminating"] = json!(true);
        // One usable of three Kubernetes-ready: 33% < 50%. The Serving endpoint of weight 0 was
        // weighted out on purpose: not counted, not used in panic.
        apply(
            &shared,
            &[
                entry(serving, 300, "Serving"),
                entry(not_serving, 100, "NotServing"),
                entry(unknown, 100, "Unknown"),
                entry(weightless, 0, "Serving"),
                terminating_entry,
            ],
        );

        assert!(shared.rotation().panic && shared.snapshot().panic);
        let spread_evenly = HashMap::from([(serving, 1), (not_serving, 1), (unknown, 1)]);
        assert_eq!(picks_per_cycle(&shared), spread_evenly);
        assert!(!shared.snapshot().endpoint(&terminating).unwrap().in_rotation);

        // Two usable of three: 67% is not below the threshold; panic mode ends.
        let mut terminating_entry = entry(terminating, 100, "Serving");
        terminating_entry["terminating"] = json!(true);
        apply(
            &shared,
            &[
                entry(serving, 300, "Serving"),
                entry(not_serving, 100, "Serving"),
                entry(unknown, 100, "Unknown"),
                entry(weightless, 0, "Serving"),
                terminating_entry,
            ],
        );
        assert!(!shared.snapshot().panic);
        assert_eq!(
            picks_per_cycle(&shared),
            HashMap::from([(serving, 3), (not_serving, 1)])
        );
    }

    #[tokio::test]
    async fn consecutive_connect_failures_eject_at_once() {
        let [failing, other] = [answering().await, answering().await];
        let shared = pool();
        apply(&shared, &[entry(failing, 100, "Serving"), entry(other, 100, "Serving")]);
        let threshold = shared.config.outlier_detection.consecutive_connect_failures;

        shared.report_failure(failing, &send_error(Failure::Connect, threshold - 1).await);
        assert!(shared.snapshot().endpoint(&failing).unwrap().in_rotation, "not yet");

        shared.report_failure(failing, &send_error(Failure::Connect, threshold).await);
        let snapshot = shared.snapshot();
        let ejected = snapshot.endpoint(&failing).unwrap();
        assert!(ejected.ejected && !ejected.in_rotation, "{ejected:?}");
        assert_eq!(ejected.ejections, 1);
        assert!(snapshot.endpoint(&other).unwrap().in_rotation);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(other, 1)]));
    }

    #[tokio::test]
    async fn rotation_failures_never_eject() {
        let failing = answering().await;
        let shared = pool();
        apply(&shared, &[entry(failing, 100, "Serving")]);
        let threshold = shared.config.outlier_detection.consecutive_connect_failures;

        shared.report_failure(failing, &send_error(Failure::Rotation, threshold).await);
        let snapshot = shared.snapshot();
        let endpoint = snapshot.endpoint(&failing).unwrap();
        assert!(!endpoint.ejected && endpoint.in_rotation, "{endpoint:?}");
        assert_eq!(endpoint.ejections, 0);
    }

    #[tokio::test]
    async fn an_ejection_whose_time_is_up_comes_back_after_warming_up() {
        let address = answering().await;
        let outlier_detection = OutlierDetection {
            base_ejection_time: Duration::ZERO,
            ..OutlierDetection::default()
        };
        let shared = Shared::new(BACKEND.into(), config(outlier_detection, 0));
        apply(&shared, &[entry(address, 100, "Serving")]);
        let threshold = shared.config.outlier_detection.consecutive_connect_failures;
        shared.report_failure(address, &send_error(Failure::Connect, threshold).await);
        assert_eq!(
            shared.snapshot().unavailable.as_deref(),
            Some("all 1 ready endpoints of GrpcBackend default/echo are ejected after connection failures")
        );

        // Its time is up: it connects again before it takes requests (nothing has run yet on
        // this single-threaded runtime).
        shared.end_interval();
        let warming = shared.snapshot();
        assert!(warming.endpoints[0].ejected && !warming.endpoints[0].in_rotation);

        let back = wait_until(&shared, "the endpoint is back in rotation", |s| {
            s.endpoints[0].in_rotation
        })
        .await;
        assert!(!back.endpoints[0].ejected);
        assert_eq!(back.endpoints[0].ejections, 1);
        assert_eq!(back.unavailable, None);
        assert_eq!(back.outlier_intervals, 1);
    }

    #[tokio::test]
    async fn a_new_endpoint_that_refuses_connections_is_ejected() {
        let [answering, refusing] = [answering().await, refusing()];
        let shared = pool();
        apply(
            &shared,
            &[entry(answering, 100, "Serving"), entry(refusing, 100, "Serving")],
        );

        let snapshot = wait_until(&shared, "the refusing endpoint is ejected", |s| {
            s.endpoint(&refusing).unwrap().ejected
        })
        .await;
        assert!(!snapshot.endpoint(&refusing).unwrap().in_rotation);
        assert!(snapshot.endpoint(&answering).unwrap().in_rotation);
    }

    #[tokio::test]
    async fn an_endpoint_still_refusing_after_its_ejection_is_ejected_again() {
        let refusing = refusing();
        let outlier_detection = OutlierDetection {
            base_ejection_time: Duration::ZERO,
            ..OutlierDetection::default()
        };
        let shared = Shared::new(BACKEND.into(), config(outlier_detection, 0));
        apply(&shared, &[entry(refusing, 100, "Serving")]);
        wait_until(&shared, "the refusing endpoint is ejected", |s| {
            s.endpoints[0].ejections == 1
        })
        .await;

        shared.end_interval();
        let snapshot = wait_until(&shared, "it is ejected again", |s| s.endpoints[0].ejections == 2).await;
        assert!(snapshot.endpoints[0].ejected && !snapshot.endpoints[0].in_rotation);
    }

    // === slow start ===

    fn slow_start(window: Duration) -> ParsedSlowStart {
        ParsedSlowStart {
            settings: SlowStart {
                window,
                ..SlowStart::default()
            },
            warnings: Vec::new(),
        }
    }

    fn ramp_timer_running(shared: &Shared) -> bool {
        shared.lock().ramp_timer
    }

    fn ramp_timers(shared: &Shared) -> u64 {
        shared.ramp_timers.load(Ordering::Relaxed)
    }

    /// Polls (the timer's last tick changes no rotation) until `condition`, for at most 10s.
    async fn poll_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_new_endpoints_share_climbs_to_its_weight_then_the_timer_stops() {
        let [old, new] = [answering().await, answering().await];
        let shared = pool();
        shared.apply_spec(slow_start(Duration::from_secs(2)));
        let long_ago = SystemTime::now() - Duration::from_secs(600);
        // The first status read lists `new` as just usable: it is new for every client.
        let status = [
            transitioned(old, 100, "Serving", long_ago),
            transitioned(new, 100, "Serving", SystemTime::now()),
        ];
        apply(&shared, &status);

        let first = shared.snapshot();
        let (old_seen, new_seen) = (first.endpoint(&old).unwrap(), first.endpoint(&new).unwrap());
        assert_eq!((old_seen.effective_weight, old_seen.slow_start_percent), (100, None));
        let first_percent = new_seen.slow_start_percent.expect("ramping");
        assert!((10..100).contains(&first_percent), "{new_seen:?}");
        assert_eq!(new_seen.effective_weight, first_percent, "weight 100: the percentage");
        assert_eq!(new_seen.weight, 100, "the published weight is kept");
        let picks = picks_per_cycle(&shared);
        assert!(picks[&new] < picks[&old], "{picks:?}");
        assert!(ramp_timer_running(&shared));
        let connection_before = connection(&shared, new);

        let climbing = wait_until(&shared, "the new endpoint's share climbs", |s| {
            s.endpoint(&new)
                .unwrap()
                .slow_start_percent
                .is_some_and(|p| p > first_percent)
        })
        .await;
        assert!(climbing.endpoint(&new).unwrap().effective_weight > first_percent);
        let ramped = wait_until(&shared, "the new endpoint has its full weight", |s| {
            s.endpoint(&new).unwrap().effective_weight == 100
        })
        .await;
        assert_eq!(ramped.endpoint(&new).unwrap().slow_start_percent, None);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(old, 1), (new, 1)]));
        assert!(
            Arc::ptr_eq(&connection_before, &connection(&shared, new)),
            "every step kept the connection"
        );

        // Nothing ramps: the timer ends, and the same status read again starts none.
        poll_until("the slow-start timer stops", || !ramp_timer_running(&shared)).await;
        let version = *shared.version.borrow();
        apply(&shared, &status);
        assert_eq!(
            *shared.version.borrow(),
            version + 1,
            "one rebuild, for the status read"
        );
        assert!(!ramp_timer_running(&shared));
        assert_eq!(ramp_timers(&shared), 1);

        // Another endpoint turning usable starts a timer again.
        let later = answering().await;
        let mut status = status.to_vec();
        status.push(transitioned(later, 100, "Serving", SystemTime::now()));
        apply(&shared, &status);
        assert!(shared.snapshot().endpoint(&later).unwrap().slow_start_percent.is_some());
        assert_eq!(ramp_timers(&shared), 2);
    }

    #[tokio::test]
    async fn without_slow_start_or_with_an_old_transition_the_full_weight_applies_at_once() {
        let [first, second] = [answering().await, answering().await];
        let shared = pool();
        let now = SystemTime::now();
        let status = [
            transitioned(first, 100, "Serving", now),
            transitioned(second, 300, "Serving", now - Duration::from_secs(61)),
        ];
        apply(&shared, &status);
        assert_eq!(
            picks_per_cycle(&shared),
            HashMap::from([(first, 1), (second, 3)]),
            "off"
        );

        shared.apply_spec(slow_start(Duration::from_secs(60)));
        let mut status = status.to_vec();
        status[0] = transitioned(first, 100, "Serving", now - Duration::from_secs(60));
        apply(&shared, &status);
        let snapshot = shared.snapshot();
        assert!(
            snapshot.endpoints.iter().all(|e| e.slow_start_percent.is_none()),
            "{snapshot:#?}"
        );
        assert_eq!(snapshot.endpoint(&second).unwrap().effective_weight, 300);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(first, 1), (second, 3)]));
        assert_eq!(ramp_timers(&shared), 0, "no timer for nothing to ramp");
    }

    #[tokio::test]
    async fn a_not_usable_endpoint_does_not_ramp_until_it_is_usable() {
        let [serving, coming] = [answering().await, answering().await];
        let shared = pool();
        shared.apply_spec(slow_start(Duration::from_secs(600)));
        let now = SystemTime::now();
        apply(
            &shared,
            &[
                entry(serving, 100, "Serving"),
                transitioned(coming, 100, "NotServing", now),
            ],
        );
        assert_eq!(ramp_timers(&shared), 0);
        let snapshot = shared.snapshot();
        assert_eq!(
            snapshot.endpoint(&coming).unwrap().effective_weight,
            0,
            "not in rotation"
        );

        apply(
            &shared,
            &[
                entry(serving, 100, "Serving"),
                transitioned(coming, 100, "Serving", now),
            ],
        );
        let percent = shared.snapshot().endpoint(&coming).unwrap().slow_start_percent;
        assert!(percent.is_some_and(|p| p < 100), "{percent:?}");
        assert_eq!(ramp_timers(&shared), 1);
    }

    #[tokio::test]
    async fn a_new_zone_or_the_end_of_slow_start_does_not_readmit_an_ejected_endpoint() {
        let [failing, other] = [answering().await, answering().await];
        let shared = pool();
        let since = SystemTime::now() - Duration::from_secs(5);
        apply(
            &shared,
            &[
                transitioned(failing, 100, "Serving", since),
                entry(other, 100, "Serving"),
            ],
        );
        let threshold = shared.config.outlier_detection.consecutive_connect_failures;
        shared.report_failure(failing, &send_error(Failure::Connect, threshold).await);
        assert!(shared.snapshot().endpoint(&failing).unwrap().ejected);

        apply(
            &shared,
            &[zoned(failing, "Serving", "a", &["b"]), entry(other, 100, "Serving")],
        );
        assert!(
            shared.snapshot().endpoint(&failing).unwrap().ejected,
            "no news about its health"
        );

        apply(&shared, &[entry(failing, 200, "Serving"), entry(other, 100, "Serving")]);
        assert!(
            !shared.snapshot().endpoint(&failing).unwrap().ejected,
            "news: readmitted"
        );
    }

    // === zones ===

    #[tokio::test]
    async fn a_client_in_a_zone_stays_in_it_while_it_can_and_comes_back() {
        let [a1, a2, b1, b2] = [
            answering().await,
            answering().await,
            answering().await,
            answering().await,
        ];
        let shared = pool();
        shared.set_zone(Some("a".into()));
        let status = |a_health: &str| {
            [
                zoned(a1, a_health, "a", &[]),
                zoned(a2, a_health, "a", &[]),
                zoned(b1, "Serving", "b", &[]),
                zoned(b2, "Serving", "b", &[]),
            ]
        };
        apply(&shared, &status("Serving"));
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(a1, 1), (a2, 1)]));
        let snapshot = shared.snapshot();
        assert_eq!(snapshot.zone.as_deref(), Some("a"));
        assert!(!snapshot.zone_fallback);
        let local: Vec<bool> = snapshot.endpoints.iter().map(|e| e.local).collect();
        assert_eq!(local, [true, true, false, false]);
        assert_eq!(snapshot.endpoint(&b1).unwrap().effective_weight, 0, "not in rotation");
        assert_eq!(snapshot.endpoint(&b1).unwrap().zone.as_deref(), Some("b"));
        let b_connected = snapshot.endpoint(&b1).unwrap().connections_opened;
        assert_eq!(b_connected, 0, "no connection to another zone while the own one serves");

        // Zone a has nothing usable: every zone takes requests.
        apply(&shared, &status("NotServing"));
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(b1, 1), (b2, 1)]));
        assert!(shared.snapshot().zone_fallback);

        // One of a's endpoints is back: requests go back to it alone.
        let mut back = status("NotServing");
        back[0] = zoned(a1, "Serving", "a", &[]);
        apply(&shared, &back);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(a1, 1)]));
        assert!(!shared.snapshot().zone_fallback);
    }

    #[tokio::test]
    async fn ejected_local_endpoints_send_requests_to_every_zone() {
        let [a, b] = [answering().await, answering().await];
        let shared = pool();
        shared.set_zone(Some("a".into()));
        apply(&shared, &[zoned(a, "Serving", "a", &[]), zoned(b, "Serving", "b", &[])]);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(a, 1)]));

        let threshold = shared.config.outlier_detection.consecutive_connect_failures;
        shared.report_failure(a, &send_error(Failure::Connect, threshold).await);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(b, 1)]));
        let snapshot = shared.snapshot();
        assert!(snapshot.zone_fallback && snapshot.endpoint(&a).unwrap().ejected);
    }

    #[tokio::test]
    async fn hints_decide_over_the_endpoints_own_zone() {
        let [in_a_for_b, in_b_for_a, in_b] = [answering().await, answering().await, answering().await];
        let shared = pool();
        shared.set_zone(Some("a".into()));
        apply(
            &shared,
            &[
                zoned(in_a_for_b, "Serving", "a", &["b"]),
                zoned(in_b_for_a, "Serving", "b", &["a", "c"]),
                zoned(in_b, "Serving", "b", &[]),
            ],
        );
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(in_b_for_a, 1)]));
        let local: Vec<bool> = shared.snapshot().endpoints.iter().map(|e| e.local).collect();
        assert_eq!(local, [false, true, false]);

        shared.set_zone(Some("b".into()));
        assert_eq!(
            picks_per_cycle(&shared),
            HashMap::from([(in_a_for_b, 1), (in_b, 1)]),
            "the zone can change; b's hints and b's unhinted endpoint"
        );
    }

    #[tokio::test]
    async fn without_a_zone_every_zone_is_in_rotation() {
        let [a, b, none] = [answering().await, answering().await, answering().await];
        let shared = pool();
        let status = [
            zoned(a, "Serving", "a", &[]),
            zoned(b, "Serving", "b", &["b"]),
            entry(none, 100, "Serving"),
        ];
        apply(&shared, &status);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(a, 1), (b, 1), (none, 1)]));
        let snapshot = shared.snapshot();
        assert_eq!((snapshot.zone.as_deref(), snapshot.zone_fallback), (None, false));
        assert!(snapshot.endpoints.iter().all(|e| !e.local));

        // An empty zone is no zone (a downward-API variable left empty).
        shared.set_zone(Some(String::new()));
        assert_eq!(shared.snapshot().zone, None);
        assert_eq!(picks_per_cycle(&shared).len(), 3);

        // A zone no endpoint is for: every zone.
        shared.set_zone(Some("c".into()));
        assert_eq!(picks_per_cycle(&shared).len(), 3);
        assert!(shared.snapshot().zone_fallback);
    }

    #[tokio::test]
    async fn panic_mode_is_decided_over_every_zone_and_spreads_over_every_zone() {
        let [a_up, a_down, b_down, c_down] = [
            answering().await,
            answering().await,
            answering().await,
            answering().await,
        ];
        let shared = Shared::new(BACKEND.into(), config(OutlierDetection::default(), 50));
        shared.set_zone(Some("a".into()));
        // One usable of four Kubernetes-ready, in every zone together: 25% < 50%.
        apply(
            &shared,
            &[
                zoned(a_up, "Serving", "a", &[]),
                zoned(a_down, "NotServing", "a", &[]),
                zoned(b_down, "NotServing", "b", &[]),
                zoned(c_down, "NotServing", "c", &[]),
            ],
        );
        let snapshot = shared.snapshot();
        assert!(snapshot.panic && !snapshot.zone_fallback);
        assert_eq!(
            picks_per_cycle(&shared),
            HashMap::from([(a_up, 1), (a_down, 1), (b_down, 1), (c_down, 1)])
        );

        // Two of four usable: no panic, and zone a keeps its one usable endpoint.
        apply(
            &shared,
            &[
                zoned(a_up, "Serving", "a", &[]),
                zoned(a_down, "NotServing", "a", &[]),
                zoned(b_down, "Serving", "b", &[]),
                zoned(c_down, "NotServing", "c", &[]),
            ],
        );
        assert!(!shared.snapshot().panic);
        assert_eq!(picks_per_cycle(&shared), HashMap::from([(a_up, 1)]));
    }
}
