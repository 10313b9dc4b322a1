//! The desired state: [`GrpcBackendSpec`] (the `GrpcBackend` kind itself), its health check and
//! weighting, with the admission rules (OpenAPI schema and CEL) that reject bad values.

use std::{fmt, time::Duration as StdDuration};

use kube::{CustomResource, KubeSchema, core::Duration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::GrpcBackendStatus;

/// A Duration string pattern as accepted by Go's `time.ParseDuration` (and CEL's `duration()`),
/// without sign: the rules below check it before calling `duration()` so that a malformed value
/// gets our message rather than a CEL evaluation error.
macro_rules! duration_pattern {
    () => {
        r"^([0-9]+(\\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$"
    };
}

/// Desired state of a GrpcBackend: which Service port to balance, how to health-check its
/// endpoints and how to weight them.
// Several printer columns share a type or priority: not the duplication this lint means.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubegrpc.io",
    version = "v1alpha1",
    kind = "GrpcBackend",
    plural = "grpcbackends",
    shortname = "gb",
    category = "kubegrpc",
    namespaced,
    status = "GrpcBackendStatus",
    derive = "PartialEq",
    doc = "A gRPC backend: a Service port whose endpoints the kubegrpc operator health-checks and weights for client-side load balancing.",
    printcolumn(
        name = "Service",
        type_ = "string",
        json_path = ".spec.service",
        description = "The Service whose endpoints are balanced"
    ),
    printcolumn(
        name = "Port",
        type_ = "string",
        json_path = ".spec.port",
        description = "The Service port (name or number)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyEndpoints",
        description = "Endpoints that receive requests"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.totalEndpoints",
        description = "Endpoints of the Service on that port"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1,
        description = "Reason of the Ready condition"
    ),
    printcolumn(
        name = "Health-Service",
        type_ = "string",
        json_path = ".spec.healthCheck.service",
        priority = 1,
        description = "grpc.health.v1 service name checked (empty: the whole server)"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.healthCheck.mode",
        priority = 1,
        description = "Health-check mode"
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.weighting.policy",
        priority = 1,
        description = "Weighting policy"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GrpcBackendSpec {
    /// Name of the Service, in the GrpcBackend's namespace, whose endpoints are balanced.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "spec.service must be the name of a Service: a DNS label of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
    ))]
    pub service: String,

    /// The Service port to balance: its number (1-65535) or its name.
    #[x_kube(validation = Rule::new(
        "type(self) == int ? (self >= 1 && self <= 65535) : (size(self) <= 63 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))"
    ).message(
        "spec.port must be a port number from 1 to 65535 or the name of a Service port (a lowercase DNS label such as \"grpc\")"
    ))]
    pub port: PortRef,

    /// How the operator health-checks every endpoint.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// How the operator weights the endpoints that pass their health checks.
    #[serde(default)]
    pub weighting: Weighting,

    /// The backends serve TLS: the operator's health checks (and the clients that follow this
    /// GrpcBackend) connect with TLS, verifying each endpoint's certificate against `caBundle`
    /// for `serverName`. Unset: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,

    /// Passive outlier detection (gRFC A50), for every client of this GrpcBackend: the Rust
    /// client applies it and xDS clients (grpc-go, grpc-java) get it in the Cluster. A client
    /// takes an endpoint out of rotation on the evidence of its own calls, before the health
    /// checks notice. Unset: on, with gRFC A50's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// TLS to the backends (`spec.tls`).
///
/// Mutual TLS needs nothing here: when a backend asks for a client certificate, the operator
/// presents the one mounted into its Pod (`--tls-client-cert` and `--tls-client-key`, reloaded
/// when the files change); the operator reads no Secrets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// The name every endpoint's certificate must be valid for, also sent as SNI and as the
    /// requests' `:authority`. Pod IPs are rarely in certificates, so by default it is the
    /// Service's cluster name, `SERVICE.NAMESPACE.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    ).message(
        "spec.tls.serverName must be a DNS name of lowercase letters, digits, '-' and '.', such as \"echo.demo.svc\""
    ))]
    pub server_name: Option<String>,

    /// The certificate authorities trusted to sign the backends' certificates: PEM
    /// certificates in a key of a ConfigMap in the GrpcBackend's namespace (cert-manager's
    /// trust-manager writes such bundles). Unset: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleRef>,
}

