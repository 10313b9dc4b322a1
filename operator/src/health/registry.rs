//! The probers of every GrpcBackend: started when an endpoint appears, stopped when it leaves
//! or its GrpcBackend is deleted, restarted when the health-check settings change.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use super::{
    prober::{self, ProbeObserver, ProbeSettings, ProbeState, ProberHandle},
    tracker::{HealthVerdict, ProbeOutcome},
};
use crate::{key::ObjectKey, metrics::Metrics};

/// Where probers report: metrics, and the GrpcBackends to reconcile after a state change
/// (each GrpcBackend at most once until its next reconcile syncs it: the channel is bounded by
/// the number of GrpcBackends).
pub struct ProbeReports {
    pub metrics: Arc<Metrics>,
    pub changed: tokio::sync::mpsc::UnboundedSender<ObjectKey>,
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
    backend: ObjectKey,
    reports: Arc<ProbeReports>,
    /// The backend's key is in the channel, or its reconcile has not read the probers' states
    /// yet: no need to send it again. Shared by the backend's probers, cleared by
    /// [`ProberRegistry::sync`], so the channel holds each GrpcBackend at most once.
    queued: Arc<AtomicBool>,
}

impl ProbeObserver for Observer {
    fn backend(&self) -> Option<&dyn std::fmt::Display> {
        Some(&self.backend)
    }

    fn probed(&self, outcome: ProbeOutcome, latency: Option<std::time::Duration>) {
        self.reports.metrics.probed(outcome, latency);
    }

    fn changed(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let _ = self.reports.changed.send(self.backend.clone());
        }
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
    queued: Arc<AtomicBool>,
}

/// Every running prober, by GrpcBackend and endpoint.
pub struct ProberRegistry {
    backends: Mutex<HashMap<ObjectKey, BackendProbers>>,
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
                retries: prober::retry_limiter(),
                source_address: options.source_address,
                connector: prober::Connector::Tcp,
                write_interval: options.write_interval,
            },
        }
    }

    /// How many probers `backend` has.
    #[cfg(test)]
    pub fn count(&self, backend: &ObjectKey) -> usize {
        self.lock().get(backend).map_or(0, |probers| probers.probers.len())
    }

    /// Makes `backend`'s probers match `targets`: starts missing ones from `seed` (the health
    /// already published, so nothing changes until a probe crosses a threshold), stops the ones
    /// no longer listed, restarts all when `settings` changed. Returns each target's state.
    pub fn sync(
        &self,
        backend: &ObjectKey,
        settings: &ProbeSettings,
        targets: &[SocketAddr],
        seed: impl Fn(SocketAddr) -> HealthVerdict,
    ) -> HashMap<SocketAddr, ProbeState> {
        let mut backends = self.lock();
        let entry = backends.entry(backend.clone()).or_insert_with(|| BackendProbers {
            settings: settings.clone(),
            probers: HashMap::new(),
            queued: Arc::new(AtomicBool::new(false)),
        });
        // The states are read below: a change from now on needs a notice of its own.
        entry.queued.store(false, Ordering::Release);
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
                    queued: entry.queued.clone(),
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
    pub fn remove(&self, backend: &ObjectKey) {
        let mut backends = self.lock();
        backends.remove(backend);
        self.update_gauge(&backends);
    }

    fn update_gauge(&self, backends: &HashMap<ObjectKey, BackendProbers>) {
        let count: usize = backends.values().map(|b| b.probers.len()).sum();
        self.reports.metrics.probers.set(count as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, BackendProbers>> {
        self.backends.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kubegrpc_crds::{Health, HealthCheckMode};

    use super::*;
    use crate::health::tracker::Thresholds;

    #[tokio::test(start_paused = true)]
    async fn change_notices_are_coalesced_per_grpc_backend_until_its_reconcile_syncs() {
        let (changed, mut notices) = tokio::sync::mpsc::unbounded_channel();
        let registry = ProberRegistry::new(
            ProbeReports {
                metrics: Arc::new(Metrics::default()),
                changed,
            },
            ProberOptions::default(),
        );
        let backend = ObjectKey::new("default", "echo");
        let settings = ProbeSettings {
            service: String::new(),
            mode: HealthCheckMode::Watch,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            thresholds: Thresholds {
                healthy: 1,
                unhealthy: 1,
            },
            load_reports: None,
            tls: None,
        };
        let unknown = |_| HealthVerdict {
            health: Health::Unknown,
            reason: None,
        };
        // 50 endpoints on ports nothing listens on: each prober's first probe is a change.
        let targets: Vec<SocketAddr> = (0..50).map(|i| SocketAddr::from(([127, 0, 0, 1], 1 + i))).collect();
        registry.sync(&backend, &settings, &targets, unknown);
        let states = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let backends = registry.lock();
            let states: Vec<ProbeState> = backends[&backend]
                .probers
                .values()
                .map(super::super::prober::ProberHandle::state)
                .collect();
            if states.iter().all(|s| s.probed) {
                break states;
            }
        };
        assert!(states.iter().all(|s| s.verdict.health == Health::NotServing));
        assert_eq!(notices.try_recv().ok(), Some(backend.clone()));
        assert!(
            notices.try_recv().is_err(),
            "50 changes, one notice until the next sync"
        );
        // The reconcile reads the states: the next change is told again.
        registry.sync(&backend, &settings, &targets[..49], unknown);
        registry.sync(&backend, &settings, &targets, unknown);
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv()).await;
        assert_eq!(notice.ok().flatten(), Some(backend));
    }
}
