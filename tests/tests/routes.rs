//! GRPCRoutes (Gateway API, attached to a Service) resolved by the real operator against a real
//! apiserver with the Gateway API's own CRDs: each route's status as the specification requires
//! for a mesh, and the parent GrpcBackend's routing table (`status.routes`) that every client
//! kind follows.

use std::time::Duration;

use anyhow::Result;
use kube::{Api, api::DeleteParams};
use kubegrpc_crds::{GrpcBackend, gateway::GRPCRoute};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    backends::start_backends,
    objects::create_service,
    operator::InProcessOperator,
    routes::{apply_route, balanced_service, condition, service_backend, service_parent, wait_route_parent, weights},
    scenario::Scenario,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

fn accepted_and_resolved(entry: &kubegrpc_crds::gateway::RouteParentStatus) -> bool {
    condition(entry, "Accepted") == Some(("True".into(), "Accepted".into()))
        && condition(entry, "ResolvedRefs") == Some(("True".into(), "ResolvedRefs".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_over_three_services_becomes_the_parents_table_and_follows_each_edit() -> Result<()> {
    let scenario = Scenario::new("routes-table").await?;
    scenario.control_plane.install_gateway_api().await?;
    let backends = start_backends(3).await?;
    for (name, backend) in ["echo", "echo-v2", "echo-v3"].into_iter().zip(&backends) {
        balanced_service(&scenario, name, &[backend]).await?;
    }
    let _operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);

    let split = |a: i32, b: i32, c: i32| {
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("echo", a), service_backend("echo-v2", b), service_backend("echo-v3", c)
        ]}]})
    };
    apply_route(&scenario.client, &scenario.namespace, "split", split(70, 30, 0)).await?;
    let entry = wait_route_parent(
        &scenario.client,
        &scenario.namespace,
        "split",
        "echo",
        DEADLINE,
        accepted_and_resolved,
    )
    .await?;
    let generation = Api::<GRPCRoute>::namespaced(scenario.client.clone(), &scenario.namespace)
        .get("split")
        .await?
        .metadata
        .generation;
    assert!(
        entry.conditions.iter().all(|c| c.observed_generation == generation),
        "{entry:?}"
    );

    let expected = |a: u32, b: u32, c: u32| {
        vec![
            ("echo".to_string(), a),
            ("echo-v2".to_string(), b),
            ("echo-v3".to_string(), c),
        ]
    };
    let published = scenario
        .wait_status("echo", "the 70/30/0 table", DEADLINE, |s| {
            s.routes.len() == 1 && weights(&s.routes[0]) == expected(70, 30, 0)
        })
        .await?;
    let table = &published.status.as_ref().map(|s| s.routes.clone()).unwrap_or_default();
    assert_eq!(table[0].route, format!("{}/split", scenario.namespace));
    assert_eq!(table[0].method, None, "a rule without matches takes every call");
    // The backends' own GrpcBackends are not parents: no table there.
    for name in ["echo-v2", "echo-v3"] {
        let backend: GrpcBackend = scenario.backends().get(name).await?;
        assert!(
            backend.status.as_ref().is_none_or(|s| s.routes.is_empty()),
            "{name}: {:?}",
            backend.status.map(|s| s.routes)
        );
    }

    // What a canary controller does: rewrite the weights.
    for (a, b) in [(90, 10), (0, 100)] {
        apply_route(&scenario.client, &scenario.namespace, "split", split(a, b, 0)).await?;
        scenario
            .wait_status("echo", &format!("the {a}/{b}/0 table"), DEADLINE, |s| {
                s.routes.len() == 1 && weights(&s.routes[0]) == expected(a as u32, b as u32, 0)
            })
            .await?;
    }

    // Deleted: no table, calls go to the Service's own endpoints again.
    Api::<GRPCRoute>::namespaced(scenario.client.clone(), &scenario.namespace)
        .delete("split", &DeleteParams::default())
        .await?;
    scenario
        .wait_status("echo", "no table", DEADLINE, |s| s.routes.is_empty())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn method_and_header_matches_are_published_in_the_specifications_precedence() -> Result<()> {
    let scenario = Scenario::new("routes-matches").await?;
    scenario.control_plane.install_gateway_api().await?;
    let backends = start_backends(2).await?;
    balanced_service(&scenario, "echo", &[&backends[0]]).await?;
    balanced_service(&scenario, "echo-v2", &[&backends[1]]).await?;
    let _operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);

    // Written in the opposite order of precedence: the catch-all first.
    apply_route(
        &scenario.client,
        &scenario.namespace,
        "v2-for-testers",
        json!({"parentRefs": [service_parent("echo")], "rules": [
            {"backendRefs": [service_backend("echo", 1)]},
            {"matches": [{"headers": [{"name": "X-Tester", "value": "v2"}]}],
             "backendRefs": [service_backend("echo-v2", 1)]},
            {"matches": [{"method": {"service": "echo.Echo", "method": "Say"}}],
             "backendRefs": [service_backend("echo-v2", 1)]},
        ]}),
    )
    .await?;
    let published = scenario
        .wait_status("echo", "a table of three entries", DEADLINE, |s| s.routes.len() == 3)
        .await?;
    let table = published.status.map(|s| s.routes).unwrap_or_default();
    let order: Vec<u32> = table.iter().map(|e| e.rule).collect();
    assert_eq!(
        order,
        vec![2, 1, 0],
        "method match, then header match, then the catch-all: {table:?}"
    );
    assert_eq!(table[1].headers[0].name, "x-tester", "metadata keys are lowercase");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_backend_refs_are_reported_and_the_others_take_their_share() -> Result<()> {
    let scenario = Scenario::new("routes-refs").await?;
    scenario.control_plane.install_gateway_api().await?;
    let backends = start_backends(2).await?;
    balanced_service(&scenario, "echo", &[&backends[0]]).await?;
    create_service(&scenario.client, &scenario.namespace, "unbalanced", &[("grpc", 80)]).await?;
    let _operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);

    apply_route(
        &scenario.client,
        &scenario.namespace,
        "r",
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("echo", 50), service_backend("missing", 50), service_backend("unbalanced", 10)
        ]}]}),
    )
    .await?;
    let entry = wait_route_parent(&scenario.client, &scenario.namespace, "r", "echo", DEADLINE, |e| {
        condition(e, "ResolvedRefs") == Some(("False".into(), "BackendNotFound".into()))
    })
    .await?;
    let message = &entry
        .conditions
        .iter()
        .find(|c| c.type_ == "ResolvedRefs")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("not found"), "{message}");
    assert!(message.contains("no GrpcBackend balances port 80"), "{message}");
    assert_eq!(
        condition(&entry, "Accepted"),
        Some(("True".into(), "Accepted".into())),
        "what resolves is routed"
    );
    scenario
        .wait_status("echo", "a table naming echo alone", DEADLINE, |s| {
            s.routes.len() == 1 && weights(&s.routes[0]) == vec![("echo".to_string(), 50)]
        })
        .await?;

    // The GrpcBackend appears: the route resolves again (a GrpcBackend watch event, not a route
    // edit), and `unbalanced` joins the table; `missing` is still reported.
    balanced_service(&scenario, "missing", &[&backends[1]]).await?;
    scenario
        .wait_status("echo", "a table naming echo and missing", DEADLINE, |s| {
            s.routes.len() == 1 && weights(&s.routes[0]) == vec![("echo".to_string(), 50), ("missing".to_string(), 50)]
        })
        .await?;
    wait_route_parent(&scenario.client, &scenario.namespace, "r", "echo", DEADLINE, |e| {
        e.conditions
            .iter()
            .any(|c| c.type_ == "ResolvedRefs" && c.status == "False" && !c.message.contains("missing"))
    })
    .await?;
    Ok(())
}

