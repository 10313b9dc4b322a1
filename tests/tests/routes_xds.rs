//! Routes for xDS clients (issue 21): the RouteConfiguration the operator's xDS server makes from a
//! GrpcBackend's routing table (`status.routes`), followed by real grpc-go (v1.83) and grpc-java
//! (1.85) xDS clients dialing `xds:///echo.NAMESPACE`, counted at the backends.
//!
//! No operator runs: each test writes the GrpcBackends' statuses itself (Serving endpoints, and
//! the parent's table), as the operator will once it resolves GRPCRoutes, and the xDS server
//! follows them. Each backend is an in-process echo backend counting what it serves: `Echo`
//! calls (`requests`) and `grpc.health.v1.Health/Check` calls (`health_checks`; with no operator
//! there is no prober, so the clients are the only callers). The parent GrpcBackend `echo` has a
//! backend of its own that must get nothing once a table exists.
//!
//! Shares: both clients pick a Cluster at random by weight for each call, so a share over n calls
//! is binomial; the windows are sized so that the 3-point tolerance sits at 3.5 standard
//! deviations or more.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::{
    config::route::v3::RouteConfiguration,
    service::discovery::v3::{DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient},
};
use kube::api::{Patch, PatchParams};
use kubegrpc_crds::routes::{HeaderMatch, MatchType, MethodMatch, RouteBackend, RouteEntry};
use kubegrpc_echo::{Backend, BackendOptions};
use kubegrpc_operator::{
    metrics::XdsTypeLabels,
    xds::{resources::type_url, routes::route_configuration_served},
};
use kubegrpc_tests::{
    backends::start_backend,
    scenario::Scenario,
    wait,
    xds::{InProcessXds, XdsClient, XdsClientOptions, XdsCounts, XdsPeer},
};
use prost::Message;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);
const RATE: u32 = 200;
/// Each call's deadline. Longer than the peers' 2 s: on two cores shared with builds and other
/// tests a JVM can stall for seconds, and this file asserts where calls go and that none fails
/// for a route change, not latency. A call waiting on a Cluster that never comes still fails.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// The parent GrpcBackend, the one clients dial.
const PARENT: &str = "echo";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const TRACK: &str = "x-kubegrpc-track";

/// A namespace with the xDS server following it and one GrpcBackend per name, each with one
/// Serving in-process backend of its own.
struct Routed {
    s: Scenario,
    xds: InProcessXds,
    backends: BTreeMap<&'static str, Backend>,
    /// The GrpcBackends that exist (the xDS server serves their Clusters).
    present: Mutex<BTreeSet<&'static str>>,
    /// The parent's table, as last written.
    table: Mutex<Vec<RouteEntry>>,
    /// When each table was written (Unix ms), for failure messages.
    changes: Mutex<Vec<u128>>,
}

impl Routed {
    async fn start(prefix: &str, names: &[&'static str]) -> Result<Self> {
        Self::start_with(prefix, names, &[]).await
    }

    /// As [`Routed::start`], with backends for `later` too but no GrpcBackend for them yet.
    async fn start_with(prefix: &str, names: &[&'static str], later: &[&'static str]) -> Result<Self> {
        let s = Scenario::new(prefix).await?;
        let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
        let mut backends = BTreeMap::new();
        for &name in names.iter().chain(later) {
            backends.insert(name, start_backend(BackendOptions::default()).await?);
        }
        let routed = Self {
            s,
            xds,
            backends,
            present: Mutex::default(),
            table: Mutex::default(),
            changes: Mutex::default(),
        };
        for &name in names {
            routed.create(name).await?;
        }
        Ok(routed)
    }

    /// Creates GrpcBackend `name` with its backend Serving (no operator reconciles it: the spec
    /// only has to be valid).
    async fn create(&self, name: &'static str) -> Result<()> {
        self.s
            .grpc_backend(name, json!({"service": name, "port": "grpc"}))
            .await?;
        if name != PARENT {
            publish(&self.s, name, self.address(name), &[]).await?;
        }
        self.present.lock().unwrap().insert(name);
        Ok(())
    }

    /// Deletes GrpcBackend `name` (its backend keeps running).
    async fn delete(&self, name: &'static str) -> Result<()> {
        self.s.backends().delete(name, &Default::default()).await?;
        self.present.lock().unwrap().remove(name);
        Ok(())
    }

    fn target(&self) -> String {
        format!("{PARENT}.{}", self.s.namespace)
    }

    fn address(&self, name: &str) -> SocketAddr {
        self.backends[name].address
    }

    /// Echo calls `name`'s backend served so far.
    fn requests(&self, name: &str) -> u64 {
        self.backends[name].counters.snapshot().requests
    }

    /// Connections `name`'s backend accepted so far.
    fn connections(&self, name: &str) -> u64 {
        self.backends[name].counters.snapshot().connections_accepted
    }

    /// Health Check calls `name`'s backend answered so far.
    fn checks(&self, name: &str) -> u64 {
        self.backends[name].counters.snapshot().health_checks
    }

    /// Writes the parent's table and waits until the xDS server serves it, so that every call a
    /// client sends from then on is routed by it (or by the next one).
    async fn route(&self, table: &[RouteEntry]) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        self.changes.lock().unwrap().push(now.as_millis());
        *self.table.lock().unwrap() = table.to_vec();
        publish(&self.s, PARENT, self.address(PARENT), table).await?;
        self.served().await
    }

