//! Names of the conditions in [`GrpcBackendStatus::conditions`].

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

/// Reasons of the conditions (each says which condition and value it goes with).
pub mod reason {
    /// `Ready`: at least one endpoint passes its checks and is usable.
    pub const AVAILABLE: &str = "Available";
    /// `Ready` while failing open: clients use every Kubernetes-ready endpoint.
    pub const FAILING_OPEN: &str = "FailingOpen";
    /// `Ready=False`: the Service has no endpoint on the port.
    pub const NO_ENDPOINTS: &str = "NoEndpoints";
    /// `Ready=False`: endpoints exist, none can take requests.
    pub const NO_READY_ENDPOINTS: &str = "NoReadyEndpoints";
    /// `Ready=False`: `spec.service` names no Service.
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    /// `Ready=False`: the Service has no port `spec.port`.
    pub const PORT_NOT_FOUND: &str = "PortNotFound";
    /// `Ready=False`: the spec passed admission but cannot be used (the message says why).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `Ready=False`: `spec.tls` cannot be used (its CA bundle is missing or invalid and no
    /// earlier one was read): the endpoints cannot be probed.
    pub const TLS_UNAVAILABLE: &str = "TlsUnavailable";
    /// `Degraded=True`: every probe fails at connect time.
    pub const ALL_PROBES_FAILING: &str = "AllProbesFailingToConnect";
    /// `Degraded=False`: probes connect.
    pub const PROBES_CONNECTING: &str = "ProbesConnecting";
    /// `FailingOpen=True`: fewer pass than `healthCheck.panicThreshold` asks.
    pub const BELOW_PANIC_THRESHOLD: &str = "BelowPanicThreshold";
    /// `FailingOpen=True`: no endpoint passes its checks.
    pub const NONE_PASSING: &str = "NoEndpointPassesChecks";
    /// `FailingOpen=True`: every probe fails at connect time.
    pub const PROBES_FAILING_TO_CONNECT: &str = "ProbesFailingToConnect";
    /// `FailingOpen=False`: enough endpoints pass their checks.
    pub const CHECKS_TRUSTED: &str = "HealthChecksTrusted";
    /// `Truncated=True`: the list was cut at the status size budget.
    pub const STATUS_SIZE_LIMIT: &str = "StatusSizeLimit";
    /// `Truncated=False`: every endpoint is listed.
    pub const COMPLETE: &str = "Complete";
}
