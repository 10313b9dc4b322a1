//! Routes: a channel whose GrpcBackend's status carries a routing table (`status.routes`) sends
//! each call to the pool of the GrpcBackend the table picks for it.
//!
//! The router keeps one pool per GrpcBackend the table names (weight 0 included, so that a
//! canary's connections are warm before its weight rises), each fed by a watch of its own, the
//! same machinery and settings as the channel's own pool; the channel's own GrpcBackend keeps
//! its pool whatever the table says. Pools are keyed by `namespace/name`, so a new table keeps
//! the pools (and connections) of the GrpcBackends it still names and drops only the others
//! (requests in flight on them finish). A routed-to GrpcBackend's own `status.routes` is not
//! followed: routing is one level deep, as the Gateway API's backendRefs are.
//!
//! Per call: the first entry whose method and headers match ([`crate::routes`]), then one of
//! its backends by weight with the same deterministic weighted round-robin the endpoints are
//! picked with (over each cycle of the reduced weights, exactly their shares). A picked backend
//! with no usable endpoint is passed over for the entry's next one that has one (as xDS
//! clients' `weighted_target` uses only its ready children), so the others take its share. A
//! call that matches no entry, whose entry names no backend of weight above 0, or none of
//! whose entry's backends has a usable endpoint, fails at once with `Unavailable` naming the
//! GrpcBackend and why.
//!
//! An entry with a timeout or retries ([`crate::route_policy`]) hands the call its policy, the
//! counters and retry budget of its rule (one per rule of a route, kept across tables while the
//! rule is in them), and a way to pick a backend again for a retry ([`RoutedPolicy::repick`]).

use std::{
    collections::{BTreeSet, HashMap, hash_map::RandomState},
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::watcher,
};
use kubegrpc_crds::GrpcBackend;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;
use tracing::{info, warn};

use crate::{
    picker::Picker,
    pool::{Pool, outlier_timer},
    route_call::RuleCalls,
    route_policy::{EntryPolicy, random, weighted_choice},
    routes::{BackendKey, CompiledEntry, parse_routes},
    snapshot::{AppliedRoute, RoutedBackendSnapshot, RoutingSnapshot},
    tls::TlsResolver,
};

/// How the first read of a GrpcBackend went.
pub(crate) type FirstRead = Result<(), watcher::Error>;

/// The tasks that keep one GrpcBackend's pool current: its discovery (a watch of the object)
/// and its outlier-detection timer. Both stop when this is dropped.
pub(crate) struct PoolTasks {
    _discovery: AbortOnDropHandle<()>,
    _outlier_timer: AbortOnDropHandle<()>,
}

impl PoolTasks {
    /// Starts following GrpcBackend `namespace/name` into `pool`: reads Node `node`'s zone first
    /// if given, tells `first` how the first read went, and hands each read's status to
    /// `router` when the pool is a routing table's own. With no TLS settings of the user's
    /// (the pool's config), the GrpcBackend's `spec.tls` decides how endpoints are connected to.
    pub(crate) fn spawn(
        client: Client,
        namespace: &str,
        name: String,
        pool: Arc<Pool>,
        node: Option<(Client, String)>,
        first: Option<oneshot::Sender<FirstRead>>,
        router: Option<Arc<Router>>,
    ) -> Self {
        let tls =
            (!pool.config.tls).then(|| TlsResolver::new(client.clone(), namespace.to_owned(), pool.backend.clone()));
        let resource = ApiResource::erase::<GrpcBackend>(&());
        let api = Api::<DynamicObject>::namespaced_with(client, namespace, &resource);
        let discovery = tokio::spawn(crate::discovery::run(api, name, pool.clone(), node, tls, first, router));
        let outlier = tokio::spawn(outlier_timer(Arc::downgrade(&pool), pool.backend.clone()));
        Self {
            _discovery: AbortOnDropHandle::new(discovery),
            _outlier_timer: AbortOnDropHandle::new(outlier),
        }
    }
}

/// The longest cycle of an entry's backend picks: shares to 1/4096 are finer than any canary
/// needs, and 256 entries then hold at most about 4 MiB of schedules (the endpoint picker's
/// bound, 65,536 slots, is for thousands of endpoints).
const MAX_ENTRY_SCHEDULE: u64 = 4096;