    /// Waits until the xDS server serves the parent's table naming the GrpcBackends that exist
    /// now, and only those.
    async fn served(&self) -> Result<()> {
        let target = self.target();
        let present: BTreeSet<String> = self
            .present
            .lock()
            .unwrap()
            .iter()
            .map(|name| format!("{name}.{}", self.s.namespace))
            .collect();
        let table = self.table.lock().unwrap().clone();
        let expected = route_configuration_served(&target, &table, |cluster| present.contains(cluster));
        wait::until("the xDS server serving the table", DEADLINE, || async {
            let served = served_route(self.xds.address, &target).await?;
            Ok((served == expected).then_some(()))
        })
        .await
    }

    /// Starts `peer`'s client of the parent: `method` (default Echo) with `metadata`.
    async fn client(
        &self,
        peer: XdsPeer,
        rate: u32,
        method: Option<&str>,
        metadata: &[(&str, &str)],
    ) -> Result<XdsClient> {
        XdsClient::start_with(XdsClientOptions {
            peer,
            method: method.map(Into::into),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            timeout: Some(CALL_DEADLINE),
            ..XdsClientOptions::new(&[self.target()], self.xds.address, rate)
        })
        .await
    }

    /// Waits until `client` has had replies from each of `names`' backends, then starts its
    /// counts afresh: its connections are up. Calls sent before may fail: a JVM starting beside
    /// others on two cores can take longer than a call's deadline to connect.
    async fn warm_up(&self, client: &XdsClient, names: &[&str]) -> Result<()> {
        wait::until(&format!("replies from {names:?}"), DEADLINE, || async {
            let counts = client.counts().await?;
            Ok(names.iter().all(|n| counts.of(self.address(n)) > 0).then_some(()))
        })
        .await?;
        client.reset().await
    }

    /// Echo calls served by `names`' backends over a window of at least `calls` of them in all,
    /// from now on.
    async fn window(&self, names: &[&str], calls: u64) -> Result<BTreeMap<String, u64>> {
        let before: Vec<u64> = names.iter().map(|n| self.requests(n)).collect();
        let delta = || -> BTreeMap<String, u64> {
            names
                .iter()
                .zip(&before)
                .map(|(n, b)| (n.to_string(), self.requests(n) - b))
                .collect()
        };
        wait::until(&format!("{calls} Echo calls served"), DEADLINE, || async {
            let counts = delta();
            Ok((counts.values().sum::<u64>() >= calls).then_some(counts))
        })
        .await
    }

    /// The RouteConfiguration NACKs the server counted (the test's clients are its only ones).
    fn route_nacks(&self) -> u64 {
        self.xds
            .metrics
            .xds_nacks
            .get_or_create(&XdsTypeLabels {
                type_url: type_url::ROUTE.into(),
            })
            .get()
    }
}

/// Writes GrpcBackend `name`'s status by hand: one Serving endpoint at `address`, and `table`.
async fn publish(s: &Scenario, name: &str, address: SocketAddr, table: &[RouteEntry]) -> Result<()> {
    let endpoint = json!({"address": address.ip().to_string(), "port": address.port(), "weight": 100,
        "health": "Serving", "serving": true, "terminating": false});
    s.backends()
        .patch_status(
            name,
            &PatchParams::apply("kubegrpc-tests").force(),
            &Patch::Apply(json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
                "status": {"endpoints": [endpoint], "readyEndpoints": 1, "totalEndpoints": 1, "routes": table}})),
        )
        .await
        .with_context(|| format!("writing {}/{name}'s status", s.namespace))?;
    Ok(())
}

