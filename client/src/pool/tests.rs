//! The pool with its connections, to endpoints of an in-memory network (no socket): rotations,
//! ejections and their end, slow start's timer (on a paused clock), zones. The planning rules
//! alone are tested in `plan/tests.rs`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use serde_json::json;

use super::{Pool, PoolConfig, outlier_timer};
use crate::{
    endpoint::{Endpoint, SendError},
    failure::Failure,
    outlier::{OutlierDetection, ParsedOutlierDetection, parse_outlier_detection},
    slow_start::{ParsedSlowStart, SlowStart},
    snapshot::Snapshot,
    test_support::{BACKEND, MemoryNetwork, apply, entry, transitioned, zoned},
    tls::Transport,
};

/// A pool on `net` with the default outlier detection and no panic mode.
fn new_pool(net: &MemoryNetwork) -> Arc<Pool> {
    Pool::new(BACKEND.into(), net.config(OutlierDetection::default(), 0))
}

/// How often each endpoint is picked over one cycle of the rotation.
fn picks_per_cycle(pool: &Pool) -> HashMap<SocketAddr, usize> {
    let rotation = pool.rotation();
    let mut picks = HashMap::new();
    for _ in 0..rotation.picker.cycle_len() {
        let endpoint = rotation.picker.pick().expect("a non-empty rotation");
        *picks.entry(endpoint.address).or_default() += 1;
    }
    picks
}

fn connection(pool: &Pool, address: SocketAddr) -> Arc<Endpoint> {
    let rotation = pool.rotation();
    let endpoint = rotation.picker.items().iter().find(|e| e.address == address);
    endpoint.expect("the endpoint is in rotation").clone()
}

/// Waits (at most 10s) until the snapshot satisfies `condition`, woken by each rebuild.
async fn wait_until(pool: &Pool, what: &str, condition: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let mut version = pool.version.subscribe();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let snapshot = pool.snapshot();
            if condition(&snapshot) {
                return snapshot;
            }
            version.changed().await.expect("the pool is alive");
        }
    });
    match waited.await {
        Ok(snapshot) => snapshot,
        Err(_) => panic!("timed out waiting until {what}: {:#?}", pool.snapshot()),
    }
}

/// A real transport error: a connection refused.
async fn connect_error() -> tonic::transport::Error {
    let net = MemoryNetwork::default();
    let config = net.config(OutlierDetection::default(), 0);
    let endpoint =
        Endpoint::new(net.refusing(), false, &config.template, &config.dial, Arc::default()).expect("a valid endpoint");
    endpoint.warm_up().await.expect_err("the connection is refused")
}

async fn send_error(failure: Failure, consecutive_connect_failures: u32) -> SendError {
    SendError {
        error: connect_error().await,
        failure,
        consecutive_connect_failures,
    }
}

#[tokio::test]
async fn only_usable_endpoints_are_in_rotation_with_their_weights() {
    let net = MemoryNetwork::default();
    let [light, heavy, not_serving, unknown, weightless, not_ready, terminating] = [
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
    ];
    let pool = new_pool(&net);
    let mut not_ready_entry = entry(not_ready, 100, "Serving");
    not_ready_entry["serving"] = json!(false);
    let mut terminating_entry = entry(terminating, 100, "Serving");
    terminating_entry["terminating"] = json!(true);
    apply(
        &pool,
        &[
            entry(light, 100, "Serving"),
            entry(heavy, 300, "Serving"),
            entry(not_serving, 100, "NotServing"),
            entry(unknown, 100, "Unknown"),
            entry(weightless, 0, "Serving"),
            not_ready_entry,
            terminating_entry,
        ],
    );

    assert_eq!(picks_per_cycle(&pool), HashMap::from([(light, 1), (heavy, 3)]));
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.unavailable, None);
    assert!(!snapshot.panic);
    let in_rotation: Vec<SocketAddr> = snapshot
        .endpoints
        .iter()
        .filter(|e| e.in_rotation)
        .map(|e| e.address)
        .collect();
    assert_eq!(in_rotation, [light, heavy]);
    assert_eq!(snapshot.endpoints.len(), 7, "every listed endpoint is shown");
    assert!(!snapshot.endpoint(&not_ready).unwrap().kubernetes_ready);
    assert!(!snapshot.endpoint(&terminating).unwrap().kubernetes_ready);
}

