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
        ready: true,
        serving: true,
        terminating: false,
        zone: None,
        node: None,
        target_ref: None,
        reason: None,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
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
