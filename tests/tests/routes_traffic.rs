//! The Gateway API's mesh GRPCRoute scenarios, proxyless: real GRPCRoutes resolved by the real
//! operator, its xDS server serving the result, and each client kind a user runs — the kubegrpc
//! Rust client, a grpc-go xDS client, a grpc-java xDS client — sending calls to the parent
//! Service `echo`, every share counted at the backends (in-process echo servers on 10.250.x.y).
//!
//! The conformance suite's harness (`conformance/tests/mesh/`) assumes traffic interception, so
//! it cannot drive an `xds:///` client; these are its MeshGRPCRoute scenarios reproduced.
//!
//! Each Service (`echo`, `v1`, `v2`, `v3`) has one backend and a GrpcBackend balancing it; the
//! route attaches to `echo`, whose own backend must get nothing once a route applies. Client
//! kinds take turns, so that a window counted at the backends is one client's calls.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, ensure};
use kubegrpc::Channel;
use kubegrpc_echo::{Backend, BackendOptions, EchoClient, EchoRequest, StatsRequest};
use kubegrpc_tests::{
    backends::start_backend,
    load::RateLoad,
    operator::InProcessOperator,
    routes::{apply_route, balanced_service, condition, service_backend, service_parent, wait_route_parent, weights},
    scenario::Scenario,
    wait,
    xds::{InProcessXds, XdsClient, XdsClientOptions, XdsPeer},
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(120);
const RATE: u32 = 200;
/// A call's deadline in the xDS clients: these tests assert where calls go and that none fails
/// for a route change, not latency, and JVMs beside a loaded build stall for seconds.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Calls per share window: a share of 0.7 over 3,000 random picks has a standard deviation of
/// 0.84 points, so the 3-point tolerance sits at 3.6 of them (xDS clients pick at random; the
/// Rust client's weighted round robin is exact).
const WINDOW: u64 = 3000;
const ECHO: &str = "/kubegrpc.echo.v1.Echo/Echo";
const STATS: &str = "/kubegrpc.echo.v1.Echo/Stats";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rust,
    Xds(XdsPeer),
}

const KINDS: [Kind; 3] = [Kind::Rust, Kind::Xds(XdsPeer::Go), Kind::Xds(XdsPeer::Java)];

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Rust => f.write_str("kubegrpc Rust client"),
            Kind::Xds(peer) => write!(f, "{peer} xDS client"),
        }
    }
}

/// The Services, their backends, the operator and its xDS server.
struct Mesh {
    s: Scenario,
    xds: InProcessXds,
    _operator: InProcessOperator,
    backends: BTreeMap<&'static str, Backend>,
}

impl Mesh {
    async fn start(prefix: &str, names: &[&'static str]) -> Result<Self> {
        let s = Scenario::new(prefix).await?;
        s.control_plane.install_gateway_api().await?;
        let mut backends = BTreeMap::new();
        for &name in names {
            let backend = start_backend(BackendOptions::default()).await?;
            balanced_service(&s, name, &[&backend]).await?;
            backends.insert(name, backend);
        }
        let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
        let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
        for &name in names {
            s.wait_status(name, "its backend Serving", DEADLINE, |status| {
                status.ready_endpoints == 1
            })
            .await?;
        }
        Ok(Self {
            s,
            xds,
            _operator: operator,
            backends,
        })
    }

    /// Applies the route `name` and waits until `echo`'s published table satisfies `accept`.
    async fn route(
        &self,
        name: &str,
        spec: Value,
        what: &str,
        accept: impl Fn(&[kubegrpc_crds::routes::RouteEntry]) -> bool,
    ) -> Result<()> {
        apply_route(&self.s.client, &self.s.namespace, name, spec).await?;
        self.s
            .wait_status("echo", what, DEADLINE, |status| accept(&status.routes))
            .await?;
        Ok(())
    }

    fn echo_calls(&self) -> BTreeMap<&'static str, u64> {
        self.backends
            .iter()
            .map(|(name, b)| (*name, b.counters.snapshot().requests))
            .collect()
    }

