use super::*;
use kubegrpc_crds::FULL_WEIGHT;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn probed(address: &str, health: Health) -> ProbedEndpoint {
    ProbedEndpoint {
        endpoint: DiscoveredEndpoint {
            address: address.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            zone: Some("z1".into()),
            for_zones: Vec::new(),
            pod: None,
            target_ref: None,
        },
        verdict: HealthVerdict {
            health,
            reason: Some(health.to_string()),
        },
        connect_failing: false,
        weight: FULL_WEIGHT,
    }
}

const PORT: PortRef = PortRef::Number(80);

fn ctx(now: Timestamp) -> StatusContext<'static> {
    StatusContext {
        namespace: "ns",
        service: "echo",
        port: &PORT,
        generation: Some(1),
        slow_start_window: Duration::ZERO,
        now,
        endpoints_budget: DEFAULT_ENDPOINTS_BUDGET,
        panic_threshold: 50,
    }
}

fn three_serving() -> Observation {
    Observation::Endpoints(vec![
        probed("10.0.0.2:50051", Health::Serving),
        probed("10.0.0.10:50051", Health::Serving),
        probed("10.0.0.1:50051", Health::Serving),
    ])
}

#[test]
fn three_serving_endpoints_are_ready_with_equal_weights_in_address_order() {
    let desired = desired_status(None, &three_serving(), &ctx(at(0)));
    let status = &desired.status;
    assert_eq!((status.ready_endpoints, status.total_endpoints), (3, 3));
    let addresses: Vec<&str> = status.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, ["10.0.0.1", "10.0.0.2", "10.0.0.10"]);
    assert!(
        status
            .endpoints
            .iter()
            .all(|e| e.weight == FULL_WEIGHT && e.is_usable())
    );
    let ready = status.condition(condition::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Available"));
    assert_eq!(ready.message, "3 of 3 endpoints ready");
    assert_eq!(status.condition(condition::DEGRADED).unwrap().status, "False");
    assert_eq!(status.observed_generation, Some(1));
}

#[test]
fn nothing_changes_when_nothing_changed_however_much_later() {
    let first = desired_status(None, &three_serving(), &ctx(at(0))).status;
    let later = desired_status(Some(&first), &three_serving(), &ctx(at(3600))).status;
    assert_eq!(first, later);
}

#[test]
fn a_status_read_back_from_json_is_equal_to_the_one_written() {
    let first = desired_status(None, &three_serving(), &ctx(at(0))).status;
    let read_back: GrpcBackendStatus = serde_json::from_slice(&serde_json::to_vec(&first).unwrap()).unwrap();
    assert_eq!(read_back, first);
    let again = desired_status(Some(&read_back), &three_serving(), &ctx(at(10))).status;
    assert_eq!(again, read_back);
}

#[test]
fn a_not_serving_endpoint_gets_weight_zero_and_only_its_time_moves() {
    let first = desired_status(None, &three_serving(), &ctx(at(0))).status;
    let mut observation = three_serving();
    if let Observation::Endpoints(endpoints) = &mut observation {
        endpoints[0].verdict = HealthVerdict {
            health: Health::NotServing,
            reason: Some("NotServing".into()),
        };
    }
    let next = desired_status(Some(&first), &observation, &ctx(at(60))).status;
    assert_eq!((next.ready_endpoints, next.total_endpoints), (2, 3));
    let flipped = next.endpoints.iter().find(|e| e.address == "10.0.0.2").unwrap();
    assert_eq!((flipped.health, flipped.weight), (Health::NotServing, 0));
    assert_eq!(flipped.last_transition_time, Some(Time(at(60))));
    assert_eq!(flipped.reason.as_deref(), Some("NotServing"));
    let others: Vec<_> = next.endpoints.iter().filter(|e| e.address != "10.0.0.2").collect();
    assert!(
        others
            .iter()
            .all(|e| e.last_transition_time.is_none() && e.reason.is_none() && e.weight == FULL_WEIGHT),
        "settled endpoints list no time or reason"
    );
    let ready = next.condition(condition::READY).unwrap();
    assert_eq!(ready.message, "2 of 3 endpoints ready");
    assert_eq!(
        ready.last_transition_time,
        Time(at(0)),
        "Ready stayed True: its transition time stays"
    );
}

#[test]
fn terminating_but_serving_endpoints_take_no_requests() {
    let mut endpoint = probed("10.0.0.1:80", Health::Serving);
    endpoint.endpoint.terminating = true;
    endpoint.endpoint.ready = false;
    let status = desired_status(None, &Observation::Endpoints(vec![endpoint]), &ctx(at(0))).status;
    let published = &status.endpoints[0];
    assert!(published.terminating && published.serving && published.health == Health::Serving);
    assert_eq!(published.weight, 0);
    let ready = status.condition(condition::READY).unwrap();
    assert_eq!(ready.reason, "NoReadyEndpoints");
    assert_eq!(
        ready.message,
        "none of the 1 endpoints can take requests: 1 Terminating"
    );
}

