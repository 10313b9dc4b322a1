//! What the reconciler sees of one GrpcBackend: its Service and endpoints from the watches'
//! views, its probers synced to those endpoints and their verdicts, the weights its policy
//! gives them. The desired status is computed from this by [`crate::status`].

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::ObjectRef;
use kubegrpc_crds::{FULL_WEIGHT, GrpcBackend, GrpcBackendSpec, Health, WEIGHT_ANNOTATION, WeightingPolicy};
use tokio::time::Instant;
use tracing::debug;

use super::{Context, tls::Resolved};
use crate::{
    discovery,
    health::{prober::ProbeState, tracker::HealthVerdict},
    key::ObjectKey,
    pods::PodWeights,
    spec,
    status::{Notice, Observation, ProbedEndpoint},
    weights::{self, EndpointFacts, Policy},
};

/// Beyond the probe timeout, how long a write waits for a new endpoint's first probe.
const FIRST_PROBE_MARGIN: Duration = Duration::from_millis(100);

/// What the reconciler sees for one GrpcBackend, its probers synced to it.
pub(super) struct Observed {
    pub observation: Observation,
    /// Endpoints new to the status still await their first probe: wait this long at most.
    pub first_probes_due: Option<Duration>,
    /// The weights may change by themselves (new load reports, a blackout ending, a weight
    /// expiring): look again after this long.
    pub weights_change_in: Option<Duration>,
    /// Events to publish (a bad weight annotation).
    pub notices: Vec<Notice>,
    /// The weights need the Pods' annotations, and the Pod watch has not listed them all yet:
    /// the watch triggers a reconcile once it has.
    pub awaiting_pods: bool,
}

impl Observed {
    fn only(observation: Observation) -> Self {
        Self {
            observation,
            first_probes_due: None,
            weights_change_in: None,
            notices: Vec::new(),
            awaiting_pods: false,
        }
    }
}

/// Looks at `backend` (named `key`) through `context`'s views, and syncs its probers.
pub(super) fn observe(backend: &GrpcBackend, key: &ObjectKey, context: &Context, tls: Resolved) -> Observed {
    let checked =
        spec::probe_settings(&backend.spec).and_then(|settings| Ok((settings, weighting_policy(&backend.spec)?)));
    // Started now, the Pod watch may have listed the Pods by the time the Service has
    // endpoints.
    context.pods.set_user(key, matches!(checked, Ok((_, Policy::Static))));
    let (mut settings, policy) = match checked {
        Ok(checked) => checked,
        Err(why) => return Observed::only(Observation::InvalidSpec(why)),
    };
    settings.tls = match tls {
        Resolved::Plaintext => None,
        Resolved::Tls(tls) | Resolved::Stale(tls, _) => Some(tls),
        Resolved::Unavailable(why) => return Observed::only(Observation::TlsUnavailable(why)),
    };
    let service_ref = ObjectRef::<Service>::new(&backend.spec.service).within(&key.namespace);
    let Some(service) = context.services.get(&service_ref) else {
        return Observed::only(Observation::ServiceNotFound);
    };
    let port = match discovery::resolve_port(&backend.spec.port, &service) {
        Ok(port) => port,
        Err(missing) => return Observed::only(Observation::PortNotFound(missing)),
    };
    let slices = context
        .slices
        .of_service(&ObjectKey::new(&key.namespace, &backend.spec.service));
    let set = discovery::endpoints_from_slices(slices.iter().map(std::convert::AsRef::as_ref), &port);
    for skipped in &set.skipped {
        debug!(slice = %skipped.slice, address = %skipped.address, why = skipped.why, "endpoint skipped");
    }

    let published = published_endpoints(backend);
    let targets: Vec<SocketAddr> = set.endpoints.iter().map(|e| e.address).collect();
    let states: HashMap<SocketAddr, ProbeState> = context.probers.sync(key, &settings, &targets, |target| {
        published.get(&target).map_or(
            HealthVerdict {
                health: Health::Unknown,
                reason: None,
            },
            |(verdict, _)| verdict.clone(),
        )
    });
    let first_probes_due = states
        .iter()
        .filter(|(target, state)| !state.probed && !published.contains_key(target))
        .map(|(_, state)| {
            (state.started + settings.timeout + FIRST_PROBE_MARGIN).saturating_duration_since(Instant::now())
        })
        .filter(|wait| !wait.is_zero())
        .max();
    let mut probed: Vec<(ProbedEndpoint, &ProbeState)> = set
        .endpoints
        .into_iter()
        .filter_map(|endpoint| {
            let state = states.get(&endpoint.address)?;
            let probed = ProbedEndpoint {
                endpoint,
                verdict: state.verdict.clone(),
                connect_failing: state.connect_failing,
                weight: FULL_WEIGHT,
            };
            Some((probed, state))
        })
        .collect();

    let mut pods_notice = None;
    let pods = match policy {
        Policy::Static if probed.iter().any(|(probed, _)| probed.endpoint.pod.is_some()) => {
            match context.pods.weights() {
                Some(pods) => Some(pods),
                // The Pods cannot be listed: the default weight rather than no status at all;
                // the watch's first list, whenever it comes, triggers the real weights.
                None if let Some((why, first)) = context.pods.unavailable(key) => {
                    pods_notice = first.then(|| Notice {
                        warning: true,
                        reason: "PodAnnotationsUnavailable".into(),
                        note: format!(
                            "the Pods' {WEIGHT_ANNOTATION} annotations cannot be read ({why}); every endpoint gets \
                             the default weight {FULL_WEIGHT} until they can"
                        ),
                    });
                    None
                }
                None => {
                    return Observed {
                        first_probes_due,
                        awaiting_pods: true,
                        ..Observed::only(Observation::Endpoints(Vec::new()))
                    };
                }
            }
        }
        _ => None,
    };
    let (weights_change_in, mut notices) =
        apply_weights(&policy, &mut probed, &published, pods.as_deref(), key, context);
    notices.extend(pods_notice);
    Observed {
        observation: Observation::Endpoints(probed.into_iter().map(|(endpoint, _)| endpoint).collect()),
        first_probes_due,
        weights_change_in,
        notices,
        awaiting_pods: false,
    }
}

