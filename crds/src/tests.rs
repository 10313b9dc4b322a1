use std::time::Duration as StdDuration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use serde_json::json;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let committed = include_str!("../grpcbackend.yaml");
    assert!(
        committed == crd_yaml(),
        "crds/grpcbackend.yaml differs from what the types generate: run `make crds` and commit the result"
    );
}

#[test]
fn a_minimal_spec_gets_every_default() {
    let spec: GrpcBackendSpec = serde_json::from_value(json!({"service": "echo", "port": "grpc"})).unwrap();
    assert_eq!(spec.port, PortRef::Name("grpc".into()));
    assert_eq!(spec.health_check, HealthCheck::default());
    assert_eq!(spec.health_check.interval(), StdDuration::from_secs(5));
    assert_eq!(spec.health_check.timeout(), StdDuration::from_secs(1));
    assert_eq!(spec.health_check.mode, HealthCheckMode::Watch);
    assert_eq!(spec.weighting.policy, WeightingPolicy::Equal);
    assert_eq!(spec.weighting.slow_start_window(), StdDuration::ZERO);
}

#[test]
fn port_is_int_or_string_on_the_wire() {
    let number: PortRef = serde_json::from_value(json!(50051)).unwrap();
    assert_eq!(number, PortRef::Number(50051));
    assert_eq!(serde_json::to_value(&number).unwrap(), json!(50051));
    assert_eq!(
        serde_json::to_value(PortRef::Name("grpc".into())).unwrap(),
        json!("grpc")
    );
}

#[test]
fn the_schema_carries_the_admission_rules() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_string(&GrpcBackend::crd()).unwrap();
    for needle in [
        "x-kubernetes-int-or-string",
        "spec.port must be",
        "spec.service must be",
        "spec.healthCheck.timeout must be shorter",
        "spec.healthCheck.interval must be",
        r#""x-kubernetes-list-type":"atomic""#,
    ] {
        assert!(crd.contains(needle), "CRD lacks {needle}");
    }
}

#[test]
fn usable_means_serving_not_terminating_healthy_and_weighted() {
    let endpoint = EndpointStatus {
        address: "10.250.1.1".into(),
        port: 50051,
        weight: FULL_WEIGHT,
        health: Health::Serving,
        serving: true,
        terminating: false,
        zone: None,
        for_zones: Vec::new(),
        pod: None,
        target_ref: None,
        reason: None,
        last_transition_time: None,
        fail_open: false,
    };
    assert!(endpoint.is_usable());
    assert!(
        !EndpointStatus {
            weight: 0,
            ..endpoint.clone()
        }
        .is_usable()
    );
    assert!(
        !EndpointStatus {
            terminating: true,
            ..endpoint.clone()
        }
        .is_usable()
    );
    assert!(
        !EndpointStatus {
            serving: false,
            ..endpoint.clone()
        }
        .is_usable()
    );
    assert!(
        !EndpointStatus {
            health: Health::Unknown,
            ..endpoint
        }
        .is_usable()
    );
}

fn entry(address: &str, port: i32) -> EndpointStatus {
    EndpointStatus {
        address: address.into(),
        port,
        weight: FULL_WEIGHT,
        health: Health::Serving,
        serving: true,
        terminating: false,
        zone: Some("us-central1-a".into()),
        for_zones: Vec::new(),
        pod: Some("checkout-api-7d9f8c6b5d-x2kqp".into()),
        target_ref: None,
        reason: None,
        last_transition_time: None,
        fail_open: false,
    }
}

#[test]
fn a_usual_entry_is_written_with_address_health_zone_and_pod_only() {
    let status = GrpcBackendStatus {
        endpoints: vec![entry("10.244.12.34", 8080), entry("10.244.12.35", 8080)],
        ..GrpcBackendStatus::default()
    };
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["port"], 8080);
    assert_eq!(
        json["endpoints"][0],
        serde_json::json!({
            "address": "10.244.12.34",
            "health": "Serving",
            "zone": "us-central1-a",
            "pod": "checkout-api-7d9f8c6b5d-x2kqp",
        })
    );
}