/// A PEM bundle of CA certificates in a ConfigMap of the GrpcBackend's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleRef {
    /// The ConfigMap's name.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    ).message("spec.tls.caBundle.configMap must be the name of a ConfigMap (a lowercase DNS subdomain)"))]
    pub config_map: String,

    /// The key holding the PEM certificates.
    #[serde(default = "default_ca_key")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')")
        .message("spec.tls.caBundle.key must be a ConfigMap key: letters, digits, '-', '_' and '.'"))]
    pub key: String,
}

/// The ConfigMap key read when `spec.tls.caBundle.key` is unset (cert-manager's name).
pub const DEFAULT_CA_KEY: &str = "ca.crt";

fn default_ca_key() -> String {
    DEFAULT_CA_KEY.into()
}

impl GrpcBackendSpec {
    /// `outlierDetection`, or its defaults (on) when unset.
    pub fn outlier_detection(&self) -> OutlierDetection {
        self.outlier_detection.clone().unwrap_or_default()
    }

    /// The name TLS verifies in the endpoints' certificates: `spec.tls.serverName`, or
    /// `SERVICE.NAMESPACE.svc` (`None` without `spec.tls`).
    pub fn tls_server_name(&self, namespace: &str) -> Option<String> {
        let tls = self.tls.as_ref()?;
        Some(
            tls.server_name
                .clone()
                .unwrap_or_else(|| format!("{}.{namespace}.svc", self.service)),
        )
    }
}

/// A Service port, by number or by name (`x-kubernetes-int-or-string`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PortRef {
    /// The port number (1-65535).
    Number(i32),
    /// The port's name in the Service.
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(number) => write!(f, "{number}"),
            PortRef::Name(name) => f.write_str(name),
        }
    }
}

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// Health checking with the standard gRPC health protocol (`grpc.health.v1.Health`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(concat!(
    "!self.timeout.matches('", duration_pattern!(), "') || !self.interval.matches('", duration_pattern!(), "') || ",
    "duration(self.timeout) < duration(self.interval)"
)).message("spec.healthCheck.timeout must be shorter than spec.healthCheck.interval"))]
pub struct HealthCheck {
    /// The `service` field of the health request: "" asks about the whole server.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub service: String,

    /// `Watch` keeps a stream open per endpoint so that a NOT_SERVING flip is seen at once;
    /// `Check` polls every `interval`. An endpoint whose server does not implement `Watch` is
    /// polled with `Check` whatever the mode.
    #[serde(default)]
    pub mode: HealthCheckMode,

