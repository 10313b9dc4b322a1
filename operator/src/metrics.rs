//! Operator metrics in the Prometheus text format, names prefixed `kubegrpc_`.
//!
//! Probe timings and counts live here, not in the status: the status changes only when
//! something a client acts on changes.

use std::time::Duration;

use kubegrpc_crds::{GrpcBackendStatus, Health};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::health::tracker::ProbeOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointHealthLabels {
    pub namespace: String,
    pub name: String,
    pub health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTypeLabels {
    pub type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub status_writes: Family<BackendLabels, Counter>,
    pub endpoints: Family<EndpointHealthLabels, Gauge>,
    pub ready_endpoints: Family<BackendLabels, Gauge>,
    pub probes: Family<ProbeLabels, Counter>,
    pub probe_duration: Histogram,
    pub probe_connection_rotations: Counter,
    pub probe_connection_early_ends: Counter,
    pub probers: Gauge,
    pub leader: Gauge,
    /// Read from the async runtime at each scrape (see [`Metrics::encode`]).
    pub runtime_tasks: Gauge,
    pub xds_streams: Gauge,
    pub xds_responses: Family<XdsTypeLabels, Counter>,
    pub xds_nacks: Family<XdsTypeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubegrpc");
        let metrics = Self {
            reconciles: Counter::default(),
            // 1ms .. ~16s: a reconcile is in-memory work plus at most one status write.
            reconcile_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 15,
            )),
            reconcile_errors: Family::default(),
            status_writes: Family::default(),
            endpoints: Family::default(),
            ready_endpoints: Family::default(),
            probes: Family::default(),
            // 100us .. ~3.3s: health answers on a cluster network take a millisecond or so.
            probe_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            )),
            probe_connection_rotations: Counter::default(),
            probe_connection_early_ends: Counter::default(),
            probers: Gauge::default(),
            leader: Gauge::default(),
            runtime_tasks: Gauge::default(),
            xds_streams: Gauge::default(),
            xds_responses: Family::default(),
            xds_nacks: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Reconciliations of GrpcBackends",
            metrics.reconciles.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile took, status write included",
            prometheus_client::registry::Unit::Seconds,
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes (server-side apply) per GrpcBackend",
            metrics.status_writes.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints per GrpcBackend by gRPC health, as last published",
            metrics.endpoints.clone(),
        );
        registry.register(
            "ready_endpoints",
            "Endpoints that take requests per GrpcBackend, as last published",
            metrics.ready_endpoints.clone(),
        );
        registry.register("probes", "Health probes by result", metrics.probes.clone());
        registry.register_with_unit(
            "probe_duration",
            "Time from a health request to its answer",
            prometheus_client::registry::Unit::Seconds,
            metrics.probe_duration.clone(),
        );
        registry.register(
            "probe_connection_rotations",
            "Probe connections the server ended gracefully (GOAWAY NO_ERROR, connection age, close) at \
             least an interval after their first answer; reconnected without counting a failed probe",
            metrics.probe_connection_rotations.clone(),
        );
        registry.register(
            "probe_connection_early_ends",
            "Probe connections that ended (GOAWAY, reset, close) less than an interval after their first \
             answer: each counted as a failed probe, its reason in kubegrpc_probes_total",
            metrics.probe_connection_early_ends.clone(),
        );
        registry.register("probers", "Health probers running", metrics.probers.clone());
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            metrics.leader.clone(),
        );
        registry.register(
            "runtime_tasks",
            "Tasks alive in the operator's async runtime, one per prober among them (a leak shows as growth)",
            metrics.runtime_tasks.clone(),
        );
        registry.register(
            "xds_streams",
            "Open xDS (ADS) client streams",
            metrics.xds_streams.clone(),
        );
        registry.register(
            "xds_responses",
            "xDS responses sent, by resource type",
            metrics.xds_responses.clone(),
        );
        registry.register(
            "xds_nacks",
            "xDS responses clients rejected (NACK), by resource type; the error text is in the log",
            metrics.xds_nacks.clone(),
        );
        Self { registry, ..metrics }
    }
}

impl Metrics {
    /// Measures a reconcile until the returned guard is dropped (however the reconcile ends).
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            histogram: &self.reconcile_duration,
            started: std::time::Instant::now(),
        }
    }

    pub fn probed(&self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.probes
            .get_or_create(&ProbeLabels {
                result: outcome.reason().into_owned(),
            })
            .inc();
        if let Some(latency) = latency {
            self.probe_duration.observe(latency.as_secs_f64());
        }
    }

    /// Sets the per-GrpcBackend gauges from the status just published.
    pub fn published(&self, namespace: &str, name: &str, status: &GrpcBackendStatus) {
        for health in [Health::Serving, Health::NotServing, Health::Unknown] {
            let count = status.endpoints.iter().filter(|e| e.health == health).count();
            self.endpoints
                .get_or_create(&EndpointHealthLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    health: health.to_string(),
                })
                .set(count as i64);
        }
        self.ready_endpoints
            .get_or_create(&backend(namespace, name))
            .set(i64::from(status.ready_endpoints));
    }

    pub fn status_written(&self, namespace: &str, name: &str) {
        self.status_writes.get_or_create(&backend(namespace, name)).inc();
    }

    /// Drops the series of a deleted GrpcBackend.
    pub fn forget(&self, namespace: &str, name: &str) {
        for health in [Health::Serving, Health::NotServing, Health::Unknown] {
            self.endpoints.remove(&EndpointHealthLabels {
                namespace: namespace.into(),
                name: name.into(),
                health: health.to_string(),
            });
        }
        self.ready_endpoints.remove(&backend(namespace, name));
        self.status_writes.remove(&backend(namespace, name));
    }

    /// The text exposition of every metric, with the runtime's task count read now.
    pub fn encode(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn backend(namespace: &str, name: &str) -> BackendLabels {
    BackendLabels {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Observes the time since it was made into the reconcile histogram when dropped.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
