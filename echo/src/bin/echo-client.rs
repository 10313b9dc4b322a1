//! Sends N echo requests through a kubegrpc channel and prints how many each backend answered.
//!
//!   echo-client --namespace NS --backend NAME [--requests 1000] [--concurrency 8] [--kubeconfig PATH]
//!
//! The kube client comes from --kubeconfig, $KUBECONFIG, ~/.kube/config or the in-cluster config.

#![forbid(unsafe_code)]

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubegrpc_echo::{EchoClient, EchoRequest};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(name = "echo-client", about = "Sends echo requests through a kubegrpc channel")]
struct Options {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The GrpcBackend to balance over.
    #[arg(long)]
    backend: String,
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long to wait for a usable endpoint before sending.
    #[arg(long, default_value_t = 30)]
    ready_timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let config = match &options.kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let channel = kubegrpc::Channel::builder(client, &options.namespace, &options.backend)
        .connect()
        .await?;
    tokio::time::timeout(Duration::from_secs(options.ready_timeout_seconds), channel.ready())
        .await
        .with_context(|| format!("no usable endpoint in GrpcBackend {}", channel.backend()))?;

    let counts: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut client = EchoClient::new(channel.clone());
        let (counts, next, total) = (counts.clone(), next.clone(), options.requests);
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                let key = match client
                    .echo(EchoRequest {
                        message: "hello".into(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(reply) => reply.into_inner().backend,
                    Err(status) => format!("failed: {:?}", status.code()),
                };
                *counts.lock().await.entry(key).or_default() += 1;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    println!(
        "requests per backend ({} sent to GrpcBackend {}):",
        options.requests,
        channel.backend()
    );
    for (backend, count) in counts.lock().await.iter() {
        println!("  {backend:<24} {count:>6}");
    }
    Ok(())
}
