//! What the rotation should hold, and why nothing can be picked when it holds nothing: pure
//! functions of the pool's view (the status read, the ejections, the client's zone, slow
//! start's ramps and the time). Nothing here connects, locks or reads a clock.

use std::net::SocketAddr;

use kubegrpc_crds::Health;
use tokio::time::Instant;

use super::{apply::Presence, ramp::Ramps};
use crate::{outlier::Ejections, status::StatusEndpoint};

#[cfg(test)]
mod tests;

/// What a plan is decided from.
#[derive(Clone, Copy)]
pub(super) struct PlanInput<'a> {
    /// The status's endpoints, in its order.
    pub endpoints: &'a [StatusEndpoint],
    pub ejections: &'a Ejections,
    /// The client's zone, if it has one.
    pub zone: Option<&'a str>,
    /// In percent: below this share of Kubernetes-ready endpoints usable, panic mode (0: off).
    pub panic_threshold: u8,
    pub ramps: &'a Ramps,
    pub now: Instant,
}

/// An endpoint chosen for the rotation, with its weight (published, or 1 in panic mode) and its
/// slow-start percentage while it ramps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Chosen {
    pub address: SocketAddr,
    pub weight: u32,
    pub percent: Option<u32>,
}

/// What a rotation is built from.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub panic: bool,
    /// The client has a zone and nothing usable is for it: every zone is in rotation.
    pub zone_fallback: bool,
    pub chosen: Vec<Chosen>,
    /// Ejected endpoints in scope, whose connections are kept.
    pub ejected: Vec<SocketAddr>,
    /// Counts for the logs.
    pub usable: usize,
    pub kubernetes_ready: usize,
}

/// What the rotation should hold: which endpoints, with which weights.
///
/// Panic mode is decided over every zone, as without zones, and ignores zones: it means the
/// health view (the operator's or the ejections') left too few endpoints to trust it, and
/// then spreading over every Kubernetes-ready endpoint in every zone loads each one least
/// (Envoy likewise routes zone-aware only outside panic mode). Otherwise a client with a
/// zone uses the usable endpoints for its zone while there is one, else every usable one;
/// slow start shapes the weights of whatever is in rotation.
pub(super) fn plan(input: &PlanInput<'_>) -> Plan {
    let PlanInput {
        endpoints,
        ejections,
        zone,
        panic_threshold,
        ramps,
        now,
    } = *input;
    // A Serving endpoint of weight 0 was weighted out on purpose (a `Static` annotation of
    // 0, a drain): it is neither counted against the threshold nor used in panic.
    let kubernetes_ready: Vec<&StatusEndpoint> = endpoints
        .iter()
        .filter(|e| e.kubernetes_ready() && !(e.health == Health::Serving && e.weight == 0))
        .collect();
    let usable: Vec<&StatusEndpoint> = endpoints
        .iter()
        .filter(|e| e.usable() && !ejections.is_ejected(&e.address))
        .collect();
    let threshold = usize::from(panic_threshold);
    let panic = !kubernetes_ready.is_empty() && usable.len() * 100 < threshold * kubernetes_ready.len();
    // Panic: the operator's view (or the ejections) left too few; spread evenly over what
    // Kubernetes considers ready rather than overload the few or fail everything.
    if panic {
        return Plan {
            panic,
            zone_fallback: false,
            chosen: kubernetes_ready
                .iter()
                .map(|e| Chosen {
                    address: e.address,
                    weight: 1,
                    percent: None,
                })
                .collect(),
            ejected: Vec::new(),
            usable: usable.len(),
            kubernetes_ready: kubernetes_ready.len(),
        };
    }
    let local = |e: &StatusEndpoint| zone.is_some_and(|zone| e.is_for_zone(zone));
    let stay_local = usable.iter().any(|e| local(e));
    let in_scope = |e: &StatusEndpoint| !stay_local || local(e);
    let chosen = usable
        .iter()
        .filter(|e| in_scope(e))
        .map(|e| Chosen {
            address: e.address,
            weight: e.weight,
            percent: ramps.percent(&e.address, now),
        })
        .collect();
    // Ejected endpoints keep their connection (gRFC A50), so they come back warm.
    let ejected = endpoints
        .iter()
        .filter(|e| e.usable() && ejections.is_ejected(&e.address) && in_scope(e))
        .map(|e| e.address)
        .collect();
    Plan {
        panic,
        zone_fallback: zone.is_some() && !stay_local && !usable.is_empty(),
        chosen,
        ejected,
        usable: usable.len(),
        kubernetes_ready: kubernetes_ready.len(),
    }
}

/// Why nothing can be picked from an empty rotation of GrpcBackend `backend`, as the message of
/// the requests that fail fast.
pub(super) fn why_unavailable(
    backend: &str,
    presence: Presence,
    endpoints: &[StatusEndpoint],
    ejections: &Ejections,
) -> String {
    match presence {
        Presence::NotReadYet => return format!("GrpcBackend {backend}: its status has not been read yet"),
        Presence::NotFound => return format!("GrpcBackend {backend} not found"),
        Presence::Found => {}
    }
    if endpoints.is_empty() {
        return format!("GrpcBackend {backend} lists no endpoints");
    }
    let healthy: Vec<&StatusEndpoint> = endpoints.iter().filter(|e| e.usable()).collect();
    if healthy.is_empty() {
        let not_serving = endpoints.iter().filter(|e| e.health == Health::NotServing).count();
        return format!(
            "GrpcBackend {backend} has no ready endpoints ({} listed, {} Kubernetes-ready, {not_serving} NotServing)",
            endpoints.len(),
            endpoints.iter().filter(|e| e.kubernetes_ready()).count()
        );
    }
    if healthy.iter().all(|e| ejections.is_ejected(&e.address)) {
        return format!(
            "all {} ready endpoints of GrpcBackend {backend} are ejected after connection failures",
            healthy.len()
        );
    }
    format!("GrpcBackend {backend}: no endpoint can be connected to")
}