    fn stats_calls(&self) -> BTreeMap<&'static str, u64> {
        self.backends
            .iter()
            .map(|(name, b)| (*name, b.counters.stats_calls.load(std::sync::atomic::Ordering::SeqCst)))
            .collect()
    }

    /// Waits until `calls` more Echo calls were served in all, and returns each backend's part.
    async fn echo_window(&self, calls: u64) -> Result<BTreeMap<&'static str, u64>> {
        let before = self.echo_calls();
        wait::until(&format!("{calls} Echo calls served"), DEADLINE, || async {
            let delta = minus(&self.echo_calls(), &before);
            Ok((delta.values().sum::<u64>() >= calls).then_some(delta))
        })
        .await
    }

    fn target(&self) -> String {
        format!("echo.{}", self.s.namespace)
    }

    async fn rust_channel(&self) -> Result<Channel> {
        let channel = Channel::builder(self.s.client.clone(), &self.s.namespace, "echo")
            .connect()
            .await?;
        tokio::time::timeout(DEADLINE, channel.ready())
            .await
            .context("the Rust client never had a usable route")?;
        Ok(channel)
    }

    /// An xDS client of `echo` calling `method` with `metadata`, warmed up: it has had replies
    /// from each of `serving` (every Cluster it picks is connected: a window must not count the
    /// time a new Cluster's calls wait for its connection), and its counts start afresh.
    async fn xds_client(
        &self,
        peer: XdsPeer,
        method: &str,
        metadata: &[(&str, &str)],
        serving: &[&str],
    ) -> Result<XdsClient> {
        let client = XdsClient::start_with(XdsClientOptions {
            peer,
            method: (method != ECHO).then(|| method.to_string()),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            timeout: Some(CALL_DEADLINE),
            ..XdsClientOptions::new(&[self.target()], self.xds.address, RATE)
        })
        .await?;
        wait::until(&format!("{peer}: replies from {serving:?}"), DEADLINE, || async {
            let counts = client.counts().await?;
            Ok(serving
                .iter()
                .all(|name| counts.of(self.backends[name].address) > 0)
                .then_some(()))
        })
        .await?;
        client.reset().await?;
        Ok(client)
    }
}

fn minus(after: &BTreeMap<&'static str, u64>, before: &BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

fn share(window: &BTreeMap<&'static str, u64>, name: &str) -> f64 {
    window.get(name).copied().unwrap_or(0) as f64 / window.values().sum::<u64>().max(1) as f64
}

fn echo_request() -> EchoRequest {
    EchoRequest {
        message: "x".into(),
        ..Default::default()
    }
}

/// Continuous Echo calls from one client kind, until stopped; says how many failed.
enum Caller {
    Rust(RateLoad),
    Xds(XdsClient),
}

impl Caller {
    /// Starts `kind`'s calls once it is connected to each of `serving`.
    async fn start(mesh: &Mesh, kind: Kind, serving: &[&str]) -> Result<Self> {
        Ok(match kind {
            Kind::Rust => Self::Rust(RateLoad::start(
                mesh.rust_channel().await?,
                RATE,
                u64::MAX,
                DEADLINE * 10,
            )),
            Kind::Xds(peer) => Self::Xds(mesh.xds_client(peer, ECHO, &[], serving).await?),
        })
    }

    /// Stops the calls (the Rust client's wait for those in flight; an xDS client's process ends).
    async fn stop(self) {
        match self {
            Self::Rust(load) => drop(load.stop().await),
            Self::Xds(client) => drop(client),
        }
    }

    /// Failed calls so far (since the warm-up, for xDS clients), by code.
    async fn failed(&self) -> Result<BTreeMap<String, u64>> {
        Ok(match self {
            Self::Rust(load) => load.report().failed_by_code,
            Self::Xds(client) => client.counts().await?.failed,
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_70_30_0_over_three_services_are_the_shares_every_client_kind_sends() -> Result<()> {
    let mesh = Mesh::start("mesh-weights", &["echo", "v1", "v2", "v3"]).await?;
    mesh.route(
        "weights",
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("v1", 70), service_backend("v2", 30), service_backend("v3", 0)
        ]}]}),
        "the 70/30/0 table",
        |table| table.len() == 1 && weights(&table[0]).iter().map(|(_, w)| *w).collect::<Vec<_>>() == [70, 30, 0],
    )
    .await?;

    for kind in KINDS {
        let caller = Caller::start(&mesh, kind, &["v1", "v2"]).await?;
        let window = mesh.echo_window(WINDOW).await?;
        let failed = caller.failed().await?;
        caller.stop().await;
        println!("{kind}: 70/30/0 -> served {window:?}, failed {failed:?}");
        ensure!(failed.is_empty(), "{kind}: failed calls {failed:?}");
        ensure!(
            (share(&window, "v1") - 0.70).abs() <= 0.03,
            "{kind}: v1's share in {window:?}"
        );
        ensure!(
            (share(&window, "v2") - 0.30).abs() <= 0.03,
            "{kind}: v2's share in {window:?}"
        );
        ensure!(
            window["v3"] == 0,
            "{kind}: the weight-0 backend served calls: {window:?}"
        );
        ensure!(
            window["echo"] == 0,
            "{kind}: the parent's own backend served calls: {window:?}"
        );
        // The caller stopped: let its calls in flight land before the next window.
        mesh.settle().await?;
    }
    Ok(())
}

