//! The `Echo` service: answers with the message and the backend's address, and with a capacity
//! simulates work that holds a worker slot (the busy time ORCA reports).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use kubegrpc_orca::LoadRecorder;
use tokio::{sync::Semaphore, time::Instant};
use tonic::{Request, Response, Status};

use crate::{
    Counters, EchoReply, EchoRequest, HealthState, ServingStatus, SetHealthReply, SetHealthRequest, StatsReply,
    StatsRequest, pb,
};

/// The `Echo` service.
#[derive(Clone)]
pub struct EchoService {
    pub(crate) address: String,
    pub(crate) counters: Arc<Counters>,
    pub(crate) health: HealthState,
    pub(crate) load: LoadRecorder,
    /// The worker slots, if the backend has a capacity.
    pub(crate) slots: Option<Arc<Semaphore>>,
    pub(crate) work: Duration,
    pub(crate) fail_with: Option<tonic::Code>,
}

impl EchoService {
    /// Does one request's work: holds a slot (waiting for one first) for `work`, and records
    /// that time as busy time, even if the request is cancelled meanwhile.
    async fn work(&self) {
        if self.slots.is_none() && self.work.is_zero() {
            return;
        }
        let _slot = match &self.slots {
            Some(slots) => Some(slots.acquire().await.expect("the worker slots are never closed")),
            None => None,
        };
        let _busy = Busy {
            load: &self.load,
            since: Instant::now(),
        };
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
    }
}

/// Records the time a slot was held as busy time when the work ends or is abandoned.
struct Busy<'a> {
    load: &'a LoadRecorder,
    since: Instant,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.load.record_busy(self.since.elapsed());
    }
}

/// An `Echo` request as ORCA counts it: failed unless it completes (a cancelled request was
/// load all the same).
struct LoadRequest<'a> {
    load: &'a LoadRecorder,
    completed: bool,
}

impl Drop for LoadRequest<'_> {
    fn drop(&mut self) {
        self.load.record_request(self.completed);
    }
}

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let mut load_request = LoadRequest {
            load: &self.load,
            completed: false,
        };
        let request = request.into_inner();
        self.work().await;
        // Waiting, not working: the delay holds no slot.
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(request.delay_ms))).await;
        }
        self.counters.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(code) = self.fail_with {
            return Err(Status::new(
                code,
                format!("{}: this backend fails every call, on purpose", self.address),
            ));
        }
        load_request.completed = true;
        Ok(Response::new(EchoReply {
            message: request.message,
            backend: self.address.clone(),
        }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        self.counters.stats_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(self.counters.snapshot()))
    }

    async fn set_health(&self, request: Request<SetHealthRequest>) -> Result<Response<SetHealthReply>, Status> {
        let request = request.into_inner();
        let status = if request.serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set(&request.service, status);
        Ok(Response::new(SetHealthReply {}))
    }
}

#[cfg(test)]
mod tests {
    //! On a paused clock every `work` and report interval has its exact length, so busy time,
    //! utilization and request rates are asserted exactly (or within the one request a report
    //! boundary may split), whatever the machine's load.

    use futures::StreamExt;
    use kubegrpc_orca::{OpenRcaService, OrcaLoadReportRequest, OrcaService};

    use super::*;
    use crate::pb::echo_server::Echo;

    fn echo_service(capacity: Option<usize>, work: Duration) -> EchoService {
        EchoService {
            address: "10.250.0.1:50051".into(),
            counters: Arc::default(),
            health: HealthState::new(&[], ServingStatus::Serving),
            load: LoadRecorder::with_capacity(capacity.unwrap_or(1)),
            slots: capacity.map(|capacity| Arc::new(Semaphore::new(capacity))),
            work,
            fail_with: None,
        }
    }

