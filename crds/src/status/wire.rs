//! The status as stored and served: what is as usual is left out of each entry.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Health, TargetRef};
use crate::FULL_WEIGHT;
use crate::routes::RouteEntry;

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

    /// The routing table, when GRPCRoutes attach to the Service: clients send a call to the
    /// backends of the first entry that matches it, and fail calls that match none. Absent: no
    /// route attaches; calls go to this GrpcBackend's endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub routes: Vec<RouteEntry>,
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
            routes: status.routes,
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
            routes: status.routes,
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