    /// How often each endpoint is checked: the `Check` period; in `Watch` mode, a stream quiet
    /// for this long gets one `Check` on the same connection, so that a frozen backend or a
    /// silent network is found (no HTTP/2 keepalive PINGs: grpc-go and grpc-java servers
    /// allow one per 5 minutes by default and close connections that send more).
    /// At least 100ms.
    #[serde(default = "default_interval")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('100ms')"
    )).message("spec.healthCheck.interval must be a duration of at least 100ms, such as \"5s\" or \"500ms\""))]
    pub interval: Duration,

    /// How long a probe (connecting and the first answer together, or one `Check` answer) may
    /// take before it counts as failed. Shorter than `interval`. A Serving endpoint that stops
    /// answering is NotServing at most `unhealthyThreshold x (interval + timeout)` later.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('10ms')"
    )).message("spec.healthCheck.timeout must be a duration of at least 10ms, such as \"1s\" or \"500ms\""))]
    pub timeout: Duration,

    /// Consecutive successful probes before an endpoint that was not Serving becomes Serving.
    #[serde(default = "default_healthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: i32,

    /// Consecutive failed probes (connect errors, timeouts, broken streams) before a Serving
    /// endpoint becomes NotServing. An explicit NOT_SERVING answer counts at once. A server
    /// ending a connection it answered on (GOAWAY, `MaxConnectionAge`) is not a failure: the
    /// prober reconnects at once and only counts one if the new connection does not answer.
    #[serde(default = "default_unhealthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: i32,

    /// Fail open (Envoy's `healthy_panic_threshold`): when fewer than this percentage of the
    /// Kubernetes-ready endpoints pass their health checks, the operator stops trusting its
    /// checks and tells every client, Rust and xDS alike, to use every Kubernetes-ready
    /// endpoint (the condition `FailingOpen` says so). It also fails open, whatever this
    /// percentage, when no endpoint passes at all or when every probe fails at connect time
    /// (the operator's own network is the likelier cause). 0 keeps only those two cases.
    /// Endpoints not probed yet (Unknown) and endpoints weighted 0 on purpose are neither
    /// counted nor used. From 0 to 100; default 50.
    #[serde(default = "default_panic_threshold")]
    #[schemars(range(min = 0, max = 100))]
    pub panic_threshold: i32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            service: String::new(),
            mode: HealthCheckMode::default(),
            interval: default_interval(),
            timeout: default_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
            panic_threshold: default_panic_threshold(),
        }
    }
}

fn default_interval() -> Duration {
    StdDuration::from_secs(5).into()
}

fn default_timeout() -> Duration {
    StdDuration::from_secs(1).into()
}

fn default_healthy_threshold() -> i32 {
    1
}

fn default_unhealthy_threshold() -> i32 {
    3
}

/// Default of [`HealthCheck::panic_threshold`]: Envoy's.
pub const DEFAULT_PANIC_THRESHOLD: i32 = 50;

fn default_panic_threshold() -> i32 {
    DEFAULT_PANIC_THRESHOLD
}

/// How an endpoint's health is followed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HealthCheckMode {
    /// A long-lived `Watch` stream: changes arrive as they happen.
    #[default]
    Watch,
    /// A `Check` call every `interval`.
    Check,
}

/// How endpoints that pass their health checks are weighted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.policy == 'LoadReport' || !has(self.loadReport)").message(
    "spec.weighting.loadReport is only used by the LoadReport policy: set policy: LoadReport or remove it"
))]
pub struct Weighting {
    /// The weighting policy:
    /// - `Equal`: every usable endpoint gets the same weight (100);
    /// - `Static`: the weight in the annotation `kubegrpc.io/weight` of the Pod behind each
    ///   endpoint (a whole number from 0 to 10000; absent: 100; not a number in range: 100,
    ///   with a Warning Event on the GrpcBackend);
    /// - `LoadReport`: weights from the load each backend reports over ORCA
    ///   (`xds.service.orca.v3.OpenRcaService`), computed as gRPC's `weighted_round_robin`
    ///   (gRFC A58) does, once for every client. Each endpoint's weight is capped at 4 times
    ///   the lower median of the valid weights before the weights are scaled to a mean of 100,
    ///   so that a backend cannot take the traffic by over-reporting its capacity: one such
    ///   backend among n endpoints gets at most 4/(n+3) of the requests. See `loadReport`.
    #[serde(default)]
    pub policy: WeightingPolicy,

    /// Slow start: clients ramp a newly Serving endpoint's share up over this window instead
    /// of handing it its full share at once (Envoy's formula: weight x max(minWeightPercent,
    /// (t / window) ^ (1 / aggression))). The operator publishes the full weight and when the
    /// endpoint became Serving; each client ramps on its own, so the ramp costs no status
    /// writes. Unset or "0s": off. At most 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) <= duration('1h')"
    )).message("spec.weighting.slowStartWindow must be a duration from 0s to 1h, such as \"30s\" (0s turns slow start off)"))]
    pub slow_start_window: Option<Duration>,

    /// The slow-start curve's aggression (Envoy's `aggression`): 1 ramps linearly, above 1
    /// gives the new endpoint more early on, below 1 less. From 0.1 to 10; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.1 && self <= 10.0")
        .message("spec.weighting.slowStartAggression must be from 0.1 to 10 (1 ramps linearly)"))]
    pub slow_start_aggression: Option<f64>,

    /// The share a slow-starting endpoint gets at least, in percent of its weight (Envoy's
    /// `min_weight_percent`). From 1 to 100; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub slow_start_min_weight_percent: Option<i32>,

    /// Settings of the `LoadReport` policy (gRFC A58's, with its defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_report: Option<LoadReport>,
}

