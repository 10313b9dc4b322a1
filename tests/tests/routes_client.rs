//! The Rust client follows a GrpcBackend's routing table (`status.routes`), end to end against
//! a real apiserver, without the operator: each test writes the GrpcBackends' statuses itself,
//! the routing table included, as the operator would once it has resolved the GRPCRoutes.
//! Every share is counted at the backends (real tonic echo servers on 10.250.x.y).
//!
//! The GrpcBackend `echo` carries the table and has one endpoint of its own (`root`, which a
//! table that does not name `echo` must never reach); `v1`, `v2`, `v3` have one endpoint each.

use std::time::Duration;

use anyhow::{Result, ensure};
use kube::api::{Patch, PatchParams};
use kubegrpc::{Channel, RoutingSnapshot};
use kubegrpc_echo::{Backend, EchoClient, EchoRequest};
use kubegrpc_tests::{
    backends::start_backends,
    load::Load,
    scenario::{Scenario, wait_snapshot},
    wait,
};
use serde_json::{Value, json};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const DEADLINE: Duration = Duration::from_secs(30);

/// `echo` (the table's) and the three it routes to, each with one running backend.
struct Routed {
    s: Scenario,
    root: Backend,
    v1: Backend,
    v2: Backend,
    v3: Backend,
}

impl Routed {
    async fn start(prefix: &str) -> Result<Self> {
        let s = Scenario::new(prefix).await?;
        let mut backends = start_backends(4).await?.into_iter();
        let mut next = || backends.next().expect("four backends");
        let (root, v1, v2, v3) = (next(), next(), next(), next());
        for (name, backend) in [("echo", &root), ("v1", &v1), ("v2", &v2), ("v3", &v3)] {
            s.grpc_backend(name, json!({"service": name, "port": "grpc"})).await?;
            s.publish_serving(name, &[backend.address]).await?;
        }
        Ok(Self { s, root, v1, v2, v3 })
    }

    fn all(&self) -> [&Backend; 4] {
        [&self.root, &self.v1, &self.v2, &self.v3]
    }

    /// Writes `echo`'s `status.routes`, under a field manager of its own so that the endpoints
    /// written by `publish_serving` stay.
    async fn publish_routes(&self, routes: Value) -> Result<()> {
        let status = json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend", "status": {"routes": routes}});
        self.s
            .backends()
            .patch_status(
                "echo",
                &PatchParams::apply("kubegrpc-tests-routes").force(),
                &Patch::Apply(status),
            )
            .await?;
        Ok(())
    }

    /// One table entry sending every call to `weights`.
    fn catch_all(&self, weights: &[(&str, u32)]) -> Value {
        json!([{"route": format!("{}/echo", self.s.namespace), "rule": 0, "backends": backends(weights)}])
    }

    async fn connect(&self) -> Result<Channel> {
        Ok(Channel::builder(self.s.client.clone(), &self.s.namespace, "echo")
            .connect()
            .await?)
    }

    /// Waits until each backend has its one connection (every pool connects when its endpoint
    /// appears, with one health Check) and that Check was answered.
    async fn wait_connected(&self) -> Result<()> {
        wait::until(
            "one connection and its warm-up Check at every backend",
            DEADLINE,
            || async {
                let seen: Vec<(u64, u64)> = self
                    .all()
                    .iter()
                    .map(|b| {
                        let c = b.counters.snapshot();
                        (c.connections_accepted, c.health_checks)
                    })
                    .collect();
                ensure!(
                    seen.iter().all(|(c, _)| *c <= 1),
                    "a backend was connected twice: {seen:?}"
                );
                Ok(seen.iter().all(|(c, h)| *c == 1 && *h >= 1).then_some(()))
            },
        )
        .await
    }

    /// `Echo` requests each of root, v1, v2, v3 has served.
    fn requests(&self) -> [u64; 4] {
        self.all().map(|b| b.counters.snapshot().requests)
    }

    fn connections_accepted(&self) -> [u64; 4] {
        self.all().map(|b| b.counters.snapshot().connections_accepted)
    }

