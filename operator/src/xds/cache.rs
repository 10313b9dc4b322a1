//! What the xDS server serves: every GrpcBackend's four resources, versioned by content, and a
//! generation that moves only when some content changed (state-of-the-world clients get a push
//! then, and only then).
//!
//! Backends with an endpoint in its slow-start window are kept with their status and settings
//! so that [`XdsCache::refresh_ramps`] can recompute their stepped weights as time passes.
//!
//! Backends with a routing table are kept with it: their RouteConfiguration names only the
//! Clusters of GrpcBackends that exist and have a status ([`routes::route_configuration_served`];
//! one without a status is one the operator has not published endpoints for yet, whose Cluster
//! would fail every call routed to it), so it is made again whenever one comes or goes.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use kubegrpc_crds::{GrpcBackendStatus, routes::RouteEntry, slow_start::SlowStart};
use tokio::sync::watch;

use super::{
    resources::{self, BackendSettings, type_url},
    routes,
};

/// A resource and its version (a hash of its encoding: equal content, equal version).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub version: String,
    pub resource: Any,
}

/// The resources of every GrpcBackend; see the module docs.
pub struct XdsCache {
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    /// TLS Clusters name the client identity instance (mutual TLS to the backends).
    upstream_client_identity: bool,
}

#[derive(Default)]
struct State {
    synced: bool,
    /// type URL -> resource name -> resource.
    resources: HashMap<&'static str, HashMap<String, Versioned>>,
    /// Backends (namespace, name) listed since the last relist began.
    relist: Option<BTreeSet<(String, String)>>,
    /// Backends with an endpoint ramping, by resource name.
    ramping: HashMap<String, Ramping>,
    /// Backends with a routing table, by resource name.
    tables: HashMap<String, Vec<RouteEntry>>,
    /// Backends routes may name: those with a status, by resource name.
    routable: HashSet<String>,
}

struct Ramping {
    status: Option<GrpcBackendStatus>,
    settings: BackendSettings,
}

impl Default for XdsCache {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            generation: watch::channel(0).0,
            upstream_client_identity: false,
        }
    }
}

impl XdsCache {
    /// TLS Clusters also name [`resources::IDENTITY_INSTANCE`], the client certificate xDS
    /// clients present to backends that require one (mutual TLS). Off by default: a client
    /// whose bootstrap has no such instance would fail every TLS Cluster.
    #[must_use]
    pub fn with_upstream_client_identity(mut self, present: bool) -> Self {
        self.upstream_client_identity = present;
        self
    }

    /// Whether TLS Clusters name the client identity instance.
    pub fn upstream_client_identity(&self) -> bool {
        self.upstream_client_identity
    }

    /// Sets GrpcBackend `namespace/name`'s resources from its status and slow-start settings
    /// (plaintext backends, outlier detection's defaults).
    pub fn set_backend(&self, namespace: &str, name: &str, status: Option<&GrpcBackendStatus>, slow_start: SlowStart) {
        self.set_backend_at(namespace, name, status, slow_start, SystemTime::now());
    }

    /// [`XdsCache::set_backend`] at wall time `now`.
    pub fn set_backend_at(
        &self,
        namespace: &str,
        name: &str,
        status: Option<&GrpcBackendStatus>,
        slow_start: SlowStart,
        now: SystemTime,
    ) {
        let settings = BackendSettings {
            slow_start,
            ..BackendSettings::default()
        };
        self.set_backend_with(namespace, name, status, settings, now);
    }