/// The RouteConfiguration `name` the server at `address` serves now, asked on a fresh ADS stream.
async fn served_route(address: SocketAddr, name: &str) -> Result<RouteConfiguration> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{address}")).await?;
    let request = DiscoveryRequest {
        type_url: type_url::ROUTE.into(),
        resource_names: vec![name.into()],
        ..Default::default()
    };
    let mut responses = ads
        .stream_aggregated_resources(futures::stream::iter([request]).chain(futures::stream::pending()))
        .await?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .context("no ADS response within 10s")??
        .context("the ADS stream ended")?;
    let Some(resource) = response.resources.first() else {
        bail!("{name} is not served")
    };
    Ok(RouteConfiguration::decode(resource.value.as_slice())?)
}

use futures::StreamExt as _;

fn entry(method: Option<MethodMatch>, headers: Vec<HeaderMatch>, backends: &[(&str, u32)]) -> RouteEntry {
    RouteEntry {
        route: "test/hand-written".into(),
        rule: 0,
        method,
        headers,
        backends: backends
            .iter()
            .map(|(name, weight)| RouteBackend {
                name: name.to_string(),
                namespace: None,
                weight: *weight,
            })
            .collect(),
        timeout: None,
        retry: None,
    }
}

fn share(counts: &BTreeMap<String, u64>, name: &str) -> f64 {
    counts[name] as f64 / counts.values().sum::<u64>().max(1) as f64
}

/// No call the client sent since its last reset failed; on failure, says when they were sent
/// (Unix ms, beside the times the tables changed) and why (the failures since the client started).
async fn assert_no_failures(r: &Routed, client: &XdsClient, what: &str) -> Result<XdsCounts> {
    let counts = client.counts().await?;
    if counts.failures() > 0 {
        let failures = client.failures().await?;
        let mut by_reason: BTreeMap<String, (usize, i64, i64)> = BTreeMap::new();
        for f in &failures {
            let entry = by_reason
                .entry(format!(
                    "{} {}",
                    f.code,
                    f.message.split(" after ").next().unwrap_or_default()
                ))
                .or_insert((0, i64::MAX, 0));
            *entry = (
                entry.0 + 1,
                entry.1.min(f.sent / 1_000_000),
                entry.2.max(f.sent / 1_000_000),
            );
        }
        panic!(
            "{what}: failed calls: {counts:?}; by reason (count, first and last sent, Unix ms): \
             {by_reason:#?}; tables changed at {:?}",
            r.changes.lock().unwrap()
        );
    }
    Ok(counts)
}

// === weights 70/30/0 (the Gateway API's MeshGRPCRouteWeight, proxyless) ===