    fn health_checks(&self) -> [u64; 4] {
        self.all().map(|b| b.counters.snapshot().health_checks)
    }
}

fn backends(weights: &[(&str, u32)]) -> Value {
    weights
        .iter()
        .map(|(name, weight)| json!({"name": name, "weight": weight}))
        .collect()
}

/// Waits until the channel's routing table satisfies `accept`.
async fn wait_routing(channel: &Channel, what: &str, accept: impl Fn(&RoutingSnapshot) -> bool) -> Result<()> {
    wait_snapshot(channel, what, DEADLINE, |snapshot| {
        snapshot.routing.as_ref().is_some_and(&accept)
    })
    .await
}

/// Every GrpcBackend the table names has its endpoint in rotation.
fn every_pool_in_rotation(routing: &RoutingSnapshot) -> bool {
    routing
        .backends
        .iter()
        .all(|b| b.snapshot.endpoints.len() == 1 && b.snapshot.endpoints.iter().all(|e| e.in_rotation))
}

/// The weights of the table's first entry, in its order.
fn first_entry_weights(routing: &RoutingSnapshot) -> Vec<u32> {
    routing
        .entries
        .first()
        .map(|e| e.entry.backends.iter().map(|b| b.weight).collect())
        .unwrap_or_default()
}

fn echo_request() -> EchoRequest {
    EchoRequest {
        message: "x".into(),
        ..Default::default()
    }
}

