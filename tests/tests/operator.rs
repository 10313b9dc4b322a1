//! The operator against the real apiserver, with real tonic backends on 10.250.x.y inside the
//! run's network namespace. Each test runs its own in-process operator, scoped to its own
//! namespace of the shared control plane.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use kubegrpc_crds::{EndpointStatus, FULL_WEIGHT, GrpcBackendStatus, Health, condition};
use kubegrpc_echo::{BackendOptions, ServingStatus};
use kubegrpc_operator::Settings;
use kubegrpc_tests::{
    backends::{BACKEND_PORT, BackendProcess, addresses_of, next_backend_ip, start_backend, start_backends},
    objects::{SliceEndpoint, apply_slice, create_service},
    operator::InProcessOperator,
    scenario::{Scenario, assert_unchanged, brief, endpoint},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn ready_reason(status: &GrpcBackendStatus) -> String {
    status
        .condition(condition::READY)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

fn addresses(count: usize) -> Vec<SocketAddr> {
    (0..count)
        .map(|_| SocketAddr::from((next_backend_ip(), BACKEND_PORT)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_serving_backends_are_published_with_equal_weights() -> Result<()> {
    let s = Scenario::new("three").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(3).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let endpoints: Vec<SliceEndpoint> = backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-abc", "grpc", &endpoints).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    let backend = s
        .wait_status("echo", "3 ready endpoints", DEADLINE, |st| st.ready_endpoints == 3)
        .await?;
    let status = backend.status.unwrap();
    assert_eq!(status.total_endpoints, 3);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.endpoints.len(), 3);
    for published in &status.endpoints {
        assert_eq!((published.health, published.weight), (Health::Serving, FULL_WEIGHT));
        assert!(published.serving && !published.terminating);
        assert_eq!(published.zone.as_deref(), Some("zone-a"));
    }
    let mut sorted = status.endpoints.clone();
    sorted.sort_by_key(|e| e.address.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(sorted, status.endpoints, "endpoints are sorted by address");
    let ready = status.condition(condition::READY).context("no Ready condition")?;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Available"));
    assert_eq!(ready.message, "3 of 3 endpoints ready");

    let table = s
        .control_plane
        .kubectl_output(&["get", "gb", "-n", &s.namespace])
        .await?;
    let row: Vec<&str> = table.lines().nth(1).context("no row")?.split_whitespace().collect();
    assert_eq!(
        row[..5],
        ["echo", "echo", "grpc", "3", "3"],
        "kubectl get gb printed:\n{table}"
    );

    // The transition was announced as an Event (events.k8s.io/v1, kube-runtime's recorder).
    let events = Api::<Event>::namespaced(s.client.clone(), &s.namespace);
    kubegrpc_tests::wait::until("an Available event", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Available"))
            .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_not_serving_flip_is_published_through_watch() -> Result<()> {
    let s = Scenario::new("flip").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(2).await?;
    s.echo_service(&addresses_of(&backends)).await?;
    // Check would poll once an hour: within the deadline only the Watch stream can deliver.
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h", "timeout": "1s"}}),
    )
    .await?;
    s.wait_status("echo", "2 ready", DEADLINE, |st| st.ready_endpoints == 2)
        .await?;

    let flipped = backends[0].address;
    backends[0].health.set("", ServingStatus::NotServing);
    let backend = s
        .wait_status("echo", "the flipped endpoint NotServing", DEADLINE, |st| {
            endpoint(st, &flipped).is_some_and(|e| e.health == Health::NotServing)
        })
        .await?;
    let status = backend.status.unwrap();
    let published = endpoint(&status, &flipped).unwrap();
    assert_eq!(published.weight, 0);
    assert_eq!(published.reason.as_deref(), Some("NotServing"));
    assert_eq!(status.ready_endpoints, 1);
    assert_eq!(endpoint(&status, &backends[1].address).unwrap().weight, FULL_WEIGHT);

    backends[0].health.set("", ServingStatus::Serving);
    s.wait_status("echo", "the flipped endpoint Serving again", DEADLINE, |st| {
        endpoint(st, &flipped).is_some_and(|e| e.health == Health::Serving && e.weight == FULL_WEIGHT)
    })
    .await?;
    Ok(())
}

/// Prints the median time from a NOT_SERVING (or SERVING) flip at the backend to the status
/// showing it, over 20 flips, as seen through a watch of the object. A measurement for the
/// record, not a timing assertion: the assertion is that every flip is published.
#[tokio::test(flavor = "multi_thread")]
async fn measure_flip_to_status_latency() -> Result<()> {
    let s = Scenario::new("latency").await?;
    // No coalescing: every flip is written at once, so the figure is probe -> status -> watch.
    let _operator = InProcessOperator::start_with(s.client.clone(), uncoalesced(&s.namespace));
    let backend = start_backend(BackendOptions::default()).await?;
    s.echo_service(&[backend.address]).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h", "timeout": "1s"}}),
    )
    .await?;
    s.wait_status("echo", "ready", DEADLINE, |st| st.ready_endpoints == 1)
        .await?;

    let mut latencies = Vec::new();
    for flip in 0..20 {
        let serving = flip % 2 == 1;
        let started = std::time::Instant::now();
        backend.health.set(
            "",
            if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        );
        let want = if serving { Health::Serving } else { Health::NotServing };
        s.watch_status("echo", DEADLINE, |st| {
            endpoint(st, &backend.address).is_some_and(|e| e.health == want)
        })
        .await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "flip -> status over 20 flips: median {:?}, min {:?}, max {:?}",
        latencies[10], latencies[0], latencies[19]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_backend_process_is_detected_by_the_liveness_check_and_a_killed_one_at_once() -> Result<()> {
    let s = Scenario::new("sigstop").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
    let process = BackendProcess::start(address, &[]).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "echo",
        "echo-1",
        "grpc",
        &[SliceEndpoint::ready(address)],
    )
    .await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc",
               "healthCheck": {"interval": "1s", "timeout": "500ms", "unhealthyThreshold": 2}}),
    )
    .await?;
    let is = |health: Health| move |st: &GrpcBackendStatus| endpoint(st, &address).is_some_and(|e| e.health == health);
    s.wait_status("echo", "Serving", DEADLINE, is(Health::Serving)).await?;

    // A stopped process keeps its socket open: only the liveness Check on the quiet Watch
    // stream's connection going unanswered shows it.
    process.process.signal(libc::SIGSTOP)?;
    let frozen = s
        .wait_status("echo", "NotServing while stopped", DEADLINE, is(Health::NotServing))
        .await?;
    let reason = endpoint(frozen.status.as_ref().unwrap(), &address)
        .unwrap()
        .reason
        .clone();
    assert!(
        matches!(reason.as_deref(), Some("Timeout" | "ConnectTimeout")),
        "reason {reason:?}"
    );

    process.process.signal(libc::SIGCONT)?;
    s.wait_status("echo", "Serving after SIGCONT", DEADLINE, is(Health::Serving))
        .await?;

    process.process.signal(libc::SIGKILL)?;
    s.wait_status("echo", "NotServing after SIGKILL", DEADLINE, is(Health::NotServing))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_follow_the_slices_added_and_removed() -> Result<()> {
    let s = Scenario::new("slices").await?;
    // No coalescing, so that the measurement below is the path slice -> watch -> probe ->
    // status, not the coalescing wait.
    let _operator = InProcessOperator::start_with(s.client.clone(), uncoalesced(&s.namespace));
    let backends = start_backends(3).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let two: Vec<SliceEndpoint> = backends[..2].iter().map(|b| SliceEndpoint::ready(b.address)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &two).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "2 ready", DEADLINE, |st| st.ready_endpoints == 2)
        .await?;

    let three: Vec<SliceEndpoint> = backends.iter().map(|b| SliceEndpoint::ready(b.address)).collect();
    let started = std::time::Instant::now();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &three).await?;
    let added = backends[2].address;
    s.watch_status("echo", DEADLINE, |st| {
        endpoint(st, &added).is_some_and(|e| e.health == Health::Serving)
    })
    .await?;
    println!("new EndpointSlice entry -> Serving in status: {:?}", started.elapsed());

    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &two).await?;
    let backend = s
        .wait_status("echo", "the third endpoint gone", DEADLINE, |st| {
            st.total_endpoints == 2
        })
        .await?;
    assert!(endpoint(backend.status.as_ref().unwrap(), &added).is_none());

    // A second slice of the same Service adds its endpoints.
    let extra = start_backend(BackendOptions::default()).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "echo",
        "echo-2",
        "grpc",
        &[SliceEndpoint::ready(extra.address)],
    )
    .await?;
    s.wait_status("echo", "3 ready across 2 slices", DEADLINE, |st| {
        st.ready_endpoints == 3
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_in_two_slices_are_listed_once() -> Result<()> {
    let s = Scenario::new("dedupe").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let all = addresses(150);
    // 80 + 80 with 10 addresses in both slices: 150 distinct endpoints.
    let first: Vec<SliceEndpoint> = all[..80].iter().map(|a| SliceEndpoint::ready(*a)).collect();
    let second: Vec<SliceEndpoint> = all[70..].iter().map(|a| SliceEndpoint::ready(*a)).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-a", "grpc", &first).await?;
    apply_slice(&s.client, &s.namespace, "echo", "echo-b", "grpc", &second).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h"}}),
    )
    .await?;
    let backend = s
        .wait_status("echo", "150 endpoints", DEADLINE, |st| st.total_endpoints == 150)
        .await?;
    let status = backend.status.unwrap();
    assert_eq!(status.endpoints.len(), 150);
    let mut listed: Vec<(String, i32)> = status.endpoints.iter().map(|e| (e.address.clone(), e.port)).collect();
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), 150, "no endpoint is listed twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_endpoints_give_a_complete_status() -> Result<()> {
    let s = Scenario::new("thousand").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    s.echo_service_in_slices(&addresses(1000), 100).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h"}}),
    )
    .await?;
    let backend = s
        .wait_status("echo", "1000 endpoints", Duration::from_secs(60), |st| {
            st.total_endpoints == 1000 && st.endpoints.len() == 1000
        })
        .await?;
    let status = backend.status.unwrap();
    assert!(status.condition(condition::TRUNCATED).is_none());
    // Nothing listens on these addresses: every probe is refused.
    s.wait_status("echo", "all 1000 NotServing", Duration::from_secs(60), |st| {
        st.endpoints.iter().all(|e| e.health == Health::NotServing)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminating_endpoint_that_still_serves_gets_no_weight() -> Result<()> {
    let s = Scenario::new("terminating").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let staying = start_backend(BackendOptions::default()).await?;
    let leaving = start_backend(BackendOptions::default()).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "echo",
        "echo-1",
        "grpc",
        &[
            SliceEndpoint::ready(staying.address),
            SliceEndpoint::terminating(leaving.address),
        ],
    )
    .await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let backend = s
        .wait_status("echo", "terminating endpoint probed", DEADLINE, |st| {
            endpoint(st, &leaving.address).is_some_and(|e| e.health == Health::Serving)
                && endpoint(st, &staying.address).is_some_and(|e| e.health == Health::Serving)
        })
        .await?;
    let status = backend.status.unwrap();
    let terminating = endpoint(&status, &leaving.address).unwrap();
    assert!(terminating.terminating && terminating.serving);
    assert_eq!(terminating.weight, 0);
    assert_eq!((status.ready_endpoints, status.total_endpoints), (1, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_service_is_reported_and_recovers_when_created() -> Result<()> {
    let s = Scenario::new("no-service").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    s.grpc_backend("echo", json!({"service": "later", "port": "grpc"}))
        .await?;
    let backend = s
        .wait_status("echo", "ServiceNotFound", DEADLINE, |st| {
            ready_reason(st) == "ServiceNotFound"
        })
        .await?;
    let ready = backend
        .status
        .as_ref()
        .unwrap()
        .condition(condition::READY)
        .unwrap()
        .clone();
    assert_eq!(ready.status, "False");
    assert_eq!(ready.message, format!("Service {}/later not found", s.namespace));

    let server = start_backend(BackendOptions::default()).await?;
    create_service(&s.client, &s.namespace, "later", &[("grpc", 80)]).await?;
    apply_slice(
        &s.client,
        &s.namespace,
        "later",
        "later-1",
        "grpc",
        &[SliceEndpoint::ready(server.address)],
    )
    .await?;
    s.wait_status("echo", "Available once the Service exists", DEADLINE, |st| {
        ready_reason(st) == "Available" && st.ready_endpoints == 1
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_name_the_service_lacks_is_reported() -> Result<()> {
    let s = Scenario::new("no-port").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    create_service(&s.client, &s.namespace, "echo", &[("http", 8080), ("metrics", 9090)]).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let backend = s
        .wait_status("echo", "PortNotFound", DEADLINE, |st| {
            ready_reason(st) == "PortNotFound"
        })
        .await?;
    let ready = backend.status.unwrap().condition(condition::READY).unwrap().clone();
    assert_eq!(
        ready.message,
        format!(
            "Service {}/echo: the Service has no TCP port named \"grpc\" (its TCP ports: http/8080, metrics/9090)",
            s.namespace
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_grpcbackends_on_one_service_check_their_own_health_service() -> Result<()> {
    let s = Scenario::new("two-gb").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backend = start_backend(BackendOptions {
        health_services: vec!["alpha".into(), "beta".into()],
        ..BackendOptions::default()
    })
    .await?;
    backend.health.set("beta", ServingStatus::NotServing);
    s.echo_service(&[backend.address]).await?;
    for (name, service) in [("alpha", "alpha"), ("beta", "beta")] {
        s.grpc_backend(
            name,
            json!({"service": "echo", "port": "grpc", "healthCheck": {"service": service, "interval": "1h"}}),
        )
        .await?;
    }
    let health_of =
        |health: Health| move |st: &GrpcBackendStatus| st.endpoints.first().is_some_and(|e| e.health == health);
    s.wait_status("alpha", "alpha Serving", DEADLINE, health_of(Health::Serving))
        .await?;
    s.wait_status("beta", "beta NotServing", DEADLINE, health_of(Health::NotServing))
        .await?;

    backend.health.set("alpha", ServingStatus::NotServing);
    backend.health.set("beta", ServingStatus::Serving);
    s.wait_status("alpha", "alpha NotServing", DEADLINE, health_of(Health::NotServing))
        .await?;
    s.wait_status("beta", "beta Serving", DEADLINE, health_of(Health::Serving))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_without_watch_is_probed_with_check() -> Result<()> {
    let s = Scenario::new("check-only").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backend = start_backend(BackendOptions {
        watch_implemented: false,
        ..BackendOptions::default()
    })
    .await?;
    s.echo_service(&[backend.address]).await?;
    // Watch mode asked for; the backend answers UNIMPLEMENTED and gets polled instead.
    s.grpc_backend("echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"mode": "Watch", "interval": "200ms", "timeout": "100ms"}}),
    )
    .await?;
    let serving = |health: Health| {
        move |st: &GrpcBackendStatus| endpoint(st, &backend.address).is_some_and(|e| e.health == health)
    };
    s.wait_status("echo", "Serving through Check", DEADLINE, serving(Health::Serving))
        .await?;
    backend.health.set("", ServingStatus::NotServing);
    s.wait_status(
        "echo",
        "NotServing through Check",
        DEADLINE,
        serving(Health::NotServing),
    )
    .await?;
    let seen = backend.counters.snapshot();
    assert!(
        seen.health_checks >= 2,
        "the backend answered {} Check calls",
        seen.health_checks
    );
    assert_eq!(seen.health_watches_open, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_grpcbackend_stops_its_probers() -> Result<()> {
    let s = Scenario::new("delete").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(2).await?;
    s.echo_service(&addresses_of(&backends)).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    s.wait_status("echo", "2 ready", DEADLINE, |st| st.ready_endpoints == 2)
        .await?;
    for backend in &backends {
        let seen = backend.counters.snapshot();
        assert_eq!(
            seen.health_watches_open, 1,
            "one Watch stream from the operator's prober"
        );
        assert_eq!(seen.connections_open, 1);
    }

    s.backends().delete("echo", &DeleteParams::default()).await?;
    kubegrpc_tests::wait::until(
        "the backends to see their probe streams and connections close",
        DEADLINE,
        || async {
            Ok(backends
                .iter()
                .all(|b| {
                    let seen = b.counters.snapshot();
                    seen.health_watches_open == 0 && seen.connections_open == 0
                })
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_nothing_changing_the_operator_writes_nothing() -> Result<()> {
    let s = Scenario::new("quiet").await?;
    let operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backends = start_backends(2).await?;
    s.echo_service(&addresses_of(&backends)).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let steady = s
        .wait_status("echo", "2 ready", DEADLINE, |st| st.ready_endpoints == 2)
        .await?;
    let resource_version = steady.metadata.resource_version.clone().unwrap();
    let writes = || {
        operator
            .metrics
            .status_writes
            .get_or_create(&kubegrpc_operator::metrics::BackendLabels {
                namespace: s.namespace.clone(),
                name: "echo".into(),
            })
            .get()
    };
    let answers = || {
        operator
            .metrics
            .probes
            .get_or_create(&kubegrpc_operator::metrics::ProbeLabels {
                result: "Serving".into(),
            })
            .get()
    };
    let (writes_before, answers_before) = (writes(), answers());
    assert!(writes_before >= 1, "the operator counted its writes: {writes_before}");

    // Watch the object from that version for 30 seconds: no event may arrive.
    assert_unchanged(&s.backends(), "echo", &resource_version, Duration::from_secs(30)).await?;
    let after = s.backends().get("echo").await?;
    assert_eq!(
        after.metadata.resource_version.as_deref(),
        Some(resource_version.as_str())
    );
    // The operator was at work all along (the quiet Watch streams get a liveness Check every
    // 5 s interval: about 12 Serving answers for 2 endpoints in 30 s), and wrote nothing.
    let answered = answers() - answers_before;
    assert!(
        answered >= 2,
        "the operator kept probing: {answered} Serving answers in 30 s"
    );
    assert_eq!(writes(), writes_before, "no status write counted while nothing changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_edited_by_hand_is_restored() -> Result<()> {
    let s = Scenario::new("hand-edit").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backend = start_backend(BackendOptions::default()).await?;
    s.echo_service(&[backend.address]).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let published = s
        .wait_status("echo", "ready", DEADLINE, |st| st.ready_endpoints == 1)
        .await?;
    let mut edited = published.status.clone().unwrap();
    edited.endpoints[0].weight = 7;
    edited.endpoints[0].health = Health::NotServing;
    edited.ready_endpoints = 0;
    s.backends()
        .patch_status(
            "echo",
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({ "status": edited })),
        )
        .await?;
    s.wait_status("echo", "the published status restored", DEADLINE, |st| {
        st.ready_endpoints == 1 && st.endpoints[0].weight == FULL_WEIGHT && st.endpoints[0].health == Health::Serving
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_refusing_connections_marks_the_backend_degraded() -> Result<()> {
    let s = Scenario::new("degraded").await?;
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let endpoints: Vec<SliceEndpoint> = addresses(3).into_iter().map(SliceEndpoint::ready).collect();
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"unhealthyThreshold": 1}}),
    )
    .await?;
    let backend = s
        .wait_status("echo", "Degraded", DEADLINE, |st| {
            st.condition(condition::DEGRADED).is_some_and(|c| c.status == "True")
        })
        .await?;
    let status = backend.status.unwrap();
    let degraded = status.condition(condition::DEGRADED).unwrap();
    assert_eq!(degraded.reason, "AllProbesFailingToConnect");
    // Kubernetes calls all three ready and the operator reaches none: it fails open rather
    // than tell every client there is nothing to call.
    assert_eq!(ready_reason(&status), "FailingOpen");
    let failing_open = s
        .wait_status("echo", "FailingOpen", DEADLINE, |st| {
            st.condition(condition::FAILING_OPEN)
                .is_some_and(|c| c.status == "True")
        })
        .await?
        .status
        .unwrap();
    assert!(
        matches!(
            failing_open.condition(condition::FAILING_OPEN).unwrap().reason.as_str(),
            "ProbesFailingToConnect" | "NoEndpointPassesChecks"
        ),
        "{:?}",
        failing_open.condition(condition::FAILING_OPEN)
    );
    assert_eq!(failing_open.ready_endpoints, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_size_budget_the_status_stays_valid_and_says_so() -> Result<()> {
    let s = Scenario::new("budget").await?;
    let _operator = InProcessOperator::start_with(
        s.client.clone(),
        Settings {
            namespace: Some(s.namespace.clone()),
            endpoints_budget: 4096,
            ..Settings::default()
        },
    );
    let serving = start_backend(BackendOptions::default()).await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let mut endpoints: Vec<SliceEndpoint> = addresses(60).into_iter().map(SliceEndpoint::ready).collect();
    endpoints.push(SliceEndpoint::ready(serving.address));
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
    // panicThreshold 0: one of 61 passing would fail open, listing all 61 usable; this test is
    // about the usable ones being listed first.
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h", "panicThreshold": 0}}),
    )
    .await?;
    let backend = s
        .wait_status("echo", "Truncated and the serving endpoint listed", DEADLINE, |st| {
            st.condition(condition::TRUNCATED).is_some() && st.ready_endpoints == 1
        })
        .await?;
    let status = backend.status.unwrap();
    assert_eq!(status.total_endpoints, 61);
    assert!(status.endpoints.len() < 61, "{}", brief(Some(&status)));
    assert!(serde_json::to_vec(&serde_json::to_value(&status)?["endpoints"])?.len() <= 4096 + 2);
    assert!(
        endpoint(&status, &serving.address).is_some(),
        "usable endpoints are listed first"
    );
    let truncated = status.condition(condition::TRUNCATED).unwrap();
    assert_eq!(
        (truncated.status.as_str(), truncated.reason.as_str()),
        ("True", "StatusSizeLimit")
    );
    Ok(())
}

/// Finds how many endpoint entries one GrpcBackend status can hold before the apiserver (etcd's
/// 1.5 MiB request limit) refuses the write, and checks that the operator's default budget
/// stays below it. Prints the ceiling for the record.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_size_ceiling_is_above_the_default_budget() -> Result<()> {
    let s = Scenario::new("ceiling").await?;
    s.grpc_backend("big", json!({"service": "echo", "port": "grpc"}))
        .await?;
    // Entries as the operator writes them for a Deployment's Pods (a GKE zone, a Pod name of
    // the usual length): the common case, whose size the default budget is set for.
    let entry = |i: usize| EndpointStatus {
        address: format!("10.{}.{}.{}", 244 + i / 65536, i / 256 % 256, i % 256),
        port: 8080,
        weight: FULL_WEIGHT,
        health: Health::Serving,
        serving: true,
        terminating: false,
        zone: Some("us-central1-a".into()),
        for_zones: Vec::new(),
        pod: Some(format!("checkout-api-7d9f8c6b5d-{i:05x}")),
        target_ref: None,
        reason: None,
        last_transition_time: None,
        fail_open: false,
    };
    let write = |count: usize| {
        let api = s.backends();
        async move {
            let status = serde_json::to_value(GrpcBackendStatus {
                endpoints: (0..count).map(entry).collect(),
                ..GrpcBackendStatus::default()
            })?;
            let bytes = serde_json::to_vec(&status["endpoints"])?.len();
            let result = api
                .patch_status(
                    "big",
                    &PatchParams::apply("ceiling-probe").force(),
                    &Patch::Apply(json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
                                         "status": status})),
                )
                .await;
            Ok::<_, anyhow::Error>((result.is_ok(), bytes))
        }
    };
    let entry_bytes = GrpcBackendStatus::encoded_entry_sizes(&[entry(1234), entry(1235)])[0];
    let at_budget = kubegrpc_operator::status::DEFAULT_ENDPOINTS_BUDGET / entry_bytes;
    assert!(
        at_budget >= 10_000,
        "{at_budget} usual entries of {entry_bytes} bytes fit in the budget"
    );
    let (accepted, bytes) = write(at_budget).await?;
    assert!(
        accepted,
        "a status at the default budget ({at_budget} entries, {bytes} bytes) was refused"
    );

    // Bisect between the budget and a count surely too large.
    let (mut low, mut high) = (at_budget, 30_000);
    assert!(!write(high).await?.0, "30,000 entries were accepted");
    while high - low > 16 {
        let middle = (low + high) / 2;
        if write(middle).await?.0 {
            low = middle;
        } else {
            high = middle;
        }
    }
    let (_, ceiling_bytes) = write(low).await?;
    println!(
        "status size ceiling: about {low} endpoint entries of {entry_bytes} bytes ({ceiling_bytes} bytes of endpoints); \
         default budget {} bytes = {at_budget} such entries",
        kubegrpc_operator::status::DEFAULT_ENDPOINTS_BUDGET
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn under_churn_writes_are_coalesced_and_the_latest_state_is_written() -> Result<()> {
    const WRITE_INTERVAL: Duration = Duration::from_secs(4);
    let s = Scenario::new("churn").await?;
    let first = InProcessOperator::start(s.client.clone(), &s.namespace);
    let backend = start_backend(BackendOptions::default()).await?;
    s.echo_service(&[backend.address]).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc", "healthCheck": {"interval": "1h"}}),
    )
    .await?;
    let steady = s
        .wait_status("echo", "ready", DEADLINE, |st| st.ready_endpoints == 1)
        .await?;
    // The mechanism under test: a change after a quiet write interval goes out at once, later
    // ones within the interval are coalesced into one write. A fresh operator has written
    // nothing yet, so its first change is written at once; with an interval of 4 s, the churn
    // below (flips a few milliseconds apart, each under the window) is flapping: held
    // NotServing (Flapping) in one coalesced write, then Serving once it has been stable for
    // the window, in one more.
    first.stop().await;
    let operator = InProcessOperator::start_with(
        s.client.clone(),
        Settings {
            namespace: Some(s.namespace.clone()),
            identity: format!("test-operator-{}", s.namespace),
            status_write_interval: WRITE_INTERVAL,
            ..Settings::default()
        },
    );
    kubegrpc_tests::wait::until("the new operator's prober answered", DEADLINE, || {
        let answered = operator
            .metrics
            .probes
            .get_or_create(&kubegrpc_operator::metrics::ProbeLabels {
                result: "Serving".into(),
            })
            .get();
        async move { Ok((answered >= 1).then_some(())) }
    })
    .await?;

    let params = kube::api::WatchParams::default().fields("metadata.name=echo");
    let version = steady.metadata.resource_version.clone().unwrap_or_default();
    let mut events = s.backends().watch(&params, &version).await?.boxed();
    // 20 flips ending where they started (Serving), each one seen by the prober before the
    // next: the operator sees every flip whatever the machine's pace.
    let answered = |result: &str| {
        operator
            .metrics
            .probes
            .get_or_create(&kubegrpc_operator::metrics::ProbeLabels { result: result.into() })
            .get()
    };
    let churn_started = std::time::Instant::now();
    for flip in 0..20 {
        let (status, answer) = if flip % 2 == 0 {
            (ServingStatus::NotServing, "NotServing")
        } else {
            (ServingStatus::Serving, "Serving")
        };
        let seen_before = answered(answer);
        backend.health.set("", status);
        kubegrpc_tests::wait::until("the prober saw the flip", DEADLINE, || {
            let seen = answered(answer) > seen_before;
            async move { Ok(seen.then_some(())) }
        })
        .await?;
    }
    let churn = churn_started.elapsed();
    // Every write until the endpoint is published Serving again (the hold lasts one window
    // after the last flip, at most 8 if holds escalated).
    let mut written: Vec<(Health, Option<String>)> = Vec::new();
    tokio::time::timeout(DEADLINE + 8 * WRITE_INTERVAL, async {
        while let Some(event) = events.next().await {
            if let kube::api::WatchEvent::Modified(object) = event? {
                let status = object.status.unwrap_or_default();
                let entry = (status.endpoints[0].health, status.endpoints[0].reason.clone());
                let released = entry.0 == Health::Serving;
                written.push(entry);
                if released {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("the watch ended")
    })
    .await
    .map_err(|_| anyhow::anyhow!("not published Serving again; written: {written:?}"))??;
    println!(
        "20 flips seen in {churn:?} -> {} status writes: {written:?}",
        written.len()
    );
    // The first write shows NotServing, or already the hold (Flapping), whichever the reconcile
    // read; then at most one coalesced write of the hold; then Serving once stable.
    let (last, held) = written.split_last().expect("writes");
    assert_eq!(*last, (Health::Serving, None), "released once stable: {written:?}");
    assert!(
        (1..=2).contains(&held.len()),
        "the first change at once, the rest coalesced: {written:?}"
    );
    assert!(
        held.iter().all(|(health, _)| *health == Health::NotServing),
        "{written:?}"
    );
    assert!(
        held.iter().any(|(_, reason)| reason.as_deref() == Some("Flapping")),
        "{written:?}"
    );
    drop(operator);
    Ok(())
}

/// Operator settings for `namespace` with every status change written at once.
fn uncoalesced(namespace: &str) -> kubegrpc_operator::Settings {
    kubegrpc_operator::Settings {
        namespace: Some(namespace.into()),
        identity: format!("test-operator-{namespace}"),
        status_write_interval: Duration::ZERO,
        ..kubegrpc_operator::Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_the_operator_cannot_read_is_rewritten_once_then_left_alone() -> Result<()> {
    // A control plane of its own: the test relaxes the CRD's status schema, as an older
    // version of the CRD might have had it.
    let control_plane = kubegrpc_tests::ControlPlane::start(kubegrpc_tests::ControlPlaneOptions::default()).await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "unreadable").await?;
    let operator = InProcessOperator::start(client.clone(), &namespace);
    let backend = start_backend(BackendOptions::default()).await?;
    create_service(&client, &namespace, "echo", &[("grpc", 80)]).await?;
    apply_slice(
        &client,
        &namespace,
        "echo",
        "echo-1",
        "grpc",
        &[SliceEndpoint::ready(backend.address)],
    )
    .await?;
    let backends: kube::Api<kubegrpc_crds::GrpcBackend> = kube::Api::namespaced(client.clone(), &namespace);
    backends
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
                "metadata": {"name": "echo"}, "spec": {"service": "echo", "port": "grpc"}}))?,
        )
        .await?;
    let ready = |backends: kube::Api<kubegrpc_crds::GrpcBackend>| async move {
        Ok(backends.get("echo").await.ok().filter(|b| {
            b.status
                .as_ref()
                .is_some_and(|st| st.ready_endpoints == 1 && st.endpoints.len() == 1)
        }))
    };
    kubegrpc_tests::wait::until("ready", DEADLINE, || ready(backends.clone())).await?;

    let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(client.clone());
    crds.patch(
        "grpcbackends.kubegrpc.io",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::<()>::Json(serde_json::from_value(json!([{"op": "replace",
            "path": "/spec/versions/0/schema/openAPIV3Schema/properties/status",
            "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}]))?),
    )
    .await?;
    let before = operator.status_writes(&namespace, "echo");
    let raw: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        &namespace,
        &kube::api::ApiResource::erase::<kubegrpc_crds::GrpcBackend>(&()),
    );
    let unreadable = json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend",
        "status": {"readyEndpoints": "many", "endpoints": [{"address": 7, "weight": "heavy"}]}});
    // The relaxed schema takes a moment to be served: retry until the write is accepted.
    kubegrpc_tests::wait::until("the unreadable status accepted", DEADLINE, || {
        let (raw, unreadable) = (raw.clone(), unreadable.clone());
        async move {
            raw.patch_status(
                "echo",
                &kube::api::PatchParams::apply("kubegrpc-tests").force(),
                &kube::api::Patch::Apply(unreadable),
            )
            .await?;
            Ok(Some(()))
        }
    })
    .await?;
    kubegrpc_tests::wait::until("the status rewritten", DEADLINE, || ready(backends.clone())).await?;
    let rewritten = backends.get("echo").await?;

    // Then nothing: no write on a timer.
    let version = rewritten.metadata.resource_version.clone().unwrap_or_default();
    assert_unchanged(&backends, "echo", &version, Duration::from_secs(30)).await?;
    assert_eq!(
        operator.status_writes(&namespace, "echo"),
        before + 1,
        "exactly one write for the unreadable status over 30s"
    );
    Ok(())
}

/// A port no other test listens on, below the ephemeral range (32768-60999) that thousands of
/// probe connections take their local ports from: one wildcard listener there answers for every
/// 10.250.x.y address of the namespace.
const WILDCARD_PORT: u16 = 30900;

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_operator_at_a_thousand_serving_endpoints_writes_nothing() -> Result<()> {
    let s = Scenario::new("restarts").await?;
    kubegrpc_tests::netns::assert_private_network();
    let server = kubegrpc_echo::Backend::start(
        SocketAddr::from(([0, 0, 0, 0], WILDCARD_PORT)),
        BackendOptions::default(),
    )
    .await?;
    let all: Vec<SocketAddr> = (0..1000)
        .map(|_| SocketAddr::from((next_backend_ip(), WILDCARD_PORT)))
        .collect();
    s.echo_service_in_slices(&all, 100).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let mut operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    let steady = s
        .wait_status("echo", "1000 Serving", Duration::from_secs(120), |st| {
            st.ready_endpoints == 1000
        })
        .await?;
    let version = steady.metadata.resource_version.clone().unwrap_or_default();

    for restart in 1..=3 {
        operator.stop().await;
        let started = std::time::Instant::now();
        operator = InProcessOperator::start(s.client.clone(), &s.namespace);
        let serving_probes = |operator: &InProcessOperator| {
            operator
                .metrics
                .probes
                .get_or_create(&kubegrpc_operator::metrics::ProbeLabels {
                    result: "Serving".into(),
                })
                .get()
        };
        kubegrpc_tests::wait::until(
            "every endpoint answered the new operator",
            Duration::from_secs(120),
            || {
                let answered = serving_probes(&operator);
                async move { Ok((answered >= 1000).then_some(())) }
            },
        )
        .await?;
        let answered_after = started.elapsed();
        // Past the write interval, with every first answer in: the object must be untouched.
        assert_unchanged(&s.backends(), "echo", &version, Duration::from_secs(3))
            .await
            .with_context(|| format!("restart {restart}"))?;
        assert_eq!(operator.status_writes(&s.namespace, "echo"), 0, "restart {restart}");
        let now = s.backends().get("echo").await?;
        assert_eq!(now.metadata.resource_version.as_deref(), Some(version.as_str()));
        println!(
            "restart {restart} at 1000 endpoints: all answered after {answered_after:?}, 0 status writes, {} connections accepted so far",
            server.counters.snapshot().connections_accepted
        );
    }
    operator.stop().await;
    Ok(())
}

/// A Service the size of a big production one, with what a real EndpointSlice carries (zone,
/// node, Pod): every endpoint in one status, and few enough bytes per entry that 10,000 fit in
/// the default budget.
#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_endpoints_with_real_metadata_are_all_listed_in_one_status() -> Result<()> {
    const PORT: u16 = 30901;
    const COUNT: usize = 2000;
    let s = Scenario::new("two-thousand").await?;
    kubegrpc_tests::netns::assert_private_network();
    let _server =
        kubegrpc_echo::Backend::start(SocketAddr::from(([0, 0, 0, 0], PORT)), BackendOptions::default()).await?;
    let endpoints: Vec<SliceEndpoint> = (0..COUNT)
        .map(|i| {
            SliceEndpoint::deployment_pod(SocketAddr::from((next_backend_ip(), PORT)), "checkout-api", 0x10000 + i)
        })
        .collect();
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    for (index, chunk) in endpoints.chunks(COUNT / 20).enumerate() {
        apply_slice(&s.client, &s.namespace, "echo", &format!("echo-{index}"), "grpc", chunk).await?;
    }
    let _operator = InProcessOperator::start(s.client.clone(), &s.namespace);
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;
    let backend = s
        .wait_status("echo", "2000 Serving", Duration::from_secs(120), |st| {
            st.ready_endpoints == COUNT as i32
        })
        .await?;
    let status = backend.status.unwrap();
    assert_eq!(status.total_endpoints, COUNT as i32);
    assert_eq!(status.endpoints.len(), COUNT, "every endpoint listed");
    let truncated = status.condition(condition::TRUNCATED);
    assert!(truncated.is_none_or(|c| c.status == "False"), "{truncated:?}");
    for expected in &endpoints {
        let published = endpoint(&status, &expected.address).expect("listed");
        assert_eq!(
            (published.zone.as_ref(), published.pod.as_ref(), published.weight),
            (expected.zone.as_ref(), expected.pod.as_ref(), FULL_WEIGHT)
        );
    }

    // The bytes the apiserver serves for the list, as every watching client receives them.
    let raw: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        s.client.clone(),
        &s.namespace,
        &kube::api::ApiResource::erase::<kubegrpc_crds::GrpcBackend>(&()),
    );
    let served = raw.get("echo").await?;
    let object_bytes = serde_json::to_vec(&served)?.len();
    let list_bytes = serde_json::to_vec(&served.data["status"]["endpoints"])?.len();
    let per_entry = list_bytes / COUNT;
    let ten_thousand_need = kubegrpc_operator::status::DEFAULT_ENDPOINTS_BUDGET / 10_000;
    println!(
        "{COUNT} endpoints: {list_bytes} bytes of endpoints ({per_entry} per entry; 10,000 need at most \
         {ten_thousand_need}), whole object {object_bytes} bytes"
    );
    assert!(per_entry <= ten_thousand_need, "{per_entry} bytes per entry");
    Ok(())
}