async fn weights_70_30_0(peer: XdsPeer) -> Result<()> {
    let r = Routed::start(&format!("routes-w-{peer}"), &[PARENT, "v1", "v2", "v3"]).await?;
    r.route(&[entry(None, vec![], &[("v1", 70), ("v2", 30), ("v3", 0)])])
        .await?;
    let client = r.client(peer, RATE, None, &[]).await?;
    r.warm_up(&client, &["v1", "v2"]).await?;
    let counts = r.window(&["v1", "v2", "v3", PARENT], 3000).await?;
    println!(
        "routes, {peer} xDS client, weights 70/30/0: served {counts:?} (v1 {:.1}%, v2 {:.1}%)",
        100.0 * share(&counts, "v1"),
        100.0 * share(&counts, "v2")
    );
    assert!((share(&counts, "v1") - 0.70).abs() <= 0.03, "{counts:?}");
    assert!((share(&counts, "v2") - 0.30).abs() <= 0.03, "{counts:?}");
    assert_eq!(
        (r.requests("v3"), r.checks("v3")),
        (0, 0),
        "the weight-0 backend was called"
    );
    assert_eq!(
        r.requests(PARENT),
        0,
        "with a table, the parent's own backend is not called"
    );
    assert_no_failures(&r, &client, "weights 70/30/0").await?;
    assert_eq!(r.route_nacks(), 0, "the client refused a RouteConfiguration");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_splits_calls_70_30_0_by_route_weights() -> Result<()> {
    weights_70_30_0(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_splits_calls_70_30_0_by_route_weights() -> Result<()> {
    weights_70_30_0(XdsPeer::Java).await
}

// === a method match and a header match to v2, the rest to v1 ===

/// The table of the matches scenario: Health/Check (a method match) and calls whose track header
/// is `canary` or `v2` (a whole-value regular expression) go to v2, then `unroutable` (a track
/// header matching an entry with no weighted backend), then, with `catch_all`, the rest to v1.
fn matches_table(unroutable: Option<&str>, catch_all: bool) -> Vec<RouteEntry> {
    let header = |match_type, value: &str| HeaderMatch {
        match_type,
        name: TRACK.into(),
        value: value.into(),
    };
    let mut table = vec![
        entry(
            Some(MethodMatch {
                match_type: MatchType::Exact,
                service: Some("grpc.health.v1.Health".into()),
                method: Some("Check".into()),
            }),
            vec![],
            &[("v2", 1)],
        ),
        entry(
            None,
            vec![header(MatchType::RegularExpression, "canary|v2")],
            &[("v2", 1)],
        ),
    ];
    if let Some(value) = unroutable {
        table.push(entry(None, vec![header(MatchType::Exact, value)], &[("v1", 0)]));
    }
    if catch_all {
        table.push(entry(None, vec![], &[("v1", 1)]));
    }
    table
}

/// How a client fails a call that matches an entry without a weighted backend
/// (`non_forwarding_action`), and one that matches no entry, in its own words.
fn unavailable_reasons(peer: XdsPeer) -> (&'static str, &'static str) {
    match peer {
        XdsPeer::Go => (
            "matched route does not have a supported route action type",
            "no matched route was found",
        ),
        XdsPeer::Java => (
            "Could not route RPC to Route with non-forwarding action",
            "Could not find xDS route matching RPC",
        ),
    }
}

/// Waits until the client fails a call for `reason` (the new table reached it), then counts a
/// window of `calls` calls sent after that: every one must fail UNAVAILABLE for that reason.
async fn assert_all_unavailable(client: &XdsClient, reason: &str, calls: u64) -> Result<()> {
    let seen = client.failures().await?.len();
    wait::until(&format!("a call failed with {reason:?}"), DEADLINE, || async {
        let failures = client.failures().await?;
        Ok(failures[seen.min(failures.len())..]
            .iter()
            .any(|f| f.message.contains(reason))
            .then_some(()))
    })
    .await?;
    client.reset().await?;
    let from = client.failures().await?.len();
    let counts = wait::until(&format!("{calls} calls after {reason:?}"), DEADLINE, || async {
        let counts = client.counts().await?;
        Ok((counts.failures() + counts.succeeded() >= calls).then_some(counts))
    })
    .await?;
    let failures = client.failures().await?;
    let other: Vec<_> = failures[from..]
        .iter()
        .filter(|f| f.code != "Unavailable" || !f.message.contains(reason))
        .collect();
    println!("  {reason:?}: {counts:?}");
    assert_eq!(counts.succeeded(), 0, "calls succeeded: {counts:?}");
    assert!(
        other.is_empty(),
        "calls failed otherwise: {:?}",
        &other[..other.len().min(3)]
    );
    Ok(())
}

async fn method_and_header_matches(peer: XdsPeer) -> Result<()> {
    let r = Routed::start(&format!("routes-m-{peer}"), &[PARENT, "v1", "v2"]).await?;
    r.route(&matches_table(None, true)).await?;
    let rate = RATE / 3;
    let checks = r.client(peer, rate, Some(HEALTH_CHECK), &[]).await?;
    let canary = r.client(peer, rate, None, &[(TRACK, "canary")]).await?;
    // Not a match: the regular expression matches the whole value.
    let plain = r.client(peer, rate, None, &[(TRACK, "v2-beta")]).await?;
    for (client, to) in [(&checks, "v2"), (&canary, "v2"), (&plain, "v1")] {
        r.warm_up(client, &[to]).await?;
    }
    let (checks_ok, canary_ok, plain_ok) = (
        checks.wait_for(500, DEADLINE).await?,
        canary.wait_for(500, DEADLINE).await?,
        plain.wait_for(500, DEADLINE).await?,
    );
    let served = |name: &str| (r.requests(name), r.checks(name));
    println!(
        "routes, {peer} xDS client, matches: Check {:?}, track=canary {:?}, track=v2-beta {:?}; \
         served (Echo, Check): v1 {:?}, v2 {:?}, parent {:?}",
        checks_ok.ok,
        canary_ok.ok,
        plain_ok.ok,
        served("v1"),
        served("v2"),
        served(PARENT)
    );
    let only = |name: &str| vec![r.address(name).to_string()];
    // Who answered: Echo replies carry the backend's own address, Checks the peer's.
    assert_eq!(
        checks_ok.ok.keys().cloned().collect::<Vec<_>>(),
        only("v2"),
        "{checks_ok:?}"
    );
    assert_eq!(
        canary_ok.ok.keys().cloned().collect::<Vec<_>>(),
        only("v2"),
        "{canary_ok:?}"
    );
    assert_eq!(
        plain_ok.ok.keys().cloned().collect::<Vec<_>>(),
        only("v1"),
        "{plain_ok:?}"
    );
    // At the backends: no Check reached v1, nothing reached the parent's own backend, and each
    // backend served at least what the clients saw it answer.
    assert_eq!(r.checks("v1"), 0, "a Check was routed to v1");
    assert_eq!(served(PARENT), (0, 0), "the parent's own backend was called");
    assert!(r.checks("v2") >= checks_ok.succeeded());
    assert!(r.requests("v2") >= canary_ok.succeeded() && r.requests("v1") >= plain_ok.succeeded());
    for (client, what) in [(&checks, "Check"), (&canary, "canary"), (&plain, "plain")] {
        assert_no_failures(&r, client, what).await?;
    }

    // An entry whose backends all weigh 0 fails the calls it matches, UNAVAILABLE, rather than
    // letting them fall through to the catch-all after it.
    let (non_forwarding, no_match) = unavailable_reasons(peer);
    let before = r.requests("v1");
    r.route(&matches_table(Some("v2-beta"), true)).await?;
    assert_all_unavailable(&plain, non_forwarding, 200).await?;
    // No match at all (no catch-all): UNAVAILABLE too.
    r.route(&matches_table(None, false)).await?;
    assert_all_unavailable(&plain, no_match, 200).await?;
    let after = r.requests("v1");
    // The Check and canary calls kept their routes across both changes.
    for (client, what) in [(&checks, "Check"), (&canary, "canary")] {
        let counts = assert_no_failures(&r, client, what).await?;
        assert!(
            counts.ok.keys().all(|k| *k == r.address("v2").to_string()),
            "{what}: {counts:?}"
        );
    }
    assert_eq!(r.checks("v1"), 0, "a Check was routed to v1 across the changes");
    assert_eq!(r.route_nacks(), 0, "the client refused a RouteConfiguration");
    println!(
        "  v1 served {} Echo calls during the two changes (the plain calls before they failed)",
        after - before
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_routes_a_method_match_and_a_header_match_to_v2_and_the_rest_to_v1() -> Result<()> {
    method_and_header_matches(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_routes_a_method_match_and_a_header_match_to_v2_and_the_rest_to_v1() -> Result<()> {
    method_and_header_matches(XdsPeer::Java).await
}

// === a canary: 100/0 -> 90/10 -> 0/100 under load ===

async fn canary_steps(peer: XdsPeer) -> Result<()> {
    const WINDOW: u64 = 2000;
    let r = Routed::start(&format!("routes-c-{peer}"), &[PARENT, "v1", "v2"]).await?;
    let step = |v1, v2| vec![entry(None, vec![], &[("v1", v1), ("v2", v2)])];
    r.route(&step(100, 0)).await?;
    let client = r.client(peer, RATE, None, &[]).await?;
    r.warm_up(&client, &["v1"]).await?;
    let all = r.window(&["v1", "v2"], WINDOW).await?;
    println!("routes, {peer} xDS client, canary 100/0: served {all:?}");
    assert_eq!(all["v2"], 0, "100/0 sent calls to v2: {all:?}");

    // 90/10: counted from v2's first call (the client has the new table). v1 stays in the
    // route, and on the connection it had.
    let v1_connections = r.connections("v1");
    let v2_before = r.requests("v2");
    r.route(&step(90, 10)).await?;
    wait::until("v2 answering", DEADLINE, || async {
        Ok((r.requests("v2") > v2_before).then_some(()))
    })
    .await?;
    let tenth = r.window(&["v1", "v2"], WINDOW).await?;
    println!(
        "routes, {peer} xDS client, canary 90/10: served {tenth:?} (v2 {:.1}%)",
        100.0 * share(&tenth, "v2")
    );
    assert!((share(&tenth, "v2") - 0.10).abs() <= 0.03, "{tenth:?}");
    assert_eq!(r.connections("v1"), v1_connections, "v1 was reconnected");

    // 0/100: counted once v1 has had no call for half a second of calls at v2 (the client has
    // the new table); from then on v1 gets none.
    let v2_connections = r.connections("v2");
    r.route(&step(0, 100)).await?;
    let mut last = (r.requests("v1"), r.requests("v2"));
    wait::until("v1 drained", DEADLINE, || {
        let now = (r.requests("v1"), r.requests("v2"));
        let drained = now.0 == last.0 && now.1 - last.1 >= u64::from(RATE / 2);
        if now.0 != last.0 {
            last = now;
        }
        async move { Ok(drained.then_some(())) }
    })
    .await?;
    let moved = r.window(&["v1", "v2"], WINDOW).await?;
    println!("routes, {peer} xDS client, canary 0/100: served {moved:?}");
    assert_eq!(moved["v1"], 0, "0/100 sent calls to v1: {moved:?}");
    assert_eq!(r.connections("v2"), v2_connections, "v2 was reconnected");

    let counts = assert_no_failures(&r, &client, "canary steps").await?;
    println!("routes, {peer} xDS client, canary: the client's counts over the three steps {counts:?}");
    assert_eq!(r.requests(PARENT), 0, "the parent's own backend was called");
    assert_eq!(r.route_nacks(), 0, "the client refused a RouteConfiguration");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_follows_canary_weights_100_0_then_90_10_then_0_100_without_a_failed_call() -> Result<()> {
    canary_steps(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_follows_canary_weights_100_0_then_90_10_then_0_100_without_a_failed_call() -> Result<()> {
    canary_steps(XdsPeer::Java).await
}

// === a backend GrpcBackend that does not exist, then does, then is deleted ===

async fn backend_coming_and_going(peer: XdsPeer) -> Result<()> {
    const WINDOW: u64 = 1000;
    let r = Routed::start_with(&format!("routes-g-{peer}"), &[PARENT, "v1"], &["v2"]).await?;
    // v2 has no GrpcBackend: the server leaves it out and v1 takes its share (a client told of
    // a Cluster that never comes would hold every call for 15 s, then fail v2's share).
    r.route(&[entry(None, vec![], &[("v1", 70), ("v2", 30)])]).await?;
    let client = r.client(peer, RATE, None, &[]).await?;
    r.warm_up(&client, &["v1"]).await?;
    let alone = r.window(&["v1", "v2"], WINDOW).await?;
    println!("routes, {peer} xDS client, v2 missing: served {alone:?}");
    assert_eq!(alone["v2"], 0, "{alone:?}");

    // v2 appears: it takes its share.
    r.create("v2").await?;
    r.served().await?;
    let v2_before = r.requests("v2");
    wait::until("v2 answering", DEADLINE, || async {
        Ok((r.requests("v2") > v2_before).then_some(()))
    })
    .await?;
    let both = r.window(&["v1", "v2"], 2 * WINDOW).await?;
    println!(
        "routes, {peer} xDS client, v2 created: served {both:?} (v2 {:.1}%)",
        100.0 * share(&both, "v2")
    );
    assert!((share(&both, "v2") - 0.30).abs() <= 0.05, "{both:?}");

    // v2 is deleted (its backend still runs): left out again, v1 takes every call. A client
    // keeps a deleted Cluster (ignore_resource_deletion), so only the table can move them.
    r.delete("v2").await?;
    r.served().await?;
    let mut last = (r.requests("v2"), r.requests("v1"));
    wait::until("v2 drained", DEADLINE, || {
        let now = (r.requests("v2"), r.requests("v1"));
        let drained = now.0 == last.0 && now.1 - last.1 >= u64::from(RATE / 2);
        if now.0 != last.0 {
            last = now;
        }
        async move { Ok(drained.then_some(())) }
    })
    .await?;
    let after = r.window(&["v1", "v2"], WINDOW).await?;
    println!("routes, {peer} xDS client, v2 deleted: served {after:?}");
    assert_eq!(after["v2"], 0, "{after:?}");
    let counts = assert_no_failures(&r, &client, "a backend coming and going").await?;
    println!("routes, {peer} xDS client, a backend coming and going: the client's counts {counts:?}");
    assert_eq!(r.route_nacks(), 0, "the client refused a RouteConfiguration");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_routes_around_a_backend_grpcbackend_until_it_exists_and_after_it_is_deleted() -> Result<()> {
    backend_coming_and_going(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_routes_around_a_backend_grpcbackend_until_it_exists_and_after_it_is_deleted() -> Result<()> {
    backend_coming_and_going(XdsPeer::Java).await
}
