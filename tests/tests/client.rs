//! The client crate end to end: real backends on 10.250.x.y count what they receive; the
//! GrpcBackend status is written by the test (client alone) or by the operator.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use kube::api::DeleteParams;
use kubegrpc::{Channel, DiscoveryState};
use kubegrpc_echo::{Backend, BackendOptions, EchoClient, EchoRequest, ServingStatus};
use kubegrpc_tests::{
    backends::{start_backend, start_backends},
    certs::CertificateAuthority,
    load::Load,
    objects::{SliceEndpoint, apply_slice, create_service},
    operator::InProcessOperator,
    scenario::{Scenario, wait_snapshot},
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

/// Writes a status by hand, as the operator would, with the given weights (all Serving).
async fn publish(s: &Scenario, name: &str, endpoints: &[(SocketAddr, u32)]) -> Result<()> {
    let entries: Vec<(SocketAddr, u32, &str)> = endpoints.iter().map(|(a, w)| (*a, *w, "Serving")).collect();
    s.publish_status(name, &entries).await
}

fn requests(backends: &[Backend]) -> Vec<u64> {
    backends.iter().map(|b| b.counters.snapshot().requests).collect()
}

/// Sends `count` echo requests over `concurrency` tasks; returns how many failed.
async fn send(channel: &Channel, count: usize, concurrency: usize) -> Result<usize> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = EchoClient::new(channel.clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < count {
                if client
                    .echo(EchoRequest {
                        message: "x".into(),
                        ..Default::default()
                    })
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await?;
    }
    Ok(failed)
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_written_in_the_status_are_the_shares_the_backends_see() -> Result<()> {
    let s = Scenario::new("weights").await?;
    let backends = start_backends(3).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    publish(&s, "echo", &[(addresses[0], 1), (addresses[1], 2), (addresses[2], 7)]).await?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    // Connections are made when endpoints appear, before any request.
    wait::until("a connection to every backend before any request", DEADLINE, || async {
        let seen: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                (
                    b.counters.snapshot().connections_accepted,
                    b.counters.snapshot().requests,
                )
            })
            .collect();
        Ok((seen == [(1, 0), (1, 0), (1, 0)]).then_some(()))
    })
    .await?;
    assert_eq!(send(&channel, 10_000, 16).await?, 0);
    let counts = requests(&backends);
    let shares: Vec<f64> = counts.iter().map(|c| *c as f64 / 10_000.0).collect();
    println!("weights 1:2:7 -> requests per backend {counts:?}");
    for (share, expected) in shares.iter().zip([0.1, 0.2, 0.7]) {
        assert!(
            (share - expected).abs() <= 0.01,
            "shares {shares:?}, expected 10/20/70%"
        );
    }
    let connections: Vec<u64> = backends
        .iter()
        .map(|b| b.counters.snapshot().connections_accepted)
        .collect();
    assert_eq!(connections, [1, 1, 1], "one connection per endpoint");

    // The client's own counters, as Prometheus metrics, agree with the backends' counts.
    let mut registry = prometheus_client::registry::Registry::default();
    kubegrpc::metrics::register(&channel, &mut registry);
    let mut scrape = String::new();
    prometheus_client::encoding::text::encode(&mut scrape, &registry)?;
    for (backend, count) in backends.iter().zip(&counts) {
        let series = format!(
            "kubegrpc_client_requests_total{{backend=\"{}/echo\",endpoint=\"{}\"}} {count}",
            s.namespace, backend.address
        );
        assert!(scrape.contains(&series), "{series} not in:\n{scrape}");
    }

    // New weights: the shares follow, over the same connections.
    publish(&s, "echo", &[(addresses[0], 5), (addresses[1], 3), (addresses[2], 2)]).await?;
    wait_snapshot(&channel, "the new weights", DEADLINE, |snapshot| {
        snapshot.endpoint(&addresses[0]).is_some_and(|e| e.weight == 5)
    })
    .await?;
    let before = requests(&backends);
    assert_eq!(send(&channel, 10_000, 16).await?, 0);
    let after = requests(&backends);
    let shares: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64 / 10_000.0)
        .collect();
    println!("weights 5:3:2 -> shares {shares:?}");
    for (share, expected) in shares.iter().zip([0.5, 0.3, 0.2]) {
        assert!(
            (share - expected).abs() <= 0.01,
            "shares {shares:?}, expected 50/30/20%"
        );
    }
    let connections: Vec<u64> = backends
        .iter()
        .map(|b| b.counters.snapshot().connections_accepted)
        .collect();
    assert_eq!(connections, [1, 1, 1], "a new weight does not reconnect");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_operator_requests_follow_health_and_new_backends() -> Result<()> {
    let s = Scenario::new("client-e2e").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let mut backends = start_backends(3).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let slice = |backends: &[Backend]| -> Vec<SliceEndpoint> {
        backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect()
    };
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice(&backends)).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    wait_snapshot(&channel, "3 endpoints in rotation", DEADLINE, |snapshot| {
        snapshot.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;
    assert_eq!(send(&channel, 3000, 12).await?, 0);
    let spread = requests(&backends);
    println!("spread over 3 backends: {spread:?}");
    for count in &spread {
        assert!(count.abs_diff(1000) <= 50, "{spread:?} is not within 5% of even");
    }

    // Under load: flip one NOT_SERVING. Once the client's snapshot shows weight 0 and the
    // requests that were in flight to it have finished, that backend must receive nothing more.
    let load = Load::start(channel.clone(), 8);
    load.wait_for_more(500, DEADLINE).await?;
    let flipped = backends[0].address;
    backends[0].health.set("", ServingStatus::NotServing);
    wait_snapshot(
        &channel,
        "the flipped endpoint at weight 0, drained",
        DEADLINE,
        |snapshot| {
            snapshot
                .endpoint(&flipped)
                .is_some_and(|e| e.weight == 0 && !e.in_rotation && e.in_flight == 0)
        },
    )
    .await?;
    let at_flip = backends[0].counters.snapshot().requests;
    load.wait_for_more(3000, DEADLINE).await?;
    assert_eq!(
        backends[0].counters.snapshot().requests,
        at_flip,
        "the NotServing backend received requests after the client saw its weight 0"
    );

    // Stop it: it had no traffic left, so nothing fails.
    let stopped = backends.remove(0);
    stopped.stop().await;
    load.wait_for_more(2000, DEADLINE).await?;

    // A new backend joins: it gets requests without a client restart.
    let joining = start_backend(BackendOptions::default()).await?;
    let joined = joining.address;
    backends.push(joining);
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &slice(&backends)).await?;
    wait_snapshot(&channel, "the new endpoint in rotation", DEADLINE, |snapshot| {
        snapshot.endpoint(&joined).is_some_and(|e| e.in_rotation)
    })
    .await?;
    load.wait_for_more(3000, DEADLINE).await?;
    let counts = load.stop().await;
    assert!(
        backends[2].counters.snapshot().requests > 500,
        "the new backend got too few requests"
    );
    assert_eq!(counts.failed(), 0, "failed requests: {:?}", counts.failures());
    println!(
        "flip/stop/join under load: {} requests, {} failed; per backend now {:?}",
        counts.succeeded(),
        counts.failed(),
        requests(&backends)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_grpcbackend_fails_requests_fast_naming_it() -> Result<()> {
    let s = Scenario::new("deleted").await?;
    let backend = start_backend(BackendOptions::default()).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    publish(&s, "echo", &[(backend.address, 100)]).await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    assert_eq!(send(&channel, 10, 1).await?, 0);

    s.backends().delete("echo", &DeleteParams::default()).await?;
    wait_snapshot(&channel, "the deletion seen", DEADLINE, |snapshot| {
        snapshot.discovery == DiscoveryState::NotFound
    })
    .await?;
    let started = std::time::Instant::now();
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        EchoClient::new(channel.clone()).echo(EchoRequest::default()),
    )
    .await
    .context("a request with no endpoint hung")?
    .expect_err("a request with no endpoint succeeded");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    let backend_name = format!("{}/echo", s.namespace);
    assert!(
        failed.message().contains(&backend_name),
        "{:?} does not name {backend_name}",
        failed.message()
    );
    assert!(failed.message().contains("not found"), "{:?}", failed.message());
    println!(
        "deleted GrpcBackend: failed in {:?} with {:?}",
        started.elapsed(),
        failed.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_waits_for_a_grpcbackend_created_later() -> Result<()> {
    let s = Scenario::new("later").await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    assert_eq!(channel.discovery_state(), DiscoveryState::NotFound);
    let failed = EchoClient::new(channel.clone())
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);

    let waiting = tokio::spawn({
        let channel = channel.clone();
        async move { tokio::time::timeout(Duration::from_secs(60), channel.ready()).await }
    });
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backend = start_backend(BackendOptions::default()).await?;
    s.echo_service(&[backend.address]).await?;
    assert!(
        !waiting.is_finished(),
        "ready() returned before the GrpcBackend existed"
    );
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    waiting
        .await?
        .context("ready() did not return once the GrpcBackend had a usable endpoint")?;
    let reply = EchoClient::new(channel.clone()).echo(EchoRequest::default()).await?;
    assert_eq!(reply.into_inner().backend, backend.address.to_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tls_the_channel_reaches_tls_endpoints_and_without_it_does_not() -> Result<()> {
    let s = Scenario::new("tls").await?;
    let ca = CertificateAuthority::new("echo-ca")?;
    let serving = ca.serving("echo.test", &["echo.test"])?;
    let tls = Some((serving.cert_pem.clone(), serving.key_pem.clone()));
    let backends = vec![
        start_backend(BackendOptions {
            tls: tls.clone(),
            ..BackendOptions::default()
        })
        .await?,
        start_backend(BackendOptions {
            tls,
            ..BackendOptions::default()
        })
        .await?,
    ];
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    publish(&s, "echo", &[(backends[0].address, 100), (backends[1].address, 100)]).await?;

    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .tls(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
                .domain_name("echo.test"),
        )
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    assert_eq!(send(&channel, 100, 4).await?, 0);
    assert_eq!(requests(&backends), [50, 50]);

    // The same endpoints in plaintext: the TLS servers refuse, nothing is counted.
    let plaintext = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, plaintext.ready()).await?;
    assert_eq!(
        send(&plaintext, 4, 1).await?,
        4,
        "plaintext requests to TLS endpoints succeeded"
    );
    assert_eq!(requests(&backends), [50, 50]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_in_flight_on_a_removed_endpoint_finish_there() -> Result<()> {
    let s = Scenario::new("drain").await?;
    let leaving = start_backend(BackendOptions::default()).await?;
    let staying = start_backend(BackendOptions::default()).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    publish(&s, "echo", &[(leaving.address, 100)]).await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;

    let slow: Vec<_> = (0..8)
        .map(|_| {
            let mut client = EchoClient::new(channel.clone());
            tokio::spawn(async move {
                client
                    .echo(EchoRequest {
                        message: "slow".into(),
                        delay_ms: 2000,
                    })
                    .await
            })
        })
        .collect();
    wait_snapshot(&channel, "8 requests in flight", DEADLINE, |snapshot| {
        snapshot.endpoint(&leaving.address).is_some_and(|e| e.in_flight == 8)
    })
    .await?;
    // The endpoint leaves the status while its 8 requests run.
    publish(&s, "echo", &[(staying.address, 100)]).await?;
    wait_snapshot(&channel, "the endpoint gone from the status", DEADLINE, |snapshot| {
        snapshot.endpoint(&leaving.address).is_none()
    })
    .await?;
    assert_eq!(send(&channel, 20, 2).await?, 0);
    assert_eq!(
        staying.counters.snapshot().requests,
        20,
        "new requests go to the remaining endpoint"
    );
    for request in slow {
        let reply = request
            .await?
            .context("a request in flight on the removed endpoint failed")?;
        assert_eq!(reply.into_inner().backend, leaving.address.to_string());
    }
    assert_eq!(
        leaving.counters.snapshot().requests,
        8,
        "the in-flight requests finished where they were"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_too_few_usable_endpoints_requests_spread_over_the_kubernetes_ready_ones() -> Result<()> {
    let s = Scenario::new("panic").await?;
    let backends = start_backends(4).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    // One usable endpoint of four Kubernetes-ready ones: 25%, under the default 50%.
    let a = &backends;
    s.publish_status(
        "echo",
        &[
            (a[0].address, 100, "Serving"),
            (a[1].address, 0, "NotServing"),
            (a[2].address, 0, "NotServing"),
            (a[3].address, 0, "Unknown"),
        ],
    )
    .await?;
    let panicking = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    let strict = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .panic_threshold(0)
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, panicking.ready()).await?;
    tokio::time::timeout(DEADLINE, strict.ready()).await?;
    assert!(panicking.snapshot().panic && !strict.snapshot().panic);

    assert_eq!(send(&panicking, 400, 4).await?, 0);
    assert_eq!(
        requests(&backends),
        [100, 100, 100, 100],
        "panic mode spreads evenly over all four"
    );
    assert_eq!(send(&strict, 100, 4).await?, 0);
    assert_eq!(
        requests(&backends),
        [200, 100, 100, 100],
        "with panic off only the usable endpoint serves"
    );

    // None usable and panic off: fail fast, saying why.
    s.publish_status(
        "echo",
        &[(a[0].address, 0, "NotServing"), (a[1].address, 0, "NotServing")],
    )
    .await?;
    wait_snapshot(&strict, "nothing usable", DEADLINE, |snapshot| {
        snapshot.unavailable.is_some()
    })
    .await?;
    let failed = EchoClient::new(strict.clone())
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    assert!(
        failed.message().contains("has no ready endpoints"),
        "{:?}",
        failed.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_endpoint_is_ejected_before_any_request_goes_to_it() -> Result<()> {
    let s = Scenario::new("unreachable").await?;
    let live = start_backend(BackendOptions::default()).await?;
    // Listed as Serving, but nothing listens there (the operator has not noticed yet).
    let dead = SocketAddr::from((kubegrpc_tests::backends::next_backend_ip(), live.address.port()));
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    publish(&s, "echo", &[(live.address, 100), (dead, 100)]).await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    wait_snapshot(&channel, "the unreachable endpoint ejected", DEADLINE, |snapshot| {
        snapshot.endpoint(&dead).is_some_and(|e| e.ejected && e.requests == 0)
    })
    .await?;
    assert_eq!(
        send(&channel, 100, 4).await?,
        0,
        "no request went to the unreachable endpoint"
    );
    assert_eq!(live.counters.snapshot().requests, 100);
    Ok(())
}
