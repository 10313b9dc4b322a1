//! Route timeouts and retries in the Rust client (issue 21): a GRPCRoute's `kubegrpc.io/timeout`,
//! `retry-on` and `retry-budget` annotations, resolved by the real operator (in-process) against
//! the Gateway API's own CRDs into the parent GrpcBackend's routing table, applied by a
//! `kubegrpc::Channel` for the parent Service `echo`. Counted at the backends (in-process echo
//! servers on 10.250.x.y); the parent's own backend must get nothing once the route applies.
//!
//! - Timeout: every call goes to a backend that answers after 1 s. Without a timeout a call
//!   succeeds (within the caller's own 5 s deadline); with `timeout: 200ms` every call fails
//!   `DEADLINE_EXCEEDED` naming the route's timeout, and the backend saw each call end before
//!   its answer: counted by its load recorder as a request that did not complete, none served.
//! - Retries: three backend Services, one failing every call with UNAVAILABLE (its health stays
//!   SERVING, so only retries can hide it). Without a retry policy its share of the calls fails;
//!   with `retry-on: unavailable` the caller sees 0 failures, and the failing backend got
//!   exactly as many attempts as the client retried (each retry went elsewhere).
//! - Budget: every backend fails. Without a budget each call would make 3 attempts; the attempts
//!   counted at the backends stay within what the budget allows over the run:
//!   `calls x (1 + budgetPercent) + RETRY_BUDGET_MIN_PER_SECOND x 10 s per window the run
//!   touched`, and match the client's own count of retries.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use kubegrpc::{Channel, RulePolicySnapshot};
use kubegrpc_crds::routes::{RETRY_BUDGET_MIN_PER_SECOND, RouteEntry};
use kubegrpc_echo::{Backend, BackendOptions, EchoClient, EchoRequest};
use kubegrpc_tests::{
    backends::start_backend,
    operator::InProcessOperator,
    routes::{apply_annotated_route, balanced_service, service_backend, service_parent},
    scenario::{Scenario, wait_snapshot},
};
use serde_json::json;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(120);
/// The caller's own deadline on each call: longer than the slow backend's answer and than the
/// route's timeout, so that neither can be mistaken for it.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long the slow backend works on each call before answering.
const SLOW_ANSWER: Duration = Duration::from_secs(1);
const TIMEOUT: &str = "kubegrpc.io/timeout";
const RETRY_ON: &str = "kubegrpc.io/retry-on";
const RETRY_BUDGET: &str = "kubegrpc.io/retry-budget";
/// The window the client's retry budget counts over (the client's docs: the last 10 s).
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Concurrent callers for the retry tests.
const WORKERS: usize = 8;

/// A namespace with the Gateway API's CRDs, the operator and the parent Service `echo` (one
/// backend of its own, which must get nothing once the route applies).
struct Policy {
    s: Scenario,
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
        Ok(Self {
            s,
            _operator: operator,
            parent,
        })
    }

    /// Applies the route `policy` from `echo` to `backends` (equal weights) with `annotations`.
    async fn route(&self, backends: &[&str], annotations: &[(&str, &str)]) -> Result<()> {
        let refs: Vec<_> = backends.iter().map(|name| service_backend(name, 1)).collect();
        apply_annotated_route(
            &self.s.client,
            &self.s.namespace,
            "policy",
            annotations,
            json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": refs}]}),
        )
        .await
    }

    async fn connect(&self) -> Result<Channel> {
        Ok(Channel::builder(self.s.client.clone(), &self.s.namespace, "echo")
            .connect()
            .await?)
    }

    /// Waits until the channel follows a one-entry table that `accept`s and can send its calls.
    async fn wait_applied(&self, channel: &Channel, what: &str, accept: impl Fn(&RouteEntry) -> bool) -> Result<()> {
        wait_snapshot(channel, what, DEADLINE, |snapshot| {
            snapshot.routing.as_ref().is_some_and(|routing| {
                routing.entries.len() == 1
                    && accept(&routing.entries[0].entry)
                    && routing
                        .backends
                        .iter()
                        .all(|b| b.snapshot.endpoints.iter().any(|e| e.in_rotation))
            })
        })
        .await?;
        tokio::time::timeout(DEADLINE, channel.ready())
            .await
            .context("the channel never became ready")
    }
}

