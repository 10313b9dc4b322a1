//! Route timeouts and retries for xDS clients (issue 21): a GRPCRoute's `kubegrpc.io/timeout` and
//! `kubegrpc.io/retry-on` annotations, resolved by the real operator into the parent's routing
//! table and served by its xDS server as gRFC A31's `max_stream_duration` and gRFC A44's
//! `retry_policy`, applied by real grpc-go (v1.83) and grpc-java (1.85) xDS clients dialing
//! `xds:///echo.NAMESPACE`. Counted at the backends (in-process echo servers on 10.250.x.y).
//!
//! - Timeout: the route sends every call to a backend that answers after 1 s; with a 200 ms
//!   timeout every call fails DEADLINE_EXCEEDED, the backend sees the calls arrive and answers
//!   none of them (it would have answered each at 1 s, well within the caller's own 5 s
//!   deadline), and held each far less than 1 s.
//! - Retries: the route sends calls to a Service of three backends, one failing every call with
//!   UNAVAILABLE while its health stays SERVING (so only retries can hide it). Without a retry
//!   policy about a third of the calls fail; with `retry-on: unavailable` and `retry-limit: 4`
//!   the failing backend keeps getting attempts while the caller sees (almost) none fail. Both
//!   clients pick each attempt's endpoint afresh at random by weight (grpc-go's and grpc-java's
//!   weighted_target over one locality per endpoint), never avoiding the one that just failed, so
//!   a call fails only when all 5 attempts land on the failing backend: (1/3)^5 = 1 call in 243.
//!   "0 failed calls" cannot be promised by any gRPC client here; the test bounds the failures
//!   far below that 1/3 (see `MAX_FAILED_WITH_RETRIES`) and checks, for grpc-go, that each one
//!   exhausted its 5 attempts.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::{
    config::route::v3::RouteConfiguration,
    service::discovery::v3::{DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient},
};
use futures::StreamExt as _;
use kubegrpc_crds::routes::RouteEntry;
use kubegrpc_echo::{Backend, BackendOptions};
use kubegrpc_operator::{
    metrics::XdsTypeLabels,
    xds::{resources::type_url, routes::route_configuration},
};
use kubegrpc_tests::{
    backends::start_backend,
    operator::InProcessOperator,
    routes::{apply_annotated_route, balanced_service, service_backend, service_parent},
    scenario::Scenario,
    wait,
    xds::{InProcessXds, XdsClient, XdsClientOptions, XdsCounts, XdsPeer},
};
use prost::Message;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(120);
/// The caller's own deadline on each call: far longer than the route's timeout and than the slow
/// backend's answer, so that neither can be mistaken for it.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long the slow backend works on each call before answering.
const SLOW_ANSWER: Duration = Duration::from_secs(1);
/// Calls counted in the timeout window.
const TIMED_OUT_CALLS: u64 = 100;
/// Calls counted with retries on.
const RETRIED_CALLS: u64 = 1000;
/// The most failed calls allowed out of `RETRIED_CALLS` with 5 attempts over three backends, one
/// failing: each call fails with probability (1/3)^5, 4.1 expected, and more than 18 has a
/// probability below 1e-7 (Poisson tail). Without retries about 333 would fail.
const MAX_FAILED_WITH_RETRIES: u64 = 18;
const TIMEOUT: &str = "kubegrpc.io/timeout";
const RETRY_ON: &str = "kubegrpc.io/retry-on";
const RETRY_LIMIT: &str = "kubegrpc.io/retry-limit";

/// A namespace with the Gateway API's CRDs, the operator, its xDS server, and the parent Service
/// `echo` (one backend of its own, which must get nothing once the route applies).
struct Policy {
    s: Scenario,
    xds: InProcessXds,
    _operator: InProcessOperator,
    parent: Backend,
}

