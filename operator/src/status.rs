//! The desired status of a GrpcBackend, as a pure function of what the operator observed, the
//! previously published status and the clock.
//!
//! Deterministic by construction: endpoints sorted by address, no probe timings, and every
//! timestamp carried over from the previous status unless the thing it dates changed. The
//! reconciler writes the result only when it differs from what is published.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kubegrpc_crds::{
    EndpointStatus, GrpcBackendStatus, Health, PortRef,
    condition::{self, reason},
};

use crate::{
    discovery::{DiscoveredEndpoint, PortNotFound},
    fail_open::{self, Checked, FailOpen},
    health::tracker::HealthVerdict,
};

/// An endpoint with what its prober concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbedEndpoint {
    pub endpoint: DiscoveredEndpoint,
    pub verdict: HealthVerdict,
    /// The latest probe failed at connect time.
    pub connect_failing: bool,
    /// The weight the policy gives it were it usable (see [`crate::weights`]).
    pub weight: u32,
}

/// What the reconciler found for one GrpcBackend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The spec cannot be acted on (the message says why).
    InvalidSpec(String),
    /// `spec.tls` cannot be used (the message says why).
    TlsUnavailable(String),
    ServiceNotFound,
    PortNotFound(PortNotFound),
    /// The endpoints carrying the port, sorted by address, with their health.
    Endpoints(Vec<ProbedEndpoint>),
}

/// The facts about the GrpcBackend that the status mentions.
#[derive(Clone, Debug)]
pub struct StatusContext<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub port: &'a PortRef,
    pub generation: Option<i64>,
    /// Clients ramp an endpoint up over this window after it became usable, from the
    /// `lastTransitionTime` listed meanwhile.
    pub slow_start_window: Duration,
    pub now: Timestamp,
    /// Most bytes of JSON the endpoint list may take (see [`DEFAULT_ENDPOINTS_BUDGET`]).
    pub endpoints_budget: usize,
    /// `spec.healthCheck.panicThreshold`, in percent (see [`crate::fail_open`]).
    pub panic_threshold: u32,
}

/// How many bytes of JSON the endpoint list may take by default. etcd refuses requests over
/// 1.5 MiB (its `--max-request-bytes`); the rest of the object (metadata, spec, conditions,
/// managed fields) takes a few KiB, so 1.25 MiB of endpoints leaves a quarter of a MiB for it.
/// A usual entry (a Pod of a Deployment, with its zone) takes about 107 bytes: 12,000 fit.
pub const DEFAULT_ENDPOINTS_BUDGET: usize = 1280 * 1024;

/// The status to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: GrpcBackendStatus,
}

