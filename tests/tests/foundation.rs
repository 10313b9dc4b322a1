//! The foundation against the real apiserver: the CRD, admission of good and bad
//! GrpcBackends, `kubectl get gb`, and the network namespace carrying 10.250.x.y end to end.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use kubegrpc_crds::{GrpcBackend, HealthCheckMode, PortRef, WeightingPolicy};
use kubegrpc_tests::ControlPlane;
use serde_json::{Value, json};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn the_crd_from_crds_is_established() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await?;
    let crd = Api::<CustomResourceDefinition>::all(client)
        .get("grpcbackends.kubegrpc.io")
        .await?;
    let established = crd
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Established")
        .context("no Established condition")?;
    assert_eq!(established.status, "True");
    assert_eq!(crd.spec.names.short_names, Some(vec!["gb".to_string()]));
    Ok(())
}

#[tokio::test]
async fn a_valid_grpcbackend_gets_defaults_and_kubectl_prints_its_columns() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "valid-gb").await?;
    let api = Api::<GrpcBackend>::namespaced(client, &namespace);

    let created = create(&api, "echo", json!({"service": "echo", "port": "grpc"}))
        .await
        .expect("a minimal spec is accepted");
    let read = api.get(&created.metadata.name.clone().unwrap()).await?;
    assert_eq!(read.spec.port, PortRef::Name("grpc".into()));
    assert_eq!(read.spec.health_check.mode, HealthCheckMode::Watch);
    assert_eq!(read.spec.health_check.interval(), Duration::from_secs(5));
    assert_eq!(read.spec.health_check.timeout(), Duration::from_secs(1));
    assert_eq!(read.spec.health_check.healthy_threshold, 1);
    assert_eq!(read.spec.health_check.unhealthy_threshold, 3);
    assert_eq!(read.spec.health_check.service, "");
    assert_eq!(read.spec.weighting.policy, WeightingPolicy::Equal);
    assert_eq!(read.spec.weighting.slow_start_window, None);

    create(&api, "by-number", json!({"service": "echo", "port": 50051}))
        .await
        .expect("a port number is accepted");

    let table = control_plane.kubectl_output(&["get", "gb", "-n", &namespace]).await?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .context("kubectl printed nothing")?
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "SERVICE", "PORT", "READY", "TOTAL", "AGE"],
        "kubectl get gb printed:\n{table}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert!(
        rows.iter().any(|r| r[..3] == ["echo", "echo", "grpc"]),
        "kubectl get gb printed:\n{table}"
    );
    assert!(
        rows.iter().any(|r| r[..3] == ["by-number", "echo", "50051"]),
        "kubectl get gb printed:\n{table}"
    );

    let wide = control_plane
        .kubectl_output(&["get", "grpcbackends", "-n", &namespace, "-o", "wide"])
        .await?;
    let header: Vec<&str> = wide.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SERVICE",
            "PORT",
            "READY",
            "TOTAL",
            "STATUS",
            "HEALTH-SERVICE",
            "MODE",
            "POLICY",
            "AGE"
        ],
        "kubectl get gb -o wide printed:\n{wide}"
    );
    Ok(())
}

/// One admission rule: a spec just past the boundary is rejected with a 422 whose message names
/// the field, and the spec at the boundary is accepted.
struct Boundary {
    field: &'static str,
    rejected: Value,
    accepted: Value,
}