#[tokio::test]
async fn with_no_usable_endpoint_the_reason_names_the_backend() {
    let net = MemoryNetwork::default();
    let pool = new_pool(&net);
    assert_eq!(
        pool.snapshot().unavailable.as_deref(),
        Some("GrpcBackend default/echo: its status has not been read yet")
    );

    apply(&pool, &[]);
    assert_eq!(
        pool.snapshot().unavailable.as_deref(),
        Some("GrpcBackend default/echo lists no endpoints")
    );

    let [not_serving, weightless] = [net.answering(), net.answering()];
    apply(
        &pool,
        &[entry(not_serving, 100, "NotServing"), entry(weightless, 0, "Serving")],
    );
    assert!(pool.rotation().picker.is_empty());
    assert_eq!(
        pool.snapshot().unavailable.as_deref(),
        Some("GrpcBackend default/echo has no ready endpoints (2 listed, 2 Kubernetes-ready, 1 NotServing)")
    );
}

#[tokio::test]
async fn a_missing_backend_empties_the_rotation_and_says_not_found() {
    let net = MemoryNetwork::default();
    let pool = new_pool(&net);
    apply(&pool, &[entry(net.answering(), 100, "Serving")]);
    assert!(!pool.rotation().picker.is_empty());

    pool.apply_missing();
    let snapshot = pool.snapshot();
    assert!(pool.rotation().picker.is_empty());
    assert!(snapshot.endpoints.is_empty());
    assert_eq!(
        snapshot.unavailable.as_deref(),
        Some("GrpcBackend default/echo not found")
    );
}

#[tokio::test]
async fn a_weight_change_keeps_the_connection() {
    let net = MemoryNetwork::default();
    let [first, second] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    apply(&pool, &[entry(first, 100, "Serving"), entry(second, 100, "Serving")]);
    let before = connection(&pool, first);

    apply(&pool, &[entry(first, 300, "Serving"), entry(second, 100, "Serving")]);
    assert!(Arc::ptr_eq(&before, &connection(&pool, first)), "not reconnected");
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(first, 3), (second, 1)]));
    assert_eq!(pool.snapshot().endpoint(&first).unwrap().weight, 300);
}

#[tokio::test]
async fn below_the_panic_threshold_every_kubernetes_ready_endpoint_is_in_rotation() {
    let net = MemoryNetwork::default();
    let [serving, not_serving, unknown, weightless, terminating] = [
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
        net.answering(),
    ];
    let pool = Pool::new(BACKEND.into(), net.config(OutlierDetection::default(), 50));
    let mut terminating_entry = entry(terminating, 100, "Serving");
    terminating_entry["terminating"] = json!(true);
    // One usable of three Kubernetes-ready: 33% < 50%. The Serving endpoint of weight 0 was
    // weighted out on purpose: not counted, not used in panic.
    apply(
        &pool,
        &[
            entry(serving, 300, "Serving"),
            entry(not_serving, 100, "NotServing"),
            entry(unknown, 100, "Unknown"),
            entry(weightless, 0, "Serving"),
            terminating_entry,
        ],
    );

    assert!(pool.rotation().panic && pool.snapshot().panic);
    let spread_evenly = HashMap::from([(serving, 1), (not_serving, 1), (unknown, 1)]);
    assert_eq!(picks_per_cycle(&pool), spread_evenly);
    assert!(!pool.snapshot().endpoint(&terminating).unwrap().in_rotation);

    // Two usable of three: 67% is not below the threshold; panic mode ends.
    let mut terminating_entry = entry(terminating, 100, "Serving");
    terminating_entry["terminating"] = json!(true);
    apply(
        &pool,
        &[
            entry(serving, 300, "Serving"),
            entry(not_serving, 100, "Serving"),
            entry(unknown, 100, "Unknown"),
            entry(weightless, 0, "Serving"),
            terminating_entry,
        ],
    );
    assert!(!pool.snapshot().panic);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(serving, 3), (not_serving, 1)]));
}

#[tokio::test]
async fn consecutive_connect_failures_eject_at_once() {
    let net = MemoryNetwork::default();
    let [failing, other] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    apply(&pool, &[entry(failing, 100, "Serving"), entry(other, 100, "Serving")]);
    let threshold = pool.outlier_detection().consecutive_connect_failures;

    pool.report_failure(failing, &send_error(Failure::Connect, threshold - 1).await);
    assert!(pool.snapshot().endpoint(&failing).unwrap().in_rotation, "not yet");

    pool.report_failure(failing, &send_error(Failure::Connect, threshold).await);
    let snapshot = pool.snapshot();
    let ejected = snapshot.endpoint(&failing).unwrap();
    assert!(ejected.ejected && !ejected.in_rotation, "{ejected:?}");
    assert_eq!(ejected.ejections, 1);
    assert!(snapshot.endpoint(&other).unwrap().in_rotation);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(other, 1)]));
}

