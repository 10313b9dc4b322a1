//! The probers of every GrpcBackend: started when an endpoint appears, stopped when it leaves
//! or its GrpcBackend is deleted, restarted when the health-check settings change.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::runtime::reflector::ObjectRef;
use kubegrpc_crds::GrpcBackend;

use super::{
    prober::{self, ProbeObserver, ProbeSettings, ProbeState, ProberHandle},
    tracker::{HealthVerdict, ProbeOutcome},
};
use crate::metrics::Metrics;

/// A GrpcBackend, by namespace and name.
pub type BackendKey = ObjectRef<GrpcBackend>;

/// Where probers report: metrics, and the GrpcBackends to reconcile after a state change.
pub struct ProbeReports {
    pub metrics: Arc<Metrics>,
    pub changed: tokio::sync::mpsc::UnboundedSender<BackendKey>,
}

/// Operator-wide prober settings.
#[derive(Clone, Debug, Default)]
pub struct ProberOptions {
    /// Bind probe connections to this local address (see
    /// [`crate::controller::Settings::probe_source_address`]).
    pub source_address: Option<IpAddr>,
    /// The least time between two status writes of one GrpcBackend: a verdict cannot reach
    /// clients faster, so the probers damp flapping on that scale.
    pub write_interval: Duration,
}

struct Observer {
    backend: BackendKey,
    reports: Arc<ProbeReports>,
}

impl ProbeObserver for Observer {
    fn probed(&self, outcome: ProbeOutcome, latency: Option<std::time::Duration>) {
        self.reports.metrics.probed(outcome, latency);
    }

    fn changed(&self) {
        let _ = self.reports.changed.send(self.backend.clone());
    }

    fn rotated(&self) {
        self.reports.metrics.probe_connection_rotations.inc();
    }

    fn ended_early(&self) {
        self.reports.metrics.probe_connection_early_ends.inc();
    }
}

struct BackendProbers {
    settings: ProbeSettings,
    probers: HashMap<SocketAddr, ProberHandle>,
}

/// Every running prober, by GrpcBackend and endpoint.
pub struct ProberRegistry {
    backends: Mutex<HashMap<BackendKey, BackendProbers>>,
    reports: Arc<ProbeReports>,
    shared: prober::Shared,
}

impl ProberRegistry {
    pub fn new(reports: ProbeReports, options: ProberOptions) -> Self {
        Self {
            backends: Mutex::new(HashMap::new()),
            reports: Arc::new(reports),
            shared: prober::Shared {
                connects: prober::connect_limiter(),
                source_address: options.source_address,
                connector: prober::Connector::Tcp,
            },
        }
    }

    /// Makes `backend`'s probers match `targets`: starts missing ones from `seed` (the health
    /// already published, so nothing changes until a probe crosses a threshold), stops the ones
    /// no longer listed, restarts all when `settings` changed. Returns each target's state.
    pub fn sync(
        &self,
        backend: &BackendKey,
        settings: &ProbeSettings,
        targets: &[SocketAddr],
        seed: impl Fn(SocketAddr) -> HealthVerdict,
    ) -> HashMap<SocketAddr, ProbeState> {
        let mut backends = self.lock();
        let entry = backends.entry(backend.clone()).or_insert_with(|| BackendProbers {
            settings: settings.clone(),
            probers: HashMap::new(),
        });
        if entry.settings != *settings {
            entry.probers.clear();
            entry.settings = settings.clone();
        }
        let wanted: BTreeSet<SocketAddr> = targets.iter().copied().collect();
        entry.probers.retain(|target, _| wanted.contains(target));
        for target in &wanted {
            entry.probers.entry(*target).or_insert_with(|| {
                let observer = Arc::new(Observer {
                    backend: backend.clone(),
                    reports: self.reports.clone(),
                });
                prober::spawn(*target, settings.clone(), seed(*target), observer, self.shared.clone())
            });
        }
        let states = entry
            .probers
            .iter()
            .map(|(target, handle)| (*target, handle.state()))
            .collect();
        self.update_gauge(&backends);
        states
    }

    /// Stops every prober of `backend` (deleted, or its spec cannot be acted on).
    pub fn remove(&self, backend: &BackendKey) {
        let mut backends = self.lock();
        backends.remove(backend);
        self.update_gauge(&backends);
    }

    fn update_gauge(&self, backends: &HashMap<BackendKey, BackendProbers>) {
        let count: usize = backends.values().map(|b| b.probers.len()).sum();
        self.reports.metrics.probers.set(count as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BackendKey, BackendProbers>> {
        self.backends.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
