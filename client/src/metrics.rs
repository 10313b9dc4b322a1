//! Per-endpoint counters as Prometheus metrics (feature `prometheus`).
//!
//! ```no_run
//! # fn example(channel: &kubegrpc::Channel) {
//! let mut registry = prometheus_client::registry::Registry::default();
//! kubegrpc::metrics::register(channel, &mut registry);
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! # }
//! ```
//!
//! Exported per endpoint, labelled `backend` (`namespace/name`) and `endpoint` (`ip:port`):
//! `kubegrpc_client_requests_total`, `kubegrpc_client_failures_total` (transport failures),
//! `kubegrpc_client_ejections_total`, and gauges `kubegrpc_client_in_flight`,
//! `kubegrpc_client_weight`, `kubegrpc_client_effective_weight` (the weight in use: slow start's
//! share while it ramps, 0 out of rotation), `kubegrpc_client_ejected`; per channel,
//! `kubegrpc_client_panic` and `kubegrpc_client_zone_fallback`.
//! With a routing table (`status.routes`), the same for the pool of every GrpcBackend it routes
//! to (each labelled with its own `backend`), plus `kubegrpc_client_routed_requests_total`
//! (labels `backend`, the table's GrpcBackend, and `target`, the routed-to one) and
//! `kubegrpc_client_unrouted_requests_total` (calls failed because no entry took them); and for
//! each rule of a route with a timeout or retries (labels `backend`, `route`, `rule`),
//! `kubegrpc_client_route_retries_total`, `kubegrpc_client_route_retries_refused_total` (by the
//! retry budget) and `kubegrpc_client_route_deadline_exceeded_total`.
//! Values are read from [`Channel::snapshot`](crate::Channel::snapshot) at scrape time; the
//! registry does not keep the channel alive.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{Channel, channel::WeakChannel};

/// Registers `channel`'s per-endpoint counters with `registry`.
pub fn register(channel: &Channel, registry: &mut Registry) {
    registry.register_collector(Box::new(ChannelCollector {
        channel: channel.downgrade(),
    }));
}

#[derive(Debug)]
struct ChannelCollector {
    channel: WeakChannel,
}

impl Collector for ChannelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(channel) = self.channel.upgrade() else {
            return Ok(());
        };
        let snapshot = channel.snapshot();
        // The own pool, then each routed-to GrpcBackend's (the own one once).
        let mut pools = vec![&snapshot];
        if let Some(routing) = &snapshot.routing {
            pools.extend(
                routing
                    .backends
                    .iter()
                    .filter(|b| b.backend != snapshot.backend)
                    .map(|b| &b.snapshot),
            );
        }
        let endpoints: Vec<&crate::EndpointSnapshot> = pools.iter().flat_map(|p| &p.endpoints).collect();
        let labels: Vec<[(&str, String); 2]> = pools
            .iter()
            .flat_map(|pool| {
                pool.endpoints
                    .iter()
                    .map(|e| [("backend", pool.backend.clone()), ("endpoint", e.address.to_string())])
            })
            .collect();

        type Read = fn(&crate::EndpointSnapshot) -> u64;
        let counters: [(&str, &str, Read); 3] = [
            ("kubegrpc_client_requests", "Requests sent to each endpoint", |e| {
                e.requests
            }),
            (
                "kubegrpc_client_failures",
                "Requests to each endpoint that failed at the transport level",
                |e| e.failures,
            ),
            (
                "kubegrpc_client_ejections",
                "Ejections of each endpoint by outlier detection",
                |e| e.ejections,
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (endpoint, labels) in endpoints.iter().zip(&labels) {
                ConstCounter::new(read(endpoint)).encode(family.encode_family(labels)?)?;
            }
        }
        let gauges: [(&str, &str, Read); 4] = [
            (
                "kubegrpc_client_in_flight",
                "Requests in flight to each endpoint",
                |e| e.in_flight,
            ),
            ("kubegrpc_client_weight", "Weight of each endpoint, as published", |e| {
                u64::from(e.weight)
            }),
            (
                "kubegrpc_client_effective_weight",
                "Weight each endpoint is picked with now (slow start's share while it ramps; 0 out of rotation)",
                |e| u64::from(e.effective_weight),
            ),
            ("kubegrpc_client_ejected", "1 while an endpoint is ejected", |e| {
                u64::from(e.ejected)
            }),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (endpoint, labels) in endpoints.iter().zip(&labels) {
                let value = i64::try_from(read(endpoint)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        let mut panic = encoder.encode_descriptor(
            "kubegrpc_client_panic",
            "1 while too few endpoints are usable and requests spread over all Kubernetes-ready ones",
            None,
            MetricType::Gauge,
        )?;
        for pool in &pools {
            ConstGauge::new(i64::from(pool.panic))
                .encode(panic.encode_family(&[("backend", pool.backend.as_str())])?)?;
        }
        let mut fallback = encoder.encode_descriptor(
            "kubegrpc_client_zone_fallback",
            "1 while the client has a zone, no usable endpoint is for it, and requests go to every zone",
            None,
            MetricType::Gauge,
        )?;
        for pool in &pools {
            ConstGauge::new(i64::from(pool.zone_fallback))
                .encode(fallback.encode_family(&[("backend", pool.backend.as_str())])?)?;
        }
        if let Some(routing) = &snapshot.routing {
            let mut routed = encoder.encode_descriptor(
                "kubegrpc_client_routed_requests",
                "Calls the routing table sent to each GrpcBackend it names",
                None,
                MetricType::Counter,
            )?;
            for target in &routing.backends {
                let labels = [
                    ("backend", snapshot.backend.as_str()),
                    ("target", target.backend.as_str()),
                ];
                ConstCounter::new(target.routed).encode(routed.encode_family(&labels)?)?;
            }
            let mut unrouted = encoder.encode_descriptor(
                "kubegrpc_client_unrouted_requests",
                "Calls failed because no routing table entry took them (no match, no weighted backend, none usable)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(routing.unrouted)
                .encode(unrouted.encode_family(&[("backend", snapshot.backend.as_str())])?)?;
            type ReadRule = fn(&crate::RulePolicySnapshot) -> u64;
            let rule_counters: [(&str, &str, ReadRule); 3] = [
                (
                    "kubegrpc_client_route_retries",
                    "Retries made under a route rule's retry policy",
                    |p| p.retries,
                ),
                (
                    "kubegrpc_client_route_retries_refused",
                    "Retries a route rule's retry budget refused (the call failed as its last attempt did)",
                    |p| p.retries_refused,
                ),
                (
                    "kubegrpc_client_route_deadline_exceeded",
                    "Calls of a route rule failed with DEADLINE_EXCEEDED (the route's timeout or the caller's deadline)",
                    |p| p.deadline_exceeded,
                ),
            ];
            for (name, help, read) in rule_counters {
                let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for policy in &routing.policies {
                    let rule = policy.rule.to_string();
                    let labels = [
                        ("backend", snapshot.backend.as_str()),
                        ("route", policy.route.as_str()),
                        ("rule", rule.as_str()),
                    ];
                    ConstCounter::new(read(policy)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