#[tokio::test]
async fn rotation_failures_never_eject() {
    let net = MemoryNetwork::default();
    let failing = net.answering();
    let pool = new_pool(&net);
    apply(&pool, &[entry(failing, 100, "Serving")]);
    let threshold = pool.outlier_detection().consecutive_connect_failures;

    pool.report_failure(failing, &send_error(Failure::Rotation, threshold).await);
    let snapshot = pool.snapshot();
    let endpoint = snapshot.endpoint(&failing).unwrap();
    assert!(!endpoint.ejected && endpoint.in_rotation, "{endpoint:?}");
    assert_eq!(endpoint.ejections, 0);
}

#[tokio::test]
async fn an_ejection_whose_time_is_up_comes_back_after_warming_up() {
    let net = MemoryNetwork::default();
    let address = net.answering();
    let outlier_detection = OutlierDetection {
        base_ejection_time: Duration::ZERO,
        ..OutlierDetection::default()
    };
    let pool = Pool::new(BACKEND.into(), net.config(outlier_detection, 0));
    apply(&pool, &[entry(address, 100, "Serving")]);
    let threshold = pool.outlier_detection().consecutive_connect_failures;
    pool.report_failure(address, &send_error(Failure::Connect, threshold).await);
    assert_eq!(
        pool.snapshot().unavailable.as_deref(),
        Some("all 1 ready endpoints of GrpcBackend default/echo are ejected after connection failures")
    );

    // Its time is up: it connects again before it takes requests (nothing has run yet on
    // this single-threaded runtime).
    pool.end_interval();
    let warming = pool.snapshot();
    assert!(warming.endpoints[0].ejected && !warming.endpoints[0].in_rotation);

    let back = wait_until(&pool, "the endpoint is back in rotation", |s| {
        s.endpoints[0].in_rotation
    })
    .await;
    assert!(!back.endpoints[0].ejected);
    assert_eq!(back.endpoints[0].ejections, 1);
    assert_eq!(back.unavailable, None);
    assert_eq!(back.outlier_intervals, 1);
}

#[tokio::test]
async fn a_new_endpoint_that_refuses_connections_is_ejected() {
    let net = MemoryNetwork::default();
    let [answering, refusing] = [net.answering(), net.refusing()];
    let pool = new_pool(&net);
    apply(
        &pool,
        &[entry(answering, 100, "Serving"), entry(refusing, 100, "Serving")],
    );

    let snapshot = wait_until(&pool, "the refusing endpoint is ejected", |s| {
        s.endpoint(&refusing).unwrap().ejected
    })
    .await;
    assert!(!snapshot.endpoint(&refusing).unwrap().in_rotation);
    assert!(snapshot.endpoint(&answering).unwrap().in_rotation);
}

#[tokio::test]
async fn an_endpoint_still_refusing_after_its_ejection_is_ejected_again() {
    let net = MemoryNetwork::default();
    let refusing = net.refusing();
    let outlier_detection = OutlierDetection {
        base_ejection_time: Duration::ZERO,
        ..OutlierDetection::default()
    };
    let pool = Pool::new(BACKEND.into(), net.config(outlier_detection, 0));
    apply(&pool, &[entry(refusing, 100, "Serving")]);
    wait_until(&pool, "the refusing endpoint is ejected", |s| {
        s.endpoints[0].ejections == 1
    })
    .await;

    pool.end_interval();
    let snapshot = wait_until(&pool, "it is ejected again", |s| s.endpoints[0].ejections == 2).await;
    assert!(snapshot.endpoints[0].ejected && !snapshot.endpoints[0].in_rotation);
}

// === outlier detection settings from the spec ===

/// A pool on `net` that follows the spec's outlier detection (none set in code).
fn spec_following_pool(net: &MemoryNetwork) -> Arc<Pool> {
    let config = PoolConfig {
        outlier_detection: None,
        ..net.config(OutlierDetection::default(), 0)
    };
    Pool::new(BACKEND.into(), config)
}