#[test]
fn every_entry_reads_back_as_written() {
    let mut unusual = entry("10.244.0.9", 9090);
    unusual.weight = 0;
    unusual.health = Health::NotServing;
    unusual.serving = false;
    unusual.terminating = true;
    unusual.zone = None;
    unusual.pod = None;
    unusual.target_ref = Some(TargetRef {
        kind: "VirtualMachine".into(),
        name: "vm-1".into(),
    });
    unusual.reason = Some("ConnectFailed".into());
    unusual.last_transition_time = Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap()));
    let status = GrpcBackendStatus {
        observed_generation: Some(3),
        ready_endpoints: 2,
        total_endpoints: 4,
        conditions: vec![],
        endpoints: vec![
            entry("10.244.0.1", 8080),
            unusual,
            entry("10.244.0.10", 8080),
            entry("fd00::1", 8081),
        ],
        routes: Vec::new(),
    };
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["port"], 8080, "the port most endpoints use");
    assert_eq!(json["endpoints"][1]["port"], 9090);
    assert_eq!(json["endpoints"][3]["port"], 8081);
    assert!(json["endpoints"][0].get("port").is_none());
    let read: GrpcBackendStatus = serde_json::from_value(json).unwrap();
    assert_eq!(read, status);
}

#[test]
fn ten_thousand_usual_entries_take_under_128_bytes_each() {
    // 10,000 of them then fit in the operator's default budget (1.25 MiB).
    // Realistic names: a GKE zone, a Deployment's Pod, addresses from a /14 Pod range.
    let endpoints: Vec<EndpointStatus> = (0..10_000u32)
        .map(|n| entry(&format!("10.{}.{}.{}", 244 + n / 65_536, n / 256 % 256, n % 256), 8080))
        .collect();
    let status = GrpcBackendStatus {
        endpoints,
        ..GrpcBackendStatus::default()
    };
    let json = serde_json::to_value(&status).unwrap();
    let bytes = serde_json::to_vec(&json["endpoints"]).unwrap().len();
    assert!(bytes <= 10_000 * 128, "{bytes} bytes for 10,000 entries");
}

#[test]
fn an_older_status_with_every_field_still_reads() {
    let json = serde_json::json!({
        "readyEndpoints": 1,
        "totalEndpoints": 1,
        "endpoints": [{
            "address": "10.244.0.1", "port": 8080, "weight": 100, "health": "Serving",
            "ready": true, "serving": true, "terminating": false, "zone": "a", "node": "n1",
            "targetRef": {"kind": "Pod", "namespace": "default", "name": "p", "uid": "u"},
            "reason": "Serving", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }],
    });
    let read: GrpcBackendStatus = serde_json::from_value(json).unwrap();
    assert_eq!(read.endpoints[0].port, 8080);
    assert!(read.endpoints[0].is_usable());
}

#[test]
fn a_status_without_routes_leaves_the_field_out_and_a_table_reads_back_in_order() {
    let plain = serde_json::to_value(GrpcBackendStatus::default()).unwrap();
    assert!(
        plain.get("routes").is_none(),
        "no table is written as no field: {plain}"
    );

    let table = vec![
        routes::RouteEntry {
            route: "shop/echo-v2".into(),
            rule: 0,
            method: Some(routes::MethodMatch {
                match_type: routes::MatchType::Exact,
                service: Some("echo.Echo".into()),
                method: Some("Say".into()),
            }),
            headers: vec![routes::HeaderMatch {
                match_type: routes::MatchType::RegularExpression,
                name: "x-tester".into(),
                value: "v2|beta".into(),
            }],
            backends: vec![routes::RouteBackend {
                name: "echo-v2".into(),
                namespace: None,
                weight: 1,
            }],
            timeout: None,
            retry: None,
        },
        routes::RouteEntry {
            route: "shop/echo-v2".into(),
            rule: 1,
            method: None,
            headers: vec![],
            backends: vec![
                routes::RouteBackend {
                    name: "echo".into(),
                    namespace: None,
                    weight: 90,
                },
                routes::RouteBackend {
                    name: "echo-canary".into(),
                    namespace: Some("canary".into()),
                    weight: 10,
                },
            ],
            timeout: Some(kube::core::Duration::from(std::time::Duration::from_millis(200))),
            retry: Some(routes::RetryPolicy {
                codes: vec!["UNAVAILABLE".into()],
                attempts: 2,
                backoff: kube::core::Duration::from(std::time::Duration::from_millis(25)),
                max_backoff: kube::core::Duration::from(std::time::Duration::from_millis(250)),
                budget_percent: 20,
            }),
        },
    ];
    let status = GrpcBackendStatus {
        routes: table.clone(),
        ..GrpcBackendStatus::default()
    };
    let wire = serde_json::to_value(&status).unwrap();
    assert_eq!(
        wire["routes"][0]["method"],
        json!({"type": "Exact", "service": "echo.Echo", "method": "Say"})
    );
    assert_eq!(
        wire["routes"][1]["backends"][1],
        json!({"name": "echo-canary", "namespace": "canary", "weight": 10})
    );
    assert_eq!(wire["routes"][1]["timeout"], json!("200ms"));
    assert_eq!(
        wire["routes"][1]["retry"],
        json!({"codes": ["UNAVAILABLE"], "attempts": 2, "backoff": "25ms", "maxBackoff": "250ms", "budgetPercent": 20})
    );
    let read: GrpcBackendStatus = serde_json::from_value(wire).unwrap();
    assert_eq!(read.routes, table);
}