/// An entry's weights as its picker takes them: scaled down, in proportion, when they add up to
/// more than [`MAX_ENTRY_SCHEDULE`]; a backend with a weight keeps at least 1, one with 0 stays 0.
fn schedule_weights(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total <= MAX_ENTRY_SCHEDULE {
        return weights.to_vec();
    }
    weights
        .iter()
        .map(|w| match *w {
            0 => 0,
            w => u32::try_from(u64::from(w) * MAX_ENTRY_SCHEDULE / total).map_or(1, |scaled| scaled.max(1)),
        })
        .collect()
}

/// How the pools of routed-to GrpcBackends are fed.
pub(crate) enum Spawner {
    /// Each followed through the Kubernetes API, as the channel's own GrpcBackend.
    Kube(Client),
    /// Pools nothing feeds: the unit tests apply their statuses by hand.
    #[cfg(test)]
    Manual,
}

impl Spawner {
    /// A pool for `key` with the channel's settings, in the client's `zone`, and what feeds it.
    fn spawn(&self, key: &BackendKey, config: crate::pool::PoolConfig, zone: Option<String>) -> Member {
        let pool = Pool::new(key.to_string(), config);
        if zone.is_some() {
            pool.set_zone(zone);
        }
        let target = Arc::new(Target {
            key: key.clone(),
            pool: pool.clone(),
            routed: AtomicU64::new(0),
        });
        match self {
            Self::Kube(client) => {
                let (first, first_read) = oneshot::channel();
                let tasks = PoolTasks::spawn(
                    client.clone(),
                    &key.namespace,
                    key.name.clone(),
                    pool,
                    None,
                    Some(first),
                    None,
                );
                Member {
                    target,
                    first_read: Some(first_read),
                    _tasks: Some(tasks),
                }
            }
            #[cfg(test)]
            Self::Manual => Member {
                target,
                first_read: None,
                _tasks: None,
            },
        }
    }
}

/// Where a call goes: the pool, and the policy of the entry that took it if it has one.
pub(crate) struct Routed {
    pub pool: Arc<Pool>,
    pub policy: Option<RoutedPolicy>,
}

/// The timeout and retries of the entry a call took, with what a retry needs: the entry's
/// backends to pick from again, and its rule's counters and budget.
#[derive(Clone)]
pub(crate) struct RoutedPolicy {
    /// The table the call was routed by (kept for the call's life: a new table does not change
    /// the policy of calls already under way).
    table: Arc<RoutedTable>,
    entry: usize,
    /// The channel's GrpcBackend, for messages.
    own: BackendKey,
}

impl RoutedPolicy {
    fn entry(&self) -> &RoutedEntry {
        &self.table.entries[self.entry]
    }

    fn parts(&self) -> &(EntryPolicy, Arc<RuleCalls>) {
        self.entry()
            .policy
            .as_ref()
            .expect("a RoutedPolicy is made only for an entry with a policy")
    }

    pub(crate) fn policy(&self) -> &EntryPolicy {
        &self.parts().0
    }

    pub(crate) fn calls(&self) -> &RuleCalls {
        &self.parts().1
    }

    /// `kubegrpc: GrpcBackend NS/NAME: route NS/NAME rule N`, for messages.
    pub(crate) fn origin(&self) -> String {
        format!("kubegrpc: GrpcBackend {}: {}", self.own, self.entry().compiled.origin())
    }

    /// A pool for a retry: one of the entry's backends of weight above 0, in proportion to the
    /// weights (random, so that retries do not shift the first attempts' round-robin), among
    /// those with a usable endpoint other than the ones in `avoid` if there is one, else among
    /// those with any usable endpoint. `None`: none is usable.
    pub(crate) fn repick(&self, avoid: &[SocketAddr]) -> Option<Arc<Pool>> {
        let entry = self.entry();
        let random = random();
        weighted_choice(
            &entry.weighted_weights,
            |i| entry.weighted[i].usable_besides(avoid),
            random,
        )
        .or_else(|| weighted_choice(&entry.weighted_weights, |i| entry.weighted[i].usable(), random))
        .map(|i| entry.weighted[i].pool.clone())
    }
}

/// A GrpcBackend calls can be routed to: its pool, and how many calls the table sent it.
pub(crate) struct Target {
    pub key: BackendKey,
    pub pool: Arc<Pool>,
    routed: AtomicU64,
}

impl Target {
    /// A request sent to it now can be picked an endpoint.
    fn usable(&self) -> bool {
        !self.pool.rotation().picker.is_empty()
    }