fn spec_settings(od: serde_json::Value) -> ParsedOutlierDetection {
    let parsed = parse_outlier_detection(Some(&json!({"outlierDetection": od})));
    assert_eq!(parsed.warning, None);
    parsed
}

#[tokio::test]
async fn the_spec_sets_outlier_detection_and_a_change_applies_without_reconnecting() {
    let net = MemoryNetwork::default();
    let [failing, other] = [net.answering(), net.answering()];
    let pool = spec_following_pool(&net);
    assert_eq!(pool.snapshot().outlier_detection, OutlierDetection::default());
    apply(&pool, &[entry(failing, 100, "Serving"), entry(other, 100, "Serving")]);
    let opened = |pool: &Pool| -> u64 { pool.snapshot().endpoints.iter().map(|e| e.connections_opened).sum() };
    tokio::time::timeout(Duration::from_secs(10), async {
        while opened(&pool) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both endpoints connect");

    pool.apply_outlier_detection(spec_settings(json!({"consecutiveConnectFailures": 2})));
    assert_eq!(pool.snapshot().outlier_detection.consecutive_connect_failures, 2);
    pool.report_failure(failing, &send_error(Failure::Connect, 2).await);
    assert!(
        pool.snapshot().endpoint(&failing).unwrap().ejected,
        "2 in a row, as the spec says"
    );
    assert_eq!(opened(&pool), 2, "no endpoint reconnected for the new settings");

    // Turned off: every ejection ends at once (gRFC A50), and nothing ejects any more.
    pool.apply_outlier_detection(spec_settings(json!({"enabled": false})));
    let snapshot = pool.snapshot();
    let back = snapshot.endpoint(&failing).unwrap();
    assert!(!back.ejected && back.in_rotation, "{back:?}");
    pool.report_failure(failing, &send_error(Failure::Connect, 100).await);
    assert!(!pool.snapshot().endpoint(&failing).unwrap().ejected);
    assert_eq!(opened(&pool), 2);
}

#[tokio::test]
async fn settings_set_in_code_win_over_the_spec() {
    let net = MemoryNetwork::default();
    let failing = net.answering();
    let pool = new_pool(&net);
    apply(&pool, &[entry(failing, 100, "Serving")]);
    pool.apply_outlier_detection(spec_settings(json!({"enabled": false})));
    assert_eq!(pool.snapshot().outlier_detection, OutlierDetection::default());
    let threshold = pool.outlier_detection().consecutive_connect_failures;
    pool.report_failure(failing, &send_error(Failure::Connect, threshold).await);
    assert!(pool.snapshot().endpoint(&failing).unwrap().ejected);
}

#[tokio::test(start_paused = true)]
async fn the_interval_timer_follows_a_new_interval_from_the_spec() {
    let net = MemoryNetwork::default();
    let pool = spec_following_pool(&net);
    let timer = tokio::spawn(outlier_timer(Arc::downgrade(&pool), BACKEND.into()));
    let intervals = |pool: &Pool| pool.snapshot().outlier_intervals;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(intervals(&pool), 0, "the default interval is 10s");

    pool.apply_outlier_detection(spec_settings(json!({"interval": "1s"})));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(intervals(&pool), 1, "1s from the change");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(intervals(&pool), 4);

    // The same settings read again (every status write brings the spec) restart nothing.
    pool.apply_outlier_detection(spec_settings(json!({"interval": "1s"})));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(intervals(&pool), 5);

    drop(pool);
    tokio::time::timeout(Duration::from_secs(5), timer)
        .await
        .expect("the timer ends with its pool")
        .expect("no panic");
}

// === slow start ===

fn slow_start(window: Duration) -> ParsedSlowStart {
    ParsedSlowStart {
        settings: SlowStart {
            window,
            ..SlowStart::default()
        },
        warnings: Vec::new(),
    }
}

fn ramp_timer_running(pool: &Pool) -> bool {
    pool.lock().slow_start.timer_running
}

fn ramp_timers(pool: &Pool) -> u64 {
    pool.ramp_timers.load(Ordering::Relaxed)
}

/// On a paused clock: the timer ticks at exact instants, and the test sleeps between them.
#[tokio::test(start_paused = true)]
async fn a_new_endpoints_share_climbs_to_its_weight_then_the_timer_stops() {
    let net = MemoryNetwork::default();
    let [old, new] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    // A 2 s window: the shares are recomputed every 100 ms (2% of the window, at least 100 ms).
    pool.apply_spec(slow_start(Duration::from_secs(2)));
    let long_ago = SystemTime::now() - Duration::from_secs(600);
    // The first status read lists `new` as just usable: it is new for every client. Its
    // transition time is ahead of the client's clock (skew), which counts as now: the ramp
    // starts exactly at the read, however long the busy machine takes to get there.
    let just_now = SystemTime::now() + Duration::from_secs(60);
    let status = [
        transitioned(old, 100, "Serving", long_ago),
        transitioned(new, 100, "Serving", just_now),
    ];
    apply(&pool, &status);

    let first = pool.snapshot();
    let (old_seen, new_seen) = (first.endpoint(&old).unwrap(), first.endpoint(&new).unwrap());
    assert_eq!((old_seen.effective_weight, old_seen.slow_start_percent), (100, None));
    assert_eq!(new_seen.slow_start_percent, Some(10), "the minimum share first");
    assert_eq!(new_seen.effective_weight, 10, "weight 100: the percentage");
    assert_eq!(new_seen.weight, 100, "the published weight is kept");
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(old, 10), (new, 1)]));
    assert!(ramp_timer_running(&pool));
    let connection_before = connection(&pool, new);

    // Half the window later (the last tick at 1 s): half the weight, the curve being linear.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(pool.snapshot().endpoint(&new).unwrap().slow_start_percent, Some(50));
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(old, 2), (new, 1)]));

    // The tick at 2 s finds the ramp over: the full weight, and the timer ends there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ramped = pool.snapshot();
    let new_seen = ramped.endpoint(&new).unwrap();
    assert_eq!((new_seen.effective_weight, new_seen.slow_start_percent), (100, None));
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(old, 1), (new, 1)]));
    assert!(
        Arc::ptr_eq(&connection_before, &connection(&pool, new)),
        "every step kept the connection"
    );
    assert!(!ramp_timer_running(&pool));

    // The same status read again starts no timer.
    let version = *pool.version.borrow();
    apply(&pool, &status);
    assert_eq!(*pool.version.borrow(), version + 1, "one rebuild, for the status read");
    assert!(!ramp_timer_running(&pool));
    assert_eq!(ramp_timers(&pool), 1);

    // Another endpoint turning usable starts a timer again.
    let later = net.answering();
    let mut status = status.to_vec();
    status.push(transitioned(later, 100, "Serving", just_now));
    apply(&pool, &status);
    assert_eq!(pool.snapshot().endpoint(&later).unwrap().slow_start_percent, Some(10));
    assert_eq!(ramp_timers(&pool), 2);
}

