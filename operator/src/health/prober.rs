//! One long-lived prober per endpoint, speaking `grpc.health.v1.Health`.
//!
//! In `Watch` mode the prober keeps one stream open, so a NOT_SERVING flip arrives as it
//! happens. The stream's connection sends HTTP/2 keepalive PINGs every `interval` and gives up
//! after `timeout` without an answer: a frozen process or a silent network ends the stream
//! instead of leaving it open forever. A server that answers `Watch` with UNIMPLEMENTED is
//! polled with `Check` instead, as is every endpoint in `Check` mode.
//!
//! After a failure the prober reconnects with exponential backoff (100ms, doubling, jittered,
//! at most `interval`), so that a blip is retried at once and a dead endpoint is not hammered.
//! The prober ends when its handle is dropped.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use kubegrpc_crds::HealthCheckMode;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::tracker::{Failure, HealthTracker, HealthVerdict, NotServingAnswer, ProbeOutcome, Thresholds};

/// How an endpoint is probed: from the GrpcBackend's `spec.healthCheck`. A change restarts the
/// GrpcBackend's probers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub service: String,
    pub mode: HealthCheckMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
}

/// What a prober publishes: the verdict and whether the latest probe failed at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeState {
    pub verdict: HealthVerdict,
    pub connect_failing: bool,
    /// When the prober started, and whether its first probe has ended: a status write may wait
    /// a moment for a new endpoint's first answer rather than publish it as Unknown first.
    pub started: Instant,
    pub probed: bool,
}

/// Where a prober reports its probes (metrics) and its state changes (a reconcile trigger).
pub trait ProbeObserver: Send + Sync + 'static {
    /// A probe ended with `outcome`; `latency` is set when the health service answered.
    fn probed(&self, outcome: ProbeOutcome, latency: Option<Duration>);
    /// The prober's [`ProbeState`] changed.
    fn changed(&self);
}

/// A running prober; dropping it stops the prober and closes its connection.
pub struct ProberHandle {
    state: watch::Receiver<ProbeState>,
    task: JoinHandle<()>,
}

impl ProberHandle {
    pub fn state(&self) -> ProbeState {
        self.state.borrow().clone()
    }
}

impl Drop for ProberHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing `target`, starting from `initial` (see [`HealthTracker::new`]).
pub fn spawn(
    target: SocketAddr,
    settings: ProbeSettings,
    initial: HealthVerdict,
    observer: Arc<dyn ProbeObserver>,
) -> ProberHandle {
    let tracker = HealthTracker::new(initial.clone(), settings.thresholds);
    let (state_tx, state) = watch::channel(ProbeState {
        verdict: initial,
        connect_failing: false,
        started: Instant::now(),
        probed: false,
    });
    let prober = Prober {
        target,
        settings,
        tracker,
        state: state_tx,
        observer,
    };
    ProberHandle {
        state,
        task: tokio::spawn(prober.run()),
    }
}

struct Prober {
    target: SocketAddr,
    settings: ProbeSettings,
    tracker: HealthTracker,
    state: watch::Sender<ProbeState>,
    observer: Arc<dyn ProbeObserver>,
}

/// Why a connection's probing ended.
enum Ended {
    /// The server does not implement `Watch`: poll with `Check` on the same connection.
    WatchUnimplemented,
    /// Reconnect after backoff.
    Failed(Failure),
}

impl Prober {
    async fn run(mut self) {
        let mut watch_implemented = self.settings.mode == HealthCheckMode::Watch;
        let mut backoff = Backoff::new(self.settings.interval);
        loop {
            let mut client = match self.connect().await {
                Ok(client) => client,
                Err(failure) => {
                    self.record(ProbeOutcome::Failed(failure), None);
                    tokio::time::sleep(backoff.next(&self.target)).await;
                    continue;
                }
            };
            let mut ended = if watch_implemented {
                self.watch(&mut client, &mut backoff).await
            } else {
                Ended::WatchUnimplemented
            };
            if let Ended::WatchUnimplemented = ended {
                watch_implemented = false;
                ended = self.poll(&mut client, &mut backoff).await;
            }
            if let Ended::Failed(failure) = ended {
                self.record(ProbeOutcome::Failed(failure), None);
            }
            tokio::time::sleep(backoff.next(&self.target)).await;
        }
    }