/// The counters of the table's one rule with a policy.
fn rule_counts(channel: &Channel) -> Result<RulePolicySnapshot> {
    let routing = channel.snapshot().routing.context("a routing table")?;
    ensure!(routing.policies.len() == 1, "{:?}", routing.policies);
    Ok(routing.policies[0].clone())
}

/// One `Echo` call with the caller's deadline.
async fn echo(client: &mut EchoClient<Channel>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest {
        message: "policy".into(),
        delay_ms: 0,
    });
    request.set_timeout(CALL_DEADLINE);
    client.echo(request).await.map(drop)
}

/// `calls` calls from [`WORKERS`] concurrent callers; the failures.
async fn calls(channel: &Channel, calls: u64) -> Vec<tonic::Status> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (next, mut client) = (next.clone(), EchoClient::new(channel.clone()));
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < calls {
                    if let Err(status) = echo(&mut client).await {
                        failures.push(status);
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.expect("a caller panicked"));
    }
    failures
}

/// `Echo` calls a backend received (served, or failed on purpose).
fn received(backend: &Backend) -> u64 {
    backend.counters.requests.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_timeout_ends_calls_deadline_exceeded_before_the_backend_answers() -> Result<()> {
    let p = Policy::start("policy-client-timeout").await?;
    let slow = start_backend(BackendOptions {
        work: SLOW_ANSWER,
        ..BackendOptions::default()
    })
    .await?;
    balanced_service(&p.s, "slow", &[&slow]).await?;
    let channel = p.connect().await?;
    let mut client = EchoClient::new(channel.clone());

    // Without a timeout the slow backend answers within the caller's deadline.
    p.route(&["slow"], &[]).await?;
    p.wait_applied(&channel, "the table without a timeout", |e| e.timeout.is_none())
        .await?;
    echo(&mut client).await.context("a call without a route timeout")?;
    assert_eq!(received(&slow), 1);

    p.route(&["slow"], &[(TIMEOUT, "200ms")]).await?;
    p.wait_applied(&channel, "the table with a 200ms timeout", |e| {
        e.timeout == Some(Duration::from_millis(200).into())
    })
    .await?;
    let before = slow.load.totals();
    const CALLS: u64 = 20;
    let mut took = Vec::new();
    for _ in 0..CALLS {
        let started = Instant::now();
        let status = echo(&mut client).await.expect_err("past the route's timeout");
        took.push(started.elapsed());
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().ends_with(&format!(
                "route {}/policy rule 0: the route's timeout of 200ms expired",
                p.s.namespace
            )),
            "{status:?}"
        );
    }
    took.sort();
    println!(
        "{CALLS} calls past a 200ms route timeout: DEADLINE_EXCEEDED after {:?} (fastest), {:?} (median), {:?} (slowest)",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(
        took[0] >= Duration::from_millis(200),
        "never before the timeout: {took:?}"
    );

    // At the backend: every call arrived and ended before its work did (a request that did not
    // complete, in its load), none was answered.
    kubegrpc_tests::wait::until("the backend saw every call end", DEADLINE, || async {
        let totals = slow.load.totals();
        Ok((totals.requests - before.requests >= CALLS).then_some(()))
    })
    .await?;
    let totals = slow.load.totals();
    assert_eq!(totals.requests - before.requests, CALLS, "{totals:?}");
    assert_eq!(totals.errors - before.errors, CALLS, "every call cut short: {totals:?}");
    assert_eq!(received(&slow), 1, "none answered but the first, untimed call");
    let counts = rule_counts(&channel)?;
    assert_eq!((counts.calls, counts.deadline_exceeded), (CALLS, CALLS), "{counts:?}");
    assert_eq!(received(&p.parent), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_on_unavailable_hide_a_backend_failing_every_call() -> Result<()> {
    let p = Policy::start("policy-client-retry").await?;
    let good = [
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
    ];
    let failing = start_backend(BackendOptions {
        fail_with: Some(tonic::Code::Unavailable),
        ..BackendOptions::default()
    })
    .await?;
    balanced_service(&p.s, "good-a", &[&good[0]]).await?;
    balanced_service(&p.s, "good-b", &[&good[1]]).await?;
    balanced_service(&p.s, "failing", &[&failing]).await?;
    let backends = ["good-a", "good-b", "failing"];
    let channel = p.connect().await?;

    // Without retries the failing backend's share of the calls fails.
    p.route(&backends, &[]).await?;
    p.wait_applied(&channel, "the table without retries", |e| e.retry.is_none())
        .await?;
    const CONTROL: u64 = 60;
    let failures = calls(&channel, CONTROL).await;
    println!(
        "without retries: {} of {CONTROL} calls failed, the failing backend got {}",
        failures.len(),
        received(&failing)
    );
    assert_eq!(failures.len() as u64, received(&failing), "{failures:?}");
    assert!(!failures.is_empty(), "a third of the calls go to the failing backend");
    assert!(
        failures.iter().all(|f| f.code() == tonic::Code::Unavailable),
        "{failures:?}"
    );

    // A budget of 50%: well above the failing backend's third of the first attempts, so that
    // every failed attempt may be retried once.
    p.route(&backends, &[(RETRY_ON, "unavailable"), (RETRY_BUDGET, "50%")])
        .await?;
    p.wait_applied(&channel, "the table with retries", |e| {
        e.retry.as_ref().is_some_and(|r| r.budget_percent == 50)
    })
    .await?;
    const CALLS: u64 = 300;
    let failing_before = received(&failing);
    let good_before: u64 = good.iter().map(received).sum();
    let counts_before = rule_counts(&channel)?;
    let failures = calls(&channel, CALLS).await;
    let tried = received(&failing) - failing_before;
    let served = good.iter().map(received).sum::<u64>() - good_before;
    let counts = rule_counts(&channel)?;
    let retries = counts.retries - counts_before.retries;
    println!(
        "with retries: {} of {CALLS} calls failed; the failing backend got {tried} attempts, the others served {served}; the client retried {retries} times",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(tried > 0, "the failing backend was still tried");
    assert_eq!(served, CALLS, "each call served once, by a good backend");
    assert_eq!(
        tried, retries,
        "each failed attempt retried once, elsewhere (counted at the backend and in the client)"
    );
    assert_eq!(counts.retries_refused, 0);
    assert_eq!(received(&p.parent), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_caps_retries_when_every_backend_fails() -> Result<()> {
    let p = Policy::start("policy-client-budget").await?;
    let mut failing = Vec::new();
    for name in ["down-a", "down-b", "down-c"] {
        let backend = start_backend(BackendOptions {
            fail_with: Some(tonic::Code::Unavailable),
            ..BackendOptions::default()
        })
        .await?;
        balanced_service(&p.s, name, &[&backend]).await?;
        failing.push(backend);
    }
    let channel = p.connect().await?;
    // The defaults: 2 retries, budget 20%.
    p.route(&["down-a", "down-b", "down-c"], &[(RETRY_ON, "unavailable")])
        .await?;
    p.wait_applied(&channel, "the table with retries", |e| {
        e.retry
            .as_ref()
            .is_some_and(|r| r.attempts == 2 && r.budget_percent == 20)
    })
    .await?;

    const CALLS: u64 = 1000;
    const BUDGET_PERCENT: u64 = 20;
    let started = Instant::now();
    let failures = calls(&channel, CALLS).await;
    let took = started.elapsed();
    let attempts: u64 = failing.iter().map(received).sum();
    let counts = rule_counts(&channel)?;
    // Each 10 s window the run touched allows the minimum once more (one more for where the
    // run starts within its first window).
    let windows = took.as_secs() / BUDGET_WINDOW.as_secs() + 2;
    let minimum = u64::from(RETRY_BUDGET_MIN_PER_SECOND) * BUDGET_WINDOW.as_secs();
    let bound = CALLS + CALLS * BUDGET_PERCENT / 100 + minimum * windows;
    println!(
        "every backend failing: {CALLS} calls in {took:?}, {attempts} attempts at the backends (bound {bound}; 3 per call without a budget = {}), {} retries, {} refused by the budget",
        3 * CALLS,
        counts.retries,
        counts.retries_refused
    );
    assert_eq!(failures.len() as u64, CALLS, "every call fails");
    assert!(
        failures.iter().all(|f| f.code() == tonic::Code::Unavailable
            && f.message().contains("this backend fails every call, on purpose")),
        "the last attempt's failure, as is: {:?}",
        &failures[..3]
    );
    assert_eq!(
        attempts,
        CALLS + counts.retries,
        "the client's count of retries, at the backends"
    );
    assert!(attempts <= bound, "{attempts} attempts, over the budget's {bound}");
    assert!(counts.retries > 0, "retries were made while the budget allowed");
    assert!(counts.retries_refused > 0, "and refused once it was spent");
    assert_eq!(received(&p.parent), 0);
    Ok(())
}
