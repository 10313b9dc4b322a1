use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use kube::api::ObjectMeta;
use kubegrpc_crds::{
    GrpcBackendSpec,
    gateway::{GrpcRouteSpec, ReferenceGrantSpec},
};
use serde_json::json;

use super::*;

/// The cluster as maps.
#[derive(Default)]
struct World {
    services: BTreeMap<ObjectKey, Arc<Service>>,
    backends: Vec<Arc<GrpcBackend>>,
    grants: Vec<Arc<ReferenceGrant>>,
}

impl Lookup for World {
    fn service(&self, key: &ObjectKey) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    fn backends_of_service(&self, service: &ObjectKey) -> Vec<Balancer> {
        self.backends
            .iter()
            .filter(|b| b.spec.service == service.name && b.namespace().as_deref() == Some(service.namespace.as_str()))
            .map(|b| Balancer::of(b))
            .collect()
    }

    fn grants_in(&self, namespace: &str) -> Vec<Arc<ReferenceGrant>> {
        self.grants
            .iter()
            .filter(|g| g.namespace().as_deref() == Some(namespace))
            .cloned()
            .collect()
    }
}

impl World {
    /// A Service with one port `grpc/50051` and a GrpcBackend of the same name balancing it.
    fn balanced(mut self, namespace: &str, name: &str) -> Self {
        self = self.service(namespace, name);
        let mut backend = GrpcBackend::new(
            name,
            serde_json::from_value::<GrpcBackendSpec>(json!({"service": name, "port": "grpc"})).unwrap(),
        );
        backend.metadata.namespace = Some(namespace.into());
        self.backends.push(Arc::new(backend));
        self
    }

    fn service(mut self, namespace: &str, name: &str) -> Self {
        let service = Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    name: Some("grpc".into()),
                    port: 50051,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        self.services.insert(ObjectKey::new(namespace, name), Arc::new(service));
        self
    }

    fn grant(mut self, namespace: &str, spec: serde_json::Value) -> Self {
        let mut grant = ReferenceGrant::new("grant", serde_json::from_value::<ReferenceGrantSpec>(spec).unwrap());
        grant.metadata.namespace = Some(namespace.into());
        self.grants.push(Arc::new(grant));
        self
    }

    fn backend(&self, namespace: &str, name: &str) -> Balancer {
        self.backends
            .iter()
            .find(|b| b.name_any() == name && b.namespace().as_deref() == Some(namespace))
            .map(|b| Balancer::of(b))
            .unwrap()
    }
}

fn route(namespace: &str, name: &str, created_secs: i64, spec: serde_json::Value) -> Arc<GRPCRoute> {
    let mut route = GRPCRoute::new(name, serde_json::from_value::<GrpcRouteSpec>(spec).unwrap());
    route.metadata.namespace = Some(namespace.into());
    route.metadata.generation = Some(2);
    route.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(created_secs).unwrap(),
    ));
    Arc::new(route)
}

fn parent(name: &str) -> serde_json::Value {
    json!({"group": "", "kind": "Service", "name": name, "port": 50051})
}

fn backend_ref(name: &str, weight: i32) -> serde_json::Value {
    json!({"name": name, "port": 50051, "weight": weight})
}

fn weights(entry: &RouteEntry) -> Vec<(String, u32)> {
    entry.backends.iter().map(|b| (b.name.clone(), b.weight)).collect()
}

fn condition_of<'a>(status: &'a GrpcRouteStatus, type_: &str) -> &'a Condition {
    status.parents[0]
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status:?}"))
}