impl Policy {
    async fn start(prefix: &str) -> Result<Self> {
        let s = Scenario::new(prefix).await?;
        s.control_plane.install_gateway_api().await?;
        let parent = start_backend(BackendOptions::default()).await?;
        balanced_service(&s, "echo", &[&parent]).await?;
        let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
        let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
        Ok(Self {
            s,
            xds,
            _operator: operator,
            parent,
        })
    }

    fn target(&self) -> String {
        format!("echo.{}", self.s.namespace)
    }

    /// Applies the route `name` sending every call to `echo` to Service `backend`, with
    /// `annotations`; waits until the parent's table satisfies `accept` and the xDS server serves
    /// that table, so that a client fetching routes from then on gets it.
    async fn route(
        &self,
        backend: &str,
        annotations: &[(&str, &str)],
        what: &str,
        accept: impl Fn(&RouteEntry) -> bool,
    ) -> Result<RouteEntry> {
        apply_annotated_route(
            &self.s.client,
            &self.s.namespace,
            "policy",
            annotations,
            json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [service_backend(backend, 1)]}]}),
        )
        .await?;
        let published = self
            .s
            .wait_status("echo", what, DEADLINE, |s| s.routes.len() == 1 && accept(&s.routes[0]))
            .await?;
        let table = published.status.map(|s| s.routes).unwrap_or_default();
        let expected = route_configuration(&self.target(), &table);
        wait::until("the xDS server serving the table", DEADLINE, || async {
            let served = served_route(self.xds.address, &self.target()).await?;
            Ok((served == expected).then_some(()))
        })
        .await?;
        Ok(table[0].clone())
    }

    async fn client(&self, peer: XdsPeer, rate: u32) -> Result<XdsClient> {
        XdsClient::start_with(XdsClientOptions {
            peer,
            timeout: Some(CALL_DEADLINE),
            ..XdsClientOptions::new(&[self.target()], self.xds.address, rate)
        })
        .await
    }

    /// The RouteConfiguration NACKs the server counted (the test's client is its only one).
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

fn unix_nanos() -> Result<i64> {
    Ok(i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos())?)
}

/// Echo calls `backend` served (or, failing on purpose, failed) so far.
fn requests(backend: &Backend) -> u64 {
    backend.counters.requests.load(Ordering::SeqCst)
}

/// Waits until the client's current window has `calls` finished calls (succeeded or failed).
async fn finished(client: &XdsClient, calls: u64) -> Result<XdsCounts> {
    wait::until(&format!("{calls} finished calls"), DEADLINE, || async {
        let counts = client.counts().await?;
        Ok((counts.succeeded() + counts.failures() >= calls).then_some(counts))
    })
    .await
}

// === a route timeout of 200 ms against a backend answering in 1 s ===

