//! Reading a GrpcBackend's status leniently.
//!
//! The client must keep working whatever the status holds: written by a newer operator with
//! fields this version does not know, edited by hand, or simply broken. A typed decode would
//! reject the whole object for one bad field; here every endpoint entry is read on its own, a
//! bad one is skipped with a warning, and the good ones stay in use. Nothing here panics.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use k8s_openapi::jiff::Timestamp;
use kubegrpc_crds::{FULL_WEIGHT, Health};
use serde_json::{Map, Value};

/// One endpoint of the status, as the client acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusEndpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// The published weight (absent: [`FULL_WEIGHT`]).
    pub weight: u32,
    /// The gRPC health the operator published (one this version does not know: `Unknown`).
    pub health: Health,
    /// Kubernetes' `serving` (nil means true).
    pub serving: bool,
    /// Kubernetes' `terminating` (nil means false).
    pub terminating: bool,
    /// The endpoint's zone (the EndpointSlice's `zone`), if known.
    pub zone: Option<String>,
    /// The zones it should serve (the EndpointSlice's `hints.forZones`); empty: none given.
    pub for_zones: Vec<String>,
    /// When its health or readiness last changed, if listed (slow start ramps from it).
    pub last_transition_time: Option<SystemTime>,
    /// The GrpcBackend fails open: use it although it does not pass its health check.
    pub fail_open: bool,
}

impl StatusEndpoint {
    /// Kubernetes would send it traffic: serving and not terminating.
    pub fn kubernetes_ready(&self) -> bool {
        self.serving && !self.terminating
    }

    /// The operator says: send new requests here (the rule is [`kubegrpc_crds::is_usable`],
    /// the operator's and the xDS server's too).
    pub fn usable(&self) -> bool {
        kubegrpc_crds::is_usable(self.serving, self.terminating, self.health, self.weight, self.fail_open)
    }

    /// Whether the endpoint is for clients in `zone`, as kube-proxy reads EndpointSlices: its
    /// `forZones` names `zone`, or, with no `forZones`, its own zone is `zone`.
    pub fn is_for_zone(&self, zone: &str) -> bool {
        if self.for_zones.is_empty() {
            self.zone.as_deref() == Some(zone)
        } else {
            self.for_zones.iter().any(|z| z == zone)
        }
    }

    /// The same news from the operator about whether and how much to use the endpoint (its
    /// zone and transition time aside).
    pub fn same_state(&self, other: &StatusEndpoint) -> bool {
        (
            self.address,
            self.weight,
            self.health,
            self.serving,
            self.terminating,
            self.fail_open,
        ) == (
            other.address,
            other.weight,
            other.health,
            other.serving,
            other.terminating,
            other.fail_open,
        )
    }
}

/// The endpoints read from a status and what had to be skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedStatus {
    /// The entries read, in the status's order, each address once (its first entry).
    pub endpoints: Vec<StatusEndpoint>,
    /// One line per skipped entry or ignored field, saying why.
    pub warnings: Vec<String>,
}

/// Reads `status.endpoints` of a GrpcBackend object's `status` value (absent: no endpoints).
pub fn parse_status(status: Option<&Value>) -> ParsedStatus {
    let mut parsed = ParsedStatus::default();
    let Some(status) = status else {
        return parsed;
    };
    let (endpoints, common_port) = match status {
        Value::Object(fields) => (fields.get("endpoints"), fields.get("port")),
        Value::Null => return parsed,
        _ => {
            parsed.warnings.push("status is not an object".into());
            return parsed;
        }
    };
    let entries = match endpoints {
        None | Some(Value::Null) => return parsed,
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            parsed.warnings.push("status.endpoints is not a list".into());
            return parsed;
        }
    };
    // The port of every entry that names none; a bad one is reported once, and only the
    // entries that need it are skipped.
    let common_port = match common_port {
        None | Some(Value::Null) => Ok(None),
        Some(value) => port_number(value).map(Some).map_err(|why| format!("status.{why}")),
    };
    // Addresses kept so far: a status may list thousands of endpoints, so a duplicate is found
    // by hashing rather than by searching the endpoints kept.
    let mut seen = HashSet::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        match parse_entry(entry, &common_port) {
            Ok((endpoint, ignored)) => {
                if !seen.insert(endpoint.address) {
                    parsed.warnings.push(format!(
                        "status.endpoints[{index}]: {} listed twice; the first kept",
                        endpoint.address
                    ));
                } else {
                    let fields = ignored
                        .into_iter()
                        .map(|why| format!("status.endpoints[{index}].{why}"));
                    parsed.warnings.extend(fields);
                    parsed.endpoints.push(endpoint);
                }
            }
            Err(why) => parsed
                .warnings
                .push(format!("status.endpoints[{index}] skipped: {why}")),
        }
    }
    parsed
}