/// Sends `count` echo requests over `concurrency` tasks; returns how many failed.
async fn send(channel: &Channel, count: usize, concurrency: usize) -> Result<usize> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = EchoClient::new(channel.clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < count {
                if client.echo(echo_request()).await.is_err() {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await?;
    }
    Ok(failed)
}

fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_70_30_0_are_the_shares_the_backends_see() -> Result<()> {
    let r = Routed::start("routes-weights").await?;
    r.publish_routes(r.catch_all(&[("v1", 70), ("v2", 30), ("v3", 0)]))
        .await?;
    let channel = r.connect().await?;
    wait_routing(&channel, "the 70/30/0 table, every pool in rotation", |routing| {
        first_entry_weights(routing) == [70, 30, 0] && routing.backends.len() == 3 && every_pool_in_rotation(routing)
    })
    .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    // The weight-0 GrpcBackend is followed too (its connection is warm before its weight
    // rises), and the table's own GrpcBackend keeps its pool.
    r.wait_connected().await?;

    assert_eq!(send(&channel, 2000, 8).await?, 0, "failed calls");
    let [root, v1, v2, v3] = r.requests();
    println!("weights 70/30/0 over 2000 calls -> served by v1 {v1}, v2 {v2}, v3 {v3}, echo's own {root}");
    assert_eq!(v1 + v2, 2000, "every call served once by v1 or v2");
    assert!((share(v1, 2000) - 0.70).abs() <= 0.03, "v1 served {v1} of 2000");
    assert!((share(v2, 2000) - 0.30).abs() <= 0.03, "v2 served {v2} of 2000");
    assert_eq!(v3, 0, "the weight-0 backend served calls");
    assert_eq!(
        root, 0,
        "the table's own endpoints served calls the table sends elsewhere"
    );
    assert_eq!(r.connections_accepted(), [1, 1, 1, 1], "one connection per backend");

    // The client's own view agrees with the backends'.
    let routing = channel.snapshot().routing.expect("a table");
    let routed: Vec<(String, u64)> = routing.backends.iter().map(|b| (b.backend.clone(), b.routed)).collect();
    let ns = &r.s.namespace;
    assert_eq!(
        routed,
        [
            (format!("{ns}/v1"), v1),
            (format!("{ns}/v2"), v2),
            (format!("{ns}/v3"), 0)
        ]
    );
    assert_eq!(routing.unrouted, 0);
    let mut registry = prometheus_client::registry::Registry::default();
    kubegrpc::metrics::register(&channel, &mut registry);
    let mut scrape = String::new();
    prometheus_client::encoding::text::encode(&mut scrape, &registry)?;
    for series in [
        format!("kubegrpc_client_routed_requests_total{{backend=\"{ns}/echo\",target=\"{ns}/v1\"}} {v1}"),
        format!(
            "kubegrpc_client_requests_total{{backend=\"{ns}/v2\",endpoint=\"{}\"}} {v2}",
            r.v2.address
        ),
    ] {
        assert!(scrape.contains(&series), "{series} not in:\n{scrape}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_method_match_and_a_header_match_send_matching_calls_to_v2() -> Result<()> {
    let r = Routed::start("routes-matches").await?;
    let route = format!("{}/echo", r.s.namespace);
    let table = json!([
        {"route": route, "rule": 0,
         "method": {"type": "RegularExpression", "service": "grpc\\.health\\.v1\\.Health", "method": "Check"},
         "backends": backends(&[("v2", 1)])},
        {"route": route, "rule": 1, "headers": [{"name": "x-canary", "value": "always"}],
         "backends": backends(&[("v2", 1)])},
        {"route": route, "rule": 2, "backends": backends(&[("v1", 1)])},
    ]);
    r.publish_routes(table).await?;
    let channel = r.connect().await?;
    wait_routing(&channel, "the three entries, every pool in rotation", |routing| {
        routing.entries.len() == 3 && every_pool_in_rotation(routing)
    })
    .await?;
    // Not v3: the table does not name it, so nothing connects to it.
    wait::until("v1, v2 and echo connected and warmed up", DEADLINE, || async {
        let [root, v1, v2, v3] = r.all().map(|b| b.counters.snapshot());
        Ok([&root, &v1, &v2]
            .iter()
            .all(|c| c.connections_accepted == 1 && c.health_checks >= 1)
            .then_some(v3.connections_accepted))
    })
    .await
    .and_then(|v3_connections| {
        ensure!(v3_connections == 0, "v3 is not named, yet connected");
        Ok(())
    })?;
    let checks_before = r.health_checks();

    const CALLS: usize = 300;
    let (v1_address, v2_address) = (r.v1.address.to_string(), r.v2.address.to_string());
    let mut echo = EchoClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    let mut misrouted = Vec::new();
    for _ in 0..CALLS {
        let plain = echo.echo(echo_request()).await?.into_inner().backend;
        if plain != v1_address {
            misrouted.push(format!("a plain Echo served by {plain}"));
        }
        let mut canary = tonic::Request::new(echo_request());
        canary.metadata_mut().insert("x-canary", "always".parse()?);
        let canary = echo.echo(canary).await?.into_inner().backend;
        if canary != v2_address {
            misrouted.push(format!("an x-canary Echo served by {canary}"));
        }
        health.check(HealthCheckRequest { service: String::new() }).await?;
    }
    let [root, v1, v2, v3] = r.requests();
    let checks: Vec<u64> = r
        .health_checks()
        .iter()
        .zip(checks_before)
        .map(|(a, b)| a - b)
        .collect();
    println!(
        "{CALLS} plain Echo, {CALLS} x-canary Echo, {CALLS} health Checks -> Echo served by v1 {v1}, v2 {v2}, \
         v3 {v3}, echo's own {root}; Checks by echo/v1/v2/v3 {checks:?}; misrouted {}",
        misrouted.len()
    );
    assert!(misrouted.is_empty(), "{misrouted:?}");
    assert_eq!([root, v1, v2, v3], [0, CALLS as u64, CALLS as u64, 0]);
    assert_eq!(
        checks,
        [0, 0, CALLS as u64, 0],
        "health Checks go to v2 by the method match"
    );

    // Without the catch-all, a call no entry matches fails at once, naming the GrpcBackend.
    r.publish_routes(json!([
        {"route": route, "rule": 1, "headers": [{"name": "x-canary", "value": "always"}],
         "backends": backends(&[("v2", 1)])},
    ]))
    .await?;
    wait_routing(&channel, "the header entry alone", |routing| routing.entries.len() == 1).await?;
    let status = echo
        .echo(echo_request())
        .await
        .expect_err("no entry matches a plain call");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let expected = format!(
        "kubegrpc: GrpcBackend {}/echo: no route matches /kubegrpc.echo.v1.Echo/Echo",
        r.s.namespace
    );
    assert_eq!(status.message(), expected);
    assert_eq!(
        r.requests(),
        [0, CALLS as u64, CALLS as u64, 0],
        "the failed call reached nobody"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_changed_under_load_move_the_shares_without_failures_or_reconnections() -> Result<()> {
    let r = Routed::start("routes-canary").await?;
    r.publish_routes(r.catch_all(&[("v1", 100), ("v2", 0)])).await?;
    let channel = r.connect().await?;
    wait_routing(&channel, "100/0, both pools in rotation", |routing| {
        first_entry_weights(routing) == [100, 0] && every_pool_in_rotation(routing)
    })
    .await?;
    wait::until("v1, v2 and echo connected", DEADLINE, || async {
        Ok((r.connections_accepted() == [1, 1, 1, 0]).then_some(()))
    })
    .await?;

    const WINDOW: u64 = 2000;
    let load = Load::start(channel.clone(), 8);
    let mut measured = Vec::new();
    for (v1_weight, v2_weight) in [(100, 0), (90, 10), (0, 100)] {
        r.publish_routes(r.catch_all(&[("v1", v1_weight), ("v2", v2_weight)]))
            .await?;
        wait_routing(&channel, &format!("the {v1_weight}/{v2_weight} table"), |routing| {
            first_entry_weights(routing) == [v1_weight, v2_weight]
        })
        .await?;
        // Calls picked under the previous table may still be in flight: at most the load's 8.
        let before = r.requests();
        load.wait_for_more(WINDOW, DEADLINE).await?;
        let after = r.requests();
        let [root, v1, v2, v3] = [0, 1, 2, 3].map(|i| after[i] - before[i]);
        let expected = f64::from(v1_weight) / 100.0;
        println!(
            "weights {v1_weight}/{v2_weight}: v1 {v1}, v2 {v2} of {} calls (v1 share {:.3})",
            v1 + v2,
            share(v1, v1 + v2)
        );
        assert_eq!(
            (root, v3),
            (0, 0),
            "calls reached GrpcBackends the table does not send to"
        );
        assert!(
            (share(v1, v1 + v2) - expected).abs() <= 0.03,
            "{v1_weight}/{v2_weight}: v1 served {v1}, v2 {v2}"
        );
        measured.push((v1, v2));
    }
    // Once the calls of the 90/10 table have drained, v1 gets nothing at all.
    let before = r.requests();
    load.wait_for_more(WINDOW, DEADLINE).await?;
    let after = r.requests();
    assert_eq!(after[1], before[1], "v1 served calls well after its weight went to 0");
    assert_eq!(measured[0].1, 0, "v2 served calls while its weight was 0");

    let counts = load.stop().await;
    println!(
        "100/0 -> 90/10 -> 0/100 under load: {} calls, {} failed; connections accepted echo/v1/v2/v3 {:?}",
        counts.succeeded(),
        counts.failed(),
        r.connections_accepted()
    );
    assert_eq!(counts.failed(), 0, "failed calls: {:?}", counts.failures());
    assert_eq!(r.connections_accepted(), [1, 1, 1, 0], "a weight change reconnected");
    let routing = channel.snapshot().routing.expect("a table");
    for backend in &routing.backends {
        let opened: Vec<u64> = backend
            .snapshot
            .endpoints
            .iter()
            .map(|e| e.connections_opened)
            .collect();
        assert_eq!(opened, [1], "{}: connections opened", backend.backend);
    }

    // A table that no longer names v1 drops its pool, and its connection with it; v2 keeps its.
    r.publish_routes(r.catch_all(&[("v2", 1)])).await?;
    wait_routing(&channel, "v2 alone", |routing| routing.backends.len() == 1).await?;
    wait::until("v1's connection closed", DEADLINE, || async {
        Ok((r.v1.counters.snapshot().connections_open == 0).then_some(()))
    })
    .await?;
    assert_eq!(send(&channel, 100, 4).await?, 0);
    assert_eq!(r.connections_accepted(), [1, 1, 1, 0], "v2 was reconnected");
    assert_eq!(r.v2.counters.snapshot().connections_open, 1);
    Ok(())
}
