//! The pool: from the GrpcBackend's status to the rotation requests are picked from.
//!
//! The pool keeps one connection per endpoint in rotation and keeps unchanged endpoints'
//! connections across updates (a changed weight does not reconnect). Every change — a new
//! status, an ejection, an ejection's end, a step of slow start — builds a new [`Rotation`]
//! and swaps it in atomically; requests read the current rotation without taking a lock.
//!
//! The steps, one module each, in the order data flows through them:
//!
//! - [`apply`]: what discovery read (the status, the spec's slow-start settings, the object's
//!   absence) and the client's zone update the pool's view;
//! - [`plan`]: a pure function of that view: which endpoints the rotation holds, with which
//!   weights (panic mode, the client's zone, slow start), and why nothing can be picked;
//! - [`install`]: builds the planned rotation, keeping the connections of the endpoints it
//!   keeps and connecting new ones at once, and swaps it in;
//! - [`ejection`]: outlier detection takes endpoints out on evidence and brings them back
//!   connected;
//! - [`ramp`]: slow start's ramps and the timer that steps them;
//! - [`snapshot`]: the read-only copy of it all.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak, atomic::AtomicU64},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{sync::watch, time::Instant};

use crate::{
    connection::Dial,
    endpoint::{Endpoint, EndpointTemplate},
    outlier::OutlierDetection,
    picker::Picker,
    snapshot::DiscoveryState,
    status::StatusEndpoint,
    tls::Transport,
};

mod apply;
mod ejection;
mod install;
mod plan;
mod ramp;
mod snapshot;
#[cfg(test)]
mod tests;

pub(crate) use ejection::outlier_timer;

/// How the pool behaves; from the channel builder.
#[derive(Clone)]
pub(crate) struct PoolConfig {
    pub template: EndpointTemplate,
    pub tls: bool,
    /// Outlier detection set in code: it wins over the GrpcBackend's `spec.outlierDetection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// In percent: below this share of Kubernetes-ready endpoints usable, spread over all
    /// Kubernetes-ready ones. 0 turns it off.
    pub panic_threshold: u8,
    pub transparent_retry: bool,
    /// How connections are made (TCP but in the unit tests).
    pub dial: Dial,
}

/// What requests are picked from, rebuilt on every change.
pub(crate) struct Rotation {
    pub picker: Picker<Arc<Endpoint>>,
    /// Why nothing can be picked, naming the GrpcBackend, when the picker is empty.
    pub unavailable: String,
    pub panic: bool,
}

/// The endpoints of one GrpcBackend and the rotation requests are picked from, shared by every
/// clone of a channel, its discovery task and its timers.
pub(crate) struct Pool {
    /// Itself, for the tasks it spawns (which must not keep it alive).
    me: Weak<Pool>,
    /// The GrpcBackend, `namespace/name`.
    pub backend: String,
    pub config: PoolConfig,
    rotation: ArcSwap<Rotation>,
    state: Mutex<PoolState>,
    /// Bumped on every new rotation.
    version: watch::Sender<u64>,
    discovery: watch::Sender<DiscoveryState>,
    outlier_intervals: AtomicU64,
    /// The outlier-detection timer's period, followed by the timer ([`ejection`]).
    outlier_interval: watch::Sender<Duration>,
    /// Slow-start timers started so far (one runs at a time, only while something ramps).
    ramp_timers: AtomicU64,
}

/// What the pool knows, behind its lock; each part is kept by the module named beside it.
#[derive(Default)]
struct PoolState {
    /// What discovery read last ([`apply`]).
    view: apply::View,
    /// The client's zone, if it has one.
    zone: Option<String>,
    /// Ejected endpoints ([`ejection`]).
    outliers: ejection::Outliers,
    /// Slow-start settings and ramps ([`ramp`]).
    slow_start: ramp::Ramps,
    /// Connections and counters ([`install`]).
    connections: install::Connections,
    /// What the current rotation was built from ([`install`]).
    built: install::Built,
    /// TLS or not, as the GrpcBackend's spec says ([`apply`]); unused when the user gave TLS
    /// settings.
    transport: Transport,
}

impl PoolState {
    /// What [`plan::plan`] decides from, at `now`.
    fn plan_input(&self, panic_threshold: u8, now: Instant) -> plan::PlanInput<'_> {
        plan::PlanInput {
            endpoints: &self.view.endpoints,
            ejections: &self.outliers.ejections,
            zone: self.zone.as_deref(),
            panic_threshold,
            ramps: &self.slow_start,
            now,
        }
    }
}

impl Pool {
    pub fn new(backend: String, config: PoolConfig) -> Arc<Self> {
        let unavailable = format!("GrpcBackend {backend}: its status has not been read yet");
        let mut state = PoolState::default();
        if let Some(outlier_detection) = &config.outlier_detection {
            state.outliers.config = outlier_detection.clone();
        }
        let outlier_interval = ejection::interval_sender(&state.outliers.config);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            rotation: ArcSwap::from_pointee(Rotation {
                picker: Picker::new(Vec::new(), &[], 0),
                unavailable,
                panic: false,
            }),
            backend,
            config,
            state: Mutex::new(state),
            version: watch::channel(0).0,
            discovery: watch::channel(DiscoveryState::Connecting).0,
            outlier_intervals: AtomicU64::new(0),
            outlier_interval,
            ramp_timers: AtomicU64::new(0),
        })
    }

    /// The current rotation (lock-free).
    pub fn rotation(&self) -> arc_swap::Guard<Arc<Rotation>> {
        self.rotation.load()
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

    /// Plans and swaps in the rotation for the current state.
    fn rebuild(&self, state: &mut PoolState) {
        let mut plan = plan::plan(&state.plan_input(self.config.panic_threshold, Instant::now()));
        if let Transport::Unavailable(_) = state.transport {
            // The endpoints serve TLS and this client cannot connect so: none is used (never in
            // plaintext); requests fail with the reason.
            plan.chosen.clear();
            plan.ejected.clear();
            plan.panic = false;
            plan.zone_fallback = false;
        }
        self.install(state, plan);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The addresses `endpoints` list: per-endpoint state is kept only for those.
fn addresses(endpoints: &[StatusEndpoint]) -> HashSet<SocketAddr> {
    endpoints.iter().map(|e| e.address).collect()
}