    fn hello() -> Request<EchoRequest> {
        Request::new(EchoRequest {
            message: "hi".into(),
            delay_ms: 0,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_capacity_wait_for_a_slot_and_only_their_work_is_busy_time() {
        let work = Duration::from_millis(50);
        let service = echo_service(Some(2), work);
        let started = Instant::now();
        let mut ends = futures::future::join_all((0..4).map(|_| async {
            service.echo(hello()).await.unwrap();
            started.elapsed()
        }))
        .await;
        ends.sort();
        // Two slots: two requests end after one `work`, the two that waited for a slot after two.
        assert_eq!(ends, [work, work, 2 * work, 2 * work]);
        let totals = service.load.totals();
        assert_eq!((totals.requests, totals.errors), (4, 0));
        assert_eq!(
            totals.busy,
            4 * work,
            "the slots' holding time, not the wait for a slot"
        );
        assert_eq!(service.counters.snapshot().requests, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_cancelled_while_working_is_load_all_the_same() {
        let service = echo_service(Some(1), Duration::from_millis(50));
        let cancelled = tokio::time::timeout(Duration::from_millis(20), service.echo(hello())).await;
        assert!(cancelled.is_err(), "still working when cancelled");
        let totals = service.load.totals();
        assert_eq!((totals.requests, totals.errors), (1, 1), "counted, as failed");
        assert_eq!(totals.busy, Duration::from_millis(20), "the time it held its slot");
        assert_eq!(service.counters.snapshot().requests, 0, "not served");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_backend_fails_every_call_with_its_code_and_counts_it() {
        let service = EchoService {
            fail_with: Some(tonic::Code::Unavailable),
            ..echo_service(None, Duration::ZERO)
        };
        for _ in 0..3 {
            let status = service.echo(hello()).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.message().contains("10.250.0.1:50051"), "{status:?}");
        }
        assert_eq!(
            service.counters.snapshot().requests,
            3,
            "every call counted where it failed"
        );
        let totals = service.load.totals();
        assert_eq!((totals.requests, totals.errors), (3, 3), "load, as failed");
    }

    #[tokio::test(start_paused = true)]
    async fn without_capacity_or_work_requests_are_counted_but_not_busy() {
        let service = echo_service(None, Duration::ZERO);
        let started = Instant::now();
        service.echo(hello()).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        let totals = service.load.totals();
        assert_eq!((totals.requests, totals.busy), (1, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn orca_reports_a_saturated_backend_as_fully_utilized_at_its_capacity_rate() {
        const CAPACITY: usize = 2;
        let work = Duration::from_millis(20);
        let interval = Duration::from_millis(500);
        let service = echo_service(Some(CAPACITY), work);
        let orca = OrcaService::new(service.load.clone()).min_report_interval(Duration::from_millis(100));
        let mut reports = orca
            .stream_core_metrics(Request::new(OrcaLoadReportRequest {
                report_interval: Some(interval.into()),
                request_cost_names: Vec::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        // The first report comes at once and covers the time before the load.
        reports.next().await.unwrap().unwrap();

        // Twice as many callers as slots, each sending one request after another: no slot idles.
        let saturate = futures::future::join_all((0..2 * CAPACITY).map(|_| async {
            loop {
                service.echo(hello()).await.unwrap();
            }
        }));
        let report = tokio::select! {
            _ = saturate => unreachable!("the callers never stop"),
            report = reports.next() => report.unwrap().unwrap(),
        };
        // Busy time counts when a request's work ends: each slot ends 25 requests in the
        // interval, the last exactly at the report's instant, where it may fall either side.
        let per_slot = (interval.as_millis() / work.as_millis()) as f64;
        let utilization = report.application_utilization;
        assert!(
            ((per_slot - 1.0) / per_slot..=1.0 + 1e-9).contains(&utilization),
            "utilization {utilization} for a saturated backend"
        );
        let seconds = interval.as_secs_f64();
        let rps = report.rps_fractional;
        let (fewest, most) = (CAPACITY as f64 * (per_slot - 1.0), CAPACITY as f64 * per_slot);
        assert!(
            (fewest / seconds - 1e-9..=most / seconds + 1e-9).contains(&rps),
            "{rps} requests per second, expected {} (one request per slot per {work:?})",
            most / seconds
        );
        assert_eq!((report.eps, report.cpu_utilization), (0.0, 0.0));
    }
}