#[test]
fn weights_over_three_backends_are_published_and_weight_zero_is_kept_at_zero() {
    let world = World::default()
        .balanced("shop", "echo")
        .balanced("shop", "echo-v2")
        .balanced("shop", "echo-v3");
    let routes = vec![route(
        "shop",
        "split",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [{"backendRefs": [
            backend_ref("echo", 70), backend_ref("echo-v2", 30), backend_ref("echo-v3", 0)
        ]}]}),
    )];
    let table = table_for(&world.backend("shop", "echo"), &routes, &world);
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].route, "shop/split");
    assert_eq!(table[0].method, None);
    assert_eq!(
        weights(&table[0]),
        vec![("echo".into(), 70), ("echo-v2".into(), 30), ("echo-v3".into(), 0)]
    );
    // The route attaches to echo only: the backends' own GrpcBackends get no table.
    assert!(table_for(&world.backend("shop", "echo-v2"), &routes, &world).is_empty());

    let status = route_status(&routes[0], &world, Timestamp::UNIX_EPOCH);
    assert_eq!(status.parents.len(), 1);
    assert_eq!(status.parents[0].controller_name, CONTROLLER_NAME);
    assert_eq!(condition_of(&status, "Accepted").status, "True");
    assert_eq!(condition_of(&status, "ResolvedRefs").status, "True");
    assert_eq!(condition_of(&status, "Accepted").observed_generation, Some(2));
}

#[test]
fn matches_are_ordered_by_the_specifications_precedence_across_routes_and_rules() {
    let world = World::default().balanced("shop", "echo").balanced("shop", "echo-v2");
    let older = route(
        "shop",
        "b-older",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [
            {"backendRefs": [backend_ref("echo", 1)]},
            {"matches": [{"method": {"service": "echo.Echo"}}], "backendRefs": [backend_ref("echo", 1)]},
        ]}),
    );
    let newer = route(
        "shop",
        "a-newer",
        5,
        json!({"parentRefs": [parent("echo")], "rules": [
            {"matches": [
                {"headers": [{"name": "X-Tester", "value": "v2"}]},
                {"method": {"service": "echo.Echo", "method": "Say"}},
                {"method": {"service": "echo.Echo"}, "headers": [{"name": "x-a", "value": "1"}]},
            ], "backendRefs": [backend_ref("echo-v2", 1)]},
        ]}),
    );
    let table = table_for(&world.backend("shop", "echo"), &[newer, older], &world);
    type Key = (String, u32, Option<String>, Option<String>, usize);
    let order: Vec<Key> = table
        .iter()
        .map(|e| {
            (
                e.route.clone(),
                e.rule,
                e.method.as_ref().and_then(|m| m.service.clone()),
                e.method.as_ref().and_then(|m| m.method.clone()),
                e.headers.len(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            // Longest service, then longest method.
            (
                "shop/a-newer".into(),
                0,
                Some("echo.Echo".into()),
                Some("Say".into()),
                0
            ),
            // Same service and method: more headers first.
            ("shop/a-newer".into(), 0, Some("echo.Echo".into()), None, 1),
            // Same everything: the older route first.
            ("shop/b-older".into(), 1, Some("echo.Echo".into()), None, 0),
            ("shop/a-newer".into(), 0, None, None, 1),
            ("shop/b-older".into(), 0, None, None, 0),
        ]
    );
    // Header names are compared lowercase, as gRPC metadata keys are.
    assert_eq!(table[3].headers[0].name, "x-tester");
}

#[test]
fn a_missing_backend_service_is_reported_and_the_others_take_its_share() {
    let world = World::default().balanced("shop", "echo").service("shop", "unbalanced");
    let route = route(
        "shop",
        "r",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [{"backendRefs": [
            backend_ref("echo", 50), backend_ref("missing", 50), backend_ref("unbalanced", 10)
        ]}]}),
    );
    let table = table_for(&world.backend("shop", "echo"), std::slice::from_ref(&route), &world);
    assert_eq!(weights(&table[0]), vec![("echo".into(), 50)]);

    let status = route_status(&route, &world, Timestamp::UNIX_EPOCH);
    let resolved = condition_of(&status, "ResolvedRefs");
    assert_eq!(
        (resolved.status.as_str(), resolved.reason.as_str()),
        ("False", "BackendNotFound")
    );
    assert!(
        resolved.message.contains("Service shop/missing not found"),
        "{}",
        resolved.message
    );
    assert!(
        resolved
            .message
            .contains("no GrpcBackend balances port 50051 of Service shop/unbalanced"),
        "{}",
        resolved.message
    );
    // Still attached: what resolves is routed.
    assert_eq!(condition_of(&status, "Accepted").status, "True");
}