#[tokio::test]
async fn without_slow_start_or_with_an_old_transition_the_full_weight_applies_at_once() {
    let net = MemoryNetwork::default();
    let [first, second] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    let now = SystemTime::now();
    let status = [
        transitioned(first, 100, "Serving", now),
        transitioned(second, 300, "Serving", now - Duration::from_secs(61)),
    ];
    apply(&pool, &status);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(first, 1), (second, 3)]), "off");

    pool.apply_spec(slow_start(Duration::from_secs(60)));
    let mut status = status.to_vec();
    status[0] = transitioned(first, 100, "Serving", now - Duration::from_secs(60));
    apply(&pool, &status);
    let snapshot = pool.snapshot();
    assert!(
        snapshot.endpoints.iter().all(|e| e.slow_start_percent.is_none()),
        "{snapshot:#?}"
    );
    assert_eq!(snapshot.endpoint(&second).unwrap().effective_weight, 300);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(first, 1), (second, 3)]));
    assert_eq!(ramp_timers(&pool), 0, "no timer for nothing to ramp");
}

#[tokio::test]
async fn a_not_usable_endpoint_does_not_ramp_until_it_is_usable() {
    let net = MemoryNetwork::default();
    let [serving, coming] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    pool.apply_spec(slow_start(Duration::from_secs(600)));
    let now = SystemTime::now();
    apply(
        &pool,
        &[
            entry(serving, 100, "Serving"),
            transitioned(coming, 100, "NotServing", now),
        ],
    );
    assert_eq!(ramp_timers(&pool), 0);
    let snapshot = pool.snapshot();
    assert_eq!(
        snapshot.endpoint(&coming).unwrap().effective_weight,
        0,
        "not in rotation"
    );

    apply(
        &pool,
        &[
            entry(serving, 100, "Serving"),
            transitioned(coming, 100, "Serving", now),
        ],
    );
    let percent = pool.snapshot().endpoint(&coming).unwrap().slow_start_percent;
    assert!(percent.is_some_and(|p| p < 100), "{percent:?}");
    assert_eq!(ramp_timers(&pool), 1);
}

