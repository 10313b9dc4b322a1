//! Discovery, as pure functions: from a Service and its EndpointSlices to the set of endpoints
//! that carry the GrpcBackend's port.
//!
//! The EndpointSlice API's rules are followed exactly: `ready` and `serving` default to true
//! and `terminating` to false when unset; only the first address of an endpoint is used (the
//! API says the addresses are fungible); an endpoint listed in several slices (the controller
//! moves endpoints between slices) appears once.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kubegrpc_crds::{PortRef, TargetRef};

/// The label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service port a GrpcBackend's `spec.port` refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPort {
    /// The Service port's name; EndpointSlices name their ports after it ("" when unnamed).
    pub name: String,
    /// The Service port's number.
    pub port: i32,
}

/// Why a GrpcBackend's port cannot be resolved on its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortNotFound {
    pub wanted: PortRef,
    /// The Service's TCP ports, as `name/number`, for the message a person reads.
    pub available: Vec<String>,
}

impl fmt::Display for PortNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wanted = match &self.wanted {
            PortRef::Number(number) => format!("port number {number}"),
            PortRef::Name(name) => format!("port named {name:?}"),
        };
        if self.available.is_empty() {
            write!(f, "the Service has no TCP {wanted} (it has no TCP ports)")
        } else {
            write!(
                f,
                "the Service has no TCP {wanted} (its TCP ports: {})",
                self.available.join(", ")
            )
        }
    }
}

/// Finds the Service port that `wanted` names: by Service port number or by Service port name.
pub fn resolve_port(wanted: &PortRef, service: &Service) -> Result<ResolvedPort, PortNotFound> {
    let ports = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default();
    let tcp_ports = ports.iter().filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
    for port in tcp_ports.clone() {
        let name = port.name.clone().unwrap_or_default();
        let matches = match wanted {
            PortRef::Number(number) => port.port == *number,
            PortRef::Name(wanted_name) => &name == wanted_name,
        };
        if matches {
            return Ok(ResolvedPort { name, port: port.port });
        }
    }
    Err(PortNotFound {
        wanted: wanted.clone(),
        available: tcp_ports
            .map(|p| match p.name.as_deref() {
                Some(name) if !name.is_empty() => format!("{name}/{}", p.port),
                _ => p.port.to_string(),
            })
            .collect(),
    })
}

/// One endpoint (address:port) with its Kubernetes state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredEndpoint {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    /// The slice's `hints.forZones` (set by the EndpointSlice controller for a Service's
    /// `trafficDistribution`), sorted.
    pub for_zones: Vec<String>,
    /// The Pod behind the endpoint, when its `targetRef` is a Pod.
    pub pod: Option<String>,
    /// The object behind the endpoint when it is not a Pod.
    pub target_ref: Option<TargetRef>,
}

impl DiscoveredEndpoint {
    /// Whether Kubernetes would send new traffic here: serving and not terminating.
    pub fn kubernetes_ready(&self) -> bool {
        self.serving && !self.terminating
    }

    /// Preference between two entries for one address found in several slices: the one
    /// Kubernetes thinks best (ready, then serving, then not terminating) wins.
    fn rank(&self) -> (bool, bool, bool) {
        (self.ready, self.serving, !self.terminating)
    }
}

/// Something in the slices that could not be used, for a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedEndpoint {
    pub slice: String,
    pub address: String,
    pub why: &'static str,
}

/// The endpoints of a Service that carry `port`, sorted by address then port, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<DiscoveredEndpoint>,
    pub skipped: Vec<SkippedEndpoint>,
}

/// Joins the slices of one Service into the endpoints that carry `port`.
pub fn endpoints_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &ResolvedPort,
) -> EndpointSet {
    // Sorted by slice name so that the outcome does not depend on the order slices arrive in.
    let mut slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mut by_address: BTreeMap<SocketAddr, DiscoveredEndpoint> = BTreeMap::new();
    let mut skipped = Vec::new();
    for slice in slices {
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let Some(port_number) = slice_port(slice, &port.name) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            let ip: IpAddr = match first.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    skipped.push(SkippedEndpoint {
                        slice: slice_name.clone(),
                        address: first.clone(),
                        why: "not an IP address",
                    });
                    continue;
                }
            };
            let conditions = endpoint.conditions.as_ref();
            let target = endpoint
                .target_ref
                .as_ref()
                .and_then(|r| Some((r.kind.as_deref()?, r.name.clone()?)));
            let (pod, target_ref) = match target {
                Some(("Pod", name)) => (Some(name), None),
                Some((kind, name)) => (
                    None,
                    Some(TargetRef {
                        kind: kind.to_string(),
                        name,
                    }),
                ),
                None => (None, None),
            };
            let discovered = DiscoveredEndpoint {
                address: SocketAddr::new(ip, port_number),
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                zone: endpoint.zone.clone(),
                for_zones: {
                    let mut zones: Vec<String> = endpoint
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| z.name.clone())
                        .collect();
                    zones.sort();
                    zones.dedup();
                    zones
                },
                pod,
                target_ref,
            };
            match by_address.get(&discovered.address) {
                Some(existing) if existing.rank() >= discovered.rank() => {}
                _ => {
                    by_address.insert(discovered.address, discovered);
                }
            }
        }
    }
    EndpointSet {
        endpoints: by_address.into_values().collect(),
        skipped,
    }
}

