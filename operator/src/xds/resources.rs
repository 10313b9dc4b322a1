//! The xDS resources of one GrpcBackend, as a pure function of its status.
//!
//! A gRPC client dialing `xds:///NAME.NAMESPACE` asks for, in turn: the Listener `NAME.NAMESPACE`
//! (an `api_listener` whose HttpConnectionManager names its route configuration and ends with
//! the Router filter: grpc-go NACKs a Listener without it), the RouteConfiguration of that name
//! (one virtual host for that name, every path to the Cluster, or the routes of the
//! GrpcBackend's routing table: [`super::routes`]), the Cluster (type EDS, over
//! ADS), and the ClusterLoadAssignment (the endpoints). All four share the name.
//!
//! Weights: gRPC's `round_robin` under `xds_wrr_locality` honours locality weights and ignores
//! endpoint weights, and grpc-go NACKs a whole EDS response that holds an endpoint of weight 0.
//! So each usable endpoint is a locality of its own (zone kept, the address as sub-zone) whose
//! weight is the endpoint's; endpoints of weight 0 are left out; a terminating endpoint that
//! still answers is listed DRAINING (no new requests) with weight 1.
//!
//! TLS (gRFC A29): the Cluster of a GrpcBackend with `spec.tls` carries a `transport_socket`
//! with an `UpstreamTlsContext`. Its roots are the certificate provider instance
//! [`ROOTS_INSTANCE`] of the client's bootstrap (a `file_watcher` plugin holding the same CA
//! bundle as the GrpcBackend's ConfigMap: the xDS server hands out names, never keys or
//! certificates), its identity for mutual TLS the instance [`IDENTITY_INSTANCE`] when the
//! server is told to name one (a client whose bootstrap lacks a named instance fails the
//! Cluster, so naming it is opt-in), and the server certificates must carry the GrpcBackend's
//! server name (`spec.tls.serverName`, default `SERVICE.NAMESPACE.svc`) as a DNS SAN: matched
//! exactly, since Pod IPs are rarely in certificates. The name also goes in `sni` (grpc-go uses
//! it with `GRPC_EXPERIMENTAL_XDS_SNI=true`, gRFC A101).
//!
//! Slow start: xDS clients cannot ramp a new endpoint themselves (their weights are the
//! locality weights they are given), so the server ramps for them. While an endpoint is within
//! `slowStartWindow` of its `lastTransitionTime`, its locality weight is its weight times the
//! curve's share rounded up to the next 10% ([`ramp_step`]): at most ten changes, each a push,
//! per ramp. The weights then are `weight x percent` (100 for the endpoints not ramping),
//! scaled down together when their sum would not fit in 32 bits (gRPC clients refuse an EDS
//! response whose locality weights add up to more).
//!
//! Outlier detection (gRFC A50): the Cluster carries the GrpcBackend's `spec.outlierDetection`
//! (its defaults when unset) as `outlier_detection`, the failure-percentage rule only, so that
//! xDS clients eject on the evidence of their own calls as the Rust client does; none when it
//! is off.

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster, OutlierDetection as ClusterOutlierDetection,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
                TransportSocket, address::Address as AddressKind, config_source::ConfigSourceSpecifier,
                socket_address::PortSpecifier, transport_socket,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::RouteConfiguration,
        },
        extensions::{
            filters::{
                http::router::v3::Router,
                network::http_connection_manager::v3::{
                    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
                    http_filter::ConfigType,
                },
            },
            transport_sockets::tls::v3::{
                CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
                SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context::ValidationContextType,
                subject_alt_name_matcher::SanType,
            },
        },
        r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
    },
    google::protobuf::{Any, Duration as ProtoDuration, UInt32Value},
};
use std::time::{Duration, SystemTime};

use envoy_types::util::pack_any;
use kubegrpc_crds::{EndpointStatus, GrpcBackendStatus, Health, OutlierDetection, slow_start::SlowStart};

/// The type URLs of the four resource types, in the order a client asks for them.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const ALL: [&str; 4] = [LISTENER, ROUTE, CLUSTER, ENDPOINTS];
}