    /// Sets GrpcBackend `namespace/name`'s resources from its status and its settings (slow
    /// start, TLS, outlier detection), at wall time `now`.
    pub fn set_backend_with(
        &self,
        namespace: &str,
        name: &str,
        status: Option<&GrpcBackendStatus>,
        settings: BackendSettings,
        now: SystemTime,
    ) {
        let resource_name = resources::resource_name(namespace, name);
        let mut state = self.lock();
        if let Some(relist) = state.relist.as_mut() {
            relist.insert((namespace.to_string(), name.to_string()));
        }
        let routable_changed = if status.is_some() {
            state.routable.insert(resource_name.clone())
        } else {
            state.routable.remove(&resource_name)
        };
        let mut changed = Self::store(&mut state, &resource_name, status, &settings, now);
        if routable_changed {
            changed |= Self::route_tables(&mut state);
        }
        if resources::ramping(status, &settings.slow_start, now) {
            let status = status.cloned();
            state
                .ramping
                .insert(resource_name.clone(), Ramping { status, settings });
        } else {
            state.ramping.remove(&resource_name);
        }
        if changed {
            self.bump(&state);
        }
    }

    /// Recomputes the resources of the backends that ramp, at wall time `now`; a backend whose
    /// ramps all ended gets its full weights and is not looked at again.
    pub fn refresh_ramps(&self, now: SystemTime) {
        let mut state = self.lock();
        let ramping = std::mem::take(&mut state.ramping);
        let mut changed = false;
        for (resource_name, ramp) in ramping {
            changed |= Self::store(&mut state, &resource_name, ramp.status.as_ref(), &ramp.settings, now);
            if resources::ramping(ramp.status.as_ref(), &ramp.settings.slow_start, now) {
                state.ramping.insert(resource_name, ramp);
            }
        }
        if changed {
            self.bump(&state);
        }
    }

    /// How soon [`XdsCache::refresh_ramps`] should run again: `None` while nothing ramps.
    pub fn ramp_tick(&self) -> Option<Duration> {
        self.lock().ramping.values().map(|r| r.settings.slow_start.tick()).min()
    }

    /// Stores a backend's resources; whether any changed.
    fn store(
        state: &mut State,
        resource_name: &str,
        status: Option<&GrpcBackendStatus>,
        settings: &BackendSettings,
        now: SystemTime,
    ) -> bool {
        let table = status.map_or(&[][..], |s| s.routes.as_slice());
        let mut changed = false;
        for (type_url, resource) in resources::backend_resources(resource_name, status, settings, now) {
            if type_url == type_url::ROUTE && !table.is_empty() {
                continue; // made below, from what is served
            }
            changed |= Self::put(state, type_url, resource_name, resource);
        }
        if table.is_empty() {
            state.tables.remove(resource_name);
        } else {
            state.tables.insert(resource_name.to_string(), table.to_vec());
            changed |= Self::route_table(state, resource_name);
        }
        changed
    }

    /// Stores one resource; whether it changed.
    fn put(state: &mut State, type_url: &'static str, resource_name: &str, resource: Any) -> bool {
        let versioned = Versioned {
            version: version_of(&resource),
            resource,
        };
        let entries = state.resources.entry(type_url).or_default();
        if entries.get(resource_name) == Some(&versioned) {
            return false;
        }
        entries.insert(resource_name.to_string(), versioned);
        true
    }

    /// Makes the RouteConfiguration of `resource_name`'s table from the backends routable now;
    /// whether it changed.
    fn route_table(state: &mut State, resource_name: &str) -> bool {
        let Some(table) = state.tables.get(resource_name) else {
            return false;
        };
        let route =
            routes::route_configuration_served(resource_name, table, |cluster| state.routable.contains(cluster));
        Self::put(state, type_url::ROUTE, resource_name, pack_any(route))
    }

    /// Makes every table's RouteConfiguration again (a backend became routable or stopped being);
    /// whether any changed.
    fn route_tables(state: &mut State) -> bool {
        let names: Vec<String> = state.tables.keys().cloned().collect();
        let mut changed = false;
        for name in names {
            changed |= Self::route_table(state, &name);
        }
        changed
    }

    /// GrpcBackend `namespace/name` is gone.
    pub fn remove_backend(&self, namespace: &str, name: &str) {
        let resource_name = resources::resource_name(namespace, name);
        let mut state = self.lock();
        let mut changed = false;
        state.ramping.remove(&resource_name);
        state.tables.remove(&resource_name);
        if state.routable.remove(&resource_name) {
            Self::route_tables(&mut state);
        }
        for entries in state.resources.values_mut() {
            changed |= entries.remove(&resource_name).is_some();
        }
        if changed {
            self.bump(&state);
        }
    }

