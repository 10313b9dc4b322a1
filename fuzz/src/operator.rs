//! Fuzz targets of the operator: what a backend sends the prober (its bytes on the HTTP/2
//! connection, HPACK header blocks, ORCA load reports and the weights made from them) and what
//! an xDS client sends the xDS server.
//! Each target's input layout is in its docs (see [`crate::input::Chunks`]); its seeds are made
//! here, next to the layout, and committed under `fuzz/corpus/NAME/seed-*`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
            route::v3::RouteConfiguration,
        },
        service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    },
    google::rpc::Status,
};
use kubegrpc_crds::{GrpcBackendStatus, MAX_STATIC_WEIGHT, slow_start::SlowStart};
use kubegrpc_operator::{
    health::{
        connection::{Event, fuzz_server_bytes},
        hpack::Decoder,
    },
    weights::{LoadSample, LoadSettings, LoadWeight, publish_load_weights},
    xds::{XdsCache, resources::type_url, server::respond_to_requests},
};
use kubegrpc_orca::OrcaLoadReport;
use prost::Message;
use serde_json::{Value, json};

use crate::input::{Chunks, Target, Writer};

// === hpack ===

/// HPACK decoding of the header blocks a server sends the prober. Input: chunks, each a header
/// block, decoded in order by one decoder as on one connection (entries one block indexes are
/// looked up by the next).
pub const HPACK: Target = Target {
    name: "hpack",
    run: hpack,
    seeds: hpack_seeds,
    max_len: 4_096,
};

fn hpack(data: &[u8]) {
    let mut decoder = Decoder::default();
    for block in Chunks::new(data) {
        let _ = decoder.decode(block, |name, value| {
            // A string is at most 8 KiB on the wire, and a Huffman code at least 5 bits.
            assert!(name.len() <= 8_192 * 8 / 5 + 1, "a {}-byte name", name.len());
            assert!(value.len() <= 8_192 * 8 / 5 + 1, "a {}-byte value", value.len());
        });
    }
}

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("hex digits"), 16).expect("hex"))
        .collect()
}

fn hpack_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // RFC 7541 C.4 (Huffman, dynamic table) and C.6 (responses, evictions from a 256-byte table).
    let c4 = [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ];
    let c6 = [
        "3fe1 0148 8264 0258 85ae c3771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ff c1 c0 bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ];
    let blocks = |list: &[&str]| {
        list.iter()
            .fold(Writer::default(), |w, block| w.chunk(&hex(block)))
            .data
    };
    // A gRPC response as servers send it: :status 200, content-type; then trailers.
    let grpc = Writer::default()
        .chunk(&[&[0x88, 0x5f, 0x10][..], b"application/grpc"].concat())
        .chunk(&[&[0x00, 0x0b][..], b"grpc-status", &[0x01], b"0"].concat())
        .data;
    vec![
        ("rfc7541-c4", blocks(&c4)),
        ("rfc7541-c6", blocks(&c6)),
        ("grpc-response", grpc),
    ]
}

// === connection ===

/// The prober's HTTP/2 connection fed a server's bytes: a connection with a `Watch`, a `Check`
/// and a load-report stream open reads `data` as what the server sent, its events drained
/// between reads (the prober's fuzz entry, `connection::fuzz_server_bytes`, which also asserts
/// the bounds on its buffers and queue). Input: the server's bytes, from its SETTINGS on.
/// Checked: events only for the three calls, none after a call's end, one GOAWAY at most.
pub const CONNECTION: Target = Target {
    name: "connection",
    run: connection,
    seeds: connection_seeds,
    max_len: 4_096,
};

fn connection(data: &[u8]) {
    let (events, _error) = fuzz_server_bytes(data);
    let mut calls = Vec::new();
    let mut ended = Vec::new();
    let mut goaways = 0;
    for event in &events {
        let call = match event {
            Event::Message(call, _) => call,
            Event::Ended(call, _) => call,
            Event::GoAway(_) => {
                goaways += 1;
                continue;
            }
        };
        assert!(!ended.contains(call), "an event after {call:?} ended: {events:?}");
        if !calls.contains(call) {
            calls.push(*call);
        }
        if matches!(event, Event::Ended(..)) {
            ended.push(*call);
        }
    }
    assert!(calls.len() <= 3, "events for {} calls: {events:?}", calls.len());
    assert!(goaways <= 1, "{goaways} GOAWAY events");
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("a small frame").to_be_bytes();
    [&length[1..], &[kind, flags], &stream.to_be_bytes()[..], payload].concat()
}

