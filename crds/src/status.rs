//! The observed state: [`GrpcBackendStatus`], one [`EndpointStatus`] per endpoint, and the one
//! rule ([`is_usable`]) for which endpoints clients send requests to. Stored in a compact wire
//! form (`wire`).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod wire;

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
    /// The routing table resolved from the GRPCRoutes attached to the Service, in the order
    /// clients try it (see [`crate::routes`]); empty: no route attaches.
    pub routes: Vec<crate::routes::RouteEntry>,
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
    /// The endpoint's port.
    pub port: i32,
    /// Share of new requests relative to the other endpoints' weights; 0 gets none.
    pub weight: u32,
    /// What the endpoint's gRPC health service says.
    pub health: Health,
    /// The EndpointSlice `serving` condition (nil means true).
    pub serving: bool,
    /// The EndpointSlice `terminating` condition (nil means false).
    pub terminating: bool,
    /// The endpoint's zone (EndpointSlice `zone`).
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
    /// The object's kind (e.g. `Node`).
    pub kind: String,
    /// The object's name.
    pub name: String,
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
