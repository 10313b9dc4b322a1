//! The `GrpcBackend` API (`kubegrpc.io/v1alpha1`), shared by the kubegrpc operator, which writes
//! its status, and the kubegrpc client, which reads it.
//!
//! A `GrpcBackend` names a Service and one of its ports. The operator follows the Service's
//! EndpointSlices, health-checks every endpoint with `grpc.health.v1`, and publishes the
//! health-checked, weighted endpoint list in `status.endpoints`.
//!
//! The status only changes when something a client acts on changes: no probe timings or
//! "last probed" stamps, because every status write wakes every client watching the object.
//!
//! This crate enables no `k8s-openapi` version feature: the binary that links it chooses one.

use std::{fmt, time::Duration as StdDuration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema, core::Duration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every kubegrpc resource.
pub const GROUP: &str = "kubegrpc.io";
/// The API version of [`GrpcBackend`].
pub const VERSION: &str = "v1alpha1";
/// The field manager the operator writes the status with (server-side apply).
pub const OPERATOR_FIELD_MANAGER: &str = "kubegrpc-operator";
/// The weight of a fully ready endpoint under the `Equal` policy. Slow start ramps a new
/// endpoint up to it in steps, so it is a round number with room below it.
pub const FULL_WEIGHT: u32 = 100;

pub mod slow_start;

/// Names of the conditions in [`GrpcBackendStatus::conditions`].
pub mod condition {
    /// `True` when at least one endpoint is usable: a client may send requests (reason
    /// `FailingOpen` while clients use endpoints that do not pass their checks).
    pub const READY: &str = "Ready";
    /// `True` when every probe fails at connect time at once: more likely the operator's own
    /// network (a NetworkPolicy, say) than every backend at the same moment.
    pub const DEGRADED: &str = "Degraded";
    /// `True` when the endpoint list was cut to keep the object under the API's size ceiling.
    pub const TRUNCATED: &str = "Truncated";
    /// `True` when the operator does not trust its health checks (too few endpoints pass, or
    /// its probes cannot connect) and clients use every Kubernetes-ready endpoint.
    pub const FAILING_OPEN: &str = "FailingOpen";

    /// Reasons of the `Ready` condition.
    pub mod reason {
        pub const AVAILABLE: &str = "Available";
        /// `Ready` while failing open: clients use every Kubernetes-ready endpoint.
        pub const FAILING_OPEN: &str = "FailingOpen";
        pub const NO_ENDPOINTS: &str = "NoEndpoints";
        pub const NO_READY_ENDPOINTS: &str = "NoReadyEndpoints";
        pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
        pub const PORT_NOT_FOUND: &str = "PortNotFound";
        pub const INVALID_SPEC: &str = "InvalidSpec";
        /// `Degraded` reasons.
        pub const ALL_PROBES_FAILING: &str = "AllProbesFailingToConnect";
        pub const PROBES_CONNECTING: &str = "ProbesConnecting";
        /// `FailingOpen` reasons: fewer pass than `healthCheck.panicThreshold` asks; none
        /// passes; every probe fails at connect time; enough pass (`False`).
        pub const BELOW_PANIC_THRESHOLD: &str = "BelowPanicThreshold";
        pub const NONE_PASSING: &str = "NoEndpointPassesChecks";
        pub const PROBES_FAILING_TO_CONNECT: &str = "ProbesFailingToConnect";
        pub const CHECKS_TRUSTED: &str = "HealthChecksTrusted";
        /// `Truncated` reasons.
        pub const STATUS_SIZE_LIMIT: &str = "StatusSizeLimit";
        pub const COMPLETE: &str = "Complete";
    }
}

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
}

/// A Service port, by number or by name (`x-kubernetes-int-or-string`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PortRef {
    Number(i32),
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

