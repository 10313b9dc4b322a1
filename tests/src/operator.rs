//! The operator, run in-process on the test's runtime and scoped to the test's namespace, so
//! that concurrent tests sharing one control plane never reconcile each other's objects.

use std::{sync::Arc, time::Duration};

use kube::Client;
use kubegrpc_operator::{Metrics, Settings};
use tokio::{sync::oneshot, task::JoinHandle};

/// A running in-process operator; stopped when dropped.
pub struct InProcessOperator {
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), kubegrpc_operator::Error>>,
}

impl InProcessOperator {
    /// Starts an operator watching only `namespace`.
    pub fn start(client: Client, namespace: &str) -> Self {
        Self::start_with(
            client,
            Settings {
                namespace: Some(namespace.into()),
                identity: format!("test-operator-{namespace}"),
                ..Settings::default()
            },
        )
    }

    pub fn start_with(client: Client, settings: Settings) -> Self {
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kubegrpc_operator::run(client, settings, metrics.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// Status writes made for GrpcBackend `namespace/name` so far.
    pub fn status_writes(&self, namespace: &str, name: &str) -> u64 {
        self.metrics
            .status_writes
            .get_or_create(&kubegrpc_operator::metrics::BackendLabels {
                namespace: namespace.into(),
                name: name.into(),
            })
            .get()
    }

    /// Stops gracefully and waits (at most 10s) for the reconciler to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for InProcessOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