/// Computes the status to publish.
pub fn desired_status(
    previous: Option<&GrpcBackendStatus>,
    observation: &Observation,
    ctx: &StatusContext<'_>,
) -> Desired {
    // Published times have whole seconds; computing with the same precision keeps a status
    // read back equal to the one written.
    let now = Timestamp::from_second(ctx.now.as_second()).unwrap_or(ctx.now);
    let previous_endpoints: HashMap<(&str, i32), &EndpointStatus> = previous
        .map(|p| p.endpoints.iter().map(|e| ((e.address.as_str(), e.port), e)).collect())
        .unwrap_or_default();

    let mut endpoints = Vec::new();
    let mut connect_failing = 0;
    let fail_open = match observation {
        Observation::Endpoints(probed) => fail_open::decide(probed.iter().map(candidate), ctx.panic_threshold),
        _ => FailOpen::No,
    };
    if let Observation::Endpoints(probed) = observation {
        for probed_endpoint in probed {
            let endpoint = &probed_endpoint.endpoint;
            let address = endpoint.address.ip().to_string();
            let port = i32::from(endpoint.address.port());
            let health = probed_endpoint.verdict.health;
            // Passes its check; while failing open, clients use the others Kubernetes calls
            // ready too, and the entry says so.
            let usable = endpoint.kubernetes_ready() && health == Health::Serving;
            let failing_open = fail_open.is_failing_open() && candidate(probed_endpoint).used_when_failing_open();
            let since = match previous_endpoints.get(&(address.as_str(), port)) {
                Some(before)
                    if before.health == health
                        && (before.serving && !before.terminating) == endpoint.kubernetes_ready() =>
                {
                    // No time listed: usable for longer than any slow-start window.
                    before
                        .last_transition_time
                        .as_ref()
                        .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
                }
                _ => now,
            };
            if probed_endpoint.connect_failing {
                connect_failing += 1;
            }
            // Clients ramp a new endpoint from the time listed; past the window the time is
            // left out at the next write (never a write of its own: that would wake every
            // client for nothing), so that 10,000 usual entries fit in one object.
            let ramping = usable
                && !ctx.slow_start_window.is_zero()
                && Duration::try_from(now.duration_since(since)).is_ok_and(|age| age < ctx.slow_start_window);
            let weight = if usable || failing_open {
                probed_endpoint.weight
            } else {
                0
            };
            endpoints.push(EndpointStatus {
                address,
                port,
                weight,
                health,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
                zone: endpoint.zone.clone(),
                for_zones: endpoint.for_zones.clone(),
                pod: endpoint.pod.clone(),
                target_ref: endpoint.target_ref.clone(),
                reason: (health != Health::Serving)
                    .then(|| probed_endpoint.verdict.reason.clone())
                    .flatten(),
                last_transition_time: (!usable || ramping).then_some(Time(since)),
                fail_open: failing_open,
            });
        }
    }
    endpoints.sort_by_cached_key(sort_key);

    let total = endpoints.len();
    let ready = endpoints.iter().filter(|e| e.is_usable()).count();
    let (listed, truncated) = fit_budget(endpoints, ctx.endpoints_budget);

    let mut conditions = vec![
        ready_condition(observation, ctx, &listed, total, ready, fail_open),
        degraded_condition(total, connect_failing),
        failing_open_condition(fail_open),
    ];
    if let Some(listed_count) = truncated {
        conditions.push(Candidate {
            type_: condition::TRUNCATED,
            status: "True",
            reason: reason::STATUS_SIZE_LIMIT,
            message: format!(
                "status lists {listed_count} of {total} endpoints, usable ones first: the full list would exceed \
                 {} bytes (etcd refuses objects over 1.5 MiB)",
                ctx.endpoints_budget
            ),
        });
    }
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let conditions = conditions
        .into_iter()
        .map(|candidate| candidate.into_condition(previous_conditions, ctx.generation, now))
        .collect();

    Desired {
        status: GrpcBackendStatus {
            observed_generation: ctx.generation,
            ready_endpoints: ready as i32,
            total_endpoints: total as i32,
            conditions,
            endpoints: listed,
            routes: Vec::new(),
        },
    }
}

/// What failing open needs to know of an endpoint.
fn candidate(probed: &ProbedEndpoint) -> Checked {
    let health = probed.verdict.health;
    Checked {
        kubernetes_ready: probed.endpoint.kubernetes_ready(),
        weighted: probed.weight > 0,
        concluded: health != Health::Unknown,
        passing: health == Health::Serving,
        connect_failing: probed.connect_failing,
    }
}

/// Address order: by IP (IPv4 before IPv6, numerically), then port.
fn sort_key(endpoint: &EndpointStatus) -> (Option<SocketAddr>, String, i32) {
    let parsed = endpoint
        .address
        .parse()
        .ok()
        .map(|ip| SocketAddr::new(ip, u16::try_from(endpoint.port).unwrap_or(0)));
    (parsed, endpoint.address.clone(), endpoint.port)
}

/// Keeps as many endpoints (in address order) as fit in `budget` bytes of JSON, usable ones
/// first. Returns the kept endpoints and, if some were cut, how many were kept.
fn fit_budget(endpoints: Vec<EndpointStatus>, budget: usize) -> (Vec<EndpointStatus>, Option<usize>) {
    let sizes = GrpcBackendStatus::encoded_entry_sizes(&endpoints);
    if sizes.iter().sum::<usize>() <= budget {
        return (endpoints, None);
    }
    let usable_first = (0..endpoints.len())
        .filter(|i| endpoints[*i].is_usable())
        .chain((0..endpoints.len()).filter(|i| !endpoints[*i].is_usable()));
    let mut keep = vec![false; endpoints.len()];
    let mut used = 0;
    for index in usable_first {
        if used + sizes[index] > budget {
            break;
        }
        used += sizes[index];
        keep[index] = true;
    }
    let kept: Vec<EndpointStatus> = endpoints
        .into_iter()
        .zip(keep)
        .filter_map(|(e, k)| k.then_some(e))
        .collect();
    let count = kept.len();
    (kept, Some(count))
}