/// The Pod annotation the `Static` policy reads an endpoint's weight from.
pub const WEIGHT_ANNOTATION: &str = "kubegrpc.io/weight";
/// The largest weight the `Static` annotation may give.
pub const MAX_STATIC_WEIGHT: u32 = 10_000;
/// Slow start's defaults (Envoy's).
pub const DEFAULT_SLOW_START_AGGRESSION: f64 = 1.0;
pub const DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT: u32 = 10;

/// Weighting policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightingPolicy {
    #[default]
    Equal,
    Static,
    LoadReport,
}

/// Observed state, written by the kubegrpc operator only, and only when something a client acts
/// on changes.
///
/// The JSON form is compact, because one status lists every endpoint of a Service (10,000 fit
/// in the operator's default budget of 1 MiB): the port most endpoints use is given once in
/// `status.port`, and an entry leaves out what is as usual (see [`EndpointStatus`]). Reading
/// and writing go through that form, so a status read back equals the one written.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(from = "wire::Status", into = "wire::Status")]
pub struct GrpcBackendStatus {
    /// The `metadata.generation` of the spec this status was computed from.
    pub observed_generation: Option<i64>,
    /// Endpoints that receive new requests: Kubernetes-serving, not terminating, of weight
    /// above 0, and gRPC Serving (or failing open, see the `FailingOpen` condition).
    pub ready_endpoints: i32,
    /// Endpoints of the Service that carry the port, whatever their state.
    pub total_endpoints: i32,
    /// `Ready`, `Degraded`, `FailingOpen` and `Truncated`, in the style of metav1.Condition.
    pub conditions: Vec<Condition>,
    /// Every endpoint, sorted by address then port. The operator owns the whole list.
    pub endpoints: Vec<EndpointStatus>,
}

impl JsonSchema for GrpcBackendStatus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GrpcBackendStatus".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        wire::Status::json_schema(generator)
    }
}

/// One endpoint (address:port) of the Service, with its Kubernetes readiness and its gRPC
/// health kept apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// An IPv4 or IPv6 address.
    pub address: String,
    pub port: i32,
    /// Share of new requests relative to the other endpoints' weights; 0 gets none.
    pub weight: u32,
    /// What the endpoint's gRPC health service says.
    pub health: Health,
    /// The EndpointSlice `serving` condition (nil means true).
    pub serving: bool,
    /// The EndpointSlice `terminating` condition (nil means false).
    pub terminating: bool,
    pub zone: Option<String>,
    /// The zones this endpoint should serve (the EndpointSlice `hints.forZones`, which the
    /// EndpointSlice controller sets for a Service's `trafficDistribution` or topology-aware
    /// routing); empty: none given, a client uses `zone`.
    pub for_zones: Vec<String>,
    /// The Pod behind the endpoint (the EndpointSlice `targetRef`, when it is a Pod).
    pub pod: Option<String>,
    /// The object behind the endpoint when it is not a Pod.
    pub target_ref: Option<TargetRef>,
    /// Why the health is not Serving (e.g. `ConnectFailed`), set when it last changed.
    pub reason: Option<String>,
    /// When `health` or readiness last changed. Listed while the endpoint is not usable, and
    /// while it is within the slow-start window after becoming usable (clients ramp from
    /// it); left out at the next write after that (absent: usable for longer than the window).
    pub last_transition_time: Option<Time>,
    /// The GrpcBackend fails open (condition `FailingOpen`): clients use this endpoint although
    /// it does not pass its health check, because Kubernetes calls it ready.
    pub fail_open: bool,
}

impl EndpointStatus {
    /// Whether a client should send new requests here (see [`is_usable`]).
    pub fn is_usable(&self) -> bool {
        is_usable(self.serving, self.terminating, self.health, self.weight, self.fail_open)
    }
}

/// The one rule for whether a client sends new requests to an endpoint of a status: Kubernetes
/// calls it ready (serving, not terminating), it has a weight, and it passes its health check
/// or the GrpcBackend fails open for it. The operator, the xDS server and the client all decide
/// with this function.
pub fn is_usable(serving: bool, terminating: bool, health: Health, weight: u32, fail_open: bool) -> bool {
    serving && !terminating && weight > 0 && (health == Health::Serving || fail_open)
}

