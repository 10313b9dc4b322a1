//! From GRPCRoutes to what is published: a GrpcBackend's routing table (`status.routes`) and a
//! route's status for each parent kubegrpc acts on. Pure functions over a [`Lookup`] of the
//! cluster's objects, so that every rule of the specification is tested without an apiserver.
//!
//! Decisions (README "Traffic policy" explains them to users):
//! - A route attaches to a GrpcBackend through a parentRef `{group: "", kind: Service}` naming
//!   the GrpcBackend's Service in the GrpcBackend's namespace (and, when the parentRef has a
//!   port, the Service port the GrpcBackend balances). kubegrpc acts on (and writes status for)
//!   the parentRefs naming a Service some GrpcBackend balances; others belong to someone else.
//! - Producer routes only: a route in another namespace than its parent Service (a GAMMA
//!   consumer route) would apply to that namespace's clients alone, which a status every
//!   client reads cannot express: `Accepted=False, UnsupportedValue`.
//! - A backendRef is a Service port that a GrpcBackend balances: the GrpcBackend carries the
//!   health check, TLS and weighting of those endpoints, which differ per Deployment, so the
//!   operator does not invent one. A Service without one is `ResolvedRefs=False,
//!   BackendNotFound` with a message saying what to create.
//! - An invalid backendRef is left out and the rule's other backends take its share (the
//!   issue's fail-safe choice; the specification would fail that share with UNAVAILABLE). A
//!   rule with no valid backend fails its calls with UNAVAILABLE, as specified.
//! - Filters: the proxyless clients apply none yet. A rule with a filter is left out, and the
//!   route says so (`PartiallyInvalid=True`, or `Accepted=False` when no rule is left), rather
//!   than routing as if the filter were not there.

use std::{cmp::Reverse, collections::BTreeSet, fmt::Write as _, sync::Arc};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp};
use kube::ResourceExt;
use kubegrpc_crds::{
    GrpcBackend, PortRef,
    gateway::{
        CONTROLLER_NAME, GRPCRoute, GrpcBackendRef, GrpcRouteMatch, GrpcRouteStatus, ParentReference, ReferenceGrant,
        RouteParentStatus,
    },
    routes::{HeaderMatch, MAX_ROUTE_ENTRIES, MatchType, MethodMatch, RouteBackend, RouteEntry},
};

use super::policy;
use crate::{discovery::resolve_port, key::ObjectKey};

/// The route condition saying that a timeout or retry annotation could not be read.
pub const POLICY_CONDITION: &str = "kubegrpc.io/PolicyValid";

/// The longest regular expression kept (the compiled program is bounded too, see
/// [`valid_pattern`]).
const MAX_PATTERN_BYTES: usize = 4096;
/// The compiled size of one pattern, so that a route cannot make clients hold megabytes.
const MAX_COMPILED_PATTERN_BYTES: usize = 256 * 1024;
/// The problems listed in one condition message; more are counted.
const MAX_LISTED_PROBLEMS: usize = 8;

/// What the resolver reads of the cluster.
pub trait Lookup {
    /// The Service `key`, if it exists.
    fn service(&self, key: &ObjectKey) -> Option<Arc<Service>>;
    /// The readable GrpcBackends naming the Service `service` (in its namespace).
    fn backends_of_service(&self, service: &ObjectKey) -> Vec<Balancer>;
    /// The ReferenceGrants of `namespace`.
    fn grants_in(&self, namespace: &str) -> Vec<Arc<ReferenceGrant>>;
}

/// A GrpcBackend as the resolver sees it: what it balances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balancer {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub port: PortRef,
}

impl Balancer {
    pub fn of(backend: &GrpcBackend) -> Self {
        Self {
            namespace: backend.namespace().unwrap_or_default(),
            name: backend.name_any(),
            service: backend.spec.service.clone(),
            port: backend.spec.port.clone(),
        }
    }
}

