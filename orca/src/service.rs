//! [`OrcaService`]: the out-of-band `OpenRcaService/StreamCoreMetrics` stream over a
//! [`LoadRecorder`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::stream::BoxStream;
use tokio::{
    sync::watch,
    time::{Instant, Interval, MissedTickBehavior},
};
use tonic::{Request, Response, Status};

use crate::{
    LoadRecorder, OrcaLoadReport, OrcaLoadReportRequest,
    pb::open_rca_service_server::{OpenRcaService, OpenRcaServiceServer},
    recorder::{LoadTotals, load_report},
};

/// Serves `xds.service.orca.v3.OpenRcaService`: each `StreamCoreMetrics` stream gets a report
/// at once, then one per interval, each giving the rates over the time since the stream's
/// previous report (the first one: since the recorder was created).
///
/// A stream's interval is the one its request asks for, raised to the service's minimum
/// ([`OrcaService::min_report_interval`]); a request without one gets
/// [`OrcaService::DEFAULT_INTERVAL`]. A stream holds no task: it ends as soon as its client
/// goes away and the server drops it, or when [`OrcaService::end_streams`] is called.
#[derive(Clone, Debug)]
pub struct OrcaService {
    recorder: LoadRecorder,
    min_interval: Duration,
    open_streams: Arc<AtomicUsize>,
    ending: Arc<watch::Sender<bool>>,
}

impl OrcaService {
    /// The interval given to a request that asks for none.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// The default lower bound of the interval.
    pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(1);
    /// No stream reports more often than this, whatever the minimum is set to.
    const FLOOR: Duration = Duration::from_millis(1);

