//! A call under the timeout and retries of the routing-table entry that took it (the settings
//! and the pure decisions are in [`crate::route_policy`]).
//!
//! - The deadline is the route's timeout or the caller's `grpc-timeout`, whichever is shorter,
//!   from when the call starts; each attempt carries what is left of it as its `grpc-timeout`
//!   (so the backend knows it too, as gRPC clients applying gRFC A31 do). When it passes the
//!   call ends with `DEADLINE_EXCEEDED`: the attempt or the backoff under way is dropped (its
//!   stream reset: the backend sees the call cancelled), and a response whose body is still
//!   coming ends with that status.
//! - A retry is sent to one of the entry's backends picked again, to an endpoint other than
//!   those that failed the call when there is one, with the request body kept for it (up to
//!   [`REPLAY_LIMIT`](crate::endpoint::REPLAY_LIMIT); a larger body, or one the backend
//!   answered before reading it whole, is not retried), and `grpc-previous-rpc-attempts`.
//! - A retry the budget refuses, or one past the attempts, leaves the call failed as its last
//!   attempt did.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status, body::Body};
use tracing::debug;

use crate::{
    channel::{BoxError, clone_parts, send_avoiding},
    endpoint::ReplayBody,
    pool::Pool,
    route_policy::{
        BudgetWindow, Pushback, grpc_timeout_value, jittered, parse_grpc_timeout, random, trailers_only_code,
        transport_code,
    },
    router::RoutedPolicy,
    snapshot::RulePolicySnapshot,
};

const GRPC_TIMEOUT: &str = "grpc-timeout";
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// The calls of one rule of a route with a timeout or retries: its retry budget and counters.
pub(crate) struct RuleCalls {
    route: String,
    rule: u32,
    /// The budget's clock starts here.
    origin: Instant,
    budget: Mutex<BudgetWindow>,
    calls: AtomicU64,
    retries: AtomicU64,
    retries_refused: AtomicU64,
    deadline_exceeded: AtomicU64,
}