/// A parentRef of a route that names a Service, with that Service's key.
fn service_parent(route: &GRPCRoute, parent: &ParentReference) -> Option<ObjectKey> {
    parent.is_service().then(|| {
        let namespace = parent
            .namespace
            .clone()
            .unwrap_or_else(|| route.namespace().unwrap_or_default());
        ObjectKey::new(namespace, parent.name.clone())
    })
}

/// The Service port number a GrpcBackend balances, when its Service has that port.
fn balanced_port(backend: &Balancer, service: Option<&Service>) -> Option<i32> {
    match (&backend.port, service) {
        (_, Some(service)) => resolve_port(&backend.port, service).ok().map(|p| p.port),
        (PortRef::Number(number), None) => Some(*number),
        (PortRef::Name(_), None) => None,
    }
}

/// Whether `parent` (a parentRef of `route`) attaches the route to the GrpcBackend `backend`.
fn attaches_to(route: &GRPCRoute, parent: &ParentReference, backend: &Balancer, lookup: &dyn Lookup) -> bool {
    let Some(service) = service_parent(route, parent) else {
        return false;
    };
    if service.name != backend.service || service.namespace != backend.namespace {
        return false;
    }
    match parent.port {
        None => true,
        Some(port) => balanced_port(backend, lookup.service(&service).as_deref()) == Some(port),
    }
}

/// One rule as resolved: its matches and the backends that are valid.
#[derive(Clone, Debug, PartialEq)]
struct ResolvedRule {
    index: u32,
    matches: Vec<(Option<MethodMatch>, Vec<HeaderMatch>)>,
    backends: Vec<(ObjectKey, u32)>,
}

/// What resolving a route found, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
struct Findings {
    /// Rules left out, and why.
    dropped_rules: Vec<String>,
    /// The first invalid backendRef's reason (`BackendNotFound`, `RefNotPermitted`, ...).
    refs_reason: Option<&'static str>,
    /// Every invalid backendRef, why.
    refs_problems: Vec<String>,
}

/// Resolves every rule of `route` (the rules that are kept, and what was found wrong).
fn resolve_rules(route: &GRPCRoute, lookup: &dyn Lookup) -> (Vec<ResolvedRule>, Findings) {
    let route_namespace = route.namespace().unwrap_or_default();
    let mut findings = Findings::default();
    let mut rules = Vec::new();
    for (index, rule) in route.spec.rules.iter().enumerate().take(16) {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let mut filters: Vec<&str> = rule.filters.iter().map(|f| f.type_.as_str()).collect();
        filters.extend(
            rule.backend_refs
                .iter()
                .flat_map(|b| b.filters.iter().map(|f| f.type_.as_str())),
        );
        if !filters.is_empty() {
            filters.sort_unstable();
            filters.dedup();
            findings.dropped_rules.push(format!(
                "rule {index}: filter {} is not supported by proxyless clients",
                filters.join(", ")
            ));
            continue;
        }
        let matches: Result<Vec<_>, String> = if rule.matches.is_empty() {
            Ok(vec![(None, Vec::new())])
        } else {
            rule.matches.iter().map(convert_match).collect()
        };
        let matches = match matches {
            Ok(matches) => matches,
            Err(why) => {
                findings.dropped_rules.push(format!("rule {index}: {why}"));
                continue;
            }
        };
        let mut backends = Vec::new();
        for backend_ref in rule.backend_refs.iter().take(16) {
            match resolve_backend(&route_namespace, backend_ref, lookup) {
                Ok(backend) => backends.push((backend, weight_of(backend_ref))),
                Err((reason, why)) => {
                    findings.refs_reason.get_or_insert(reason);
                    findings.refs_problems.push(format!("rule {index}: {why}"));
                }
            }
        }
        rules.push(ResolvedRule {
            index,
            matches,
            backends,
        });
    }
    (rules, findings)
}