    /// A request sent to it now can be picked an endpoint other than those in `avoid`.
    fn usable_besides(&self, avoid: &[SocketAddr]) -> bool {
        // The rotation's items are its endpoints of weight above 0: each can be picked.
        let rotation = self.pool.rotation();
        rotation
            .picker
            .items()
            .iter()
            .any(|endpoint| !avoid.contains(&endpoint.address))
    }
}

/// A routed-to GrpcBackend other than the channel's own, kept while the table names it.
struct Member {
    target: Arc<Target>,
    /// How its first read went, until [`Router::first_reads`] takes it.
    first_read: Option<oneshot::Receiver<FirstRead>>,
    /// Dropping them stops its watch and timer.
    _tasks: Option<PoolTasks>,
}

/// The table in use: its entries with a picker over their backends' pools.
struct RoutedTable {
    entries: Vec<RoutedEntry>,
    skipped: Vec<String>,
    /// Every GrpcBackend the entries name, each once, in the order first named.
    targets: Vec<Arc<Target>>,
}

struct RoutedEntry {
    compiled: CompiledEntry,
    picker: Picker<Arc<Target>>,
    /// Its backends of weight above 0, each once (at most 16).
    weighted: Vec<Arc<Target>>,
    /// The weight of each of `weighted` (of a backend named twice, the sum).
    weighted_weights: Vec<u32>,
    /// Its timeout and retries, and its rule's counters, if it has either.
    policy: Option<(EntryPolicy, Arc<RuleCalls>)>,
}

impl RoutedTable {
    /// Said after "no route matches": entries were left out, which may be why.
    fn skipped_note(&self) -> String {
        match self.skipped.len() {
            0 => String::new(),
            n => format!(" ({n} entries of its status.routes could not be applied; see the client's log)"),
        }
    }
}

#[derive(Default)]
struct RouterState {
    /// The GrpcBackends named besides the channel's own.
    members: HashMap<BackendKey, Member>,
    /// `status.routes` as last applied (`Some(None)`: read, absent), to skip unchanged tables.
    applied: Option<Option<Value>>,
    /// The last table's skipped entries, logged when they change.
    skipped: Vec<String>,
    /// The counters and retry budget of each rule with a timeout or retries, by route and rule.
    rules: HashMap<(String, u32), Arc<RuleCalls>>,
}

/// The channel's routing: its own pool, or the table's choice among the pools it keeps.
pub(crate) struct Router {
    own: Arc<Target>,
    spawner: Spawner,
    /// `None`: no table, every call goes to the own pool. Read without a lock per request.
    table: ArcSwapOption<RoutedTable>,
    state: Mutex<RouterState>,
    /// Bumped on each new table.
    version: watch::Sender<u64>,
    unrouted: AtomicU64,
}

impl Router {
    /// The router of the channel following GrpcBackend `key` into `pool`.
    pub(crate) fn new(key: BackendKey, pool: Arc<Pool>, spawner: Spawner) -> Arc<Self> {
        Arc::new(Self {
            own: Arc::new(Target {
                key,
                pool,
                routed: AtomicU64::new(0),
            }),
            spawner,
            table: ArcSwapOption::empty(),
            state: Mutex::new(RouterState::default()),
            version: watch::channel(0).0,
            unrouted: AtomicU64::new(0),
        })
    }