/// Across namespaces: the operator must watch both, so this test has a control plane of its own
/// (an operator of all namespaces on the shared one would reconcile other tests' objects).
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_in_another_namespace_needs_a_reference_grant() -> Result<()> {
    let control_plane = leak(ControlPlane::start(ControlPlaneOptions::default()).await?);
    control_plane.install_gateway_api().await?;
    let client = control_plane.client().await?;
    let in_namespace = |namespace: String| Scenario {
        control_plane,
        client: client.clone(),
        namespace,
    };
    let shop = in_namespace(control_plane.create_namespace(&client, "shop").await?);
    let canary_namespace = control_plane.create_namespace(&client, "canary").await?;
    let canary = in_namespace(canary_namespace.clone());
    let backends = start_backends(2).await?;
    balanced_service(&shop, "echo", &[&backends[0]]).await?;
    balanced_service(&canary, "echo-canary", &[&backends[1]]).await?;
    let _operator = InProcessOperator::start_with(
        client.clone(),
        kubegrpc_operator::Settings {
            identity: "test-operator-routes-grant".into(),
            ..kubegrpc_operator::Settings::default()
        },
    );

    apply_route(
        &client,
        &shop.namespace,
        "canary",
        json!({"parentRefs": [service_parent("echo")], "rules": [{"backendRefs": [
            service_backend("echo", 90),
            {"name": "echo-canary", "namespace": canary_namespace, "port": 80, "weight": 10}
        ]}]}),
    )
    .await?;
    wait_route_parent(&client, &shop.namespace, "canary", "echo", DEADLINE, |e| {
        condition(e, "ResolvedRefs") == Some(("False".into(), "RefNotPermitted".into()))
    })
    .await?;
    shop.wait_status("echo", "a table without the ungranted backend", DEADLINE, |s| {
        s.routes.len() == 1 && weights(&s.routes[0]) == vec![("echo".to_string(), 90)]
    })
    .await?;

    let grants = Api::<kubegrpc_crds::gateway::ReferenceGrant>::namespaced(client.clone(), &canary_namespace);
    grants
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1beta1",
                "kind": "ReferenceGrant",
                "metadata": {"name": "routes-from-shop"},
                "spec": {
                    "from": [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "namespace": shop.namespace}],
                    "to": [{"group": "", "kind": "Service", "name": "echo-canary"}],
                },
            }))?,
        )
        .await?;
    wait_route_parent(
        &client,
        &shop.namespace,
        "canary",
        "echo",
        DEADLINE,
        accepted_and_resolved,
    )
    .await?;
    let published = shop
        .wait_status("echo", "a table with the granted backend", DEADLINE, |s| {
            s.routes.len() == 1 && s.routes[0].backends.len() == 2
        })
        .await?;
    let table = published.status.map(|s| s.routes).unwrap_or_default();
    assert_eq!(
        table[0].backends[1].namespace.as_deref(),
        Some(canary_namespace.as_str())
    );
    assert_eq!(table[0].backends[1].weight, 10);
    control_plane.shutdown();
    Ok(())
}

/// A control plane kept for the rest of the test process (a [`Scenario`] borrows it for
/// `'static`); its processes are stopped when the test binary exits.
fn leak(control_plane: ControlPlane) -> &'static ControlPlane {
    Box::leak(Box::new(control_plane))
}
