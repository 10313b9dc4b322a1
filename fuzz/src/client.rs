//! Fuzz targets of the client: its status parser, fed a GrpcBackend's `status` whatever it
//! holds (written by another operator version, edited by hand, or broken).

use std::{collections::HashSet, net::SocketAddr};

use kubegrpc::internals::{ParsedStatus, parse_status};
use serde_json::{Map, Value, json};

use crate::input::{Chunks, Target, Writer};

// === status_json ===

/// Any bytes, parsed as JSON, then as a status. Checked: endpoints come only from entries, each
/// address once, none with port 0.
pub const STATUS_JSON: Target = Target {
    name: "status_json",
    run: status_json,
    seeds: status_json_seeds,
    max_len: 4_096,
};

fn status_json(data: &[u8]) {
    let Ok(status) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check(&status, &parse_status(Some(&status)));
}

/// What holds for every status.
fn check(status: &Value, parsed: &ParsedStatus) {
    let entries = status.get("endpoints").and_then(Value::as_array).map_or(0, Vec::len);
    assert!(
        parsed.endpoints.len() <= entries,
        "{} endpoints from {entries} entries",
        parsed.endpoints.len()
    );
    let mut seen = HashSet::new();
    for endpoint in &parsed.endpoints {
        assert!(seen.insert(endpoint.address), "{} kept twice", endpoint.address);
        assert_ne!(endpoint.address.port(), 0, "port 0 kept");
    }
}

fn status_json_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // As the operator writes it: the compact form (status.port, defaults left out) and an entry
    // with every field.
    let written = json!({
        "observedGeneration": 3, "readyEndpoints": 2, "totalEndpoints": 4, "port": 50051,
        "conditions": [{"type": "Ready", "status": "True", "reason": "EndpointsReady",
                        "message": "2 of 4 endpoints can take requests",
                        "lastTransitionTime": "2026-12-01T22:19:15Z", "observedGeneration": 3}],
        "endpoints": [
            {"address": "10.250.0.11", "health": "Serving", "zone": "zone-a", "pod": "echo-0"},
            {"address": "10.250.0.12", "health": "Serving", "weight": 150, "forZones": ["zone-a", "zone-b"],
             "lastTransitionTime": "2026-12-01T22:19:15Z"},
            {"address": "10.250.0.13", "health": "NotServing", "reason": "ConnectRefused",
             "lastTransitionTime": "2026-12-01T22:19:15Z"},
            {"address": "fd00::14", "port": 8443, "health": "Unknown", "serving": false, "terminating": true,
             "targetRef": {"kind": "Node", "name": "n1"}, "failOpen": true}
        ]
    });
    // Broken in the ways a hand edit or a newer operator can break it.
    let odd = json!({
        "port": 70000,
        "endpoints": [
            {"address": "10.0.0.1", "port": "50051", "health": "Serving"},
            {"address": "10.0.0.1", "port": 1, "weight": 4294967296u64, "health": "Warming"},
            {"address": "10.0.0.2", "port": 1, "weight": -1},
            {"address": "fe80::1%eth0", "port": 0},
            {"address": "10.0.0.3", "port": 1, "zone": 7, "forZones": ["", 3, "z"], "lastTransitionTime": "yesterday"},
            42, null, [], {"address": null}
        ]
    });
    let pretty = |value: &Value| serde_json::to_vec_pretty(value).expect("JSON");
    vec![
        ("written", pretty(&written)),
        ("odd", pretty(&odd)),
        ("not-a-status", br#"["endpoints", {"endpoints": 1}]"#.to_vec()),
    ]
}

// === status_structured ===

/// Statuses built from the input field by field, so that the fuzzer reaches every field of an
/// entry rather than spending its time on JSON syntax. Input: `port_kind: u8`, `port: u16`
/// (`status.port`), then entries, each `kinds: u32` (two bits per field in [`FIELDS`] order: 0
/// absent, 1 right type, 2 right type at an edge, 3 any JSON, see [`any_json`]) and the bytes
/// each field takes. Checked: as `status_json`, and every entry whose fields are all of the
/// right type, with a port from 1 to 65535, has its address among the endpoints read (nothing
/// usable is lost).
pub const STATUS_STRUCTURED: Target = Target {
    name: "status_structured",
    run: status_structured,
    seeds: status_structured_seeds,
    max_len: 2_048,
};

/// The fields of an entry, in the order their kinds are read.
const FIELDS: [&str; 9] = [
    "address",
    "port",
    "weight",
    "health",
    "serving",
    "terminating",
    "zone",
    "forZones",
    "lastTransitionTime",
];

const WORDS: [&str; 12] = [
    "Serving",
    "NotServing",
    "Unknown",
    "",
    "zone-a",
    "10.0.0.1",
    "::1",
    "2026-12-01T22:19:15Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
    "-9999-01-01T00:00:00Z",
    "\u{0}\u{ffff}",
];

fn status_structured(data: &[u8]) {
    let mut input = Chunks::new(data);
    let (port_kind, port) = (input.u8() % 4, input.u16());
    let mut status = Map::new();
    let common_port = match port_kind {
        0 => None,
        1 => {
            status.insert("port".into(), json!(port));
            (port != 0).then_some(port)
        }
        2 => {
            status.insert("port".into(), json!(u64::from(port) << 16));
            None
        }
        _ => {
            status.insert("port".into(), any_json(&mut input, 2));
            None
        }
    };
    let mut entries = Vec::new();
    let mut must_keep: Vec<SocketAddr> = Vec::new();
    while !input.is_empty() && entries.len() < 64 {
        let (entry, valid) = entry(&mut input, common_port);
        must_keep.extend(valid);
        entries.push(entry);
    }
    status.insert("endpoints".into(), Value::Array(entries));
    let status = Value::Object(status);
    let parsed = parse_status(Some(&status));
    check(&status, &parsed);
    let kept: HashSet<SocketAddr> = parsed.endpoints.iter().map(|e| e.address).collect();
    for address in must_keep {
        // Kept from this entry, or from an earlier one with the same address.
        assert!(kept.contains(&address), "{address} lost: {:?}", parsed.warnings);
    }
}

