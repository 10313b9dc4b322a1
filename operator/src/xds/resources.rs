//! The xDS resources of one GrpcBackend, as a pure function of its status.
//!
//! A gRPC client dialing `xds:///NAME.NAMESPACE` asks for, in turn: the Listener `NAME.NAMESPACE`
//! (an `api_listener` whose HttpConnectionManager names its route configuration and ends with
//! the Router filter: grpc-go NACKs a Listener without it), the RouteConfiguration of that name
//! (one virtual host for that name, every path to the Cluster), the Cluster (type EDS, over
//! ADS), and the ClusterLoadAssignment (the endpoints). All four share the name.
//!
//! Weights: gRPC's `round_robin` under `xds_wrr_locality` honours locality weights and ignores
//! endpoint weights, and grpc-go NACKs a whole EDS response that holds an endpoint of weight 0.
//! So each usable endpoint is a locality of its own (zone kept, the address as sub-zone) whose
//! weight is the endpoint's; endpoints of weight 0 are left out; a terminating endpoint that
//! still answers is listed DRAINING (no new requests) with weight 1.

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
                address::Address as AddressKind, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action,
                route_action::ClusterSpecifier, route_match::PathSpecifier,
            },
        },
        extensions::filters::{
            http::router::v3::Router,
            network::http_connection_manager::v3::{
                HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
                http_filter::ConfigType,
            },
        },
    },
    google::protobuf::{Any, UInt32Value},
};
use envoy_types::util::pack_any;
use kubegrpc_crds::{GrpcBackendStatus, Health};

/// The type URLs of the four resource types, in the order a client asks for them.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const ALL: [&str; 4] = [LISTENER, ROUTE, CLUSTER, ENDPOINTS];
}

/// The xDS name of GrpcBackend `name` in `namespace`: what a client dials as
/// `xds:///NAME.NAMESPACE`.
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}")
}

/// The four resources of one GrpcBackend, each packed as an `Any`, by type URL.
pub fn backend_resources(resource_name: &str, status: Option<&GrpcBackendStatus>) -> [(&'static str, Any); 4] {
    [
        (type_url::LISTENER, pack_any(listener(resource_name))),
        (type_url::ROUTE, pack_any(route(resource_name))),
        (type_url::CLUSTER, pack_any(cluster(resource_name))),
        (type_url::ENDPOINTS, pack_any(endpoints(resource_name, status))),
    ]
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn listener(name: &str) -> Listener {
    let manager = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.into(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

fn route(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: name.into(),
            domains: vec![name.into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(name.into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        // gRPC clients turn ROUND_ROBIN into xds_wrr_locality over round_robin: locality
        // weights steer them.
        lb_policy: LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

fn endpoints(name: &str, status: Option<&GrpcBackendStatus>) -> ClusterLoadAssignment {
    let localities = status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            let draining = e.terminating && e.serving && e.health == Health::Serving;
            let (health, weight) = if e.is_usable() {
                (HealthStatus::Healthy, e.weight)
            } else if draining {
                (HealthStatus::Draining, 1)
            } else {
                return None;
            };
            let port = u32::try_from(e.port).ok()?;
            Some(LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: e.zone.clone().unwrap_or_default(),
                    sub_zone: format!("{}:{}", e.address, e.port),
                    ..Default::default()
                }),
                lb_endpoints: vec![LbEndpoint {
                    health_status: health as i32,
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                            address: Some(AddressKind::SocketAddress(SocketAddress {
                                address: e.address.clone(),
                                port_specifier: Some(PortSpecifier::PortValue(port)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                load_balancing_weight: Some(UInt32Value { value: weight }),
                ..Default::default()
            })
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: localities,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use kubegrpc_crds::EndpointStatus;
    use prost::Message;

    use super::*;

    fn entry(address: &str, weight: u32, health: Health, terminating: bool) -> EndpointStatus {
        EndpointStatus {
            address: address.into(),
            port: 50051,
            weight,
            health,
            serving: true,
            terminating,
            zone: Some("zone-a".into()),
            for_zones: Vec::new(),
            pod: None,
            target_ref: None,
            reason: None,
            last_transition_time: None,
        }
    }

    fn decode<T: Message + Default>(any: &Any) -> T {
        T::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn every_resource_is_named_name_dot_namespace_and_chains_to_the_next() {
        let name = resource_name("shop", "echo");
        assert_eq!(name, "echo.shop");
        let [(l, listener), (r, route), (c, cluster), (e, endpoints)] = backend_resources(&name, None);
        assert_eq!([l, r, c, e], type_url::ALL);
        let listener: Listener = decode(&listener);
        assert_eq!(listener.name, name);
        let manager: HttpConnectionManager = decode(listener.api_listener.unwrap().api_listener.as_ref().unwrap());
        let Some(RouteSpecifier::Rds(rds)) = manager.route_specifier else {
            panic!("RDS expected")
        };
        assert_eq!(rds.route_config_name, name);
        assert_eq!(manager.http_filters.last().unwrap().name, "envoy.filters.http.router");
        let route: RouteConfiguration = decode(&route);
        assert_eq!(route.virtual_hosts[0].domains, std::slice::from_ref(&name));
        let Some(Action::Route(action)) = &route.virtual_hosts[0].routes[0].action else {
            panic!("a route action expected")
        };
        assert_eq!(action.cluster_specifier, Some(ClusterSpecifier::Cluster(name.clone())));
        let cluster: Cluster = decode(&cluster);
        assert_eq!(cluster.eds_cluster_config.unwrap().service_name, name);
        let endpoints: ClusterLoadAssignment = decode(&endpoints);
        assert_eq!(
            (endpoints.cluster_name.as_str(), endpoints.endpoints.len()),
            (name.as_str(), 0)
        );
    }

    #[test]
    fn each_usable_endpoint_is_a_locality_weighted_as_the_endpoint_and_weight_zero_is_left_out() {
        let status = GrpcBackendStatus {
            endpoints: vec![
                entry("10.0.0.1", 100, Health::Serving, false),
                entry("10.0.0.2", 300, Health::Serving, false),
                entry("10.0.0.3", 0, Health::NotServing, false),
                entry("10.0.0.4", 0, Health::Serving, true),
                entry("10.0.0.5", 0, Health::Serving, false),
            ],
            ..Default::default()
        };
        let [.., (_, endpoints)] = backend_resources("echo.shop", Some(&status));
        let endpoints: ClusterLoadAssignment = decode(&endpoints);
        let listed: Vec<(String, u32, i32)> = endpoints
            .endpoints
            .iter()
            .map(|l| {
                (
                    l.locality.as_ref().unwrap().sub_zone.clone(),
                    l.load_balancing_weight.unwrap().value,
                    l.lb_endpoints[0].health_status,
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("10.0.0.1:50051".into(), 100, HealthStatus::Healthy as i32),
                ("10.0.0.2:50051".into(), 300, HealthStatus::Healthy as i32),
                ("10.0.0.4:50051".into(), 1, HealthStatus::Draining as i32),
            ]
        );
        assert!(
            endpoints
                .endpoints
                .iter()
                .all(|l| l.locality.as_ref().unwrap().zone == "zone-a")
        );
    }
}