/// How backend load reports become weights (gRFC A58's settings and defaults).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// How often each backend is asked to send a report on its out-of-band ORCA stream
    /// (servers may send less often: grpc-go's `orca` package sends at most one per 30s by
    /// default). From 1s to 5m; default 10s.
    #[serde(default = "default_report_interval")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('1s') && duration(self) <= duration('5m')"
    )).message("spec.weighting.loadReport.reportInterval must be a duration from 1s to 5m, such as \"10s\""))]
    pub report_interval: Duration,

    /// Reports are not used until they have been arriving for this long (a backend that
    /// just started reports a misleadingly low load). Default 10s.
    #[serde(default = "default_blackout_period")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) <= duration('1h')"
    )).message("spec.weighting.loadReport.blackoutPeriod must be a duration from 0s to 1h, such as \"10s\""))]
    pub blackout_period: Duration,

    /// A weight whose last report is older than this expires: the endpoint gets the mean
    /// weight again, and the blackout starts over when reports resume. Default 3m.
    #[serde(default = "default_weight_expiration_period")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('1s') && duration(self) <= duration('24h')"
    )).message("spec.weighting.loadReport.weightExpirationPeriod must be a duration from 1s to 24h, such as \"3m\""))]
    pub weight_expiration_period: Duration,

    /// How much errors count as load: utilization + eps / qps x this. From 0 to 100;
    /// default 1.
    #[serde(default = "default_error_utilization_penalty")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 100.0")
        .message("spec.weighting.loadReport.errorUtilizationPenalty must be from 0 to 100"))]
    pub error_utilization_penalty: f64,
}

impl Default for LoadReport {
    fn default() -> Self {
        Self {
            report_interval: default_report_interval(),
            blackout_period: default_blackout_period(),
            weight_expiration_period: default_weight_expiration_period(),
            error_utilization_penalty: default_error_utilization_penalty(),
        }
    }
}

fn default_report_interval() -> Duration {
    StdDuration::from_secs(10).into()
}

fn default_blackout_period() -> Duration {
    StdDuration::from_secs(10).into()
}

fn default_weight_expiration_period() -> Duration {
    StdDuration::from_secs(180).into()
}

fn default_error_utilization_penalty() -> f64 {
    1.0
}