fn weight_of(backend_ref: &GrpcBackendRef) -> u32 {
    u32::try_from(backend_ref.weight.unwrap_or(1).clamp(0, 1_000_000)).unwrap_or(0)
}

/// A GRPCRoute match as a table match; an invalid regular expression makes the rule invalid.
fn convert_match(m: &GrpcRouteMatch) -> Result<(Option<MethodMatch>, Vec<HeaderMatch>), String> {
    let method = match &m.method {
        None => None,
        Some(method) => {
            let match_type = match_type(method.type_.as_deref())?;
            for part in [&method.service, &method.method].into_iter().flatten() {
                if match_type == MatchType::RegularExpression {
                    valid_pattern(part)?;
                }
            }
            let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
            if empty(&method.service) && empty(&method.method) {
                None
            } else {
                Some(MethodMatch {
                    match_type,
                    service: method.service.clone().filter(|s| !s.is_empty()),
                    method: method.method.clone().filter(|s| !s.is_empty()),
                })
            }
        }
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for header in m.headers.iter().take(16) {
        let match_type = match_type(header.type_.as_deref())?;
        if match_type == MatchType::RegularExpression {
            valid_pattern(&header.value)?;
        }
        headers.push(HeaderMatch {
            match_type,
            name: header.name.to_ascii_lowercase(),
            value: header.value.clone(),
        });
    }
    Ok((method, headers))
}

fn match_type(given: Option<&str>) -> Result<MatchType, String> {
    match given.unwrap_or("Exact") {
        "Exact" => Ok(MatchType::Exact),
        "RegularExpression" => Ok(MatchType::RegularExpression),
        other => Err(format!("match type {other:?} is not supported")),
    }
}

/// Whether `pattern` is a regular expression every client can run: it compiles, anchored,
/// within a size bound.
pub fn valid_pattern(pattern: &str) -> Result<(), String> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!("a regular expression longer than {MAX_PATTERN_BYTES} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_COMPILED_PATTERN_BYTES)
        .build()
        .map(|_| ())
        .map_err(|error| format!("invalid regular expression {pattern:?}: {error}"))
}

/// The GrpcBackend a backendRef resolves to, or the reason and message of why none does.
fn resolve_backend(
    route_namespace: &str,
    backend_ref: &GrpcBackendRef,
    lookup: &dyn Lookup,
) -> Result<ObjectKey, (&'static str, String)> {
    let group = backend_ref.group.as_deref().unwrap_or("");
    let kind = backend_ref.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        let group = if group.is_empty() { "core" } else { group };
        return Err((
            "InvalidKind",
            format!(
                "backendRef {}: kind {kind} of group {group} is not supported (only Service)",
                backend_ref.name
            ),
        ));
    }
    let namespace = backend_ref.namespace.as_deref().unwrap_or(route_namespace);
    let service_key = ObjectKey::new(namespace, backend_ref.name.clone());
    if namespace != route_namespace {
        let granted = lookup
            .grants_in(namespace)
            .iter()
            .any(|grant| grant.spec.admits_route_to_service(route_namespace, &backend_ref.name));
        if !granted {
            return Err((
                "RefNotPermitted",
                format!(
                    "backendRef Service {service_key}: no ReferenceGrant in {namespace} admits GRPCRoutes of {route_namespace}"
                ),
            ));
        }
    }
    let Some(port) = backend_ref.port else {
        return Err((
            "UnsupportedValue",
            format!("backendRef Service {service_key}: a port is required"),
        ));
    };
    let Some(service) = lookup.service(&service_key) else {
        return Err(("BackendNotFound", format!("Service {service_key} not found")));
    };
    if resolve_port(&PortRef::Number(port), &service).is_err() {
        return Err((
            "BackendNotFound",
            format!("Service {service_key} has no TCP port {port}"),
        ));
    }
    let mut balancing: Vec<String> = lookup
        .backends_of_service(&service_key)
        .iter()
        .filter(|b| balanced_port(b, Some(&service)) == Some(port))
        .map(|b| b.name.clone())
        .collect();
    balancing.sort();
    match balancing.into_iter().next() {
        Some(name) => Ok(ObjectKey::new(namespace, name)),
        None => Err((
            "BackendNotFound",
            format!(
                "no GrpcBackend balances port {port} of Service {service_key}: create one (spec.service: {}, spec.port: {port}) so that its endpoints are health-checked",
                backend_ref.name
            ),
        )),
    }
}

