//! The key of a namespaced object: its namespace and name, shown as `namespace/name`.
//!
//! One type for every kind the operator keeps track of (GrpcBackends, Services, Pods): its
//! indexes, probers, write records, errors and logs all name objects this way. kube's
//! `ObjectRef` carries the kind too and shows it (`GrpcBackend.v1alpha1.kubegrpc.io/name.ns`);
//! it is built from a key only where kube-runtime asks for one ([`ObjectKey::object_ref`]).

use std::fmt;

use kube::{Resource, ResourceExt, runtime::reflector::ObjectRef};

/// A namespaced object, by namespace and name; the kind is the holder's to say.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `object`.
    pub fn of<K: Resource>(object: &K) -> Self {
        Self {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        }
    }

    /// The object of kind `K` this key names, as kube-runtime refers to it.
    pub fn object_ref<K>(&self) -> ObjectRef<K>
    where
        K: Resource,
        K::DynamicType: Default,
    {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    #[test]
    fn a_key_shows_as_namespace_slash_name_and_names_the_same_object_as_kube_does() {
        let mut service = Service::default();
        service.metadata.name = Some("echo".into());
        service.metadata.namespace = Some("ns".into());
        let key = ObjectKey::of(&service);
        assert_eq!(key, ObjectKey::new("ns", "echo"));
        assert_eq!(key.to_string(), "ns/echo");
        assert_eq!(key.object_ref::<Service>(), ObjectRef::from_obj(&service));
    }
}