#[test]
fn a_backend_in_another_namespace_needs_a_reference_grant() {
    let world = World::default()
        .balanced("shop", "echo")
        .balanced("canary", "echo-canary");
    let spec = json!({"parentRefs": [parent("echo")], "rules": [{"backendRefs": [
        backend_ref("echo", 90), {"name": "echo-canary", "namespace": "canary", "port": 50051, "weight": 10}
    ]}]});
    let route = route("shop", "r", 1, spec);

    let status = route_status(&route, &world, Timestamp::UNIX_EPOCH);
    let resolved = condition_of(&status, "ResolvedRefs");
    assert_eq!(
        (resolved.status.as_str(), resolved.reason.as_str()),
        ("False", "RefNotPermitted")
    );
    let table = table_for(&world.backend("shop", "echo"), std::slice::from_ref(&route), &world);
    assert_eq!(weights(&table[0]), vec![("echo".into(), 90)]);

    // A grant for another kind or namespace does not admit it; the right one does.
    let world = world
        .grant(
            "canary",
            json!({"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                   "to": [{"group": "", "kind": "Service"}]}),
        )
        .grant(
            "canary",
            json!({"from": [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "namespace": "other"}],
                   "to": [{"group": "", "kind": "Service"}]}),
        );
    assert_eq!(
        condition_of(&route_status(&route, &world, Timestamp::UNIX_EPOCH), "ResolvedRefs").reason,
        "RefNotPermitted"
    );
    let world = world.grant(
        "canary",
        json!({"from": [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "namespace": "shop"}],
               "to": [{"group": "", "kind": "Service", "name": "echo-canary"}]}),
    );
    assert_eq!(
        condition_of(&route_status(&route, &world, Timestamp::UNIX_EPOCH), "ResolvedRefs").status,
        "True"
    );
    let table = table_for(&world.backend("shop", "echo"), std::slice::from_ref(&route), &world);
    assert_eq!(table[0].backends[1].namespace.as_deref(), Some("canary"));
    assert_eq!(table[0].backends[0].namespace, None);
}

#[test]
fn rules_with_filters_or_bad_patterns_are_left_out_and_said_so() {
    let world = World::default().balanced("shop", "echo").balanced("shop", "echo-v2");
    let route = route(
        "shop",
        "r",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [
            {"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x", "port": 1}}}],
             "backendRefs": [backend_ref("echo-v2", 1)]},
            {"matches": [{"method": {"type": "RegularExpression", "service": "echo\\.(", "method": "Say"}}],
             "backendRefs": [backend_ref("echo-v2", 1)]},
            {"backendRefs": [backend_ref("echo", 1)]},
        ]}),
    );
    let table = table_for(&world.backend("shop", "echo"), std::slice::from_ref(&route), &world);
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].rule, 2);
    let status = route_status(&route, &world, Timestamp::UNIX_EPOCH);
    assert_eq!(condition_of(&status, "Accepted").status, "True");
    let partial = condition_of(&status, "PartiallyInvalid");
    assert_eq!(partial.status, "True");
    assert!(
        partial.message.contains("rule 0: filter RequestMirror"),
        "{}",
        partial.message
    );
    assert!(
        partial.message.contains("rule 1: invalid regular expression"),
        "{}",
        partial.message
    );

    // Nothing left: not accepted.
    let only_filtered = super::tests::route(
        "shop",
        "f",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [
            {"backendRefs": [{"name": "echo", "port": 50051, "filters": [{"type": "RequestHeaderModifier"}]}]}
        ]}),
    );
    let status = route_status(&only_filtered, &world, Timestamp::UNIX_EPOCH);
    let accepted = condition_of(&status, "Accepted");
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "UnsupportedValue")
    );
}