    /// Applies the table in a read of the own GrpcBackend's `status` (`None`: the object is
    /// gone). An unchanged table changes nothing.
    pub(crate) fn apply_routes(&self, status: Option<&Value>) {
        let routes = status.and_then(|status| status.get("routes"));
        let mut state = self.lock();
        if state.applied.as_ref().is_some_and(|applied| applied.as_ref() == routes) {
            return;
        }
        state.applied = Some(routes.cloned());
        let Some(table) = parse_routes(status, &self.own.key.namespace) else {
            if self.table.load().is_some() {
                info!("no routes any more: calls go to the GrpcBackend's own endpoints");
            }
            self.table.store(None);
            state.members.clear();
            state.skipped.clear();
            state.rules.clear();
            self.version.send_modify(|v| *v += 1);
            return;
        };
        if table.skipped != state.skipped {
            for line in &table.skipped {
                warn!("{line}; calls it would match fall through to the entries after it");
            }
            state.skipped.clone_from(&table.skipped);
        }
        for entry in &table.entries {
            for note in &entry.policy_notes {
                warn!("{note}");
            }
        }
        let named: BTreeSet<BackendKey> = table.backends().into_iter().cloned().collect();
        let mut client_zone = None;
        for key in &named {
            if *key != self.own.key && !state.members.contains_key(key) {
                // The client's zone (resolved once, from its Node if so configured) applies to
                // every pool.
                let zone = client_zone.get_or_insert_with(|| self.own.pool.snapshot().zone).clone();
                info!(routed_to = %key, "following GrpcBackend {key}, which the routes name");
                let member = self.spawner.spawn(key, self.own.pool.config.clone(), zone);
                state.members.insert(key.clone(), member);
            }
        }
        let target = |key: &BackendKey| match state.members.get(key) {
            Some(member) => member.target.clone(),
            None => self.own.clone(),
        };
        let mut targets: Vec<Arc<Target>> = Vec::new();
        let mut rules: HashMap<(String, u32), Arc<RuleCalls>> = HashMap::new();
        let start = RandomState::new().hash_one(SystemTime::now()) as usize;
        let entries: Vec<RoutedEntry> = table
            .entries
            .into_iter()
            .map(|compiled| {
                let (items, weights): (Vec<Arc<Target>>, Vec<u32>) = compiled
                    .backends
                    .iter()
                    .map(|(key, weight)| (target(key), *weight))
                    .unzip();
                let mut weighted: Vec<Arc<Target>> = Vec::new();
                let mut weighted_weights: Vec<u32> = Vec::new();
                for (item, weight) in items.iter().zip(&weights) {
                    if !targets.iter().any(|t| Arc::ptr_eq(t, item)) {
                        targets.push(item.clone());
                    }
                    if *weight > 0 {
                        match weighted.iter().position(|t| Arc::ptr_eq(t, item)) {
                            Some(i) => weighted_weights[i] = weighted_weights[i].saturating_add(*weight),
                            None => {
                                weighted.push(item.clone());
                                weighted_weights.push(*weight);
                            }
                        }
                    }
                }
                let policy = compiled.policy.clone().map(|policy| {
                    let key = (compiled.source.route.clone(), compiled.source.rule);
                    let calls = rules
                        .entry(key.clone())
                        .or_insert_with(|| {
                            state
                                .rules
                                .get(&key)
                                .cloned()
                                .unwrap_or_else(|| RuleCalls::new(key.0.clone(), key.1))
                        })
                        .clone();
                    (policy, calls)
                });
                RoutedEntry {
                    picker: Picker::new(items, &schedule_weights(&weights), start),
                    weighted,
                    weighted_weights,
                    policy,
                    compiled,
                }
            })
            .collect();
        info!(
            entries = entries.len(),
            skipped = table.skipped.len(),
            backends = targets.len(),
            "routes applied"
        );
        self.table.store(Some(Arc::new(RoutedTable {
            entries,
            skipped: table.skipped,
            targets,
        })));
        // After the swap: no new call is routed to a pool dropped here; those in flight finish.
        state.members.retain(|key, _| named.contains(key));
        state.rules = rules;
        self.version.send_modify(|v| *v += 1);
    }