/// The routing table of the GrpcBackend `backend`: every match of every rule of the routes
/// attached to it, in the specification's precedence order (longest service, then method,
/// then most headers; then the oldest route, then by namespace/name; then rule and match
/// order), at most [`MAX_ROUTE_ENTRIES`].
pub fn table_for(backend: &Balancer, routes: &[Arc<GRPCRoute>], lookup: &dyn Lookup) -> Vec<RouteEntry> {
    let table_namespace = backend.namespace.clone();
    let mut keyed = Vec::new();
    for route in routes {
        let attached = route
            .spec
            .parent_refs
            .iter()
            .any(|parent| attaches_to(route, parent, backend, lookup));
        if !attached || route.namespace().as_deref() != Some(table_namespace.as_str()) {
            continue;
        }
        let created = route
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Timestamp::MAX, |t| t.0);
        let route_name = format!("{}/{}", route.namespace().unwrap_or_default(), route.name_any());
        let (rules, _) = resolve_rules(route, lookup);
        let policy = policy::from_annotations(route.annotations());
        for rule in rules {
            let backends: Vec<RouteBackend> = rule
                .backends
                .iter()
                .map(|(key, weight)| RouteBackend {
                    name: key.name.clone(),
                    namespace: (key.namespace != table_namespace).then(|| key.namespace.clone()),
                    weight: *weight,
                })
                .collect();
            for (match_index, (method, headers)) in rule.matches.iter().enumerate() {
                let service_chars = method.as_ref().and_then(|m| m.service.as_ref()).map_or(0, String::len);
                let method_chars = method.as_ref().and_then(|m| m.method.as_ref()).map_or(0, String::len);
                let precedence = (
                    Reverse(service_chars),
                    Reverse(method_chars),
                    Reverse(headers.len()),
                    created,
                    route_name.clone(),
                    rule.index,
                    match_index,
                );
                let entry = RouteEntry {
                    route: route_name.clone(),
                    rule: rule.index,
                    method: method.clone(),
                    headers: headers.clone(),
                    backends: backends.clone(),
                    timeout: policy.timeout,
                    retry: policy.retry.clone(),
                };
                keyed.push((precedence, entry));
            }
        }
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed
        .into_iter()
        .take(MAX_ROUTE_ENTRIES)
        .map(|(_, entry)| entry)
        .collect()
}

/// The parentRefs of `route` that kubegrpc acts on: those naming a Service some GrpcBackend
/// balances.
pub fn our_parents(route: &GRPCRoute, lookup: &dyn Lookup) -> Vec<ParentReference> {
    route
        .spec
        .parent_refs
        .iter()
        .filter(|parent| {
            service_parent(route, parent).is_some_and(|service| !lookup.backends_of_service(&service).is_empty())
        })
        .cloned()
        .collect()
}

/// The Services `route` refers to as a parent or a backend, so that a change of one of them
/// (or of the GrpcBackends naming it) resolves the route again.
pub fn services_named(route: &GRPCRoute) -> BTreeSet<ObjectKey> {
    let namespace = route.namespace().unwrap_or_default();
    let parents = route.spec.parent_refs.iter().filter_map(|p| service_parent(route, p));
    let backends = route.spec.rules.iter().flat_map(|rule| {
        rule.backend_refs
            .iter()
            .map(|b| ObjectKey::new(b.namespace.clone().unwrap_or_else(|| namespace.clone()), b.name.clone()))
    });
    parents.chain(backends).collect()
}

