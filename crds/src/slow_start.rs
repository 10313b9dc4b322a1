//! Slow start's curve (Envoy's), shared by the clients that ramp on their own and the
//! operator's xDS server, which ramps for xDS clients by pushing stepped weights.

use std::time::Duration;

use crate::{DEFAULT_SLOW_START_AGGRESSION, DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT, Weighting};

/// The longest window the API accepts; a longer one is read as a mistake (slow start off).
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// Slow-start settings, from `spec.weighting` of the GrpcBackend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    /// How long a newly usable endpoint ramps; zero turns slow start off.
    pub window: Duration,
    /// The curve's exponent is `1 / aggression`: 1 ramps linearly, above 1 faster early on.
    pub aggression: f64,
    /// The share an endpoint gets at least while it ramps, in percent of its weight (1..=100).
    pub min_weight_percent: u32,
}

impl Default for SlowStart {
    /// Off, with Envoy's defaults for the curve.
    fn default() -> Self {
        Self {
            window: Duration::ZERO,
            aggression: DEFAULT_SLOW_START_AGGRESSION,
            min_weight_percent: DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT,
        }
    }
}

impl SlowStart {
    /// Whether slow start ramps new endpoints at all (a window above zero).
    pub fn is_on(&self) -> bool {
        !self.window.is_zero()
    }

    /// Envoy's factor for an endpoint usable for `elapsed`: from `min_weight_percent / 100` up
    /// to 1 over the window, 1 from the end of the window on (and always 1 when off).
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if !self.is_on() || elapsed >= self.window {
            return 1.0;
        }
        let progress = elapsed.as_secs_f64() / self.window.as_secs_f64();
        let min = f64::from(self.min_weight_percent.clamp(1, 100)) / 100.0;
        // Settings are validated when read; guard anyway so that no value can give NaN.
        let aggression = if self.aggression.is_finite() && self.aggression > 0.0 {
            self.aggression
        } else {
            DEFAULT_SLOW_START_AGGRESSION
        };
        progress.powf(1.0 / aggression).clamp(min, 1.0)
    }

    /// The share in whole percent (rounded) of an endpoint usable for `elapsed`, or `None` when
    /// it is not ramping (off, or past the window).
    pub fn percent(&self, elapsed: Duration) -> Option<u32> {
        if !self.is_on() || elapsed >= self.window {
            return None;
        }
        let percent = (self.factor(elapsed) * 100.0).round() as u32;
        Some(percent.clamp(self.min_weight_percent.clamp(1, 100), 100))
    }

    /// How often a client recomputes the shares while something ramps: every 2% of the window,
    /// between 100 ms and 1 s.
    ///
    /// With a linear curve a step then moves an endpoint's share by about 2% of its weight; the
    /// 1 s cap keeps long windows close to the curve, and the 100 ms floor keeps short windows
    /// from spinning. A tick that changes no percentage rebuilds nothing (it costs one pass over
    /// the endpoints in rotation); one that does rebuilds the client's schedule of picks.
    pub fn tick(&self) -> Duration {
        (self.window / 50).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// The picker's weights for endpoints of published weight `weight` and slow-start percentage
/// `percent` (`None`: not ramping): the published weights when nothing ramps, else
/// `weight x percent` with 100 for the endpoints that do not ramp, scaled down together if that
/// does not fit in `u32` (an endpoint of weight above 0 keeps at least 1).
pub fn picker_weights(chosen: &[(u32, Option<u32>)]) -> Vec<u32> {
    if chosen.iter().all(|(_, percent)| percent.is_none()) {
        return chosen.iter().map(|(weight, _)| *weight).collect();
    }
    let scaled: Vec<u64> = chosen
        .iter()
        .map(|(weight, percent)| u64::from(*weight) * u64::from(percent.unwrap_or(100).min(100)))
        .collect();
    let max = scaled.iter().copied().max().unwrap_or(0);
    let divisor = max.div_ceil(u64::from(u32::MAX)).max(1);
    scaled
        .iter()
        .map(|w| match *w {
            0 => 0,
            w => u32::try_from(w / divisor).unwrap_or(u32::MAX).max(1),
        })
        .collect()
}

impl Weighting {
    /// The slow-start settings of a validated spec (admission keeps them in range; a value out
    /// of range is clamped rather than refused here).
    pub fn slow_start(&self) -> SlowStart {
        let window = self
            .slow_start_window
            .filter(|w| !w.is_negative())
            .map(|w| Duration::from(w).min(MAX_WINDOW))
            .unwrap_or_default();
        SlowStart {
            window,
            aggression: self
                .slow_start_aggression
                .filter(|a| (0.1..=10.0).contains(a))
                .unwrap_or(DEFAULT_SLOW_START_AGGRESSION),
            min_weight_percent: self
                .slow_start_min_weight_percent
                .and_then(|p| u32::try_from(p.clamp(1, 100)).ok())
                .unwrap_or(DEFAULT_SLOW_START_MIN_WEIGHT_PERCENT),
        }
    }
}