#[test]
fn ready_reasons_name_the_problem() {
    let reason = |observation: Observation| {
        let status = desired_status(None, &observation, &ctx(at(0))).status;
        let ready = status.condition(condition::READY).unwrap().clone();
        assert_eq!(ready.status, "False");
        (ready.reason, ready.message)
    };
    assert_eq!(
        reason(Observation::ServiceNotFound),
        ("ServiceNotFound".into(), "Service ns/echo not found".into())
    );
    assert_eq!(
        reason(Observation::PortNotFound(PortNotFound {
            wanted: PortRef::Name("grpc".into()),
            available: vec!["http/8080".into()]
        })),
        (
            "PortNotFound".into(),
            "Service ns/echo: the Service has no TCP port named \"grpc\" (its TCP ports: http/8080)".into()
        )
    );
    assert_eq!(
        reason(Observation::InvalidSpec("spec.port: bad".into())),
        ("InvalidSpec".into(), "spec.port: bad".into())
    );
    assert_eq!(
        reason(Observation::Endpoints(vec![])),
        (
            "NoEndpoints".into(),
            "Service ns/echo has no endpoints on port 80".into()
        )
    );
    // Nothing Kubernetes calls ready passes or could be failed open to: not probed yet
    // (Unknown), not ready in Kubernetes, terminating.
    let mut not_ready = probed("10.0.0.2:80", Health::NotServing);
    not_ready.endpoint.serving = false;
    not_ready.endpoint.ready = false;
    let mut terminating = probed("10.0.0.3:80", Health::Serving);
    terminating.endpoint.terminating = true;
    terminating.endpoint.ready = false;
    let (why, message) = reason(Observation::Endpoints(vec![
        probed("10.0.0.1:80", Health::Unknown),
        not_ready,
        terminating,
    ]));
    assert_eq!(why, "NoReadyEndpoints");
    assert_eq!(
        message,
        "none of the 3 endpoints can take requests: 1 Unknown, 1 not serving in Kubernetes, 1 Terminating"
    );
}

fn not_serving(address: &str, reason: &str) -> ProbedEndpoint {
    ProbedEndpoint {
        verdict: HealthVerdict {
            health: Health::NotServing,
            reason: Some(reason.into()),
        },
        ..probed(address, Health::NotServing)
    }
}

#[test]
fn below_the_panic_threshold_every_kubernetes_ready_endpoint_is_published_usable_and_marked() {
    // 1 of 3 passes: below 50%.
    let observation = Observation::Endpoints(vec![
        not_serving("10.0.0.1:80", "Timeout"),
        not_serving("10.0.0.2:80", "Timeout"),
        probed("10.0.0.3:80", Health::Serving),
    ]);
    let status = desired_status(None, &observation, &ctx(at(0))).status;
    let listed: Vec<(Health, u32, bool, bool)> = status
        .endpoints
        .iter()
        .map(|e| (e.health, e.weight, e.fail_open, e.is_usable()))
        .collect();
    assert_eq!(
        listed,
        [
            (Health::NotServing, FULL_WEIGHT, true, true),
            (Health::NotServing, FULL_WEIGHT, true, true),
            (Health::Serving, FULL_WEIGHT, false, true),
        ],
        "health stays what the probes saw; the failing ones are marked and weighted"
    );
    assert_eq!(status.ready_endpoints, 3, "readyEndpoints counts what clients use");
    let ready = status.condition(condition::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "FailingOpen"));
    let failing_open = status.condition(condition::FAILING_OPEN).unwrap();
    assert_eq!(
        (failing_open.status.as_str(), failing_open.reason.as_str()),
        ("True", "BelowPanicThreshold")
    );
    assert_eq!(
        failing_open.message,
        "1 of 3 Kubernetes-ready endpoints pass their health checks, below the panic threshold of 50%; clients \
         use all 3"
    );
    // The failing entries keep their reason and transition time: what the probes saw.
    assert_eq!(status.endpoints[0].reason.as_deref(), Some("Timeout"));
    assert!(status.endpoints[0].last_transition_time.is_some());

    // Threshold 30%: one of three is enough, the checks are trusted.
    let trusted = desired_status(
        None,
        &observation,
        &StatusContext {
            panic_threshold: 30,
            ..ctx(at(0))
        },
    )
    .status;
    assert_eq!(trusted.ready_endpoints, 1);
    assert!(trusted.endpoints.iter().all(|e| !e.fail_open));
    assert_eq!(trusted.condition(condition::FAILING_OPEN).unwrap().status, "False");
    assert_eq!(trusted.condition(condition::READY).unwrap().reason, "Available");
}