#[tokio::test]
async fn a_new_zone_or_the_end_of_slow_start_does_not_readmit_an_ejected_endpoint() {
    let net = MemoryNetwork::default();
    let [failing, other] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    let since = SystemTime::now() - Duration::from_secs(5);
    apply(
        &pool,
        &[
            transitioned(failing, 100, "Serving", since),
            entry(other, 100, "Serving"),
        ],
    );
    let threshold = pool.outlier_detection().consecutive_connect_failures;
    pool.report_failure(failing, &send_error(Failure::Connect, threshold).await);
    assert!(pool.snapshot().endpoint(&failing).unwrap().ejected);

    apply(
        &pool,
        &[zoned(failing, "Serving", "a", &["b"]), entry(other, 100, "Serving")],
    );
    assert!(
        pool.snapshot().endpoint(&failing).unwrap().ejected,
        "no news about its health"
    );

    apply(&pool, &[entry(failing, 200, "Serving"), entry(other, 100, "Serving")]);
    assert!(!pool.snapshot().endpoint(&failing).unwrap().ejected, "news: readmitted");
}

// === zones ===

#[tokio::test]
async fn a_client_in_a_zone_stays_in_it_while_it_can_and_comes_back() {
    let net = MemoryNetwork::default();
    let [a1, a2, b1, b2] = [net.answering(), net.answering(), net.answering(), net.answering()];
    let pool = new_pool(&net);
    pool.set_zone(Some("a".into()));
    let status = |a_health: &str| {
        [
            zoned(a1, a_health, "a", &[]),
            zoned(a2, a_health, "a", &[]),
            zoned(b1, "Serving", "b", &[]),
            zoned(b2, "Serving", "b", &[]),
        ]
    };
    apply(&pool, &status("Serving"));
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(a1, 1), (a2, 1)]));
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.zone.as_deref(), Some("a"));
    assert!(!snapshot.zone_fallback);
    let local: Vec<bool> = snapshot.endpoints.iter().map(|e| e.local).collect();
    assert_eq!(local, [true, true, false, false]);
    assert_eq!(snapshot.endpoint(&b1).unwrap().effective_weight, 0, "not in rotation");
    assert_eq!(snapshot.endpoint(&b1).unwrap().zone.as_deref(), Some("b"));
    let b_connected = snapshot.endpoint(&b1).unwrap().connections_opened;
    assert_eq!(b_connected, 0, "no connection to another zone while the own one serves");

    // Zone a has nothing usable: every zone takes requests.
    apply(&pool, &status("NotServing"));
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(b1, 1), (b2, 1)]));
    assert!(pool.snapshot().zone_fallback);

    // One of a's endpoints is back: requests go back to it alone.
    let mut back = status("NotServing");
    back[0] = zoned(a1, "Serving", "a", &[]);
    apply(&pool, &back);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(a1, 1)]));
    assert!(!pool.snapshot().zone_fallback);
}

#[tokio::test]
async fn ejected_local_endpoints_send_requests_to_every_zone() {
    let net = MemoryNetwork::default();
    let [a, b] = [net.answering(), net.answering()];
    let pool = new_pool(&net);
    pool.set_zone(Some("a".into()));
    apply(&pool, &[zoned(a, "Serving", "a", &[]), zoned(b, "Serving", "b", &[])]);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(a, 1)]));

    let threshold = pool.outlier_detection().consecutive_connect_failures;
    pool.report_failure(a, &send_error(Failure::Connect, threshold).await);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(b, 1)]));
    let snapshot = pool.snapshot();
    assert!(snapshot.zone_fallback && snapshot.endpoint(&a).unwrap().ejected);
}

#[tokio::test]
async fn hints_decide_over_the_endpoints_own_zone() {
    let net = MemoryNetwork::default();
    let [in_a_for_b, in_b_for_a, in_b] = [net.answering(), net.answering(), net.answering()];
    let pool = new_pool(&net);
    pool.set_zone(Some("a".into()));
    apply(
        &pool,
        &[
            zoned(in_a_for_b, "Serving", "a", &["b"]),
            zoned(in_b_for_a, "Serving", "b", &["a", "c"]),
            zoned(in_b, "Serving", "b", &[]),
        ],
    );
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(in_b_for_a, 1)]));
    let local: Vec<bool> = pool.snapshot().endpoints.iter().map(|e| e.local).collect();
    assert_eq!(local, [false, true, false]);

    pool.set_zone(Some("b".into()));
    assert_eq!(
        picks_per_cycle(&pool),
        HashMap::from([(in_a_for_b, 1), (in_b, 1)]),
        "the zone can change; b's hints and b's unhinted endpoint"
    );
}