/// A gRPC message (uncompressed).
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let length = u32::try_from(message.len()).expect("a small message").to_be_bytes();
    [&[0][..], &length, message].concat()
}

fn connection_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const WINDOW_UPDATE: u8 = 0x8;
    const CONTINUATION: u8 = 0x9;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const PADDED: u8 = 0x8;
    // The calls' streams: Watch 1, Check 3, load reports 5.
    let (watch, check, load) = (1, 3, 5);
    // :status 200 (static index 8), content-type: application/grpc (literal, name index 31).
    let response: Vec<u8> = [&[0x88, 0x0f, 0x10, 0x10][..], b"application/grpc"].concat();
    let status = |code: &[u8], message: &[u8]| {
        let mut block = [&[0x00, 0x0b][..], b"grpc-status", &[code.len() as u8], code].concat();
        if !message.is_empty() {
            block.extend_from_slice(&[&[0x00, 0x0c][..], b"grpc-message", &[message.len() as u8], message].concat());
        }
        block
    };
    let serving = grpc_message(&[0x08, 0x01]);
    let report = grpc_message(
        &OrcaLoadReport {
            cpu_utilization: 0.5,
            rps_fractional: 100.0,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let settings = frame(SETTINGS, 0, 0, &[]);
    let settings_ack = frame(SETTINGS, 1, 0, &[]);
    let answered = [
        settings.clone(),
        settings_ack,
        frame(HEADERS, END_HEADERS, watch, &response),
        frame(DATA, 0, watch, &serving),
        frame(HEADERS, END_HEADERS, check, &response),
        frame(DATA, 0, check, &serving),
        frame(HEADERS, END_HEADERS | END_STREAM, check, &status(b"0", b"")),
        frame(HEADERS, END_HEADERS, load, &response),
        frame(DATA, 0, load, &report),
    ]
    .concat();
    // Settings with values, a PING, a header block split over CONTINUATION, padded DATA, a
    // reset, a trailers-only answer and a GOAWAY with debug data.
    let limits = [[0, 3, 0, 0, 0, 2], [0, 4, 0, 0, 0, 0]].concat();
    let padded = [&[4][..], &serving, &[0; 4]].concat();
    let goaway = [&1u32.to_be_bytes()[..], &11u32.to_be_bytes(), b"too_many_pings"].concat();
    let trailers_only = [&response[..], &status(b"12", b"unknown method")].concat();
    let troubled = [
        frame(SETTINGS, 0, 0, &limits),
        frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
        frame(WINDOW_UPDATE, 0, 0, &1_000u32.to_be_bytes()),
        frame(HEADERS, 0, watch, &response[..2]),
        frame(CONTINUATION, END_HEADERS, watch, &response[2..]),
        frame(DATA, PADDED, watch, &padded),
        frame(RST_STREAM, 0, load, &8u32.to_be_bytes()),
        frame(HEADERS, END_HEADERS | END_STREAM, check, &trailers_only),
        frame(GOAWAY, 0, 0, &goaway),
    ]
    .concat();
    // Bytes that are not HTTP/2 at all; a frame header announcing 16 MiB.
    let huge = [settings, vec![0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1]].concat();
    vec![
        ("answered", answered),
        ("troubled", troubled),
        (
            "http1",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        ("huge-frame", huge),
    ]
}

// === orca_weights ===

/// ORCA load reports, decoded as the prober decodes them, weighted (gRFC A58) and published
/// over the endpoints of one GrpcBackend. Input: `penalty: u8` (error utilization penalty, 0 to
/// 100 as the spec allows), then up to 16 endpoints, each `flags: u8` (bit 0: a published
/// weight, bit 1: held, bit 2: a report), `published: u32`, a chunk: the report's bytes.
/// Checked: every A58 weight is finite and above 0, every published weight in
/// 1..=MAX_STATIC_WEIGHT, one per endpoint.
pub const ORCA_WEIGHTS: Target = Target {
    name: "orca_weights",
    run: orca_weights,
    seeds: orca_weights_seeds,
    max_len: 2_048,
};

fn orca_weights(data: &[u8]) {
    let mut input = Chunks::new(data);
    let settings = LoadSettings {
        blackout_period: Duration::ZERO,
        weight_expiration_period: Duration::from_secs(180),
        error_utilization_penalty: f64::from(input.u8()) * 100.0 / 255.0,
    };
    let now = tokio::time::Instant::now();
    let (mut current, mut published, mut hold) = (Vec::new(), Vec::new(), Vec::new());
    while !input.is_empty() && current.len() < 16 {
        let (flags, weight, report) = (input.u8(), input.u32(), input.chunk());
        published.push((flags & 1 != 0).then_some(weight));
        hold.push(flags & 2 != 0);
        let report = (flags & 4 != 0).then(|| OrcaLoadReport::decode(report).ok()).flatten();
        let mut load = LoadWeight::default();
        if let Some(report) = &report {
            load.update(LoadSample::from_report(report), settings.weight_expiration_period, now);
        }
        let weight = load.current(&settings, now);
        assert!(
            weight.is_none_or(|w| w.is_finite() && w > 0.0),
            "A58 weight {weight:?} from {report:?}"
        );
        let _ = load.changes_in(&settings, now);
        current.push(weight);
    }
    let weights = publish_load_weights(&current, &published, &hold);
    assert_eq!(weights.len(), current.len());
    for (i, weight) in weights.iter().enumerate() {
        assert!(
            (1..=MAX_STATIC_WEIGHT).contains(weight),
            "weight {weight} published for endpoint {i} of current {current:?}, published {published:?}, hold {hold:?}"
        );
    }
}

fn orca_weights_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let report = |qps: f64, eps: f64, cpu: f64, application: f64| {
        OrcaLoadReport {
            cpu_utilization: cpu,
            application_utilization: application,
            rps_fractional: qps,
            eps,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let named = OrcaLoadReport {
        cpu_utilization: 0.5,
        rps_fractional: 100.0,
        named_metrics: [("queue".to_string(), 3.0)].into(),
        utilization: [("gpu".to_string(), 0.25)].into(),
        ..Default::default()
    }
    .encode_to_vec();
    let endpoint = |w: Writer, flags: u8, published: u32, report: &[u8]| w.u8(flags).u32(published).chunk(report);
    let honest = endpoint(
        endpoint(
            endpoint(Writer::default().u8(255), 4, 0, &report(100.0, 0.0, 0.5, 0.0)),
            4,
            0,
            &report(100.0, 10.0, 0.9, 0.4),
        ),
        4,
        0,
        &named,
    )
    .data;
    // The liar: qps 1e12 at utilization 1e-9 beside honest ones.
    let liar = endpoint(
        endpoint(
            endpoint(Writer::default().u8(0), 5, 100, &report(100.0, 0.0, 0.5, 0.0)),
            5,
            100,
            &report(100.0, 0.0, 0.5, 0.0),
        ),
        5,
        100,
        &report(1e12, 0.0, 0.0, 1e-9),
    )
    .data;
    // Published weights from a previous operator, held, one beyond what this policy writes.
    let held = endpoint(
        endpoint(endpoint(Writer::default().u8(25), 3, 75, &[]), 3, u32::MAX, &[]),
        5,
        150,
        &report(f64::MAX, f64::INFINITY, f64::MIN_POSITIVE, 0.0),
    )
    .data;
    vec![("honest", honest), ("liar", liar), ("held", held)]
}

// === xds_requests ===

/// The xDS server's request handling: GrpcBackends in the cache, then DiscoveryRequests from a
/// client (names, type URLs, nonces, versions, NACKs), each answered as the stream would.
/// Input: a chunk describing the backends (see [`backends`]), then chunks, each a
/// DiscoveryRequest (protobuf; one that does not decode is skipped, where tonic would end the
/// stream). Checked: responses only for served types, each with a new nonce, resources of its
/// type, named once each and decodable; EDS weights above 0 adding up to at most `u32::MAX`
/// (what gRPC clients accept).
pub const XDS_REQUESTS: Target = Target {
    name: "xds_requests",
    run: xds_requests,
    seeds: xds_requests_seeds,
    max_len: 4_096,
};

/// A fixed wall time (2027-01-15), so that a run does not depend on the clock.
fn fixed_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

const BACKENDS: [&str; 3] = ["b0", "b1", "b2"];
const NAMESPACE: &str = "ns";

/// The backends' statuses and slow-start settings from `data`: `window: u16` seconds,
/// `aggression: u8` (tenths), `min_percent: u8`, then endpoints, each `backend: u8` (which of
/// [`BACKENDS`]), an address (`kind: u8`: 0 IPv4 + 4 bytes, 1 IPv6 + 16 bytes, else a chunk of
/// text), `port: u32` (as i32), `weight: u32`, `flags: u8` (bits 0-1 health, 2 not serving,
/// 3 terminating, 4 a zone, 5 a transition time, 6 fail open) and, with bit 5,
/// `seconds_ago: u16`.
fn backends(data: &[u8]) -> (SlowStart, [Vec<Value>; 3]) {
    let mut input = Chunks::new(data);
    let slow_start = SlowStart {
        window: Duration::from_secs(u64::from(input.u16())),
        aggression: f64::from(input.u8()) / 10.0,
        min_weight_percent: u32::from(input.u8()),
    };
    let mut endpoints: [Vec<Value>; 3] = Default::default();
    while !input.is_empty() {
        let backend = usize::from(input.u8()) % BACKENDS.len();
        let address = match input.u8() {
            0 => {
                let octets: [u8; 4] = std::array::from_fn(|_| input.u8());
                std::net::Ipv4Addr::from(octets).to_string()
            }
            1 => {
                let octets: [u8; 16] = std::array::from_fn(|_| input.u8());
                std::net::Ipv6Addr::from(octets).to_string()
            }
            _ => String::from_utf8_lossy(input.chunk()).into_owned(),
        };
        let port = input.u32() as i32;
        let weight = input.u32();
        let flags = input.u8();
        let health = ["Serving", "NotServing", "Unknown", "Serving"][usize::from(flags & 3)];
        let mut endpoint = json!({
            "address": address, "port": port, "weight": weight, "health": health,
            "serving": flags & 4 == 0, "terminating": flags & 8 != 0, "failOpen": flags & 64 != 0,
        });
        if flags & 16 != 0 {
            endpoint["zone"] = json!(format!("zone-{}", flags >> 7));
        }
        if flags & 32 != 0 {
            let at = fixed_now() - Duration::from_secs(u64::from(input.u16()));
            let seconds = at.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs();
            let time = k8s_openapi::jiff::Timestamp::from_second(seconds as i64).expect("a valid time");
            endpoint["lastTransitionTime"] = json!(time.to_string());
        }
        endpoints[backend].push(endpoint);
    }
    (slow_start, endpoints)
}

fn xds_requests(data: &[u8]) {
    let mut input = Chunks::new(data);
    let (slow_start, endpoints) = backends(input.chunk());
    let cache = Arc::new(XdsCache::default());
    cache.relist_started();
    for (name, endpoints) in BACKENDS.iter().zip(endpoints) {
        let status: GrpcBackendStatus =
            serde_json::from_value(json!({ "endpoints": endpoints })).expect("a status the schema allows");
        cache.set_backend_at(NAMESPACE, name, Some(&status), slow_start, fixed_now());
    }
    cache.relist_done();
    let requests: Vec<DiscoveryRequest> = input.filter_map(|bytes| DiscoveryRequest::decode(bytes).ok()).collect();
    let mut last_nonce = 0u64;
    for responses in respond_to_requests(cache, requests) {
        assert!(
            responses.len() <= type_url::ALL.len(),
            "{} responses to one request",
            responses.len()
        );
        for response in responses {
            assert!(
                type_url::ALL.contains(&response.type_url.as_str()),
                "{}",
                response.type_url
            );
            let nonce: u64 = response.nonce.parse().expect("a numeric nonce");
            assert!(nonce > last_nonce, "nonce {nonce} after {last_nonce}");
            last_nonce = nonce;
            check_resources(&response);
        }
    }
}

fn check_resources(response: &DiscoveryResponse) {
    let mut names = std::collections::BTreeSet::new();
    for resource in &response.resources {
        assert_eq!(resource.type_url, response.type_url);
        let bytes = resource.value.as_slice();
        let name = match response.type_url.as_str() {
            type_url::LISTENER => Listener::decode(bytes).expect("a Listener").name,
            type_url::ROUTE => RouteConfiguration::decode(bytes).expect("a RouteConfiguration").name,
            type_url::CLUSTER => Cluster::decode(bytes).expect("a Cluster").name,
            _ => {
                let assignment = ClusterLoadAssignment::decode(bytes).expect("a ClusterLoadAssignment");
                let mut total = 0u64;
                for locality in &assignment.endpoints {
                    let weight = locality.load_balancing_weight.map_or(0, |w| w.value);
                    assert!(weight > 0, "a locality of weight 0 (grpc-go NACKs the response)");
                    total += u64::from(weight);
                }
                assert!(u32::try_from(total).is_ok(), "locality weights add up to {total}");
                assignment.cluster_name
            }
        };
        assert!(names.insert(name.clone()), "{name} twice in one response");
    }
}

fn xds_requests_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let endpoint = |w: Writer, backend: u8, last: u8, weight: u32, flags: u8| {
        w.u8(backend)
            .u8(0)
            .bytes(&[10, 250, 0, last])
            .u32(50051)
            .u32(weight)
            .u8(flags)
    };
    let backends = endpoint(
        endpoint(
            endpoint(Writer::default().u16(0).u8(10).u8(10), 0, 1, 100, 0),
            0,
            2,
            100,
            16,
        ),
        1,
        3,
        0,
        1,
    )
    .data;
    // Slow start on (60 s window), one endpoint ramping, one IPv6, one terminating.
    let ramping = endpoint(
        endpoint(Writer::default().u16(60).u8(10).u8(10), 0, 1, 100, 32).u16(15),
        0,
        2,
        u32::MAX,
        8,
    )
    .u8(2)
    .u8(1)
    .bytes(&std::net::Ipv6Addr::LOCALHOST.octets())
    .u32(50051)
    .u32(7)
    .u8(0)
    .data;
    let node = Some(Node {
        id: "client-1".into(),
        ..Default::default()
    });
    let request = |type_url: &str, names: &[&str], version: &str, nonce: &str, nack: bool| {
        DiscoveryRequest {
            version_info: version.into(),
            node: node.clone(),
            resource_names: names.iter().map(std::string::ToString::to_string).collect(),
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| Status {
                code: 3,
                message: "rejected".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    // What grpc-go asks for when it dials xds:///b0.ns, acknowledging each response.
    let dial = Writer::default()
        .chunk(&backends)
        .chunk(&request(type_url::LISTENER, &["b0.ns"], "", "", false))
        .chunk(&request(type_url::LISTENER, &["b0.ns"], "v", "1", false))
        .chunk(&request(type_url::ROUTE, &["b0.ns"], "", "", false))
        .chunk(&request(type_url::CLUSTER, &["b0.ns"], "", "", false))
        .chunk(&request(type_url::ENDPOINTS, &["b0.ns"], "", "", false))
        .chunk(&request(type_url::ENDPOINTS, &["b0.ns"], "v", "4", false))
        .data;
    // Wildcards, a NACK, a stale nonce, an unknown type, names that do not exist.
    let odd = Writer::default()
        .chunk(&ramping)
        .chunk(&request(type_url::CLUSTER, &[], "", "", false))
        .chunk(&request(type_url::CLUSTER, &[], "x", "1", true))
        .chunk(&request(
            type_url::ENDPOINTS,
            &["b0.ns", "b1.ns", "missing.ns"],
            "",
            "0",
            false,
        ))
        .chunk(&request(
            "type.googleapis.com/envoy.config.listener.v3.Unknown",
            &["b0.ns"],
            "",
            "",
            false,
        ))
        .chunk(&request(type_url::ENDPOINTS, &[], "", "2", false))
        .data;
    vec![("dial", dial), ("odd", odd)]
}

/// Every operator target.
pub const TARGETS: [Target; 4] = [HPACK, CONNECTION, ORCA_WEIGHTS, XDS_REQUESTS];