#[test]
fn probes_failing_at_connect_time_everywhere_fail_open_before_any_endpoint_is_not_serving() {
    // The operator's own network is cut: the probes fail at connect time, the unhealthy
    // threshold is not crossed yet, and then it is.
    let unreachable = |address: &str, health: Health| ProbedEndpoint {
        connect_failing: true,
        ..probed(address, health)
    };
    for health in [Health::Serving, Health::NotServing] {
        let status = desired_status(
            None,
            &Observation::Endpoints(vec![
                unreachable("10.0.0.1:80", health),
                unreachable("10.0.0.2:80", health),
            ]),
            &StatusContext {
                panic_threshold: 0,
                ..ctx(at(0))
            },
        )
        .status;
        assert_eq!(status.ready_endpoints, 2, "{health}");
        assert!(status.endpoints.iter().all(EndpointStatus::is_usable));
        assert_eq!(
            status.condition(condition::FAILING_OPEN).unwrap().reason,
            "ProbesFailingToConnect"
        );
        assert_eq!(status.condition(condition::DEGRADED).unwrap().status, "True");
    }
}

#[test]
fn weighted_out_and_unknown_endpoints_are_never_failed_open_to() {
    let mut weighted_out = not_serving("10.0.0.1:80", "NotServing");
    weighted_out.weight = 0;
    let observation = Observation::Endpoints(vec![
        weighted_out,
        probed("10.0.0.2:80", Health::Unknown),
        not_serving("10.0.0.3:80", "Timeout"),
    ]);
    let status = desired_status(None, &observation, &ctx(at(0))).status;
    let usable: Vec<bool> = status.endpoints.iter().map(EndpointStatus::is_usable).collect();
    assert_eq!(usable, [false, false, true]);
    assert_eq!(
        status.condition(condition::FAILING_OPEN).unwrap().reason,
        "NoEndpointPassesChecks"
    );
}

#[test]
fn degraded_when_every_one_of_several_endpoints_fails_at_connect_time() {
    let failing = |address: &str| ProbedEndpoint {
        connect_failing: true,
        ..probed(address, Health::NotServing)
    };
    let status = desired_status(
        None,
        &Observation::Endpoints(vec![failing("10.0.0.1:80"), failing("10.0.0.2:80")]),
        &ctx(at(0)),
    )
    .status;
    let degraded = status.condition(condition::DEGRADED).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "AllProbesFailingToConnect")
    );

    let one_reaches = desired_status(
        None,
        &Observation::Endpoints(vec![failing("10.0.0.1:80"), probed("10.0.0.2:80", Health::Serving)]),
        &ctx(at(0)),
    )
    .status;
    assert_eq!(one_reaches.condition(condition::DEGRADED).unwrap().status, "False");
}

#[test]
fn past_the_size_budget_usable_endpoints_are_listed_first_and_a_condition_says_so() {
    let mut endpoints: Vec<ProbedEndpoint> = (0..100)
        .map(|i| probed(&format!("10.0.{}.{}:80", i / 250, i % 250), Health::NotServing))
        .collect();
    endpoints.push(probed("10.9.9.9:80", Health::Serving));
    let one_entry =
        GrpcBackendStatus::encoded_entry_sizes(&desired_status(None, &three_serving(), &ctx(at(0))).status.endpoints)
            [0];
    let budget = one_entry * 10;
    let status = desired_status(
        None,
        &Observation::Endpoints(endpoints),
        &StatusContext {
            endpoints_budget: budget,
            // 1 of 101 passing would fail open: not what this test is about.
            panic_threshold: 0,
            ..ctx(at(0))
        },
    )
    .status;
    assert!(status.endpoints.len() < 101 && !status.endpoints.is_empty());
    let written = serde_json::to_value(&status).unwrap();
    assert!(serde_json::to_vec(&written["endpoints"]).unwrap().len() <= budget + 2);
    assert!(
        status.endpoints.iter().any(|e| e.address == "10.9.9.9"),
        "the usable endpoint is kept"
    );
    assert_eq!((status.ready_endpoints, status.total_endpoints), (1, 101));
    let truncated = status.condition(condition::TRUNCATED).unwrap();
    assert_eq!(truncated.status, "True");
    assert!(
        truncated
            .message
            .starts_with(&format!("status lists {} of 101 endpoints", status.endpoints.len()))
    );
    let mut sorted = status.endpoints.clone();
    sorted.sort_by_key(sort_key);
    assert_eq!(sorted, status.endpoints);
}