    /// Reports the load `recorder` measures.
    pub fn new(recorder: LoadRecorder) -> Self {
        Self {
            recorder,
            min_interval: Self::DEFAULT_MIN_INTERVAL,
            open_streams: Arc::default(),
            ending: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Reports at most once per `min_interval` on each stream (at most once per millisecond
    /// whatever this says), however often a client asks.
    pub fn min_report_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// The `StreamCoreMetrics` streams open now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::SeqCst)
    }

    /// Ends every stream, open or opened later, after the report it may be sending. A server
    /// calls it when it begins a graceful shutdown, which would otherwise wait for these
    /// endless streams.
    pub fn end_streams(&self) {
        self.ending.send_replace(true);
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> OpenRcaServiceServer<Self> {
        OpenRcaServiceServer::new(self)
    }

    /// The interval of a stream opened with `request`.
    pub fn report_interval(&self, request: &OrcaLoadReportRequest) -> Duration {
        let asked = request
            .report_interval
            .map_or(Self::DEFAULT_INTERVAL, super::ProtoDuration::to_std);
        asked.max(self.min_interval).max(Self::FLOOR)
    }
}

/// One stream's state: the totals and time its previous report ended at.
struct ReportStream {
    recorder: LoadRecorder,
    ticks: Interval,
    last: LoadTotals,
    last_at: Instant,
    ending: watch::Receiver<bool>,
    _open: OpenStream,
}

impl ReportStream {
    fn next_report(&mut self) -> OrcaLoadReport {
        let now = Instant::now();
        let totals = self.recorder.totals();
        let report = load_report(
            self.last,
            totals,
            now.saturating_duration_since(self.last_at),
            self.recorder.capacity(),
            self.recorder.set_metrics(),
        );
        self.last = totals;
        self.last_at = now;
        report
    }
}

/// Counts a stream as open until the server drops it.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(open_streams: Arc<AtomicUsize>) -> Self {
        open_streams.fetch_add(1, Ordering::SeqCst);
        Self(open_streams)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl OpenRcaService for OrcaService {
    type StreamCoreMetricsStream = BoxStream<'static, Result<OrcaLoadReport, Status>>;

    async fn stream_core_metrics(
        &self,
        request: Request<OrcaLoadReportRequest>,
    ) -> Result<Response<Self::StreamCoreMetricsStream>, Status> {
        let period = self.report_interval(request.get_ref());
        // The first tick is immediate: the first report goes out at once.
        let mut ticks = tokio::time::interval(period);
        // A client that reads slowly gets fewer reports, not a burst of stale ones.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let state = ReportStream {
            recorder: self.recorder.clone(),
            ticks,
            last: LoadTotals::default(),
            last_at: self.recorder.created(),
            ending: self.ending.subscribe(),
            _open: OpenStream::new(self.open_streams.clone()),
        };
        // The server polls this stream for its next report and drops it when the client goes
        // away: nothing outlives the stream.
        let reports = futures::stream::unfold(state, |mut state| async move {
            tokio::select! {
                biased;
                // The sender lives as long as the service, which outlives its streams: an
                // error cannot happen, and would not mean "end" anyway.
                Ok(_) = state.ending.wait_for(|ending| *ending) => return None,
                _ = state.ticks.tick() => {}
            }
            let report = state.next_report();
            Some((Ok(report), state))
        });
        Ok(Response::new(Box::pin(reports)))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::ProtoDuration;

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    fn asking(interval: Option<Duration>) -> OrcaLoadReportRequest {
        OrcaLoadReportRequest {
            report_interval: interval.map(ProtoDuration::from),
            request_cost_names: Vec::new(),
        }
    }

    #[test]
    fn the_interval_is_the_asked_one_raised_to_the_minimum_or_the_default_when_unasked() {
        let service = OrcaService::new(LoadRecorder::new());
        assert_eq!(
            service.report_interval(&asking(Some(Duration::from_millis(200)))),
            Duration::from_secs(1)
        );
        assert_eq!(
            service.report_interval(&asking(Some(Duration::from_secs(3)))),
            Duration::from_secs(3)
        );
        assert_eq!(service.report_interval(&asking(None)), Duration::from_secs(10));

        let fast = OrcaService::new(LoadRecorder::new()).min_report_interval(Duration::from_millis(100));
        assert_eq!(
            fast.report_interval(&asking(Some(Duration::from_millis(200)))),
            Duration::from_millis(200)
        );
        assert_eq!(
            fast.report_interval(&asking(Some(Duration::ZERO))),
            Duration::from_millis(100)
        );

        let unbounded = OrcaService::new(LoadRecorder::new()).min_report_interval(Duration::ZERO);
        assert_eq!(
            unbounded.report_interval(&asking(Some(Duration::ZERO))),
            Duration::from_millis(1)
        );
    }

    /// With the clock paused, every interval has its exact length: the reports are exact.
    #[tokio::test(start_paused = true)]
    async fn each_report_gives_the_exact_rates_of_its_own_interval() {
        let recorder = LoadRecorder::with_capacity(2);
        let service = OrcaService::new(recorder.clone()).min_report_interval(Duration::from_millis(100));
        let start = Instant::now();
        // Load before the stream opens: the first report covers it, from the recorder's creation.
        for _ in 0..3 {
            recorder.record_request(true);
        }
        recorder.record_busy(Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(500)).await;

        let mut reports = service
            .stream_core_metrics(Request::new(asking(Some(Duration::from_millis(200)))))
            .await
            .unwrap()
            .into_inner();
        let first = reports.next().await.unwrap().unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "the first report comes at once"
        );
        assert_close(first.rps_fractional, 6.0); // 3 requests in 0.5 s
        assert_eq!(first.eps, 0.0);
        assert_close(first.application_utilization, 0.1); // 0.1 s busy over 0.5 s x 2 slots

        for _ in 0..7 {
            recorder.record_request(true);
        }
        recorder.record_request(false);
        recorder.record_busy(Duration::from_millis(300));
        let second = reports.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(700));
        assert_close(second.rps_fractional, 40.0); // 8 requests in 0.2 s
        assert_close(second.eps, 5.0);
        assert_close(second.application_utilization, 0.75); // 0.3 s over 0.2 s x 2 slots

        let idle = reports.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(900));
        assert_eq!(
            (idle.rps_fractional, idle.eps, idle.application_utilization),
            (0.0, 0.0, 0.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_keep_their_own_intervals_and_the_minimum_holds() {
        let recorder = LoadRecorder::new();
        let service = OrcaService::new(recorder.clone());
        let open = |interval| {
            let service = service.clone();
            async move {
                service
                    .stream_core_metrics(Request::new(asking(Some(interval))))
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let mut fast = open(Duration::from_millis(200)).await;
        let mut slow = open(Duration::from_secs(3)).await;
        assert_eq!(service.open_streams(), 2);
        let start = Instant::now();
        fast.next().await.unwrap().unwrap();
        slow.next().await.unwrap().unwrap();

        recorder.record_request(true);
        fast.next().await.unwrap().unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "200 ms was raised to the 1 s minimum"
        );
        recorder.record_request(true);
        let report = slow.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // Both requests, over the slow stream's own 3 s: the fast stream's reports took nothing.
        assert_close(report.rps_fractional, 2.0 / 3.0);

        drop(fast);
        assert_eq!(service.open_streams(), 1);
        drop(slow);
        assert_eq!(service.open_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ending_the_streams_ends_open_and_later_ones() {
        let service = OrcaService::new(LoadRecorder::new());
        let open = || async {
            service
                .stream_core_metrics(Request::new(asking(Some(Duration::from_secs(1)))))
                .await
                .unwrap()
                .into_inner()
        };
        let mut open_before = open().await;
        open_before.next().await.unwrap().unwrap();
        let waiting = tokio::spawn(async move { open_before.next().await.is_none() });
        tokio::task::yield_now().await;

        let start = Instant::now();
        service.end_streams();
        assert!(waiting.await.unwrap(), "the open stream ended");
        assert_eq!(start.elapsed(), Duration::ZERO, "at once, not at its next report");
        assert!(open().await.next().await.is_none(), "a later stream ends at once");
        assert_eq!(service.open_streams(), 0);
    }
}