fn port_number(value: &Value) -> Result<u16, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {n} is not from 1 to 65535")),
        _ => Err("port is not a number".into()),
    }
}

/// Reads one entry; `common_port` is `status.port` (the port of entries that name none). Besides
/// the endpoint, returns the optional fields that were ignored and why (the entry is kept).
fn parse_entry(
    entry: &Value,
    common_port: &Result<Option<u16>, String>,
) -> Result<(StatusEndpoint, Vec<String>), String> {
    let fields = entry.as_object().ok_or("not an object")?;
    let address: IpAddr = match fields.get("address") {
        Some(Value::String(text)) => text
            .parse()
            .map_err(|_| format!("address {text:?} is not an IP address"))?,
        Some(_) => return Err("address is not a string".into()),
        None => return Err("no address".into()),
    };
    let port = match fields.get("port") {
        None | Some(Value::Null) => match common_port {
            Ok(Some(port)) => *port,
            Ok(None) => return Err("no port, and no status.port".into()),
            Err(why) => return Err(format!("no port, and {why}")),
        },
        Some(value) => port_number(value)?,
    };
    let weight = match fields.get("weight") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| format!("weight {n} is not a whole number from 0 to {}", u32::MAX))?,
        None | Some(Value::Null) => FULL_WEIGHT,
        Some(_) => return Err("weight is not a number".into()),
    };
    // A health this version does not know is not Serving: the endpoint is kept, unused.
    let health = match fields.get("health") {
        Some(Value::String(text)) => match text.as_str() {
            "Serving" => Health::Serving,
            "NotServing" => Health::NotServing,
            _ => Health::Unknown,
        },
        Some(_) => return Err("health is not a string".into()),
        None => Health::Unknown,
    };
    let flag = |name: &str, default: bool| match fields.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(format!("{name} is not true or false")),
    };
    let serving = flag("serving", true)?;
    let terminating = flag("terminating", false)?;
    let mut ignored = Vec::new();
    let endpoint = StatusEndpoint {
        address: SocketAddr::new(address, port),
        weight,
        health,
        serving,
        terminating,
        zone: zone(fields, &mut ignored),
        for_zones: for_zones(fields, &mut ignored),
        last_transition_time: last_transition_time(fields, &mut ignored),
        fail_open: fail_open(fields, &mut ignored),
    };
    Ok((endpoint, ignored))
}

/// `failOpen`: true or false; anything else is ignored (false: the health decides).
fn fail_open(fields: &Map<String, Value>, ignored: &mut Vec<String>) -> bool {
    match fields.get("failOpen") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(value)) => *value,
        Some(other) => {
            ignored.push(format!("failOpen {other} is not true or false; ignored"));
            false
        }
    }
}

/// `zone`: a string ("" is no zone); anything else is ignored.
fn zone(fields: &Map<String, Value>, ignored: &mut Vec<String>) -> Option<String> {
    match fields.get("zone") {
        None | Some(Value::Null) => None,
        Some(Value::String(zone)) => (!zone.is_empty()).then(|| zone.clone()),
        Some(other) => {
            ignored.push(format!("zone {other} is not a string; ignored"));
            None
        }
    }
}