/// The status `route` deserves: the entries of other controllers kept as they are, one entry
/// per parent kubegrpc acts on, with `Accepted`, `ResolvedRefs` and, when some rules are left
/// out, `PartiallyInvalid`. Transition times are kept from `current` while a condition holds.
pub fn route_status(route: &GRPCRoute, lookup: &dyn Lookup, now: Timestamp) -> GrpcRouteStatus {
    let current = route.status.clone().unwrap_or_default();
    let generation = route.metadata.generation;
    let route_namespace = route.namespace().unwrap_or_default();
    let (rules, findings) = resolve_rules(route, lookup);
    let policy = policy::from_annotations(route.annotations());
    let mut parents: Vec<RouteParentStatus> = current
        .parents
        .iter()
        .filter(|p| p.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();
    for parent in our_parents(route, lookup) {
        let service = service_parent(route, &parent).unwrap_or_else(|| ObjectKey::new("", ""));
        let backends = lookup.backends_of_service(&service);
        let accepted = if service.namespace != route_namespace {
            Err((
                "UnsupportedValue",
                format!(
                    "the route is in {route_namespace} and its parent Service in {}: kubegrpc supports producer routes only (a route in its Service's namespace)",
                    service.namespace
                ),
            ))
        } else if !backends.iter().any(|b| attaches_to(route, &parent, b, lookup)) {
            Err((
                "NoMatchingParent",
                format!(
                    "no GrpcBackend balances port {} of Service {service}",
                    parent.port.map_or_else(|| "-".into(), |p| p.to_string())
                ),
            ))
        } else if rules.is_empty() && !route.spec.rules.is_empty() {
            Err((
                "UnsupportedValue",
                format!("no rule can be applied: {}", listed(&findings.dropped_rules)),
            ))
        } else {
            Ok(format!(
                "attached to Service {service}: {} rule(s) published to its GrpcBackend(s)",
                rules.len()
            ))
        };
        let accepted_condition = match &accepted {
            Ok(message) => condition("Accepted", true, "Accepted", message),
            Err((reason, message)) => condition("Accepted", false, reason, message),
        };
        let resolved_condition = match findings.refs_reason {
            None => condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backendRef resolves to a GrpcBackend",
            ),
            Some(reason) => condition("ResolvedRefs", false, reason, &listed(&findings.refs_problems)),
        };
        let mut conditions = vec![accepted_condition, resolved_condition];
        if !policy.problems.is_empty() {
            conditions.push(condition(
                POLICY_CONDITION,
                false,
                "InvalidAnnotation",
                &format!("left out: {}", listed(&policy.problems)),
            ));
        }
        if accepted.is_ok() && !findings.dropped_rules.is_empty() {
            conditions.push(condition(
                "PartiallyInvalid",
                true,
                "UnsupportedValue",
                &format!("left out: {}", listed(&findings.dropped_rules)),
            ));
        }
        let previous = current
            .parents
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && p.parent_ref == parent)
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default();
        let conditions = conditions
            .into_iter()
            .map(|mut c| {
                c.observed_generation = generation;
                c.last_transition_time = previous
                    .iter()
                    .find(|old| old.type_ == c.type_ && old.status == c.status)
                    .map_or(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now), |old| {
                        old.last_transition_time.clone()
                    });
                c
            })
            .collect();
        parents.push(RouteParentStatus {
            parent_ref: parent,
            controller_name: CONTROLLER_NAME.into(),
            conditions,
        });
    }
    GrpcRouteStatus { parents }
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(32 * 1024).collect(),
        observed_generation: None,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
    }
}

/// Problems as one message: the first few, and how many more.
fn listed(problems: &[String]) -> String {
    let mut message = problems
        .iter()
        .take(MAX_LISTED_PROBLEMS)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_LISTED_PROBLEMS {
        let _ = write!(message, "; and {} more", problems.len() - MAX_LISTED_PROBLEMS);
    }
    message
}

#[cfg(test)]
mod tests;