/// Passive outlier detection (`spec.outlierDetection`), gRFC A50's settings and defaults.
///
/// Every `interval`, each client looks at the calls it made in the interval just ended: when at
/// least `failurePercentage.minimumHosts` endpoints each got `failurePercentage.requestVolume`
/// calls, an endpoint whose failed calls are more than `failurePercentage.threshold` percent of
/// its calls is ejected. An ejection lasts `baseEjectionTime` times the endpoint's multiplier
/// (one more per ejection, one less per interval without one), at most the larger of
/// `maxEjectionTime` and `baseEjectionTime`; at most `maxEjectionPercent` of the endpoints are
/// ejected at once (rounded up: one may always be, unless it is 0).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Eject on evidence at all. false: no client ejects (xDS Clusters carry no
    /// `outlier_detection`). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// How often each client examines its calls and ends ejections whose time is up. From
    /// 100ms to 1h; default 10s.
    #[serde(default = "default_outlier_interval")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('100ms') && duration(self) <= duration('1h')"
    )).message("spec.outlierDetection.interval must be a duration from 100ms to 1h, such as \"10s\""))]
    pub interval: Duration,

    /// How long a first ejection lasts; the n-th in a row lasts n times this. From 100ms to
    /// 24h; default 30s.
    #[serde(default = "default_base_ejection_time")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('100ms') && duration(self) <= duration('24h')"
    )).message("spec.outlierDetection.baseEjectionTime must be a duration from 100ms to 24h, such as \"30s\""))]
    pub base_ejection_time: Duration,

    /// The longest an ejection lasts (when shorter than `baseEjectionTime`, ejections last
    /// `baseEjectionTime`). From 100ms to 24h; default 300s.
    #[serde(default = "default_max_ejection_time")]
    #[x_kube(validation = Rule::new(concat!(
        "self.matches('", duration_pattern!(), "') && duration(self) >= duration('100ms') && duration(self) <= duration('24h')"
    )).message("spec.outlierDetection.maxEjectionTime must be a duration from 100ms to 24h, such as \"300s\""))]
    pub max_ejection_time: Duration,

    /// The largest share of the endpoints ejected at once, in percent, rounded up (10% of 3
    /// endpoints allows one); 0 ejects none. From 0 to 100; default 10.
    #[serde(default = "default_max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: i32,

    /// Ejection on the share of failed calls over an interval.
    #[serde(default)]
    pub failure_percentage: FailurePercentage,

    /// The Rust client only (gRFC A50 has no such rule; an xDS client already avoids an
    /// endpoint it cannot connect to): eject at once, without waiting for the interval, an
    /// endpoint that this many connection attempts in a row failed to reach. 0 turns it off.
    /// From 0 to 1000; default 5.
    #[serde(default = "default_consecutive_connect_failures")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_connect_failures: i32,
}

/// gRFC A50's failure percentage ejection (`spec.outlierDetection.failurePercentage`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailurePercentage {
    /// Eject on the failure percentage. false: only `consecutiveConnectFailures` ejects (and
    /// only in the Rust client). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// An endpoint whose failed calls are more than this percentage of its calls over an
    /// interval is ejected. From 0 to 100; default 85.
    #[serde(default = "default_failure_percentage_threshold")]
    #[schemars(range(min = 0, max = 100))]
    pub threshold: i32,

    /// Only when at least this many endpoints got `requestVolume` calls in the interval.
    /// From 0 to 100000; default 5.
    #[serde(default = "default_failure_percentage_minimum_hosts")]
    #[schemars(range(min = 0, max = 100_000))]
    pub minimum_hosts: i32,

    /// Only endpoints that got at least this many calls in the interval are judged. From 1 to
    /// 1000000; default 50.
    #[serde(default = "default_failure_percentage_request_volume")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub request_volume: i32,
}

impl Default for OutlierDetection {
    /// gRFC A50's defaults, on.
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_outlier_interval(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_time: default_max_ejection_time(),
            max_ejection_percent: default_max_ejection_percent(),
            failure_percentage: FailurePercentage::default(),
            consecutive_connect_failures: default_consecutive_connect_failures(),
        }
    }
}

