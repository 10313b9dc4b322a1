//! `deploy/` against the real apiserver: accepted as a whole, least privilege in fact (not only
//! in syntax), the operator working under its ServiceAccount, and /metrics telling the truth.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::ServiceAccount, events::v1::Event};
use kube::{
    Api,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};
use kubegrpc_crds::{GrpcBackend, Health};
use kubegrpc_echo::BackendOptions;
use kubegrpc_tests::{
    ControlPlane,
    backends::start_backend,
    controlplane::repository_root,
    install::{
        OPERATOR_NAMESPACE, apply_deploy, apply_namespace, deploy_dir, free_local_address, http_get, metric_series,
        operator_kubeconfig, start_operator_process,
    },
    objects::{SliceEndpoint, apply_slice, create_service},
    scenario::Scenario,
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const OPERATOR: &str = "system:serviceaccount:kubegrpc-system:kubegrpc-operator";

#[tokio::test(flavor = "multi_thread")]
async fn a_server_side_dry_run_of_deploy_is_accepted() -> Result<()> {
    // A fresh cluster of its own: nothing of deploy/ applied yet but the CRD.
    let control_plane = ControlPlane::start(kubegrpc_tests::ControlPlaneOptions::default()).await?;
    let control_plane = &control_plane;
    apply_namespace(control_plane).await?;
    let output = control_plane
        .kubectl_output(&["apply", "--dry-run=server", "-k", &deploy_dir().display().to_string()])
        .await?;
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/grpcbackends.kubegrpc.io",
        "serviceaccount/kubegrpc-operator",
        "clusterrole.rbac.authorization.k8s.io/kubegrpc-operator",
        "deployment.apps/kubegrpc-operator",
        "poddisruptionbudget.policy/kubegrpc-operator",
        "service/kubegrpc-operator-metrics",
        "service/kubegrpc-xds",
        "networkpolicy.networking.k8s.io/kubegrpc-operator",
        "grpcbackend.kubegrpc.io/echo",
        "role.rbac.authorization.k8s.io/grpcbackend-reader",
    ] {
        assert!(output.contains(object), "{object} missing from the dry run:\n{output}");
    }
    Ok(())
}

/// `kubectl auth can-i --list` for a user, normalized (one rule per line, single spaces).
async fn can_i_list(control_plane: &ControlPlane, user: &str) -> Result<String> {
    let output = control_plane
        .kubectl()
        .args([
            "auth",
            "can-i",
            "--list",
            "-n",
            OPERATOR_NAMESPACE,
            &format!("--as={user}"),
        ])
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The header, then the rules sorted: their order is not part of the answer.
    let stdout = String::from_utf8(output.stdout)?;
    let mut lines = stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "));
    let header = lines.next().unwrap_or_default();
    let mut rules: Vec<String> = lines.collect();
    rules.sort();
    Ok(std::iter::once(header).chain(rules).collect::<Vec<_>>().join("\n") + "\n")
}

