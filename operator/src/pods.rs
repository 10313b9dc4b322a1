//! The `Static` policy's weights: the `kubegrpc.io/weight` annotation of the Pods behind
//! endpoints, followed by a metadata-only Pod watch (names and annotations, no spec or
//! status), kept only for Pods that carry the annotation. The watch runs only while a
//! GrpcBackend uses `Static` (see `controller::watches::PodWatch`).

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{core::PartialObjectMeta, runtime::watcher::Event};
use kubegrpc_crds::WEIGHT_ANNOTATION;

use crate::key::ObjectKey;

/// A bad annotation already reported by an Event: the Pod, and the value.
pub type ReportedValue = (ObjectKey, String);

/// The annotation of every annotated Pod.
#[derive(Default)]
pub struct PodWeights {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    annotations: HashMap<ObjectKey, String>,
    /// Annotations listed since the last `Init`, applied at `InitDone`.
    relist: Option<HashMap<ObjectKey, String>>,
}

impl PodWeights {
    /// The annotation of `pod`, if it carries one.
    pub fn annotation(&self, pod: &ObjectKey) -> Option<String> {
        self.lock().annotations.get(pod).cloned()
    }

    /// Forgets the reported values that their Pod no longer carries (it was deleted, or its
    /// annotation changed): what is left is at most one entry per annotated Pod, and a value
    /// set again later is reported again.
    pub fn retain_carried(&self, reported: &mut HashSet<ReportedValue>) {
        let state = self.lock();
        reported.retain(|(pod, value)| state.annotations.get(pod) == Some(value));
    }

    /// Applies a watch event; returns the namespaces where an annotation changed.
    pub fn apply(&self, event: &Event<PartialObjectMeta<Pod>>) -> HashSet<String> {
        let mut state = self.lock();
        let mut changed = HashSet::new();
        match event {
            Event::Apply(meta) => {
                if let Some((key, value)) = entry(&meta.metadata) {
                    set(&mut state.annotations, key, value, &mut changed);
                }
            }
            Event::Delete(meta) => {
                if let Some((key, _)) = entry(&meta.metadata)
                    && state.annotations.remove(&key).is_some()
                {
                    changed.insert(key.namespace);
                }
            }
            Event::Init => state.relist = Some(HashMap::new()),
            Event::InitApply(meta) => {
                if let Some((key, value)) = entry(&meta.metadata) {
                    match state.relist.as_mut() {
                        Some(relist) => {
                            if let Some(value) = value {
                                relist.insert(key, value);
                            }
                        }
                        None => set(&mut state.annotations, key, value, &mut changed),
                    }
                }
            }
            Event::InitDone => {
                let listed = state.relist.take().unwrap_or_default();
                for (key, value) in &state.annotations {
                    if listed.get(key) != Some(value) {
                        changed.insert(key.namespace.clone());
                    }
                }
                for key in listed.keys() {
                    if !state.annotations.contains_key(key) {
                        changed.insert(key.namespace.clone());
                    }
                }
                state.annotations = listed;
            }
        }
        changed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The Pod's key and its annotation (`None`: it carries none).
fn entry(meta: &ObjectMeta) -> Option<(ObjectKey, Option<String>)> {
    let key = ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?);
    let value = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHT_ANNOTATION))
        .cloned();
    Some((key, value))
}

fn set(
    annotations: &mut HashMap<ObjectKey, String>,
    key: ObjectKey,
    value: Option<String>,
    changed: &mut HashSet<String>,
) {
    let before = match &value {
        Some(value) => annotations.insert(key.clone(), value.clone()),
        None => annotations.remove(&key),
    };
    if before != value {
        changed.insert(key.namespace);
    }
}

