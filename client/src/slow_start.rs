//! Client-side slow start, with Envoy's formula.
//!
//! The operator publishes each endpoint's full weight and, per status entry, when its health or
//! readiness last changed (`lastTransitionTime`). A client gives an endpoint that became usable
//! less than `spec.weighting.slowStartWindow` ago only part of its weight:
//!
//! ```text
//! weight x max(minWeightPercent / 100, (t / window) ^ (1 / aggression))    while 0 <= t < window
//! weight                                                                  otherwise
//! ```
//!
//! where `t` is the time since `lastTransitionTime` (a time in the future counts as now). The
//! settings come from the watched object's `spec.weighting`, read leniently: a bad value gives a
//! warning and its default (slow start off for a bad window), never an error.
//!
//! The share is kept in whole percent of the endpoint's weight, so the picker is only rebuilt
//! when some endpoint's percentage changes (at most about a hundred times per ramp), and the
//! picker's weights stay integers (`weight x percent`, reduced by their gcd).
//!
//! Time runs on the monotonic clock: the published wall-clock time is turned into a monotonic
//! start once, when the entry is read, so that a wall-clock step during a ramp does not restart
//! or end it.

use std::time::{Duration, SystemTime};

pub use kubegrpc_crds::slow_start::{MAX_WINDOW, SlowStart, picker_weights};
use kubegrpc_crds::{DEFAULT_SLOW_START_AGGRESSION, DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT};
use serde_json::Value;
use tokio::time::Instant;

/// Where a ramp starts on the monotonic clock, for an entry whose `lastTransitionTime` is
/// `since`, read at wall time `now_wall` and monotonic time `now`. A time in the future counts
/// as now; `None` when the transition is older than any window can be (nothing to ramp).
pub fn ramp_start(since: SystemTime, now_wall: SystemTime, now: Instant) -> Option<Instant> {
    let age = now_wall.duration_since(since).unwrap_or(Duration::ZERO);
    if age >= MAX_WINDOW {
        return None;
    }
    // Only fails on a host up for less than `age`: ramp from now rather than not at all.
    Some(now.checked_sub(age).unwrap_or(now))
}

/// The slow-start percentage at `now` of an endpoint whose ramp started at `start`.
pub fn ramp_percent(settings: &SlowStart, start: Option<Instant>, now: Instant) -> Option<u32> {
    settings.percent(now.saturating_duration_since(start?))
}

/// An endpoint's weight in use, in the units of its published weight (rounded; at least 1 for
/// a weight above 0).
pub fn shown_weight(weight: u32, percent: Option<u32>) -> u32 {
    match percent {
        None => weight,
        Some(_) if weight == 0 => 0,
        Some(percent) => {
            let shown = (u64::from(weight) * u64::from(percent) + 50) / 100;
            u32::try_from(shown).unwrap_or(u32::MAX).max(1)
        }
    }
}

/// Slow-start settings read from a spec, and what had to be ignored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedSlowStart {
    /// The settings in use: those read, or the defaults of the fields that were not valid.
    pub settings: SlowStart,
    /// One line per ignored field, saying why and what is used instead.
    pub warnings: Vec<String>,
}