    /// A relist begins: backends not set again before [`XdsCache::relist_done`] are removed.
    pub fn relist_started(&self) {
        self.lock().relist = Some(BTreeSet::new());
    }

    /// A relist ended: forgets the backends it did not list, and marks the cache synced (the
    /// server answers nothing before: in state-of-the-world xDS a missing resource means a
    /// deleted one).
    pub fn relist_done(&self) {
        let mut state = self.lock();
        let listed = state.relist.take().unwrap_or_default();
        let listed: BTreeSet<String> = listed
            .iter()
            .map(|(namespace, name)| resources::resource_name(namespace, name))
            .collect();
        let mut changed = !state.synced;
        for entries in state.resources.values_mut() {
            let before = entries.len();
            entries.retain(|name, _| listed.contains(name));
            changed |= entries.len() != before;
        }
        state.ramping.retain(|name, _| listed.contains(name));
        state.tables.retain(|name, _| listed.contains(name));
        state.routable.retain(|name| listed.contains(name));
        changed |= Self::route_tables(&mut state);
        state.synced = true;
        if changed {
            self.bump(&state);
        }
    }

    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// Moves when the content changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The resources of `type_url` named in `names` that exist (all of them for `None`, the
    /// wildcard), by name.
    pub fn get(&self, type_url: &str, names: Option<&BTreeSet<String>>) -> Vec<(String, Versioned)> {
        let state = self.lock();
        let Some(entries) = state.resources.get(type_url) else {
            return Vec::new();
        };
        let mut found: Vec<(String, Versioned)> = match names {
            Some(names) => names
                .iter()
                .filter_map(|n| entries.get(n).map(|r| (n.clone(), r.clone())))
                .collect(),
            None => entries.iter().map(|(n, r)| (n.clone(), r.clone())).collect(),
        };
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Resources held, of every type.
    pub fn len(&self) -> usize {
        self.lock().resources.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bump(&self, _state: &State) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn version_of(resource: &Any) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    resource.type_url.hash(&mut hasher);
    resource.value.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Whether `type_url` is one the server serves.
pub fn is_served(type_url: &str) -> bool {
    type_url::ALL.contains(&type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_moves_only_when_content_changes() {
        let cache = XdsCache::default();
        let generation = cache.subscribe();
        cache.relist_started();
        cache.set_backend("shop", "echo", None, SlowStart::default());
        assert!(!cache.is_synced());
        cache.relist_done();
        assert!(cache.is_synced());
        let after_sync = *generation.borrow();
        cache.set_backend("shop", "echo", None, SlowStart::default());
        assert_eq!(*generation.borrow(), after_sync, "same content, no push");
        assert_eq!(cache.len(), 4);
        let names = BTreeSet::from(["echo.shop".to_string(), "unknown.shop".to_string()]);
        let found = cache.get(type_url::LISTENER, Some(&names));
        assert_eq!(found.len(), 1, "only what exists");
        assert_eq!(cache.get(type_url::CLUSTER, None).len(), 1, "the wildcard");
        cache.remove_backend("shop", "echo");
        assert!(*generation.borrow() > after_sync);
        assert!(cache.is_empty());
    }

    #[test]
    fn turning_tls_on_changes_the_cluster_alone_and_pushes() {
        use resources::ClusterTls;

        let cache = XdsCache::default();
        cache.relist_started();
        cache.set_backend("shop", "echo", None, SlowStart::default());
        cache.relist_done();
        let before: Vec<_> = type_url::ALL.iter().map(|t| cache.get(t, None)).collect();
        let generation = *cache.subscribe().borrow();
        let tls = BackendSettings {
            tls: Some(ClusterTls {
                server_name: "echo.shop.svc".into(),
                client_identity: cache.upstream_client_identity(),
            }),
            ..BackendSettings::default()
        };
        cache.set_backend_with("shop", "echo", None, tls, SystemTime::now());
        assert!(*cache.subscribe().borrow() > generation, "a push");
        assert_eq!(changed_types(&cache, &before), [type_url::CLUSTER]);
    }

    /// The type URLs whose resources differ from `before` (every type's resources, in
    /// [`type_url::ALL`]'s order).
    fn changed_types(cache: &XdsCache, before: &[Vec<(String, Versioned)>]) -> Vec<&'static str> {
        let after: Vec<_> = type_url::ALL.iter().map(|t| cache.get(t, None)).collect();
        type_url::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| b != a)
            .map(|(t, _)| *t)
            .collect()
    }

    #[test]
    fn an_outlier_detection_change_changes_the_cluster_alone_and_pushes() {
        let cache = XdsCache::default();
        cache.relist_started();
        cache.set_backend("shop", "echo", None, SlowStart::default());
        cache.relist_done();
        let before: Vec<_> = type_url::ALL.iter().map(|t| cache.get(t, None)).collect();
        let generation = *cache.subscribe().borrow();
        let mut settings = BackendSettings::default();
        settings.outlier_detection.base_ejection_time = Duration::from_secs(3).into();
        cache.set_backend_with("shop", "echo", None, settings.clone(), SystemTime::now());
        assert!(*cache.subscribe().borrow() > generation, "a push");
        assert_eq!(changed_types(&cache, &before), [type_url::CLUSTER]);
        let pushed = *cache.subscribe().borrow();
        cache.set_backend_with("shop", "echo", None, settings, SystemTime::now());
        assert_eq!(*cache.subscribe().borrow(), pushed, "the same settings again: no push");
    }

    #[test]
    fn a_relist_forgets_backends_deleted_meanwhile() {
        let cache = XdsCache::default();
        cache.set_backend("shop", "gone", None, SlowStart::default());
        cache.set_backend("shop", "kept", None, SlowStart::default());
        cache.relist_started();
        cache.set_backend("shop", "kept", None, SlowStart::default());
        cache.relist_done();
        assert_eq!(cache.get(type_url::LISTENER, None).len(), 1);
        assert_eq!(cache.get(type_url::LISTENER, None)[0].0, "kept.shop");
    }

    #[test]
    fn a_ramp_is_pushed_step_by_step_and_then_forgotten() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use kubegrpc_crds::{EndpointStatus, Health};

        let since = SystemTime::now();
        let endpoint = |address: &str, since: Option<SystemTime>| EndpointStatus {
            address: address.into(),
            port: 50051,
            weight: 100,
            health: Health::Serving,
            serving: true,
            terminating: false,
            zone: None,
            for_zones: Vec::new(),
            pod: None,
            target_ref: None,
            reason: None,
            last_transition_time: since.map(|s| Time(s.try_into().unwrap())),
            fail_open: false,
        };
        let status = GrpcBackendStatus {
            endpoints: vec![endpoint("10.0.0.1", None), endpoint("10.0.0.2", Some(since))],
            ..Default::default()
        };
        let slow_start = SlowStart {
            window: Duration::from_secs(10),
            ..SlowStart::default()
        };
        let cache = XdsCache::default();
        let generation = cache.subscribe();
        cache.set_backend_at("shop", "echo", Some(&status), slow_start, since);
        assert_eq!(cache.ramp_tick(), Some(slow_start.tick()));
        let mut pushes = 0;
        let mut last = *generation.borrow();
        for tenth in 1..=120 {
            cache.refresh_ramps(since + Duration::from_millis(tenth * 100));
            if *generation.borrow() != last {
                pushes += 1;
                last = *generation.borrow();
            }
        }
        // Steps 20%, 30% .. 90%, then the full weight: nine pushes after the first.
        assert_eq!(pushes, 9);
        assert_eq!(cache.ramp_tick(), None, "the ramp ended: nothing more to look at");
        cache.set_backend_at("shop", "echo", Some(&status), SlowStart::default(), since);
        assert_eq!(*generation.borrow(), last, "off: the full weights again, unchanged");
    }
}