    async fn connect(&self) -> Result<HealthClient<Channel>, Failure> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.target))
            .map_err(|_| Failure::ConnectFailed)?
            .connect_timeout(self.settings.timeout)
            .http2_keep_alive_interval(self.settings.interval)
            .keep_alive_timeout(self.settings.timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .user_agent(concat!("kubegrpc-operator/", env!("CARGO_PKG_VERSION")))
            .map_err(|_| Failure::ConnectFailed)?;
        match tokio::time::timeout(self.settings.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(HealthClient::new(channel)),
            Ok(Err(error)) if is_timeout(&error) => Err(Failure::ConnectTimeout),
            Ok(Err(_)) => Err(Failure::ConnectFailed),
            Err(_) => Err(Failure::ConnectTimeout),
        }
    }

    /// Follows one `Watch` stream until it breaks.
    async fn watch(&mut self, client: &mut HealthClient<Channel>, backoff: &mut Backoff) -> Ended {
        let started = Instant::now();
        let request = HealthCheckRequest {
            service: self.settings.service.clone(),
        };
        let mut stream = match tokio::time::timeout(self.settings.timeout, client.watch(request)).await {
            Err(_) => return Ended::Failed(Failure::Timeout),
            Ok(Err(status)) if status.code() == Code::Unimplemented => return Ended::WatchUnimplemented,
            Ok(Err(status)) => return Ended::Failed(call_failure(&status)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let remaining = self.settings.timeout.saturating_sub(started.elapsed());
        let first = match tokio::time::timeout(remaining, stream.message()).await {
            Err(_) => return Ended::Failed(Failure::Timeout),
            Ok(Err(status)) if status.code() == Code::Unimplemented => return Ended::WatchUnimplemented,
            Ok(Err(status)) => return Ended::Failed(call_failure(&status)),
            Ok(Ok(None)) => return Ended::Failed(Failure::StreamBroken),
            Ok(Ok(Some(first))) => first,
        };
        let mut last = answer(&first);
        self.record(last, Some(started.elapsed()));
        backoff.reset();

        // While the stream stays open on SERVING, each interval counts as one more success, so
        // that a healthy threshold above 1 means "Serving for that many intervals".
        let mut tick = tokio::time::interval_at(Instant::now() + self.settings.interval, self.settings.interval);
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        last = answer(&response);
                        self.record(last, None);
                    }
                    Ok(None) => return Ended::Failed(Failure::StreamBroken),
                    Err(_) => return Ended::Failed(Failure::StreamBroken),
                },
                _ = tick.tick(), if last == ProbeOutcome::Serving => self.record(ProbeOutcome::Serving, None),
            }
        }
    }

    /// Polls with `Check` every interval until a call fails at the transport level.
    async fn poll(&mut self, client: &mut HealthClient<Channel>, backoff: &mut Backoff) -> Ended {
        loop {
            let started = Instant::now();
            let request = HealthCheckRequest {
                service: self.settings.service.clone(),
            };
            match tokio::time::timeout(self.settings.timeout, client.check(request)).await {
                Err(_) => return Ended::Failed(Failure::Timeout),
                Ok(Ok(response)) => {
                    self.record(answer(response.get_ref()), Some(started.elapsed()));
                    backoff.reset();
                }
                // The protocol: Check on an unknown service answers NOT_FOUND.
                Ok(Err(status)) if status.code() == Code::NotFound => {
                    self.record(
                        ProbeOutcome::NotServing(NotServingAnswer::NotFound),
                        Some(started.elapsed()),
                    );
                    backoff.reset();
                }
                Ok(Err(status)) => return Ended::Failed(call_failure(&status)),
            }
            tokio::time::sleep_until(started + self.settings.interval).await;
        }
    }

    fn record(&mut self, outcome: ProbeOutcome, latency: Option<Duration>) {
        self.observer.probed(outcome, latency);
        let changed = self.tracker.observe(outcome);
        let first = !self.state.borrow().probed;
        if changed || first {
            let started = self.state.borrow().started;
            self.state.send_replace(ProbeState {
                verdict: self.tracker.verdict().clone(),
                connect_failing: self.tracker.connect_failing(),
                started,
                probed: true,
            });
            self.observer.changed();
        }
    }
}

fn answer(response: &HealthCheckResponse) -> ProbeOutcome {
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => ProbeOutcome::Serving,
        Ok(ServingStatus::NotServing) => ProbeOutcome::NotServing(NotServingAnswer::NotServing),
        Ok(ServingStatus::ServiceUnknown) => ProbeOutcome::NotServing(NotServingAnswer::ServiceUnknown),
        Ok(ServingStatus::Unknown) | Err(_) => ProbeOutcome::NotServing(NotServingAnswer::Unknown),
    }
}

/// A failed call: transport-level codes mean the connection is gone.
fn call_failure(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal => Failure::StreamBroken,
        Code::DeadlineExceeded => Failure::Timeout,
        _ => Failure::CallFailed,
    }
}

fn is_timeout(error: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.to_string().contains("timed out") {
            return true;
        }
        source = error.source();
    }
    false
}

/// Exponential backoff from 100ms, doubling, capped at the probe interval, with ±20% jitter
/// so that probers of many endpoints do not retry in lockstep.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(100);

    fn new(interval: Duration) -> Self {
        Self {
            next: Self::INITIAL,
            max: interval.max(Self::INITIAL),
        }
    }

    fn next(&mut self, target: &SocketAddr) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write(target.to_string().as_bytes());
        let jitter = 0.8 + (hasher.finish() % 400) as f64 / 1000.0;
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.next = Self::INITIAL;
    }
}