/// The object behind an endpoint, when it is not a Pod (its namespace is the GrpcBackend's).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub kind: String,
    pub name: String,
}

/// The status as stored and served: what is as usual is left out of each entry.
mod wire {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::KubeSchema;
    use serde::{Deserialize, Serialize};

    use super::{FULL_WEIGHT, Health, TargetRef};

    /// Observed state, written by the kubegrpc operator only, and only when something a client
    /// acts on changes.
    #[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        /// The `metadata.generation` of the spec this status was computed from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 0))]
        pub observed_generation: Option<i64>,

        /// Endpoints that receive new requests: Kubernetes-serving, not terminating, of weight
        /// above 0, and gRPC Serving (or failing open, see the `FailingOpen` condition).
        #[serde(default)]
        #[schemars(range(min = 0))]
        pub ready_endpoints: i32,

        /// Endpoints of the Service that carry the port, whatever their state.
        #[serde(default)]
        #[schemars(range(min = 0))]
        pub total_endpoints: i32,

        /// `Ready`, `Degraded`, `FailingOpen` and `Truncated`, in the style of metav1.Condition.
        #[serde(default)]
        #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
        pub conditions: Vec<Condition>,

        /// The port of every listed endpoint that does not name its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 65535))]
        pub port: Option<i32>,

        /// Every endpoint, sorted by address then port. The operator owns the whole list.
        #[serde(default)]
        #[x_kube(merge_strategy = ListMerge::Atomic)]
        pub endpoints: Vec<Endpoint>,
    }

    /// One endpoint. Left out when as usual: `port` (then `status.port`), `weight` (then
    /// 100), `serving` (then true), `terminating` (then false), `reason` and
    /// `lastTransitionTime` (while Serving at full weight).
    #[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        /// An IPv4 or IPv6 address.
        pub address: String,
        /// The endpoint's port when it is not `status.port`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 65535))]
        pub port: Option<i32>,
        /// Share of new requests relative to the other endpoints' weights; 0 gets none.
        /// Absent: 100.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(schema_with = "super::weight_schema")]
        pub weight: Option<u32>,
        /// What the endpoint's gRPC health service says.
        pub health: Health,
        /// The EndpointSlice `serving` condition. Absent: true.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub serving: Option<bool>,
        /// The EndpointSlice `terminating` condition. Absent: false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub terminating: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub zone: Option<String>,
        /// The zones this endpoint should serve (EndpointSlice `hints.forZones`). Absent: none
        /// given.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 16))]
        pub for_zones: Vec<String>,
        /// The Pod behind the endpoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pod: Option<String>,
        /// The object behind the endpoint when it is not a Pod.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub target_ref: Option<TargetRef>,
        /// Why the health is not Serving (e.g. `ConnectFailed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
        /// When health or readiness last changed; listed while the endpoint is not usable or
        /// is within the slow-start window after becoming usable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub last_transition_time: Option<Time>,
        /// True while the GrpcBackend fails open and clients use this endpoint although it
        /// does not pass its health check (see the `FailingOpen` condition). Absent: false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub fail_open: Option<bool>,
    }

    impl From<Status> for super::GrpcBackendStatus {
        fn from(status: Status) -> Self {
            let common_port = status.port;
            Self {
                observed_generation: status.observed_generation,
                ready_endpoints: status.ready_endpoints,
                total_endpoints: status.total_endpoints,
                conditions: status.conditions,
                endpoints: status
                    .endpoints
                    .into_iter()
                    .map(|e| super::EndpointStatus {
                        address: e.address,
                        // Neither given: 0, which no client connects to.
                        port: e.port.or(common_port).unwrap_or(0),
                        weight: e.weight.unwrap_or(FULL_WEIGHT),
                        health: e.health,
                        serving: e.serving.unwrap_or(true),
                        terminating: e.terminating.unwrap_or(false),
                        zone: e.zone,
                        for_zones: e.for_zones,
                        pod: e.pod,
                        target_ref: e.target_ref,
                        reason: e.reason,
                        last_transition_time: e.last_transition_time,
                        fail_open: e.fail_open.unwrap_or(false),
                    })
                    .collect(),
            }
        }
    }

    impl From<super::GrpcBackendStatus> for Status {
        fn from(status: super::GrpcBackendStatus) -> Self {
            let common_port = most_common_port(&status.endpoints);
            Self {
                observed_generation: status.observed_generation,
                ready_endpoints: status.ready_endpoints,
                total_endpoints: status.total_endpoints,
                conditions: status.conditions,
                port: common_port,
                endpoints: status
                    .endpoints
                    .into_iter()
                    .map(|e| Endpoint::new(e, common_port))
                    .collect(),
            }
        }
    }

    impl Endpoint {
        pub fn new(e: super::EndpointStatus, common_port: Option<i32>) -> Self {
            Self {
                address: e.address,
                port: (Some(e.port) != common_port).then_some(e.port),
                weight: (e.weight != FULL_WEIGHT).then_some(e.weight),
                health: e.health,
                serving: (!e.serving).then_some(false),
                terminating: e.terminating.then_some(true),
                zone: e.zone,
                for_zones: e.for_zones,
                pod: e.pod,
                target_ref: e.target_ref,
                reason: e.reason,
                last_transition_time: e.last_transition_time,
                fail_open: e.fail_open.then_some(true),
            }
        }
    }

    /// The port most endpoints use (the lowest of equals, so that it does not depend on order).
    pub fn most_common_port(endpoints: &[super::EndpointStatus]) -> Option<i32> {
        let mut counts = std::collections::BTreeMap::<i32, usize>::new();
        for endpoint in endpoints {
            *counts.entry(endpoint.port).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by(|(port_a, count_a), (port_b, count_b)| count_a.cmp(count_b).then(port_b.cmp(port_a)))
            .map(|(port, _)| port)
    }
}