impl RuleCalls {
    pub(crate) fn new(route: String, rule: u32) -> Arc<Self> {
        Arc::new(Self {
            route,
            rule,
            origin: Instant::now(),
            budget: Mutex::default(),
            calls: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            retries_refused: AtomicU64::new(0),
            deadline_exceeded: AtomicU64::new(0),
        })
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetWindow> {
        self.budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A call starts; with retries, it counts toward the budget.
    fn record_call(&self, retries: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if retries {
            let second = self.second(Instant::now());
            self.lock().record_call(second);
        }
    }

    /// Whether the budget allows a retry now (counted either way).
    fn try_retry(&self, percent: u8) -> bool {
        let second = self.second(Instant::now());
        let allowed = self.lock().try_retry(second, percent);
        let counter = if allowed { &self.retries } else { &self.retries_refused };
        counter.fetch_add(1, Ordering::Relaxed);
        allowed
    }

    pub(crate) fn snapshot(&self) -> RulePolicySnapshot {
        RulePolicySnapshot {
            route: self.route.clone(),
            rule: self.rule,
            calls: self.calls.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            retries_refused: self.retries_refused.load(Ordering::Relaxed),
            deadline_exceeded: self.deadline_exceeded.load(Ordering::Relaxed),
        }
    }
}

/// Which deadline a call has, for its message.
#[derive(Clone, Copy)]
enum Limit {
    Route(Duration),
    Caller(Duration),
}

/// How a call's deadline ends it.
#[derive(Clone)]
struct Expiry {
    routed: RoutedPolicy,
    limit: Limit,
}

impl Expiry {
    /// Counts the call and says why it failed.
    fn status(&self) -> Status {
        self.routed.calls().deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        let why = match self.limit {
            Limit::Route(timeout) => format!("the route's timeout of {timeout:?} expired"),
            Limit::Caller(timeout) => format!("the caller's deadline of {timeout:?} expired"),
        };
        Status::deadline_exceeded(format!("{}: {why}", self.routed.origin()))
    }
}

/// Sends `request`, first to `pool`, under `routed`'s timeout and retries.
pub(crate) async fn call(
    pool: Arc<Pool>,
    routed: RoutedPolicy,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let started = Instant::now();
    let policy = routed.policy();
    routed.calls().record_call(policy.retry.is_some());
    let callers = request.headers().get(GRPC_TIMEOUT).and_then(parse_grpc_timeout);
    let limit = match (policy.timeout, callers) {
        (Some(route), Some(caller)) if caller < route => Some(Limit::Caller(caller)),
        (Some(route), _) => Some(Limit::Route(route)),
        (None, Some(caller)) => Some(Limit::Caller(caller)),
        (None, None) => None,
    };
    let deadline = limit.and_then(|limit| match limit {
        Limit::Route(timeout) | Limit::Caller(timeout) => started.checked_add(timeout),
    });
    let (Some(limit), Some(deadline)) = (limit, deadline) else {
        return attempts(pool, &routed, request, None).await;
    };
    let expiry = Expiry {
        routed: routed.clone(),
        limit,
    };
    let result = match tokio::time::timeout_at(deadline, attempts(pool, &routed, request, Some(deadline))).await {
        Ok(result) => result,
        Err(_elapsed) => return Err(Box::new(expiry.status())),
    };
    let expired = Instant::now() >= deadline;
    match result {
        // Answered with an error as the deadline passed (a backend told the remaining time
        // ends the call itself: tonic servers answer CANCELLED): the deadline is why.
        Ok(response)
            if expired
                && trailers_only_code(response.status(), response.headers()).is_some_and(|code| code != Code::Ok) =>
        {
            Err(Box::new(expiry.status()))
        }
        Ok(response) => Ok(response.map(|body| {
            Body::new(DeadlineBody {
                body: Some(body),
                sleep: Box::pin(tokio::time::sleep_until(deadline)),
                expiry,
            })
        })),
        Err(_) if expired => Err(Box::new(expiry.status())),
        Err(error) => Err(error),
    }
}

/// The attempts of a call: the first to `pool`, then retries while the policy allows.
async fn attempts(
    mut pool: Arc<Pool>,
    routed: &RoutedPolicy,
    request: http::Request<Body>,
    deadline: Option<Instant>,
) -> Result<http::Response<Body>, BoxError> {
    let retry = routed.policy().retry.as_ref();
    let (mut parts, mut body) = request.into_parts();
    // As for transparent retries: the extensions go with the first attempt, uncloned.
    let mut extensions = Some(std::mem::take(&mut parts.extensions));
    let mut avoid: Vec<SocketAddr> = Vec::new();
    let mut retries: u8 = 0;
    let mut since_pushback: u32 = 0;
    loop {
        let mut attempt = clone_parts(&parts);
        if let Some(extensions) = extensions.take() {
            attempt.extensions = extensions;
        }
        if let Some(deadline) = deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                // The caller turns this into the deadline's own status.
                return Err(Box::new(Status::deadline_exceeded("deadline passed")));
            }
            attempt.headers.insert(GRPC_TIMEOUT, grpc_timeout_value(remaining));
        }
        if retries > 0 {
            attempt
                .headers
                .insert(PREVIOUS_ATTEMPTS, HeaderValue::from(u16::from(retries)));
        }
        let Some(retry) = retry else {
            return send_avoiding(&pool, http::Request::from_parts(attempt, body), &avoid)
                .await
                .result;
        };
        let (sent_body, replay) = ReplayBody::new(body);
        let sent = send_avoiding(&pool, http::Request::from_parts(attempt, Body::new(sent_body)), &avoid).await;
        // Whether the call may go again, and what the server asked of it.
        let pushback = match &sent.result {
            Ok(response) => match trailers_only_code(response.status(), response.headers()) {
                Some(code) if retry.retries_on(code) => Pushback::of(response.headers()),
                // Committed: a body is coming, or the code is not one to retry on.
                _ => return sent.result,
            },
            Err(_) => match sent.failure.and_then(transport_code) {
                Some(code) if retry.retries_on(code) => Pushback::None,
                _ => return sent.result,
            },
        };
        if retries >= retry.retries || pushback == Pushback::Stop {
            return sent.result;
        }
        let Some(again) = replay.replayable() else {
            debug!(route = %routed.origin(), "not retried: the request body was not kept whole");
            return sent.result;
        };
        avoid.extend(sent.endpoint);
        let Some(next) = routed.repick(&avoid) else {
            return sent.result;
        };
        if !routed.calls().try_retry(retry.budget_percent) {
            debug!(route = %routed.origin(), "not retried: the retry budget is spent");
            return sent.result;
        }
        // The failed attempt's response (and the endpoint's count of it in flight) ends here.
        drop(sent);
        retries += 1;
        let wait = match pushback {
            Pushback::After(wait) => {
                since_pushback = 0;
                wait
            }
            _ => {
                since_pushback += 1;
                jittered(retry.backoff_cap(since_pushback), random())
            }
        };
        tokio::time::sleep(wait).await;
        pool = next;
        body = again;
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` when the call's deadline passes before
/// it has ended; its stream is then dropped (reset: the backend sees the call cancelled).
struct DeadlineBody {
    body: Option<Body>,
    sleep: Pin<Box<Sleep>>,
    expiry: Expiry,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        ready!(this.sleep.as_mut().poll(cx));
        this.body = None;
        Poll::Ready(Some(Err(this.expiry.status())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map(HttpBody::size_hint).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    //! On a paused clock, against in-memory backends: every timeout and backoff has its exact
    //! length, and every count is taken at the backends.

    use http_body_util::BodyExt;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        outlier::OutlierDetection,
        router::{Router, Spawner},
        routes::BackendKey,
        test_support::{Answer, BACKEND, MemoryNetwork, apply, entry},
    };

    const PATH: &str = "/kubegrpc.Test/Call";

    /// A channel's router for `default/echo` whose table has one entry with `policy` sending
    /// every call to the GrpcBackends `backends` (equal weights), each with one in-memory
    /// endpoint per answer.
    struct Fixture {
        net: MemoryNetwork,
        router: Arc<Router>,
        addresses: Vec<(String, SocketAddr)>,
    }

    impl Fixture {
        fn new(backends: &[(&str, &[Option<Answer>])], policy: Value) -> Self {
            let net = MemoryNetwork::default();
            let config = net.config(
                OutlierDetection {
                    enabled: false,
                    ..OutlierDetection::default()
                },
                0,
            );
            let router = Router::new(
                BackendKey::new("default", "echo"),
                Pool::new(BACKEND.into(), config),
                Spawner::Manual,
            );
            let mut entry_value = json!({"route": "default/r", "rule": 0, "backends":
                backends.iter().map(|(name, _)| json!({"name": name, "weight": 1})).collect::<Vec<_>>()});
            entry_value
                .as_object_mut()
                .unwrap()
                .extend(policy.as_object().unwrap().clone());
            router.apply_routes(Some(&json!({"routes": [entry_value]})));
            let mut addresses = Vec::new();
            for (name, answers) in backends {
                let endpoints: Vec<SocketAddr> = answers
                    .iter()
                    .map(|answer| match answer {
                        Some(answer) => net.answering_with(*answer),
                        None => net.refusing(),
                    })
                    .collect();
                let pool = router
                    .pool_of(&BackendKey::new("default", *name))
                    .expect("a pool for it");
                let entries: Vec<Value> = endpoints.iter().map(|a| entry(*a, 100, "Serving")).collect();
                apply(&pool, &entries);
                addresses.extend(endpoints.into_iter().map(|a| ((*name).to_owned(), a)));
            }
            Self { net, router, addresses }
        }

        /// The address of `name`'s only (or first) endpoint.
        fn address(&self, name: &str) -> SocketAddr {
            self.addresses
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| *a)
                .expect("named")
        }

        async fn call(&self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
            let routed = self.router.route(&request).expect("routed");
            call(routed.pool, routed.policy.expect("the entry has a policy"), request).await
        }

        /// The call's status as the caller sees it, and when it had it.
        async fn status(&self, request: http::Request<Body>) -> Status {
            outcome(self.call(request).await).await
        }

        fn policy_counts(&self) -> RulePolicySnapshot {
            let routing = self.router.snapshot().expect("a table");
            assert_eq!(routing.policies.len(), 1, "{:?}", routing.policies);
            routing.policies[0].clone()
        }

        /// Waits (on the paused clock) until the backend at `address` saw `cancelled` calls
        /// cancelled: the reset travels through the in-memory connection's tasks.
        async fn wait_cancelled(&self, address: SocketAddr, cancelled: u64) {
            for _ in 0..1000 {
                if self.net.log(address).cancelled >= cancelled {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("{:?}", self.net.log(address));
        }
    }

    fn request_with(body: Vec<u8>, grpc_timeout: Option<&'static str>) -> http::Request<Body> {
        let mut request = http::Request::post(PATH).header(http::header::CONTENT_TYPE, "application/grpc");
        if let Some(timeout) = grpc_timeout {
            request = request.header(GRPC_TIMEOUT, timeout);
        }
        request
            .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
            .expect("a valid request")
    }

    fn request() -> http::Request<Body> {
        request_with(b"\0\0\0\0\x05hello".to_vec(), None)
    }

    /// The status a tonic client would report: the call's error, a Trailers-Only status, or
    /// the body's end (an error, or the trailers' `grpc-status`).
    async fn outcome(result: Result<http::Response<Body>, BoxError>) -> Status {
        let response = match result {
            Ok(response) => response,
            Err(error) => return Status::from_error(error),
        };
        if let Some(code) = trailers_only_code(response.status(), response.headers()) {
            return Status::new(code, "trailers-only");
        }
        match response.into_body().collect().await {
            Err(status) => status,
            Ok(collected) => {
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let code = trailers_only_code(http::StatusCode::OK, &trailers).unwrap_or(Code::Unknown);
                Status::new(code, "in trailers")
            }
        }
    }

    fn failing(code: Code) -> Option<Answer> {
        Some(Answer {
            code,
            ..Answer::default()
        })
    }

    fn ok() -> Option<Answer> {
        Some(Answer::default())
    }

    fn retry_on_unavailable(attempts: u8, backoff: &str, budget_percent: u8) -> Value {
        json!({"retry": {"codes": ["UNAVAILABLE"], "attempts": attempts, "backoff": backoff,
            "maxBackoff": "1s", "budgetPercent": budget_percent}})
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_routes_timeout_a_call_fails_deadline_exceeded_and_its_backend_sees_it_cancelled() {
        let slow = Some(Answer {
            delay: Duration::from_secs(1),
            ..Answer::default()
        });
        let f = Fixture::new(&[("v1", &[slow])], json!({"timeout": "200ms"}));
        let v1 = f.address("v1");
        let cases: [(Option<&'static str>, Duration, &str); 3] = [
            (None, Duration::from_millis(200), "the route's timeout of 200ms expired"),
            (
                Some("5S"),
                Duration::from_millis(200),
                "the route's timeout of 200ms expired",
            ),
            (
                Some("50m"),
                Duration::from_millis(50),
                "the caller's deadline of 50ms expired",
            ),
        ];
        for (n, (grpc_timeout, expected, why)) in cases.into_iter().enumerate() {
            let started = Instant::now();
            let status = f.status(request_with(b"\0\0\0\0\0".to_vec(), grpc_timeout)).await;
            let elapsed = started.elapsed();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
            assert_eq!(
                status.message(),
                format!("kubegrpc: GrpcBackend default/echo: route default/r rule 0: {why}")
            );
            assert!(
                (expected..expected + Duration::from_millis(1)).contains(&elapsed),
                "{elapsed:?}"
            );
            f.wait_cancelled(v1, n as u64 + 1).await;
            // The backend was told the time left: the whole deadline, as the call had just begun.
            let log = f.net.log(v1);
            let told = log.grpc_timeouts[n].as_deref().expect("a grpc-timeout");
            let told = parse_grpc_timeout(&HeaderValue::from_str(told).unwrap()).unwrap();
            assert!(
                told <= expected && told + Duration::from_millis(1) > expected,
                "{told:?}"
            );
        }
        let counts = f.policy_counts();
        assert_eq!((counts.calls, counts.deadline_exceeded, counts.retries), (3, 3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_whose_body_outlasts_the_timeout_ends_with_deadline_exceeded() {
        let headers_then_slow = Some(Answer {
            delay: Duration::from_secs(1),
            headers_first: true,
            ..Answer::default()
        });
        let f = Fixture::new(&[("v1", &[headers_then_slow])], json!({"timeout": "200ms"}));
        let started = Instant::now();
        let response = f.call(request()).await.expect("the response headers arrive at once");
        assert_eq!(started.elapsed(), Duration::ZERO);
        let status = outcome(Ok(response)).await;
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            (Duration::from_millis(200)..Duration::from_millis(201)).contains(&started.elapsed()),
            "{:?}",
            started.elapsed()
        );
        f.wait_cancelled(f.address("v1"), 1).await;
        assert_eq!(f.policy_counts().deadline_exceeded, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_answers_are_retried_on_another_backend_and_the_caller_sees_none() {
        let f = Fixture::new(
            &[("v1", &[failing(Code::Unavailable)]), ("v2", &[ok()]), ("v3", &[ok()])],
            retry_on_unavailable(2, "25ms", 100),
        );
        for _ in 0..300 {
            let status = f.status(request()).await;
            assert_eq!(status.code(), Code::Ok, "{status:?}");
        }
        let [v1, v2, v3] = ["v1", "v2", "v3"].map(|name| f.net.log(f.address(name)));
        // The first attempts keep the weights (retries are picked apart from their round-robin),
        // and each failed one was retried once, elsewhere.
        assert_eq!(v1.calls, 100);
        assert_eq!(v2.calls + v3.calls, 300);
        let counts = f.policy_counts();
        assert_eq!((counts.calls, counts.retries, counts.retries_refused), (300, 100, 0));
        assert!(
            v1.previous_attempts.iter().all(Option::is_none),
            "never a retry's target"
        );
        let retried = [&v2, &v3]
            .iter()
            .flat_map(|log| &log.previous_attempts)
            .filter(|header| header.as_deref() == Some("1"))
            .count();
        assert_eq!(retried, 100, "each retry says it is the second attempt");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_the_transport_failed_is_retried_on_another_backend() {
        // v1's only endpoint refuses connections: the channel's transparent retries there fail
        // too, and the route's retry takes the call to v2.
        let f = Fixture::new(
            &[("v1", &[None]), ("v2", &[ok()])],
            retry_on_unavailable(2, "25ms", 100),
        );
        for _ in 0..10 {
            let status = f.status(request()).await;
            assert_eq!(status.code(), Code::Ok, "{status:?}");
        }
        assert_eq!(f.net.log(f.address("v2")).calls, 10);
        assert_eq!(f.policy_counts().retries, 5, "the calls first sent to v1");
    }

    #[tokio::test(start_paused = true)]
    async fn other_codes_and_committed_responses_are_not_retried() {
        let f = Fixture::new(
            &[("v1", &[failing(Code::Internal)])],
            retry_on_unavailable(2, "25ms", 100),
        );
        assert_eq!(f.status(request()).await.code(), Code::Internal);
        assert_eq!(f.net.log(f.address("v1")).calls, 1);

        let committed = Some(Answer {
            code: Code::Unavailable,
            headers_first: true,
            ..Answer::default()
        });
        let f = Fixture::new(&[("v1", &[committed])], retry_on_unavailable(2, "25ms", 100));
        assert_eq!(f.status(request()).await.code(), Code::Unavailable);
        assert_eq!(
            f.net.log(f.address("v1")).calls,
            1,
            "response headers came first: committed"
        );
        assert_eq!(f.policy_counts().retries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_limit_after_their_backoffs() {
        let f = Fixture::new(
            &[("v1", &[failing(Code::Unavailable)])],
            retry_on_unavailable(2, "100ms", 100),
        );
        let started = Instant::now();
        assert_eq!(f.status(request()).await.code(), Code::Unavailable);
        // Waits below 100ms, then below 200ms (full jitter).
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        let log = f.net.log(f.address("v1"));
        assert_eq!(log.calls, 3, "the first attempt and 2 retries, on the only endpoint");
        assert_eq!(log.previous_attempts, [None, Some("1".into()), Some("2".into())]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_pushback_sets_the_wait_or_stops_the_retries() {
        let pushback = |value| {
            Some(Answer {
                code: Code::Unavailable,
                pushback: Some(value),
                ..Answer::default()
            })
        };
        let f = Fixture::new(&[("v1", &[pushback("500")])], retry_on_unavailable(2, "1ms", 100));
        let started = Instant::now();
        assert_eq!(f.status(request()).await.code(), Code::Unavailable);
        assert_eq!(f.net.log(f.address("v1")).calls, 3);
        assert!(
            (Duration::from_millis(1000)..Duration::from_millis(1001)).contains(&started.elapsed()),
            "two waits of 500ms: {:?}",
            started.elapsed()
        );

        let f = Fixture::new(&[("v1", &[pushback("-1")])], retry_on_unavailable(2, "1ms", 100));
        assert_eq!(f.status(request()).await.code(), Code::Unavailable);
        assert_eq!(f.net.log(f.address("v1")).calls, 1, "told not to retry");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_when_every_backend_fails() {
        let f = Fixture::new(
            &[
                ("v1", &[failing(Code::Unavailable)]),
                ("v2", &[failing(Code::Unavailable)]),
            ],
            retry_on_unavailable(2, "1ms", 10),
        );
        for _ in 0..1000 {
            assert_eq!(f.status(request()).await.code(), Code::Unavailable);
        }
        // 1000 calls within one window (the backoffs add up to far less than 10s): 10% of
        // them is 100 retries, the minimum allowance too. The first 50 calls make 2 retries
        // each; every later call has its first retry refused.
        let counts = f.policy_counts();
        assert_eq!((counts.retries, counts.retries_refused), (100, 950));
        let attempts = f.net.log(f.address("v1")).calls + f.net.log(f.address("v2")).calls;
        assert_eq!(attempts, 1000 + 100, "counted at the backends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_replay_limit_is_not_retried() {
        let f = Fixture::new(
            &[("v1", &[failing(Code::Unavailable)])],
            retry_on_unavailable(2, "1ms", 100),
        );
        let big = vec![0u8; crate::endpoint::REPLAY_LIMIT + 1];
        assert_eq!(f.status(request_with(big, None)).await.code(), Code::Unavailable);
        assert_eq!(f.net.log(f.address("v1")).calls, 1);
        assert_eq!(f.policy_counts().retries, 0);
    }
}