async fn can_i(control_plane: &ControlPlane, user: &str, args: &[&str]) -> Result<bool> {
    let output = control_plane
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as={user}"))
        .output()
        .await?;
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {args:?}: {other} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Compares with a golden file; `KUBEGRPC_UPDATE_GOLDEN=1` rewrites it (review the diff!).
fn assert_golden(name: &str, actual: &str) -> Result<()> {
    let path = repository_root().join("tests/golden").join(name);
    if std::env::var_os("KUBEGRPC_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual)?;
    }
    let expected = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    assert!(
        expected == actual,
        "{} differs from what the apiserver says; actual:\n{actual}\n(if intended, rerun with \
         KUBEGRPC_UPDATE_GOLDEN=1 and review the diff)",
        path.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_and_client_roles_grant_exactly_the_golden_permissions() -> Result<()> {
    let control_plane = ControlPlane::shared();
    apply_deploy(control_plane).await?;
    assert_golden("operator-can-i.txt", &can_i_list(control_plane, OPERATOR).await?)?;
    let operator_can = |args: &'static [&'static str]| can_i(control_plane, OPERATOR, args);
    assert!(operator_can(&["patch", "grpcbackends.kubegrpc.io", "--subresource=status", "-n", "any"]).await?);
    assert!(operator_can(&["watch", "endpointslices.discovery.k8s.io", "-A"]).await?);
    assert!(
        !operator_can(&["get", "secrets", "-A"]).await?,
        "the operator must not read secrets"
    );
    assert!(
        !operator_can(&["delete", "pods", "-A"]).await?,
        "the operator must not delete pods"
    );
    assert!(
        !operator_can(&["update", "grpcbackends.kubegrpc.io", "-A"]).await?,
        "the spec is not the operator's"
    );
    assert!(!operator_can(&["patch", "leases.coordination.k8s.io/other", "-n", OPERATOR_NAMESPACE]).await?);
    assert!(
        operator_can(&[
            "patch",
            "leases.coordination.k8s.io/kubegrpc-operator",
            "-n",
            OPERATOR_NAMESPACE
        ])
        .await?
    );

    // A client workload bound to the sample Role reads GrpcBackends and nothing more.
    let client = control_plane.client().await?;
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "app"}}))?;
    let _ = Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .create(&PostParams::default(), &account)
        .await;
    let binding = kubegrpc_tests::controlplane::repository_root().join("tests/golden/client-rolebinding.yaml");
    control_plane
        .kubectl_output(&["apply", "--server-side", "-f", &binding.display().to_string()])
        .await?;
    let app = "system:serviceaccount:kubegrpc-system:app";
    assert_golden("client-can-i.txt", &can_i_list(control_plane, app).await?)?;
    let app_can = |args: &'static [&'static str]| can_i(control_plane, app, args);
    assert!(app_can(&["watch", "grpcbackends.kubegrpc.io", "-n", OPERATOR_NAMESPACE]).await?);
    assert!(
        !app_can(&[
            "patch",
            "grpcbackends.kubegrpc.io",
            "--subresource=status",
            "-n",
            OPERATOR_NAMESPACE
        ])
        .await?
    );
    assert!(!app_can(&["list", "services", "-n", OPERATOR_NAMESPACE]).await?);
    assert!(!app_can(&["get", "secrets", "-n", OPERATOR_NAMESPACE]).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_works_under_its_service_account_alone() -> Result<()> {
    let s = Scenario::new("as-sa").await?;
    apply_deploy(s.control_plane).await?;
    let kubeconfig = operator_kubeconfig(s.control_plane).await?;
    let backend = start_backend(BackendOptions::default()).await?;
    s.echo_service(&[backend.address]).await?;
    s.grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    let identity = "replica-sa";
    let operator = start_operator_process(
        s.control_plane,
        &kubeconfig,
        &s.namespace,
        identity,
        free_local_address()?,
        &["--leader-elect", "--lease-namespace", OPERATOR_NAMESPACE],
    )?;
    let reconciled = s
        .wait_status("echo", "reconciled under the ServiceAccount", DEADLINE, |st| {
            st.ready_endpoints == 1
        })
        .await;
    if let Err(error) = reconciled {
        bail!("{error:#}\noperator log:\n{}", operator.log_tail(30));
    }

    let events = Api::<Event>::namespaced(s.client.clone(), &s.namespace);
    wait::until("an Event written by the operator", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some("kubegrpc-operator"))
            .then_some(()))
    })
    .await?;

    let leases = Api::<Lease>::namespaced(s.client.clone(), OPERATOR_NAMESPACE);
    let lease = leases
        .get("kubegrpc-operator")
        .await
        .with_context(|| format!("operator log:\n{}", operator.log_tail(40)))?;
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some(identity));
    let log = std::fs::read_to_string(operator.log_path())?;
    assert!(
        !log.contains("forbidden"),
        "the operator hit a permission it lacks:\n{log}"
    );

    // A graceful stop hands the Lease back at once.
    operator.stop(Duration::from_secs(15));
    let lease = leases.get("kubegrpc-operator").await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert!(
        holder.is_none() || holder.as_deref() == Some(""),
        "Lease still held by {holder:?}; operator log:\n{}",
        operator.log_tail(40)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_exactly_the_numbers_of_a_known_scenario() -> Result<()> {
    let s = Scenario::new("metrics").await?;
    let serving = [
        start_backend(BackendOptions::default()).await?,
        start_backend(BackendOptions::default()).await?,
    ];
    let not_serving = start_backend(BackendOptions {
        initially_serving: false,
        ..BackendOptions::default()
    })
    .await?;
    create_service(&s.client, &s.namespace, "echo", &[("grpc", 80)]).await?;
    let endpoints = [
        SliceEndpoint::ready(serving[0].address),
        SliceEndpoint::ready(serving[1].address),
        SliceEndpoint::ready(not_serving.address),
    ];
    apply_slice(&s.client, &s.namespace, "echo", "echo-1", "grpc", &endpoints).await?;
    let created = s
        .grpc_backend("echo", json!({"service": "echo", "port": "grpc"}))
        .await?;

    // Count every write to the object from its creation on: all of them are the operator's.
    let gbs: Api<GrpcBackend> = s.backends();
    let mut watch = gbs
        .watch(
            &WatchParams::default().fields("metadata.name=echo"),
            created.metadata.resource_version.as_deref().unwrap_or("0"),
        )
        .await?
        .boxed();
    let metrics_address = free_local_address()?;
    let operator = start_operator_process(
        s.control_plane,
        s.control_plane.kubeconfig(),
        &s.namespace,
        "metrics",
        metrics_address,
        &[],
    )?;
    let mut writes = 0;
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = watch.next().await {
            if let WatchEvent::Modified(backend) = event? {
                writes += 1;
                let status = backend.status.unwrap_or_default();
                let healths: Vec<Health> = status.endpoints.iter().map(|e| e.health).collect();
                if status.ready_endpoints == 2
                    && healths.iter().filter(|h| **h == Health::Serving).count() == 2
                    && healths.contains(&Health::NotServing)
                {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        }
        bail!("the watch ended")
    })
    .await
    .with_context(|| format!("operator log:\n{}", operator.log_tail(20)))??;

    // The operator counts a write once the apiserver answered it, which may be a moment after
    // the watch above saw it: wait for the published gauge, then everything must be exact.
    let labels = format!("namespace=\"{}\",name=\"echo\"", s.namespace);
    let ready_series = format!("kubegrpc_ready_endpoints{{{labels}}}");
    let scrape = wait::until("the final state in /metrics", DEADLINE, || async {
        let scrape = http_get(metrics_address, "/metrics").await?;
        Ok((metric_series(&scrape).get(&ready_series).map(String::as_str) == Some("2")).then_some(scrape))
    })
    .await?;
    let metrics = metric_series(&scrape);
    let value = |key: String| metrics.get(&key).cloned().unwrap_or_else(|| format!("missing {key}"));
    assert_eq!(
        value(format!("kubegrpc_endpoints{{{labels},health=\"Serving\"}}")),
        "2",
        "{scrape}"
    );
    assert_eq!(
        value(format!("kubegrpc_endpoints{{{labels},health=\"NotServing\"}}")),
        "1"
    );
    assert_eq!(value(format!("kubegrpc_endpoints{{{labels},health=\"Unknown\"}}")), "0");
    assert_eq!(value(format!("kubegrpc_ready_endpoints{{{labels}}}")), "2");
    assert_eq!(
        value(format!("kubegrpc_status_writes_total{{{labels}}}")),
        writes.to_string(),
        "status writes counted by the operator vs seen by a watch"
    );
    assert_eq!(value("kubegrpc_probers".into()), "3");
    assert_eq!(value("kubegrpc_leader".into()), "0");
    assert!(
        !metrics.keys().any(|k| k.starts_with("kubegrpc_reconcile_errors_total")),
        "{scrape}"
    );
    assert!(
        metrics.contains_key("kubegrpc_probe_duration_seconds_count"),
        "{scrape}"
    );
    assert_eq!(http_get(metrics_address, "/readyz").await?, "ok");
    assert_eq!(http_get(metrics_address, "/healthz").await?, "ok");
    println!("status writes in the scenario: {writes}");
    Ok(())
}