#[tokio::test]
async fn without_a_zone_every_zone_is_in_rotation() {
    let net = MemoryNetwork::default();
    let [a, b, none] = [net.answering(), net.answering(), net.answering()];
    let pool = new_pool(&net);
    let status = [
        zoned(a, "Serving", "a", &[]),
        zoned(b, "Serving", "b", &["b"]),
        entry(none, 100, "Serving"),
    ];
    apply(&pool, &status);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(a, 1), (b, 1), (none, 1)]));
    let snapshot = pool.snapshot();
    assert_eq!((snapshot.zone.as_deref(), snapshot.zone_fallback), (None, false));
    assert!(snapshot.endpoints.iter().all(|e| !e.local));

    // An empty zone is no zone (a downward-API variable left empty).
    pool.set_zone(Some(String::new()));
    assert_eq!(pool.snapshot().zone, None);
    assert_eq!(picks_per_cycle(&pool).len(), 3);

    // A zone no endpoint is for: every zone.
    pool.set_zone(Some("c".into()));
    assert_eq!(picks_per_cycle(&pool).len(), 3);
    assert!(pool.snapshot().zone_fallback);
}

#[tokio::test]
async fn panic_mode_is_decided_over_every_zone_and_spreads_over_every_zone() {
    let net = MemoryNetwork::default();
    let [a_up, a_down, b_down, c_down] = [net.answering(), net.answering(), net.answering(), net.answering()];
    let pool = Pool::new(BACKEND.into(), net.config(OutlierDetection::default(), 50));
    pool.set_zone(Some("a".into()));
    // One usable of four Kubernetes-ready, in every zone together: 25% < 50%.
    apply(
        &pool,
        &[
            zoned(a_up, "Serving", "a", &[]),
            zoned(a_down, "NotServing", "a", &[]),
            zoned(b_down, "NotServing", "b", &[]),
            zoned(c_down, "NotServing", "c", &[]),
        ],
    );
    let snapshot = pool.snapshot();
    assert!(snapshot.panic && !snapshot.zone_fallback);
    assert_eq!(
        picks_per_cycle(&pool),
        HashMap::from([(a_up, 1), (a_down, 1), (b_down, 1), (c_down, 1)])
    );

    // Two of four usable: no panic, and zone a keeps its one usable endpoint.
    apply(
        &pool,
        &[
            zoned(a_up, "Serving", "a", &[]),
            zoned(a_down, "NotServing", "a", &[]),
            zoned(b_down, "Serving", "b", &[]),
            zoned(c_down, "NotServing", "c", &[]),
        ],
    );
    assert!(!pool.snapshot().panic);
    assert_eq!(picks_per_cycle(&pool), HashMap::from([(a_up, 1)]));
}

#[tokio::test]
async fn a_tls_backend_the_client_cannot_connect_to_uses_no_endpoint_and_says_why() {
    let net = MemoryNetwork::default();
    let (a, b) = (net.answering(), net.answering());
    let pool = new_pool(&net);
    let why = "GrpcBackend default/echo: its backends serve TLS (spec.tls, server name echo.default.svc), but this \
               program was built without the kubegrpc crate's `tls` feature";
    pool.apply_transport(Transport::Unavailable(why.into()));
    apply(&pool, &[entry(a, 100, "Serving"), entry(b, 100, "Serving")]);
    assert!(pool.rotation().picker.is_empty(), "never plaintext to a TLS backend");
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.unavailable.as_deref(), Some(why));
    let opened: u64 = snapshot.endpoints.iter().map(|e| e.connections_opened).sum();
    assert_eq!((snapshot.endpoints.len(), opened), (2, 0), "listed, never connected to");

    // spec.tls removed: plaintext again, both in rotation.
    pool.apply_transport(Transport::Plaintext);
    assert_eq!(picks_per_cycle(&pool).len(), 2);
    assert_eq!(pool.snapshot().unavailable, None);
}
