//! Steady request load through a channel, counting what succeeded and what failed, so a test
//! can change the world underneath and assert on what clients saw.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use kubegrpc_echo::{EchoClient, EchoRequest};
use tokio::task::JoinHandle;

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
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
                                    let mut failures = counts.failures.lock().unwrap_or_else(|p| p.into_inner());
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