#[test]
fn slow_start_lists_when_the_endpoint_became_usable_for_the_clients_to_ramp_from() {
    let slow = |now| StatusContext {
        slow_start_window: Duration::from_secs(100),
        ..ctx(now)
    };
    let first = desired_status(None, &three_serving(), &slow(at(0))).status;
    assert!(
        first.endpoints.iter().all(|e| e.weight == FULL_WEIGHT),
        "the full weight is published: clients ramp it"
    );
    assert!(
        first
            .endpoints
            .iter()
            .all(|e| e.last_transition_time == Some(Time(at(0))))
    );
    let later = desired_status(Some(&first), &three_serving(), &slow(at(50))).status;
    assert_eq!(
        later, first,
        "nothing to write during the window: one write per new endpoint"
    );
    // After the window the time goes at the next write, which something else causes.
    let done = desired_status(Some(&later), &three_serving(), &slow(at(100))).status;
    assert!(
        done.endpoints.iter().all(|e| e.last_transition_time.is_none()),
        "settled: no time listed"
    );
    // Read back without a time, a settled endpoint stays settled: no ramp again.
    let read_back: GrpcBackendStatus = serde_json::from_value(serde_json::to_value(&done).unwrap()).unwrap();
    let after_restart = desired_status(Some(&read_back), &three_serving(), &slow(at(101))).status;
    assert_eq!(after_restart, read_back);
}

#[test]
fn the_policy_weight_is_published_for_usable_endpoints_and_zero_otherwise() {
    let mut observation = three_serving();
    if let Observation::Endpoints(endpoints) = &mut observation {
        endpoints[0].weight = 3;
        endpoints[1].weight = 0;
        endpoints[2].verdict.health = Health::NotServing;
        endpoints[2].weight = 7;
        endpoints[0].endpoint.for_zones = vec!["z2".into()];
    }
    let status = desired_status(None, &observation, &ctx(at(0))).status;
    let weights: Vec<(&str, u32, bool)> = status
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight, e.is_usable()))
        .collect();
    assert_eq!(
        weights,
        [("10.0.0.1", 0, false), ("10.0.0.2", 3, true), ("10.0.0.10", 0, false)]
    );
    assert_eq!(status.ready_endpoints, 1);
    assert_eq!(
        status.endpoints[1].for_zones,
        ["z2"],
        "zone hints are carried to clients"
    );
}

#[test]
fn notices_name_ready_transitions_and_endpoint_flips() {
    let first = desired_status(None, &three_serving(), &ctx(at(0))).status;
    let created = notices(None, &first);
    assert_eq!(created[0].reason, "Available");
    assert!(!created[0].warning);

    let mut observation = three_serving();
    if let Observation::Endpoints(endpoints) = &mut observation {
        for e in endpoints.iter_mut() {
            e.verdict.health = Health::NotServing;
        }
    }
    let down = desired_status(Some(&first), &observation, &ctx(at(5))).status;
    let events = notices(Some(&first), &down);
    assert_eq!(events.len(), 2, "{events:?}");
    // None passes: failing open says so once (not again as a Ready transition).
    assert_eq!(
        (events[0].reason.as_str(), events[0].warning),
        ("NoEndpointPassesChecks", true)
    );
    assert_eq!(events[1].reason, "EndpointNotServing");
    assert_eq!(
        events[1].note,
        "NotServing: 10.0.0.1:50051, 10.0.0.2:50051, 10.0.0.10:50051"
    );
    assert!(notices(Some(&down), &down).is_empty());

    // Back: Ready is Available again, an Event says so.
    let back = desired_status(Some(&down), &three_serving(), &ctx(at(9))).status;
    let events = notices(Some(&down), &back);
    assert_eq!((events[0].reason.as_str(), events[0].warning), ("Available", false));

    // Nothing Kubernetes-ready at all: Ready=False NoReadyEndpoints, a warning.
    let mut gone = three_serving();
    if let Observation::Endpoints(endpoints) = &mut gone {
        for e in endpoints.iter_mut() {
            e.endpoint.terminating = true;
            e.endpoint.ready = false;
        }
    }
    let drained = desired_status(Some(&back), &gone, &ctx(at(12))).status;
    let events = notices(Some(&back), &drained);
    assert_eq!(
        (events[0].reason.as_str(), events[0].warning),
        ("NoReadyEndpoints", true)
    );
}

#[test]
fn ipv6_endpoints_are_shown_in_brackets() {
    assert_eq!(display_endpoint("fd00::1", 80), "[fd00::1]:80");
    assert_eq!(display_endpoint("10.0.0.1", 80), "10.0.0.1:80");
}
