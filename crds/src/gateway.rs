//! The parts of the Gateway API (`gateway.networking.k8s.io`) that kubegrpc reads and writes:
//! `GRPCRoute` (v1) attached to a Service (the GAMMA mesh pattern), its status, and
//! `ReferenceGrant` (v1beta1, served by every Gateway API release since v0.6, so older
//! installations work too).
//!
//! Written here rather than taken from the `gateway-api` crate: its 0.22 release is built on
//! kube 4 and k8s-openapi 0.28, whose traits our kube 5 `Api` does not accept. Only the fields
//! kubegrpc acts on are typed; filters stay JSON so that an unsupported one can be named in the
//! route's status rather than dropped unseen. The CRDs themselves come from the Gateway API
//! release (the test harness installs `config/crd/standard/` of `sigs.k8s.io/gateway-api`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The API group of the Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The `controllerName` kubegrpc writes in the `status.parents` entries it owns.
pub const CONTROLLER_NAME: &str = "kubegrpc.io/operator";

/// A GRPCRoute: rules matching gRPC calls by method and headers, each sending them to weighted
/// backends. kubegrpc acts on the routes whose `parentRefs` name a Service it balances.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    namespaced,
    status = "GrpcRouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// What the route attaches to; kubegrpc looks at the entries of kind Service.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names the route applies to (not used for a Service parent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// The rules, at most 16.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// A reference from a route to its parent (a Gateway, or for a mesh a Service).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Absent: `gateway.networking.k8s.io`; `""` is the core group (Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Absent: `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Absent: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The parent's name.
    pub name: String,
    /// A section of the parent (a Gateway listener); not used for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// The parent's port (for a Service: the Service port the route applies to). Absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl ParentReference {
    /// Whether this names a core Service (the mesh attachment).
    pub fn is_service(&self) -> bool {
        self.group.as_deref() == Some("") && self.kind.as_deref() == Some("Service")
    }
}

/// One rule: matches and the backends matching calls go to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// An optional name for the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A call matches the rule when it satisfies any one of these. Empty: every call.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters (header changes, mirroring, ...), kept as JSON: see [`GrpcRouteFilter`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<GrpcRouteFilter>,
    /// Where matching calls go.
    #[serde(default)]
    pub backend_refs: Vec<GrpcBackendRef>,
}

/// A filter of a rule or of a backendRef; only its type matters to kubegrpc, which supports
/// none yet and reports each in the route's status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GrpcRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror` or `ExtensionRef`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The filter's settings, unread.
    #[serde(flatten)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// A match: a method and headers, all of which a call must satisfy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// The method. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    /// Headers, all of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<GrpcHeaderMatch>,
}

/// A method match: `type` `Exact` (default) or `RegularExpression`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// `Exact` (absent) or `RegularExpression`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The service. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The method. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A header match: `type` `Exact` (default) or `RegularExpression`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcHeaderMatch {
    /// `Exact` (absent) or `RegularExpression`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The header's name (case-insensitive).
    pub name: String,
    /// The value or regular expression.
    pub value: String,
}

/// A backend of a rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcBackendRef {
    /// Absent: `""`, the core group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Absent: `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The backend's name.
    pub name: String,
    /// Absent: the route's namespace. Another one needs a ReferenceGrant there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service port (required for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// The share of the rule's calls. Absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    /// Filters for this backend only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<GrpcRouteFilter>,
}

/// The status of a route: one entry per parent per controller that acts on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteStatus {
    /// Each controller writes only the entries whose `controllerName` is its own.
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

/// The status of a route for one parent, as one controller sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    /// The parent this entry is about, as the route names it.
    pub parent_ref: ParentReference,
    /// The controller that wrote this entry.
    pub controller_name: String,
    /// `Accepted`, `ResolvedRefs`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A grant, in its namespace, letting objects of other namespaces refer to objects here.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    plural = "referencegrants",
    namespaced,
    schema = "disabled"
)]
pub struct ReferenceGrantSpec {
    /// Who may refer.
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    /// To what.
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// The referrers a grant admits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceGrantFrom {
    /// The referrer's group (`gateway.networking.k8s.io` for routes).
    pub group: String,
    /// The referrer's kind (`GRPCRoute`).
    pub kind: String,
    /// The referrer's namespace.
    pub namespace: String,
}

/// The targets a grant admits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceGrantTo {
    /// The target's group (`""` for a Service).
    pub group: String,
    /// The target's kind (`Service`).
    pub kind: String,
    /// One target by name. Absent: every object of that kind in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ReferenceGrantSpec {
    /// Whether this grant lets a GRPCRoute of `from_namespace` refer to the Service `name`.
    pub fn admits_route_to_service(&self, from_namespace: &str, name: &str) -> bool {
        self.from
            .iter()
            .any(|f| f.group == GATEWAY_GROUP && f.kind == "GRPCRoute" && f.namespace == from_namespace)
            && self
                .to
                .iter()
                .any(|t| t.group.is_empty() && t.kind == "Service" && t.name.as_deref().is_none_or(|n| n == name))
    }
}
