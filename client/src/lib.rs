//! # kubegrpc: gRPC load balancing driven by a GrpcBackend
//!
//! The kubegrpc operator health-checks the endpoints of a Service with `grpc.health.v1` and
//! publishes them, weighted, in a `GrpcBackend`'s status. This crate watches that one object
//! and balances a tonic channel over it:
//!
//! - one connection per endpoint in rotation, opened when the endpoint appears, kept across
//!   updates (a new weight does not reconnect), dropped once its in-flight requests finish
//!   when the endpoint leaves;
//! - weighted, deterministic picking, swapped in atomically on each change and read without a
//!   lock per request;
//! - changes apply as they are published, whether or not requests flow; with the API down,
//!   the last known endpoints stay in use;
//! - a request that certainly never reached a backend's application (no connection, a refused
//!   stream, a GOAWAY) is sent again; connection rotation by the server is routine and never
//!   ejects, nor do the caller's own deadlines and cancellations;
//! - passive outlier detection on evidence (gRFC A50's failure percentage over an interval,
//!   and connection attempts failing in a row) ejects an endpoint before the operator's next
//!   status; an ejected endpoint keeps its connection and comes back connected (below);
//! - with no usable endpoint, a request fails at once with `Unavailable` naming the
//!   GrpcBackend and why;
//! - slow start, on the client: an endpoint that just became usable gets part of its weight,
//!   growing over the GrpcBackend's slow-start window (below);
//! - zones: a client that knows its zone keeps requests in it while it can (below).
//!
//! ## Slow start
//!
//! With `spec.weighting.slowStartWindow` set on the GrpcBackend (a Go duration such as "30s",
//! at most 1h; unset or "0s" is off), the operator publishes every endpoint's full weight and,
//! per endpoint, when its health or readiness last changed (`lastTransitionTime`). Each
//! client then weights an endpoint that became usable `t` ago, while `t < window`, with
//! Envoy's formula:
//!
//! ```text
//! weight x max(slowStartMinWeightPercent / 100, (t / window) ^ (1 / slowStartAggression))
//! ```
//!
//! (defaults: aggression 1, linear; minimum 10%). A transition time in the future counts as
//! now; one older than the window means fully ramped. This applies to endpoints that become
//! usable while the client runs and to those the client first reads with a recent transition
//! (they are new for every client), never to endpoints long in service, and not to an
//! endpoint coming back from an outlier ejection. While something in rotation ramps, the
//! channel recomputes the shares every 2% of the window (between 100 ms and 1 s) and swaps in
//! a new rotation when a share (kept in whole percent) changed; connections and requests in
//! flight are not touched, and the timer stops when nothing ramps. Bad values in the spec give
//! a warning in the log and their default (slow start off, for a bad window). In panic mode
//! every Kubernetes-ready endpoint gets the same share, ramping or not.
//! [`EndpointSnapshot::effective_weight`] and [`EndpointSnapshot::slow_start_percent`] show
//! the weight in use.
//!
//! ## Outlier detection
//!
//! The settings are the GrpcBackend's `spec.outlierDetection`, the same that the operator
//! publishes to xDS clients (unset: on, with gRFC A50's defaults; see [`OutlierDetection`]),
//! read with every read of the object: a change applies from the next interval without
//! reconnecting anything (a new `interval` restarts the timer; `enabled: false` ends every
//! ejection at once). [`Builder::outlier_detection`] sets the channel's own settings instead;
//! they win and the spec's are then not followed. [`Snapshot::outlier_detection`] shows the
//! settings in use. The evidence is what the transport saw (a connection that could not be
//! made or broke with the request on it), never a response's status code nor the caller's own
//! deadlines and cancellations; gRPC's xDS clients count every non-OK call.
//!
//! ## Zones
//!
//! [`Builder::zone`] (or [`Builder::zone_from_node`], which reads the Node's
//! `topology.kubernetes.io/zone` label) gives the client its zone. Requests then go only to
//! the usable endpoints for that zone while there is at least one, and to every usable
//! endpoint while there is none, coming back as soon as a local endpoint is usable again:
//! kube-proxy's semantics for Services with `trafficDistribution: PreferClose` or
//! topology-aware routing. An endpoint is for zone Z when its EndpointSlice hints
//! (`hints.forZones`, published as `forZones`) name Z or, without hints, when its zone is Z.
//! Panic mode is decided over all zones and, when on, spreads over every zone (the health view
//! is not trusted then; Envoy also routes zone-aware only outside panic mode). The snapshot
//! shows the client's zone, whether it fell back to every zone, and which endpoints are local.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let kube_client = kube::Client::try_default().await?;
//! let channel = kubegrpc::Channel::builder(kube_client, "default", "echo").connect().await?;
//! // let mut client = EchoClient::new(channel.clone());
//! tokio::time::timeout(std::time::Duration::from_secs(10), channel.ready()).await?;
//! for endpoint in channel.snapshot().endpoints {
//!     println!(
//!         "{} weight {} (in use {}) requests {}",
//!         endpoint.address, endpoint.weight, endpoint.effective_weight, endpoint.requests
//!     );
//! }
//! # Ok(()) }
//! ```
//!
//! ## Routes
//!
//! When GRPCRoutes attach to the GrpcBackend's Service, the operator resolves them into a
//! routing table in the GrpcBackend's status (`status.routes`, in the order calls try it) and
//! the channel follows it: each call takes the first entry whose method (`/SERVICE/METHOD`,
//! `Exact` or an anchored RE2 `RegularExpression`) and headers all match, then one of the
//! entry's GrpcBackends by weight (deterministic weighted round-robin: over each cycle of the
//! reduced weights exactly their shares; weight 0 gets nothing), and goes to that
//! GrpcBackend's pool. Every GrpcBackend the table names (weight 0 included) gets its own watch
//! and pool, with this channel's settings (TLS, zone, outlier detection, panic threshold); the
//! channel's own GrpcBackend keeps its pool. A new table keeps the pools, and connections, of
//! the GrpcBackends it still names and drops the others (requests in flight finish); routing is
//! one level deep (a routed-to GrpcBackend's own table is not followed).
//!
//! - No table (absent or empty): every call goes to the GrpcBackend's own endpoints.
//! - A call that matches no entry, or whose entry names no backend of weight above 0, fails
//!   at once with `Unavailable` naming the GrpcBackend and why (the Gateway API's rule: a
//!   Service with routes serves only what they match).
//! - A picked GrpcBackend with no usable endpoint is passed over for the entry's others, which
//!   take its share; with none usable the call fails with `Unavailable` and each one's reason.
//! - An entry the client cannot apply exactly (a regular expression that does not compile, a
//!   namespace or name that is not one, more than 256 GrpcBackends in the table) is skipped
//!   with a warning in the log and in [`RoutingSnapshot::skipped`]: calls it would have matched
//!   fall through to the entries after it.
//! - [`Channel::ready`] waits until every entry that routes anywhere has a GrpcBackend with a
//!   usable endpoint. [`Snapshot::routing`] shows the table, each routed-to GrpcBackend's pool
//!   and how many calls went to it.
//!
//! ### Timeouts and retries
//!
//! An entry may carry a timeout and a retry policy (`status.routes[].timeout`, `.retry`: the
//! route's `kubegrpc.io/timeout` and `kubegrpc.io/retry-*` annotations, resolved by the
//! operator). The channel applies them to each call the entry takes, with the semantics gRPC's
//! xDS clients give the same settings (gRFC A31 for the timeout, A6/A44 for retries):
//!
//! - **Timeout**: the whole call, retries and backoffs included, from when the channel gets it;
//!   the caller's own deadline (its `grpc-timeout`, e.g. `tonic::Request::set_timeout`) wins
//!   when shorter. Each attempt carries the time left as its `grpc-timeout`, so the backend
//!   knows it too. When it passes, the call fails with `DEADLINE_EXCEEDED` naming the
//!   GrpcBackend, the route and rule, and which deadline it was; the attempt under way is
//!   reset (the backend sees the call cancelled); a response whose body is still coming ends
//!   with that status.
//! - **Retries**: a call is retried while it is not committed: its response is Trailers-Only
//!   (the status in the response headers, no message) with one of the listed codes, or the
//!   transport failed before any response header (counted as `UNAVAILABLE`; the caller's own
//!   per-attempt timeout and a failing request body are never retried). Once the headers of a
//!   response with a body arrive, the call is committed. The n-th retry waits a random time
//!   below `backoff x 2^(n-1)`, at most `maxBackoff` (a server's `grpc-retry-pushback-ms` sets
//!   the wait instead, or, negative, stops the retries), then goes to one of the entry's
//!   GrpcBackends picked again by weight, preferring one with an endpoint that has not failed
//!   the call, and within it to such an endpoint; it carries `grpc-previous-rpc-attempts`. The
//!   request body is kept for retries up to 64 KiB; a larger one, or one the backend answered
//!   before reading it whole, is not retried. At most `attempts` retries.
//! - **Retry budget** (the Rust client's; xDS clients have only the attempt limit): per rule of
//!   a route (the entries one rule makes share it, and it is kept across tables while the rule
//!   stays, so a canary's weight change does not reset it), because the policy comes with the
//!   rule and its retries may go to any of the rule's backends. Over the last 10 s (one-second
//!   buckets), retries may be at most the larger of
//!   [`RETRY_BUDGET_MIN_PER_SECOND`](kubegrpc_crds::routes::RETRY_BUDGET_MIN_PER_SECOND) x 10
//!   and `budgetPercent` % of the rule's calls; a retry past it is not made, and the call fails
//!   as its last attempt did.
//! - [`RoutingSnapshot::policies`] counts each such rule's calls, retries, retries refused by
//!   the budget and calls past their deadline (metrics
//!   `kubegrpc_client_route_retries_total`, `kubegrpc_client_route_retries_refused_total`,
//!   `kubegrpc_client_route_deadline_exceeded_total`). Calls of entries without a timeout or
//!   retries take the same path as without routes.
//!
//! ## TLS backends
//!
//! When the GrpcBackend has `spec.tls`, its endpoints are connected to with TLS (the crate's
//! `tls` feature) verifying what the operator verifies: the server name
//! (`spec.tls.serverName`, default `SERVICE.NAMESPACE.svc`) against the roots in the CA bundle
//! ConfigMap (`spec.tls.caBundle`, read by the client with one GET and again every 5 minutes;
//! once read, a bundle that cannot be read again stays in use), or the system's roots without
//! one. A change of `spec.tls` or of the bundle reconnects every endpoint. Your own
//! `ClientTlsConfig` ([`Builder::tls`]) wins over the spec, and then no ConfigMap is read.
//!
//! A GrpcBackend that says TLS is never dialed in plaintext: if the client cannot connect with
//! TLS (built without the `tls` feature, a bundle it may not read or that holds no
//! certificate), no endpoint is used and every request fails at once with `Unavailable` and
//! the reason (also in [`Snapshot::unavailable`]).
//!
//! ## RBAC
//!
//! The workload needs `get`, `list` and `watch` on `grpcbackends.kubegrpc.io` in its namespace
//! and in every namespace its GrpcBackend's routing table names (nothing else: the operator
//! reads the GRPCRoutes, ReferenceGrants and Services);
//! for a GrpcBackend with a CA bundle, `get` on that ConfigMap (a Role rule with
//! `resourceNames: [the ConfigMap]`; not needed with [`Builder::tls`]); and, for
//! [`Builder::zone_from_node`] only, `get` on `nodes` (a ClusterRole).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The GrpcBackend read: one object watched (discovery), its status and its slow-start
// settings read leniently.
mod discovery;
mod slow_start;
mod status;

