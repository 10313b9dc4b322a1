//! Read-only introspection of a channel: what it knows and what it did.

use std::{net::SocketAddr, time::SystemTime};

use kubegrpc_crds::Health;

/// A copy of a channel's state at one moment; holding it holds nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The GrpcBackend followed, `namespace/name`.
    pub backend: String,
    /// How the view of the GrpcBackend is kept (synced, not found, stale).
    pub discovery: DiscoveryState,
    /// Too few usable endpoints: requests are spread over every Kubernetes-ready endpoint.
    pub panic: bool,
    /// Why requests fail fast right now, if they do.
    pub unavailable: Option<String>,
    /// Outlier-detection intervals evaluated so far (a clock for "after N intervals").
    pub outlier_intervals: u64,
    /// The outlier detection settings in use: the GrpcBackend's `spec.outlierDetection` (its
    /// defaults when unset), or those set with
    /// [`Builder::outlier_detection`](crate::Builder::outlier_detection).
    pub outlier_detection: crate::OutlierDetection,
    /// The client's zone ([`Builder::zone`](crate::Builder::zone)), if it has one.
    pub zone: Option<String>,
    /// The client has a zone but no usable endpoint is for it: requests go to every zone.
    pub zone_fallback: bool,
    /// Every endpoint of the status, in its order.
    pub endpoints: Vec<EndpointSnapshot>,
    /// The routing table this channel follows, when the GrpcBackend's status has one
    /// (`status.routes`); then calls go where it says, and `endpoints` are the GrpcBackend's own
    /// (used only when the table names it). `None` in the snapshots of routed-to GrpcBackends.
    pub routing: Option<RoutingSnapshot>,
}

impl Snapshot {
    /// The endpoint at `address`, if listed.
    pub fn endpoint(&self, address: &SocketAddr) -> Option<&EndpointSnapshot> {
        self.endpoints.iter().find(|e| e.address == *address)
    }
}

/// One endpoint as the channel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSnapshot {
    /// The endpoint's address and port, as published.
    pub address: SocketAddr,
    /// The weight published by the operator.
    pub weight: u32,
    /// The weight requests are picked with now, in the units of `weight`: `weight` itself,
    /// its slow-start share while it ramps (rounded, at least 1), 1 in panic mode, and 0 when
    /// it is not in rotation.
    pub effective_weight: u32,
    /// While it is in rotation and slow start ramps it up: the share of `weight` it gets now,
    /// in percent.
    pub slow_start_percent: Option<u32>,
    /// When its health or readiness last changed, as published (slow start ramps from it).
    pub last_transition_time: Option<SystemTime>,
    /// Its zone, as published.
    pub zone: Option<String>,
    /// The zones it should serve (EndpointSlice `hints.forZones`), as published.
    pub for_zones: Vec<String>,
    /// It is for the client's zone (its `forZones` name it, or with none, its zone is it);
    /// false when the client has no zone.
    pub local: bool,
    /// Its gRPC health, as the operator's probes saw it.
    pub health: Health,
    /// Serving and not terminating, as Kubernetes says.
    pub kubernetes_ready: bool,
    /// Out of rotation on outlier evidence, for now (or connecting again after its ejection).
    pub ejected: bool,
    /// New requests may be picked for it.
    pub in_rotation: bool,
    /// Requests sent to it whose response has not ended yet.
    pub in_flight: u64,
    /// Requests sent to it (each attempt of a retried request counts).
    pub requests: u64,
    /// Requests that failed before a response, whatever the reason (rotation and the
    /// caller's deadlines included; only some of them are evidence for ejection).
    pub failures: u64,
    /// Times outlier detection ejected it.
    pub ejections: u64,
    /// Connections made to it so far. Plaintext endpoints only (0 with TLS).
    pub connections_opened: u64,
    /// Those of `connections_opened` that have ended; the difference is the connections open
    /// now.
    pub connections_closed: u64,
}

/// How the channel's view of the GrpcBackend is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryState {
    /// The first read has not completed.
    Connecting,
    /// Following the object's changes as they happen.
    Synced,
    /// Following, and the object does not exist.
    NotFound,
    /// The watch failed (the API is unreachable, say): the last known endpoints stay in use
    /// while it retries with backoff.
    Stale {
        /// The first error of the failed watch.
        error: String,
        /// When the watch began to fail.
        since: SystemTime,
    },
}

/// The routing table a channel follows and the GrpcBackends it routes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingSnapshot {
    /// The entries in use, in the order calls try them.
    pub entries: Vec<AppliedRoute>,
    /// Entries of `status.routes` left out, each with why (a regular expression that does not
    /// compile, a name that is not one, a bound exceeded...): calls they would have matched
    /// fall through to the later entries.
    pub skipped: Vec<String>,
    /// Every GrpcBackend the entries name (weight 0 included), each once, in the order first
    /// named: each has its own watch and pool, kept while the table names it.
    pub backends: Vec<RoutedBackendSnapshot>,
    /// Calls failed with `Unavailable` before reaching a pool: no entry matched them, their
    /// entry named no backend of weight above 0, or none of its backends had a usable endpoint.
    pub unrouted: u64,
    /// The calls of each rule with a timeout or retries (`entries[].entry.timeout`, `.retry`),
    /// in the table's order: one per rule of a route (the entries of one rule share its
    /// counters and retry budget), counted while the rule stays in the table.
    pub policies: Vec<RulePolicySnapshot>,
}

/// What the timeout and retries of one rule of a route did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePolicySnapshot {
    /// The GRPCRoute, `namespace/name`.
    pub route: String,
    /// The rule's index in the route.
    pub rule: u32,
    /// Calls the rule took.
    pub calls: u64,
    /// Attempts after the first (each is also in its endpoint's `requests`).
    pub retries: u64,
    /// Retries the retry budget refused: the call failed as its last attempt did.
    pub retries_refused: u64,
    /// Calls failed with `DEADLINE_EXCEEDED` by the route's timeout or the caller's deadline.
    pub deadline_exceeded: u64,
}

/// One entry of the routing table in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRoute {
    /// Its position in `status.routes`.
    pub index: usize,
    /// The entry, as the status has it.
    pub entry: kubegrpc_crds::routes::RouteEntry,
}

/// A GrpcBackend the routing table sends calls to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutedBackendSnapshot {
    /// The GrpcBackend, `namespace/name`.
    pub backend: String,
    /// Calls the table sent it (each call once, whatever its attempts; a route's retries,
    /// which may go to another of the entry's GrpcBackends, are counted in
    /// [`RoutingSnapshot::policies`]), since its pool was made.
    pub routed: u64,
    /// Its pool: endpoints, weights, counters, as for the channel's own GrpcBackend.
    pub snapshot: Snapshot,
}

impl RoutingSnapshot {
    /// The routed-to GrpcBackend `namespace/name`, if the table names it.
    pub fn backend(&self, backend: &str) -> Option<&RoutedBackendSnapshot> {
        self.backends.iter().find(|b| b.backend == backend)
    }
}