#[test]
fn other_controllers_entries_are_kept_and_parents_kubegrpc_does_not_balance_get_none() {
    let world = World::default().balanced("shop", "echo").service("shop", "plain");
    let mut route = (*route(
        "shop",
        "r",
        1,
        json!({"parentRefs": [parent("echo"), parent("plain"), {"name": "gw"}],
               "rules": [{"backendRefs": [backend_ref("echo", 1)]}]}),
    ))
    .clone();
    let theirs = RouteParentStatus {
        parent_ref: ParentReference {
            name: "gw".into(),
            ..Default::default()
        },
        controller_name: "example.com/gateway".into(),
        conditions: vec![],
    };
    route.status = Some(GrpcRouteStatus {
        parents: vec![theirs.clone()],
    });
    let status = route_status(&route, &world, Timestamp::UNIX_EPOCH);
    assert_eq!(status.parents.len(), 2, "{status:?}");
    assert_eq!(status.parents[0], theirs);
    assert_eq!(status.parents[1].parent_ref.name, "echo");
}

#[test]
fn a_consumer_route_and_a_port_no_grpcbackend_balances_are_not_accepted() {
    let world = World::default().balanced("shop", "echo");
    let consumer = route(
        "client-ns",
        "r",
        1,
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "namespace": "shop"}],
               "rules": [{"backendRefs": [{"name": "echo", "namespace": "shop", "port": 50051}]}]}),
    );
    let status = route_status(&consumer, &world, Timestamp::UNIX_EPOCH);
    assert_eq!(condition_of(&status, "Accepted").reason, "UnsupportedValue");
    assert!(table_for(&world.backend("shop", "echo"), &[consumer], &world).is_empty());

    let other_port = route(
        "shop",
        "p",
        1,
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 8080}],
               "rules": [{"backendRefs": [backend_ref("echo", 1)]}]}),
    );
    let status = route_status(&other_port, &world, Timestamp::UNIX_EPOCH);
    assert_eq!(condition_of(&status, "Accepted").reason, "NoMatchingParent");
    assert!(table_for(&world.backend("shop", "echo"), &[other_port], &world).is_empty());
}

#[test]
fn a_condition_keeps_its_transition_time_while_it_holds() {
    let world = World::default().balanced("shop", "echo");
    let mut route = (*route(
        "shop",
        "r",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [{"backendRefs": [backend_ref("echo", 1)]}]}),
    ))
    .clone();
    let first = route_status(&route, &world, Timestamp::from_second(100).unwrap());
    route.status = Some(first.clone());
    let again = route_status(&route, &world, Timestamp::from_second(200).unwrap());
    assert_eq!(again, first, "nothing changed: the same status, so nothing is written");
}

#[test]
fn the_routes_timeout_and_retry_annotations_go_in_every_entry_and_bad_ones_are_reported() {
    let world = World::default().balanced("shop", "echo");
    let mut annotated = (*route(
        "shop",
        "r",
        1,
        json!({"parentRefs": [parent("echo")], "rules": [
            {"matches": [{"method": {"service": "echo.Echo"}}], "backendRefs": [backend_ref("echo", 1)]},
            {"backendRefs": [backend_ref("echo", 1)]},
        ]}),
    ))
    .clone();
    annotated.metadata.annotations = Some(
        [
            (super::policy::TIMEOUT.to_string(), "200ms".to_string()),
            (super::policy::RETRY_ON.to_string(), "unavailable".to_string()),
            (super::policy::RETRY_LIMIT.to_string(), "seven".to_string()),
        ]
        .into(),
    );
    let annotated = Arc::new(annotated);
    let table = table_for(&world.backend("shop", "echo"), std::slice::from_ref(&annotated), &world);
    assert_eq!(table.len(), 2);
    for entry in &table {
        assert_eq!(
            entry.timeout.map(std::time::Duration::from),
            Some(std::time::Duration::from_millis(200))
        );
        assert_eq!(
            entry.retry.as_ref().map(|r| (r.codes.clone(), r.attempts)),
            Some((vec!["UNAVAILABLE".to_string()], 2))
        );
    }
    let status = route_status(&annotated, &world, Timestamp::UNIX_EPOCH);
    let policy = condition_of(&status, POLICY_CONDITION);
    assert_eq!(
        (policy.status.as_str(), policy.reason.as_str()),
        ("False", "InvalidAnnotation")
    );
    assert!(policy.message.contains("retry-limit"), "{}", policy.message);
    assert_eq!(condition_of(&status, "Accepted").status, "True");
}