impl Mesh {
    /// Waits until no call lands for half a second (the previous caller's last calls are in).
    async fn settle(&self) -> Result<()> {
        let counts = || (self.echo_calls(), self.stats_calls());
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut last = counts();
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = counts();
            if now != last {
                last = now;
                quiet_since = tokio::time::Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(500) {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "calls kept landing for {DEADLINE:?}"
            );
        }
    }
}

/// A kind of call: its method, its metadata, and the backend it must land on.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread")]
async fn a_method_match_and_a_header_match_send_matching_calls_to_v2_and_the_rest_to_v1() -> Result<()> {
    let mesh = Mesh::start("mesh-matches", &["echo", "v1", "v2"]).await?;
    mesh.route(
        "v2-for-stats-and-testers",
        json!({"parentRefs": [service_parent("echo")], "rules": [
            {"matches": [{"method": {"service": "kubegrpc.echo.v1.Echo", "method": "Stats"}},
                         {"headers": [{"name": "x-tester", "value": "v2"}]}],
             "backendRefs": [service_backend("v2", 1)]},
            {"backendRefs": [service_backend("v1", 1)]},
        ]}),
        "the three-entry table",
        |table| table.len() == 3,
    )
    .await?;

    const CALLS: u64 = 300;
    for kind in KINDS {
        // (method, metadata) -> where the calls must land
        let cases: [Case; 3] = [
            (ECHO, &[], "v1"),
            (ECHO, &[("x-tester", "v2")], "v2"),
            (STATS, &[], "v2"),
        ];
        for (method, metadata, expected) in cases {
            let echo_before = mesh.echo_calls();
            let stats_before = mesh.stats_calls();
            match kind {
                Kind::Rust => {
                    let channel = mesh.rust_channel().await?;
                    let mut client = EchoClient::new(channel);
                    for _ in 0..CALLS {
                        if method == STATS {
                            client.stats(StatsRequest {}).await?;
                        } else {
                            let mut request = tonic::Request::new(echo_request());
                            for (key, value) in metadata {
                                request.metadata_mut().insert(*key, value.parse()?);
                            }
                            client.echo(request).await?;
                        }
                    }
                }
                Kind::Xds(peer) => {
                    let client = mesh.xds_client(peer, method, metadata, &[expected]).await?;
                    client.wait_for(CALLS, DEADLINE).await?;
                    let failed = client.counts().await?.failed;
                    ensure!(failed.is_empty(), "{kind}: {method} {metadata:?}: failed {failed:?}");
                    drop(client);
                    mesh.settle().await?;
                }
            }
            let echo = minus(&mesh.echo_calls(), &echo_before);
            let stats = minus(&mesh.stats_calls(), &stats_before);
            let landed = if method == STATS { &stats } else { &echo };
            println!("{kind}: {method} {metadata:?} -> Echo served {echo:?}, Stats served {stats:?}");
            let misrouted: u64 = landed
                .iter()
                .filter(|(name, _)| **name != expected)
                .map(|(_, n)| n)
                .sum();
            ensure!(misrouted == 0, "{kind}: {method} {metadata:?} misrouted: {landed:?}");
            ensure!(landed[expected] >= CALLS, "{kind}: {method} {metadata:?}: {landed:?}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_stepped_as_a_canary_controller_does_fail_no_call_of_any_client_kind() -> Result<()> {
    let mesh = Mesh::start("mesh-canary", &["echo", "v1", "v2"]).await?;
    let split = |a: i32, b: i32| {
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("v1", a), service_backend("v2", b)
        ]}]})
    };
    let published = |a: u32, b: u32| {
        move |table: &[kubegrpc_crds::routes::RouteEntry]| {
            table.len() == 1 && weights(&table[0]).iter().map(|(_, w)| *w).collect::<Vec<_>>() == [a, b]
        }
    };
    mesh.route("canary", split(100, 0), "100/0", published(100, 0)).await?;
    // Every client kind at once, as in a cluster during a rollout.
    let mut callers = Vec::new();
    for kind in KINDS {
        callers.push((kind, Caller::start(&mesh, kind, &["v1"]).await?));
    }

    for (a, b) in [(100, 0), (90, 10), (0, 100)] {
        mesh.route(
            "canary",
            split(a, b),
            &format!("{a}/{b}"),
            published(a as u32, b as u32),
        )
        .await?;
        // Each client follows on its own watch or ADS stream: the shares settle once all have
        // it. A window whose shares are within 3 points of the step's shows they did.
        let expected = f64::from(b) / 100.0;
        let window = wait::until(&format!("a window with v2's share at {expected}"), DEADLINE, || async {
            let window = mesh.echo_window(WINDOW).await?;
            Ok(((share(&window, "v2") - expected).abs() <= 0.03 && window["echo"] == 0).then_some(window))
        })
        .await?;
        println!("{a}/{b}: served {window:?}");
    }
    for (kind, caller) in &callers {
        let failed = caller.failed().await?;
        println!("{kind}: failed {failed:?}");
        ensure!(
            failed.is_empty(),
            "{kind}: calls failed while weights changed: {failed:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_backend_is_reported_and_the_others_take_its_share_with_no_failed_call() -> Result<()> {
    let mesh = Mesh::start("mesh-missing", &["echo", "v1", "v2"]).await?;
    apply_route(
        &mesh.s.client,
        &mesh.s.namespace,
        "with-missing",
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("v1", 50), service_backend("v2", 25), service_backend("missing", 25)
        ]}]}),
    )
    .await?;
    wait_route_parent(
        &mesh.s.client,
        &mesh.s.namespace,
        "with-missing",
        "echo",
        DEADLINE,
        |e| condition(e, "ResolvedRefs") == Some(("False".into(), "BackendNotFound".into())),
    )
    .await?;
    mesh.s
        .wait_status("echo", "a table without the missing backend", DEADLINE, |s| {
            s.routes.len() == 1 && s.routes[0].backends.len() == 2
        })
        .await?;
    for kind in KINDS {
        let caller = Caller::start(&mesh, kind, &["v1", "v2"]).await?;
        let window = mesh.echo_window(WINDOW).await?;
        let failed = caller.failed().await?;
        caller.stop().await;
        println!("{kind}: 50/25/missing 25 -> served {window:?}, failed {failed:?}");
        ensure!(failed.is_empty(), "{kind}: failed calls {failed:?}");
        // v1 and v2 share the missing backend's part in their proportion: 2/3 and 1/3.
        ensure!((share(&window, "v1") - 2.0 / 3.0).abs() <= 0.03, "{kind}: {window:?}");
        ensure!(window["echo"] == 0, "{kind}: {window:?}");
        mesh.settle().await?;
    }
    Ok(())
}