    /// The pool a request goes to, with its entry's timeout and retries if it has either, or why
    /// it fails (`Unavailable`).
    pub(crate) fn route<B>(&self, request: &http::Request<B>) -> Result<Routed, Status> {
        let loaded = self.table.load();
        let Some(table) = &*loaded else {
            return Ok(Routed {
                pool: self.own.pool.clone(),
                policy: None,
            });
        };
        let path = request.uri().path();
        let Some(index) = table
            .entries
            .iter()
            .position(|entry| entry.compiled.matches(path, request.headers()))
        else {
            return Err(self.unrouted(format!("no route matches {path}{}", table.skipped_note())));
        };
        let entry = &table.entries[index];
        let Some(first) = entry.picker.pick() else {
            return Err(self.unrouted(format!(
                "{} matches {path} but names no backend with a weight above 0",
                entry.compiled.origin()
            )));
        };
        let target = if first.usable() {
            first
        } else if entry.weighted.iter().any(|t| t.usable()) {
            match entry.picker.pick_where(|t| t.usable()) {
                Some(target) => target,
                None => first,
            }
        } else {
            let reasons: Vec<String> = entry
                .weighted
                .iter()
                .map(|t| t.pool.rotation().unavailable.clone())
                .collect();
            return Err(self.unrouted(format!(
                "{} sends {path} to {}, and none can take it: {}",
                entry.compiled.origin(),
                entry
                    .weighted
                    .iter()
                    .map(|t| t.key.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                reasons.join("; ")
            )));
        };
        target.routed.fetch_add(1, Ordering::Relaxed);
        Ok(Routed {
            pool: target.pool.clone(),
            policy: entry.policy.is_some().then(|| RoutedPolicy {
                table: Arc::clone(table),
                entry: index,
                own: self.own.key.clone(),
            }),
        })
    }

    fn unrouted(&self, why: String) -> Status {
        self.unrouted.fetch_add(1, Ordering::Relaxed);
        Status::unavailable(format!("kubegrpc: GrpcBackend {}: {why}", self.own.key))
    }

    /// Waits until a call can be sent: without a table, once the own GrpcBackend has a usable
    /// endpoint; with one, once every entry that names a backend of weight above 0 has at least
    /// one such backend with a usable endpoint (so no call the table routes fails for want of
    /// an endpoint). A table that routes nothing never is ready; a new table starts over.
    pub(crate) async fn ready(&self) {
        let mut changes = self.version.subscribe();
        loop {
            changes.borrow_and_update();
            let table = self.table.load_full();
            let ready =
                async {
                    let Some(table) = &table else {
                        return self.own.pool.ready().await;
                    };
                    let routable: Vec<&RoutedEntry> = table.entries.iter().filter(|e| !e.weighted.is_empty()).collect();
                    if routable.is_empty() {
                        return std::future::pending().await;
                    }
                    futures::future::join_all(routable.iter().map(|entry| {
                        futures::future::select_all(entry.weighted.iter().map(|t| Box::pin(t.pool.ready())))
                    }))
                    .await;
                };
            tokio::select! {
                () = ready => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    /// Waits for the first read of every routed-to GrpcBackend not waited for yet (found, not
    /// found, or failed: a failure is logged by its watch, which keeps retrying).
    pub(crate) async fn first_reads(&self) {
        let pending: Vec<oneshot::Receiver<FirstRead>> = self
            .lock()
            .members
            .values_mut()
            .filter_map(|member| member.first_read.take())
            .collect();
        for first_read in pending {
            let _ = first_read.await;
        }
    }

    /// The table in use and the pools it routes to; `None` without a table.
    pub(crate) fn snapshot(&self) -> Option<RoutingSnapshot> {
        let table = self.table.load_full()?;
        Some(RoutingSnapshot {
            entries: table
                .entries
                .iter()
                .map(|entry| AppliedRoute {
                    index: entry.compiled.index,
                    entry: entry.compiled.source.clone(),
                })
                .collect(),
            skipped: table.skipped.clone(),
            policies: {
                let mut seen: Vec<*const RuleCalls> = Vec::new();
                table
                    .entries
                    .iter()
                    .filter_map(|entry| entry.policy.as_ref())
                    .filter(|(_, calls)| {
                        let first = !seen.contains(&Arc::as_ptr(calls));
                        seen.push(Arc::as_ptr(calls));
                        first
                    })
                    .map(|(_, calls)| calls.snapshot())
                    .collect()
            },
            backends: table
                .targets
                .iter()
                .map(|target| RoutedBackendSnapshot {
                    backend: target.key.to_string(),
                    routed: target.routed.load(Ordering::Relaxed),
                    snapshot: target.pool.snapshot(),
                })
                .collect(),
            unrouted: self.unrouted.load(Ordering::Relaxed),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool of GrpcBackend `key`, if the router keeps one (the unit tests feed them).
    #[cfg(test)]
    pub(crate) fn pool_of(&self, key: &BackendKey) -> Option<Arc<Pool>> {
        if *key == self.own.key {
            return Some(self.own.pool.clone());
        }
        self.lock().members.get(key).map(|m| m.target.pool.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use serde_json::{Value, json};

    use super::*;
    use crate::{
        outlier::OutlierDetection,
        test_support::{BACKEND, MemoryNetwork, apply, entry},
    };

    /// A router for `default/echo` whose pools connect to `net`, routed-to pools fed by hand.
    fn new_router(net: &MemoryNetwork) -> Arc<Router> {
        let pool = Pool::new(BACKEND.into(), net.config(OutlierDetection::default(), 0));
        Router::new(BackendKey::new("default", "echo"), pool, Spawner::Manual)
    }

    fn routes(router: &Router, routes: Value) {
        router.apply_routes(Some(&json!({ "routes": routes })));
    }

    /// The pool of `default/NAME` (the own one for `echo`), if the router keeps one.
    fn pool(router: &Router, name: &str) -> Option<Arc<Pool>> {
        if name == "echo" {
            return Some(router.own.pool.clone());
        }
        let key = BackendKey::new("default", name);
        router.lock().members.get(&key).map(|m| m.target.pool.clone())
    }

    /// Gives `default/NAME`'s pool one Serving endpoint.
    fn serve(router: &Router, net: &MemoryNetwork, name: &str) {
        let pool = pool(router, name).expect("a pool for it");
        apply(&pool, &[entry(net.answering(), 100, "Serving")]);
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut request = http::Request::post(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("a valid request")
    }

    /// Where a call goes: the pool's GrpcBackend, or the message it fails with.
    fn route(router: &Router, path: &str, headers: &[(&str, &str)]) -> Result<String, String> {
        match router.route(&request(path, headers)) {
            Ok(routed) => Ok(routed.pool.backend.clone()),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                Err(status.message().to_owned())
            }
        }
    }

    /// Calls per GrpcBackend over `calls` calls to `path`.
    fn shares(router: &Router, calls: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..calls {
            let backend = route(router, "/echo.Echo/Say", &[]).expect("routed");
            *counts.entry(backend).or_default() += 1;
        }
        counts
    }

    fn weighted(weights: &[(&str, u32)]) -> Value {
        let backends: Vec<Value> = weights
            .iter()
            .map(|(name, weight)| json!({"name": name, "weight": weight}))
            .collect();
        json!([{"route": "default/echo", "rule": 0, "backends": backends}])
    }

    #[tokio::test]
    async fn without_a_table_calls_go_to_the_own_pool() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        assert_eq!(route(&router, "/echo.Echo/Say", &[]), Ok(BACKEND.into()));
        router.apply_routes(Some(&json!({"endpoints": [], "routes": []})));
        assert_eq!(route(&router, "/echo.Echo/Say", &[]), Ok(BACKEND.into()));
        assert!(router.snapshot().is_none());
    }

    #[tokio::test]
    async fn weights_70_30_0_are_the_shares_of_the_calls() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(&router, weighted(&[("v1", 70), ("v2", 30), ("v3", 0)]));
        for name in ["v1", "v2", "v3"] {
            serve(&router, &net, name);
        }
        let counts = shares(&router, 2000);
        let share = |name: &str| counts.get(&format!("default/{name}")).copied().unwrap_or(0) as f64 / 2000.0;
        assert!((share("v1") - 0.7).abs() <= 0.01, "{counts:?}");
        assert!((share("v2") - 0.3).abs() <= 0.01, "{counts:?}");
        assert_eq!(share("v3"), 0.0, "{counts:?}");
        assert_eq!(
            share("echo"),
            0.0,
            "the table does not name its own GrpcBackend: {counts:?}"
        );

        // Odd weights over many backends, as a canary controller may set them.
        routes(&router, weighted(&[("v1", 5), ("v2", 1), ("v3", 94)]));
        let counts = shares(&router, 10_000);
        for (name, expected) in [("v1", 0.05), ("v2", 0.01), ("v3", 0.94)] {
            let share = counts[&format!("default/{name}")] as f64 / 10_000.0;
            assert!((share - expected).abs() <= 0.005, "{counts:?}");
        }
        let snapshot = router.snapshot().expect("a table");
        let routed: Vec<u64> = snapshot.backends.iter().map(|b| b.routed).collect();
        assert_eq!(
            routed,
            [1400 + 500, 600 + 100, 9400],
            "counted per GrpcBackend, across tables"
        );
    }

    #[test]
    fn big_weights_are_scaled_into_a_short_cycle_keeping_their_shares() {
        assert_eq!(schedule_weights(&[70, 30, 0]), [70, 30, 0]);
        let scaled = schedule_weights(&[1_000_000, 999_999, 1, 0]);
        assert_eq!(scaled, [2048, 2047, 1, 0]);
        let picker = Picker::new(vec![0, 1, 2, 3], &scaled, 0);
        assert!(picker.cycle_len() <= MAX_ENTRY_SCHEDULE as usize + 16);
        let scaled = schedule_weights(&[900_000, 100_000]);
        assert_eq!(scaled, [3686, 409], "90/10 within 0.03 point");
    }

    #[tokio::test]
    async fn method_and_header_matches_route_in_table_order() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(
            &router,
            json!([
                {"route": "default/echo", "rule": 0, "method": {"service": "grpc.health.v1.Health", "method": "Check"},
                 "backends": [{"name": "v2", "weight": 1}]},
                {"route": "default/echo", "rule": 1, "headers": [{"name": "x-canary", "value": "always"}],
                 "backends": [{"name": "v2", "weight": 1}]},
                {"route": "default/echo", "rule": 2, "method": {"service": "kubegrpc.echo.v1.Echo"},
                 "backends": [{"name": "v1", "weight": 1}]},
                {"route": "default/echo", "rule": 3, "backends": [{"name": "v3", "weight": 1}]},
            ]),
        );
        for name in ["v1", "v2", "v3"] {
            serve(&router, &net, name);
        }
        let echo = "/kubegrpc.echo.v1.Echo/Echo";
        assert_eq!(route(&router, echo, &[]), Ok("default/v1".into()));
        assert_eq!(route(&router, echo, &[("x-canary", "always")]), Ok("default/v2".into()));
        assert_eq!(
            route(&router, echo, &[("x-canary", "sometimes")]),
            Ok("default/v1".into())
        );
        assert_eq!(
            route(&router, "/grpc.health.v1.Health/Check", &[]),
            Ok("default/v2".into())
        );
        assert_eq!(
            route(&router, "/grpc.health.v1.Health/Watch", &[]),
            Ok("default/v3".into())
        );
        assert_eq!(
            route(&router, "/grpc.health.v1.Health/Watch", &[("x-canary", "always")]),
            Ok("default/v2".into())
        );
    }

    #[tokio::test]
    async fn calls_no_entry_takes_fail_at_once_naming_the_grpc_backend_and_why() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(
            &router,
            json!([
                {"route": "default/r", "rule": 0, "headers": [{"type": "RegularExpression", "name": "x-v", "value": "("}],
                 "backends": [{"name": "v1", "weight": 1}]},
                {"route": "default/r", "rule": 1, "method": {"service": "a.Drained"}, "backends": [{"name": "v1", "weight": 0}]},
                {"route": "default/r", "rule": 2, "method": {"service": "a.Empty"}, "backends": []},
                {"route": "default/r", "rule": 3, "method": {"service": "a.Down"}, "backends": [{"name": "v2", "weight": 1}]},
            ]),
        );
        serve(&router, &net, "v1");
        let failed = |path: &str| route(&router, path, &[("x-v", "(")]).expect_err("fails");
        assert_eq!(
            failed("/a.Other/M"),
            "kubegrpc: GrpcBackend default/echo: no route matches /a.Other/M (1 entries of its status.routes \
             could not be applied; see the client's log)"
        );
        assert_eq!(
            failed("/a.Drained/M"),
            "kubegrpc: GrpcBackend default/echo: route default/r rule 1 matches /a.Drained/M but names no \
             backend with a weight above 0"
        );
        assert!(failed("/a.Empty/M").contains("route default/r rule 2 matches /a.Empty/M but names no backend"));
        assert_eq!(
            failed("/a.Down/M"),
            "kubegrpc: GrpcBackend default/echo: route default/r rule 3 sends /a.Down/M to default/v2, and none \
             can take it: GrpcBackend default/v2: its status has not been read yet"
        );
        let snapshot = router.snapshot().expect("a table");
        assert_eq!(snapshot.unrouted, 4);
        assert_eq!(snapshot.skipped.len(), 1, "{:?}", snapshot.skipped);
        let applied: Vec<usize> = snapshot.entries.iter().map(|e| e.index).collect();
        assert_eq!(applied, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_backend_without_a_usable_endpoint_is_passed_over_for_the_others() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(&router, weighted(&[("v1", 50), ("v2", 50)]));
        serve(&router, &net, "v1");
        let counts = shares(&router, 100);
        assert_eq!(
            counts,
            HashMap::from([("default/v1".into(), 100)]),
            "v2 has no endpoint yet"
        );
        serve(&router, &net, "v2");
        let counts = shares(&router, 100);
        assert_eq!(
            counts,
            HashMap::from([("default/v1".into(), 50), ("default/v2".into(), 50)])
        );
    }

    #[tokio::test]
    async fn a_new_table_keeps_the_pools_it_still_names() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(&router, weighted(&[("v1", 100), ("v2", 0)]));
        let (v1, v2) = (pool(&router, "v1").unwrap(), pool(&router, "v2").unwrap());
        routes(&router, weighted(&[("v1", 90), ("v2", 10)]));
        assert!(
            Arc::ptr_eq(&v1, &pool(&router, "v1").unwrap()),
            "the same pool, the same connections"
        );
        assert!(Arc::ptr_eq(&v2, &pool(&router, "v2").unwrap()));
        routes(&router, weighted(&[("v2", 100), ("echo", 0), ("v3", 0)]));
        assert!(pool(&router, "v1").is_none(), "no longer named: dropped");
        assert!(Arc::ptr_eq(&v2, &pool(&router, "v2").unwrap()));
        assert!(pool(&router, "v3").is_some());
        assert_eq!(router.lock().members.len(), 2, "the own GrpcBackend is never a member");
        let names: Vec<String> = router
            .snapshot()
            .unwrap()
            .backends
            .into_iter()
            .map(|b| b.backend)
            .collect();
        assert_eq!(names, ["default/v2", "default/echo", "default/v3"]);

        // An unchanged table changes nothing; no table drops every routed-to pool.
        let version = *router.version.borrow();
        routes(&router, weighted(&[("v2", 100), ("echo", 0), ("v3", 0)]));
        assert_eq!(*router.version.borrow(), version);
        router.apply_routes(None);
        assert!(router.lock().members.is_empty());
        assert_eq!(route(&router, "/a.B/C", &[]), Ok(BACKEND.into()));
    }

    #[tokio::test]
    async fn a_rules_retry_counters_are_kept_across_tables_while_it_is_in_them() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        let table = |weight: u32, rule: u32| {
            json!([{"route": "default/plain", "rule": 0, "method": {"service": "a.B"}, "backends": [{"name": "v1", "weight": 1}]},
                   {"route": "default/r", "rule": rule, "headers": [{"name": "x", "value": "1"}],
                    "backends": [{"name": "v1", "weight": 1}], "timeout": "1s"},
                   {"route": "default/r", "rule": rule, "timeout": "1s", "backends": [{"name": "v1", "weight": weight}],
                    "retry": {"codes": ["UNAVAILABLE"], "attempts": 2, "backoff": "25ms", "maxBackoff": "250ms", "budgetPercent": 20}}])
        };
        routes(&router, table(1, 0));
        serve(&router, &net, "v1");
        let calls = |router: &Router| {
            let routed = router.route(&request("/echo.Echo/Say", &[])).expect("routed");
            let policy = routed.policy.expect("the entry has a policy");
            std::ptr::from_ref(policy.calls())
        };
        let before = calls(&router);
        assert!(
            router.route(&request("/a.B/C", &[])).unwrap().policy.is_none(),
            "an entry without timeout or retry"
        );
        let policies = router.snapshot().unwrap().policies;
        assert_eq!(policies.len(), 1, "one per rule: {policies:?}");
        routes(&router, table(2, 0));
        assert_eq!(calls(&router), before, "the same rule in a new table: the same budget");
        routes(&router, table(2, 1));
        assert_ne!(calls(&router), before, "another rule: a budget of its own");
    }

    #[tokio::test]
    async fn other_namespaces_are_named_apart() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        routes(
            &router,
            json!([{"route": "default/r", "rule": 0, "backends": [
                {"name": "v1", "weight": 1}, {"name": "v1", "namespace": "canary", "weight": 1}]}]),
        );
        let mut keys: Vec<String> = router.lock().members.keys().map(ToString::to_string).collect();
        keys.sort();
        assert_eq!(keys, ["canary/v1", "default/v1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_an_endpoint_for_every_entry_that_routes() {
        let net = MemoryNetwork::default();
        let router = new_router(&net);
        let within = |router: Arc<Router>| async move {
            tokio::time::timeout(Duration::from_secs(1), router.ready())
                .await
                .is_ok()
        };
        routes(
            &router,
            json!([
                {"route": "default/r", "rule": 0, "headers": [{"name": "x-canary", "value": "1"}],
                 "backends": [{"name": "v2", "weight": 1}, {"name": "v3", "weight": 0}]},
                {"route": "default/r", "rule": 1, "backends": [{"name": "v1", "weight": 1}, {"name": "v4", "weight": 1}]},
            ]),
        );
        serve(&router, &net, "v1");
        serve(&router, &net, "v3");
        assert!(
            !within(router.clone()).await,
            "rule 0's only weighted backend has no endpoint"
        );

        let waiting = tokio::spawn(within(router.clone()));
        tokio::task::yield_now().await;
        serve(&router, &net, "v2");
        assert!(waiting.await.unwrap(), "ready once v2 has one (v4 need not)");

        routes(&router, weighted(&[("v5", 0)]));
        assert!(
            !within(router.clone()).await,
            "a table that routes nothing is never ready"
        );
        router.apply_routes(None);
        assert!(
            !within(router.clone()).await,
            "no table: the own pool, which has no endpoint"
        );
    }
}