/// One entry, and its address when every field is of the right type (then it must be read).
fn entry(input: &mut Chunks, common_port: Option<u16>) -> (Value, Option<SocketAddr>) {
    let kinds = input.u32();
    let mut fields = Map::new();
    let mut valid = true;
    let (mut address, mut port) = (None, None);
    for (i, name) in FIELDS.iter().enumerate() {
        let kind = (kinds >> (2 * i)) & 3;
        let value = match (kind, *name) {
            (0, "address") => {
                valid = false;
                continue;
            }
            (0, _) => continue,
            (3, _) => {
                valid = false;
                any_json(input, 2)
            }
            (_, "address") => {
                let ip: std::net::IpAddr = if kind == 1 {
                    std::net::Ipv4Addr::from(input.u32()).into()
                } else {
                    let octets: [u8; 16] = std::array::from_fn(|_| input.u8());
                    std::net::Ipv6Addr::from(octets).into()
                };
                address = Some(ip);
                json!(ip.to_string())
            }
            (_, "port") => {
                let value = if kind == 1 {
                    u64::from(input.u16())
                } else {
                    u64::from(input.u32())
                };
                port = u16::try_from(value).ok().filter(|p| *p != 0);
                valid &= port.is_some();
                json!(value)
            }
            (_, "weight") => {
                if kind == 1 {
                    json!(input.u32())
                } else {
                    valid = false;
                    json!(u64::from(u32::MAX) + 1 + u64::from(input.u8()))
                }
            }
            (_, "health") => json!(WORDS[usize::from(input.u8()) % WORDS.len()]),
            (_, "serving" | "terminating") => {
                if kind == 1 {
                    json!(input.u8() & 1 != 0)
                } else {
                    Value::Null
                }
            }
            (_, "forZones") => {
                let n = usize::from(input.u8() % 4);
                Value::Array(
                    (0..n)
                        .map(|_| json!(WORDS[usize::from(input.u8()) % WORDS.len()]))
                        .collect(),
                )
            }
            (_, _) => {
                // zone and lastTransitionTime: a word, or text from the input.
                if kind == 1 {
                    json!(WORDS[usize::from(input.u8()) % WORDS.len()])
                } else {
                    json!(String::from_utf8_lossy(input.chunk()))
                }
            }
        };
        fields.insert((*name).into(), value);
    }
    let port = if (kinds >> 2) & 3 == 0 { common_port } else { port };
    let address = match (valid, address, port) {
        (true, Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    };
    (Value::Object(fields), address)
}

/// Any JSON value, `depth` levels deep at most: `kind: u8` then what the kind takes.
fn any_json(input: &mut Chunks, depth: u8) -> Value {
    match input.u8() % if depth == 0 { 5 } else { 7 } {
        0 => Value::Null,
        1 => json!(input.u8() & 1 != 0),
        2 => match input.u8() % 4 {
            0 => json!(input.u32()),
            1 => json!(-i64::from(input.u32())),
            2 => json!(f64::from_bits(u64::from(input.u32()) << 32 | u64::from(input.u32()))),
            _ => json!(u64::MAX - u64::from(input.u8())),
        },
        3 => json!(WORDS[usize::from(input.u8()) % WORDS.len()]),
        4 => json!(String::from_utf8_lossy(input.chunk())),
        5 => Value::Array((0..input.u8() % 4).map(|_| any_json(input, depth - 1)).collect()),
        _ => Value::Object(
            (0..input.u8() % 4)
                .map(|_| {
                    let key = FIELDS[usize::from(input.u8()) % FIELDS.len()].to_string();
                    (key, any_json(input, depth - 1))
                })
                .collect(),
        ),
    }
}

fn status_structured_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Every field of the right type: address (IPv4), port, weight, health, serving,
    // terminating, zone, forZones, lastTransitionTime.
    let full = |w: Writer, last: u8| {
        w.u32(0b01_01_01_01_01_01_01_01_01)
            .u32(u32::from_be_bytes([10, 250, 0, last]))
            .u16(50051)
            .u32(100)
            .u8(0)
            .u8(1)
            .u8(0)
            .u8(4)
            .u8(2)
            .u8(4)
            .u8(4)
            .u8(7)
    };
    let common = full(full(Writer::default().u8(1).u16(50051), 1), 2).data;
    // Compact entries (address and health only, on status.port), a duplicate, an edge weight.
    let compact = Writer::default()
        .u8(1)
        .u16(8080)
        .u32(0b01_00_00_01)
        .u32(u32::from_be_bytes([10, 0, 0, 1]))
        .u8(0)
        .u32(0b01_00_00_01)
        .u32(u32::from_be_bytes([10, 0, 0, 1]))
        .u8(1)
        .u32(0b01_10_00_01)
        .u32(u32::from_be_bytes([10, 0, 0, 2]))
        .u8(200)
        .u8(0)
        .data;
    vec![("full", common), ("compact", compact)]
}

/// Every client target.
pub const TARGETS: [Target; 2] = [STATUS_JSON, STATUS_STRUCTURED];