fn boundaries() -> Vec<Boundary> {
    let with = |patch: Value| {
        let mut spec = json!({"service": "echo", "port": "grpc"});
        merge(&mut spec, patch);
        spec
    };
    vec![
        Boundary {
            field: "spec.port",
            rejected: with(json!({"port": 65536})),
            accepted: with(json!({"port": 65535})),
        },
        Boundary {
            field: "spec.port",
            rejected: with(json!({"port": 0})),
            accepted: with(json!({"port": 1})),
        },
        Boundary {
            field: "spec.port",
            rejected: with(json!({"port": "Grpc"})),
            accepted: with(json!({"port": "grpc-1"})),
        },
        Boundary {
            field: "spec.port",
            rejected: with(json!({"port": "a".repeat(64)})),
            accepted: with(json!({"port": "a".repeat(63)})),
        },
        Boundary {
            field: "spec.service",
            rejected: with(json!({"service": ""})),
            accepted: with(json!({"service": "e"})),
        },
        Boundary {
            field: "spec.service",
            rejected: with(json!({"service": "Echo"})),
            accepted: with(json!({"service": "echo-2"})),
        },
        Boundary {
            field: "spec.service",
            rejected: with(json!({"service": "1echo"})),
            accepted: with(json!({"service": "e1"})),
        },
        Boundary {
            field: "spec.service",
            rejected: with(json!({"service": "e".repeat(64)})),
            accepted: with(json!({"service": "e".repeat(63)})),
        },
        Boundary {
            field: "spec.healthCheck.interval",
            rejected: with(json!({"healthCheck": {"interval": "99ms", "timeout": "50ms"}})),
            accepted: with(json!({"healthCheck": {"interval": "100ms", "timeout": "50ms"}})),
        },
        Boundary {
            field: "spec.healthCheck.interval",
            rejected: with(json!({"healthCheck": {"interval": "5 seconds"}})),
            accepted: with(json!({"healthCheck": {"interval": "1m30s"}})),
        },
        Boundary {
            field: "spec.healthCheck.timeout",
            rejected: with(json!({"healthCheck": {"interval": "1s", "timeout": "1s"}})),
            accepted: with(json!({"healthCheck": {"interval": "1s", "timeout": "999ms"}})),
        },
        Boundary {
            field: "spec.healthCheck.timeout",
            rejected: with(json!({"healthCheck": {"timeout": "9ms"}})),
            accepted: with(json!({"healthCheck": {"timeout": "10ms"}})),
        },
        Boundary {
            field: "spec.healthCheck.healthyThreshold",
            rejected: with(json!({"healthCheck": {"healthyThreshold": 0}})),
            accepted: with(json!({"healthCheck": {"healthyThreshold": 1}})),
        },
        Boundary {
            field: "spec.healthCheck.unhealthyThreshold",
            rejected: with(json!({"healthCheck": {"unhealthyThreshold": 0}})),
            accepted: with(json!({"healthCheck": {"unhealthyThreshold": 1}})),
        },
        Boundary {
            field: "spec.healthCheck.unhealthyThreshold",
            rejected: with(json!({"healthCheck": {"unhealthyThreshold": 101}})),
            accepted: with(json!({"healthCheck": {"unhealthyThreshold": 100}})),
        },
        Boundary {
            field: "spec.healthCheck.mode",
            rejected: with(json!({"healthCheck": {"mode": "Poll"}})),
            accepted: with(json!({"healthCheck": {"mode": "Check"}})),
        },
        Boundary {
            field: "spec.weighting.policy",
            rejected: with(json!({"weighting": {"policy": "Latency"}})),
            accepted: with(json!({"weighting": {"policy": "Equal"}})),
        },
        Boundary {
            field: "spec.weighting.slowStartWindow",
            rejected: with(json!({"weighting": {"slowStartWindow": "61m"}})),
            accepted: with(json!({"weighting": {"slowStartWindow": "1h"}})),
        },
        Boundary {
            field: "spec.weighting.slowStartAggression",
            rejected: with(json!({"weighting": {"slowStartAggression": 0.05}})),
            accepted: with(json!({"weighting": {"slowStartAggression": 0.1}})),
        },
        Boundary {
            field: "spec.weighting.slowStartMinWeightPercent",
            rejected: with(json!({"weighting": {"slowStartMinWeightPercent": 0}})),
            accepted: with(json!({"weighting": {"slowStartMinWeightPercent": 1}})),
        },
        Boundary {
            field: "spec.weighting.loadReport",
            rejected: with(json!({"weighting": {"policy": "Static", "loadReport": {}}})),
            accepted: with(json!({"weighting": {"policy": "LoadReport", "loadReport": {}}})),
        },
        Boundary {
            field: "spec.weighting.loadReport.reportInterval",
            rejected: with(json!({"weighting": {"policy": "LoadReport", "loadReport": {"reportInterval": "999ms"}}})),
            accepted: with(json!({"weighting": {"policy": "LoadReport", "loadReport": {"reportInterval": "1s"}}})),
        },
        Boundary {
            field: "spec.weighting.loadReport.errorUtilizationPenalty",
            rejected: with(
                json!({"weighting": {"policy": "LoadReport", "loadReport": {"errorUtilizationPenalty": 101}}}),
            ),
            accepted: with(
                json!({"weighting": {"policy": "LoadReport", "loadReport": {"errorUtilizationPenalty": 100}}}),
            ),
        },
        Boundary {
            field: "spec.tls.serverName",
            rejected: with(json!({"tls": {"serverName": "Echo.demo.svc"}})),
            accepted: with(json!({"tls": {"serverName": "echo.demo.svc"}})),
        },
        Boundary {
            field: "spec.tls.caBundle.configMap",
            rejected: with(json!({"tls": {"caBundle": {"configMap": "CA_bundle"}}})),
            accepted: with(json!({"tls": {"caBundle": {"configMap": "ca-bundle"}}})),
        },
        Boundary {
            field: "spec.tls.caBundle.key",
            rejected: with(json!({"tls": {"caBundle": {"configMap": "ca", "key": "ca/crt"}}})),
            accepted: with(json!({"tls": {"caBundle": {"configMap": "ca", "key": "ca.crt"}}})),
        },
        Boundary {
            field: "spec.outlierDetection.interval",
            rejected: with(json!({"outlierDetection": {"interval": "99ms"}})),
            accepted: with(json!({"outlierDetection": {"interval": "100ms"}})),
        },
        Boundary {
            field: "spec.outlierDetection.interval",
            rejected: with(json!({"outlierDetection": {"interval": "ten seconds"}})),
            accepted: with(json!({"outlierDetection": {"interval": "1h"}})),
        },
        Boundary {
            field: "spec.outlierDetection.baseEjectionTime",
            rejected: with(json!({"outlierDetection": {"baseEjectionTime": "25h"}})),
            accepted: with(json!({"outlierDetection": {"baseEjectionTime": "24h"}})),
        },
        Boundary {
            field: "spec.outlierDetection.maxEjectionTime",
            rejected: with(json!({"outlierDetection": {"maxEjectionTime": "0s"}})),
            accepted: with(json!({"outlierDetection": {"maxEjectionTime": "100ms"}})),
        },
        Boundary {
            field: "spec.outlierDetection.maxEjectionPercent",
            rejected: with(json!({"outlierDetection": {"maxEjectionPercent": 101}})),
            accepted: with(json!({"outlierDetection": {"maxEjectionPercent": 100}})),
        },
        Boundary {
            field: "spec.outlierDetection.consecutiveConnectFailures",
            rejected: with(json!({"outlierDetection": {"consecutiveConnectFailures": -1}})),
            accepted: with(json!({"outlierDetection": {"consecutiveConnectFailures": 0}})),
        },
        Boundary {
            field: "spec.outlierDetection.failurePercentage.threshold",
            rejected: with(json!({"outlierDetection": {"failurePercentage": {"threshold": 101}}})),
            accepted: with(json!({"outlierDetection": {"failurePercentage": {"threshold": 0}}})),
        },
        Boundary {
            field: "spec.outlierDetection.failurePercentage.requestVolume",
            rejected: with(json!({"outlierDetection": {"failurePercentage": {"requestVolume": 0}}})),
            accepted: with(json!({"outlierDetection": {"failurePercentage": {"requestVolume": 1}}})),
        },
    ]
}

