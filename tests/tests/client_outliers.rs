//! The client's passive outlier detection against real connections: what ejects (evidence over
//! an interval), what never does (the caller's own deadlines and cancellations), the cap on
//! ejections, and an ejected endpoint's return with its connection already open.
//!
//! The statuses are written by hand (no operator), so that only the client can react.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body::Frame;
use kubegrpc::{Channel, FailurePercentage, OutlierDetection, Snapshot};
use kubegrpc_echo::{EchoClient, EchoRequest};
use kubegrpc_tests::{
    backends::{BACKEND_PORT, next_backend_ip, start_backends},
    load::Load,
    proxy::{RefusingAddress, ResettingProxy},
    scenario::{Scenario, wait_snapshot},
    wait,
};
use serde_json::json;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(30);

fn ejected(snapshot: &Snapshot) -> usize {
    snapshot.endpoints.iter().filter(|e| e.ejected).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_resets_every_connection_is_ejected_on_evidence_capped_and_returns_connected() -> Result<()> {
    let s = Scenario::new("resets").await?;
    let backends = start_backends(3).await?;
    // Two of the three endpoints are proxies that can start resetting every connection.
    let mut proxies = Vec::new();
    for backend in &backends[..2] {
        let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
        proxies.push(ResettingProxy::start(address, backend.address).await?);
    }
    let listed = [proxies[0].address, proxies[1].address, backends[2].address];
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.publish_serving("echo", &listed).await?;

    let request_volume = 10;
    let config = OutlierDetection {
        interval: Duration::from_millis(500),
        base_ejection_time: Duration::from_secs(3),
        max_ejection_percent: 10,
        // Only the failure percentage here; connect failures in a row are the other tests'.
        consecutive_connect_failures: 0,
        failure_percentage: Some(FailurePercentage {
            threshold: 85,
            minimum_hosts: 3,
            request_volume,
        }),
        ..OutlierDetection::default()
    };
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .outlier_detection(config)
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let load = Load::start(channel.clone(), 4);
    load.wait_for_more(500, DEADLINE).await?;
    assert_eq!(ejected(&channel.snapshot()), 0, "nothing is ejected while all answer");

    for proxy in &proxies {
        proxy.set_resetting(true);
    }
    // Watch every snapshot until one endpoint is ejected: never more than one at once (10% of
    // 3 allows one), and only once the interval's evidence was there.
    let mut most_ejected = 0;
    let ejected_one = wait::until("one resetting endpoint ejected", DEADLINE, || {
        let snapshot = channel.snapshot();
        most_ejected = most_ejected.max(ejected(&snapshot));
        async move {
            Ok(snapshot
                .endpoints
                .iter()
                .find(|e| e.ejected)
                .map(|e| (e.address, e.failures)))
        }
    })
    .await?;
    let (out, failures_then) = ejected_one;
    assert!(
        proxies.iter().any(|p| p.address == out),
        "a resetting endpoint was ejected"
    );
    assert!(
        failures_then * 100 >= 85 * request_volume,
        "ejected on the evidence: {failures_then} failures (threshold 85% of {request_volume})"
    );
    // While the other proxy keeps resetting, the cap holds for a few more intervals.
    let intervals = channel.snapshot().outlier_intervals;
    wait_snapshot(&channel, "three more intervals", DEADLINE, |s| {
        s.outlier_intervals >= intervals + 3
    })
    .await?;
    for _ in 0..20 {
        most_ejected = most_ejected.max(ejected(&channel.snapshot()));
        tokio::task::yield_now().await;
    }
    assert_eq!(most_ejected, 1, "at most max_ejection_percent of 3, but one");

    // Both recover. The ejected one comes back once its time is up, connected before any
    // request goes to it.
    let ejected_proxy = proxies.iter().find(|p| p.address == out).expect("a proxy");
    let accepted_before = ejected_proxy.accepted();
    let requests_while_out = channel.snapshot().endpoint(&out).map(|e| e.requests);
    for proxy in &proxies {
        proxy.set_resetting(false);
    }
    wait_snapshot(&channel, "the ejected endpoint back in rotation", DEADLINE, |s| {
        s.endpoint(&out).is_some_and(|e| e.in_rotation && !e.ejected)
    })
    .await?;
    assert!(
        ejected_proxy.accepted() > accepted_before,
        "its connection was opened before it returned"
    );
    let back = channel.snapshot();
    println!("ejected {out} after {failures_then} failures; back in rotation: {back:?}");
    assert!(
        requests_while_out.is_some(),
        "the ejected endpoint stayed listed while out"
    );
    let requests_at_return = back.endpoint(&out).map_or(0, |e| e.requests);
    wait::until("requests to the returned endpoint", DEADLINE, || {
        let now = channel.snapshot().endpoint(&out).map_or(0, |e| e.requests);
        async move { Ok((now > requests_at_return).then_some(())) }
    })
    .await?;
    let counts = load.stop().await;
    println!(
        "resetting endpoints: {} requests succeeded, {} failed (requests in flight on reset connections)",
        counts.succeeded(),
        counts.failed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_deadlines_and_cancellations_never_eject() -> Result<()> {
    let s = Scenario::new("caller-outcomes").await?;
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.publish_serving("echo", &addresses).await?;

    // The most eager settings: one failure that counted as evidence would eject.
    let config = OutlierDetection {
        interval: Duration::from_millis(200),
        max_ejection_percent: 100,
        consecutive_connect_failures: 1,
        failure_percentage: Some(FailurePercentage {
            threshold: 1,
            minimum_hosts: 1,
            request_volume: 1,
        }),
        ..OutlierDetection::default()
    };
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .endpoint(|endpoint| Ok(endpoint.timeout(Duration::from_millis(100))))
        .outlier_detection(config)
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let mut client = EchoClient::new(channel.clone());
    let slow = || EchoRequest {
        message: "slow".into(),
        delay_ms: 1_000,
    };

    let mut deadlines = 0;
    let mut cancellations = 0;
    let mut body_errors = 0;
    for _ in 0..12 {
        // The per-request timeout of the endpoint settings expires on a slow backend.
        let status = client.echo(slow()).await.expect_err("the timeout expires first");
        assert!(
            status.message().contains("Timeout expired") || status.code() == tonic::Code::Cancelled,
            "{status:?}"
        );
        deadlines += 1;
        // The caller gives up mid-request (its future is dropped).
        let mut impatient = client.clone();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), impatient.echo(slow()))
                .await
                .is_err()
        );
        cancellations += 1;
        // The caller's request stream fails after its first bytes.
        let frames = futures::stream::iter([
            Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"\0\0\0\0\x10"))),
            Err(tonic::Status::cancelled("the caller broke its stream")),
        ]);
        let request = http::Request::post("http://echo/kubegrpc.echo.v1.Echo/Echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::StreamBody::new(frames)))?;
        if let Ok(response) = channel.clone().oneshot(request).await {
            // Some servers answer before reading the whole body; then the error is in the body.
            drop(response);
        }
        body_errors += 1;
    }
    let intervals = channel.snapshot().outlier_intervals;
    wait_snapshot(&channel, "three intervals after the last failure", DEADLINE, |s| {
        s.outlier_intervals >= intervals + 3
    })
    .await?;
    let snapshot = channel.snapshot();
    println!(
        "{deadlines} deadlines, {cancellations} cancellations, {body_errors} request-body errors: {:?}",
        snapshot
            .endpoints
            .iter()
            .map(|e| (e.address, e.failures, e.ejections))
            .collect::<Vec<_>>()
    );
    assert!(
        snapshot.endpoints.iter().map(|e| e.failures).sum::<u64>() >= deadlines,
        "the deadlines were seen as failed requests"
    );
    assert!(
        snapshot.endpoints.iter().all(|e| e.ejections == 0 && !e.ejected),
        "the caller's own outcomes never eject: {snapshot:?}"
    );
    // The settings do eject on evidence: a backend that is gone is out after one attempt.
    let gone = backends.into_iter().next().expect("a backend");
    let gone_address = gone.address;
    gone.stop().await;
    for _ in 0..10 {
        let _ = client
            .echo(EchoRequest {
                message: "after".into(),
                delay_ms: 0,
            })
            .await;
    }
    wait_snapshot(&channel, "the stopped backend ejected", DEADLINE, |s| {
        s.endpoint(&gone_address).is_some_and(|e| e.ejected)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_never_reached_a_backend_is_sent_again_elsewhere() -> Result<()> {
    let s = Scenario::new("retry").await?;
    let backends = start_backends(2).await?;
    // Listed Serving, and refusing every connection from the start: every attempt there is
    // certainly one that never reached a backend, whatever the machine's load. (A connection
    // that was accepted and then reset may have carried a request, which gRPC rightly does not
    // send again: a test built on a reset races that.)
    let refusing = RefusingAddress::reserve(SocketAddr::from((next_backend_ip(), BACKEND_PORT)))?;
    let dead = refusing.address;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.publish_serving("echo", &[dead, backends[0].address, backends[1].address])
        .await?;
    // No ejection: every request picked for the refusing endpoint has to be sent again.
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .outlier_detection(OutlierDetection {
            enabled: false,
            ..OutlierDetection::default()
        })
        .connect()
        .await?;
    wait_snapshot(&channel, "3 in rotation", DEADLINE, |s| {
        s.endpoints.iter().filter(|e| e.in_rotation).count() == 3
    })
    .await?;

    let mut client = EchoClient::new(channel.clone());
    let mut failed = Vec::new();
    let sent = 300;
    for n in 0..sent {
        if let Err(status) = client
            .echo(EchoRequest {
                message: format!("retry {n}"),
                delay_ms: 0,
            })
            .await
        {
            failed.push(status);
        }
    }
    let snapshot = channel.snapshot();
    let at_dead = snapshot.endpoint(&dead).expect("listed").clone();
    let served: u64 = backends.iter().map(|b| b.counters.snapshot().requests).sum();
    println!(
        "{sent} requests, {} failed; {} first attempts to the refusing endpoint sent again; served {served}",
        failed.len(),
        at_dead.failures
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert_eq!(served, sent, "every request served once, by the two live backends");
    assert_eq!(at_dead.connections_opened, 0, "nothing ever connected there");
    assert!(
        at_dead.in_rotation && at_dead.failures == at_dead.requests,
        "picked all along, and every attempt there failed: {at_dead:?}"
    );
    assert!(
        at_dead.failures >= 50,
        "a third of the picks (retries pick too) went to the refusing endpoint: {}",
        at_dead.failures
    );
    Ok(())
}