/// Reads `weighting.slowStartWindow`, `slowStartAggression` and `slowStartMinWeightPercent`
/// from a GrpcBackend's `spec` value. Never fails: each bad field is reported and replaced by
/// its default (a bad window turns slow start off).
pub fn parse_slow_start(spec: Option<&Value>) -> ParsedSlowStart {
    let mut parsed = ParsedSlowStart::default();
    let weighting = match spec {
        Some(Value::Object(spec)) => match spec.get("weighting") {
            None | Some(Value::Null) => return parsed,
            Some(Value::Object(weighting)) => weighting,
            Some(_) => {
                parsed
                    .warnings
                    .push("spec.weighting is not an object; slow start off".into());
                return parsed;
            }
        },
        _ => return parsed,
    };
    let warnings = &mut parsed.warnings;
    let settings = &mut parsed.settings;

    match weighting.get("slowStartWindow") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => match parse_go_duration(text) {
            Ok(window) if window > MAX_WINDOW => warnings.push(format!(
                "spec.weighting.slowStartWindow {text:?} is longer than 1h; slow start off"
            )),
            Ok(window) => settings.window = window,
            Err(why) => warnings.push(format!(
                "spec.weighting.slowStartWindow {text:?} is not a duration ({why}); slow start off"
            )),
        },
        Some(other) => warnings.push(format!(
            "spec.weighting.slowStartWindow {other} is not a duration string such as \"30s\"; slow start off"
        )),
    }

    match weighting.get("slowStartAggression") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_f64().is_some_and(|a| (0.1..=10.0).contains(&a)) => {
            settings.aggression = n.as_f64().unwrap_or(DEFAULT_SLOW_START_AGGRESSION);
        }
        Some(other) => warnings.push(format!(
            "spec.weighting.slowStartAggression {other} is not a number from 0.1 to 10; using {DEFAULT_SLOW_START_AGGRESSION}"
        )),
    }

    match weighting.get("slowStartMinWeightPercent") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if whole_percent(n).is_some() => {
            settings.min_weight_percent = whole_percent(n).unwrap_or(DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT);
        }
        Some(other) => warnings.push(format!(
            "spec.weighting.slowStartMinWeightPercent {other} is not a whole number from 1 to 100; using {DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT}"
        )),
    }
    parsed
}

/// A JSON number that is a whole number from 1 to 100 (`10` or `10.0`).
fn whole_percent(n: &serde_json::Number) -> Option<u32> {
    let value = n.as_f64()?;
    (value.fract() == 0.0 && (1.0..=100.0).contains(&value)).then_some(value as u32)
}