// The pool: from the status to the rotation requests are picked from, with outlier detection
// on the evidence of failed requests.
mod failure;
mod outlier;
mod picker;
mod pool;

// Routes: a GrpcBackend's routing table sends each call to the pool of the GrpcBackend it
// picks (read and matched in `routes`, pools kept and picked in `router`).
mod route_call;
mod route_policy;
mod router;
mod routes;

// Requests: the channel picks an endpoint and sends on its connection (TLS when the
// GrpcBackend says so).
mod channel;
mod connection;
mod endpoint;
mod tls;

// Introspection.
#[cfg(feature = "prometheus")]
pub mod metrics;
mod snapshot;

#[cfg(test)]
mod test_support;

pub use channel::{Builder, Channel};
pub use outlier::{FailurePercentage, OutlierDetection};
pub use snapshot::{
    AppliedRoute, DiscoveryState, EndpointSnapshot, RoutedBackendSnapshot, RoutingSnapshot, RulePolicySnapshot,
    Snapshot,
};

/// Errors of the channel; each names the GrpcBackend it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first read of the GrpcBackend failed (the API is unreachable, or the workload may
    /// not `get`, `list` or `watch` GrpcBackends in its namespace).
    #[error("cannot read GrpcBackend {backend}: {source}")]
    Discovery {
        /// The GrpcBackend, `namespace/name`.
        backend: String,
        /// What the watch reported.
        #[source]
        source: kube::runtime::watcher::Error,
    },
    /// The watch ended before it read the GrpcBackend (its task was stopped).
    #[error("the watch of GrpcBackend {backend} stopped before its first read")]
    DiscoveryStopped {
        /// The GrpcBackend, `namespace/name`.
        backend: String,
    },
}

/// Not part of the API: the internals that the crate's benchmarks, the fuzz targets and the
/// end-to-end benchmarks drive directly. They may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::{
        picker::Picker,
        slow_start::{ParsedSlowStart, parse_slow_start},
        status::{ParsedStatus, StatusEndpoint, parse_status},
    };
}
