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
    /// Ejected endpoints whose ejection time is up, connecting before they take requests again
    /// (they stay ejected until then).
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
            if before.get(&endpoint.address) != Some(endpoint) && state.ejections.readmit(&endpoint.address) {
                state.warming.remove(&endpoint.address);
            }
        }
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
            endpoints,
        }
    }

    fn rebuild(&self, state: &mut PoolState) {
        let kubernetes_ready: Vec<&StatusEndpoint> = state.status.iter().filter(|e| e.kubernetes_ready()).collect();
        let usable: Vec<&StatusEndpoint> = state
            .status
            .iter()
            .filter(|e| e.usable() && !state.ejections.is_ejected(&e.address))
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
                .filter(|e| e.usable() && state.ejections.is_ejected(&e.address))
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
        test_support::{BACKEND, answering, apply, config, entry, refusing},
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
        // One usable of four Kubernetes-ready: 25% < 50%.
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
        let spread_evenly = HashMap::from([(serving, 1), (not_serving, 1), (unknown, 1), (weightless, 1)]);
        assert_eq!(picks_per_cycle(&shared), spread_evenly);
        assert!(!shared.snapshot().endpoint(&terminating).unwrap().in_rotation);

        // Two usable of four: 50% is not below the threshold; panic mode ends.
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
}
