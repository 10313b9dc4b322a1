//! Objects grouped by the Service they belong to, kept in step with a watcher's events.
//!
//! kube-runtime's stores have no secondary index. The reconciler needs "the EndpointSlices of
//! Service X" and the watch mappers need "the GrpcBackends that name Service X"; scanning every
//! object of the cluster on each event would not scale, so both are kept here, keyed by Service.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use kube::{Resource, runtime::watcher::Event};

use crate::key::ObjectKey;

/// Objects of kind `K` grouped by Service.
pub struct ByService<K> {
    service_of: fn(&K) -> Option<String>,
    state: Mutex<State<K>>,
}

struct State<K> {
    groups: HashMap<ObjectKey, BTreeMap<String, Arc<K>>>,
    located: HashMap<ObjectKey, Option<ObjectKey>>,
    /// Objects listed since the last `Init`, applied at `InitDone`.
    relist: Option<Vec<Arc<K>>>,
}

impl<K: Resource> ByService<K> {
    /// `service_of` names the Service an object belongs to (in the object's namespace), or
    /// `None` for objects that belong to none.
    pub fn new(service_of: fn(&K) -> Option<String>) -> Self {
        Self {
            service_of,
            state: Mutex::new(State {
                groups: HashMap::new(),
                located: HashMap::new(),
                relist: None,
            }),
        }
    }

    /// Applies a watcher event; returns the objects that are gone (deleted, or missing from a
    /// relist because they were deleted while the watch was down).
    pub fn apply(&self, event: &Event<K>) -> Vec<ObjectKey>
    where
        K: Clone,
    {
        let mut state = self.lock();
        match event {
            Event::Apply(object) => {
                self.insert(&mut state, Arc::new(object.clone()));
                Vec::new()
            }
            Event::Delete(object) => {
                let key = ObjectKey::of(object);
                Self::remove(&mut state, &key);
                vec![key]
            }
            Event::Init => {
                state.relist = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                match &mut state.relist {
                    Some(buffer) => buffer.push(Arc::new(object.clone())),
                    None => self.insert(&mut state, Arc::new(object.clone())),
                }
                Vec::new()
            }
            Event::InitDone => {
                let listed = state.relist.take().unwrap_or_default();
                let present: HashSet<ObjectKey> = listed.iter().map(|o| ObjectKey::of(o.as_ref())).collect();
                let gone: Vec<ObjectKey> = state.located.keys().filter(|k| !present.contains(k)).cloned().collect();
                for key in &gone {
                    Self::remove(&mut state, key);
                }
                for object in listed {
                    self.insert(&mut state, object);
                }
                gone
            }
        }
    }

    /// The objects that belong to `service`, by name.
    pub fn of_service(&self, service: &ObjectKey) -> Vec<Arc<K>> {
        self.lock()
            .groups
            .get(service)
            .map(|group| group.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `key` is currently known.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.lock().located.contains_key(key)
    }

    fn insert(&self, state: &mut State<K>, object: Arc<K>) {
        let key = ObjectKey::of(object.as_ref());
        Self::remove(state, &key);
        let service = (self.service_of)(&object).map(|name| ObjectKey::new(&key.namespace, name));
        if let Some(service) = &service {
            state
                .groups
                .entry(service.clone())
                .or_default()
                .insert(key.name.clone(), object);
        }
        state.located.insert(key, service);
    }

    fn remove(state: &mut State<K>, key: &ObjectKey) {
        if let Some(Some(service)) = state.located.remove(key)
            && let Some(group) = state.groups.get_mut(&service)
        {
            group.remove(&key.name);
            if group.is_empty() {
                state.groups.remove(&service);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    use kube::ResourceExt;

    use super::*;

    /// ConfigMaps stand in for any object; `data.service` names their Service.
    fn object(name: &str, service: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: service.map(|s| [("service".to_string(), s.to_string())].into()),
            ..Default::default()
        }
    }

    fn index() -> ByService<ConfigMap> {
        ByService::new(|o| o.data.as_ref()?.get("service").cloned())
    }

    fn service(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    fn names(objects: Vec<Arc<ConfigMap>>) -> Vec<String> {
        objects.iter().map(|o| o.name_any()).collect()
    }

    #[test]
    fn objects_follow_their_service_across_updates_and_deletes() {
        let index = index();
        index.apply(&Event::Apply(object("a", Some("echo"))));
        index.apply(&Event::Apply(object("b", Some("echo"))));
        assert_eq!(names(index.of_service(&service("echo"))), ["a", "b"]);
        index.apply(&Event::Apply(object("a", Some("other"))));
        assert_eq!(names(index.of_service(&service("echo"))), ["b"]);
        assert_eq!(names(index.of_service(&service("other"))), ["a"]);
        let gone = index.apply(&Event::Delete(object("b", Some("echo"))));
        assert_eq!(gone[0].name, "b");
        assert!(index.of_service(&service("echo")).is_empty());
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let index = index();
        index.apply(&Event::Apply(object("a", Some("echo"))));
        index.apply(&Event::Apply(object("b", None)));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(object("c", Some("echo"))));
        // Until InitDone the old view stands.
        assert_eq!(names(index.of_service(&service("echo"))), ["a"]);
        let mut gone = index.apply(&Event::InitDone);
        gone.sort();
        assert_eq!(gone.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(names(index.of_service(&service("echo"))), ["c"]);
        assert!(!index.contains(&ObjectKey::new("ns", "b")));
    }
}
