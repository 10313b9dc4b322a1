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
//!
//! Slow start: xDS clients cannot ramp a new endpoint themselves (their weights are the
//! locality weights they are given), so the server ramps for them. While an endpoint is within
//! `slowStartWindow` of its `lastTransitionTime`, its locality weight is its weight times the
//! curve's share rounded up to the next 10% ([`ramp_step`]): at most ten changes, each a push,
//! per ramp. The weights then are `weight x percent` (100 for the endpoints not ramping),
//! scaled down together when their sum would not fit in 32 bits (gRPC clients refuse an EDS
//! response whose locality weights add up to more).

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
use std::time::{Duration, SystemTime};

use envoy_types::util::pack_any;
use kubegrpc_crds::{EndpointStatus, GrpcBackendStatus, Health, slow_start::SlowStart};

/// The type URLs of the four resource types, in the order a client asks for them.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const ALL: [&str; 4] = [LISTENER, ROUTE, CLUSTER, ENDPOINTS];
}

/// Scales `weights` down together, keeping each above 0 at 1 or more, until their sum fits in
/// a `u32`.
fn fit_in_u32_total(weights: &mut [u64]) {
    let limit = u64::from(u32::MAX);
    loop {
        let total: u64 = weights.iter().sum();
        if total <= limit {
            return;
        }
        let divisor = total.div_ceil(limit).max(2);
        let mut moved = false;
        for weight in weights.iter_mut().filter(|w| **w > 1) {
            *weight = (*weight / divisor).max(1);
            moved = true;
        }
        if !moved {
            return; // more endpoints than a u32 counts: nothing a client could take anyway
        }
    }
}

/// The xDS name of GrpcBackend `name` in `namespace`: what a client dials as
/// `xds:///NAME.NAMESPACE`.
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}")
}

