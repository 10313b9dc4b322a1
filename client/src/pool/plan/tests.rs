//! The planning rules on plain data: no connection, no runtime, the time given.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::*;
use crate::{
    outlier::OutlierDetection,
    slow_start::SlowStart,
    status::parse_status,
    test_support::{BACKEND, entry, transitioned, zoned},
};

fn address(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 50051))
}

fn endpoints(entries: &[Value]) -> Vec<StatusEndpoint> {
    let parsed = parse_status(Some(&json!({ "endpoints": entries })));
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    parsed.endpoints
}

/// Everything a plan is decided from, owned; `new` gives no zone, ejection or slow start.
struct View {
    endpoints: Vec<StatusEndpoint>,
    ejections: Ejections,
    zone: Option<&'static str>,
    panic_threshold: u8,
    ramps: Ramps,
    now: Instant,
}

impl View {
    fn new(entries: &[Value], panic_threshold: u8) -> Self {
        Self {
            endpoints: endpoints(entries),
            ejections: Ejections::default(),
            zone: None,
            panic_threshold,
            ramps: Ramps::default(),
            now: Instant::now(),
        }
    }

    fn eject(&mut self, address: SocketAddr) {
        let anyone = OutlierDetection {
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        let ejected = self.ejections.eject(address, self.endpoints.len(), self.now, &anyone);
        assert!(ejected.is_some(), "{address} ejected");
    }

    fn plan(&self) -> Plan {
        plan(&PlanInput {
            endpoints: &self.endpoints,
            ejections: &self.ejections,
            zone: self.zone,
            panic_threshold: self.panic_threshold,
            ramps: &self.ramps,
            now: self.now,
        })
    }

    fn why_unavailable(&self, presence: Presence) -> String {
        why_unavailable(BACKEND, presence, &self.endpoints, &self.ejections)
    }
}

/// The chosen endpoints with their weights.
fn weights(plan: &Plan) -> Vec<(SocketAddr, u32)> {
    plan.chosen.iter().map(|c| (c.address, c.weight)).collect()
}

/// `entry` with `field` set to `value`.
fn with(mut entry: Value, field: &str, value: Value) -> Value {
    entry[field] = value;
    entry
}

#[test]
fn only_usable_endpoints_are_chosen_with_their_published_weights() {
    let view = View::new(
        &[
            entry(address(1), 100, "Serving"),
            entry(address(2), 300, "Serving"),
            entry(address(3), 100, "NotServing"),
            entry(address(4), 100, "Unknown"),
            entry(address(5), 0, "Serving"),
            with(entry(address(6), 100, "Serving"), "serving", json!(false)),
            with(entry(address(7), 100, "Serving"), "terminating", json!(true)),
            with(entry(address(8), 100, "NotServing"), "failOpen", json!(true)),
        ],
        0,
    );
    let plan = view.plan();
    assert_eq!(
        weights(&plan),
        [(address(1), 100), (address(2), 300), (address(8), 100)]
    );
    assert!(plan.chosen.iter().all(|c| c.percent.is_none()), "no slow start");
    assert!(!plan.panic && !plan.zone_fallback && plan.ejected.is_empty());
    // Kubernetes-ready: all but the not serving, the terminating and the Serving one weighted 0.
    assert_eq!((plan.usable, plan.kubernetes_ready), (3, 5));
}

#[test]
fn panic_mode_starts_strictly_below_the_threshold_and_spreads_evenly_over_kubernetes_ready() {
    let status = |second: &str| {
        [
            entry(address(1), 300, "Serving"),
            entry(address(2), 100, second),
            entry(address(3), 100, "NotServing"),
            entry(address(4), 100, "NotServing"),
            // Weighted out on purpose: not counted, not used in panic.
            entry(address(5), 0, "Serving"),
        ]
    };
    // 1 usable of 4 Kubernetes-ready: 25% < 50%.
    let plan = View::new(&status("NotServing"), 50).plan();
    assert!(plan.panic);
    let even: Vec<(SocketAddr, u32)> = (1..=4).map(|i| (address(i), 1)).collect();
    assert_eq!(weights(&plan), even);

    // 2 of 4: exactly 50% is not below 50%.
    let plan = View::new(&status("Serving"), 50).plan();
    assert!(!plan.panic);
    assert_eq!(weights(&plan), [(address(1), 300), (address(2), 100)]);

    // Threshold 0: never; nothing usable leaves the rotation empty.
    let nothing_usable = [entry(address(1), 100, "NotServing")];
    let plan = View::new(&nothing_usable, 0).plan();
    assert!(!plan.panic && plan.chosen.is_empty());
    let plan = View::new(&nothing_usable, 50).plan();
    assert!(plan.panic);
    assert_eq!(weights(&plan), [(address(1), 1)]);
}

#[test]
fn ejected_endpoints_leave_the_choice_keep_their_connection_and_count_toward_panic() {
    let status: Vec<Value> = (1..=4).map(|i| entry(address(i), 100, "Serving")).collect();
    let mut view = View::new(&status, 50);
    view.eject(address(1));
    let plan = view.plan();
    assert_eq!(
        weights(&plan),
        [(address(2), 100), (address(3), 100), (address(4), 100)]
    );
    assert_eq!(plan.ejected, [address(1)]);
    assert!(!plan.panic);

    // Three of four ejected: 25% usable, below 50%: every Kubernetes-ready one, ejected or not.
    view.eject(address(2));
    view.eject(address(3));
    let plan = view.plan();
    assert!(plan.panic);
    assert_eq!(plan.chosen.len(), 4);
    assert!(plan.ejected.is_empty(), "every connection is in rotation");
}

#[test]
fn a_zone_keeps_its_usable_endpoints_and_falls_back_to_every_zone_without_one() {
    let status = |a_health: &str| {
        [
            zoned(address(1), a_health, "a", &[]),
            zoned(address(2), "Serving", "b", &[]),
            // Hints decide over the own zone.
            zoned(address(3), "Serving", "b", &["a"]),
            zoned(address(4), "Serving", "a", &["b"]),
        ]
    };
    let mut view = View::new(&status("Serving"), 0);
    view.zone = Some("a");
    let plan = view.plan();
    assert_eq!(weights(&plan), [(address(1), 100), (address(3), 100)]);
    assert!(!plan.zone_fallback);

    // An ejected local endpoint stays connected; the others of other zones are not.
    view.eject(address(1));
    let plan = view.plan();
    assert_eq!(weights(&plan), [(address(3), 100)]);
    assert_eq!(plan.ejected, [address(1)]);

    // Nothing usable for zone a: every zone, and every ejected endpoint stays connected.
    view.eject(address(3));
    let plan = view.plan();
    assert!(plan.zone_fallback);
    assert_eq!(weights(&plan), [(address(2), 100), (address(4), 100)]);
    assert_eq!(plan.ejected, [address(1), address(3)]);

    // Without a zone there is no fallback to report.
    view.zone = None;
    assert!(!view.plan().zone_fallback);
    let mut view = View::new(&status("NotServing"), 0);
    view.zone = Some("c");
    assert!(view.plan().zone_fallback);
}

#[test]
fn panic_mode_ignores_the_zone() {
    let mut view = View::new(
        &[
            zoned(address(1), "Serving", "a", &[]),
            zoned(address(2), "NotServing", "a", &[]),
            zoned(address(3), "NotServing", "b", &[]),
        ],
        50,
    );
    view.zone = Some("a");
    let plan = view.plan();
    assert!(plan.panic && !plan.zone_fallback);
    assert_eq!(plan.chosen.len(), 3);
}

#[test]
fn slow_start_gives_a_recently_usable_endpoint_its_share_of_the_window() {
    let now_wall = SystemTime::now();
    let mut view = View::new(
        &[
            transitioned(address(1), 100, "Serving", now_wall - Duration::from_secs(50)),
            transitioned(address(2), 100, "Serving", now_wall - Duration::from_secs(100)),
            transitioned(address(3), 100, "NotServing", now_wall),
            entry(address(4), 100, "Serving"),
        ],
        0,
    );
    view.ramps.settings = SlowStart {
        window: Duration::from_secs(100),
        ..SlowStart::default()
    };
    view.ramps.follow(&view.endpoints, now_wall, view.now);
    let percents = |view: &View| -> Vec<Option<u32>> { view.plan().chosen.iter().map(|c| c.percent).collect() };
    // Half the window (linear): 50%; past the window and without a transition time: none.
    assert_eq!(percents(&view), [Some(50), None, None]);
    view.now += Duration::from_secs(25);
    assert_eq!(percents(&view), [Some(75), None, None]);
    view.now += Duration::from_secs(25);
    assert_eq!(percents(&view), [None, None, None]);

    // The same transition read again keeps its start; a new one starts over.
    let later = view.now;
    view.ramps
        .follow(&view.endpoints, now_wall + Duration::from_secs(50), later);
    assert_eq!(percents(&view), [None, None, None]);
    let back = endpoints(&[transitioned(
        address(1),
        100,
        "Serving",
        now_wall + Duration::from_secs(50),
    )]);
    view.ramps.follow(&back, now_wall + Duration::from_secs(50), later);
    assert_eq!(
        view.ramps.percent(&address(1), later),
        Some(10),
        "the minimum share first"
    );
}

#[test]
fn with_nothing_to_pick_the_reason_names_the_backend_and_the_cause() {
    let view = View::new(&[], 0);
    assert_eq!(
        view.why_unavailable(Presence::NotReadYet),
        "GrpcBackend default/echo: its status has not been read yet"
    );
    assert_eq!(
        view.why_unavailable(Presence::NotFound),
        "GrpcBackend default/echo not found"
    );
    assert_eq!(
        view.why_unavailable(Presence::Found),
        "GrpcBackend default/echo lists no endpoints"
    );

    let view = View::new(
        &[
            entry(address(1), 100, "NotServing"),
            entry(address(2), 0, "Serving"),
            with(entry(address(3), 100, "Unknown"), "serving", json!(false)),
        ],
        0,
    );
    assert_eq!(
        view.why_unavailable(Presence::Found),
        "GrpcBackend default/echo has no ready endpoints (3 listed, 2 Kubernetes-ready, 1 NotServing)"
    );

    let mut view = View::new(
        &[entry(address(1), 100, "Serving"), entry(address(2), 100, "Serving")],
        0,
    );
    view.eject(address(1));
    assert_eq!(
        view.why_unavailable(Presence::Found),
        "GrpcBackend default/echo: no endpoint can be connected to",
        "one usable endpoint is not ejected: its connection could not be configured"
    );
    view.eject(address(2));
    assert_eq!(
        view.why_unavailable(Presence::Found),
        "all 2 ready endpoints of GrpcBackend default/echo are ejected after connection failures"
    );
}