/// A `u32` as the apiserver understands it: it ignores `format: uint32` (and warns about it on
/// every apply) and would store any integer, so the bounds are explicit.
fn weight_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Share of new requests relative to the other endpoints' weights; 0 gets none. Absent: 100.",
        "type": "integer",
        "format": "int64",
        "minimum": 0,
        "maximum": u32::MAX,
    })
}

/// gRPC health of an endpoint, as the operator's probes see it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// The health service answered SERVING.
    Serving,
    /// The health service answered NOT_SERVING (or SERVICE_UNKNOWN), or probes failed past
    /// the unhealthy threshold.
    NotServing,
    /// Not probed to a conclusion yet.
    #[default]
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Serving => "Serving",
            Health::NotServing => "NotServing",
            Health::Unknown => "Unknown",
        })
    }
}

impl GrpcBackendStatus {
    /// Bytes of JSON each of `endpoints` takes in the status as written (separator included),
    /// were they the whole list.
    pub fn encoded_entry_sizes(endpoints: &[EndpointStatus]) -> Vec<usize> {
        let common_port = wire::most_common_port(endpoints);
        endpoints
            .iter()
            .map(|e| serde_json::to_vec(&wire::Endpoint::new(e.clone(), common_port)).map_or(0, |v| v.len() + 1))
            .collect()
    }

    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
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
    pub fn report_interval(&self) -> StdDuration {
        non_negative(self.report_interval)
    }

    pub fn blackout_period(&self) -> StdDuration {
        non_negative(self.blackout_period)
    }

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

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/grpcbackend.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_saphyr::to_string(&GrpcBackend::crd()).expect("a CRD always serializes to YAML");
    format!("# Generated from the kubegrpc-crds types by `make crds`; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests;