/// The port number a slice gives to the Service port named `name` (TCP only).
fn slice_port(slice: &EndpointSlice, name: &str) -> Option<u16> {
    slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == name && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// Strips a Service to what the operator reads (name, namespace, labels, its ports), before it
/// is cached: annotations (a last-applied configuration can be kilobytes), managed fields and
/// the status are dropped.
pub fn trim_service(service: &mut Service) {
    trim_metadata(&mut service.metadata);
    service.status = None;
    if let Some(spec) = service.spec.as_mut() {
        let ports = spec.ports.take();
        *spec = Default::default();
        spec.ports = ports;
    }
}

/// Strips an EndpointSlice to what discovery reads (its labels, ports, and per endpoint the
/// addresses, conditions, zone, zone hints and target), before it is cached.
pub fn trim_slice(slice: &mut EndpointSlice) {
    trim_metadata(&mut slice.metadata);
    for endpoint in slice.endpoints.iter_mut().flatten() {
        if let Some(hints) = endpoint.hints.as_mut() {
            hints.for_nodes = None;
        }
        endpoint.deprecated_topology = None;
        endpoint.hostname = None;
        endpoint.node_name = None;
        if let Some(target) = endpoint.target_ref.as_mut() {
            // Kind and name are what the status shows.
            target.uid = None;
            target.namespace = None;
            target.resource_version = None;
            target.api_version = None;
            target.field_path = None;
        }
    }
}

fn trim_metadata(metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    metadata.annotations = None;
    metadata.managed_fields = None;
    metadata.owner_references = None;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{ObjectReference, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn service(ports: &[(&str, i32)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port)| ServicePort {
                            name: (!name.is_empty()).then(|| name.to_string()),
                            port: *port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub(crate) fn slice(name: &str, port_name: &str, port: i32, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(port),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        }
    }

    fn endpoint(address: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn grpc() -> ResolvedPort {
        ResolvedPort {
            name: "grpc".into(),
            port: 80,
        }
    }

    #[test]
    fn port_resolves_by_service_port_name_or_number() {
        let service = service(&[("http", 8080), ("grpc", 80)]);
        assert_eq!(resolve_port(&PortRef::Name("grpc".into()), &service), Ok(grpc()));
        assert_eq!(resolve_port(&PortRef::Number(80), &service), Ok(grpc()));
        let missing = resolve_port(&PortRef::Name("admin".into()), &service).unwrap_err();
        assert_eq!(missing.available, ["http/8080", "grpc/80"]);
        assert_eq!(
            missing.to_string(),
            "the Service has no TCP port named \"admin\" (its TCP ports: http/8080, grpc/80)"
        );
    }

    #[test]
    fn unnamed_single_port_matches_unnamed_slice_port() {
        let service = service(&[("", 80)]);
        let port = resolve_port(&PortRef::Number(80), &service).unwrap();
        assert_eq!(port.name, "");
        let set = endpoints_from_slices(
            &[slice("s", "", 50051, vec![endpoint("10.0.0.1", None, None, None)])],
            &port,
        );
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(set.endpoints[0].address, "10.0.0.1:50051".parse().unwrap());
    }

    #[test]
    fn nil_conditions_mean_ready_serving_not_terminating() {
        let set = endpoints_from_slices(
            &[slice("s", "grpc", 50051, vec![endpoint("10.0.0.1", None, None, None)])],
            &grpc(),
        );
        let e = &set.endpoints[0];
        assert!(e.ready && e.serving && !e.terminating);
        let no_conditions = Endpoint {
            addresses: vec!["10.0.0.2".into()],
            ..Default::default()
        };
        let set = endpoints_from_slices(&[slice("s", "grpc", 50051, vec![no_conditions])], &grpc());
        assert!(set.endpoints[0].kubernetes_ready());
    }

    #[test]
    fn terminating_but_serving_is_not_kubernetes_ready() {
        let set = endpoints_from_slices(
            &[slice(
                "s",
                "grpc",
                50051,
                vec![endpoint("10.0.0.1", Some(false), Some(true), Some(true))],
            )],
            &grpc(),
        );
        let e = &set.endpoints[0];
        assert!(!e.ready && e.serving && e.terminating);
        assert!(!e.kubernetes_ready());
    }

    #[test]
    fn endpoints_in_two_slices_appear_once_and_sorted() {
        let a: Vec<Endpoint> = (0..100)
            .map(|i| endpoint(&format!("10.0.0.{i}"), None, None, None))
            .collect();
        let b: Vec<Endpoint> = (90..150)
            .map(|i| endpoint(&format!("10.0.{}.{}", i / 100, i % 100), None, None, None))
            .collect();
        let set = endpoints_from_slices(&[slice("b", "grpc", 50051, b), slice("a", "grpc", 50051, a)], &grpc());
        assert_eq!(set.endpoints.len(), 150);
        let mut sorted = set.endpoints.clone();
        sorted.sort_by_key(|e| e.address);
        assert_eq!(sorted, set.endpoints);
    }

    #[test]
    fn a_duplicate_keeps_the_entry_kubernetes_ranks_best() {
        let set = endpoints_from_slices(
            &[
                slice(
                    "a",
                    "grpc",
                    50051,
                    vec![endpoint("10.0.0.1", Some(false), Some(false), Some(true))],
                ),
                slice(
                    "b",
                    "grpc",
                    50051,
                    vec![endpoint("10.0.0.1", Some(true), Some(true), Some(false))],
                ),
            ],
            &grpc(),
        );
        assert_eq!(set.endpoints.len(), 1);
        assert!(set.endpoints[0].ready);
    }

    #[test]
    fn slices_without_the_port_and_bad_addresses_are_left_out() {
        let mut fqdn = slice("f", "grpc", 50051, vec![endpoint("example.com", None, None, None)]);
        fqdn.address_type = "FQDN".into();
        let set = endpoints_from_slices(
            &[
                slice("other", "http", 8080, vec![endpoint("10.0.0.9", None, None, None)]),
                slice("bad", "grpc", 50051, vec![endpoint("not-an-ip", None, None, None)]),
                fqdn,
            ],
            &grpc(),
        );
        assert!(set.endpoints.is_empty());
        assert_eq!(set.skipped.len(), 1);
        assert_eq!(set.skipped[0].address, "not-an-ip");
    }

    #[test]
    fn ipv6_zone_and_the_pod_are_kept_and_the_node_is_not() {
        let mut e = endpoint("fd00::1", None, None, None);
        e.zone = Some("z1".into());
        e.node_name = Some("n1".into());
        e.target_ref = Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some("echo-1".into()),
            namespace: Some("ns".into()),
            uid: Some("u".into()),
            resource_version: Some("42".into()),
            ..Default::default()
        });
        let mut s = slice("s", "grpc", 50051, vec![e]);
        s.address_type = "IPv6".into();
        let set = endpoints_from_slices(&[s], &grpc());
        let e = &set.endpoints[0];
        assert_eq!(e.address, "[fd00::1]:50051".parse().unwrap());
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert_eq!(e.pod.as_deref(), Some("echo-1"));
        assert_eq!(e.target_ref, None);
    }

    #[test]
    fn a_target_that_is_not_a_pod_keeps_its_kind() {
        let mut e = endpoint("10.0.0.7", None, None, None);
        e.target_ref = Some(ObjectReference {
            kind: Some("VirtualMachineInstance".into()),
            name: Some("vm-7".into()),
            ..Default::default()
        });
        let set = endpoints_from_slices(&[slice("s", "grpc", 50051, vec![e])], &grpc());
        assert_eq!(set.endpoints[0].pod, None);
        assert_eq!(
            set.endpoints[0].target_ref,
            Some(TargetRef {
                kind: "VirtualMachineInstance".into(),
                name: "vm-7".into()
            })
        );
    }

    #[test]
    fn trimming_keeps_what_discovery_reads_and_drops_the_rest() {
        let mut full_service = service(&[("grpc", 80), ("http", 8080)]);
        full_service.metadata.name = Some("echo".into());
        full_service.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "x".repeat(4096),
            )]
            .into(),
        );
        full_service.metadata.managed_fields = Some(vec![Default::default()]);
        full_service.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.1".into());
        let mut trimmed_service = full_service.clone();
        trim_service(&mut trimmed_service);
        assert_eq!(trimmed_service.metadata.name.as_deref(), Some("echo"));
        assert!(trimmed_service.metadata.annotations.is_none() && trimmed_service.metadata.managed_fields.is_none());
        assert!(trimmed_service.spec.as_ref().unwrap().cluster_ip.is_none());
        for wanted in [
            PortRef::Name("grpc".into()),
            PortRef::Number(8080),
            PortRef::Name("none".into()),
        ] {
            assert_eq!(
                resolve_port(&wanted, &trimmed_service),
                resolve_port(&wanted, &full_service)
            );
        }

        let mut with_everything = endpoint("10.0.0.1", Some(true), None, Some(false));
        with_everything.zone = Some("zone-a".into());
        with_everything.node_name = Some("node-1".into());
        with_everything.hostname = Some("echo-0".into());
        with_everything.target_ref = Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some("echo-0".into()),
            ..Default::default()
        });
        let mut full_slice = slice("echo-1", "grpc", 50051, vec![with_everything]);
        full_slice.metadata.managed_fields = Some(vec![Default::default()]);
        let mut trimmed_slice = full_slice.clone();
        trim_slice(&mut trimmed_slice);
        assert!(trimmed_slice.metadata.managed_fields.is_none());
        assert_eq!(
            endpoints_from_slices([&trimmed_slice], &grpc()),
            endpoints_from_slices([&full_slice], &grpc())
        );
    }
}