/// The four resources of one GrpcBackend, each packed as an `Any`, by type URL, at wall time
/// `now` (slow start ramps with it).
pub fn backend_resources(
    resource_name: &str,
    status: Option<&GrpcBackendStatus>,
    slow_start: &SlowStart,
    now: SystemTime,
) -> [(&'static str, Any); 4] {
    [
        (type_url::LISTENER, pack_any(listener(resource_name))),
        (type_url::ROUTE, pack_any(route(resource_name))),
        (type_url::CLUSTER, pack_any(cluster(resource_name))),
        (
            type_url::ENDPOINTS,
            pack_any(endpoints(resource_name, status, slow_start, now)),
        ),
    ]
}

/// The slow-start share, in percent, that the server gives endpoint `endpoint` at `now`: the
/// curve's share rounded up to a multiple of 10, or `None` when it does not ramp (slow start
/// off, not usable, no transition time, or past the window).
pub fn ramp_step(endpoint: &EndpointStatus, slow_start: &SlowStart, now: SystemTime) -> Option<u32> {
    if !slow_start.is_on() || !endpoint.is_usable() {
        return None;
    }
    let since = SystemTime::from(endpoint.last_transition_time.as_ref()?.0);
    // A transition time in the future counts as now, as clients count it.
    let elapsed = now.duration_since(since).unwrap_or(Duration::ZERO);
    let percent = slow_start.percent(elapsed)?;
    Some(percent.div_ceil(10).saturating_mul(10).clamp(10, 100)).filter(|&step| step < 100)
}

/// Whether some endpoint of `status` ramps at `now` (the server must then look again within
/// [`SlowStart::tick`]).
pub fn ramping(status: Option<&GrpcBackendStatus>, slow_start: &SlowStart, now: SystemTime) -> bool {
    status
        .iter()
        .flat_map(|s| &s.endpoints)
        .any(|e| ramp_step(e, slow_start, now).is_some())
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

fn endpoints(
    name: &str,
    status: Option<&GrpcBackendStatus>,
    slow_start: &SlowStart,
    now: SystemTime,
) -> ClusterLoadAssignment {
    let listed: Vec<(&EndpointStatus, HealthStatus, u64)> = status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            let draining = e.terminating && e.serving && e.health == Health::Serving;
            if e.is_usable() {
                Some((e, HealthStatus::Healthy, u64::from(e.weight)))
            } else if draining {
                Some((e, HealthStatus::Draining, 1))
            } else {
                None
            }
        })
        .collect();
    let steps: Vec<Option<u32>> = listed.iter().map(|(e, ..)| ramp_step(e, slow_start, now)).collect();
    let ramps = steps.iter().any(Option::is_some);
    let mut weights: Vec<u64> = listed
        .iter()
        .zip(&steps)
        .map(|((_, _, weight), step)| match ramps {
            true => weight * u64::from(step.unwrap_or(100)),
            false => *weight,
        })
        .collect();
    fit_in_u32_total(&mut weights);
    let localities = listed
        .iter()
        .zip(weights)
        .filter_map(|(&(e, health, _), weight)| {
            let port = u32::try_from(e.port).ok()?;
            let weight = u32::try_from(weight).ok()?;
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
    use std::collections::BTreeSet;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
            fail_open: false,
        }
    }

    fn decode<T: Message + Default>(any: &Any) -> T {
        T::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn every_resource_is_named_name_dot_namespace_and_chains_to_the_next() {
        let name = resource_name("shop", "echo");
        assert_eq!(name, "echo.shop");
        let [(l, listener), (r, route), (c, cluster), (e, endpoints)] =
            backend_resources(&name, None, &SlowStart::default(), SystemTime::now());
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
        let [.., (_, endpoints)] =
            backend_resources("echo.shop", Some(&status), &SlowStart::default(), SystemTime::now());
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

    #[test]
    fn endpoints_failed_open_to_are_pushed_healthy_so_no_client_gets_an_empty_list() {
        // The operator cannot reach its backends: every entry NotServing, failed open to.
        let failed_open = |address: &str| EndpointStatus {
            fail_open: true,
            ..entry(address, 100, Health::NotServing, false)
        };
        let status = GrpcBackendStatus {
            endpoints: vec![failed_open("10.0.0.1"), failed_open("10.0.0.2")],
            ..Default::default()
        };
        let [.., (_, endpoints)] =
            backend_resources("echo.shop", Some(&status), &SlowStart::default(), SystemTime::now());
        let endpoints: ClusterLoadAssignment = decode(&endpoints);
        let listed: Vec<(u32, i32)> = endpoints
            .endpoints
            .iter()
            .map(|l| (l.load_balancing_weight.unwrap().value, l.lb_endpoints[0].health_status))
            .collect();
        assert_eq!(listed, [(100, HealthStatus::Healthy as i32); 2]);
    }

    fn ramp_settings(window_secs: u64) -> SlowStart {
        SlowStart {
            window: Duration::from_secs(window_secs),
            ..SlowStart::default()
        }
    }

    fn locality_weights(status: &GrpcBackendStatus, slow_start: &SlowStart, now: SystemTime) -> Vec<u32> {
        let [.., (_, endpoints)] = backend_resources("echo.shop", Some(status), slow_start, now);
        decode::<ClusterLoadAssignment>(&endpoints)
            .endpoints
            .iter()
            .map(|l| l.load_balancing_weight.unwrap().value)
            .collect()
    }

    #[test]
    fn a_ramping_endpoint_gets_its_weight_in_steps_of_ten_percent_until_the_window_ends() {
        let now = SystemTime::now();
        let since = now - Duration::from_secs(3);
        let mut new = entry("10.0.0.3", 100, Health::Serving, false);
        new.last_transition_time = Some(Time(since.try_into().unwrap()));
        let status = GrpcBackendStatus {
            endpoints: vec![
                entry("10.0.0.1", 100, Health::Serving, false),
                entry("10.0.0.2", 300, Health::Serving, false),
                new,
            ],
            ..Default::default()
        };
        let linear_10s = ramp_settings(10);
        // 3 s into 10 s, linear: 30%.
        assert_eq!(locality_weights(&status, &linear_10s, now), [10_000, 30_000, 3_000]);
        // 3.5 s: 35% rounds up to the 40% step; 3.9 s still the same step (no new push).
        let at = |secs: f64| since + Duration::from_secs_f64(secs);
        assert_eq!(locality_weights(&status, &linear_10s, at(3.5)), [10_000, 30_000, 4_000]);
        assert_eq!(
            locality_weights(&status, &linear_10s, at(3.5)),
            locality_weights(&status, &linear_10s, at(3.9))
        );
        // The floor: min 10% at the start; a transition in the future counts as now.
        assert_eq!(
            locality_weights(&status, &linear_10s, since - Duration::from_secs(5)),
            [10_000, 30_000, 1_000]
        );
        // Past 90% the step is 100%: the plain weights again, as after the window and when off.
        let plain = [100, 300, 100];
        assert_eq!(locality_weights(&status, &linear_10s, at(9.5)), plain);
        assert_eq!(locality_weights(&status, &linear_10s, at(10.0)), plain);
        assert_eq!(locality_weights(&status, &SlowStart::default(), now), plain);
        assert!(ramping(Some(&status), &linear_10s, now));
        assert!(!ramping(Some(&status), &linear_10s, at(9.5)));
        // Distinct steps over the window: at most ten pushes per ramp.
        let steps: BTreeSet<Vec<u32>> = (0..=1000)
            .map(|ms| locality_weights(&status, &linear_10s, at(f64::from(ms) / 100.0)))
            .collect();
        assert!(steps.len() <= 10, "{} distinct weight sets", steps.len());
    }

    #[test]
    fn weights_whose_sum_overflows_32_bits_are_scaled_down_together() {
        let mut weights = vec![10_000 * 100; 5000];
        weights.push(100);
        weights.push(0);
        fit_in_u32_total(&mut weights);
        let total: u64 = weights.iter().sum();
        assert!(u32::try_from(total).is_ok(), "{total}");
        assert!(weights[0] > 1000 * weights[5000], "the ratio is kept");
        assert_eq!(
            (weights[5000] >= 1, weights[5001]),
            (true, 0),
            "above 0 stays above 0; 0 stays 0"
        );
    }
}