/// The certificate provider instance, in the client's bootstrap, that holds the roots the
/// backends' certificates are verified against.
pub const ROOTS_INSTANCE: &str = "kubegrpc-backends";
/// The certificate provider instance, in the client's bootstrap, that holds the client's own
/// certificate for backends that require one (named only when [`ClusterTls::client_identity`]).
pub const IDENTITY_INSTANCE: &str = "kubegrpc-identity";
/// The transport socket name gRPC clients require for an `UpstreamTlsContext`.
const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// TLS to a GrpcBackend's backends, as its Cluster tells xDS clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterTls {
    /// The name every backend certificate must carry as a DNS SAN (the GrpcBackend's
    /// `tls_server_name`).
    pub server_name: String,
    /// Name [`IDENTITY_INSTANCE`] for the client's certificate (mutual TLS).
    pub client_identity: bool,
}

/// What a GrpcBackend's resources are made from besides its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendSettings {
    pub slow_start: SlowStart,
    /// `None`: plaintext.
    pub tls: Option<ClusterTls>,
    /// The GrpcBackend's `spec.outlierDetection` (its defaults when unset), for the Cluster.
    pub outlier_detection: OutlierDetection,
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
    settings: &BackendSettings,
    now: SystemTime,
) -> [(&'static str, Any); 4] {
    [
        (type_url::LISTENER, pack_any(listener(resource_name))),
        (type_url::ROUTE, pack_any(route(resource_name, status))),
        (type_url::CLUSTER, pack_any(cluster(resource_name, settings))),
        (
            type_url::ENDPOINTS,
            pack_any(endpoints(resource_name, status, &settings.slow_start, now)),
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

/// The GrpcBackend's routing table as xDS routes (see [`super::routes`]); none: every call to its
/// own Cluster.
fn route(name: &str, status: Option<&GrpcBackendStatus>) -> RouteConfiguration {
    super::routes::route_configuration(name, status.map_or(&[], |s| s.routes.as_slice()))
}

fn cluster(name: &str, settings: &BackendSettings) -> Cluster {
    Cluster {
        transport_socket: settings.tls.as_ref().map(|tls| TransportSocket {
            name: TLS_TRANSPORT_SOCKET.into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
                upstream_tls_context(tls),
            ))),
        }),
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        // gRPC clients turn ROUND_ROBIN into xds_wrr_locality over round_robin: locality
        // weights steer them.
        lb_policy: LbPolicy::RoundRobin as i32,
        outlier_detection: cluster_outlier_detection(&settings.outlier_detection),
        ..Default::default()
    }
}

/// gRFC A50's `outlier_detection` of a Cluster, from the GrpcBackend's settings: the failure
/// percentage rule, enforced always (100) or never (0); success-rate ejection never (its
/// `enforcing_success_rate` would default to 100). `None` when outlier detection is off.
///
/// gRPC clients read nothing else; the consecutive-failure rules gRPC ignores are set to
/// never-enforce too, so that an Envoy reading this Cluster would eject on the same evidence.
/// The Rust client's `consecutiveConnectFailures` has no field here: an xDS client already
/// avoids an endpoint it cannot connect to.
fn cluster_outlier_detection(settings: &OutlierDetection) -> Option<ClusterOutlierDetection> {
    if !settings.enabled {
        return None;
    }
    let count = |value: u32| Some(UInt32Value { value });
    let rule = &settings.failure_percentage;
    let enforced = if settings.failure_percentage().is_some() {
        100
    } else {
        0
    };
    Some(ClusterOutlierDetection {
        interval: Some(proto_duration(settings.interval())),
        base_ejection_time: Some(proto_duration(settings.base_ejection_time())),
        max_ejection_time: Some(proto_duration(settings.max_ejection_time())),
        max_ejection_percent: count(u32::from(settings.max_ejection_percent())),
        enforcing_success_rate: count(0),
        failure_percentage_threshold: count(u32::from(rule.threshold())),
        enforcing_failure_percentage: count(enforced),
        failure_percentage_minimum_hosts: count(rule.minimum_hosts()),
        failure_percentage_request_volume: count(rule.request_volume()),
        enforcing_consecutive_5xx: count(0),
        enforcing_consecutive_gateway_failure: count(0),
        enforcing_consecutive_local_origin_failure: count(0),
        enforcing_local_origin_success_rate: count(0),
        enforcing_failure_percentage_local_origin: count(0),
        ..Default::default()
    })
}

/// A protobuf Duration (what admission lets through is far below its limits).
fn proto_duration(duration: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// The `UpstreamTlsContext` of gRFC A29 in its current fields (gRPC reads the
/// `ca_certificate_provider_instance` of a `validation_context`): roots and identity by
/// certificate provider instance, the server name matched exactly among the DNS SANs.
fn upstream_tls_context(tls: &ClusterTls) -> UpstreamTlsContext {
    let instance = |name: &str| CertificateProviderPluginInstance {
        instance_name: name.into(),
        certificate_name: String::new(),
    };
    let exact = StringMatcher {
        match_pattern: Some(MatchPattern::Exact(tls.server_name.clone())),
        ..Default::default()
    };
    // grpc-go reads the older `match_subject_alt_names` only, Envoy prefers the typed one when
    // both are set: both say the same.
    #[allow(deprecated)]
    let validation = CertificateValidationContext {
        ca_certificate_provider_instance: Some(instance(ROOTS_INSTANCE)),
        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
            san_type: SanType::Dns as i32,
            matcher: Some(exact.clone()),
            ..Default::default()
        }],
        match_subject_alt_names: vec![exact],
        ..Default::default()
    };
    UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_provider_instance: tls.client_identity.then(|| instance(IDENTITY_INSTANCE)),
            validation_context_type: Some(ValidationContextType::ValidationContext(validation)),
            alpn_protocols: vec!["h2".into()],
            ..Default::default()
        }),
        sni: tls.server_name.clone(),
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

    use envoy_types::pb::envoy::config::route::v3::{route::Action, route_action::ClusterSpecifier};
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
            backend_resources(&name, None, &BackendSettings::default(), SystemTime::now());
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
        let [.., (_, endpoints)] = backend_resources(
            "echo.shop",
            Some(&status),
            &BackendSettings::default(),
            SystemTime::now(),
        );
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
        let [.., (_, endpoints)] = backend_resources(
            "echo.shop",
            Some(&status),
            &BackendSettings::default(),
            SystemTime::now(),
        );
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
        let settings = BackendSettings {
            slow_start: *slow_start,
            ..BackendSettings::default()
        };
        let [.., (_, endpoints)] = backend_resources("echo.shop", Some(status), &settings, now);
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

    fn cluster_of(settings: &BackendSettings) -> Cluster {
        let [_, _, (_, cluster), _] = backend_resources("echo.shop", None, settings, SystemTime::now());
        decode(&cluster)
    }

    fn tls_settings(client_identity: bool) -> BackendSettings {
        BackendSettings {
            tls: Some(ClusterTls {
                server_name: "echo.shop.svc".into(),
                client_identity,
            }),
            ..BackendSettings::default()
        }
    }

    /// The UpstreamTlsContext of a Cluster, as gRPC clients find it (gRFC A29).
    fn upstream_tls_of(cluster: &Cluster) -> UpstreamTlsContext {
        let socket = cluster.transport_socket.as_ref().expect("a transport socket");
        assert_eq!(socket.name, "envoy.transport_sockets.tls", "the name gRPC requires");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            panic!("a typed config expected")
        };
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        );
        decode(any)
    }

    #[test]
    fn a_plaintext_backends_cluster_has_no_transport_socket() {
        let cluster = cluster_of(&BackendSettings::default());
        assert_eq!(cluster.transport_socket, None);
        assert!(cluster.transport_socket_matches.is_empty(), "gRPC NACKs these");
    }

    #[test]
    #[allow(deprecated)]
    fn a_tls_backends_cluster_names_the_roots_instance_and_matches_the_server_name_exactly() {
        let cluster = cluster_of(&tls_settings(false));
        let upstream = upstream_tls_of(&cluster);
        assert_eq!(upstream.sni, "echo.shop.svc");
        let common = upstream.common_tls_context.expect("a common TLS context");
        assert_eq!(common.tls_certificate_provider_instance, None, "no client certificate");
        assert!(common.tls_certificates.is_empty() && common.tls_params.is_none());
        let Some(ValidationContextType::ValidationContext(validation)) = common.validation_context_type else {
            panic!("a validation context expected")
        };
        let roots = validation.ca_certificate_provider_instance.expect("the roots instance");
        assert_eq!(roots.instance_name, ROOTS_INSTANCE);
        assert_eq!(
            roots.instance_name, "kubegrpc-backends",
            "the name the README documents"
        );
        let exact = Some(MatchPattern::Exact("echo.shop.svc".into()));
        assert_eq!(
            validation
                .match_subject_alt_names
                .iter()
                .map(|m| (m.match_pattern.clone(), m.ignore_case))
                .collect::<Vec<_>>(),
            [(exact.clone(), false)],
            "what grpc-go reads"
        );
        assert_eq!(validation.match_typed_subject_alt_names.len(), 1);
        let typed = &validation.match_typed_subject_alt_names[0];
        assert_eq!(typed.san_type, SanType::Dns as i32);
        assert_eq!(typed.matcher.as_ref().map(|m| m.match_pattern.clone()), Some(exact));
        // Discovery is unchanged by TLS.
        assert_eq!(cluster.eds_cluster_config.unwrap().service_name, "echo.shop");
    }

    #[test]
    fn with_client_identity_a_tls_cluster_names_the_identity_instance() {
        let upstream = upstream_tls_of(&cluster_of(&tls_settings(true)));
        let identity = upstream
            .common_tls_context
            .and_then(|c| c.tls_certificate_provider_instance)
            .expect("the identity instance");
        assert_eq!(identity.instance_name, IDENTITY_INSTANCE);
        assert_eq!(identity.instance_name, "kubegrpc-identity");
    }

    /// The Cluster of a GrpcBackend whose `spec.outlierDetection` is `od` (JSON, as written).
    fn cluster_with_outlier_detection(od: serde_json::Value) -> Cluster {
        let spec: kubegrpc_crds::GrpcBackendSpec =
            serde_json::from_value(serde_json::json!({"service": "echo", "port": "grpc", "outlierDetection": od}))
                .expect("a valid spec");
        cluster_of(&BackendSettings {
            outlier_detection: spec.outlier_detection(),
            ..BackendSettings::default()
        })
    }

    fn seconds(seconds: i64, nanos: i32) -> Option<ProtoDuration> {
        Some(ProtoDuration { seconds, nanos })
    }

    fn count(value: u32) -> Option<UInt32Value> {
        Some(UInt32Value { value })
    }

    #[test]
    fn an_unset_outlier_detection_is_published_with_grfc_a50_defaults_and_failure_percentage_only() {
        let od = cluster_of(&BackendSettings::default())
            .outlier_detection
            .expect("on by default, as for the Rust client");
        assert_eq!(od.interval, seconds(10, 0));
        assert_eq!(od.base_ejection_time, seconds(30, 0));
        assert_eq!(od.max_ejection_time, seconds(300, 0));
        assert_eq!(od.max_ejection_percent, count(10));
        assert_eq!(od.failure_percentage_threshold, count(85));
        assert_eq!(od.enforcing_failure_percentage, count(100));
        assert_eq!(od.failure_percentage_minimum_hosts, count(5));
        assert_eq!(od.failure_percentage_request_volume, count(50));
        // Unset, enforcing_success_rate means 100 to gRPC (gRFC A50): it must say 0.
        assert_eq!(od.enforcing_success_rate, count(0));
        assert_eq!(od.enforcing_consecutive_5xx, count(0), "Envoy's default is 100");
    }

    #[test]
    fn every_outlier_detection_setting_maps_to_its_cluster_field() {
        let od = cluster_with_outlier_detection(serde_json::json!({
            "interval": "1500ms",
            "baseEjectionTime": "3s",
            "maxEjectionTime": "1h",
            "maxEjectionPercent": 50,
            "consecutiveConnectFailures": 2,
            "failurePercentage": {"threshold": 60, "minimumHosts": 3, "requestVolume": 10},
        }))
        .outlier_detection
        .expect("on");
        let expected = ClusterOutlierDetection {
            interval: seconds(1, 500_000_000),
            base_ejection_time: seconds(3, 0),
            max_ejection_time: seconds(3600, 0),
            max_ejection_percent: count(50),
            enforcing_success_rate: count(0),
            failure_percentage_threshold: count(60),
            enforcing_failure_percentage: count(100),
            failure_percentage_minimum_hosts: count(3),
            failure_percentage_request_volume: count(10),
            enforcing_consecutive_5xx: count(0),
            enforcing_consecutive_gateway_failure: count(0),
            enforcing_consecutive_local_origin_failure: count(0),
            enforcing_local_origin_success_rate: count(0),
            enforcing_failure_percentage_local_origin: count(0),
            // consecutiveConnectFailures is the Rust client's: no field carries it.
            ..Default::default()
        };
        assert_eq!(od, expected);
    }

    #[test]
    fn outlier_detection_off_leaves_the_cluster_without_it_and_failure_percentage_off_enforces_nothing() {
        assert_eq!(
            cluster_with_outlier_detection(serde_json::json!({"enabled": false})).outlier_detection,
            None
        );
        let od = cluster_with_outlier_detection(serde_json::json!({"failurePercentage": {"enabled": false}}))
            .outlier_detection
            .expect("still published");
        assert_eq!(
            (od.enforcing_failure_percentage, od.enforcing_success_rate),
            (count(0), count(0)),
            "no rule a gRPC client applies"
        );
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