async fn a_route_timeout_ends_calls_deadline_exceeded(peer: XdsPeer) -> Result<()> {
    let p = Policy::start(&format!("policy-timeout-{peer}")).await?;
    let slow = start_backend(BackendOptions {
        work: SLOW_ANSWER,
        ..BackendOptions::default()
    })
    .await?;
    balanced_service(&p.s, "slow", &[&slow]).await?;
    let entry = p
        .route("slow", &[(TIMEOUT, "200ms")], "a table with the 200ms timeout", |e| {
            e.timeout == Some("200ms".parse().unwrap()) && e.backends.len() == 1
        })
        .await?;
    assert_eq!(entry.retry, None);

    let client = p.client(peer, 20).await?;
    // Every call fails, so the client is up once calls reach the slow backend (each is recorded
    // there when it ends).
    wait::until("calls reaching the slow backend", DEADLINE, || async {
        Ok((slow.load.totals().requests >= 5).then_some(()))
    })
    .await?;
    let window_start = unix_nanos()?;
    client.reset().await?;
    let arrived_before = slow.load.totals();

    let counts = finished(&client, TIMED_OUT_CALLS).await?;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for failure in client.failures().await?.iter().filter(|f| f.sent >= window_start) {
        // grpc-java's messages carry the deadline ("... exceeded after 0.199989986s. ..."): kept
        // apart for the print, left out of the reason.
        let reason = failure.message.split(" after ").next().unwrap_or_default();
        *reasons.entry(format!("{} {reason}", failure.code)).or_default() += 1;
    }
    println!(
        "{peer}, route timeout 200ms, backend answering in 1s: {:?} ok, failed {:?}; by reason {reasons:#?}",
        counts.ok, counts.failed
    );
    assert_eq!(
        counts.succeeded(),
        0,
        "{peer}: no call lasted until the answer: {counts:?}"
    );
    // The client ends the call at the route's deadline (DEADLINE_EXCEEDED); it also sends the
    // deadline to the server (grpc-timeout), and a tonic server ends the call there too, answering
    // CANCELLED "Timeout expired": when that answer beats the client's own timer (a late timer on
    // a busy machine), the caller sees it instead.
    let by_the_deadline = |reason: &str| {
        reason.starts_with("DeadlineExceeded")
            || (reason.starts_with("Canceled") && reason.ends_with("Timeout expired"))
    };
    assert!(
        reasons.keys().all(|reason| by_the_deadline(reason)),
        "{peer}: every call ended by the route's deadline: {reasons:#?}"
    );
    assert!(
        counts.failed.get("DeadlineExceeded").is_some_and(|&n| n > 0),
        "{peer}: the client applies the route's deadline itself: {counts:?}"
    );

    // At the far end: the calls arrived and were cut before the backend answered any (it would
    // have answered each at 1 s, within the caller's 5 s deadline).
    let failed = counts.failures();
    let arrived = wait::until("the failed calls recorded at the slow backend", DEADLINE, || async {
        let now = slow.load.totals();
        let arrived = now.requests - arrived_before.requests;
        Ok((arrived * 5 >= failed * 4).then_some(now))
    })
    .await?;
    let cut = arrived.requests - arrived_before.requests;
    let held = arrived.busy.saturating_sub(arrived_before.busy) / u32::try_from(cut)?;
    println!(
        "{peer}: the slow backend got {cut} calls, answered {}, held each {held:?} on average",
        requests(&slow)
    );
    assert_eq!(requests(&slow), 0, "{peer}: the slow backend answered none");
    assert_eq!(
        arrived.errors - arrived_before.errors,
        cut,
        "{peer}: every call it got was cancelled"
    );
    assert!(
        held < SLOW_ANSWER / 2,
        "{peer}: calls held {held:?} at the backend on average: ended well before its 1s answer"
    );
    assert_eq!(
        requests(&p.parent),
        0,
        "{peer}: the parent's own backend is routed around"
    );
    assert_eq!(p.route_nacks(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_ends_calls_deadline_exceeded_at_the_route_timeout() -> Result<()> {
    a_route_timeout_ends_calls_deadline_exceeded(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_ends_calls_deadline_exceeded_at_the_route_timeout() -> Result<()> {
    a_route_timeout_ends_calls_deadline_exceeded(XdsPeer::Java).await
}

// === retries on UNAVAILABLE over three backends, one failing every call ===

async fn retries_hide_a_backend_failing_unavailable(peer: XdsPeer) -> Result<()> {
    let p = Policy::start(&format!("policy-retry-{peer}")).await?;
    let good = [
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
    ];
    let failing = start_backend(BackendOptions {
        fail_with: Some(tonic::Code::Unavailable),
        ..BackendOptions::default()
    })
    .await?;
    balanced_service(&p.s, "pool", &[&good[0], &good[1], &failing]).await?;
    p.s.wait_status("pool", "three usable endpoints", DEADLINE, |s| s.ready_endpoints == 3)
        .await?;
    p.route("pool", &[], "a table without a policy", |e| e.retry.is_none())
        .await?;

    let client = p.client(peer, 100).await?;
    wait::until("replies from both good backends", DEADLINE, || async {
        let counts = client.counts().await?;
        Ok(good.iter().all(|b| counts.of(b.address) > 0).then_some(()))
    })
    .await?;

    // Without retries, the failing backend's share of the calls fails.
    client.reset().await?;
    let without = finished(&client, 300).await?;
    let failed_share = without.failures() as f64 / (without.failures() + without.succeeded()) as f64;
    println!(
        "{peer}, no retry policy: failed {:?} of {} ({:.1}%)",
        without.failed,
        without.failures() + without.succeeded(),
        failed_share * 100.0
    );
    ensure!(
        (0.15..0.55).contains(&failed_share) && without.failed.keys().all(|code| code == "Unavailable"),
        "{peer}: about a third of the calls fail UNAVAILABLE without retries: {without:?}"
    );

    let entry = p
        .route(
            "pool",
            &[(RETRY_ON, "unavailable"), (RETRY_LIMIT, "4")],
            "a table retrying UNAVAILABLE 4 times",
            |e| {
                e.retry
                    .as_ref()
                    .is_some_and(|r| r.codes == ["UNAVAILABLE"] && r.attempts == 4)
            },
        )
        .await?;
    println!("{peer}: {:?}", entry.retry);
    // The client applies the route when it gets it: windows of 100 calls until one has at most 2
    // failed (with a third failing, 100 calls without retries have 2 or fewer failures with a
    // probability of 1e-14).
    wait::until("the retry policy applied by the client", DEADLINE, || async {
        client.reset().await?;
        let window = finished(&client, 100).await?;
        Ok((window.failures() <= 2).then_some(()))
    })
    .await?;

    let window_start = unix_nanos()?;
    client.reset().await?;
    let failing_before = requests(&failing);
    let good_before: u64 = good.iter().map(requests).sum();
    let with = finished(&client, RETRIED_CALLS).await?;
    let tried = requests(&failing) - failing_before;
    let served = good.iter().map(requests).sum::<u64>() - good_before;
    let failures = client.failures().await?;
    let window_failures: Vec<_> = failures.iter().filter(|f| f.sent >= window_start).collect();
    println!(
        "{peer}, retry-on unavailable, limit 4: {} ok, failed {:?}; the failing backend got {tried} attempts, \
         the others served {served}; failures: {window_failures:?}",
        with.succeeded(),
        with.failed
    );
    assert!(
        with.failures() <= MAX_FAILED_WITH_RETRIES,
        "{peer}: retries hide the failing backend: {with:?} (each call fails only if its 5 attempts all \
         land on it: 1 in 243)"
    );
    assert!(with.failed.keys().all(|code| code == "Unavailable"), "{peer}: {with:?}");
    // Counted at the backends: the failing one kept being tried (a third of first attempts and
    // the retries landing there again: about half as many attempts as calls), the others served
    // every call that succeeded.
    assert!(
        tried >= RETRIED_CALLS / 4,
        "{peer}: the failing backend was tried {tried} times over {RETRIED_CALLS} calls"
    );
    assert!(served >= with.succeeded(), "{peer}: served {served}, {with:?}");
    if peer == XdsPeer::Go {
        // grpc-go says why a call failed in the end.
        for failure in &window_failures {
            assert!(
                failure.message.contains("failed after 5 attempts"),
                "{peer}: a failure that did not exhaust its attempts: {failure:?}"
            );
        }
    }
    assert_eq!(
        requests(&p.parent),
        0,
        "{peer}: the parent's own backend is routed around"
    );
    assert_eq!(p.route_nacks(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_retries_hide_a_backend_failing_unavailable() -> Result<()> {
    retries_hide_a_backend_failing_unavailable(XdsPeer::Go).await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_retries_hide_a_backend_failing_unavailable() -> Result<()> {
    retries_hide_a_backend_failing_unavailable(XdsPeer::Java).await
}