/// Drops everything but the name, namespace and the weight annotation before caching.
pub fn trim(pod: &mut PartialObjectMeta<Pod>) {
    let meta = &mut pod.metadata;
    let weight = meta
        .annotations
        .take()
        .and_then(|mut a| a.remove_entry(WEIGHT_ANNOTATION));
    let (name, namespace) = (meta.name.take(), meta.namespace.take());
    *meta = ObjectMeta {
        name,
        namespace,
        annotations: weight.map(|(k, v)| [(k, v)].into()),
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    fn pod(name: &str, weight: Option<&str>) -> PartialObjectMeta<Pod> {
        PartialObjectMeta::<Pod> {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                annotations: weight.map(|w| {
                    [
                        (WEIGHT_ANNOTATION.to_string(), w.to_string()),
                        ("other".to_string(), "x".repeat(1000)),
                    ]
                    .into()
                }),
                labels: Some([("app".to_string(), "echo".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_of_the_annotation_report_a_namespace() {
        let weights = PodWeights::default();
        assert_eq!(
            weights.apply(&Event::Apply(pod("a", Some("3")))),
            HashSet::from(["ns".to_string()])
        );
        assert_eq!(weights.annotation(&pod_key("a")).as_deref(), Some("3"));
        assert!(
            weights.apply(&Event::Apply(pod("a", Some("3")))).is_empty(),
            "same value: nothing to do"
        );
        assert!(
            weights.apply(&Event::Apply(pod("b", None))).is_empty(),
            "no annotation before or after"
        );
        assert_eq!(
            weights.apply(&Event::Apply(pod("a", None))).len(),
            1,
            "annotation removed"
        );
        assert_eq!(weights.annotation(&pod_key("a")), None);
        weights.apply(&Event::Apply(pod("a", Some("1"))));
        assert_eq!(weights.apply(&Event::Delete(pod("a", Some("1")))).len(), 1);
        assert_eq!(weights.annotation(&pod_key("a")), None);
    }

    #[test]
    fn a_relist_forgets_pods_deleted_meanwhile_and_reports_what_changed() {
        let weights = PodWeights::default();
        weights.apply(&Event::Apply(pod("gone", Some("2"))));
        weights.apply(&Event::Apply(pod("kept", Some("2"))));
        weights.apply(&Event::Init);
        weights.apply(&Event::InitApply(pod("kept", Some("2"))));
        assert_eq!(
            weights.annotation(&pod_key("gone")).as_deref(),
            Some("2"),
            "applied at InitDone only"
        );
        assert_eq!(weights.apply(&Event::InitDone), HashSet::from(["ns".to_string()]));
        assert_eq!(weights.annotation(&pod_key("gone")), None);
        assert_eq!(weights.annotation(&pod_key("kept")).as_deref(), Some("2"));
        weights.apply(&Event::Init);
        weights.apply(&Event::InitApply(pod("kept", Some("2"))));
        assert!(weights.apply(&Event::InitDone).is_empty(), "nothing changed");
    }

    #[test]
    fn reported_values_are_forgotten_when_their_pod_no_longer_carries_them() {
        let weights = PodWeights::default();
        let reported_value = |name: &str, value: &str| (pod_key(name), value.to_string());
        let mut reported = HashSet::new();
        for (name, value) in [
            ("changed", "heavy"),
            ("deleted", "-1"),
            ("kept", "1.5"),
            ("relisted", "x"),
        ] {
            weights.apply(&Event::Apply(pod(name, Some(value))));
            reported.insert(reported_value(name, value));
        }
        // One Pod took many bad values in turn: only its current one may stay.
        for n in 0..1000 {
            reported.insert(reported_value("kept", &format!("bad{n}")));
        }
        weights.apply(&Event::Apply(pod("changed", Some("lighter"))));
        weights.apply(&Event::Delete(pod("deleted", Some("-1"))));
        weights.apply(&Event::Init);
        for name in ["changed", "deleted", "kept"] {
            if let Some(value) = weights.annotation(&pod_key(name)) {
                weights.apply(&Event::InitApply(pod(name, Some(&value))));
            }
        }
        weights.retain_carried(&mut reported);
        assert_eq!(
            reported.len(),
            2,
            "before InitDone the relisted Pod still counts: {reported:?}"
        );
        weights.apply(&Event::InitDone);
        weights.retain_carried(&mut reported);
        assert_eq!(reported, HashSet::from([reported_value("kept", "1.5")]));
    }

    #[test]
    fn trimming_keeps_the_name_namespace_and_weight_only() {
        let mut trimmed = pod("a", Some("3"));
        trim(&mut trimmed);
        assert_eq!(trimmed.metadata.labels, None);
        assert_eq!(
            trimmed
                .metadata
                .annotations
                .as_ref()
                .map(std::collections::BTreeMap::len),
            Some(1)
        );
        assert_eq!(entry(&trimmed.metadata), Some((pod_key("a"), Some("3".into()))));
    }
}
