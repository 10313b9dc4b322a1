//! Request load through a channel, counting what succeeded and what failed, so a test can
//! change the world underneath and assert on what clients saw: [`Load`] keeps a number of
//! requests in flight back to back, [`RateLoad`] sends at a fixed rate.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use kubegrpc_echo::{EchoClient, EchoRequest};
use tokio::{
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::MissedTickBehavior,
};

/// What the load saw so far.
#[derive(Default)]
pub struct LoadCounts {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// The first few failures, for the report.
    pub failures: Mutex<Vec<tonic::Status>>,
    stop: AtomicBool,
}

impl LoadCounts {
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn failures(&self) -> Vec<tonic::Status> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// `concurrency` workers sending echo requests back to back until stopped.
pub struct Load {
    pub counts: Arc<LoadCounts>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start<S>(service: S, concurrency: usize) -> Self
    where
        S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    {
        let counts = Arc::new(LoadCounts::default());
        let workers = (0..concurrency)
            .map(|_| {
                let mut client = EchoClient::new(service.clone());
                let counts = counts.clone();
                tokio::spawn(async move {
                    while !counts.stop.load(Ordering::SeqCst) {
                        match client
                            .echo(EchoRequest {
                                message: "load".into(),
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(_) => {
                                counts.succeeded.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(status) => {
                                counts.failed.fetch_add(1, Ordering::SeqCst);
                                {
                                    let mut failures = counts
                                        .failures
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    if failures.len() < 10 {
                                        failures.push(status);
                                    }
                                }
                                // A failure can complete without ever waiting: let others run.
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self { counts, workers }
    }

    /// Waits until `more` requests have succeeded since the call (or `deadline` passes).
    pub async fn wait_for_more(&self, more: u64, deadline: std::time::Duration) -> anyhow::Result<()> {
        let target = self.counts.succeeded() + more;
        crate::wait::until(&format!("{more} more successful requests"), deadline, || async {
            Ok((self.counts.succeeded() >= target).then_some(()))
        })
        .await
    }

    /// Stops the workers and waits for them.
    pub async fn stop(self) -> Arc<LoadCounts> {
        self.counts.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            let _ = worker.await;
        }
        self.counts
    }
}

/// What a [`RateLoad`] saw.
#[derive(Clone, Debug, Default)]
pub struct RateLoadReport {
    /// Requests sent (every one of them either succeeded or failed once the load stopped).
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures per gRPC code.
    pub failed_by_code: BTreeMap<String, u64>,
    /// Successes per answering backend (`ip:port`, as the EchoReply names it).
    pub by_backend: BTreeMap<String, u64>,
    /// The first few failures, for the report.
    pub failures: Vec<tonic::Status>,
}

#[derive(Default)]
struct RateShared {
    report: Mutex<RateLoadReport>,
    stop: AtomicBool,
}

impl RateShared {
    fn report(&self) -> std::sync::MutexGuard<'_, RateLoadReport> {
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Echo requests at a fixed rate (open loop: a tick sends a request whether or not earlier ones
/// answered, with at most [`RateLoad::MAX_IN_FLIGHT`] in flight), until `max_requests` were
/// sent, `max_duration` passed or [`RateLoad::stop`] is called.
pub struct RateLoad {
    shared: Arc<RateShared>,
    task: JoinHandle<()>,
}

impl RateLoad {
    /// Requests in flight at most; a tick waits for one to finish beyond that.
    pub const MAX_IN_FLIGHT: usize = 64;
    /// A request that has not answered after this long counts as DEADLINE_EXCEEDED.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn start<S>(service: S, rate_per_second: u32, max_requests: u64, max_duration: Duration) -> Self
    where
        S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    {
        assert!(rate_per_second > 0, "a rate of 0 requests per second sends nothing");
        let shared = Arc::new(RateShared::default());
        let task = tokio::spawn(send_at_rate(
            EchoClient::new(service),
            shared.clone(),
            Duration::from_secs(1) / rate_per_second,
            max_requests,
            max_duration,
        ));
        Self { shared, task }
    }

    /// What was seen so far (requests in flight are counted as sent, not yet as answered).
    pub fn report(&self) -> RateLoadReport {
        self.shared.report().clone()
    }

    /// Waits until `more` requests have succeeded since the call (or `deadline` passes).
    pub async fn wait_for_more(&self, more: u64, deadline: Duration) -> anyhow::Result<()> {
        let target = self.shared.report().succeeded + more;
        crate::wait::until(&format!("{more} more successful requests"), deadline, || async {
            Ok((self.shared.report().succeeded >= target).then_some(()))
        })
        .await
    }

    /// Stops sending, waits for the requests in flight, and reports.
    pub async fn stop(self) -> RateLoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.finished().await
    }

    /// Waits until the load stopped by itself (count or time bound) and its requests answered.
    pub async fn finished(self) -> RateLoadReport {
        let _ = self.task.await;
        self.shared.report().clone()
    }
}

async fn send_at_rate<S>(
    client: EchoClient<S>,
    shared: Arc<RateShared>,
    period: Duration,
    max_requests: u64,
    max_duration: Duration,
) where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let in_flight = Arc::new(Semaphore::new(RateLoad::MAX_IN_FLIGHT));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let end = tokio::time::Instant::now() + max_duration;
    let mut requests = JoinSet::new();
    let mut sent = 0;
    while sent < max_requests && !shared.stop.load(Ordering::SeqCst) {
        tokio::select! {
            _ = ticks.tick() => {}
            () = tokio::time::sleep_until(end) => break,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        while requests.try_join_next().is_some() {}
        sent += 1;
        shared.report().sent = sent;
        let mut client = client.clone();
        let shared = shared.clone();
        requests.spawn(async move {
            let _permit = permit;
            let request = EchoRequest {
                message: "rate".into(),
                ..Default::default()
            };
            let outcome = match tokio::time::timeout(RateLoad::REQUEST_TIMEOUT, client.echo(request)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    RateLoad::REQUEST_TIMEOUT
                ))),
            };
            let mut report = shared.report();
            match outcome {
                Ok(reply) => {
                    report.succeeded += 1;
                    *report.by_backend.entry(reply.into_inner().backend).or_default() += 1;
                }
                Err(status) => {
                    report.failed += 1;
                    *report.failed_by_code.entry(format!("{:?}", status.code())).or_default() += 1;
                    if report.failures.len() < 10 {
                        report.failures.push(status);
                    }
                }
            }
        });
    }
    while requests.join_next().await.is_some() {}
}