#[tokio::test]
async fn invalid_grpcbackends_are_rejected_at_admission_naming_the_field() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "admission").await?;
    let api = Api::<GrpcBackend>::namespaced(client, &namespace);

    let cases = boundaries();
    assert!(cases.len() >= 8);
    for (index, case) in cases.iter().enumerate() {
        match create(&api, &format!("rejected-{index}"), case.rejected.clone()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(
                    status.code, 422,
                    "{}: expected 422 Unprocessable Entity, got {status:?}",
                    case.field
                );
                assert!(
                    status.message.contains(case.field),
                    "{}: the rejection message does not name the field: {}",
                    case.field,
                    status.message
                );
            }
            Err(other) => panic!("{}: expected a 422 from admission, got {other}", case.field),
            Ok(_) => panic!("{}: {} was accepted", case.field, case.rejected),
        }
        let accepted = create(&api, &format!("accepted-{index}"), case.accepted.clone()).await;
        assert!(
            accepted.is_ok(),
            "{}: the boundary spec {} was refused: {accepted:?}",
            case.field,
            case.accepted
        );
        api.delete(&format!("accepted-{index}"), &DeleteParams::default())
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_endpointslice_carries_a_namespace_address_that_a_tonic_health_server_answers_on() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "netns").await?;

    let address: SocketAddr = "10.250.3.7:0".parse()?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .context("10.250.3.7 must be local in the namespace")?;
    let address = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("echo-abc".into()),
            labels: Some([("kubernetes.io/service-name".to_string(), "echo".to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![address.ip().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(address.port().into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    let slices = Api::<EndpointSlice>::namespaced(client, &namespace);
    slices
        .create(&PostParams::default(), &slice)
        .await
        .context("the apiserver refused a 10.250.x.y endpoint")?;
    let stored = slices.get("echo-abc").await?;
    let stored_address = &stored.endpoints.context("no endpoints stored")?[0].addresses[0].clone();
    let stored_port = stored
        .ports
        .as_ref()
        .and_then(|p| p[0].port)
        .context("no port stored")?;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{stored_address}:{stored_port}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await?;
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
    server.abort();
    Ok(())
}

/// Creates a GrpcBackend from raw JSON, so that specs the Rust types would refuse reach the
/// apiserver's admission as they are.
async fn create(api: &Api<GrpcBackend>, name: &str, spec: Value) -> kube::Result<GrpcBackend> {
    let namespace = api.namespace().unwrap_or_default().to_string();
    kubegrpc_tests::objects::create_grpc_backend(&api.clone().into_client(), &namespace, name, spec).await
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

/// `kubectl create -f` of the CRD under another group (a fresh create, so the apiserver checks
/// every field as it does for a user's first `kubectl apply -f crds/`), returning stderr.
async fn create_crd_copy(control_plane: &ControlPlane, group: &str, edit: impl Fn(String) -> String) -> Result<String> {
    let yaml = edit(kubegrpc_crds::crd_yaml().replace("kubegrpc.io", group));
    let path = control_plane.dir().join(format!("crd-{group}.yaml"));
    std::fs::write(&path, yaml)?;
    let output = control_plane
        .kubectl()
        .args(["create", "-f"])
        .arg(&path)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "kubectl create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    control_plane
        .kubectl_output(&["delete", "crd", &format!("grpcbackends.{group}"), "--wait=false"])
        .await?;
    Ok(String::from_utf8(output.stderr)?)
}

#[tokio::test]
async fn the_crd_applies_without_warnings_and_bounds_every_integer() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let stderr = create_crd_copy(control_plane, "warnings.kubegrpc.io", |yaml| yaml).await?;
    assert_eq!(stderr, "", "kubectl printed warnings for the CRD");
    // The check sees warnings when there are some: the format the apiserver does not know.
    let control = create_crd_copy(control_plane, "control.kubegrpc.io", |yaml| {
        yaml.replacen(
            "format: int64\n                      maximum: 4294967295.0",
            "format: uint32\n                      maximum: 4294967295.0",
            1,
        )
    })
    .await?;
    assert!(control.contains("uint32"), "the control CRD should warn: {control:?}");

    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "bounds").await?;
    let api = Api::<GrpcBackend>::namespaced(client, &namespace);
    create(&api, "echo", json!({"service": "echo", "port": "grpc"})).await?;
    let status = |weight: u64, port: i64, ready: i64| {
        json!({"apiVersion": "kubegrpc.io/v1alpha1", "kind": "GrpcBackend", "status": {
            "readyEndpoints": ready, "totalEndpoints": 1,
            "endpoints": [{"address": "10.250.9.9", "port": port, "weight": weight, "health": "Serving",
                           "serving": true, "terminating": false}]}})
    };
    let write = |body: Value| {
        let api = api.clone();
        async move {
            api.patch_status(
                "echo",
                &kube::api::PatchParams::apply("kubegrpc-tests").force(),
                &kube::api::Patch::Apply(body),
            )
            .await
        }
    };
    write(status(u64::from(u32::MAX), 50051, 1))
        .await
        .expect("the largest weight is accepted");
    for (what, body, field) in [
        ("a weight of 2^40", status(1 << 40, 50051, 1), "weight"),
        ("a port of 0", status(100, 0, 1), "port"),
        ("a negative count", status(100, 50051, -1), "readyEndpoints"),
    ] {
        match write(body).await {
            Err(kube::Error::Api(response)) => {
                assert_eq!(response.code, 422, "{what}: {response:?}");
                assert!(response.message.contains(field), "{what}: {}", response.message);
            }
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    Ok(())
}

/// The TLS sample (`deploy/samples/tls-grpcbackend.yaml`) is what the README tells users to
/// apply: its GrpcBackend and ConfigMap are admitted as written (the cert-manager objects need
/// cert-manager, which this control plane does not have), and its GrpcBackend says what the
/// README says it does.
#[tokio::test]
async fn the_tls_sample_grpc_backend_is_admitted() -> Result<()> {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace(&client, "tls-sample").await?;
    let path = kubegrpc_tests::controlplane::repository_root().join("deploy/samples/tls-grpcbackend.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).context("the sample is not YAML")?;
    let mut admitted = Vec::new();
    for mut document in documents {
        let kind = document["kind"].as_str().unwrap_or_default().to_string();
        document["metadata"]["namespace"] = json!(namespace);
        let name = document["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "GrpcBackend" => {
                let backend: GrpcBackend = serde_json::from_value(document)?;
                let tls = backend
                    .spec
                    .tls
                    .clone()
                    .context("the sample GrpcBackend has no spec.tls")?;
                assert_eq!(
                    tls.ca_bundle.map(|b| (b.config_map, b.key)),
                    Some(("backends-ca".into(), "ca.crt".into()))
                );
                assert_eq!(backend.spec.tls_server_name("demo").as_deref(), Some("echo.demo.svc"));
                Api::<GrpcBackend>::namespaced(client.clone(), &namespace)
                    .create(&PostParams::default(), &backend)
                    .await
                    .with_context(|| format!("GrpcBackend {name} refused"))?;
            }
            "ConfigMap" => {
                let config_map: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(document)?;
                Api::namespaced(client.clone(), &namespace)
                    .create(&PostParams::default(), &config_map)
                    .await
                    .with_context(|| format!("ConfigMap {name} refused"))?;
            }
            _ => continue,
        }
        admitted.push(kind);
    }
    assert_eq!(admitted, ["ConfigMap", "GrpcBackend"]);
    Ok(())
}
