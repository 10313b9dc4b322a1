//! `spec.tls` turned into what the probers connect with: the server name, the roots (a CA
//! bundle read from a ConfigMap, or the system's) and the operator's client identity.
//!
//! The ConfigMap is read with a GET when a reconcile needs it and at most once a
//! [`CA_BUNDLE_REFRESH`] after that (a GrpcBackend with a CA bundle is reconciled that often),
//! not watched: a cluster-wide ConfigMap watch would cache every ConfigMap of the cluster for a
//! handful of bundles. A rotated bundle (cert-manager's trust-manager rewrites it) is therefore
//! in use within a refresh; a changed bundle restarts the GrpcBackend's probers, as any change
//! of their settings does.
//!
//! Failing safe: once a bundle was read, a ConfigMap that goes missing or turns invalid keeps
//! the last good bundle in use (with a Warning Event saying why) rather than taking every
//! endpoint out of the status; only a GrpcBackend that never had a usable bundle reports
//! `Ready=False TlsUnavailable`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use kubegrpc_crds::GrpcBackendSpec;
use tokio::time::Instant;

use crate::{
    health::tls::{ClientIdentity, ProbeTls},
    key::ObjectKey,
};

/// How long a CA bundle read from a ConfigMap is used before it is read again.
pub(super) const CA_BUNDLE_REFRESH: Duration = Duration::from_secs(60);

/// What a reconcile connects with.
#[derive(Debug)]
pub(super) enum Resolved {
    /// No `spec.tls`.
    Plaintext,
    Tls(ProbeTls),
    /// The bundle cannot be read now (why); the last good one stays in use.
    Stale(ProbeTls, String),
    /// No usable TLS settings (why): the endpoints cannot be probed.
    Unavailable(String),
}

/// The TLS settings of every GrpcBackend with `spec.tls`, by GrpcBackend.
pub(super) struct TlsSettings {
    client: Client,
    identity: Option<Arc<ClientIdentity>>,
    cache: Mutex<HashMap<ObjectKey, Cached>>,
}

struct Cached {
    /// What the settings were built from: the server name and the bundle's reference.
    source: (String, Option<(String, String)>),
    tls: ProbeTls,
    /// The ConfigMap's resourceVersion the bundle came from.
    version: Option<String>,
    read_at: Instant,
    /// The latest failure to read it again, already reported.
    failing: Option<String>,
}

impl TlsSettings {
    pub(super) fn new(client: Client, identity: Option<Arc<ClientIdentity>>) -> Self {
        Self {
            client,
            identity,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The GrpcBackend is gone.
    pub(super) fn forget(&self, key: &ObjectKey) {
        self.cache().remove(key);
    }

    /// What `spec` (of the GrpcBackend `key`) connects with; whether a failure is new (to be
    /// reported once by an Event).
    pub(super) async fn resolve(&self, key: &ObjectKey, spec: &GrpcBackendSpec) -> (Resolved, bool) {
        let (Some(tls), Some(server_name)) = (&spec.tls, spec.tls_server_name(&key.namespace)) else {
            self.forget(key);
            return (Resolved::Plaintext, false);
        };
        let bundle = tls
            .ca_bundle
            .as_ref()
            .map(|bundle| (bundle.config_map.clone(), bundle.key.clone()));
        let source = (server_name.clone(), bundle.clone());
        if let Some(cached) = self.cache().get(key).filter(|c| c.source == source)
            && (bundle.is_none() || cached.read_at.elapsed() < CA_BUNDLE_REFRESH)
        {
            return (Resolved::Tls(cached.tls.clone()), false);
        }
        let Some((config_map, data_key)) = bundle else {
            return match ProbeTls::new(&server_name, None, self.identity.clone()) {
                Ok(tls) => {
                    self.keep(key, source, tls.clone(), None);
                    (Resolved::Tls(tls), false)
                }
                Err(why) => (Resolved::Unavailable(why), false),
            };
        };
        let read = self.read_bundle(&key.namespace, &config_map, &data_key).await;
        let mut cache = self.cache();
        let cached = cache.get_mut(key).filter(|c| c.source == source);
        match (read, cached) {
            (Ok((version, _)), Some(cached)) if cached.version == version => {
                cached.read_at = Instant::now();
                cached.failing = None;
                (Resolved::Tls(cached.tls.clone()), false)
            }
            (Ok((version, pem)), cached) => {
                match ProbeTls::new(&server_name, Some(pem.into()), self.identity.clone()) {
                    Ok(tls) => {
                        drop(cache);
                        self.keep(key, source, tls.clone(), version);
                        (Resolved::Tls(tls), false)
                    }
                    Err(why) => {
                        let why = format!("ConfigMap {config_map} key {data_key}: {why}");
                        stale_or_unavailable(cached, why)
                    }
                }
            }
            (Err(why), cached) => stale_or_unavailable(cached, why),
        }
    }

    /// The ConfigMap's resourceVersion and the bundle's PEM, or why they cannot be had.
    async fn read_bundle(
        &self,
        namespace: &str,
        name: &str,
        data_key: &str,
    ) -> Result<(Option<String>, String), String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let config_map = match api.get_opt(name).await {
            Ok(Some(config_map)) => config_map,
            Ok(None) => return Err(format!("ConfigMap {name} (spec.tls.caBundle) not found")),
            Err(error) => return Err(format!("ConfigMap {name} (spec.tls.caBundle) cannot be read: {error}")),
        };
        let pem = config_map
            .data
            .as_ref()
            .and_then(|data| data.get(data_key))
            .ok_or_else(|| format!("ConfigMap {name} has no key {data_key} (spec.tls.caBundle.key)"))?;
        Ok((config_map.metadata.resource_version, pem.clone()))
    }

    fn keep(
        &self,
        key: &ObjectKey,
        source: (String, Option<(String, String)>),
        tls: ProbeTls,
        version: Option<String>,
    ) {
        self.cache().insert(
            key.clone(),
            Cached {
                source,
                tls,
                version,
                read_at: Instant::now(),
                failing: None,
            },
        );
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Cached>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A failure to read the bundle again keeps the last good one; without one, none is usable.
/// A stale bundle is read again at the next refresh, not at every reconcile.
fn stale_or_unavailable(cached: Option<&mut Cached>, why: String) -> (Resolved, bool) {
    match cached {
        Some(cached) => {
            cached.read_at = Instant::now();
            let new = cached.failing.as_ref() != Some(&why);
            cached.failing = Some(why.clone());
            (Resolved::Stale(cached.tls.clone(), why), new)
        }
        None => (Resolved::Unavailable(why), false),
    }
}
