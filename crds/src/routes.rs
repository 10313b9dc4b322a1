//! The routing table a GrpcBackend's status carries when GRPCRoutes attach to its Service
//! (`status.routes`): what the operator resolved from the routes, in the order clients try it.
//!
//! The operator does the Gateway API's work once: it follows the GRPCRoutes whose parent is the
//! GrpcBackend's Service, checks their references (a backend Service must exist, be balanced by
//! a GrpcBackend, and be in the route's namespace or granted by a ReferenceGrant), sorts the
//! matches by the specification's precedence and writes the result here. Clients only walk the
//! table: a call takes the first entry whose method and headers match it, then one of the
//! entry's backends by weight. So every client kind (the Rust client, xDS clients through the
//! RouteConfiguration made from this table) routes the same way, and a client needs no read
//! access to GRPCRoutes, ReferenceGrants or Services.
//!
//! Semantics a client implements:
//! - no table (`routes` empty or absent): no route attaches; every call goes to this
//!   GrpcBackend's own endpoints, as before routes existed;
//! - a table: a call that matches no entry fails with `UNAVAILABLE` (the Gateway API's mesh
//!   rule: a Service with routes only serves what they match; an xDS client does the same);
//! - an entry whose backends are empty or all of weight 0 fails the calls it matches with
//!   `UNAVAILABLE`.

use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most entries a table holds: 16 rules of 8 matches each, twice (two routes may attach).
/// The operator leaves out what does not fit and says so in the route's status.
pub const MAX_ROUTE_ENTRIES: usize = 256;
/// The most backends an entry names (a GRPCRoute rule has at most 16 backendRefs).
pub const MAX_ROUTE_BACKENDS: usize = 16;
/// The most header matches an entry carries (a GRPCRoute match has at most 16).
pub const MAX_HEADER_MATCHES: usize = 16;

/// One entry of the routing table: a match and the backends matching calls go to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteEntry {
    /// The GRPCRoute this entry comes from, as `NAMESPACE/NAME`.
    #[schemars(length(max = 317))]
    pub route: String,
    /// The index of the rule in that route's `rules`.
    #[schemars(schema_with = "rule_index_schema")]
    pub rule: u32,
    /// The method a call must be for. Absent: any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodMatch>,
    /// Headers (gRPC metadata) a call must carry; every one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
    /// Where matching calls go, each with its share of them. Empty, or every weight 0:
    /// matching calls fail with `UNAVAILABLE`.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub backends: Vec<RouteBackend>,
    /// Matching calls fail with `DEADLINE_EXCEEDED` this long after they start, retries
    /// included (the caller's own deadline applies when it is shorter). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Matching calls that fail with one of the listed codes before any response arrived are
    /// sent again. Absent: no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// How calls are retried (gRFC A44's retry policy, plus the Rust client's retry budget).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// The gRPC status codes that make a call retried, as gRPC names them
    /// (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...).
    #[schemars(length(max = 16))]
    pub codes: Vec<String>,
    /// Retries after the first attempt (1 to 4: gRPC clients make at most 5 attempts).
    #[schemars(schema_with = "retry_attempts_schema")]
    pub attempts: u8,
    /// The first backoff; each next one is twice as long, jittered, at most `maxBackoff`.
    pub backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Retries over the last 10 seconds may reach this share of the calls, in percent, or 10 a
    /// second (`RETRY_BUDGET_MIN_PER_SECOND`), whichever is more: retries cannot multiply an
    /// outage. Applied by the Rust client; xDS clients have no retry budget (they are bounded by
    /// `attempts`).
    #[schemars(schema_with = "retry_budget_schema")]
    pub budget_percent: u8,
}

/// Retries a client may always make each second, whatever its budget says (so that a client
/// with little traffic can still retry).
pub const RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;

/// How a match compares: the whole value equals, or the whole value matches an RE2 regular
/// expression (anchored at both ends).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MatchType {
    /// The whole value equals the given one.
    #[default]
    Exact,
    /// The whole value matches the given RE2 regular expression.
    RegularExpression,
}

/// The gRPC method a call is for (its path is `/SERVICE/METHOD`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MethodMatch {
    /// How `service` and `method` compare.
    #[serde(rename = "type", default)]
    pub match_type: MatchType,
    /// The fully qualified service (e.g. `echo.Echo`). Absent: any service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub service: Option<String>,
    /// The method (e.g. `Say`). Absent: any method of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub method: Option<String>,
}

/// A header (gRPC metadata entry) a call must carry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// How `value` compares.
    #[serde(rename = "type", default)]
    pub match_type: MatchType,
    /// The header's name, lowercase (gRPC metadata keys are).
    #[schemars(length(max = 256))]
    pub name: String,
    /// The value, or the regular expression, to compare with.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A GrpcBackend matching calls go to, and its share of them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteBackend {
    /// The GrpcBackend's name.
    #[schemars(length(max = 253))]
    pub name: String,
    /// The GrpcBackend's namespace. Absent: the namespace of the GrpcBackend this table is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// The share of matching calls, relative to the entry's other backends; 0 gets none.
    #[schemars(schema_with = "route_weight_schema")]
    pub weight: u32,
}

// Integers as the apiserver understands them: it ignores `format: uint32` (warning on every
// apply), so the bounds are explicit.
fn rule_index_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The index of the rule in that route's `rules`.",
        "type": "integer",
        "format": "int32",
        "minimum": 0,
        "maximum": 15,
    })
}

fn retry_attempts_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Retries after the first attempt (1 to 4: gRPC clients make at most 5 attempts).",
        "type": "integer",
        "format": "int32",
        "minimum": 1,
        "maximum": 4,
    })
}

fn retry_budget_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Retries over the last 10 seconds may reach this share of the calls, in percent, or 10 a second, whichever is more. Applied by the Rust client.",
        "type": "integer",
        "format": "int32",
        "minimum": 1,
        "maximum": 100,
    })
}

fn route_weight_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The share of matching calls, relative to the entry's other backends; 0 gets none.",
        "type": "integer",
        "format": "int32",
        "minimum": 0,
        "maximum": 1_000_000,
    })
}

impl RouteBackend {
    /// The GrpcBackend's namespace, given the namespace of the GrpcBackend whose table this is.
    pub fn namespace_or<'a>(&'a self, table_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(table_namespace)
    }
}

impl RouteEntry {
    /// Whether no backend of this entry takes calls (so matching calls fail).
    pub fn is_unroutable(&self) -> bool {
        self.backends.iter().all(|b| b.weight == 0)
    }
}