#[test]
fn outlier_detection_unset_or_partial_gets_grfc_a50_defaults() {
    let spec: GrpcBackendSpec = serde_json::from_value(json!({"service": "echo", "port": "grpc"})).unwrap();
    assert_eq!(spec.outlier_detection, None);
    let defaults = spec.outlier_detection();
    assert!(defaults.enabled);
    assert_eq!(
        (
            defaults.interval(),
            defaults.base_ejection_time(),
            defaults.max_ejection_time(),
            defaults.max_ejection_percent(),
            defaults.consecutive_connect_failures(),
        ),
        (
            StdDuration::from_secs(10),
            StdDuration::from_secs(30),
            StdDuration::from_secs(300),
            10,
            5
        )
    );
    let rule = defaults.failure_percentage().expect("on by default");
    assert_eq!(
        (rule.threshold(), rule.minimum_hosts(), rule.request_volume()),
        (85, 5, 50)
    );
    // Unset is not written back: a spec without the field reads and writes as before.
    assert!(serde_json::to_value(&spec).unwrap().get("outlierDetection").is_none());

    let partial: GrpcBackendSpec = serde_json::from_value(json!({"service": "echo", "port": "grpc",
        "outlierDetection": {"interval": "1s", "failurePercentage": {"minimumHosts": 3}}}))
    .unwrap();
    let partial = partial.outlier_detection();
    assert_eq!(partial.interval(), StdDuration::from_secs(1));
    assert_eq!(partial.base_ejection_time(), StdDuration::from_secs(30));
    let rule = partial.failure_percentage().expect("on");
    assert_eq!((rule.threshold(), rule.minimum_hosts()), (85, 3));
}

#[test]
fn outlier_detection_turns_off_whole_or_failure_percentage_only() {
    let read = |od: serde_json::Value| -> OutlierDetection {
        let spec: GrpcBackendSpec =
            serde_json::from_value(json!({"service": "echo", "port": "grpc", "outlierDetection": od})).unwrap();
        spec.outlier_detection()
    };
    let off = read(json!({"enabled": false}));
    assert!(!off.enabled);
    assert_eq!(off.failure_percentage(), None, "off means no rule ejects");
    let connect_only = read(json!({"failurePercentage": {"enabled": false}}));
    assert!(connect_only.enabled);
    assert_eq!(connect_only.failure_percentage(), None);
    assert_eq!(connect_only.consecutive_connect_failures(), 5);
    // Values admission would refuse are clamped, never wrapped.
    let wild = read(json!({"maxEjectionPercent": -5, "failurePercentage": {"threshold": 900, "requestVolume": 0}}));
    assert_eq!(wild.max_ejection_percent(), 0);
    let rule = wild.failure_percentage().unwrap();
    assert_eq!((rule.threshold(), rule.request_volume()), (100, 1));
}

#[test]
fn the_schema_carries_the_outlier_detection_rules() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_string(&GrpcBackend::crd()).unwrap();
    for needle in [
        "spec.outlierDetection.interval must be a duration from 100ms to 1h",
        "spec.outlierDetection.baseEjectionTime must be a duration from 100ms to 24h",
        "spec.outlierDetection.maxEjectionTime must be a duration from 100ms to 24h",
    ] {
        assert!(crd.contains(needle), "CRD lacks {needle}");
    }
}