/// Parses a Go duration string (`time.ParseDuration`'s format: "30s", "1m30s", "1.5h",
/// "500ms", "0"), without panicking on any input. Negative durations are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err("empty".into());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err("a number is missing".into());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{00b5}s" | "\u{03bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("a unit is missing (ns, us, ms, s, m or h)".into()),
            _ => return Err(format!("unknown unit {unit:?} (ns, us, ms, s, m or h)")),
        };
        let too_long = || "too long".to_string();
        if whole.len() > 20 {
            return Err(too_long());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_long())?
        };
        // Digits past the 18th are below a nanosecond of any unit: dropped, as Go does.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().map_err(|_| too_long())?;
            digits * unit_nanos / 10u128.pow(fraction.len() as u32)
        };
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|nanos| nanos.checked_add(fraction_nanos))
            .and_then(|nanos| nanos.checked_add(total))
            .filter(|nanos| *nanos <= u128::from(u64::MAX))
            .ok_or_else(too_long)?;
        rest = next;
    }
    if negative && total > 0 {
        return Err("negative".into());
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// The picker's weights at `now` for endpoints given as (published weight, ramp start), as
    /// the pool computes them.
    fn effective_weights(entries: &[(u32, Option<Instant>)], settings: &SlowStart, now: Instant) -> Vec<u32> {
        let chosen: Vec<(u32, Option<u32>)> = entries
            .iter()
            .map(|(weight, start)| (*weight, ramp_percent(settings, *start, now)))
            .collect();
        picker_weights(&chosen)
    }

    fn settings(window_secs: u64, aggression: f64, min_weight_percent: u32) -> SlowStart {
        SlowStart {
            window: Duration::from_secs(window_secs),
            aggression,
            min_weight_percent,
        }
    }

    fn assert_near(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() < 1e-12,
            "{what}: {actual}, expected {expected}"
        );
    }

    #[test]
    fn envoys_formula_on_plain_numbers() {
        let linear = settings(100, 1.0, 10);
        assert_near(linear.factor(Duration::ZERO), 0.10, "t = 0: the minimum");
        assert_eq!(linear.percent(Duration::ZERO), Some(10));
        assert_near(
            linear.factor(Duration::from_secs(5)),
            0.10,
            "below the minimum: the minimum",
        );
        assert_near(
            linear.factor(Duration::from_secs(50)),
            0.5,
            "half the window, linear: half",
        );
        assert_eq!(linear.percent(Duration::from_secs(50)), Some(50));
        assert_near(linear.factor(Duration::from_secs(75)), 0.75, "three quarters");

        let aggressive = settings(100, 2.0, 10);
        assert_near(
            aggressive.factor(Duration::from_secs(50)),
            0.5f64.sqrt(),
            "aggression 2: sqrt",
        );
        assert_near(aggressive.factor(Duration::from_secs(25)), 0.5, "aggression 2: sqrt");
        assert_eq!(aggressive.percent(Duration::from_secs(50)), Some(71));

        let gentle = settings(100, 0.5, 1);
        assert_near(gentle.factor(Duration::from_secs(50)), 0.25, "aggression 0.5: squared");
        let higher_floor = settings(100, 1.0, 60);
        assert_near(
            higher_floor.factor(Duration::from_secs(50)),
            0.6,
            "never below the minimum",
        );

        for past in [100, 101, 100_000] {
            assert_eq!(linear.factor(Duration::from_secs(past)), 1.0, "past the window: full");
            assert_eq!(linear.percent(Duration::from_secs(past)), None, "and not ramping");
        }
        assert_eq!(SlowStart::default().factor(Duration::ZERO), 1.0, "off: full");
        assert_eq!(SlowStart::default().percent(Duration::ZERO), None);
    }

    #[test]
    fn a_transition_in_the_future_counts_as_now_and_an_old_one_does_not_ramp() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let future = wall + Duration::from_secs(30);
        assert_eq!(ramp_start(future, wall, now), Some(now));
        assert_eq!(
            ramp_percent(&settings(10, 1.0, 10), ramp_start(future, wall, now), now),
            Some(10)
        );

        assert_eq!(ramp_start(wall - MAX_WINDOW, wall, now), None);
        assert_eq!(ramp_percent(&settings(10, 1.0, 10), None, now), None);
        // Older than the window but not than an hour: kept, and fully ramped.
        let start = ramp_start(wall - Duration::from_secs(20), wall, now);
        assert_eq!(ramp_percent(&settings(10, 1.0, 10), start, now), None);
    }

    #[test]
    fn a_ramping_endpoints_share_climbs_over_time_to_its_full_weight() {
        let linear = settings(10, 1.0, 10);
        let t0 = Instant::now();
        let entries = [(100, None), (100, Some(t0))];
        let mut last_share = 0.0;
        for second in 0..=12 {
            let weights = effective_weights(&entries, &linear, t0 + Duration::from_secs(second));
            let share = f64::from(weights[1]) / f64::from(weights[0] + weights[1]);
            match second {
                0 => assert_eq!(weights, [10_000, 1_000], "the minimum, 10%"),
                5 => assert_eq!(weights, [10_000, 5_000]),
                10.. => assert_eq!(weights, [100, 100], "the published weights once ramped"),
                _ => {}
            }
            // From 0 to 1s the linear curve is below the 10% floor; it climbs from there.
            if (2..=10).contains(&second) {
                assert!(share > last_share, "second {second}: {share} after {last_share}");
            } else {
                assert!(share >= last_share, "second {second}: {share} after {last_share}");
            }
            last_share = share;
        }
        let aggressive = settings(10, 4.0, 10);
        let early = effective_weights(&entries, &aggressive, t0 + Duration::from_secs(1));
        let linear_early = effective_weights(&entries, &linear, t0 + Duration::from_secs(1));
        assert!(early[1] > linear_early[1], "more aggression, more early on");
    }

    #[test]
    fn nothing_ramping_keeps_the_published_weights_and_huge_weights_fit() {
        assert_eq!(picker_weights(&[(3, None), (0, None), (7, None)]), [3, 0, 7]);
        let huge = picker_weights(&[(u32::MAX, None), (u32::MAX, Some(50)), (0, Some(10)), (1, Some(1))]);
        assert_eq!(huge[0], u32::MAX);
        assert_eq!(huge[1], u32::MAX / 2);
        assert_eq!(huge[2], 0, "zero stays zero");
        assert_eq!(huge[3], 1, "a weight above 0 keeps a slot");
        assert_eq!(shown_weight(100, Some(37)), 37);
        assert_eq!(shown_weight(1, Some(10)), 1);
        assert_eq!(shown_weight(7, None), 7);
    }

    #[test]
    fn ticks_follow_the_window_within_bounds() {
        assert_eq!(settings(30, 1.0, 10).tick(), Duration::from_millis(600));
        assert_eq!(settings(3600, 1.0, 10).tick(), Duration::from_secs(1));
        assert_eq!(
            SlowStart {
                window: Duration::from_millis(500),
                ..SlowStart::default()
            }
            .tick(),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn go_durations_are_read_as_go_reads_them() {
        let ok = |text: &str| parse_go_duration(text).unwrap_or_else(|why| panic!("{text}: {why}"));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("1h2m3.004s"), Duration::from_millis(3_723_004));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("10µs"), Duration::from_micros(10));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("+5s"), Duration::from_secs(5));
        assert_eq!(ok("-0s"), Duration::ZERO);
        for bad in [
            "",
            "s",
            "30",
            "1x",
            "1.5",
            ".s",
            "-5s",
            "1e5s",
            "30 s",
            "99999999999999999999999h",
            "9999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_spec_is_read_leniently() {
        let read = |weighting: Value| parse_slow_start(Some(&json!({"service": "echo", "weighting": weighting})));

        let full = read(
            json!({"policy": "Equal", "slowStartWindow": "1m30s", "slowStartAggression": 2.5,
                                "slowStartMinWeightPercent": 25}),
        );
        assert!(full.warnings.is_empty(), "{:?}", full.warnings);
        assert_eq!(full.settings, settings(90, 2.5, 25));

        let defaults = read(json!({"slowStartWindow": "30s"}));
        assert_eq!(defaults.settings, settings(30, 1.0, 10));
        assert!(defaults.warnings.is_empty());

        for off in [
            json!({}),
            json!({"slowStartWindow": "0s"}),
            json!({"slowStartWindow": null}),
        ] {
            let parsed = read(off);
            assert!(!parsed.settings.is_on() && parsed.warnings.is_empty());
        }
        assert_eq!(parse_slow_start(None), ParsedSlowStart::default());
        assert_eq!(
            parse_slow_start(Some(&json!({"service": "x"}))),
            ParsedSlowStart::default()
        );

        let bad = read(json!({"slowStartWindow": "2h", "slowStartAggression": 0, "slowStartMinWeightPercent": 10.5}));
        assert!(!bad.settings.is_on());
        assert_eq!((bad.settings.aggression, bad.settings.min_weight_percent), (1.0, 10));
        assert_eq!(
            bad.warnings,
            [
                "spec.weighting.slowStartWindow \"2h\" is longer than 1h; slow start off",
                "spec.weighting.slowStartAggression 0 is not a number from 0.1 to 10; using 1",
                "spec.weighting.slowStartMinWeightPercent 10.5 is not a whole number from 1 to 100; using 10",
            ]
        );

        let kept =
            read(json!({"slowStartWindow": "10s", "slowStartAggression": "fast", "slowStartMinWeightPercent": 0}));
        assert_eq!(kept.settings, settings(10, 1.0, 10), "a bad curve keeps the window");
        assert_eq!(kept.warnings.len(), 2);

        let not_a_duration = read(json!({"slowStartWindow": 30}));
        assert!(!not_a_duration.settings.is_on());
        assert_eq!(not_a_duration.warnings.len(), 1);
        assert_eq!(
            read(json!({"slowStartMinWeightPercent": 100.0}))
                .settings
                .min_weight_percent,
            100
        );
        assert_eq!(
            read(json!("Equal")).warnings,
            ["spec.weighting is not an object; slow start off"]
        );
    }

    proptest! {
        #[test]
        fn any_duration_text_never_panics(text in "[-+0-9.a-zµμ ]{0,24}") {
            if let Ok(duration) = parse_go_duration(&text) {
                prop_assert!(duration.as_nanos() <= u128::from(u64::MAX));
            }
        }

        #[test]
        fn any_settings_give_a_factor_in_range(
            window_ms in 0u64..4_000_000, aggression in prop::num::f64::ANY, min in 0u32..200, elapsed_ms in 0u64..5_000_000,
        ) {
            let settings = SlowStart { window: Duration::from_millis(window_ms), aggression, min_weight_percent: min };
            let factor = settings.factor(Duration::from_millis(elapsed_ms));
            prop_assert!((0.01..=1.0).contains(&factor), "{factor}");
            if let Some(percent) = settings.percent(Duration::from_millis(elapsed_ms)) {
                prop_assert!((1..=100).contains(&percent));
            }
        }
    }
}