/// A condition before its timestamps are settled.
struct Candidate {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl Candidate {
    /// metav1.Condition semantics: `lastTransitionTime` moves only when `status` changes.
    fn into_condition(self, previous: &[Condition], generation: Option<i64>, now: Timestamp) -> Condition {
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == self.type_ && c.status == self.status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        Condition {
            type_: self.type_.to_string(),
            status: self.status.to_string(),
            reason: self.reason.to_string(),
            message: self.message,
            observed_generation: generation,
            last_transition_time,
        }
    }
}

fn ready_condition(
    observation: &Observation,
    ctx: &StatusContext<'_>,
    endpoints: &[EndpointStatus],
    total: usize,
    ready: usize,
    fail_open: FailOpen,
) -> Candidate {
    let service = format!("Service {}/{}", ctx.namespace, ctx.service);
    let not_ready = |reason: &'static str, message: String| Candidate {
        type_: condition::READY,
        status: "False",
        reason,
        message,
    };
    match observation {
        Observation::InvalidSpec(why) => not_ready(reason::INVALID_SPEC, why.clone()),
        Observation::TlsUnavailable(why) => not_ready(reason::TLS_UNAVAILABLE, why.clone()),
        Observation::ServiceNotFound => not_ready(reason::SERVICE_NOT_FOUND, format!("{service} not found")),
        Observation::PortNotFound(missing) => not_ready(reason::PORT_NOT_FOUND, format!("{service}: {missing}")),
        Observation::Endpoints(_) if total == 0 => not_ready(
            reason::NO_ENDPOINTS,
            format!("{service} has no endpoints on port {}", ctx.port),
        ),
        Observation::Endpoints(_) if ready == 0 => not_ready(
            reason::NO_READY_ENDPOINTS,
            format!(
                "none of the {total} endpoints can take requests: {}",
                breakdown(endpoints)
            ),
        ),
        Observation::Endpoints(_) if fail_open.is_failing_open() => Candidate {
            type_: condition::READY,
            status: "True",
            reason: reason::FAILING_OPEN,
            message: format!(
                "{ready} of {total} endpoints take requests, failing open: the health checks are not trusted \
                 (see the FailingOpen condition)"
            ),
        },
        Observation::Endpoints(_) => Candidate {
            type_: condition::READY,
            status: "True",
            reason: reason::AVAILABLE,
            message: format!("{ready} of {total} endpoints ready"),
        },
    }
}

fn failing_open_condition(fail_open: FailOpen) -> Candidate {
    let failing = |reason: &'static str, message: String| Candidate {
        type_: condition::FAILING_OPEN,
        status: "True",
        reason,
        message,
    };
    match fail_open {
        FailOpen::No => Candidate {
            type_: condition::FAILING_OPEN,
            status: "False",
            reason: reason::CHECKS_TRUSTED,
            message: String::new(),
        },
        FailOpen::ProbesFailingToConnect { candidates } => failing(
            reason::PROBES_FAILING_TO_CONNECT,
            format!(
                "the operator's probes fail at connect time for all {candidates} Kubernetes-ready endpoints: its \
                 network path to them may be blocked (a NetworkPolicy?); clients use all {candidates}"
            ),
        ),
        FailOpen::NonePassing { candidates } => failing(
            reason::NONE_PASSING,
            format!(
                "none of the {candidates} Kubernetes-ready endpoints passes its health check; clients use all \
                 {candidates} rather than none"
            ),
        ),
        FailOpen::BelowThreshold {
            passing,
            candidates,
            threshold,
        } => failing(
            reason::BELOW_PANIC_THRESHOLD,
            format!(
                "{passing} of {candidates} Kubernetes-ready endpoints pass their health checks, below the panic \
                 threshold of {threshold}%; clients use all {candidates}"
            ),
        ),
    }
}