/// `forZones`: a list of zone names; an item that is not one is ignored.
fn for_zones(fields: &Map<String, Value>, ignored: &mut Vec<String>) -> Vec<String> {
    match fields.get("forZones") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item {
                Value::String(zone) if !zone.is_empty() => Some(zone.clone()),
                other => {
                    ignored.push(format!("forZones[{i}] {other} is not a zone name; ignored"));
                    None
                }
            })
            .collect(),
        Some(other) => {
            ignored.push(format!("forZones {other} is not a list; ignored"));
            Vec::new()
        }
    }
}

/// `lastTransitionTime`: an RFC 3339 time ("2026-12-01T22:19:15Z"); anything else is ignored.
fn last_transition_time(fields: &Map<String, Value>, ignored: &mut Vec<String>) -> Option<SystemTime> {
    match fields.get("lastTransitionTime") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => match text.parse::<Timestamp>() {
            Ok(time) => Some(SystemTime::from(time)),
            Err(_) => {
                ignored.push(format!("lastTransitionTime {text:?} is not an RFC 3339 time; ignored"));
                None
            }
        },
        Some(other) => {
            ignored.push(format!("lastTransitionTime {other} is not an RFC 3339 time; ignored"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn good(address: &str) -> Value {
        json!({"address": address, "port": 50051, "weight": 100, "health": "Serving",
               "ready": true, "serving": true, "terminating": false})
    }

    #[test]
    fn a_published_status_is_read_whole() {
        let status = json!({"endpoints": [good("10.0.0.1"), good("fd00::1")], "readyEndpoints": 2});
        let parsed = parse_status(Some(&status));
        assert!(parsed.warnings.is_empty());
        assert_eq!(parsed.endpoints.len(), 2);
        assert!(parsed.endpoints.iter().all(StatusEndpoint::usable));
        assert_eq!(parsed.endpoints[1].address, "[fd00::1]:50051".parse().unwrap());
    }

    #[test]
    fn an_entry_failed_open_to_is_usable_whatever_its_health_and_a_bad_flag_is_ignored() {
        let status = json!({"port": 80, "endpoints": [
            {"address": "10.0.0.1", "health": "NotServing", "failOpen": true, "reason": "Timeout"},
            {"address": "10.0.0.2", "health": "NotServing", "weight": 0},
            {"address": "10.0.0.3", "health": "NotServing", "failOpen": "yes"},
            {"address": "10.0.0.4", "health": "NotServing", "failOpen": true, "terminating": true},
        ]});
        let parsed = parse_status(Some(&status));
        let usable: Vec<bool> = parsed.endpoints.iter().map(StatusEndpoint::usable).collect();
        assert_eq!(usable, [true, false, false, false]);
        assert_eq!(
            parsed.warnings,
            ["status.endpoints[2].failOpen \"yes\" is not true or false; ignored"]
        );
    }

    #[test]
    fn one_bad_entry_among_good_ones_is_skipped_and_the_good_ones_stay() {
        let status = json!({"endpoints": [
            good("10.0.0.1"),
            {"address": "10.0.0.2", "port": "not a number", "weight": 100, "health": "Serving"},
            {"address": "nonsense", "port": 50051, "weight": 100},
            {"address": "10.0.0.4", "port": 70000, "weight": 1},
            {"address": "10.0.0.5", "port": 50051, "weight": -1},
            42,
            good("10.0.0.3"),
        ]});
        let parsed = parse_status(Some(&status));
        let addresses: Vec<String> = parsed.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addresses, ["10.0.0.1:50051", "10.0.0.3:50051"]);
        assert_eq!(parsed.warnings.len(), 5, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].starts_with("status.endpoints[1] skipped: port is not a number"));
    }

    #[test]
    fn the_compact_form_takes_the_status_port_and_the_full_weight() {
        let status = json!({"port": 8080, "endpoints": [
            {"address": "10.0.0.1", "health": "Serving", "zone": "a", "pod": "p-1"},
            {"address": "10.0.0.2", "port": 9090, "weight": 7, "health": "Serving"},
        ]});
        let parsed = parse_status(Some(&status));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(parsed.endpoints[0].address, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(parsed.endpoints[0].weight, FULL_WEIGHT);
        assert!(parsed.endpoints[0].usable());
        assert_eq!(parsed.endpoints[1].address, "10.0.0.2:9090".parse().unwrap());
        assert_eq!(parsed.endpoints[1].weight, 7);
    }

    #[test]
    fn a_bad_status_port_skips_only_the_entries_that_need_it() {
        let status = json!({"port": "grpc", "endpoints": [
            {"address": "10.0.0.1", "health": "Serving"},
            {"address": "10.0.0.2", "port": 9090, "health": "Serving"},
        ]});
        let parsed = parse_status(Some(&status));
        assert_eq!(parsed.endpoints.len(), 1);
        assert_eq!(parsed.endpoints[0].address, "10.0.0.2:9090".parse().unwrap());
        assert_eq!(
            parsed.warnings,
            ["status.endpoints[0] skipped: no port, and status.port is not a number"]
        );
    }

    #[test]
    fn what_the_operator_writes_is_read_as_written() {
        use kubegrpc_crds::{EndpointStatus, GrpcBackendStatus};
        let entry = |address: &str, port: i32, weight: u32, terminating: bool| EndpointStatus {
            address: address.into(),
            port,
            weight,
            health: Health::Serving,
            serving: true,
            terminating,
            zone: Some("z".into()),
            for_zones: Vec::new(),
            pod: Some("p".into()),
            target_ref: None,
            reason: None,
            last_transition_time: None,
            fail_open: false,
        };
        let since: Timestamp = "2026-12-01T22:19:15Z".parse().unwrap();
        let hinted = EndpointStatus {
            for_zones: vec!["y".into(), "z".into()],
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(since)),
            ..entry("fd00::3", 9090, 55, false)
        };
        let written = GrpcBackendStatus {
            endpoints: vec![
                entry("10.0.0.1", 8080, FULL_WEIGHT, false),
                entry("10.0.0.2", 8080, 0, true),
                hinted,
            ],
            ..GrpcBackendStatus::default()
        };
        let parsed = parse_status(Some(&serde_json::to_value(&written).unwrap()));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let read: Vec<(SocketAddr, u32, bool)> = parsed
            .endpoints
            .iter()
            .map(|e| (e.address, e.weight, e.terminating))
            .collect();
        assert_eq!(
            read,
            [
                ("10.0.0.1:8080".parse().unwrap(), FULL_WEIGHT, false),
                ("10.0.0.2:8080".parse().unwrap(), 0, true),
                ("[fd00::3]:9090".parse().unwrap(), 55, false),
            ]
        );
        assert!(parsed.endpoints.iter().all(|e| e.zone.as_deref() == Some("z")));
        assert_eq!(parsed.endpoints[2].for_zones, ["y", "z"]);
        assert_eq!(parsed.endpoints[2].last_transition_time, Some(SystemTime::from(since)));
        assert_eq!(parsed.endpoints[0].last_transition_time, None);
    }

    #[test]
    fn zones_and_transition_times_are_read() {
        let status = json!({"port": 1, "endpoints": [
            {"address": "10.0.0.1", "health": "Serving", "zone": "a", "forZones": ["b", "c"],
             "lastTransitionTime": "2026-12-01T22:19:15Z"},
            {"address": "10.0.0.2", "health": "Serving", "zone": "a", "lastTransitionTime": "2026-12-01T22:19:15.5+01:00"},
            {"address": "10.0.0.3", "health": "Serving"},
        ]});
        let parsed = parse_status(Some(&status));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let [hinted, zoned, bare] = &parsed.endpoints[..] else {
            panic!("three endpoints")
        };
        assert_eq!(hinted.zone.as_deref(), Some("a"));
        assert_eq!(hinted.for_zones, ["b", "c"]);
        let at = |text: &str| SystemTime::from(text.parse::<Timestamp>().unwrap());
        assert_eq!(hinted.last_transition_time, Some(at("2026-12-01T22:19:15Z")));
        assert_eq!(
            hinted
                .last_transition_time
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_796_163_555
        );
        assert_eq!(zoned.last_transition_time, Some(at("2026-12-01T21:19:15.5Z")));
        assert!(zoned.for_zones.is_empty());
        assert_eq!((bare.zone.as_deref(), bare.last_transition_time), (None, None));

        // forZones wins over the zone; without it, the zone decides.
        assert!(!hinted.is_for_zone("a") && hinted.is_for_zone("b") && hinted.is_for_zone("c"));
        assert!(zoned.is_for_zone("a") && !zoned.is_for_zone("b"));
        assert!(!bare.is_for_zone("a"));
    }

    #[test]
    fn bad_zones_and_transition_times_are_ignored_and_the_entry_kept() {
        let status = json!({"port": 1, "endpoints": [
            {"address": "10.0.0.1", "health": "Serving", "zone": 7, "forZones": ["b", 3, ""],
             "lastTransitionTime": "yesterday"},
            {"address": "10.0.0.2", "health": "Serving", "forZones": "b", "lastTransitionTime": 1700000000,
             "zone": ""},
            {"address": "10.0.0.3", "health": "Serving", "lastTransitionTime": "2026-12-01T22:19:15"},
        ]});
        let parsed = parse_status(Some(&status));
        assert_eq!(parsed.endpoints.len(), 3, "every entry kept");
        assert!(parsed.endpoints.iter().all(StatusEndpoint::usable));
        assert_eq!(parsed.endpoints[0].for_zones, ["b"]);
        assert!(
            parsed
                .endpoints
                .iter()
                .all(|e| e.zone.is_none() && e.last_transition_time.is_none())
        );
        assert_eq!(
            parsed.warnings,
            [
                "status.endpoints[0].zone 7 is not a string; ignored",
                "status.endpoints[0].forZones[1] 3 is not a zone name; ignored",
                "status.endpoints[0].forZones[2] \"\" is not a zone name; ignored",
                "status.endpoints[0].lastTransitionTime \"yesterday\" is not an RFC 3339 time; ignored",
                "status.endpoints[1].forZones \"b\" is not a list; ignored",
                "status.endpoints[1].lastTransitionTime 1700000000 is not an RFC 3339 time; ignored",
                "status.endpoints[2].lastTransitionTime \"2026-12-01T22:19:15\" is not an RFC 3339 time; ignored",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_health_values_do_not_break_reading() {
        let status = json!({"endpoints": [
            {"address": "10.0.0.1", "port": 1, "weight": 5, "health": "Draining", "futureField": {"x": 1}},
        ], "somethingNew": true});
        let parsed = parse_status(Some(&status));
        assert_eq!(parsed.endpoints[0].health, Health::Unknown);
        assert!(!parsed.endpoints[0].usable());
    }

    #[test]
    fn missing_conditions_take_the_kubernetes_defaults() {
        let parsed = parse_status(Some(&json!({"endpoints": [
            {"address": "10.0.0.1", "port": 1, "weight": 5, "health": "Serving"}]})));
        assert!(parsed.endpoints[0].serving && !parsed.endpoints[0].terminating);
    }

    #[test]
    fn shapes_that_are_not_a_status_give_no_endpoints() {
        for status in [json!(null), json!([]), json!("x"), json!({"endpoints": {}}), json!({})] {
            assert!(parse_status(Some(&status)).endpoints.is_empty());
        }
        assert!(parse_status(None).endpoints.is_empty());
    }

    #[test]
    fn ten_thousand_entries_with_duplicates_keep_the_first_of_each_in_order() {
        let address = |i: usize| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff);
        let entry = |address: String, weight: u32| json!({"address": address, "port": 50051, "weight": weight, "health": "Serving"});
        // Index -> the earlier index it repeats, with another weight to tell the copies apart.
        let duplicates = [(4000, 10), (6000, 20), (9999, 4001)];
        let mut expected = Vec::new();
        let entries: Vec<Value> = (0..10_000)
            .map(|i| match duplicates.iter().find(|(at, _)| *at == i) {
                Some((_, original)) => entry(address(*original), 7),
                None if i == 5000 => json!(42),
                None => {
                    expected.push(format!("{}:50051", address(i)));
                    entry(address(i), 100)
                }
            })
            .collect();
        assert_eq!(entries.len(), 10_000);

        let parsed = parse_status(Some(&json!({ "endpoints": entries })));
        assert_eq!(parsed.endpoints.len(), 10_000 - 4);
        let addresses: Vec<String> = parsed.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(
            addresses, expected,
            "input order, duplicates and the bad entry left out"
        );
        assert!(
            parsed.endpoints.iter().all(|e| e.weight == 100),
            "the first of each kept"
        );
        assert_eq!(
            parsed.warnings,
            [
                "status.endpoints[4000]: 10.0.0.10:50051 listed twice; the first kept",
                "status.endpoints[5000] skipped: not an object",
                "status.endpoints[6000]: 10.0.0.20:50051 listed twice; the first kept",
                "status.endpoints[9999]: 10.0.15.161:50051 listed twice; the first kept",
            ]
        );
    }

    /// The linear search for duplicates this module used before, to compare against.
    fn parse_entries_by_linear_search(entries: &[Value]) -> ParsedStatus {
        let mut parsed = ParsedStatus::default();
        for (index, entry) in entries.iter().enumerate() {
            match parse_entry(entry, &Ok(None)) {
                Ok((endpoint, _)) if parsed.endpoints.iter().any(|e| e.address == endpoint.address) => {
                    parsed.warnings.push(format!(
                        "status.endpoints[{index}]: {} listed twice; the first kept",
                        endpoint.address
                    ));
                }
                Ok((endpoint, ignored)) => {
                    let fields = ignored
                        .into_iter()
                        .map(|why| format!("status.endpoints[{index}].{why}"));
                    parsed.warnings.extend(fields);
                    parsed.endpoints.push(endpoint);
                }
                Err(why) => parsed
                    .warnings
                    .push(format!("status.endpoints[{index}] skipped: {why}")),
            }
        }
        parsed
    }

    /// Entries from few addresses (so that many repeat), some of them bad.
    fn entry_from_few_addresses() -> impl Strategy<Value = Value> {
        let address = prop_oneof![Just("10.0.0.1"), Just("10.0.0.2"), Just("::1"), Just("::ffff:10.0.0.1")];
        let port = prop_oneof![Just(json!(1)), Just(json!(2)), Just(json!("x"))];
        let health = prop_oneof![Just("Serving"), Just("NotServing"), Just("Draining")];
        (address, port, 0..3u32, health, any::<bool>()).prop_map(|(address, port, weight, health, terminating)| {
            json!({"address": address, "port": port, "weight": weight, "health": health,
                       "terminating": terminating})
        })
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9:.]{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("10.0.0.1"),
                Just("::1"),
                Just("Serving"),
                Just("NotServing"),
                Just("2026-12-01T22:19:15Z"),
                Just("zone-a"),
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                Just("endpoints".to_string()),
                Just("address".to_string()),
                Just("port".to_string()),
                Just("weight".to_string()),
                Just("health".to_string()),
                Just("serving".to_string()),
                Just("terminating".to_string()),
                Just("zone".to_string()),
                Just("forZones".to_string()),
                Just("lastTransitionTime".to_string()),
                "[a-z]{1,6}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(status in arbitrary_json()) {
            let parsed = parse_status(Some(&status));
            for endpoint in &parsed.endpoints {
                prop_assert!(endpoint.address.port() != 0);
            }
        }

        #[test]
        fn duplicates_are_found_as_a_linear_search_finds_them(
            entries in prop::collection::vec(entry_from_few_addresses(), 0..40),
        ) {
            let parsed = parse_status(Some(&json!({"endpoints": entries})));
            prop_assert_eq!(parsed, parse_entries_by_linear_search(&entries));
        }

        #[test]
        fn arbitrary_entries_never_panic(entries in prop::collection::vec(arbitrary_json(), 0..16)) {
            let parsed = parse_status(Some(&json!({"endpoints": entries})));
            // Every entry is kept, skipped or a duplicate; ignored fields of kept ones add lines.
            let dropped = parsed.warnings.iter().filter(|w| w.contains(" skipped: ") || w.contains(" listed twice")).count();
            prop_assert_eq!(parsed.endpoints.len() + dropped, entries.len());
        }
    }
}