/// Sets the weights `policy` gives the `probed` endpoints, reading the annotations of the
/// Pods behind them in `pods`; returns when the weights may change by themselves, and the
/// Events for bad weight annotations not reported before.
fn apply_weights(
    policy: &Policy,
    probed: &mut [(ProbedEndpoint, &ProbeState)],
    published: &HashMap<SocketAddr, (HealthVerdict, u32)>,
    pods: Option<&PodWeights>,
    key: &ObjectKey,
    context: &Context,
) -> (Option<Duration>, Vec<Notice>) {
    if let Some(pods) = pods {
        // Reported values whose Pod is gone or changed its annotation are forgotten here,
        // before new ones are added: the set never holds more than the annotated Pods.
        pods.retain_carried(&mut context.bad_annotations());
    }
    let pod_of = |endpoint: &ProbedEndpoint| {
        let pod = endpoint.endpoint.pod.as_ref()?;
        Some(ObjectKey::new(&key.namespace, pod))
    };
    let facts: Vec<EndpointFacts> = probed
        .iter()
        .map(|(endpoint, state)| EndpointFacts {
            usable: endpoint.endpoint.kubernetes_ready() && endpoint.verdict.health == Health::Serving,
            annotation: pods.zip(pod_of(endpoint)).and_then(|(pods, pod)| pods.annotation(&pod)),
            load: state.load,
            prober_started: state.started,
            published: published.get(&endpoint.endpoint.address).map(|(_, weight)| *weight),
        })
        .collect();
    let weighed = weights::weigh(policy, &facts, Instant::now());
    let mut notices = Vec::new();
    for (index, why) in weighed.invalid_annotations {
        let Some(pod) = pod_of(&probed[index].0) else { continue };
        let value = facts[index].annotation.clone().unwrap_or_default();
        if context.bad_annotations().insert((pod.clone(), value)) {
            notices.push(Notice {
                warning: true,
                reason: "InvalidWeightAnnotation".into(),
                note: format!(
                    "Pod {}: {WEIGHT_ANNOTATION} {why}; the endpoint gets the default weight {FULL_WEIGHT}",
                    pod.name
                ),
            });
        }
    }
    for ((endpoint, _), weight) in probed.iter_mut().zip(weighed.weights) {
        endpoint.weight = weight;
    }
    (weighed.change_in, notices)
}

/// The endpoints the status lists now, with their health and weight.
fn published_endpoints(backend: &GrpcBackend) -> HashMap<SocketAddr, (HealthVerdict, u32)> {
    backend
        .status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            let ip = e.address.parse().ok()?;
            let port = u16::try_from(e.port).ok()?;
            let verdict = HealthVerdict {
                health: e.health,
                reason: e.reason.clone(),
            };
            Some((SocketAddr::new(ip, port), (verdict, e.weight)))
        })
        .collect()
}

/// The spec's weighting policy with its settings.
fn weighting_policy(spec: &GrpcBackendSpec) -> Result<Policy, String> {
    Ok(match spec.weighting.policy {
        WeightingPolicy::Equal => Policy::Equal,
        WeightingPolicy::Static => Policy::Static,
        WeightingPolicy::LoadReport => Policy::LoadReport {
            settings: spec::load_settings(spec)?,
            report_interval: spec.weighting.load_report().report_interval(),
        },
    })
}
