//! [`RecordLoadLayer`]: a tower layer that records a tonic server's requests in a
//! [`LoadRecorder`].

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::server::NamedService;
use tower::{Layer, Service};

use crate::LoadRecorder;

/// Path prefixes whose calls are a load balancer's own traffic, not load: never recorded.
const NOT_LOAD: [&str; 2] = ["/grpc.health.v1.Health/", "/xds.service.orca.v3.OpenRcaService/"];

/// Records each request of the services it wraps in a [`LoadRecorder`] once its response
/// future completes: as failed if the future fails, if the HTTP status is not a success, or if
/// the response headers carry a non-zero `grpc-status` (tonic answers an error with a
/// trailers-only response, whose status is in the headers). A request whose future is dropped
/// before it completes (the client cancelled, or its deadline passed) counts as failed.
///
/// With [`measure_busy`](Self::measure_busy), the time from the call to the response also
/// counts as busy time. For a streaming response that is the time to its headers; errors that
/// come later, in trailers, are not seen.
///
/// Health checks (`grpc.health.v1.Health`) and ORCA streams are never recorded, so that the
/// layer can wrap a whole server; wrapping single services also works (the wrapped service
/// keeps its name for `Server::add_service`).
#[derive(Clone, Debug)]
pub struct RecordLoadLayer {
    recorder: LoadRecorder,
    measure_busy: bool,
}

impl RecordLoadLayer {
    /// Counts requests and errors in `recorder`; busy time is left to the application.
    pub fn new(recorder: LoadRecorder) -> Self {
        Self {
            recorder,
            measure_busy: false,
        }
    }

    /// Also records the time from each call to its response as busy time: right for a server
    /// whose handlers work all along (no waiting on other services or queues).
    pub fn measure_busy(mut self, measure_busy: bool) -> Self {
        self.measure_busy = measure_busy;
        self
    }
}

impl<S> Layer<S> for RecordLoadLayer {
    type Service = RecordLoad<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordLoad {
            inner,
            recorder: self.recorder.clone(),
            measure_busy: self.measure_busy,
        }
    }
}

/// The service [`RecordLoadLayer`] makes.
#[derive(Clone, Debug)]
pub struct RecordLoad<S> {
    inner: S,
    recorder: LoadRecorder,
    measure_busy: bool,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RecordLoad<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordLoadFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path();
        let recording = (!NOT_LOAD.iter().any(|prefix| path.starts_with(prefix))).then(|| Recording {
            recorder: self.recorder.clone(),
            started: self.measure_busy.then(Instant::now),
            ok: false,
        });
        RecordLoadFuture {
            inner: self.inner.call(request),
            recording,
        }
    }
}

impl<S: NamedService> NamedService for RecordLoad<S> {
    const NAME: &'static str = S::NAME;
}

pin_project! {
    /// The response future of [`RecordLoad`].
    pub struct RecordLoadFuture<F> {
        #[pin]
        inner: F,
        recording: Option<Recording>,
    }
}

impl<F, ResponseBody, E> Future for RecordLoadFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(mut recording) = this.recording.take() {
            recording.ok = result.as_ref().is_ok_and(succeeded);
        }
        Poll::Ready(result)
    }
}

/// A request being recorded; recorded when dropped, as failed unless marked `ok` first.
struct Recording {
    recorder: LoadRecorder,
    started: Option<Instant>,
    ok: bool,
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            self.recorder.record_busy(started.elapsed());
        }
        self.recorder.record_request(self.ok);
    }
}

fn succeeded<B>(response: &http::Response<B>) -> bool {
    response.status().is_success()
        && response
            .headers()
            .get("grpc-status")
            .is_none_or(|status| status.as_bytes() == b"0")
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use futures::FutureExt;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::{LoadTotals, STREAM_CORE_METRICS_PATH};

    fn grpc_response(status: Option<&str>) -> http::Response<()> {
        let mut response = http::Response::new(());
        if let Some(status) = status {
            response.headers_mut().insert("grpc-status", status.parse().unwrap());
        }
        response
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn responses_count_as_failed_when_their_headers_carry_a_non_zero_grpc_status() {
        let recorder = LoadRecorder::new();
        let service =
            RecordLoadLayer::new(recorder.clone()).layer(service_fn(|request: http::Request<()>| async move {
                Ok::<_, Infallible>(match request.uri().path() {
                    "/pkg.Svc/Plain" => grpc_response(None),
                    "/pkg.Svc/Ok" => grpc_response(Some("0")),
                    "/pkg.Svc/Internal" => grpc_response(Some("13")),
                    _ => {
                        let mut response = grpc_response(None);
                        *response.status_mut() = http::StatusCode::NOT_FOUND;
                        response
                    }
                })
            }));
        for path in ["/pkg.Svc/Plain", "/pkg.Svc/Ok", "/pkg.Svc/Internal", "/other"] {
            service.clone().oneshot(request(path)).await.unwrap();
        }
        assert_eq!(
            recorder.totals(),
            LoadTotals {
                requests: 4,
                errors: 2,
                busy: Duration::ZERO
            }
        );
    }

    #[tokio::test]
    async fn failed_and_abandoned_futures_count_as_failed_requests() {
        let recorder = LoadRecorder::new();
        let failing = RecordLoadLayer::new(recorder.clone()).layer(service_fn(|_: http::Request<()>| async {
            Err::<http::Response<()>, _>("broken")
        }));
        assert!(failing.oneshot(request("/pkg.Svc/M")).await.is_err());

        let mut pending = RecordLoadLayer::new(recorder.clone()).layer(service_fn(|_: http::Request<()>| {
            futures::future::pending::<Result<http::Response<()>, Infallible>>()
        }));
        let mut future = pending.call(request("/pkg.Svc/M"));
        assert!((&mut future).now_or_never().is_none());
        assert_eq!(recorder.totals().requests, 1, "recorded only once it ends");
        drop(future);
        assert_eq!((recorder.totals().requests, recorder.totals().errors), (2, 2));
    }

    #[tokio::test]
    async fn health_checks_and_orca_streams_are_not_load() {
        let recorder = LoadRecorder::new();
        let service = RecordLoadLayer::new(recorder.clone())
            .measure_busy(true)
            .layer(service_fn(|_: http::Request<()>| async {
                Ok::<_, Infallible>(grpc_response(None))
            }));
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            STREAM_CORE_METRICS_PATH,
        ] {
            service.clone().oneshot(request(path)).await.unwrap();
        }
        assert_eq!(recorder.totals(), LoadTotals::default());
    }

    #[tokio::test(start_paused = true)]
    async fn measured_busy_time_runs_from_the_call_to_the_response() {
        let recorder = LoadRecorder::new();
        let service = RecordLoadLayer::new(recorder.clone())
            .measure_busy(true)
            .layer(service_fn(|_: http::Request<()>| async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, Infallible>(grpc_response(None))
            }));
        let (first, second) = futures::join!(
            service.clone().oneshot(request("/pkg.Svc/M")),
            service.clone().oneshot(request("/pkg.Svc/M")),
        );
        first.unwrap();
        second.unwrap();
        assert_eq!(
            recorder.totals(),
            LoadTotals {
                requests: 2,
                errors: 0,
                busy: Duration::from_millis(60)
            }
        );
    }
}