/// Why endpoints are not usable, counted: "2 NotServing, 1 Terminating".
fn breakdown(endpoints: &[EndpointStatus]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut add = |label: &'static str| match counts.iter_mut().find(|(l, _)| *l == label) {
        Some((_, n)) => *n += 1,
        None => counts.push((label, 1)),
    };
    for endpoint in endpoints {
        if endpoint.terminating {
            add("Terminating");
        } else if !endpoint.serving {
            add("not serving in Kubernetes");
        } else if endpoint.health == Health::NotServing {
            add("NotServing");
        } else if endpoint.health == Health::Unknown {
            add("Unknown");
        }
    }
    counts
        .iter()
        .map(|(label, n)| format!("{n} {label}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn degraded_condition(total: usize, connect_failing: usize) -> Candidate {
    // One failing endpoint says little about the operator's network; all of several do.
    if total >= 2 && connect_failing == total {
        Candidate {
            type_: condition::DEGRADED,
            status: "True",
            reason: reason::ALL_PROBES_FAILING,
            message: format!(
                "all {total} endpoints fail health probes at connect time: the operator's network path to them \
                 may be blocked (a NetworkPolicy?)"
            ),
        }
    } else {
        Candidate {
            type_: condition::DEGRADED,
            status: "False",
            reason: reason::PROBES_CONNECTING,
            message: String::new(),
        }
    }
}

/// A change worth an Event on the GrpcBackend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// How many endpoint changes one Event names before it says "and N more".
const NAMED_CHANGES: usize = 5;

/// The Events a status change deserves: the Ready condition's reason, the Degraded condition,
/// and endpoints whose health changed.
pub fn notices(previous: Option<&GrpcBackendStatus>, next: &GrpcBackendStatus) -> Vec<Notice> {
    let mut notices = Vec::new();
    let reason_of = |status: Option<&GrpcBackendStatus>, type_: &str| {
        status
            .and_then(|s| s.condition(type_))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    // Failing open has an Event of its own, with the reason (below): not a second one here.
    if let Some(ready) = next.condition(condition::READY)
        && reason_of(previous, condition::READY) != Some((ready.status.clone(), ready.reason.clone()))
        && ready.reason != reason::FAILING_OPEN
    {
        notices.push(Notice {
            warning: ready.status != "True",
            reason: ready.reason.clone(),
            note: ready.message.clone(),
        });
    }
    for type_ in [condition::DEGRADED, condition::FAILING_OPEN] {
        let Some(now) = next.condition(type_) else { continue };
        let before = reason_of(previous, type_).map(|(status, _)| status);
        if now.status == "True" && before.as_deref() != Some("True") {
            notices.push(Notice {
                warning: true,
                reason: now.reason.clone(),
                note: now.message.clone(),
            });
        }
    }
    let before: HashMap<(&str, i32), Health> = previous
        .map(|p| {
            p.endpoints
                .iter()
                .map(|e| ((e.address.as_str(), e.port), e.health))
                .collect()
        })
        .unwrap_or_default();
    let mut changes: HashMap<Health, Vec<String>> = HashMap::new();
    for endpoint in &next.endpoints {
        match before.get(&(endpoint.address.as_str(), endpoint.port)) {
            Some(health) if *health == endpoint.health => {}
            None if endpoint.health == Health::Unknown => {}
            _ => changes
                .entry(endpoint.health)
                .or_default()
                .push(display_endpoint(&endpoint.address, endpoint.port)),
        }
    }
    for health in [Health::NotServing, Health::Serving] {
        if let Some(addresses) = changes.get(&health) {
            let named: Vec<&str> = addresses.iter().take(NAMED_CHANGES).map(String::as_str).collect();
            let more = addresses.len().saturating_sub(NAMED_CHANGES);
            let suffix = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            notices.push(Notice {
                warning: health == Health::NotServing,
                reason: format!("Endpoint{health}"),
                note: format!("{health}: {}{suffix}", named.join(", ")),
            });
        }
    }
    notices
}

/// `10.0.0.1:80`, `[fd00::1]:80`.
pub fn display_endpoint(address: &str, port: i32) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

#[cfg(test)]
mod tests;