impl Default for FailurePercentage {
    /// gRFC A50's defaults, on.
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: default_failure_percentage_threshold(),
            minimum_hosts: default_failure_percentage_minimum_hosts(),
            request_volume: default_failure_percentage_request_volume(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_outlier_interval() -> Duration {
    StdDuration::from_secs(10).into()
}

fn default_base_ejection_time() -> Duration {
    StdDuration::from_secs(30).into()
}

fn default_max_ejection_time() -> Duration {
    StdDuration::from_secs(300).into()
}

fn default_max_ejection_percent() -> i32 {
    10
}

fn default_consecutive_connect_failures() -> i32 {
    5
}

fn default_failure_percentage_threshold() -> i32 {
    85
}

fn default_failure_percentage_minimum_hosts() -> i32 {
    5
}

fn default_failure_percentage_request_volume() -> i32 {
    50
}

impl OutlierDetection {
    /// `interval` as a std duration (negative values, which admission rejects, become zero).
    pub fn interval(&self) -> StdDuration {
        non_negative(self.interval)
    }

    /// `baseEjectionTime` as a std duration (negative values become zero).
    pub fn base_ejection_time(&self) -> StdDuration {
        non_negative(self.base_ejection_time)
    }

    /// `maxEjectionTime` as a std duration (negative values become zero).
    pub fn max_ejection_time(&self) -> StdDuration {
        non_negative(self.max_ejection_time)
    }

    /// `maxEjectionPercent`, within 0..=100.
    pub fn max_ejection_percent(&self) -> u8 {
        clamped(self.max_ejection_percent, 100) as u8
    }

    /// `consecutiveConnectFailures`, within 0..=1000.
    pub fn consecutive_connect_failures(&self) -> u32 {
        clamped(self.consecutive_connect_failures, 1000)
    }

    /// The failure percentage rule, if it ejects (`None` when it or outlier detection is off).
    pub fn failure_percentage(&self) -> Option<&FailurePercentage> {
        (self.enabled && self.failure_percentage.enabled).then_some(&self.failure_percentage)
    }
}

impl FailurePercentage {
    /// `threshold`, within 0..=100.
    pub fn threshold(&self) -> u8 {
        clamped(self.threshold, 100) as u8
    }

    /// `minimumHosts`, within 0..=100000.
    pub fn minimum_hosts(&self) -> u32 {
        clamped(self.minimum_hosts, 100_000)
    }

    /// `requestVolume`, within 1..=1000000.
    pub fn request_volume(&self) -> u32 {
        clamped(self.request_volume, 1_000_000).max(1)
    }
}

/// `value` within `0..=max` (admission enforces the bounds; this guards what it cannot see).
fn clamped(value: i32, max: u32) -> u32 {
    u32::try_from(value).unwrap_or(0).min(max)
}

/// The Pod annotation the `Static` policy reads an endpoint's weight from.
pub const WEIGHT_ANNOTATION: &str = "kubegrpc.io/weight";
/// The largest weight the `Static` annotation may give.
pub const MAX_STATIC_WEIGHT: u32 = 10_000;
/// Slow start's default aggression (Envoy's).
pub const DEFAULT_SLOW_START_AGGRESSION: f64 = 1.0;
/// Slow start's default minimum weight percentage (Envoy's).
pub const DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT: u32 = 10;

/// Weighting policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightingPolicy {
    /// The same weight for every usable endpoint.
    #[default]
    Equal,
    /// The weight in each Pod's `kubegrpc.io/weight` annotation.
    Static,
    /// Weights from the load each backend reports over ORCA (gRFC A58).
    LoadReport,
}

impl HealthCheck {
    /// `interval` as a std duration (negative values, which admission rejects, become zero).
    pub fn interval(&self) -> StdDuration {
        non_negative(self.interval)
    }

    /// `timeout` as a std duration (negative values, which admission rejects, become zero).
    pub fn timeout(&self) -> StdDuration {
        non_negative(self.timeout)
    }
}

impl Weighting {
    /// `slowStartWindow` as a std duration (zero when off).
    pub fn slow_start_window(&self) -> StdDuration {
        self.slow_start_window.map(non_negative).unwrap_or_default()
    }

    /// `loadReport`, or its defaults.
    pub fn load_report(&self) -> LoadReport {
        self.load_report.clone().unwrap_or_default()
    }
}

impl LoadReport {
    /// `reportInterval` as a std duration (negative values, which admission rejects, become zero).
    pub fn report_interval(&self) -> StdDuration {
        non_negative(self.report_interval)
    }

    /// `blackoutPeriod` as a std duration (negative values become zero).
    pub fn blackout_period(&self) -> StdDuration {
        non_negative(self.blackout_period)
    }

    /// `weightExpirationPeriod` as a std duration (negative values become zero).
    pub fn weight_expiration_period(&self) -> StdDuration {
        non_negative(self.weight_expiration_period)
    }
}

fn non_negative(duration: Duration) -> StdDuration {
    if duration.is_negative() {
        StdDuration::ZERO
    } else {
        duration.into()
    }
}
