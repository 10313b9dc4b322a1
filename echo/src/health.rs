//! The `grpc.health.v1.Health` service: a settable status per service name, `Watch` streams
//! counted while open.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering},
};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health};

use crate::{Counters, ServingStatus};

/// Serving status per health service name, watched by open `Watch` streams.
#[derive(Clone, Debug)]
pub struct HealthState {
    statuses: Arc<Mutex<HashMap<String, watch::Sender<ServingStatus>>>>,
}

impl HealthState {
    /// The whole server ("") and each of `services` start with `initial`.
    pub fn new(services: &[&str], initial: ServingStatus) -> Self {
        let mut statuses = HashMap::new();
        for service in std::iter::once("").chain(services.iter().copied()) {
            statuses.insert(service.to_string(), watch::channel(initial).0);
        }
        Self {
            statuses: Arc::new(Mutex::new(statuses)),
        }
    }

    /// Sets `service`'s status; open `Watch` streams see it at once.
    pub fn set(&self, service: &str, status: ServingStatus) {
        let mut statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        statuses
            .entry(service.to_string())
            .or_insert_with(|| watch::channel(status).0)
            .send_replace(status);
    }

    /// Sets every known service's status (what a server does when it starts draining).
    pub fn set_all(&self, status: ServingStatus) {
        let statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for sender in statuses.values() {
            sender.send_replace(status);
        }
    }

    fn subscribe(&self, service: &str) -> Option<watch::Receiver<ServingStatus>> {
        let statuses = self.statuses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        statuses.get(service).map(tokio::sync::watch::Sender::subscribe)
    }
}

/// The `grpc.health.v1.Health` service over a [`HealthState`], counting open `Watch` streams.
/// With `watch_implemented: false` it answers `Watch` with UNIMPLEMENTED, like servers that
/// only implement `Check`.
#[derive(Clone)]
pub struct HealthService {
    pub(crate) state: HealthState,
    pub(crate) counters: Arc<Counters>,
    pub(crate) watch_implemented: bool,
    /// Set when the server stops: open Watch streams end, so that a graceful stop finishes.
    pub(crate) stopping: watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.counters.health_checks.fetch_add(1, Ordering::SeqCst);
        let service = request.into_inner().service;
        match self.state.subscribe(&service) {
            Some(receiver) => Ok(Response::new(HealthCheckResponse {
                status: *receiver.borrow() as i32,
            })),
            None => Err(Status::not_found(format!("unknown health service {service:?}"))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        if !self.watch_implemented {
            return Err(Status::unimplemented("this backend implements only Check"));
        }
        let service = request.into_inner().service;
        let Some(receiver) = self.state.subscribe(&service) else {
            // As the health protocol says: SERVICE_UNKNOWN, and keep the stream open.
            let unknown = HealthCheckResponse {
                status: ServingStatus::ServiceUnknown as i32,
            };
            let stream = futures::stream::once(async move { Ok(unknown) }).chain(futures::stream::pending());
            return Ok(Response::new(Box::pin(stream)));
        };
        let open = OpenWatch::new(self.counters.clone());
        let mut stopping = self.stopping.clone();
        let stream = tokio_stream::wrappers::WatchStream::new(receiver)
            .map(move |status| {
                let _still_open = &open;
                Ok(HealthCheckResponse { status: status as i32 })
            })
            .take_until(async move {
                let _ = stopping.wait_for(|stopping| *stopping).await;
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Counts a `Watch` stream as open until the stream is dropped.
struct OpenWatch(Arc<Counters>);

impl OpenWatch {
    fn new(counters: Arc<Counters>) -> Self {
        counters.health_watches_open.fetch_add(1, Ordering::SeqCst);
        Self(counters)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.health_watches_open.fetch_sub(1, Ordering::SeqCst);
    }
}
